// The status page: renders the state embedded in the page, then follows the /ws event stream.
// Progress events update the current task in place; any other event re-reads /api/status.
"use strict";

const token = new URLSearchParams(location.search).get("token");
let state = JSON.parse(document.getElementById("initial-state").textContent);
let refreshTimer = null;
const banners = {};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function secs(value) {
  if (value === null || value === undefined) return "unknown";
  const s = Math.max(0, Math.round(value));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function short(id) { return id ? id.slice(0, 10) : ""; }

function withToken(url) { return token ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : url; }

function renderGpu() {
  const box = document.getElementById("gpu");
  const gpu = state.gpu;
  box.replaceChildren();
  if (!gpu || gpu.vram_total_gb === null) {
    box.append(el("span", { class: "muted" }, `no GPU · worker RSS ${gpu ? gpu.rss_gb.toFixed(2) : "?"} GiB`));
    return;
  }
  const pct = (100 * gpu.vram_used_gb) / gpu.vram_total_gb;
  box.append(
    el("div", {}, `${state.gpu_name || "GPU"}: ${gpu.vram_used_gb.toFixed(1)} / ${gpu.vram_total_gb.toFixed(1)} GiB`,
      gpu.gpu_utilization !== null ? ` · ${gpu.gpu_utilization}% busy` : "",
      gpu.gpu_temperature_c !== null ? ` · ${gpu.gpu_temperature_c} °C` : ""),
    el("div", { class: `bar small${pct >= 90 ? " hot" : ""}` }, el("div")),
  );
  box.lastChild.firstChild.style.width = `${pct.toFixed(1)}%`;
}

function renderCurrent() {
  const box = document.getElementById("current");
  const cur = state.current;
  box.replaceChildren();
  if (!cur) {
    box.removeAttribute("data-task-id");
    box.append(el("span", { class: "muted" }, state.resident_model ? `idle · ${state.resident_model} loaded` : "idle"));
    return;
  }
  box.setAttribute("data-task-id", cur.task_id);
  const p = cur.progress || {};
  const stage = p.stage || "starting";
  let percent = 0;
  if (stage === "denoising" && p.total_steps) percent = (100 * p.step) / p.total_steps;
  else if (stage === "decoding" || stage === "writing_video") percent = 100;
  const eta = p.eta_seconds ?? cur.eta_seconds;
  const etaTs = p.ts ?? cur.started_ts;
  const fill = el("div", { id: "bar-fill" });
  fill.style.width = `${percent.toFixed(1)}%`;
  box.setAttribute("data-percent", percent.toFixed(1));
  box.append(
    el("div", { class: "row" },
      el("code", {}, cur.task_id), el("span", {}, cur.model || cur.task_type || ""),
      el("span", { class: "stage", id: "stage" }, stage.replace("_", " ")),
      el("span", { id: "steps" }, stage === "denoising" ? `step ${p.step} / ${p.total_steps}` : ""),
      el("span", { id: "percent" }, `${percent.toFixed(0)}%`)),
    el("div", { class: "bar" }, fill),
    el("div", { class: "row muted" },
      el("span", { id: "eta", "data-eta": eta ?? "", "data-ts": etaTs ?? "" }, `ETA ${secs(eta)}`),
      el("span", {}, p.vram_gb != null ? `VRAM ${p.vram_gb.toFixed(2)} GiB` : "")),
  );
}

function renderQueue() {
  const body = document.querySelector("#queue tbody");
  body.replaceChildren();
  state.queue.forEach((task, index) => {
    body.append(el("tr", { "data-task-id": task.id },
      el("td", {}, index + 1), el("td", {}, el("code", {}, short(task.id)), ` ${task.task_type}`),
      el("td", {}, task.model || ""), el("td", {}, task.priority),
      el("td", {}, secs(task.starts_in)), el("td", {}, secs(task.done_in))));
  });
  if (!state.queue.length) body.append(el("tr", {}, el("td", { colSpan: 6, class: "muted" }, "empty")));
  const c = state.counts;
  document.getElementById("counts").textContent =
    `${c["Queued"]} queued · ${c["In Progress"]} running · ${c["Complete"]} complete · ${c["Failed"]} failed · ${c["Cancelled"]} cancelled`;
}

function renderRecent() {
  const box = document.getElementById("recent");
  box.replaceChildren();
  for (const task of state.recent) {
    let image;
    if (task.thumb) {
      image = el("img", { alt: `first frame of ${task.id}`, src: withToken(task.thumb) });
      image.onload = () => image.classList.add("loaded");
    } else image = el("div", { class: "noimg" }, task.status);
    box.append(el("div", { class: "result", "data-task-id": task.id, "data-status": task.status },
      image,
      el("div", {}, el("span", { class: `badge ${task.status}` }, task.status), " ", el("code", {}, short(task.id))),
      el("div", { class: "muted" }, [task.model, task.resolution, task.frames && `${task.frames} frames`,
        task.seconds != null && `${task.seconds} s`].filter(Boolean).join(" · ")),
      task.error_message ? el("div", { class: "err" }, task.error_message.slice(0, 160)) : ""));
  }
  if (!state.recent.length) box.append(el("span", { class: "muted" }, "nothing finished yet"));
}

function renderBanners() {
  const missing = state.models_unavailable || [];
  if (missing.length) {
    const names = missing.map((m) => `${m.model} (${m.detail.slice(0, 80)})`).join(", ");
    banners.models = `${missing.length} model(s) cannot run on this worker: ${names}`;
  }
  const box = document.getElementById("banners");
  box.replaceChildren(...Object.values(banners).map((text) => el("div", { class: "banner" }, text)));
}

function render() {
  document.getElementById("worker-id").textContent = state.worker_id || "";
  renderGpu(); renderCurrent(); renderQueue(); renderRecent(); renderBanners();
}

function logEvent(ev) {
  const list = document.getElementById("events");
  const time = new Date(ev.ts * 1000).toLocaleTimeString();
  const detail = ev.event === "progress" ? `${ev.stage} ${ev.step}/${ev.total_steps}` : (ev.error || ev.model || "");
  list.prepend(el("li", {}, `${time} ${ev.event} ${short(ev.task_id)} ${detail}`));
  while (list.children.length > 30) list.lastChild.remove();
}

async function refresh() {
  refreshTimer = null;
  try {
    const response = await fetch(withToken("/api/status"), { cache: "no-store" });
    if (response.ok) { state = await response.json(); render(); }
  } catch (err) { /* the next event retries */ }
}

function refreshSoon() { if (!refreshTimer) refreshTimer = setTimeout(refresh, 250); }

function onEvent(ev) {
  if (ev.event === "hello") { state = ev.status; render(); return; }
  logEvent(ev);
  if (ev.event === "progress" && state.current && state.current.task_id === ev.task_id) {
    state.current.progress = ev;
    renderCurrent();
    return;
  }
  if (ev.event === "vram_warning") banners.vram = `GPU memory at ${ev.percent}% of ${ev.budget_gb} GiB`;
  refreshSoon();
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(withToken(`${scheme}://${location.host}/ws`));
  const live = document.getElementById("live");
  socket.onopen = () => { live.className = "dot on"; live.textContent = "live"; };
  socket.onmessage = (message) => onEvent(JSON.parse(message.data));
  socket.onclose = () => { live.className = "dot off"; live.textContent = "offline"; setTimeout(connect, 2000); };
}

// The ETA counts down between events.
setInterval(() => {
  const eta = document.getElementById("eta");
  if (!eta || eta.dataset.eta === "" || eta.dataset.ts === "") return;
  const left = Number(eta.dataset.eta) - (Date.now() / 1000 - Number(eta.dataset.ts));
  eta.textContent = `ETA ${secs(left)}`;
}, 1000);

render();
connect();
