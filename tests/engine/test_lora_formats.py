"""LoRA key layouts diffusers does not read as they are (DiffSynth, unprefixed) and the full weight deltas of
lightx2v / CausVid LoRAs (`.diff`, `.diff_b`, `diff_m`), built here in their real key layouts (issue 14)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from headless_wgp import WanOrchestrator
from tests.support import real_formats as rf
from wan_engine.errors import InvalidRequestError
from wan_engine.lora_formats import DeltaTable, normalize_lora, split_weight_deltas
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets
from wan_engine.single_file import diffusers_key_to_wan
from wan_engine.video_io import read_video_frames

PROMPT = "a paper boat on a river"
T2V = "tiny-wan2.1-t2v"


# The builders of these layouts live in tests/support/real_formats.py (shared with the issue-14 case matrix).
lora_pairs = rf.lora_pairs
as_diffsynth = rf.as_diffsynth
deltas = rf.norm_deltas
DELTA_TARGETS = rf.DELTA_TARGETS


def _presets(tmp_path: Path, **models: dict) -> PresetRegistry:
    user = tmp_path / "presets"
    user.mkdir(exist_ok=True)
    for key, model in models.items():
        settings = {"resolution": "64x48", "video_length": 5, "num_inference_steps": 3, "guidance_scale": 5.0}
        (user / f"{key}.json").write_text(
            json.dumps({"model": {"name": key, "architecture": "t2v", **model}, **settings})
        )
    return load_presets(BUILTIN_PRESETS_DIR, user)


@pytest.fixture(scope="module")
def setup(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Models dir (the tiny T2V folder and a copy whose weights carry the deltas), LoRA dir, presets."""
    root = tmp_path_factory.mktemp("lora_formats")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    loras.mkdir()
    os.symlink(tiny_models_dir / T2V, models / T2V)
    edited = models / "tiny-edited"
    edited.mkdir()
    for entry in (tiny_models_dir / T2V).iterdir():
        if entry.name != "transformer":
            os.symlink(entry, edited / entry.name)
    transformer = WanTransformer3DModel.from_pretrained(tiny_models_dir / T2V, subfolder="transformer")
    with torch.no_grad():
        for key, delta in deltas(5).items():
            param = transformer.get_parameter(DELTA_TARGETS[key])
            param.copy_(param.float() + delta)  # what applying the delta at multiplier 1 must give
    transformer.save_pretrained(edited / "transformer")
    save_file(lora_pairs(1), str(loras / "style.safetensors"))
    save_file(as_diffsynth(lora_pairs(1)), str(loras / "style_diffsynth.safetensors"))
    save_file(as_diffsynth(lora_pairs(1), default=False), str(loras / "style_diffsynth_plain.safetensors"))
    unprefixed = {k.removeprefix("transformer."): v for k, v in lora_pairs(1).items()}
    save_file(unprefixed, str(loras / "style_unprefixed.safetensors"))
    save_file(deltas(5), str(loras / "norm_deltas.safetensors"))
    comfy_pairs = {
        "diffusion_model." + diffusers_key_to_wan(k.removeprefix("transformer.")): v for k, v in lora_pairs(2).items()
    }
    save_file({**comfy_pairs, **deltas(5)}, str(loras / "lightx2v_like.safetensors"))
    lokr = {"diffusion_model.blocks.0.self_attn.q.lokr_w1": torch.zeros(2, 2)}
    save_file(lokr, str(loras / "lokr.safetensors"))
    presets = _presets(root, plain={"URLs": T2V}, edited={"URLs": "tiny-edited"})
    return {"models": models, "loras": loras, "presets": presets, "tiny": tiny_models_dir}


@pytest.fixture(scope="module")
def orchestrator(setup: dict[str, Any]) -> Iterator[WanOrchestrator]:
    orchestrator = WanOrchestrator(setup["models"], setup["presets"], loras_dir=setup["loras"])
    orchestrator.load_model("plain")
    yield orchestrator
    orchestrator.unload_model()


def still(orchestrator: WanOrchestrator, path: Path, **params: Any) -> tuple[Any, np.ndarray]:
    result = orchestrator.generate_t2v(PROMPT, output_path=path, seed=9, video_length=1, **params)
    return result, read_video_frames(result.output_path)


def _transformer(orchestrator: WanOrchestrator) -> torch.nn.Module:
    return orchestrator._loaded.pipe.transformer  # type: ignore[union-attr]


def test_layouts_are_recognised() -> None:
    pairs = lora_pairs(1)
    assert normalize_lora(pairs, "x") == (pairs, "diffusers")
    converted, layout = normalize_lora(as_diffsynth(pairs), "x")
    assert layout == "diffsynth" and "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in converted
    assert normalize_lora(as_diffsynth(pairs, default=False), "x")[1] == "original-unprefixed"
    rest, found = split_weight_deltas(normalize_lora(deltas(5), "x")[0])
    assert rest == {} and set(found) == set(DELTA_TARGETS.values())


@pytest.mark.parametrize("name", ["style_diffsynth", "style_diffsynth_plain", "style_unprefixed"])
def test_diffsynth_and_unprefixed_layouts_equal_the_diffusers_layout(
    orchestrator: WanOrchestrator, tmp_path: Path, name: str
) -> None:
    _, expected = still(orchestrator, tmp_path / "d.png", lora_names=["style"])
    result, got = still(orchestrator, tmp_path / "x.png", lora_names=[name])
    np.testing.assert_array_equal(got, expected)
    assert result.loras[0]["layers"] == {"transformer": 8}


def test_norm_and_modulation_deltas_change_the_weights_exactly_and_unload_restores_them(
    orchestrator: WanOrchestrator, setup: dict[str, Any], tmp_path: Path
) -> None:
    model = _transformer(orchestrator)
    before = {name: model.get_parameter(name).detach().clone() for name in DELTA_TARGETS.values()}
    _, base = still(orchestrator, tmp_path / "base.png")
    result, with_deltas = still(orchestrator, tmp_path / "delta.png", lora_names=["norm_deltas"])
    assert result.loras[0]["layers"] == {"transformer": len(DELTA_TARGETS)}
    for key, delta in deltas(5).items():
        name = DELTA_TARGETS[key]
        assert torch.equal(model.get_parameter(name), before[name] + delta), name
    # The same weights saved as a diffusers folder give the same pixels.
    edited = WanOrchestrator(setup["models"], setup["presets"])
    edited.load_model("edited")
    _, expected = still(edited, tmp_path / "edited.png")
    edited.unload_model()
    np.testing.assert_array_equal(with_deltas, expected)
    assert not np.array_equal(with_deltas, base)  # diffusers alone drops these keys: the output would not change
    # Half the multiplier: half the delta.
    still(orchestrator, tmp_path / "half.png", lora_names=["norm_deltas"], lora_multipliers="0.5")
    name = DELTA_TARGETS["diffusion_model.blocks.0.diff_m"]
    assert torch.equal(model.get_parameter(name), before[name] + 0.5 * deltas(5)["diffusion_model.blocks.0.diff_m"])
    # No LoRA: every weight back bit for bit, and the base pixels.
    _, after = still(orchestrator, tmp_path / "after.png")
    assert all(torch.equal(model.get_parameter(n), before[n]) for n in before)
    np.testing.assert_array_equal(after, base)


def test_pairs_and_deltas_of_one_file_are_both_applied(orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    model = _transformer(orchestrator)
    name = DELTA_TARGETS["diffusion_model.blocks.0.norm3.diff"]
    before = model.get_parameter(name).detach().clone()
    result, _ = still(orchestrator, tmp_path / "both.png", lora_names=["lightx2v_like"])
    assert result.loras[0]["layers"] == {"transformer": 8 + len(DELTA_TARGETS)}
    assert torch.equal(model.get_parameter(name), before + deltas(5)["diffusion_model.blocks.0.norm3.diff"])
    still(orchestrator, tmp_path / "none.png")
    assert torch.equal(model.get_parameter(name), before)


def test_deltas_go_only_into_the_expert_whose_phase_uses_them(setup: dict[str, Any], tmp_path: Path) -> None:
    orchestrator = WanOrchestrator(setup["tiny"], loras_dir=setup["loras"])
    orchestrator.load_model("tiny_t2v_2_2")
    pipe = orchestrator._loaded.pipe  # type: ignore[union-attr]
    name = DELTA_TARGETS["diffusion_model.blocks.0.diff_m"]
    high, low = pipe.transformer.get_parameter(name).detach().clone(), pipe.transformer_2.get_parameter(name).clone()
    result = orchestrator.generate_t2v(
        PROMPT, output_path=tmp_path / "d.mp4", seed=3, lora_names=["norm_deltas"], lora_multipliers="1;0"
    )
    assert result.loras[0]["loaded_into"] == ["high"]
    assert torch.equal(pipe.transformer.get_parameter(name), high + deltas(5)["diffusion_model.blocks.0.diff_m"])
    assert torch.equal(pipe.transformer_2.get_parameter(name), low)
    orchestrator.generate_t2v(PROMPT, output_path=tmp_path / "n.mp4", seed=3)
    assert torch.equal(pipe.transformer.get_parameter(name), high)
    orchestrator.unload_model()


def test_unsupported_layouts_are_named(orchestrator: WanOrchestrator, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="LyCORIS LoKr"):
        still(orchestrator, tmp_path / "x.png", lora_names=["lokr"])
    wrong = {"diffusion_model.blocks.0.norm3.diff": torch.zeros(7)}
    with pytest.raises(InvalidRequestError, match="shape"):
        DeltaTable(_transformer(orchestrator)).add("a", split_weight_deltas(wrong)[1], "wrong")
