"""Model checks: safetensors integrity, shard indexes, VRAM estimates and `wan-worker models`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import WanTransformer3DModel

from headless_wgp import WanOrchestrator
from wan_engine.errors import EngineError, ModelUnavailableError
from wan_engine.model_checks import SafetensorsError, inspect_component, read_safetensors_header
from wan_engine.model_sources import check_model
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets
from wan_engine.vram import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    PROFILES,
    GpuInfo,
    ModelReport,
    detect_gpu,
    estimate_vram,
    model_report,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TRANSFORMER_FILE = Path("transformer") / "diffusion_pytorch_model.safetensors"


def _copy(tiny_models_dir: Path, models: Path, name: str = "tiny-wan2.1-t2v") -> Path:
    shutil.copytree(tiny_models_dir / "tiny-wan2.1-t2v", models / name)
    return models / name


def _truncate(path: Path, drop: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - drop])


def _registry(tmp_path: Path, **urls: str) -> PresetRegistry:
    user = tmp_path / "presets"
    user.mkdir(exist_ok=True)
    for key, source in urls.items():
        model = {"name": key, "architecture": "t2v", "URLs": source}
        (user / f"{key}.json").write_text(json.dumps({"model": model, "resolution": "64x48", "video_length": 9}))
    return load_presets(BUILTIN_PRESETS_DIR, user)


# ---- safetensors headers ---------------------------------------------------------------------------


def test_header_matches_the_tensors(tiny_models_dir: Path) -> None:
    header = read_safetensors_header(tiny_models_dir / "tiny-wan2.1-t2v" / TRANSFORMER_FILE)
    model = WanTransformer3DModel.from_pretrained(tiny_models_dir / "tiny-wan2.1-t2v", subfolder="transformer")
    assert header.numel == sum(p.numel() for p in model.state_dict().values())
    assert header.file_size == 8 + header.header_size + header.data_size


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[:5], "truncated"),
        (lambda b: struct.pack("<Q", 10**12) + b[8:], "header length"),
        (lambda b: b[:8] + b"{garbage" + b[16:], "JSON header is unreadable"),
        (lambda b: b + b"\0" * 16, "trailing bytes"),
    ],
)
def test_damaged_files_are_named_with_the_reason(tiny_models_dir: Path, tmp_path: Path, damage, reason: str) -> None:
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damage((tiny_models_dir / "tiny-wan2.1-t2v" / TRANSFORMER_FILE).read_bytes()))
    with pytest.raises(SafetensorsError, match=reason) as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


# ---- present / missing / corrupted -----------------------------------------------------------------


def test_truncated_weights_are_corrupted_and_fail_the_load(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    folder = _copy(tiny_models_dir, models)
    _truncate(folder / "vae" / "diffusion_pytorch_model.safetensors")
    presets = _registry(tmp_path, cut="tiny-wan2.1-t2v")
    check = check_model(presets.get("cut"), models)
    assert check.status == "corrupted" and check.path is None
    assert any(str(folder / "vae" / "diffusion_pytorch_model.safetensors") in c for c in check.corrupted)
    orchestrator = WanOrchestrator(models, presets)
    with pytest.raises(ModelUnavailableError) as info:
        orchestrator.load_model("cut")
    assert isinstance(info.value, EngineError) and info.value.permanent
    assert "is corrupted" in str(info.value) and "vae/diffusion_pytorch_model.safetensors" in str(info.value)
    assert "truncated" in str(info.value) and orchestrator.current_model is None


def test_missing_model_names_files_and_places(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    folder = _copy(tiny_models_dir, models)
    shutil.rmtree(folder / "text_encoder")
    presets = _registry(tmp_path, gone="no-such-model", partial="tiny-wan2.1-t2v")
    gone = check_model(presets.get("gone"), models)
    assert gone.status == "missing" and any(str(models / "no-such-model") in m for m in gone.missing)
    partial = check_model(presets.get("partial"), models)
    assert partial.status == "missing"
    assert f"{folder}/text_encoder/config.json" in partial.missing
    assert f"{folder}/text_encoder/*.safetensors" in partial.missing
    with pytest.raises(ModelUnavailableError, match=r"text_encoder/config\.json"):
        WanOrchestrator(models, presets).load_model("partial")


@pytest.fixture
def sharded(tiny_models_dir: Path, tmp_path: Path) -> Path:
    """The tiny transformer saved in several shards with a safetensors index."""
    model = WanTransformer3DModel.from_pretrained(tiny_models_dir / "tiny-wan2.1-t2v", subfolder="transformer")
    out = tmp_path / "transformer"
    model.save_pretrained(out, max_shard_size="40KB")
    assert len(list(out.glob("*.safetensors"))) > 1
    return out


def test_sharded_component_is_checked_against_its_index(sharded: Path) -> None:
    assert inspect_component(sharded, "transformer").ok
    index_path = next(sharded.glob("*.index.json"))
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))

    # A shard from another download: total_size no longer adds up.
    index["metadata"]["total_size"] += 4
    index_path.write_text(json.dumps(index))
    report = inspect_component(sharded, "transformer")
    assert any("total_size" in c and index_path.name in c for c in report.corrupted), report.corrupted
    index["metadata"]["total_size"] -= 4

    # The weight map puts a tensor in a shard that does not hold it.
    tensor = next(t for t, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][tensor] = shards[1]
    index_path.write_text(json.dumps(index))
    assert any(tensor in c for c in inspect_component(sharded, "transformer").corrupted)
    index["weight_map"][tensor] = shards[0]
    index_path.write_text(json.dumps(index))

    (sharded / shards[1]).unlink()
    assert inspect_component(sharded, "transformer").missing == [f"transformer/{shards[1]}"]


def test_pickle_only_folder_is_refused(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    folder = _copy(tiny_models_dir, models)
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    check = check_model(_registry(tmp_path, pickled="tiny-wan2.1-t2v").get("pickled"), models)
    assert check.status == "missing"
    refused = [p for p in check.problems if "pickle" in p]
    assert {p.split("/ holds")[0].rsplit("/", 1)[-1] for p in refused} == {"transformer", "vae", "text_encoder"}


# ---- VRAM ------------------------------------------------------------------------------------------


def test_vram_profiles_are_monotone_and_cpu_is_zero(tiny_models_dir: Path, builtin_presets: PresetRegistry) -> None:
    for key in ("tiny_t2v", "tiny_t2v_2_2", "tiny_vace"):
        preset = builtin_presets.get(key)
        estimate = estimate_vram(preset, check_model(preset, tiny_models_dir), width=832, height=480, frames=81)
        assert estimate is not None
        p = estimate.profiles
        assert list(p) == list(PROFILES)
        assert p["gpu"] > p["model_offload"] >= p["group_offload"] >= p["sequential"] > p["cpu"] == 0, (key, p)
        names = {c.name for c in estimate.components}
        assert names >= {"transformer", "vae", "text_encoder"} and "tokenizer" not in names
        assert ("transformer_2" in names) == (key == "tiny_t2v_2_2")
        weights = sum(c.weight_bytes for c in estimate.components)
        assert p["gpu"] == weights + max(c.activation_bytes for c in estimate.components)


def test_vram_scales_with_resolution_frames_and_attention(
    tiny_models_dir: Path, builtin_presets: PresetRegistry
) -> None:
    preset = builtin_presets.get("tiny_t2v")
    check = check_model(preset, tiny_models_dir)

    def gpu(**size) -> int:
        estimate = estimate_vram(preset, check, **size)
        assert estimate is not None
        return estimate.profiles["gpu"]

    default = estimate_vram(preset, check)
    assert default is not None and (default.width, default.height, default.frames) == (64, 48, 9)  # the preset's
    assert default.tokens == 3 * 3 * 4  # (1 + 8/4) latent frames x (48/8/2) x (64/8/2)
    base = gpu(width=832, height=480, frames=81)
    assert gpu(width=1280, height=720, frames=81) > base
    assert gpu(width=832, height=480, frames=121) > base
    assert gpu(width=416, height=240, frames=81) < base
    assert gpu(width=832, height=480, frames=81, attention="math") > base


def test_vram_weights_from_config_when_weights_are_absent(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    folder = _copy(tiny_models_dir, models)
    for name in ("transformer", "text_encoder"):
        for weights in (folder / name).glob("*.safetensors"):
            weights.unlink()
    presets = _registry(tmp_path, partial="tiny-wan2.1-t2v")
    check = check_model(presets.get("partial"), models)
    assert check.status == "missing"
    estimate = estimate_vram(presets.get("partial"), check)
    assert estimate is not None
    sizes = {c.name: c for c in estimate.components}
    for name in ("transformer", "text_encoder"):  # the text encoder's tied embedding counts once
        header = read_safetensors_header(next((tiny_models_dir / "tiny-wan2.1-t2v" / name).glob("*.safetensors")))
        assert sizes[name].counted_from == "config" and sizes[name].params == header.numel, name
    assert sizes["vae"].counted_from == "safetensors"


def test_fit_and_recommended_profile(tiny_models_dir: Path, builtin_presets: PresetRegistry) -> None:
    preset = builtin_presets.get("tiny_t2v")
    check = check_model(preset, tiny_models_dir)
    estimate = estimate_vram(preset, check, width=1280, height=720, frames=81)
    assert estimate is not None
    assert detect_gpu() is None  # the test machines have none
    no_gpu = ModelReport(preset, check, estimate, None)
    assert no_gpu.recommended_profile == "cpu" and set(no_gpu.fits.values()) == {None}
    assert no_gpu.to_dict()["gpu"] == "no GPU"
    # A GPU just big enough for the sequential profile (with context and slack), and a roomy one.
    tight = GpuInfo("test", int(estimate.profiles["sequential"] * ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES + 1, None)
    # (the fastest profile whose estimate is no larger: with the VAE kept whole under `sequential`, a tiny
    # model's full-frame decode dominates and model_offload costs the same)
    expected = next(name for name in PROFILES if estimate.profiles[name] <= estimate.profiles["sequential"])
    assert ModelReport(preset, check, estimate, tight).recommended_profile == expected
    roomy = GpuInfo("test", 80 * 2**30, None)
    assert ModelReport(preset, check, estimate, roomy).recommended_profile == "gpu"
    assert all(ModelReport(preset, check, estimate, roomy).fits.values())


def test_report_of_a_missing_model_has_no_estimate(tmp_path: Path, builtin_presets: PresetRegistry) -> None:
    report = model_report(builtin_presets.get("t2v_1.3B"), tmp_path)
    assert report.check.status == "missing" and report.vram is None and report.recommended_profile is None
    assert "VRAM unknown" in report.line()


# ---- the CLI ---------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "worker", "models", *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )


def test_models_json_through_the_cli(tiny_models_dir: Path, tmp_path: Path, capsys) -> None:
    models = tmp_path / "models"
    _copy(tiny_models_dir, models, "ok-model")
    bad = _copy(tiny_models_dir, models, "bad-model")
    _truncate(bad / TRANSFORMER_FILE)
    _registry(tmp_path, sf_ok="ok-model", sf_missing="gone-model", sf_bad="bad-model")
    common = ["--models-dir", str(models), "--presets-dir", str(tmp_path / "presets")]
    done = _cli(*common, "--json")
    assert done.returncode == 0, done.stderr
    reports = {r["key"]: r for r in json.loads(done.stdout)}
    assert {"sf_ok", "sf_missing", "sf_bad", "tiny_t2v", "t2v_1.3B"} <= set(reports)

    ok = reports["sf_ok"]
    assert ok["status"] == "present" and ok["path"] == str(models / "ok-model")
    assert ok["gpu"] == "no GPU" and ok["recommended_profile"] == "cpu"
    assert ok["vram"]["resolution"] == "64x48" and ok["vram"]["frames"] == 9
    profiles = ok["vram"]["profiles_gb"]
    assert list(profiles) == list(PROFILES) and profiles["cpu"] == 0
    assert ok["vram"]["components"]["transformer"]["counted_from"] == "safetensors"

    missing = reports["sf_missing"]
    assert missing["status"] == "missing" and missing["vram"] is None
    assert any(str(models / "gone-model") in m for m in missing["missing"])

    corrupted = reports["sf_bad"]
    assert corrupted["status"] == "corrupted"
    assert any(str(bad / TRANSFORMER_FILE) in c and "truncated" in c for c in corrupted["corrupted"])

    # Named presets, as a table (in-process: the subprocess above already proved the real CLI).
    from worker.cli import build_parser, cmd_models

    assert cmd_models(build_parser().parse_args(["models", *common, "sf_ok", "sf_bad"])) == 1  # one is unusable
    table = capsys.readouterr().out
    lines = {line.split()[0]: line for line in table.splitlines()[3:]}
    assert set(lines) == {"sf_ok", "sf_bad"} and "no GPU" in table
    assert "present" in lines["sf_ok"] and "corrupted" in lines["sf_bad"] and "truncated" in lines["sf_bad"]


def test_startup_logs_one_line_per_preset(tiny_models_dir: Path, tmp_path: Path, caplog) -> None:
    from worker.cli import _log_model_reports

    presets = _registry(tmp_path, sf_missing="gone-model")
    with caplog.at_level(logging.INFO, logger="worker.cli"):
        _log_model_reports(presets, tiny_models_dir, allow_download=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "worker.cli"]
    assert "GPU: no GPU (CPU only)" in messages
    lines = {m.split()[1].rstrip(":"): m for m in messages if m.startswith("model ")}
    assert set(lines) == set(presets)
    assert lines["tiny_t2v"].startswith("model tiny_t2v: present (")
    assert lines["sf_missing"].startswith("model sf_missing: missing") and "gone-model" in lines["sf_missing"]
    missing_record = next(r for r in caplog.records if r.getMessage() == lines["sf_missing"])
    assert missing_record.levelno == logging.WARNING


def test_models_allow_download_needs_named_presets(tmp_path: Path, capsys) -> None:
    from worker.cli import build_parser, cmd_models

    args = build_parser().parse_args(["models", "--allow-download", "--models-dir", str(tmp_path)])
    assert cmd_models(args) == 2
    assert "--allow-download needs the keys" in capsys.readouterr().err


def test_a_tiled_decode_is_estimated_at_one_tile(tiny_models_dir: Path, builtin_presets: PresetRegistry) -> None:
    preset = builtin_presets.get("tiny_t2v")
    check = check_model(preset, tiny_models_dir)
    size = {"width": 1280, "height": 720, "frames": 81}
    full, tiled = estimate_vram(preset, check, **size), estimate_vram(preset, check, tiled_vae=True, **size)
    assert full is not None and tiled is not None
    vae_full, vae_tiled = (next(c for c in e.components if c.name == "vae") for e in (full, tiled))
    output = 81 * 3 * 720 * 1280 * 4  # the decoded video itself stays whole
    feature_maps = (vae_full.activation_bytes - output, vae_tiled.activation_bytes - output)
    assert feature_maps[1] * 1280 * 720 == feature_maps[0] * 256 * 256  # one tile's feature maps, not a frame's
    small = {"width": 256, "height": 256, "frames": 81}  # one tile: tiling changes nothing
    assert (
        estimate_vram(preset, check, **small).profiles == estimate_vram(preset, check, tiled_vae=True, **small).profiles
    )
