"""Wan2GP's `sample_solver` names as diffusers schedulers.

Wan2GP's Wan models offer unipc (its default), euler, dpm++, causvid and lcm. The first three are
flow-matching solvers diffusers has: UniPC and DPM-Solver++ (2nd order) on flow sigmas with the flow
shift, and the flow-matching Euler scheduler with the same shift. causvid (a fixed timestep table)
and lcm (LCM + LTX) have no diffusers equivalent: a preset naming them is refused when it is read
(wan2gp_definitions.check_sample_solver). `None` keeps the model's own scheduler.
"""

from __future__ import annotations

from typing import Any

from wan_engine.pipeline_runtime import scheduler_with_shift
from wan_engine.wan2gp_definitions import SAMPLE_SOLVERS, check_sample_solver


def solver_scheduler(base_scheduler: Any, solver: str | None, flow_shift: float) -> Any:
    """A fresh scheduler for `solver` at `flow_shift` (None, or the base's own class: the base's config)."""
    if solver is None:
        return scheduler_with_shift(base_scheduler, flow_shift)
    solver = check_sample_solver(solver)
    if type(base_scheduler).__name__ == SAMPLE_SOLVERS[solver]:
        return scheduler_with_shift(base_scheduler, flow_shift)
    train_steps = int(base_scheduler.config.get("num_train_timesteps", 1000))
    if solver == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=train_steps, shift=flow_shift)
    flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": flow_shift}
    if solver == "dpm++":
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(
            num_train_timesteps=train_steps, algorithm_type="dpmsolver++", solver_order=2, **flow
        )
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(num_train_timesteps=train_steps, solver_order=2, **flow)
