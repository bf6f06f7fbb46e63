"""deploy/: the Dockerfile, compose file, systemd unit and env file say only what the worker accepts.

Nothing is built or started: each file is parsed, the `wan-worker` command lines it runs are given to
the real argument parser, every WAN_* variable it sets must be one the code reads, the paths the Dockerfile
copies must exist, and the stop settings (KillMode=mixed, exit 2 not restarted, a grace period longer than
a task, Postgres healthy before the workers) are checked. The health-check script and install-data.sh run
for real against stand-ins.
"""

from __future__ import annotations

import configparser
import http.server
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from worker.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HTTP_PORT = 8765
# Variables a recipe may set that are not the worker's: Python's own.
NON_WORKER_ENV = {"PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}


# ---- helpers -------------------------------------------------------------------------------------------


def code_env_names() -> set[str]:
    """Every WAN_* name that appears in the worker's and the engine's source."""
    files = [*ROOT.glob("worker/**/*.py"), *ROOT.glob("wan_engine/**/*.py"), *ROOT.glob("headless_*.py")]
    files.append(ROOT / "travel_between_images.py")
    names: set[str] = set()
    for path in files:
        names |= set(re.findall(r"\bWAN_[A-Z0-9_]+\b", path.read_text(encoding="utf-8")))
    # The CLI reads its variables through pydantic-settings: WAN_ + each field of EnvironmentSettings.
    from worker.config import ENV_PREFIX, EnvironmentSettings

    return names | {ENV_PREFIX + name.upper() for name in EnvironmentSettings.model_fields}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, `\\` continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: ends inside a continued line"
    return instructions


def env_pairs(arguments: str) -> dict[str, str]:
    """The KEY=value pairs of one Dockerfile ENV instruction."""
    pairs = {}
    for word in shlex.split(arguments):
        key, sep, value = word.partition("=")
        assert sep, f"ENV {arguments!r}: use the KEY=value form"
        pairs[key] = value
    return pairs


def assert_worker_command(argv: list[str], where: str) -> None:
    """`wan-worker ...` with arguments the real parser accepts."""
    assert Path(argv[0]).name == "wan-worker", f"{where}: runs {argv[0]!r}, not wan-worker"
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits 2 on an unknown flag or a bad value
        pytest.fail(f"{where}: wan-worker rejects {argv[1:]}: exit {exc.code}")


def assert_known_env(names: set[str], where: str) -> None:
    unknown = {name for name in names if name not in NON_WORKER_ENV} - code_env_names()
    assert not unknown, f"{where} sets variables the code never reads: {sorted(unknown)}"


def http_port(argv: list[str]) -> int:
    return int(argv[argv.index("--http") + 1].rsplit(":", 1)[1])


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- Dockerfile ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DEPLOY / "Dockerfile")


def test_dockerfile_copies_paths_that_exist(dockerfile: list[tuple[str, str]]) -> None:
    copies = [shlex.split(args) for keyword, args in dockerfile if keyword in ("COPY", "ADD")]
    assert copies
    for words in copies:
        sources = [word for word in words if not word.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    copied = {source.rstrip("/").split("/")[0] for words in copies for source in words[:-1]}
    # what `pip install .` needs: the metadata, its readme, every module and package pyproject.toml names
    for needed in (
        "pyproject.toml",
        "README.md",
        "worker",
        "wan_engine",
        "headless_model_management.py",
        "headless_wgp.py",
        "travel_between_images.py",
        "defaults",
        "loras",
    ):
        assert needed in copied, f"the Dockerfile does not copy {needed}"


def test_dockerfile_installs_and_places_the_data(dockerfile: list[tuple[str, str]]) -> None:
    runs = " ".join(args for keyword, args in dockerfile if keyword == "RUN")
    assert "pip install ." in runs
    assert "install-data.sh" in runs, "presets and LoRAs would be missing from a non-editable install"


def test_dockerfile_cmd_and_healthcheck(dockerfile: list[tuple[str, str]]) -> None:
    (cmd,) = [json.loads(args) for keyword, args in dockerfile if keyword == "CMD"]
    assert_worker_command(cmd, "Dockerfile CMD")
    assert http_port(cmd) == HTTP_PORT
    env = {k: v for keyword, args in dockerfile if keyword == "ENV" for k, v in env_pairs(args).items()}
    assert env["WAN_HTTP_TOKEN_FILE"] == "/run/secrets/wan_http_token", "--http on 0.0.0.0 needs a token"
    (expose,) = [args for keyword, args in dockerfile if keyword == "EXPOSE"]
    assert expose.split("/")[0] == str(HTTP_PORT)
    (health,) = [args for keyword, args in dockerfile if keyword == "HEALTHCHECK"]
    probe = json.loads(health[health.index("CMD") + len("CMD") :].strip())
    assert probe[1] == "/opt/wan-worker/healthcheck.py"
    assert probe[2] == f"http://127.0.0.1:{HTTP_PORT}/api/status"
    assert "--start-period" in health


def test_dockerfile_env_user_volumes_signal(dockerfile: list[tuple[str, str]]) -> None:
    env = {k: v for keyword, args in dockerfile if keyword == "ENV" for k, v in env_pairs(args).items()}
    assert_known_env(set(env), "Dockerfile ENV")
    assert env["WAN_MODELS_DIR"] == "/models" and env["WAN_OUTPUTS_DIR"] == "/outputs"
    assert env["WAN_PRESETS_DIR"] == "/presets" and env["WAN_DB_URL"] == "sqlite:////data/tasks.db"
    (volumes,) = [json.loads(args) for keyword, args in dockerfile if keyword == "VOLUME"]
    assert {"/models", "/outputs", "/loras", "/presets", "/data"} <= set(volumes)
    users = [args for keyword, args in dockerfile if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("STOPSIGNAL", "SIGTERM") in dockerfile
    assert dockerfile[0][0] in ("ARG", "FROM")


# ---- compose -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


def workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("command", [""])[0] == "wan-worker"}


def test_compose_postgres_has_a_volume_and_a_healthcheck(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_compose_workers(compose: dict[str, Any]) -> None:
    found = workers(compose)
    assert len(found) == 2
    gpus = []
    for name, service in found.items():
        assert_worker_command(service["command"], f"compose {name}")
        assert service["stop_grace_period"] == "10m"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["environment"]["WAN_DB_URL"].startswith("postgresql://")
        assert_known_env(set(service["environment"]), f"compose {name}")
        assert service["environment"]["WAN_HTTP_TOKEN_FILE"] == "/run/secrets/wan_http_token"
        assert "wan_http_token" in service["secrets"]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and len(device["device_ids"]) == 1
        gpus.append(device["device_ids"][0])
        targets = {re.sub(r":(ro|rw)$", "", volume).rsplit(":", 1)[1] for volume in service["volumes"]}
        assert {"/models", "/outputs"} <= targets
    assert len(set(gpus)) == len(gpus), "two workers on one GPU"
    assert compose["secrets"]["wan_http_token"]["file"]
    build = next(iter(found.values()))["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


# ---- systemd unit and its environment file --------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive in systemd
    parser.read(DEPLOY / "wan-worker.service", encoding="utf-8")
    return parser


def env_file_names(path: Path) -> set[str]:
    """Variables set in an EnvironmentFile, including commented-out `# KEY=value` examples."""
    names = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=", line.strip())
        if match:
            names.add(match.group(1))
    return names


def test_unit_stop_and_restart_rules(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["KillMode"] == "mixed"
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"] == "15min"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"].split() == ["2"]
    assert service["LimitNOFILE"] == "65536"
    assert service["EnvironmentFile"] == "/etc/wan-worker/env"
    assert service["User"] not in ("root", "0")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_exec_start(unit: configparser.ConfigParser) -> None:
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0] == "/opt/wan-worker/venv/bin/wan-worker"
    assert_worker_command(argv, "ExecStart")
    args = build_parser().parse_args(argv[1:])
    assert args.gpus == "all"


def test_env_example_names_only_what_the_code_reads() -> None:
    names = env_file_names(DEPLOY / "env.example")
    assert_known_env(names, "deploy/env.example")
    # the variables the unit relies on are all there
    assert {"WAN_DB_URL", "WAN_MODELS_DIR", "WAN_OUTPUTS_DIR", "WAN_HTTP_TOKEN_FILE"} <= names


# ---- the health check and install-data.sh, run for real ------------------------------------------------


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in for the live server's rule: with a token, every client (loopback too) must send it."""

    token = "s3cret"

    def do_GET(self) -> None:
        ok = self.path == "/api/status" and self.headers.get("Authorization") == f"Bearer {self.token}"
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"{}" if ok else b"token required\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture()
def status_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/status"
    server.shutdown()
    server.server_close()


def test_healthcheck_sends_the_token_file(status_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    health = load_module(DEPLOY / "healthcheck.py")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n", encoding="utf-8")
    monkeypatch.delenv("WAN_HTTP_TOKEN", raising=False)
    monkeypatch.setenv("WAN_HTTP_TOKEN_FILE", str(token_file))
    assert health.check(status_server) == 0
    token_file.write_text("wrong\n", encoding="utf-8")
    assert health.check(status_server) == 1
    monkeypatch.delenv("WAN_HTTP_TOKEN_FILE")
    monkeypatch.setenv("WAN_HTTP_TOKEN", "s3cret")
    assert health.check(status_server) == 0
    assert health.check(status_server.rsplit(":", 1)[0] + ":1/api/status") == 1  # nothing listening


def test_install_data_links_the_lora_folder_and_keeps_the_presets(tmp_path: Path) -> None:
    import wan_engine.presets

    # the names install-data.sh reads are the ones the worker uses
    assert wan_engine.presets.BUILTIN_PRESETS_DIR.is_dir()
    assert isinstance(wan_engine.presets.BUILTIN_LORAS_DIR, Path)

    site = tmp_path / "site-packages"  # a wheel install's layout, with a stand-in wan_engine.presets
    package = site / "wan_engine"
    (package / "_loras").mkdir(parents=True)
    (package / "_loras" / "README.md").write_text("LoRA files go here\n", encoding="utf-8")
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "presets.py").write_text(
        "from pathlib import Path\n"
        "BUILTIN_PRESETS_DIR = Path(__file__).parent / '_defaults'\n"
        "BUILTIN_LORAS_DIR = Path(__file__).parent / '_loras'\n",
        encoding="utf-8",
    )
    loras = tmp_path / "loras"
    env = {**os.environ, "PYTHONPATH": str(site)}
    command = ["sh", str(DEPLOY / "install-data.sh"), sys.executable, str(ROOT / "defaults"), str(loras)]
    for _ in range(2):  # the second run changes nothing
        subprocess.run(command, check=True, env=env, cwd=tmp_path, capture_output=True, timeout=60)
        assert sorted(p.name for p in (package / "_defaults").glob("*.json")) == sorted(
            p.name for p in (ROOT / "defaults").glob("*.json")
        )
        assert (package / "_loras").is_symlink() and (package / "_loras").resolve() == loras.resolve()

    # a folder that already holds LoRA files (an editable install's loras/) is left alone
    (package / "_loras").unlink()
    (package / "_loras").mkdir()
    (package / "_loras" / "style.safetensors").write_bytes(b"")
    subprocess.run(command, check=True, env=env, cwd=tmp_path, capture_output=True, timeout=60)
    assert not (package / "_loras").is_symlink() and (package / "_loras" / "style.safetensors").exists()
