"""The CUDA speed path (wan_engine.speed) on the CPU: off by default there, probe and choice, FLOP counts.

No timings are asserted: the probe's choice is checked against the probe's own numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName

from headless_wgp import WanOrchestrator
from wan_engine import speed
from wan_engine.speed import (
    BackendProbe,
    SpeedSettings,
    apply_speed_path,
    choose_backend,
    eager_blocks,
    probe_attention_backends,
    wan_tokens,
    wan_transformer_flops,
)
from wan_engine.video_io import read_video_frames

WAN_13B = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30}
WAN_14B = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40}
MEASURED_TFLOPS = 790e12  # the issue's measured bf16 matmul rate on an H100


def _blocks(pipe: Any) -> list[torch.nn.Module]:
    modules = [m for _n, t in speed.transformers_of(pipe) for m in t.modules()]
    return [m for m in modules if type(m).__name__ == "WanTransformerBlock"]


def _backends(pipe: Any) -> set[Any]:
    modules = [m for _n, t in speed.transformers_of(pipe) for m in t.modules()]
    return {m.processor._attention_backend for m in modules if hasattr(m, "processor")}


def test_speed_path_is_a_no_op_on_cpu(t2v_orchestrator: WanOrchestrator) -> None:
    loaded = t2v_orchestrator._loaded
    assert loaded is not None and loaded.speed is not None
    assert loaded.speed.enabled is False and "not a CUDA device" in loaded.speed.reason
    assert _backends(loaded.pipe) == {None}  # diffusers' default dispatch, untouched
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in _blocks(loaded.pipe))
    report = apply_speed_path(loaded.pipe, "cpu")
    assert not report.enabled and report.compiled == () and report.probes == ()


def test_settings_from_env() -> None:
    assert SpeedSettings.from_env({}) == SpeedSettings()
    off = SpeedSettings.from_env({"WAN_SPEED": "off", "WAN_COMPILE": "0", "WAN_ATTENTION_BACKEND": "_native_flash"})
    assert (off.enabled, off.compile, off.attention) == (False, False, "_native_flash")
    assert apply_speed_path(object(), "cuda", off).reason == "disabled (WAN_SPEED=off)"


def test_choose_backend_takes_the_fastest_within_bf16_noise() -> None:
    probes = [
        BackendProbe("native", seconds=3.0, rel_error=2e-3),
        BackendProbe("_native_cudnn", seconds=2.0, rel_error=3e-3),
        BackendProbe("lossy", seconds=1.0, rel_error=5e-2),  # faster but beyond tolerance: never chosen
        BackendProbe("_flash_3", error="ImportError: flash_attn_interface"),
    ]
    assert choose_backend(probes) == "_native_cudnn"
    assert choose_backend(probes[2:]) is None
    near_tie = [BackendProbe("_native_cudnn", seconds=1.00, rel_error=2e-3), BackendProbe("native", 1.02, 2e-3)]
    assert choose_backend(near_tie) == "native"  # diffusers' default unless another kernel is clearly faster


def test_probe_on_cpu_records_failures_and_picks_by_its_own_timings() -> None:
    probes = probe_attention_backends(
        heads=2,
        head_dim=16,
        tokens=64,
        dtype=torch.float32,
        device="cpu",
        candidates=("_native_cudnn", "native", "_native_math"),
    )
    by_name = {p.name: p for p in probes}
    assert by_name["_native_cudnn"].error is not None  # no cuDNN kernel on a CPU
    for name in ("native", "_native_math"):
        assert by_name[name].usable and by_name[name].rel_error < 1e-5  # float32: far inside bf16 noise
    fastest = min((p for p in probes if p.usable), key=lambda p: p.seconds)
    # The default wins a near-tie (within DEFAULT_BACKEND_TIE), else the fastest.
    near_tie = by_name["native"].seconds <= fastest.seconds * speed.DEFAULT_BACKEND_TIE
    assert choose_backend(probes) == ("native" if near_tie else fastest.name)


def test_forced_speed_path_keeps_the_output(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The probed backend on the tiny model (CPU, compile off) gives the plain pipeline's video."""
    orchestrator = WanOrchestrator(tiny_models_dir)
    orchestrator.load_model("tiny_t2v")
    loaded = orchestrator._loaded
    assert loaded is not None
    kwargs = {"seed": 3, "video_length": 5, "resolution": "64x64", "num_inference_steps": 3}
    plain = orchestrator.generate_t2v("a cat", output_path=tmp_path / "plain.mp4", **kwargs)
    settings = SpeedSettings(compile=False, require_cuda=False)
    report = apply_speed_path(loaded.pipe, "cpu", settings)
    assert report.enabled and report.attention_backend in {p.name for p in report.probes if p.usable}
    assert _backends(loaded.pipe) == {AttentionBackendName(report.attention_backend)}
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    assert _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE  # others stay plain
    fast = orchestrator.generate_t2v("a cat", output_path=tmp_path / "fast.mp4", **kwargs)
    a, b = (read_video_frames(r.output_path).astype(int) for r in (plain, fast))
    assert abs(a - b).max() <= 1  # same frames up to uint8 rounding
    orchestrator.unload_model()


def test_eager_blocks_skips_compiled_regions() -> None:
    compilations = []

    def backend(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> Any:
        compilations.append(gm)
        return gm.forward

    fn = torch.compile(lambda x: x * 2 + 1, backend=backend, dynamic=False)
    x = torch.ones(3)
    with eager_blocks(True):
        assert torch.equal(fn(x), x * 2 + 1)
    assert compilations == []
    with eager_blocks(False):
        fn(x)
    assert len(compilations) == 1


def test_flop_count_gives_the_issue_floors() -> None:
    tokens = wan_tokens(832, 480, 81)
    assert tokens == 32760
    for config, floor_s in ((WAN_13B, 0.72), (WAN_14B, 4.24)):
        step = 2 * wan_transformer_flops(config, tokens)  # CFG: conditional + unconditional forward
        assert step / MEASURED_TFLOPS == pytest.approx(floor_s, rel=0.02)


def test_no_room_for_the_probe_keeps_the_default_kernel(
    t2v_orchestrator: WanOrchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small GPU or a VRAM cap: the probe's own tensors run out of memory; the load goes on."""

    def out_of_memory(*_args: Any, **_kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 192.00 MiB (injected by the test)")

    monkeypatch.setattr(speed, "_probe_cached", out_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    loaded = t2v_orchestrator._loaded
    assert loaded is not None
    report = apply_speed_path(loaded.pipe, "cpu", SpeedSettings(compile=False, require_cuda=False))
    assert report.enabled and report.attention_backend is None, "diffusers' default stays"
    assert report.probes[0].error is not None and "OutOfMemoryError" in report.probes[0].error


class _Pipe:
    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer


def test_the_probe_is_kept_in_the_cache_folder_for_a_restarted_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Measured once, then read from `<models dir>/.compile_cache/wan_attention_probe.json` by a new
    process; a corrupt or foreign file is ignored (probed again and rewritten)."""
    from wan_engine.tiny_models import _transformer

    monkeypatch.setattr(speed, "_PROBE_CACHE", {})
    settings = SpeedSettings(compile=False, require_cuda=False)
    pipe = _Pipe(_transformer(1))
    first = apply_speed_path(pipe, "cpu", settings, models_dir=tmp_path)
    assert first.probe_source == "measured" and first.brief()["attention_probe"] == "measured"
    stored = tmp_path / ".compile_cache" / speed.PROBE_FILE
    entry = json.loads(stored.read_text())["entries"][0]
    assert entry["key"]["heads"] == 2 and entry["key"]["head_dim"] == 12 and entry["key"]["gpu"] == "cpu"
    assert apply_speed_path(pipe, "cpu", settings, models_dir=tmp_path).probe_source == "this process"
    monkeypatch.setattr(speed, "_PROBE_CACHE", {})  # a restarted worker
    restarted = apply_speed_path(pipe, "cpu", settings, models_dir=tmp_path)
    assert restarted.probe_source == "cache file" and restarted.probes == first.probes
    assert restarted.attention_backend == first.attention_backend
    # Another torch build wrote it: foreign, probed again, and this process's entry added beside it.
    foreign = {**entry, "key": {**entry["key"], "torch": "0.0"}}
    stored.write_text(json.dumps({"format": 1, "entries": [foreign]}))
    monkeypatch.setattr(speed, "_PROBE_CACHE", {})
    assert apply_speed_path(pipe, "cpu", settings, models_dir=tmp_path).probe_source == "measured"
    assert len(json.loads(stored.read_text())["entries"]) == 2
    for corrupt in ("{oops", json.dumps({"format": 1, "entries": [{**entry, "probes": [{"name": 3}]}]})):
        stored.write_text(corrupt)
        monkeypatch.setattr(speed, "_PROBE_CACHE", {})
        assert apply_speed_path(pipe, "cpu", settings, models_dir=tmp_path).probe_source == "measured"
        assert json.loads(stored.read_text())["entries"][-1]["key"] == entry["key"]  # rewritten whole
    forced = apply_speed_path(pipe, "cpu", SpeedSettings(compile=False, require_cuda=False, attention="native"))
    assert forced.probe_source is None and forced.brief()["attention_probe"] is None
