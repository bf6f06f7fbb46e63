"""Compile where it pays (wan_engine.compile_policy), dynamic token dims and the on-disk caches (speed.py).

The recompile tests count the graphs dynamo hands a counting backend, on a tiny Wan transformer on the
CPU: "mark" compiles once for every token count, "off" once per token count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from wan_engine import speed
from wan_engine.compile_policy import AMORTIZE_TASKS, COMPILED_SAVING, EAGER_FLOPS_PER_S, CompileTracker
from wan_engine.speed import SpeedReport, SpeedSettings, task_compile, wan_transformer_flops

WAN_13B = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30}
FLOPS_81F = wan_transformer_flops(WAN_13B, 32760)  # one 1.3B forward at 832x480x81
FLOPS_1F = wan_transformer_flops(WAN_13B, 1560)  # one frame at 832x480


def test_a_cold_compile_pays_for_a_long_task_not_for_one_frame() -> None:
    tracker = CompileTracker(dynamic="mark", disk_cache=False)
    one_frame = tracker.decide("L", 1560, forwards=40, flops_per_forward=FLOPS_1F)
    assert not one_frame.compiled and "eager" in one_frame.reason
    assert one_frame.expected_compile_s == tracker.cold_compile_s
    assert one_frame.expected_saving_s == pytest.approx(40 * COMPILED_SAVING * FLOPS_1F / EAGER_FLOPS_PER_S)
    tracker.ran(one_frame)  # ran eagerly: nothing was compiled
    assert not tracker.covered("L", 1560)
    long_task = tracker.decide("L", 32760, forwards=40, flops_per_forward=FLOPS_81F)
    assert long_task.compiled and long_task.reason == "saving beats the compile"
    assert long_task.expected_saving_s * AMORTIZE_TASKS >= long_task.expected_compile_s
    tracker.ran(long_task)
    # "mark": the compiled code is dynamic in the token dim, so the 1-frame task now runs compiled.
    again = tracker.decide("L", 1560, forwards=2, flops_per_forward=FLOPS_1F)
    assert again.compiled and again.expected_compile_s == 0.0 and again.reason == "compiled code covers this shape"
    assert tracker.last == again
    assert not tracker.covered("other layout", 1560)  # another block layout compiles on its own


def test_static_and_automatic_dynamic_cover_shapes_as_torch_compiles_them() -> None:
    static = CompileTracker(dynamic="off", disk_cache=True)
    auto = CompileTracker(dynamic="auto", disk_cache=True)
    for tracker in (static, auto):
        tracker.ran(tracker.decide("L", 32760, 40, FLOPS_81F))
        assert tracker.covered("L", 32760) and not tracker.covered("L", 14040)
        assert tracker.compile_cost("L", 14040) == tracker.cached_compile_s  # caches on: a cheaper compile
        tracker.ran(tracker.decide("L", 14040, 40, FLOPS_81F))
    assert not static.covered("L", 20280)  # static: every token count compiles
    assert auto.covered("L", 20280)  # the second shape compiled dynamic code


def test_eager_decisions_and_bad_modes() -> None:
    tracker = CompileTracker()
    decision = tracker.eager("eager: LoRA 'x' changes its multiplier over the steps (schedule)", "L", 10, 4)
    assert not decision.compiled and tracker.last is decision
    tracker.ran(decision)
    assert tracker.shapes == {}
    assert decision.to_dict()["reason"].startswith("eager: LoRA")
    with pytest.raises(ValueError, match="'sometimes' is not one of mark, auto, off"):
        CompileTracker(dynamic="sometimes")
    with pytest.raises(ValueError, match="'never' is not one of pays, always"):
        CompileTracker(policy="never")
    forced = CompileTracker(policy="always").decide("L", 1560, 1, FLOPS_1F)
    assert forced.compiled and forced.reason == "policy always"


def test_settings_read_the_dynamic_mode_and_cache_dir() -> None:
    assert SpeedSettings.from_env({}).dynamic == "mark" and SpeedSettings.from_env({}).cache_dir is None
    settings = SpeedSettings.from_env({"WAN_COMPILE_DYNAMIC": "AUTO", "WAN_COMPILE_CACHE_DIR": "/x/cache"})
    assert (settings.dynamic, settings.cache_dir) == ("auto", "/x/cache")
    assert SpeedSettings.from_env({"WAN_COMPILE_DYNAMIC": "off"}).dynamic == "off"
    assert SpeedSettings.from_env({"WAN_COMPILE_POLICY": "always"}).policy == "always"
    with pytest.raises(ValueError, match="WAN_COMPILE_DYNAMIC='bucket' is not one of mark, auto, off"):
        SpeedSettings.from_env({"WAN_COMPILE_DYNAMIC": "bucket"})


def test_cache_folder_defaults_to_the_models_folder(tmp_path: Path) -> None:
    model = tmp_path / "models" / "wan-1.3b"
    model.mkdir(parents=True)

    class Pipe:
        name_or_path = str(model)

    assert speed.compile_cache_dir(Pipe(), SpeedSettings()) == tmp_path / "models" / ".compile_cache"
    assert speed.compile_cache_dir(Pipe(), SpeedSettings(cache_dir=str(tmp_path / "c"))) == tmp_path / "c"
    assert speed.compile_cache_dir(Pipe(), SpeedSettings(cache_dir="off")) is None
    assert speed.compile_cache_dir(object(), SpeedSettings()) is None  # no folder known: torch's default


def test_configure_compile_cache_sets_the_folder_once_and_turns_the_caches_on(tmp_path: Path) -> None:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    env: dict[str, str] = {}
    assert speed.configure_compile_cache(tmp_path / "cache", env) == str(tmp_path / "cache")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton") and (tmp_path / "cache").is_dir()
    assert inductor_config.fx_graph_cache is True and functorch_config.enable_autograd_cache is True
    # A folder already in use (set by the user or an earlier model) is kept, unless WAN_COMPILE_CACHE_DIR names one.
    assert speed.configure_compile_cache(tmp_path / "other", env) == str(tmp_path / "cache")
    assert not (tmp_path / "other").exists()
    assert speed.configure_compile_cache(tmp_path / "other", env, explicit=True) == str(tmp_path / "other")
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "other" / "triton")
    # torch's own default (set by inductor when diffusers is imported) is no user choice: replaced.
    default = {"TORCHINDUCTOR_CACHE_DIR": speed._torch_default_cache_dir() or ""}
    assert speed.configure_compile_cache(tmp_path / "models", default) == str(tmp_path / "models")


def _tiny_transformer() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    ).eval()


def _forward(model: torch.nn.Module, frames: int, height: int, width: int) -> torch.Tensor:
    latents = torch.randn(1, 4, frames, height, width)
    text = torch.randn(1, 8, 16)
    with torch.no_grad():
        return model(latents, torch.tensor([500]), text, return_dict=False)[0]


@pytest.mark.parametrize(("dynamic", "graphs"), [("mark", 1), ("off", 3)])
def test_marked_token_dim_compiles_once_for_every_shape(dynamic: str, graphs: int) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    compiled: list[Any] = []

    def backend(gm: torch.fx.GraphModule, _inputs: list[Any]) -> Any:
        compiled.append(gm)
        return gm.forward

    model = _tiny_transformer()
    eager = [_forward(model, f, 4, 6) for f in (1, 2, 3)]
    torch.manual_seed(0)
    assert speed._compile_blocks(model, dynamic, backend=backend) == 2
    torch.manual_seed(0)
    outs = [_forward(model, f, 4, 6) for f in (1, 2, 3)]  # 6, 12 and 18 tokens
    assert len(compiled) == graphs
    for a, b in zip(eager, outs, strict=True):
        assert a.shape == b.shape


def test_task_compile_runs_eager_when_it_does_not_pay_and_records_it() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    compiled: list[Any] = []

    def backend(gm: torch.fx.GraphModule, _inputs: list[Any]) -> Any:
        compiled.append(gm)
        return gm.forward

    model = _tiny_transformer()
    speed._compile_blocks(model, "mark", backend=backend)

    class Pipe:
        transformer = model
        vae_scale_factor_spatial = 8
        vae_scale_factor_temporal = 4

    tracker = CompileTracker(dynamic="mark", disk_cache=False)
    report = SpeedReport(True, "test", compiled=("transformer",), dynamic="mark", tracker=tracker)
    # A tiny model's forwards never earn a 20 s compile back: eager, and nothing compiles.
    with task_compile(report, Pipe(), width=48, height=32, frames=5, steps=3, cfg=True) as decision:
        _forward(model, 2, 4, 6)
    assert decision is not None and not decision.compiled and compiled == []
    brief = report.brief()
    assert brief["compiled"] == [] and brief["compile"]["reason"].startswith("eager:")
    assert brief["compile"]["forwards"] == 6 and brief["compile"]["tokens"] == 2 * 2 * 3
    # Once compiled code covers the shapes, a task runs compiled whatever its size.
    tracker.dynamic_layouts.add(speed.block_layout(model))
    with task_compile(report, Pipe(), width=48, height=32, frames=5, steps=1, cfg=False) as decision:
        _forward(model, 2, 4, 6)
    assert decision is not None and decision.compiled and len(compiled) == 1
    assert report.brief()["compiled"] == ["transformer"] and report.brief()["compile"]["dynamic"] == "mark"


def test_a_cache_folder_with_compiled_graphs_is_warm(tmp_path: Path) -> None:
    assert not speed.cache_is_warm(None) and not speed.cache_is_warm(str(tmp_path))
    (tmp_path / "fxgraph").mkdir()
    assert not speed.cache_is_warm(str(tmp_path))  # the folder alone: nothing compiled yet
    (tmp_path / "fxgraph" / "ab").mkdir()
    assert speed.cache_is_warm(str(tmp_path))
    cold, warm = CompileTracker(disk_cache=False), CompileTracker(disk_cache=True)
    assert cold.compile_cost("L", 1) == cold.cold_compile_s > warm.compile_cost("L", 1) == warm.cached_compile_s
