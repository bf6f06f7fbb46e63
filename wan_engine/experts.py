"""The Wan 2.2 expert switch, in one place.

Wan 2.2 A14B models hold two transformers: the high-noise expert (`transformer`) runs the early steps
and the low-noise expert (`transformer_2`) the late ones. This module owns everything about that switch:

- the boundary: `switch_threshold` (a timestep out of 1000; default in `generation_params.BUILTIN_DEFAULTS`)
  becomes the pipelines' `boundary_ratio`, applied to a pipeline only for the duration of a call;
- the plan: which expert runs at each step (`experts_for_steps`, with the pipelines' own rule);
- per-expert guidance: `guidance_scale_2` for the low-noise expert;
- per-expert LoRA weights: which expert's adapter weights are set before each step (the values
  themselves come from `wan_engine.loras`' multipliers);
- the proof: `ExpertRecorder` observes which expert really ran each step;
- Wan2GP's 3-phase guidance (`guidance_phases` 3): phase 2 from the first step whose timestep is at
  most `switch_threshold`, phase 3 from the first at most `switch_threshold2`, with `guidance_scale`,
  `guidance2_scale`, `guidance3_scale`; the low-noise expert runs the phases after `model_switch_phase`
  (models/wan/any2video.py's rule). diffusers' pipelines switch expert and guidance once, so such a run
  puts `PhasedTransformer` in the pipeline's transformer slot: it runs the planned expert and
  classifier-free guidance itself, step by step (`phased_transformer`). Two phases on one transformer
  (a guidance switch only) run the same way.

Single-transformer models go through the same code: one "high" expert throughout, no boundary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from wan_engine.errors import InvalidRequestError
from wan_engine.generation_params import BUILTIN_DEFAULTS, ResolvedParams
from wan_engine.loras import Expert, LoraRequest, LoraState, set_step_weights
from wan_engine.pipeline_runtime import LoadedModel
from wan_engine.solvers import solver_scheduler

__all__ = [
    "DEFAULT_SWITCH_THRESHOLD",
    "ExpertPlan",
    "ExpertRecorder",
    "PhasedTransformer",
    "boundary_ratio",
    "expert_boundary",
    "experts_for_steps",
    "phased_transformer",
    "phases_for_timesteps",
    "plan_experts",
]

logger = logging.getLogger("headless_wgp")  # the orchestrator's logger: its log lines keep their source name

DEFAULT_SWITCH_THRESHOLD: float = BUILTIN_DEFAULTS["switch_threshold"]
TIMESTEP_SCALE = 1000.0  # switch_threshold is a timestep out of 1000; boundary_ratio is a fraction


def boundary_ratio(loaded: LoadedModel, switch_threshold: float = DEFAULT_SWITCH_THRESHOLD) -> float | None:
    """The pipelines' `boundary_ratio` for `switch_threshold` (None on a single-transformer model)."""
    return switch_threshold / TIMESTEP_SCALE if loaded.is_dual_expert else None


def step_timesteps(loaded: LoadedModel, flow_shift: float, num_steps: int, solver: str | None = None) -> list[float]:
    """The timesteps a call will run, from the same scheduler it uses; refuses counts that repeat them."""
    scheduler = solver_scheduler(loaded.base_scheduler, solver, flow_shift)
    scheduler.set_timesteps(num_steps, device="cpu")
    timesteps = [float(t) for t in scheduler.timesteps]
    integers = [int(t) for t in timesteps]
    if "Multistep" in type(scheduler).__name__ and len(set(integers)) < len(integers):
        # Integer timesteps collide when the steps are many for the shift; multistep solvers (UniPC)
        # then fail deep inside the loop, so refuse up front with the largest count that works.
        limit = _max_distinct_steps(loaded, flow_shift, num_steps, solver)
        raise InvalidRequestError(
            f"num_inference_steps={num_steps} at flow_shift {flow_shift:g} repeats scheduler timesteps "
            f"({type(scheduler).__name__}); use at most {limit} steps or a smaller flow_shift"
        )
    return timesteps


def experts_for_steps(
    loaded: LoadedModel, flow_shift: float, num_steps: int, boundary_ratio: float | None, solver: str | None = None
) -> list[Expert]:
    """Which expert the pipeline will run at each step ("high" throughout on one transformer).

    Computed ahead of the call, from the same scheduler the call uses, with the pipelines' own rule
    (timestep >= boundary_ratio x num_train_timesteps -> high-noise expert).
    """
    timesteps = step_timesteps(loaded, flow_shift, num_steps, solver)
    if not loaded.is_dual_expert or boundary_ratio is None:
        return ["high"] * num_steps
    boundary = boundary_ratio * loaded.base_scheduler.config.num_train_timesteps
    return ["high" if t >= boundary else "low" for t in timesteps]


def _max_distinct_steps(loaded: LoadedModel, flow_shift: float, upper: int, solver: str | None = None) -> int:
    """The largest step count below `upper` whose timesteps are all distinct (binary search)."""
    low, high = 1, upper - 1
    while low < high:
        middle = (low + high + 1) // 2
        scheduler = solver_scheduler(loaded.base_scheduler, solver, flow_shift)
        scheduler.set_timesteps(middle, device="cpu")
        timesteps = [int(t) for t in scheduler.timesteps]
        if len(set(timesteps)) == len(timesteps):
            low = middle
        else:
            high = middle - 1
    return low


def phases_for_timesteps(timesteps: Sequence[float], switch_threshold: float, switch_threshold2: float) -> list[int]:
    """The guidance phase (0, 1, 2) of each step, as Wan2GP switches them (any2video.update_guidance).

    Phase 2 starts at the first step whose timestep is at most `switch_threshold`, phase 3 at the first at
    most `switch_threshold2` (pass -inf for two phases); once switched, a phase never goes back.
    """
    phase, phases = 0, []
    for t in timesteps:
        if phase < 1 and t <= switch_threshold:
            phase = 1
        if phase < 2 and t <= switch_threshold2:
            phase = 2
        phases.append(phase)
    return phases


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
    """One generation's expert switch: the boundary, the expert planned at each step, what depends on it.

    A phased run (3-phase guidance, or two guidance phases on one transformer) also has the guidance
    phase and the guidance scale of each step; `PhasedTransformer` carries it out.
    """

    dual: bool  # the loaded pipeline holds a second (low-noise) transformer
    boundary: float | None  # boundary_ratio for the call (None on one transformer)
    experts: list[Expert]  # the expert planned at each denoising step
    phases: tuple[int, ...] | None = None  # guidance phase (0, 1, 2) of each step: phased runs only
    guidance: tuple[float, ...] | None = None  # guidance scale of each step: phased runs only
    guidance_phases: int | None = None  # as resolved (None: the model's own)

    @property
    def phased(self) -> bool:
        """The pipeline's own switch cannot run this plan: PhasedTransformer does."""
        return self.guidance is not None

    def pipeline_guidance(self, p: ResolvedParams) -> dict[str, Any]:
        """The pipeline's guidance kwargs: its own (per expert) or, on a phased run, none (1.0: no CFG pass)."""
        if self.phased:
            return {"guidance_scale": 1.0}
        return {"guidance_scale": p.guidance_scale, **self.guidance_kwargs(p)}

    def guidance_kwargs(self, p: ResolvedParams) -> dict[str, Any]:
        """Pipeline kwargs for the low-noise expert's guidance (none on one transformer or a phased run)."""
        return {"guidance_scale_2": p.guidance2_scale} if self.dual and not self.phased else {}

    def needs_negative(self, p: ResolvedParams) -> bool:
        """Whether the negative prompt is encoded: diffusers' rule on its own switch, any phase with CFG here."""
        if self.phased:
            return any(scale != 1.0 for scale in self.guidance or ())
        return p.guidance_scale > 1.0

    def reported(self, p: ResolvedParams) -> dict[str, float | None]:
        """The expert settings a result records (None on one transformer: they did nothing)."""
        return {
            "guidance2_scale": p.guidance2_scale if self.dual or self.phased else None,
            "switch_threshold": p.switch_threshold if self.dual or self.phased else None,
        }

    def phase_report(self, p: ResolvedParams) -> dict[str, Any] | None:
        """What result_data records of a phased run: the phases, their scales and each step's phase."""
        if not self.phased:
            return None
        count = 3 if p.guidance_phases == 3 else 2
        return {
            "guidance_phases": count,
            "guidance_scales": [p.guidance_scale, p.guidance2_scale, p.guidance3_scale][:count],
            "switch_thresholds": [p.switch_threshold, p.switch_threshold2][: count - 1],
            "model_switch_phase": p.model_switch_phase if self.dual else None,
            "phase_per_step": [phase + 1 for phase in self.phases or ()],
            "guidance_per_step": list(self.guidance or ()),
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
    dual = loaded.is_dual_expert
    if p.guidance_phases == 3 or (p.guidance_phases == 2 and not dual):
        timesteps = step_timesteps(loaded, p.flow_shift, p.num_inference_steps, p.sample_solver)
        second = p.switch_threshold2 if p.guidance_phases == 3 else -math.inf
        phases = phases_for_timesteps(timesteps, p.switch_threshold, second)
        scales = (p.guidance_scale, p.guidance2_scale, p.guidance3_scale)
        experts = ["low" if dual and phase >= p.model_switch_phase else "high" for phase in phases]
        return ExpertPlan(
            dual=dual,
            boundary=0.0 if dual else None,  # every step goes to the transformer slot: PhasedTransformer
            experts=experts,
            phases=tuple(phases),
            guidance=tuple(scales[phase] for phase in phases),
            guidance_phases=p.guidance_phases,
        )
    boundary = boundary_ratio(loaded, p.switch_threshold)
    experts = experts_for_steps(loaded, p.flow_shift, p.num_inference_steps, boundary, p.sample_solver)
    return ExpertPlan(dual=dual, boundary=boundary, experts=experts, guidance_phases=p.guidance_phases)


class PhasedTransformer:
    """Stands in for `pipe.transformer` during a phased call: each step runs the planned expert and the
    planned classifier-free guidance (uncond + scale x (cond - uncond); one pass at scale 1, as Wan2GP).

    The pipeline is called with guidance 1.0, so it calls this once per step; the real transformers are
    called from here (their hooks, offloading and LoRA layers included). Attributes the pipeline reads
    (config, dtype) and `set_adapters` are the high-noise expert's, whose slot this takes.
    """

    def __init__(self, high: Any, low: Any, plan: ExpertPlan, negative_embeds: Any) -> None:
        self.high, self.low, self.plan = high, low, plan
        self.negative_embeds = negative_embeds
        self.calls = 0  # one per denoising step

    def __getattr__(self, name: str) -> Any:
        if name in ("high", "low", "plan", "negative_embeds", "calls"):
            raise AttributeError(name)  # not set yet (never forwarded: that would recurse)
        return getattr(self.high, name)  # config, dtype, device, set_adapters, ...

    def cache_context(self, _name: str, **_kwargs: Any) -> Any:
        return nullcontext()  # the experts' own cache contexts are entered around each of their calls

    def _run(self, model: Any, branch: str, encoder_hidden_states: Any, kwargs: dict[str, Any]) -> Any:
        context = getattr(model, "cache_context", None)
        with context(branch) if context is not None else nullcontext():
            return model(encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)[0]

    def __call__(self, *, encoder_hidden_states: Any, return_dict: bool = False, **kwargs: Any) -> Any:
        step = min(self.calls, len(self.plan.experts) - 1)
        self.calls += 1
        model = self.high if self.plan.experts[step] == "high" else self.low
        scale = self.plan.guidance[step] if self.plan.guidance else 1.0
        cond = self._run(model, "cond", encoder_hidden_states, kwargs)
        if scale == 1.0:
            return (cond,)
        if self.negative_embeds is None:
            raise InvalidRequestError(f"guidance {scale:g} at step {step}: the negative prompt was not encoded")
        negative = self.negative_embeds.to(device=encoder_hidden_states.device, dtype=encoder_hidden_states.dtype)
        uncond = self._run(model, "uncond", negative, kwargs)
        return (uncond + scale * (cond - uncond),)


@contextmanager
def phased_transformer(pipe: Any, plan: ExpertPlan, negative_embeds: Any) -> Iterator[Any]:
    """On a phased run, `PhasedTransformer` takes the pipeline's transformer slot for the call; else nothing."""
    if not plan.phased:
        yield pipe
        return
    original = pipe.transformer
    low = getattr(pipe, "transformer_2", None)
    high = original if original is not None else low
    proxy = PhasedTransformer(high, low if low is not None else high, plan, negative_embeds)
    object.__setattr__(pipe, "transformer", proxy)  # not the pipeline's __setattr__: its config stays as it is
    try:
        yield pipe
    finally:
        object.__setattr__(pipe, "transformer", original)
        if getattr(pipe, "_all_hooks", None):
            # Model offloading re-hooks the components at the end of a call, when the stand-in held the slot.
            pipe.enable_model_cpu_offload(device=getattr(pipe, "_offload_device", None))


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
