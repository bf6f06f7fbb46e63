"""When a task runs its transformer blocks compiled, and when eagerly: compile only where it pays.

Compiling the repeated Wan block costs seconds once per block layout (and, with static shapes, once
per new token count); each compiled forward then saves a fraction of an eager one. A task whose
remaining forwards would not earn the compile back (a 1-frame image, a 4-step preview at a shape never
seen) runs eagerly and leaves the compile to a task that pays for it. Once a layout's compiled code
covers a shape (a shape already compiled, or any shape once dynamic-shape code exists), compiling
costs nothing and every task runs compiled.

The decision is pure bookkeeping (no torch): `CompileTracker.decide` says what to do and why, and the
caller records the decision in the task's result_data (`speed.compile`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Measured on an H200 with Wan 2.1 1.3B at 832x480x81 (docs/BENCHMARKS.md, bench/queue_bench.py): eager
# 1.258 s/step, compiled 1.057 s/step (0.84x), 566 TFLOP per CFG step; the first compile of the block
# with the token dim dynamic 9.2 s cold, 2.5 s from a warm on-disk cache (a restarted worker).
EAGER_FLOPS_PER_S = 440e12  # what an eager Wan forward achieves (matmuls + attention)
COMPILED_SAVING = 0.16  # fraction of an eager forward that compiled blocks save
COLD_COMPILE_S = 10.0  # first compile of a block layout (dynamo trace + inductor + triton autotune)
CACHED_COMPILE_S = 2.5  # the same with inductor's on-disk caches warm (trace only, kernels from disk)
# A worker runs queues: the code one task compiles serves the later tasks of its layout too, so a task
# compiles when it alone earns back this share of the compile (a 20-step 832x480x81 CFG task does; a
# 1-frame task or a short low-resolution preview does not).
AMORTIZE_TASKS = 3
POLICIES = ("pays", "always")

DYNAMIC_MODES = ("mark", "auto", "off")  # token dim dynamic from the first compile / after 2 shapes / never


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
    `disk_cache`: inductor's on-disk cache folder holds compiled graphs already (an earlier process
    compiled), so a compile costs `cached_compile_s` instead of `cold_compile_s`.
    """

    dynamic: str = "mark"
    disk_cache: bool = True
    policy: str = "pays"  # "always": compile every task (benchmarks, or a queue known to be long)
    cold_compile_s: float = COLD_COMPILE_S
    cached_compile_s: float = CACHED_COMPILE_S
    shapes: dict[str, set[int]] = field(default_factory=dict)  # layout -> token counts compiled
    dynamic_layouts: set[str] = field(default_factory=set)  # layouts whose code covers every token count
    last: CompileDecision | None = None

    def __post_init__(self) -> None:
        if self.dynamic not in DYNAMIC_MODES:
            raise ValueError(f"compile dynamic mode {self.dynamic!r} is not one of {', '.join(DYNAMIC_MODES)}")
        if self.policy not in POLICIES:
            raise ValueError(f"compile policy {self.policy!r} is not one of {', '.join(POLICIES)}")

    def covered(self, layout: str, tokens: int) -> bool:
        """True when compiled code for this layout already runs this token count without compiling."""
        return layout in self.dynamic_layouts or tokens in self.shapes.get(layout, set())

    def compile_cost(self, layout: str, tokens: int) -> float:
        """Expected seconds of compile the task would pay at its first compiled forward."""
        if self.covered(layout, tokens):
            return 0.0
        return self.cached_compile_s if self.disk_cache else self.cold_compile_s

    def decide(self, layout: str, tokens: int, forwards: int, flops_per_forward: float) -> CompileDecision:
        """Compile when the code is there already, or when the forwards' saving earns back their share
        of the compile (`AMORTIZE_TASKS`); policy "always" compiles every task."""
        cost = self.compile_cost(layout, tokens)
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
        """A compiled task ran: its shape is compiled now (and, per the dynamic mode, every shape)."""
        if not decision.compiled:
            return
        seen = self.shapes.setdefault(decision.layout, set())
        seen.add(decision.tokens)
        if self.dynamic == "mark" or (self.dynamic == "auto" and len(seen) >= 2):
            self.dynamic_layouts.add(decision.layout)
