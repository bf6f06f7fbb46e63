"""Security rules, enforced in code: shell-free subprocesses, safetensors only, downloads only when allowed
and only from allowed hosts, database passwords never logged.

Input roots, output names, LoRA names and shell metacharacters in file names are exercised by the real
worker in test_bad_input.py; this module scans the source and runs the worker with a password in its URL.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
import uuid
from pathlib import Path

import huggingface_hub
import pytest
import sqlalchemy as sa

from tests.reliability.figures import Figures
from tests.reliability.harness import (
    insert_many,
    read_rows,
    start_worker,
    terminate_backends,
    wait_all_final,
    with_query,
)
from tests.support.processes import Stack, wan_worker_command
from wan_engine.errors import ModelUnavailableError
from wan_engine.model_sources import DOWNLOAD_HOSTS_ENV, check_download_host, parse_source, resolve_model
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCES = [
    *sorted((REPO_ROOT / "worker").rglob("*.py")),
    *sorted((REPO_ROOT / "wan_engine").rglob("*.py")),
    *sorted((REPO_ROOT / "bench").rglob("*.py")),
    *(REPO_ROOT / name for name in ("headless_model_management.py", "headless_wgp.py", "travel_between_images.py")),
]
SHELL_CALLS = {
    "os.system",
    "os.popen",
    "os.spawnl",
    "os.spawnlp",
    "os.spawnv",
    "os.spawnvp",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell",
    "pty.spawn",
}
SUBPROCESS_CALLS = {f"subprocess.{name}" for name in ("run", "call", "check_call", "check_output", "Popen")}
PICKLE_CALLS = {"torch.load", "pickle.load", "pickle.loads", "dill.load", "joblib.load", "torch.jit.load"}
UNSAFE_KEYWORDS = {("use_safetensors", False), ("weights_only", False), ("allow_pickle", True), ("shell", True)}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_text(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    return isinstance(node, ast.BinOp) and (_is_text(node.left) or _is_text(node.right))


def violations(source: str, filename: str) -> list[str]:
    """Shell invocations, string commands, pickle loads and unsafe flags in one Python source."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno} {name or '<call>'}"
        if name in SHELL_CALLS:
            found.append(f"{where}: runs a shell")
        if name in SUBPROCESS_CALLS and node.args and _is_text(node.args[0]):
            found.append(f"{where}: command given as a string, not an argument list")
        if name in PICKLE_CALLS:
            found.append(f"{where}: loads a pickle")
        for keyword in node.keywords:
            value = keyword.value
            if isinstance(value, ast.Constant) and (keyword.arg, value.value) in UNSAFE_KEYWORDS:
                found.append(f"{where}: {keyword.arg}={value.value!r}")
            elif keyword.arg == "shell" and not isinstance(value, ast.Constant):
                found.append(f"{where}: shell= set from a variable")
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = """
import os, subprocess, torch
os.system("ffmpeg -i a.mp4 b.mp4")
subprocess.run(f"ffmpeg -i {path}", shell=True)
subprocess.Popen("ffmpeg " + args)
torch.load("weights.pt")
from_pretrained(path, use_safetensors=False)
"""
    found = violations(bad, "bad.py")
    assert len(found) == 6, found
    assert not violations('subprocess.run(["ffmpeg", "-i", path], check=True)\nload_file(p)\n', "good.py")


def test_no_shell_and_no_pickle_in_the_project_sources() -> None:
    assert len(SOURCES) > 20, "the scan found too few files"
    found = [v for path in SOURCES for v in violations(path.read_text(), str(path.relative_to(REPO_ROOT)))]
    assert not found, "\n".join(found)


def test_lora_and_weight_loading_is_safetensors_only() -> None:
    from wan_engine import loras, model_checks

    assert loras.LORA_SUFFIX == ".safetensors"
    assert {".bin", ".pt", ".pth", ".ckpt", ".pkl"} <= set(loras.REFUSED_SUFFIXES)
    assert parse_source("SomeOrg/x/model.ckpt").kind == "refused"
    assert {".bin", ".pt", ".pth", ".ckpt"} <= set(model_checks.PICKLE_SUFFIXES)


# ---- downloads: off unless allowed, and then only from allowed hosts ------------------------------------


@pytest.fixture
def remote_preset(tmp_path: Path) -> PresetRegistry:
    user = tmp_path / "presets"
    user.mkdir()
    (user / "remote.json").write_text(
        '{"model": {"name": "remote", "architecture": "t2v", "URLs": "SomeOrg/remote-only"}}'
    )
    return load_presets(BUILTIN_PRESETS_DIR, user)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict]:
    """Record hub calls; anything that is not a local-files-only lookup is refused here (no network)."""
    calls: list[dict] = []

    def fake(*args: object, **kwargs: object) -> str:
        calls.append({"args": args, **kwargs})
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in this test's cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(DOWNLOAD_HOSTS_ENV, raising=False)
    return calls


def test_nothing_is_fetched_without_allow_download(
    remote_preset: PresetRegistry, hub: list[dict], tmp_path: Path
) -> None:
    with pytest.raises(ModelUnavailableError, match="--allow-download"):
        resolve_model(remote_preset.get("remote"), tmp_path / "models", allow_download=False)
    assert hub and all(call.get("local_files_only") is True for call in hub), hub


def test_downloads_only_from_allowed_hosts(
    remote_preset: PresetRegistry, hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_download_host("https://huggingface.co")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://evil.example.com")
    with pytest.raises(ModelUnavailableError, match=r"evil\.example\.com.*not in the download allow-list"):
        resolve_model(remote_preset.get("remote"), tmp_path / "models", allow_download=True)
    assert all(call.get("local_files_only") is True for call in hub), "a download was attempted from a refused host"

    monkeypatch.setenv(DOWNLOAD_HOSTS_ENV, "mirror.example.org, evil.example.com")
    hub.clear()
    with pytest.raises(ModelUnavailableError, match="downloading SomeOrg/remote-only failed"):
        resolve_model(remote_preset.get("remote"), tmp_path / "models", allow_download=True)
    assert any(call.get("local_files_only") is False for call in hub), "an allowed host was not tried"


def test_urls_other_than_the_hub_are_refused() -> None:
    for url in ("https://evil.example.com/wan.safetensors", "ftp://huggingface.co/x", "file:///etc/passwd"):
        source = parse_source(url)
        assert source.kind == "refused" and "only Hugging Face URLs" in source.reason, url


# ---- database passwords never logged ----------------------------------------------------------------------


def _with_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user.split(':', 1)[0]}:{password}@{host}"


def _cli(*args: str) -> str:
    done = subprocess.run(
        [*wan_worker_command(), *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False
    )
    return done.stdout + done.stderr


@pytest.mark.acceptance
@pytest.mark.postgres
def test_database_password_never_appears_in_output(postgres_stack: Stack, figures: Figures) -> None:
    stack = postgres_stack
    password = f"pw-{uuid.uuid4().hex}"
    app = f"wanrel_pw_{uuid.uuid4().hex[:8]}"
    url = with_query(_with_password(stack.db_url, password), application_name=app)
    unreachable = _with_password("postgresql://postgres@127.0.0.1:1/test", password)  # start-up errors too
    outputs = {
        "init-db": _cli("init-db", "--db", url),
        "list": _cli("list", "--db", url),
        "unreachable": _cli("list", "--db", unreachable),
        # A few seconds of the start-up wait: its retry warnings and final error name the database too.
        "run unreachable": _cli(
            "run", "--db", unreachable, "--models-dir", str(stack.models_dir), "--db-wait-seconds", "3"
        ),
    }
    slow = {"model": "tiny_t2v", "prompt": "slow", "resolution": "64x48", "video_length": 9}
    ids = insert_many(
        stack,
        [
            {"task_type": "t2v", "params": {**slow, "num_inference_steps": 80}},
            {"task_type": "t2v", "params": {**slow, "model": "no_such_model"}},
        ],
    )
    worker = start_worker(stack, "pw-worker", lease_s=10, db_url=url, global_args=["--log-level", "DEBUG"])
    stack.wait_for(lambda: read_rows(stack, ids[:1])[ids[0]]["status"] == "In Progress", 120, "the slow task")
    terminated = 0
    for _ in range(3):  # database errors get logged too
        terminated += terminate_backends(stack.engine, app)
        time.sleep(1.0)
    wait_all_final(stack, ids, timeout=300)
    worker.stop()
    outputs["worker log"] = worker.log_text()
    with stack.engine.begin() as conn:
        stored = str(conn.execute(sa.text("SELECT * FROM tasks")).all()) + str(
            conn.execute(sa.text("SELECT * FROM workers")).all()
        )

    leaks = [name for name, text in outputs.items() if password in text]
    assert not leaks, f"the password appears in: {leaks}"
    assert password not in stored
    assert "postgres:***@" in outputs["worker log"], "the worker should log its (redacted) database URL"
    assert "database ready: postgresql" in outputs["init-db"] and "***" in outputs["init-db"]
    assert "Connection refused" in outputs["unreachable"] or "connection" in outputs["unreachable"].lower()
    assert terminated > 0 and len(outputs["worker log"].splitlines()) > 20, "the worker log is too short to tell"
    figures.record(
        "security[postgres]",
        outputs_checked=len(outputs),
        worker_log_lines=len(outputs["worker log"].splitlines()),
        backends_terminated=terminated,
        password_leaks=len(leaks),
    )


if __name__ == "__main__":  # scan by hand: python -m tests.reliability.test_security
    problems = [v for path in SOURCES for v in violations(path.read_text(), str(path))]
    print("\n".join(problems) or "clean")
    sys.exit(1 if problems else 0)
