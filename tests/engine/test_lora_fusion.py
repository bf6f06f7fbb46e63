"""LoRAs fused into the weights for a call (wan_engine.lora_fusion), on a tiny Wan transformer in float32.

Checks: the fused forward equals peft's LoRA forward (float32 closeness); the module tree while fused is the
plain model's (no peft wrapper left); restore is bit-exact (every tensor of the state dict equal, the
wrappers back, their scales those the call ran with); a schedule is re-fused where it changes and matches
peft step by step without a recompile; DoRA, offloaded weights and a many-change schedule whose originals
sit in host RAM are not fused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from wan_engine.lora_fusion import FusionPlan, fused_loras, fusion_plan
from wan_engine.loras import LoadedLora, LoraMultiplier, LoraRequest, LoraState


def _transformer() -> Any:
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


class _Pipe:
    def __init__(self, transformer: Any) -> None:
        self.transformer = transformer


def _add_lora(model: Any, name: str, rank: int, seed: int, *, dora: bool = False) -> None:
    from peft import LoraConfig

    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=targets, use_dora=dora), adapter_name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, param in model.named_parameters():
            if f"lora_B.{name}" in module_name or f"lora_A.{name}" in module_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(5)
    return (
        torch.randn(1, 4, 2, 4, 6, generator=generator),
        torch.tensor([400]),
        torch.randn(1, 8, 16, generator=generator),
    )


def _forward(model: Any) -> torch.Tensor:
    latents, timestep, text = _inputs()
    with torch.no_grad():
        return model(latents, timestep, text, return_dict=False)[0]


def _state(adapters: dict[str, str]) -> tuple[LoraState, list[LoraRequest]]:
    """LoRA state as apply_loras leaves it: adapter -> multiplier text (one phase)."""
    state = LoraState()
    requests = []
    for adapter, text in adapters.items():
        values = tuple(float(v) for v in text.split(","))
        state.loaded.append(LoadedLora(adapter, Path(adapter), adapter, ("high",), {"high": 12}, {"high": 12}))
        requests.append(LoraRequest(adapter, Path(adapter), LoraMultiplier((values,), text)))
    return state, requests


def _peft_layers(model: Any) -> int:
    from peft.tuners.lora.layer import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def test_fused_forward_matches_peft_and_restore_is_bit_exact() -> None:
    model = _transformer()
    plain = _forward(model)
    _add_lora(model, "a", rank=4, seed=1)
    _add_lora(model, "b", rank=2, seed=2)
    model.set_adapters(["a", "b"], [0.7, -0.4])
    with_lora = _forward(model)
    assert (with_lora - plain).abs().max() > 1e-2  # the LoRAs change the output: the test can fail
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrappers = _peft_layers(model)
    state, requests = _state({"a": "0.7", "b": "-0.4"})
    plan = fusion_plan(state, requests, ("high",) * 4)
    assert plan.fusible and plan.weights == {"high": {"a": 0.7, "b": -0.4}}
    with fused_loras(_Pipe(model), plan) as report:
        assert report.fused and report.layers == wrappers == 20 and report.stash == "cpu"
        assert _peft_layers(model) == 0  # the plain model's module tree: the compiled code is the plain one's
        fused = _forward(model)
    torch.testing.assert_close(fused, with_lora, rtol=1e-4, atol=1e-5)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit for bit
    assert _peft_layers(model) == wrappers
    assert torch.equal(_forward(model), with_lora)  # peft computes exactly what it did before


def test_restore_sets_the_scales_the_call_ran_with() -> None:
    from peft.tuners.lora.layer import LoraLayer

    model = _transformer()
    _add_lora(model, "a", rank=4, seed=1)
    model.set_adapters(["a"], [1.0])
    state, requests = _state({"a": "0.25"})
    with fused_loras(_Pipe(model), fusion_plan(state, requests, ("high",) * 3)):
        pass
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert layer.scaling["a"] == pytest.approx(0.25 * 8 / 4)  # multiplier x alpha / r


def test_restore_happens_when_the_call_fails() -> None:
    model = _transformer()
    _add_lora(model, "a", rank=4, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state, requests = _state({"a": "1.0"})
    with (
        pytest.raises(RuntimeError, match="boom"),
        fused_loras(_Pipe(model), fusion_plan(state, requests, ("high",))),
    ):
        raise RuntimeError("boom")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert _peft_layers(model) == 20


def test_schedules_dora_and_offloaded_weights_are_not_fused() -> None:
    state, requests = _state({"a": "1.0,0.5"})
    plan = fusion_plan(state, requests, ("high",) * 4)
    assert plan.fusible and plan.weights == {"high": {"a": 1.0}} and plan.changes == {2: ("high", {"a": 0.5})}
    # Many changes with the originals in host RAM (always so on a CPU): eager, and it says why.
    state, requests = _state({"a": "1.0,0.8,0.6,0.4"})
    plan = fusion_plan(state, requests, ("high",) * 4)
    model = _transformer()
    _add_lora(model, "a", rank=4, seed=1)
    with fused_loras(_Pipe(model), plan) as report:
        assert not report.fused and "change at 3 steps" in report.reason and "host RAM" in report.reason
        assert _peft_layers(model) == 20
    # A two-expert run: constant per expert fuses with each expert's own value.
    dual_state = LoraState(
        loaded=[LoadedLora("d", Path("d"), "d", ("high", "low"), {"high": 1, "low": 1}, {"high": 1, "low": 1})]
    )
    dual = [LoraRequest("d", Path("d"), LoraMultiplier(((1.0,), (0.5,)), "1.0;0.5"))]
    assert fusion_plan(dual_state, dual, ("high", "high", "low")).weights == {
        "high": {"d": 1.0},
        "low": {"d": 0.5},
    }

    model = _transformer()
    _add_lora(model, "a", rank=4, seed=1, dora=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dora_state, dora_requests = _state({"a": "1.0"})
    with fused_loras(_Pipe(model), fusion_plan(dora_state, dora_requests, ("high",))) as report:
        assert not report.fused and "DoRA" in report.reason
        assert _peft_layers(model) == 20
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert FusionPlan(reason="x").fusible is False


def test_a_fused_lora_task_reuses_the_plain_compiled_code() -> None:
    """Through speed.task_compile: the LoRA task runs compiled with no new graph, and matches peft eager."""
    import torch._dynamo

    from wan_engine import speed
    from wan_engine.compile_policy import CompileTracker

    torch._dynamo.reset()
    graphs: list[Any] = []

    def backend(gm: torch.fx.GraphModule, _inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    model = _transformer()
    speed._compile_blocks(model, "mark", backend=backend)
    _forward(model)
    assert len(graphs) == 1
    _add_lora(model, "a", rank=4, seed=1)
    model.set_adapters(["a"], [0.6])
    with speed.eager_blocks(True):
        reference = _forward(model)  # peft's LoRA layers, eager
    tracker = CompileTracker(policy="always")
    report = speed.SpeedReport(True, "test", compiled=("transformer",), dynamic="mark", tracker=tracker)
    state, requests = _state({"a": "0.6"})
    kwargs = {"width": 48, "height": 32, "frames": 5, "steps": 2, "cfg": False}
    with speed.task_compile(
        report, _Pipe(model), lora_state=state, lora_requests=requests, experts_per_step=("high",) * 2, **kwargs
    ) as decision:
        fused = _forward(model)
    assert decision is not None and decision.compiled and decision.lora_fused
    assert len(graphs) == 1  # no recompile for the LoRA task
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)
    assert report.brief()["compile"]["lora_fused"] is True
    # A per-step schedule runs compiled too: re-fused where it changes, the same compiled code, and each
    # step equal to peft's eager forward at that step's multiplier.
    from wan_engine.loras import set_step_weights

    state, requests = _state({"a": "0.6,0.2"})
    pipe = _Pipe(model)
    experts = ("high",) * 2
    with speed.eager_blocks(True):
        references = []
        for multiplier in (0.6, 0.2):
            model.set_adapters(["a"], [multiplier])
            references.append(_forward(model))
    set_step_weights(pipe, state, requests, 0, experts)
    with speed.task_compile(
        report, pipe, lora_state=state, lora_requests=requests, experts_per_step=experts, **kwargs
    ) as decision:
        steps = []
        for step in range(2):
            set_step_weights(pipe, state, requests, step, experts)
            steps.append(_forward(model))
    assert decision is not None and decision.compiled and decision.lora_fused
    assert report.brief()["compile"]["lora_refuses"] == 1
    for got, want in zip(steps, references, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (steps[0] - steps[1]).abs().max() > 1e-3  # the schedule really changed the weights
    assert len(graphs) == 1  # no recompile for the schedule either
    assert state.fused_update is None and _peft_layers(model) == 20


def test_orchestrator_lora_task_runs_fused_and_compiled(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real call site (generation_run.denoise): a constant-multiplier LoRA task and a schedule run
    compiled and fused (the schedule re-fused where it changes), record it, and their frames match the
    eager LoRA runs."""
    import functools

    import torch._dynamo
    from safetensors.torch import save_file

    from headless_wgp import WanOrchestrator
    from wan_engine import speed
    from wan_engine.video_io import read_video_frames

    torch._dynamo.reset()
    graphs: list[Any] = []

    def backend(gm: torch.fx.GraphModule, _inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    loras = tmp_path / "loras"
    loras.mkdir()
    generator = torch.Generator().manual_seed(3)
    weights = {}
    for block in range(2):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            prefix = f"transformer.blocks.{block}.attn1.{proj}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(4, 24, generator=generator)
            weights[f"{prefix}.lora_B.weight"] = torch.randn(24, 4, generator=generator)
    save_file(weights, str(loras / "style.safetensors"))
    orchestrator = WanOrchestrator(tiny_models_dir, loras_dir=loras)
    orchestrator.load_model("tiny_t2v")
    loaded = orchestrator._loaded
    assert loaded is not None
    kwargs = {"seed": 2, "video_length": 5, "resolution": "64x64", "num_inference_steps": 2, "lora_names": ["style"]}
    eager = orchestrator.generate_t2v("a cat", output_path=tmp_path / "eager.mp4", lora_multipliers="0.7", **kwargs)
    eager_scheduled = orchestrator.generate_t2v(
        "a cat", output_path=tmp_path / "sched_eager.mp4", lora_multipliers="0.7,0.2", **kwargs
    )
    monkeypatch.setattr(speed, "_compile_blocks", functools.partial(speed._compile_blocks, backend=backend))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # restored after the test
        monkeypatch.setenv(name, str(tmp_path / "cache"))
    settings = speed.SpeedSettings(require_cuda=False, policy="always", cache_dir=str(tmp_path / "cache"))
    loaded.speed = speed.apply_speed_path(loaded.pipe, "cpu", settings)
    fused = orchestrator.generate_t2v("a cat", output_path=tmp_path / "fused.mp4", lora_multipliers="0.7", **kwargs)
    record = fused.extra["speed"]
    assert record["compiled"] == ["transformer"] and record["compile"]["lora_fused"] is True
    assert record["compile"]["reason"] == "policy always" and len(graphs) == 1
    a, b = (read_video_frames(r.output_path).astype(int) for r in (eager, fused))
    assert abs(a - b).max() <= 2  # float32: the same frames up to uint8 rounding
    scheduled = orchestrator.generate_t2v(
        "a cat", output_path=tmp_path / "sched.mp4", lora_multipliers="0.7,0.2", **kwargs
    )
    assert scheduled.extra["speed"]["compiled"] == ["transformer"] and len(graphs) == 1
    assert scheduled.extra["speed"]["compile"]["lora_fused"] is True
    assert scheduled.extra["speed"]["compile"]["lora_refuses"] == 1
    a, b = (read_video_frames(r.output_path).astype(int) for r in (eager_scheduled, scheduled))
    assert abs(a - b).max() <= 2
    plain = orchestrator.generate_t2v("a cat", output_path=tmp_path / "plain.mp4", **{**kwargs, "lora_names": []})
    assert plain.extra["speed"]["compiled"] == ["transformer"] and len(graphs) == 1  # no recompile after LoRAs
    orchestrator.unload_model()
