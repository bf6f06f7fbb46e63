// The status page: renders the state embedded in the page, then follows the /ws event stream.
// Progress and preview events update the running card in place (they are not listed as events); any
// other event is listed and re-reads /api/status. A result opens a view with its video (or image) and
// facts from GET /tasks/{id}; rows carry cancel / retry buttons (POST /tasks/{id}/cancel|retry).
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
      el("span", {}, p.vram_gb != null ? `VRAM ${p.vram_gb.toFixed(2)} GiB` : ""),
      el("span", { class: "actions" }, actionButton("cancel", cur.task_id))),
  );
  const preview = state.preview;
  if (preview && preview.task_id === cur.task_id && preview.image) {
    box.append(el("img", { id: "preview", alt: `preview at step ${preview.step}`, src: preview.image,
      title: `latent preview, step ${preview.step} / ${preview.total_steps}`, "data-step": preview.step }));
  }
}

function actionButton(action, taskId) {
  const button = el("button", { type: "button", class: `action-${action}`, "data-task-id": taskId }, action);
  button.onclick = async (event) => {
    event.stopPropagation();
    button.disabled = true;
    try {
      const response = await fetch(withToken(`/tasks/${encodeURIComponent(taskId)}/${action}`), { method: "POST" });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        banners.action = `${action} ${short(taskId)}: ${body.detail || response.status}`;
        renderBanners();
      }
    } finally { refreshSoon(); }
  };
  return button;
}

function renderQueue() {
  const body = document.querySelector("#queue tbody");
  body.replaceChildren();
  state.queue.forEach((task, index) => {
    body.append(el("tr", { "data-task-id": task.id },
      el("td", {}, index + 1), el("td", {}, el("code", {}, short(task.id)), ` ${task.task_type}`),
      el("td", {}, task.model || ""), el("td", {}, task.priority),
      el("td", {}, secs(task.starts_in)), el("td", {}, secs(task.done_in)),
      el("td", { class: "actions" }, actionButton("cancel", task.id))));
  });
  if (!state.queue.length) body.append(el("tr", {}, el("td", { colSpan: 7, class: "muted" }, "empty")));
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
    const card = el("div", { class: "result", "data-task-id": task.id, "data-status": task.status, tabIndex: 0,
      title: task.prompt || task.id },
      image,
      el("div", {}, el("span", { class: `badge ${task.status}` }, task.status), " ", el("code", {}, short(task.id))),
      el("div", { class: "muted" }, [task.model, task.resolution, task.frames && `${task.frames} frames`,
        task.seconds != null && `${task.seconds} s`].filter(Boolean).join(" · ")),
      task.error_message ? el("div", { class: "err" }, clip(task.error_message, 160)) : "",
      task.status === "Failed" || task.status === "Cancelled" ? el("div", { class: "actions" }, actionButton("retry", task.id)) : "");
    card.onclick = () => openDetail(task.id);
    card.onkeydown = (event) => { if (event.key === "Enter") openDetail(task.id); };
    box.append(card);
  }
  if (!state.recent.length) box.append(el("span", { class: "muted" }, "nothing finished yet"));
}

// Cut at a word boundary, with an ellipsis (never mid-word); the full text stays in the title.
function clip(text, limit) {
  text = String(text ?? "");
  if (text.length <= limit) return text;
  const cut = text.slice(0, limit);
  const space = cut.lastIndexOf(" ");
  return `${(space > limit / 2 ? cut.slice(0, space) : cut).replace(/[\s,.;:]+$/, "")} …`;
}

function renderBanners() {
  const box = document.getElementById("banners");
  const nodes = Object.values(banners).map((text) => el("div", { class: "banner" }, text));
  const missing = state.models_unavailable || [];
  if (missing.length) {
    // One line per model, "model: why", in full (the list wraps; nothing is cut).
    const list = el("ul", {}, ...missing.map((m) => el("li", { "data-model": m.model }, el("code", {}, m.model), `: ${m.detail}`)));
    nodes.unshift(el("div", { class: "banner", id: "models-banner" },
      `${missing.length} model(s) cannot run on this worker:`, list));
  }
  box.replaceChildren(...nodes);
}

function fact(name, value) {
  if (value === null || value === undefined || value === "") return [];
  return [el("dt", {}, name), el("dd", { "data-fact": name }, typeof value === "object" ? JSON.stringify(value) : value)];
}

async function openDetail(taskId) {
  const dialog = document.getElementById("detail");
  const response = await fetch(withToken(`/tasks/${encodeURIComponent(taskId)}`), { cache: "no-store" });
  if (!response.ok) return;
  const task = await response.json();
  const params = typeof task.params === "object" && task.params ? task.params : {};
  const result = task.result_data || {};
  document.getElementById("detail-title").textContent = `${task.status} · ${task.id}`;
  const media = document.getElementById("detail-media");
  media.replaceChildren();
  if (task.links && task.links.output) {
    const src = withToken(task.links.output);
    if (/\.(png|jpe?g|webp)$/i.test(task.output_location || "")) media.append(el("img", { id: "detail-image", src, alt: task.id }));
    else media.append(el("video", { id: "detail-video", src, controls: true, loop: true, muted: true, playsInline: true, preload: "auto" }));
  }
  const timings = result.timings || {};
  document.getElementById("detail-facts").replaceChildren(
    ...fact("prompt", params.prompt ?? params.base_prompts),
    ...fact("model", task.model),
    ...fact("type", task.task_type),
    ...fact("seed", result.seed ?? params.seed),
    ...fact("resolution", result.resolution ?? params.resolution),
    ...fact("frames", result.frames ?? params.video_length),
    ...fact("total", timings.total != null ? secs(timings.total) : null),
    ...fact("mean step", timings.mean_step != null ? `${timings.mean_step.toFixed(3)} s` : null),
    ...fact("timings", Object.keys(timings).length ? Object.fromEntries(Object.entries(timings).filter(([k]) => k !== "step_times")) : null),
    ...fact("memory profile", result.memory_profile ?? params.memory_profile),
    ...fact("peak memory", [result.peak_vram_gb != null && `VRAM ${result.peak_vram_gb.toFixed(2)} GiB`,
      result.peak_rss_gb != null && `RSS ${result.peak_rss_gb.toFixed(2)} GiB`].filter(Boolean).join(" · ")),
    ...fact("monitor", result.monitor),
    ...fact("attempts", `${task.attempts} of ${task.max_attempts}`),
    ...fact("error", task.error_message),
    ...fact("output", task.output_location));
  document.getElementById("detail-params").textContent = JSON.stringify(params, null, 2);
  if (!dialog.open) dialog.showModal();
  const video = document.getElementById("detail-video");
  if (video) video.play().catch(() => { /* autoplay refused: the controls remain */ });
}

function render() {
  document.getElementById("worker-id").textContent = state.worker_id || "";
  renderGpu(); renderCurrent(); renderQueue(); renderRecent(); renderBanners();
}

function logEvent(ev) {
  const list = document.getElementById("events");
  const time = new Date(ev.ts * 1000).toLocaleTimeString();
  const detail = ev.error || ev.model || "";
  list.prepend(el("li", { "data-event": ev.event, title: detail }, `${time} ${ev.event} ${short(ev.task_id)} ${clip(detail, 140)}`));
  while (list.children.length > 50) list.lastChild.remove();
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
  if (ev.event === "progress" || ev.event === "preview") {
    // Collapsed into the running card: per-step events would push everything else out of the list.
    if (state.current && state.current.task_id === ev.task_id) {
      if (ev.event === "progress") state.current.progress = ev; else state.preview = ev;
      renderCurrent();
    }
    return;
  }
  logEvent(ev);
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
