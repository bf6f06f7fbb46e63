"""Run by `torchrun --standalone --nproc-per-node 2` from test_group.py: the real worker-side group machinery
(rank 0's GroupLeaderProxy, rank 1's serve_follower) over tiny real Wan pipelines, on gloo.

Rank 0 writes `report.json` in the output directory: what each rank saw (tokens per transformer block,
transformer calls), the latents rank 0 decoded, and the outputs it wrote. The test compares them with a
single-process run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from headless_wgp import WanOrchestrator
from wan_engine.context_parallel import destroy_group, init_group
from wan_engine.generation_types import ProgressEvent
from worker.processes.group_ranks import GroupChannel, GroupLeaderProxy, serve_follower

CANCEL_AT_STEP = 2


class Cancelled(Exception):
    pass


class Probe:
    """Counts transformer calls and the tokens each block sees, and keeps the latents sent to the VAE."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.calls = 0
        self.latents: list[list[Any]] = []

    def attach(self, orchestrator: WanOrchestrator) -> None:
        pipe = orchestrator.pipeline
        for transformer in (pipe.transformer, pipe.transformer_2):
            if transformer is None:
                continue
            # blocks[1] sees what blocks[0] (where the context-parallel split happens) passed on.
            transformer.blocks[1].register_forward_pre_hook(self._block, with_kwargs=True)
            transformer.register_forward_pre_hook(self._call)
        decode = pipe.vae.decode

        def keep(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.latents.append(latents.float().flatten().tolist())
            return decode(latents, *args, **kwargs)

        pipe.vae.decode = keep

    def _block(self, _module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.tokens.append(int(hidden.shape[1]))

    def _call(self, _module: Any, _args: Any) -> None:
        self.calls += 1


def start_image(out: Path) -> Path:
    """A deterministic gradient image for the image-to-video cases."""
    from PIL import Image

    path = out / "start.png"
    if not path.exists():
        ramp = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
        Image.fromarray(ramp).save(path)
    return path


def generate_other_modes(group: Any, orchestrator: WanOrchestrator, probe: Probe, out: Path) -> dict[str, Any]:
    """TI2V (per-token timesteps) and Wan 2.1 I2V (CLIP image tokens): the latents each decodes.

    `group` is a GroupLeaderProxy or, for the single-process reference, the orchestrator itself."""
    latents = {}
    cases = [
        ("tiny_ti2v", "generate_t2v", {}),
        ("tiny_i2v", "generate_i2v", {"image_start": start_image(out)}),
    ]
    for key, method, kwargs in cases:
        group.load_model(key)
        probe.attach(orchestrator)
        probe.latents.clear()
        getattr(group, method)("a cat", output_path=out / f"{key}.mp4", seed=9, **kwargs)
        latents[key] = probe.latents[0]
    return latents


def leader(orchestrator: WanOrchestrator, channel: GroupChannel, out: Path, probe: Probe) -> dict[str, Any]:
    group = GroupLeaderProxy(orchestrator, channel)
    report: dict[str, Any] = {}
    group.load_model("tiny_t2v")
    probe.attach(orchestrator)
    result = group.generate_t2v("a cat", output_path=out / "t2v.mp4", seed=7, video_length=1)
    report["t2v"] = {"path": str(result.output_path), "extra": result.extra["parallel"], "seed": result.seed}
    random_seed = group.generate_t2v("a cat", output_path=out / "random.mp4", video_length=1)
    report["random_seed"] = {"seed": random_seed.seed, "was_random": random_seed.seed_was_random}

    group.load_model("tiny_t2v_2_2")  # two experts: both transformers are split
    probe.attach(orchestrator)
    probe.latents.clear()
    before = probe.calls
    result = group.generate_t2v("surf", output_path=out / "dual.mp4", seed=11, num_inference_steps=4)
    report["dual"] = {"latents": probe.latents[0], "experts": list(result.experts_used or ()), "seed": result.seed}
    report["dual_calls"] = probe.calls - before

    def cancel(event: ProgressEvent) -> None:
        if event.stage == "denoising" and event.step == CANCEL_AT_STEP:
            raise Cancelled

    before = probe.calls
    try:
        group.generate_t2v("stop", output_path=out / "cancelled.mp4", seed=5, num_inference_steps=6, progress=cancel)
        report["cancel"] = "not raised"
    except Cancelled:
        report["cancel"] = "raised"
    report["cancel_calls"] = probe.calls - before
    report["cancel_output"] = sorted(p.name for p in out.glob("cancelled*"))
    report["follower_usable"] = str(group.generate_t2v("after", output_path=out / "after.mp4", seed=1).output_path)
    report.update(generate_other_modes(group, orchestrator, probe, out))
    try:  # a bad call fails on rank 0 before the followers hear of it; the group goes on
        group.generate_t2v("wrong mode", output_path=out / "refused.mp4")  # tiny_i2v is resident
        report["refused"] = "not raised"
    except ValueError as exc:
        report["refused"] = str(exc)
    image = start_image(out)
    report["after_refusal"] = str(group.generate_i2v("x", image_start=image, output_path=out / "ok.mp4").output_path)
    group.close()
    return report


def main() -> int:
    models_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    info = init_group()
    orchestrator = WanOrchestrator(models_dir, device=str(info.device))
    channel = GroupChannel(info)
    probe = Probe()
    if info.is_leader:
        report = leader(orchestrator, channel, out, probe)
        code = 0
    else:
        # The follower attaches its probe after each load (commands arrive through serve_follower).
        original = orchestrator.load_model

        def load_and_probe(key: str, **kwargs: Any) -> float:
            seconds = original(key, **kwargs)
            probe.attach(orchestrator)
            return seconds

        orchestrator.load_model = load_and_probe  # type: ignore[method-assign]
        code = serve_follower(orchestrator, channel)
        report = {}
    seen: list[Any] = [None] * info.world_size
    dist.all_gather_object(seen, {"tokens": sorted(set(probe.tokens)), "calls": probe.calls, "code": code})
    if info.is_leader:
        report["ranks"] = seen
        (out / "report.json").write_text(json.dumps(report))
    destroy_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
