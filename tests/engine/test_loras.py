"""LoRAs: safe names, Wan2GP multipliers (phases and schedules), loading/swapping on real tiny pipelines.

The LoRA files are made here: peft/diffusers-format safetensors for the tiny transformer, plus the
same weights in ComfyUI key layout (converted by diffusers' Wan loader).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from headless_wgp import WanOrchestrator
from wan_engine.errors import InvalidRequestError
from wan_engine.loras import LoraMultiplier, parse_lora_multipliers, resolve_lora_path
from wan_engine.video_io import read_video_frames

PROMPT = "a paper boat on a river"
TINY_INNER_DIM = 24  # 2 heads x 12 (wan_engine.tiny_models)
PROJECTIONS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}


def lora_weights(seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """Self-attention LoRA weights for both blocks of the tiny transformer (diffusers/peft key layout)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for block in range(2):
        for proj in PROJECTIONS:
            prefix = f"transformer.blocks.{block}.attn1.{proj}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(rank, TINY_INNER_DIM, generator=generator)
            weights[f"{prefix}.lora_B.weight"] = torch.randn(TINY_INNER_DIM, rank, generator=generator)
    return weights


def as_comfyui(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA in the original Wan / ComfyUI layout (diffusion_model.*, lora_down/lora_up)."""
    out = {}
    for key, value in weights.items():
        _, _, block, _, proj, *_ = key.split(".")
        proj_name = PROJECTIONS[proj] if proj != "to_out" else "o"
        kind = "lora_down" if "lora_A" in key else "lora_up"
        out[f"diffusion_model.blocks.{block}.self_attn.{proj_name}.{kind}.weight"] = value
    return out


@pytest.fixture(scope="module")
def loras_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    (folder / "wan2_2").mkdir()
    save_file(lora_weights(1), str(folder / "style.safetensors"))
    save_file(lora_weights(2), str(folder / "other.safetensors"))
    save_file(as_comfyui(lora_weights(1)), str(folder / "style_comfy.safetensors"))
    save_file(lora_weights(3), str(folder / "wan2_2" / "motion.safetensors"))
    # A LoRA of another model family (keys of a UNet): diffusers alone would load nothing and only warn.
    unet = {"unet.down.0.lora_A.weight": torch.zeros(4, 8), "unet.down.0.lora_B.weight": torch.zeros(8, 4)}
    save_file(unet, str(folder / "foreign.safetensors"))
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 4)}, str(folder / "half.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"not safetensors")
    (folder / "pickled.ckpt").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def single(tiny_models_dir: Path, loras_dir: Path) -> Iterator[WanOrchestrator]:
    orchestrator = WanOrchestrator(tiny_models_dir, loras_dir=loras_dir)
    orchestrator.load_model("tiny_t2v")
    yield orchestrator
    orchestrator.unload_model()


@pytest.fixture(scope="module")
def dual(tiny_models_dir: Path, loras_dir: Path) -> Iterator[WanOrchestrator]:
    orchestrator = WanOrchestrator(tiny_models_dir, loras_dir=loras_dir)
    orchestrator.load_model("tiny_t2v_2_2")
    yield orchestrator
    orchestrator.unload_model()


def still(orchestrator: WanOrchestrator, path: Path, **params: Any) -> tuple[Any, np.ndarray]:
    """One lossless frame (PNG): equal computations give bit-equal pixels."""
    result = orchestrator.generate_t2v(PROMPT, output_path=path, seed=9, video_length=1, **params)
    return result, read_video_frames(result.output_path)


def lora_layer_count(orchestrator: WanOrchestrator) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = orchestrator._loaded.pipe  # type: ignore[union-attr]
    modules = [pipe.transformer, getattr(pipe, "transformer_2", None)]
    return sum(isinstance(m, BaseTunerLayer) for module in modules if module is not None for m in module.modules())


# ----- names and multipliers (no model) ----------------------------------------------------------------


def test_names_resolve_inside_the_loras_dir_only(loras_dir: Path) -> None:
    assert resolve_lora_path("style", loras_dir) == loras_dir / "style.safetensors"
    assert resolve_lora_path("style.safetensors", loras_dir, "wan") == loras_dir / "style.safetensors"
    assert resolve_lora_path("motion", loras_dir, "wan2_2") == loras_dir / "wan2_2" / "motion.safetensors"
    for bad in ["../style", "wan2_2/motion", "/etc/passwd", "..", "a\\b", "", ".hidden", 3]:
        with pytest.raises(InvalidRequestError, match="lora_names"):
            resolve_lora_path(bad, loras_dir)
    with pytest.raises(InvalidRequestError, match=r"only \.safetensors"):
        resolve_lora_path("pickled.ckpt", loras_dir)
    with pytest.raises(InvalidRequestError, match="not found"):
        resolve_lora_path("motion", loras_dir, "wan")  # in another family's folder


def test_multiplier_syntax() -> None:
    one, two, sched, phased = parse_lora_multipliers("0.5 1.0;0.25 1,0.5 1,0.5;0", 5, dual=True)[:4]
    assert one.phases == ((0.5,),) and two.phases == ((1.0,), (0.25,))
    assert sched.phases == ((1.0, 0.5),) and phased.phases == ((1.0, 0.5), (0.0,))
    assert parse_lora_multipliers(None, 2, dual=False)[1].phases == ((1.0,),)  # missing entries: 1.0
    for bad, match in [("1 2 3", "3 entries"), ("1;2;3", "two phases"), ("x", "not a number"), ("99", "from -10")]:
        with pytest.raises(InvalidRequestError, match=match):
            parse_lora_multipliers(bad, 2, dual=True)
    with pytest.raises(InvalidRequestError, match="one transformer"):
        parse_lora_multipliers("1.0;0.5", 1, dual=False)


def test_schedules_spread_over_the_steps_of_their_phase() -> None:
    experts = ["high"] * 4 + ["low"] * 2
    sched = LoraMultiplier(phases=((1.0, 0.8, 0.6),), text="")
    assert [sched.value_at(s, experts) for s in range(6)] == [1.0, 1.0, 0.8, 0.8, 0.6, 0.6]
    phased = LoraMultiplier(phases=((1.0, 0.5), (0.2,)), text="")
    assert [phased.value_at(s, experts) for s in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.2, 0.2]


# ----- on a loaded model -------------------------------------------------------------------------------


def test_lora_changes_output_and_is_recorded(single: WanOrchestrator, tmp_path: Path) -> None:
    _, base = still(single, tmp_path / "base.png")
    result, styled = still(single, tmp_path / "s.png", lora_names=["style"], lora_multipliers="0.8")
    assert not np.array_equal(base, styled)
    (record,) = result.loras
    assert record["name"] == "style" and record["file"].endswith("style.safetensors")
    assert record["multipliers"] == "0.8" and record["per_step"] == [0.8] * 4
    assert record["loaded_into"] == ["transformer"] and record["layers"] == {"transformer": 8}
    assert result.to_dict()["loras"] == result.loras
    # Same LoRA again: reused (the same peft layer, not reloaded), same pixels.
    layer = single._loaded.pipe.transformer.blocks[0].attn1.to_q  # type: ignore[union-attr]
    _, styled_again = still(single, tmp_path / "s2.png", lora_names=["style"], lora_multipliers="0.8")
    assert single._loaded.pipe.transformer.blocks[0].attn1.to_q is layer  # type: ignore[union-attr]
    np.testing.assert_array_equal(styled, styled_again)
    # Another multiplier changes the result.
    _, weaker = still(single, tmp_path / "w.png", lora_names=["style"], lora_multipliers="0.3")
    assert not np.array_equal(styled, weaker)


def test_no_lora_after_loras_matches_a_fresh_model(
    single: WanOrchestrator, tiny_models_dir: Path, tmp_path: Path
) -> None:
    fresh = WanOrchestrator(tiny_models_dir)
    fresh.load_model("tiny_t2v")
    _, expected = still(fresh, tmp_path / "fresh.png")
    fresh.unload_model()
    still(single, tmp_path / "two.png", lora_names=["style", "other"], lora_multipliers="1.0 0.5")
    assert lora_layer_count(single) > 0
    result, after = still(single, tmp_path / "after.png")
    assert result.loras == [] and lora_layer_count(single) == 0
    np.testing.assert_array_equal(after, expected)


def test_comfyui_layout_equals_diffusers_layout(single: WanOrchestrator, tmp_path: Path) -> None:
    _, diffusers_layout = still(single, tmp_path / "d.png", lora_names=["style"])
    _, comfy_layout = still(single, tmp_path / "c.png", lora_names=["style_comfy"])
    np.testing.assert_allclose(diffusers_layout.astype(int), comfy_layout.astype(int), atol=1)


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["missing"], "not found"),
        (["broken"], "not a readable safetensors"),
        (["foreign"], "matches no layer"),
        (["half"], "cannot be applied"),
        (["../style"], "lora_names"),
        ("style", "list of LoRA file names"),
    ],
)
def test_bad_loras_fail_clearly_and_leave_the_model_clean(
    single: WanOrchestrator, tmp_path: Path, names: Any, match: str
) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        still(single, tmp_path / "x.png", lora_names=names)
    assert not list(tmp_path.iterdir())
    result, _ = still(single, tmp_path / "next.png")  # the next task runs on the plain model
    assert result.loras == [] and lora_layer_count(single) == 0


class ExpertOutputs:
    """Forward hooks recording every output of each expert, in call order."""

    def __init__(self, pipe: Any) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {"high": [], "low": []}
        self.handles = [
            pipe.transformer.register_forward_hook(self._record("high")),
            pipe.transformer_2.register_forward_hook(self._record("low")),
        ]

    def _record(self, name: str) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            self.outputs[name].append(output[0].detach().clone())

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _expert_outputs(orchestrator: WanOrchestrator, path: Path, **params: Any) -> tuple[Any, dict[str, list]]:
    recorder = ExpertOutputs(orchestrator._loaded.pipe)  # type: ignore[union-attr]
    try:
        result, _ = still(orchestrator, path, **params)
    finally:
        recorder.remove()
    return result, recorder.outputs


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_phase_multiplier_changes_only_its_expert(dual: WanOrchestrator, tmp_path: Path) -> None:
    base, plain = _expert_outputs(dual, tmp_path / "a.png")
    assert base.experts_used == ("high", "high", "high", "low")
    # "0;1": the high-noise expert computes exactly what it does without LoRA, the low-noise one changes.
    low_only, low_out = _expert_outputs(dual, tmp_path / "b.png", lora_names=["motion"], lora_multipliers="0;1")
    assert low_only.loras[0]["loaded_into"] == ["low"] and low_only.loras[0]["per_step"] == [0, 0, 0, 1]
    assert _same(plain["high"], low_out["high"]) and len(plain["high"]) == 6
    assert not _same(plain["low"], low_out["low"])
    # "1;0": the high-noise expert changes; the LoRA never enters the low-noise expert.
    high_only, high_out = _expert_outputs(dual, tmp_path / "c.png", lora_names=["motion"], lora_multipliers="1;0")
    assert high_only.loras[0]["loaded_into"] == ["high"] and high_only.loras[0]["layers"] == {"high": 8}
    assert not _same(plain["high"], high_out["high"])
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = dual._loaded.pipe  # type: ignore[union-attr]
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer_2.modules())
    # A plain multiplier applies to both experts.
    both, _ = _expert_outputs(dual, tmp_path / "d.png", lora_names=["motion"], lora_multipliers="0.7")
    assert both.loras[0]["loaded_into"] == ["high", "low"] and both.loras[0]["per_step"] == [0.7] * 4


def test_per_step_schedule_switches_at_step_boundaries(single: WanOrchestrator, tmp_path: Path) -> None:
    pipe = single._loaded.pipe  # type: ignore[union-attr]
    seen: list[float] = []

    def read_scale(_module: Any, _args: Any) -> None:
        layer = pipe.transformer.blocks[0].attn1.to_q
        seen.append(float(next(iter(layer.scaling.values()))) if hasattr(layer, "scaling") else float("nan"))

    handle = pipe.transformer.register_forward_pre_hook(read_scale)
    try:
        result, scheduled = still(single, tmp_path / "s.png", lora_names=["style"], lora_multipliers="1,0.5,0.25,0")
    finally:
        handle.remove()
    # Two calls per step (classifier-free guidance); rank 4, no alpha: scaling == multiplier.
    assert seen == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0]
    assert result.loras[0]["per_step"] == [1.0, 0.5, 0.25, 0.0]
    _, constant = still(single, tmp_path / "c.png", lora_names=["style"], lora_multipliers="1")
    assert not np.array_equal(scheduled, constant)
