"""The Wan 2.2 expert switch, in one place.

Wan 2.2 A14B models hold two transformers: the high-noise expert (`transformer`) runs the early steps
and the low-noise expert (`transformer_2`) the late ones. This module owns everything about that switch:

- the boundary: `switch_threshold` (a timestep out of 1000; default in `generation_params.BUILTIN_DEFAULTS`)
  becomes the pipelines' `boundary_ratio`, applied to a pipeline only for the duration of a call;
- the plan: which expert runs at each step (`experts_for_steps`, with the pipelines' own rule);
- per-expert guidance: `guidance_scale_2` for the low-noise expert;
- per-expert LoRA weights: which expert's adapter weights are set before each step (the values
  themselves come from `wan_engine.loras`' multipliers);
- the proof: `ExpertRecorder` observes which expert really ran each step.

Single-transformer models go through the same code: one "high" expert throughout, no boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from wan_engine.errors import InvalidRequestError
from wan_engine.generation_params import BUILTIN_DEFAULTS, ResolvedParams
from wan_engine.loras import Expert, LoraRequest, LoraState, set_step_weights
from wan_engine.pipeline_runtime import LoadedModel, scheduler_with_shift

__all__ = [
    "DEFAULT_SWITCH_THRESHOLD",
    "ExpertPlan",
    "ExpertRecorder",
    "boundary_ratio",
    "expert_boundary",
    "experts_for_steps",
    "plan_experts",
]

logger = logging.getLogger("headless_wgp")  # the orchestrator's logger: its log lines keep their source name

DEFAULT_SWITCH_THRESHOLD: float = BUILTIN_DEFAULTS["switch_threshold"]
TIMESTEP_SCALE = 1000.0  # switch_threshold is a timestep out of 1000; boundary_ratio is a fraction


def boundary_ratio(loaded: LoadedModel, switch_threshold: float = DEFAULT_SWITCH_THRESHOLD) -> float | None:
    """The pipelines' `boundary_ratio` for `switch_threshold` (None on a single-transformer model)."""
    return switch_threshold / TIMESTEP_SCALE if loaded.is_dual_expert else None


def experts_for_steps(
    loaded: LoadedModel, flow_shift: float, num_steps: int, boundary_ratio: float | None
) -> list[Expert]:
    """Which expert the pipeline will run at each step ("high" throughout on one transformer).

    Computed ahead of the call, from the same scheduler the call uses, with the pipelines' own rule
    (timestep >= boundary_ratio x num_train_timesteps -> high-noise expert).
    """
    scheduler = scheduler_with_shift(loaded.base_scheduler, flow_shift)
    scheduler.set_timesteps(num_steps, device="cpu")
    timesteps = [int(t) for t in scheduler.timesteps]
    if len(set(timesteps)) < len(timesteps):
        # Integer timesteps collide when the steps are many for the shift; multistep solvers (UniPC)
        # then fail deep inside the loop, so refuse up front with the largest count that works.
        limit = _max_distinct_steps(loaded, flow_shift, num_steps)
        raise InvalidRequestError(
            f"num_inference_steps={num_steps} at flow_shift {flow_shift:g} repeats scheduler timesteps "
            f"({type(scheduler).__name__}); use at most {limit} steps or a smaller flow_shift"
        )
    if not loaded.is_dual_expert or boundary_ratio is None:
        return ["high"] * num_steps
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    return ["high" if float(t) >= boundary else "low" for t in scheduler.timesteps]


def _max_distinct_steps(loaded: LoadedModel, flow_shift: float, upper: int) -> int:
    """The largest step count below `upper` whose timesteps are all distinct (binary search)."""
    low, high = 1, upper - 1
    while low < high:
        middle = (low + high + 1) // 2
        scheduler = scheduler_with_shift(loaded.base_scheduler, flow_shift)
        scheduler.set_timesteps(middle, device="cpu")
        timesteps = [int(t) for t in scheduler.timesteps]
        if len(set(timesteps)) == len(timesteps):
            low = middle
        else:
            high = middle - 1
    return low


@contextmanager
def expert_boundary(loaded: LoadedModel, pipe: Any, boundary: float | None) -> Iterator[Any]:
    """Give `pipe` this call's expert boundary (two-expert models only); restore the loaded default after."""
    if loaded.is_dual_expert:
        pipe.register_to_config(boundary_ratio=boundary)
    try:
        yield pipe
    finally:
        if loaded.is_dual_expert:
            pipe.register_to_config(boundary_ratio=loaded.default_boundary_ratio)


@dataclass(frozen=True)
class ExpertPlan:
    """One generation's expert switch: the boundary, the expert planned at each step, what depends on it."""

    dual: bool  # the loaded pipeline holds a second (low-noise) transformer
    boundary: float | None  # boundary_ratio for the call (None on one transformer)
    experts: list[Expert]  # the expert planned at each denoising step

    def guidance_kwargs(self, p: ResolvedParams) -> dict[str, Any]:
        """Pipeline kwargs for the low-noise expert's guidance (none on one transformer)."""
        return {"guidance_scale_2": p.guidance2_scale} if self.dual else {}

    def reported(self, p: ResolvedParams) -> dict[str, float | None]:
        """The expert settings a result records (None on one transformer: they did nothing)."""
        return {
            "guidance2_scale": p.guidance2_scale if self.dual else None,
            "switch_threshold": p.switch_threshold if self.dual else None,
        }

    def set_lora_weights(self, pipe: Any, state: LoraState, requests: Sequence[LoraRequest], step: int) -> None:
        """Before `step`: set the LoRA weights of the expert planned for it (nothing past the last step)."""
        if requests and step < len(self.experts):
            set_step_weights(pipe, state, requests, step, self.experts)

    def observed(self, recorder: ExpertRecorder, steps: int) -> tuple[str, ...] | None:
        """The experts that really ran (two-expert models only), with a warning if they left the plan."""
        if not self.dual:
            return None
        observed = recorder.experts_per_step(steps)
        if list(observed) != self.experts:
            logger.warning("experts differ from the plan", extra={"planned": self.experts, "observed": list(observed)})
        return observed


def plan_experts(loaded: LoadedModel, p: ResolvedParams) -> ExpertPlan:
    """The expert switch for a call with resolved params `p` (refuses step counts that repeat timesteps)."""
    boundary = boundary_ratio(loaded, p.switch_threshold)
    experts = experts_for_steps(loaded, p.flow_shift, p.num_inference_steps, boundary)
    return ExpertPlan(dual=loaded.is_dual_expert, boundary=boundary, experts=experts)


class ExpertRecorder:
    """Counts transformer calls per denoising step with forward pre-hooks (proof of which expert ran)."""

    def __init__(self) -> None:
        self.step = 0
        self.calls: list[tuple[int, str]] = []  # (step index, "high" | "low")

    def reset(self) -> None:
        """Forget what was recorded (a generation retried after an out-of-memory error)."""
        self.step = 0
        self.calls.clear()

    def _hook(self, name: str) -> Any:
        def record(_module: Any, _args: Any) -> None:
            self.calls.append((self.step, name))

        return record

    @contextmanager
    def attached(self, pipe: Any) -> Iterator[ExpertRecorder]:
        """Hook `transformer` as the high-noise expert and `transformer_2` as the low-noise one."""
        handles = []
        for attr, name in (("transformer", "high"), ("transformer_2", "low")):
            module = getattr(pipe, attr, None)
            if module is not None:
                handles.append(module.register_forward_pre_hook(self._hook(name)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def experts_per_step(self, num_steps: int) -> tuple[str, ...]:
        """The expert that ran each step; "mixed" would reveal a step served by both (never expected)."""
        per_step: list[set[str]] = [set() for _ in range(num_steps)]
        for step, name in self.calls:
            if step < num_steps:
                per_step[step].add(name)
        return tuple(next(iter(s)) if len(s) == 1 else ("mixed" if s else "none") for s in per_step)

    def calls_per_step(self, num_steps: int) -> tuple[int, ...]:
        """Transformer forward calls in each step (2 with classifier-free guidance, 1 without)."""
        counts = [0] * num_steps
        for step, _name in self.calls:
            if step < num_steps:
                counts[step] += 1
        return tuple(counts)
