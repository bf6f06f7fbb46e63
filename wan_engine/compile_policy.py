"""When a task runs its transformer blocks compiled, and when eagerly: compile only where it pays.

Compiling the repeated Wan block costs seconds once per block layout (and, with static shapes, once
per new token count); each compiled forward then saves a fraction of an eager one. A task whose
remaining forwards would not earn the compile back (a 1-frame image, a 4-step preview at a shape never
seen) runs eagerly and leaves the compile to a task that pays for it. Once a layout's compiled code
covers a shape (a shape already compiled, or any shape once dynamic-shape code exists), compiling
costs nothing and every task runs compiled.

The decision is bookkeeping (no torch): `CompileTracker.decide` says what to do and why, and the
caller records the decision in the task's result_data (`speed.compile`). Warmth is per block layout: a
layout compiled in this process, or recorded in `wan_compiled_layouts.json` of the compile cache folder
by an earlier process (same dynamic mode, same torch and GPU), costs the cached figure; any other layout
a cold compile, even when the folder holds another layout's graphs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Measured on an H200 with Wan 2.1 1.3B at 832x480x81 (docs/BENCHMARKS.md, bench/queue_bench.py): eager
# 1.258 s/step, compiled 1.057 s/step (0.84x), 566 TFLOP per CFG step; the first compile of the block
# with the token dim dynamic 9.2 s cold, 2.5 s from a warm on-disk cache (a restarted worker).
EAGER_FLOPS_PER_S = 440e12  # what an eager Wan forward achieves (matmuls + attention)
COMPILED_SAVING = 0.16  # fraction of an eager forward that compiled blocks save
# A cold compile, measured in the real `wan-worker run` on an H200 (bench/worker_queue_bench.py, raw
# bench/results/h200_worker_queue_run1.json; first step less the median step): Wan 2.1 T2V 1.3B (one block
# kind, WanTransformerBlock) 15.1 s; VACE 1.3B (two kinds, + WanVACETransformerBlock) 24.6 s. So a layout
# costs the first kind's figure plus one per further kind (dynamo trace + inductor + triton autotune each).
COLD_COMPILE_S = 15.1  # first compile of a block layout of one block kind
COLD_COMPILE_KIND_S = 9.5  # each further block kind of the layout (24.6 - 15.1)
CACHED_COMPILE_S = 2.5  # the same with inductor's on-disk caches warm (trace only, kernels from disk)
LAYOUTS_FILE = "wan_compiled_layouts.json"  # in the compile cache folder: layouts whose graphs are on disk
LAYOUTS_FORMAT = 1
# A worker runs queues: the code one task compiles serves the later tasks of its layout too, so a task
# compiles when it alone earns back this share of the compile (a 20-step 832x480x81 CFG task does; a
# 1-frame task or a short low-resolution preview does not). 4, not 3, since the cold compile was measured
# at 15.1 s: the 20-step 832x480x81 CFG task saves ~4.1 s (x4 = 16.5 s), a 10-step VACE travel segment
# at 832x480x41 ~0.7 s (never earns a 24.6 s VACE compile back).
AMORTIZE_TASKS = 4
POLICIES = ("pays", "always")

DYNAMIC_MODES = ("mark", "auto", "off")  # token dim dynamic from the first compile / after 2 shapes / never


def cold_compile_estimate(block_kinds: int = 1) -> float:
    """Expected seconds of a cold compile of a layout with this many distinct repeated block kinds."""
    if block_kinds < 1:
        raise ValueError(f"block_kinds {block_kinds!r} must be at least 1")
    return COLD_COMPILE_S + (block_kinds - 1) * COLD_COMPILE_KIND_S


def _read_entries(folder: Path) -> list[dict[str, Any]]:
    """The record's entries; [] when the file is absent, unreadable or not this format (it is rewritten)."""
    path = folder / LAYOUTS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("ignoring the compiled-layout record %s: %s", path, exc)
        return []
    entries = data.get("layouts") if isinstance(data, dict) and data.get("format") == LAYOUTS_FORMAT else None
    if not isinstance(entries, list):
        log.warning("ignoring the compiled-layout record %s: not format %d", path, LAYOUTS_FORMAT)
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("layout"), str)]


def recorded_layouts(folder: str | Path | None, dynamic: str, toolchain: str) -> set[str]:
    """Layouts an earlier process compiled into `folder` with this dynamic mode and toolchain."""
    if folder is None:
        return set()
    return {
        e["layout"]
        for e in _read_entries(Path(folder))
        if e.get("dynamic") == dynamic and e.get("toolchain") == toolchain
    }


def record_layout(folder: str | Path, layout: str, dynamic: str, toolchain: str) -> None:
    """Add a compiled layout to the record (written atomically: a temporary file, then a rename).

    Re-read first so that another process's entries written since are kept; never raises (a read-only
    folder costs only the next process's estimate)."""
    folder = Path(folder)
    entries = _read_entries(folder)
    entry = {"layout": layout, "dynamic": dynamic, "toolchain": toolchain}
    if any(all(e.get(k) == v for k, v in entry.items()) for e in entries):
        return
    entries.append({**entry, "compiled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".layouts-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump({"format": LAYOUTS_FORMAT, "layouts": entries}, out, indent=1)
            os.replace(tmp, folder / LAYOUTS_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("could not record compiled layout %s in %s: %s", layout, folder, exc)


@dataclass(frozen=True)
class CompileDecision:
    """One task's choice (recorded in result_data): compiled or eager, and the numbers behind it."""

    compiled: bool
    reason: str
    layout: str = ""
    tokens: int = 0
    forwards: int = 0
    expected_compile_s: float = 0.0
    expected_saving_s: float = 0.0
    lora_fused: bool = False
    lora_fuse_s: float = 0.0  # fusing the LoRAs into the weights (restoring them costs about as much)
    lora_refuses: int = 0  # steps where a schedule changed the multipliers (each re-fused the weights)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (rounded seconds)."""
        data = asdict(self)
        data["expected_compile_s"] = round(self.expected_compile_s, 2)
        data["expected_saving_s"] = round(self.expected_saving_s, 2)
        return data


@dataclass
class CompileTracker:
    """What compiled code exists in this process, per block layout; decides each task's compile.

    `dynamic`: "mark" compiles the token dimension dynamic from the first compile (one compile per
    layout covers every shape); "auto" is torch's automatic dynamic (the first shape static, the second
    compiles dynamic code that covers all later ones); "off" compiles each token count once.
    `cache_dir`: inductor's on-disk cache folder; its record of compiled layouts (`LAYOUTS_FILE`) is read
    once here and extended by `ran`. `disk_cache` False ignores the record (nothing persists across
    processes). `toolchain` (torch version and GPU) must match a record entry for it to count.
    A layout compiled in this process or recorded costs `cached_compile_s`; any other a cold compile
    (`cold_compile_s` for one block kind, `cold_compile_kind_s` more per further kind).
    """

    dynamic: str = "mark"
    disk_cache: bool = True
    policy: str = "pays"  # "always": compile every task (benchmarks, or a queue known to be long)
    cache_dir: str | Path | None = None
    toolchain: str = ""
    cold_compile_s: float = COLD_COMPILE_S
    cold_compile_kind_s: float = COLD_COMPILE_KIND_S
    cached_compile_s: float = CACHED_COMPILE_S
    shapes: dict[str, set[int]] = field(default_factory=dict)  # layout -> token counts compiled
    dynamic_layouts: set[str] = field(default_factory=set)  # layouts whose code covers every token count
    recorded: set[str] = field(default_factory=set)  # layouts an earlier process compiled into cache_dir
    last: CompileDecision | None = None

    def __post_init__(self) -> None:
        if self.dynamic not in DYNAMIC_MODES:
            raise ValueError(f"compile dynamic mode {self.dynamic!r} is not one of {', '.join(DYNAMIC_MODES)}")
        if self.policy not in POLICIES:
            raise ValueError(f"compile policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        self.attach(self.cache_dir)

    def attach(self, cache_dir: str | Path | None) -> None:
        """Use this cache folder's record from now on (read once: what earlier processes compiled there).

        What this process compiled stays known: its code lives in memory whatever the folder."""
        self.cache_dir = cache_dir
        self.recorded = recorded_layouts(cache_dir, self.dynamic, self.toolchain) if self.disk_cache else set()

    def covered(self, layout: str, tokens: int) -> bool:
        """True when compiled code for this layout already runs this token count without compiling."""
        return layout in self.dynamic_layouts or tokens in self.shapes.get(layout, set())

    def warm(self, layout: str) -> bool:
        """True when a compile of this layout finds its graphs cached (this process, or the record)."""
        return layout in self.shapes or layout in self.recorded

    def compile_cost(self, layout: str, tokens: int, block_kinds: int = 1) -> float:
        """Expected seconds of compile the task would pay at its first compiled forward."""
        if self.covered(layout, tokens):
            return 0.0
        if self.warm(layout):
            return self.cached_compile_s
        if block_kinds < 1:
            raise ValueError(f"block_kinds {block_kinds!r} must be at least 1")
        return self.cold_compile_s + (block_kinds - 1) * self.cold_compile_kind_s

    def decide(
        self, layout: str, tokens: int, forwards: int, flops_per_forward: float, block_kinds: int = 1
    ) -> CompileDecision:
        """Compile when the code is there already, or when the forwards' saving earns back their share
        of the compile (`AMORTIZE_TASKS`); policy "always" compiles every task. `block_kinds`: distinct
        repeated block classes of the layout (a cold compile compiles each)."""
        cost = self.compile_cost(layout, tokens, block_kinds)
        saving = forwards * COMPILED_SAVING * flops_per_forward / EAGER_FLOPS_PER_S
        common = {"layout": layout, "tokens": tokens, "forwards": forwards}
        if cost == 0.0:
            decision = CompileDecision(True, "compiled code covers this shape", **common, expected_saving_s=saving)
        elif self.policy == "always":
            decision = CompileDecision(
                True, "policy always", **common, expected_compile_s=cost, expected_saving_s=saving
            )
        elif saving * AMORTIZE_TASKS >= cost:
            decision = CompileDecision(
                True, "saving beats the compile", **common, expected_compile_s=cost, expected_saving_s=saving
            )
        else:
            decision = CompileDecision(
                False,
                f"eager: {forwards} forwards save ~{saving:.1f}s, under 1/{AMORTIZE_TASKS} of a ~{cost:.0f}s compile",
                **common,
                expected_compile_s=cost,
                expected_saving_s=saving,
            )
        self.last = decision
        return decision

    def eager(self, reason: str, layout: str = "", tokens: int = 0, forwards: int = 0) -> CompileDecision:
        """Record a task that runs eagerly for another reason (a per-step LoRA schedule, compile off)."""
        self.last = CompileDecision(False, reason, layout=layout, tokens=tokens, forwards=forwards)
        return self.last

    def ran(self, decision: CompileDecision) -> None:
        """A compiled task ran: its shape is compiled now (and, per the dynamic mode, every shape); a
        layout new to the cache folder's record is added to it for the next process."""
        if not decision.compiled:
            return
        if self.disk_cache and self.cache_dir is not None and decision.layout not in self.recorded:
            record_layout(self.cache_dir, decision.layout, self.dynamic, self.toolchain)
            self.recorded.add(decision.layout)
        seen = self.shapes.setdefault(decision.layout, set())
        seen.add(decision.tokens)
        if self.dynamic == "mark" or (self.dynamic == "auto" and len(seen) >= 2):
            self.dynamic_layouts.add(decision.layout)
