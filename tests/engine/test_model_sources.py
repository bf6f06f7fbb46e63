"""Finding a preset's weights on disk: folders, repo ids, the local HF cache, clear refusals."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
from diffusers import WanTransformer3DModel

from headless_wgp import WanOrchestrator
from wan_engine.errors import ModelUnavailableError
from wan_engine.model_sources import check_model, parse_source, resolve_model
from wan_engine.presets import BUILTIN_PRESETS_DIR, Preset, PresetRegistry, load_presets


def _user_preset(tmp_path: Path, key: str, urls: str, *, group: str = "wan") -> Preset:
    user = tmp_path / "presets"
    user.mkdir(exist_ok=True)
    model = {"name": key, "architecture": "t2v", "URLs": urls, "group": group}
    (user / f"{key}.json").write_text(json.dumps({"model": model}))
    return load_presets(BUILTIN_PRESETS_DIR, user).get(key)


def test_tiny_models_are_present(tiny_models_dir: Path, builtin_presets: PresetRegistry) -> None:
    for key in ("tiny_t2v", "tiny_t2v_2_2", "tiny_vace"):
        check = check_model(builtin_presets.get(key), tiny_models_dir)
        assert check.status == "present", check
        assert check.path is not None and (check.path / "model_index.json").is_file()


def test_missing_model_report_names_every_path(tmp_path: Path, builtin_presets: PresetRegistry) -> None:
    preset = builtin_presets.get("t2v_1.3B")
    check = check_model(preset, tmp_path)
    assert check.status == "missing"
    assert any("model_index.json" in m for m in check.missing)
    with pytest.raises(ModelUnavailableError) as info:
        resolve_model(preset, tmp_path)
    message = str(info.value)
    assert "'t2v_1.3B'" in message and "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in message
    assert str(tmp_path / "Wan-AI" / "Wan2.1-T2V-1.3B-Diffusers") in message
    assert str(tmp_path / "Wan2.1-T2V-1.3B-Diffusers") in message
    assert "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers" in message  # the HF cache location
    assert "--models-dir" in message
    for candidate in check.candidates:
        assert str(candidate.path) in message


def test_repo_id_found_under_models_dir_by_name(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir / "tiny-wan2.1-t2v", models / "tiny-repo")
    check = check_model(_user_preset(tmp_path, "by_repo", "SomeOrg/tiny-repo"), models)
    assert check.status == "present" and check.path == models / "tiny-repo"


def test_repo_id_found_in_local_hf_cache(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf-cache"
    commit = "0" * 40
    repo = cache / "models--SomeOrg--cached-tiny"
    shutil.copytree(tiny_models_dir / "tiny-wan2.1-t2v", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: the lookup must never download
    check = check_model(_user_preset(tmp_path, "cached", "SomeOrg/cached-tiny"), tmp_path / "empty")
    assert check.status == "present"
    assert check.path == (repo / "snapshots" / commit).resolve()


def test_incomplete_folder_lists_missing_files(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir / "tiny-wan2.1-t2v", models / "tiny-wan2.1-t2v")
    (models / "tiny-wan2.1-t2v" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    check = check_model(load_presets().get("tiny_t2v"), models)
    assert check.status == "missing"
    assert any("vae/" in m and "safetensors" in m for m in check.missing), check.missing


def test_pickle_only_component_is_refused(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    folder = models / "tiny-wan2.1-t2v"
    shutil.copytree(tiny_models_dir / "tiny-wan2.1-t2v", folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    check = check_model(load_presets().get("tiny_t2v"), models)
    assert check.status == "missing"
    assert any("pickle" in p and "diffusion_pytorch_model.bin" in p for p in check.problems), check.problems
    orchestrator = WanOrchestrator(models)
    with pytest.raises(ModelUnavailableError, match="pickle"):
        orchestrator.load_model("tiny_t2v")
    assert orchestrator.current_model is None


def test_dual_expert_preset_needs_transformer_2(tiny_models_dir: Path, tmp_path: Path) -> None:
    preset = _user_preset(tmp_path, "fake22", str(tiny_models_dir / "tiny-wan2.1-t2v"), group="wan2_2")
    check = check_model(preset, tmp_path)
    assert check.status == "missing"
    assert any("transformer_2" in m for m in check.missing)


def test_single_file_checkpoint_is_reported(tmp_path: Path) -> None:
    check = check_model(_user_preset(tmp_path, "single", "wan2.1_t2v_1.3B_bf16.safetensors"), tmp_path)
    assert check.status == "missing"
    assert any("single-file" in p and "model.base" in p for p in check.problems)
    assert any(str(tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors") in m for m in check.missing)


@pytest.mark.parametrize(
    ("source", "kind", "repo", "filename", "revision"),
    [
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "repo", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", None, None),
        ("tiny-wan2.1-t2v", "path", None, None, None),
        ("/abs/model", "path", None, None, None),
        ("wan.safetensors", "path", None, None, None),
        ("Org/repo/split_files/wan.safetensors", "hf_file", "Org/repo", "split_files/wan.safetensors", None),
        (
            "https://huggingface.co/Org/repo/resolve/main/x/wan.safetensors",
            "hf_file",
            "Org/repo",
            "x/wan.safetensors",
            None,
        ),
        (
            "https://huggingface.co/Org/repo/blob/abc123/wan.safetensors",
            "hf_file",
            "Org/repo",
            "wan.safetensors",
            "abc123",
        ),
        ("https://example.com/wan.safetensors", "refused", None, None, None),
        ("Org/repo/wan.ckpt", "refused", None, None, None),
    ],
)
def test_source_kinds(source: str, kind: str, repo: str | None, filename: str | None, revision: str | None) -> None:
    parsed = parse_source(source)
    assert (parsed.kind, parsed.repo_id, parsed.filename, parsed.revision) == (kind, repo, filename, revision)


def _fake_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo_id: str, files: dict[str, Path]) -> Path:
    """A local HF cache holding `files` (name -> source) in one snapshot of `repo_id`."""
    cache = tmp_path / "hf-cache"
    commit = "1" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, snapshot / name)
        else:
            shutil.copy(source, snapshot / name)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return snapshot


def test_hub_url_single_file_found_in_local_hf_cache(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wan_engine.single_file import export_single_file

    file = export_single_file(
        WanTransformer3DModel.from_pretrained(tiny_models_dir / "tiny-wan2.1-t2v", subfolder="transformer"),
        tmp_path / "wan.safetensors",
    )
    snapshot = _fake_hf_cache(tmp_path, monkeypatch, "SomeOrg/wan-single", {"split/wan.safetensors": file})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    user = tmp_path / "presets"
    user.mkdir()
    model = {
        "name": "hub",
        "architecture": "t2v",
        "URLs": "https://huggingface.co/SomeOrg/wan-single/resolve/main/split/wan.safetensors",
        "base": str(tiny_models_dir / "tiny-wan2.1-t2v"),
    }
    (user / "hub.json").write_text(json.dumps({"model": model}))
    check = check_model(load_presets(BUILTIN_PRESETS_DIR, user).get("hub"), tmp_path / "empty")
    assert check.status == "present", check
    assert check.single_file == (snapshot / "split" / "wan.safetensors").resolve()


class _NoNetwork(BaseException):
    """Not an Exception: no `except Exception` in the code under test can swallow it."""


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, dict]]:
    """Record every huggingface_hub lookup (run for real, offline) and fail any socket connection."""
    calls: list[tuple[str, dict]] = []
    real_snapshot, real_file = huggingface_hub.snapshot_download, huggingface_hub.hf_hub_download

    def snapshot(*args, **kwargs):
        calls.append(("snapshot_download", kwargs))
        return real_snapshot(*args, **kwargs)

    def one_file(*args, **kwargs):
        calls.append(("hf_hub_download", kwargs))
        return real_file(*args, **kwargs)

    def connect(*_args, **_kwargs):
        raise _NoNetwork("a network connection was attempted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", one_file)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the code itself must ask for local files only
    return calls


def test_downloads_are_off_by_default(tmp_path: Path, hub_calls: list[tuple[str, dict]]) -> None:
    user = tmp_path / "presets"
    user.mkdir()
    for key, urls in {
        "repo": "SomeOrg/never-downloaded",
        "file": "https://huggingface.co/SomeOrg/never/resolve/main/wan.safetensors",
    }.items():
        model = {"name": key, "architecture": "t2v", "URLs": urls, "base": "SomeOrg/never-base"}
        (user / f"{key}.json").write_text(json.dumps({"model": model}))
    presets = load_presets(BUILTIN_PRESETS_DIR, user)
    orchestrator = WanOrchestrator(tmp_path / "models", presets)
    assert orchestrator.allow_download is False
    for key in ("repo", "file"):
        with pytest.raises(ModelUnavailableError, match="--allow-download") as info:
            orchestrator.load_model(key)
        assert "SomeOrg/never" in str(info.value)
    names = {name for name, _ in hub_calls}
    assert names == {"snapshot_download", "hf_hub_download"}
    assert all(kwargs.get("local_files_only") is True for _, kwargs in hub_calls), hub_calls


def test_allow_download_fetches_then_loads(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_calls: list[tuple[str, dict]]
) -> None:
    fetched: list[dict] = []
    real_snapshot = huggingface_hub.snapshot_download

    def hub(repo_id: str, **kwargs):
        if kwargs.get("local_files_only"):
            return real_snapshot(repo_id, **kwargs)
        fetched.append({"repo_id": repo_id, **kwargs})  # stands in for the Hub: the tiny model arrives in the cache
        _fake_hf_cache(tmp_path, monkeypatch, repo_id, {".": tiny_models_dir / "tiny-wan2.1-t2v"})
        return real_snapshot(repo_id, local_files_only=True)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    preset = _user_preset(tmp_path, "remote", "SomeOrg/remote-tiny")
    orchestrator = WanOrchestrator(tmp_path / "models", PresetRegistry({"remote": preset}), allow_download=True)
    orchestrator.load_model("remote")
    assert orchestrator.current_model == "remote"
    assert [f["repo_id"] for f in fetched] == ["SomeOrg/remote-tiny"]
    patterns = fetched[0]["allow_patterns"]
    assert "*.safetensors" in patterns and not any(p.endswith((".bin", ".pt", ".ckpt", ".pth")) for p in patterns)


def test_allow_download_flag_reaches_the_orchestrator(tmp_path: Path) -> None:
    from headless_model_management import HeadlessTaskQueue
    from worker.cli import build_parser
    from worker.config import WorkerSettings

    parser = build_parser()
    assert parser.parse_args(["run"]).allow_download is False
    assert parser.parse_args(["run", "--allow-download"]).allow_download is True
    assert parser.parse_args(["models", "--allow-download", "t2v"]).allow_download is True
    settings = WorkerSettings(db_url=f"sqlite:///{tmp_path / 'q.db'}", models_dir=tmp_path, allow_download=True)
    queue = HeadlessTaskQueue(settings=settings)
    try:
        queue._build_worker()
        assert queue._orchestrator is not None and queue._orchestrator.allow_download is True
    finally:
        queue.engine.dispose()
    assert WorkerSettings().allow_download is False
