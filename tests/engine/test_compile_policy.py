"""Compile where it pays (wan_engine.compile_policy), dynamic token dims and the on-disk caches (speed.py).

The recompile tests count the graphs dynamo hands a counting backend, on a tiny Wan transformer on the
CPU: "mark" compiles once for every token count, "off" once per token count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from wan_engine import speed
from wan_engine.compile_policy import (
    AMORTIZE_TASKS,
    CACHED_COMPILE_S,
    COLD_COMPILE_KIND_S,
    COLD_COMPILE_S,
    COMPILED_SAVING,
    EAGER_FLOPS_PER_S,
    LAYOUTS_FILE,
    CompileTracker,
    cold_compile_estimate,
)
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


class _Pipe:
    """The pipeline parts the speed path reads: the transformer, the VAE scale factors, the folder."""

    vae_scale_factor_spatial = 8
    vae_scale_factor_temporal = 4

    def __init__(self, transformer: torch.nn.Module, name_or_path: str = "") -> None:
        self.transformer = transformer
        self.name_or_path = name_or_path


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new worker process: no compile tracker or probe result kept from earlier tests."""
    monkeypatch.setattr(speed, "_TRACKERS", {})
    monkeypatch.setattr(speed, "_PROBE_CACHE", {})
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # set by configure_compile_cache: restored
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)


def _warm_folder(folder: Path) -> None:
    """What a compile leaves: inductor's FX graph cache is not empty (another layout's graphs)."""
    (folder / "fxgraph" / "ab").mkdir(parents=True)


def test_warmth_is_per_layout_and_recorded_for_the_next_process(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    _warm_folder(folder)
    tracker = CompileTracker(cache_dir=folder, toolchain="torch X on GPU")
    t2v = tracker.decide("T2V", 32760, 40, FLOPS_81F)
    assert t2v.expected_compile_s == COLD_COMPILE_S  # graphs in the folder, but none of this layout
    tracker.ran(t2v)
    # The second layout (two block kinds, as VACE) is cold although the folder is warm from the first.
    vace = tracker.decide("VACE", 17160, 20, FLOPS_1F, block_kinds=2)
    assert vace.expected_compile_s == cold_compile_estimate(2) == COLD_COMPILE_S + COLD_COMPILE_KIND_S
    assert not vace.compiled
    record = json.loads((folder / LAYOUTS_FILE).read_text())
    assert [e["layout"] for e in record["layouts"]] == ["T2V"]
    # A later process over the same folder: the layout compiled before costs the cached figure only.
    later = CompileTracker(cache_dir=folder, toolchain="torch X on GPU")
    assert later.compile_cost("T2V", 20280) == CACHED_COMPILE_S
    assert later.compile_cost("VACE", 17160, block_kinds=2) == cold_compile_estimate(2)
    # Another torch/GPU, another dynamic mode, or the record ignored: cold.
    assert CompileTracker(cache_dir=folder, toolchain="torch Y on GPU").compile_cost("T2V", 1) == COLD_COMPILE_S
    assert CompileTracker(dynamic="off", cache_dir=folder, toolchain="torch X on GPU").compile_cost("T2V", 1) == (
        COLD_COMPILE_S
    )
    no_record = CompileTracker(cache_dir=folder, toolchain="torch X on GPU", disk_cache=False)
    assert no_record.compile_cost("T2V", 1) == COLD_COMPILE_S
    # A second layout is appended, the first kept (the file is re-read before each write).
    later.ran(later.decide("VACE", 32760, 100, FLOPS_81F, block_kinds=2))  # it pays: compiled
    assert {e["layout"] for e in json.loads((folder / LAYOUTS_FILE).read_text())["layouts"]} == {"T2V", "VACE"}
    assert list(folder.glob(".layouts-*")) == []  # written through a temporary file, renamed


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "layouts": []}', '["T2V"]', ""])
def test_a_corrupt_or_foreign_layout_record_counts_as_cold_and_is_rewritten(tmp_path: Path, content: str) -> None:
    (tmp_path / LAYOUTS_FILE).write_text(content)
    tracker = CompileTracker(cache_dir=tmp_path, toolchain="t")
    assert tracker.recorded == set() and tracker.compile_cost("T2V", 1) == COLD_COMPILE_S
    tracker.ran(tracker.decide("T2V", 32760, 40, FLOPS_81F))
    assert CompileTracker(cache_dir=tmp_path, toolchain="t").compile_cost("T2V", 1) == CACHED_COMPILE_S
    with pytest.raises(ValueError, match="block_kinds 0 must be at least 1"):
        cold_compile_estimate(0)


def test_one_tracker_per_process_across_model_loads(tmp_path: Path, fresh_process: None) -> None:
    """Through apply_speed_path + task_compile (CPU, nothing runs): the VACE model loaded after the T2V
    one shares its tracker and is costed cold; a T2V model loaded again finds its code compiled."""
    from wan_engine.tiny_models import _transformer, _vace_transformer

    settings = SpeedSettings(require_cuda=False, attention="native", policy="always", cache_dir=str(tmp_path))
    _warm_folder(tmp_path)
    kwargs = {"width": 48, "height": 32, "frames": 5, "steps": 2, "cfg": True}
    t2v_pipe = _Pipe(_transformer(1))
    first = speed.apply_speed_path(t2v_pipe, "cpu", settings)
    assert first.tracker is not None and first.cache_dir == str(tmp_path)
    with task_compile(first, t2v_pipe, **kwargs) as decision:
        pass
    assert decision is not None and decision.compiled and decision.expected_compile_s == COLD_COMPILE_S
    vace_pipe = _Pipe(_vace_transformer(5))
    assert speed.block_kinds(vace_pipe.transformer) == 2 and speed.block_kinds(t2v_pipe.transformer) == 1
    second = speed.apply_speed_path(vace_pipe, "cpu", settings)
    assert second.tracker is first.tracker
    with task_compile(second, vace_pipe, **kwargs) as decision:
        pass
    assert decision is not None and decision.expected_compile_s == cold_compile_estimate(2)
    assert decision.layout == speed.block_layout(vace_pipe.transformer) != speed.block_layout(t2v_pipe.transformer)
    again = _Pipe(_transformer(1))
    third = speed.apply_speed_path(again, "cpu", settings)
    with task_compile(third, again, **{**kwargs, "frames": 9}) as decision:
        pass
    assert decision is not None and decision.reason == "compiled code covers this shape"
    layouts = {e["layout"] for e in json.loads((tmp_path / LAYOUTS_FILE).read_text())["layouts"]}
    assert layouts == {speed.block_layout(t2v_pipe.transformer), speed.block_layout(vace_pipe.transformer)}


def test_the_cache_folder_is_in_the_models_dir_for_a_nested_model(tmp_path: Path, fresh_process: None) -> None:
    from wan_engine.tiny_models import _transformer

    models = tmp_path / "models"
    repo = models / "Wan-AI" / "Wan2.1-T2V-1.3B-Diffusers"
    repo.mkdir(parents=True)
    pipe = _Pipe(_transformer(1), str(repo))
    assert speed.compile_cache_dir(pipe, SpeedSettings(), models) == models / ".compile_cache"
    explicit = SpeedSettings(cache_dir=str(tmp_path / "mine"))
    assert speed.compile_cache_dir(pipe, explicit, models) == tmp_path / "mine"  # WAN_COMPILE_CACHE_DIR wins
    report = speed.apply_speed_path(
        pipe, "cpu", SpeedSettings(require_cuda=False, attention="native"), models_dir=models
    )
    assert report.cache_dir == str(models / ".compile_cache") and (models / ".compile_cache").is_dir()
    assert not (models / "Wan-AI" / ".compile_cache").exists()
    assert report.brief()["compile"]["cache_dir"] == str(models / ".compile_cache")
