"""Acceptance: a built wheel, installed into a fresh venv, carries its presets and LoRA folder (issue 17).

The wheel is built offline from a copy of the checkout, installed with `--no-deps` into a venv that
sees this interpreter's site-packages (torch, diffusers), and its `wan-worker` is run from a folder
outside the repository, so nothing of the checkout (`defaults/`, `loras/`, the editable install's
finder) can stand in for what the wheel ships. `.ci/run` relies on this test for the wheel check:
under CI=true a wheel that cannot be built is a failure, elsewhere a skip with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support.db import IN_CI

pytestmark = pytest.mark.acceptance

REPO_ROOT = Path(__file__).resolve().parents[2]
# Build outputs, caches and run products of a checkout: not part of the source a wheel is built from.
_NOT_SOURCE = (".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", ".pytest_cache", ".ruff_cache")
_RUN_PRODUCTS = ("demo_run", "outputs", "models", "tasks.db*", ".whl")
# The installed worker's data packages (pyproject.toml's package-dir): no folder of the checkout holds them.
_DATA_PACKAGES = {"wan_engine._defaults", "wan_engine._loras"}


def _clean_env() -> dict[str, str]:
    """This environment less what could point the installed worker back at the checkout."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("WAN_")}


def _run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


def _venv_bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if sys.platform == "win32" else "bin") / name


def test_pyproject_lists_every_package() -> None:
    """The packages are listed in pyproject.toml (the data packages need it): none may be left out."""
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_packages

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set(find_packages(str(REPO_ROOT), include=["worker*", "wan_engine*"]))
    assert found - listed == set(), "packages missing from [tool.setuptools] packages in pyproject.toml"
    assert listed - found == _DATA_PACKAGES
    assert config["package-dir"] == {"wan_engine._defaults": "defaults", "wan_engine._loras": "loras"}


def _build_wheel(tmp_path: Path) -> Path:
    """Build the wheel offline from a copy of the checkout (no build/ left in it); skip if that cannot be done."""
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE, *_RUN_PRODUCTS))
    wheels = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    built = _run([*command, "--quiet", "-w", str(wheels), str(source)], cwd=tmp_path)
    found = sorted(wheels.glob("wan_worker-*.whl"))
    if built.returncode != 0 or len(found) != 1:
        reason = f"`pip wheel` cannot build the wheel offline (rc {built.returncode}): {built.stderr[-2000:]}"
        if IN_CI:
            pytest.fail(f"CI=true requires the wheel check: {reason}")
        pytest.skip(reason)
    return found[0]


def _install_in_venv(wheel: Path, venv: Path) -> Path:
    """A venv that sees this interpreter's packages, with the wheel installed into its own site-packages."""
    venv_command = [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)]
    created = _run(venv_command, cwd=venv.parent)
    assert created.returncode == 0, created.stderr
    python = _venv_bin(venv, "python")
    # The outer pip, run by the venv's interpreter (system site-packages), installs into the venv.
    pip = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", "--no-index"]
    installed = _run([*pip, str(wheel)], cwd=venv.parent)
    assert installed.returncode == 0, installed.stderr
    return python


@pytest.mark.slow
def test_wheel_install_has_presets_and_runs_the_demo(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    python = _install_in_venv(wheel, venv)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    # The venv imports the wheel's copy, not the editable checkout that --system-site-packages also sees.
    probe = (
        "import json, headless_wgp, wan_engine, worker; from wan_engine import presets; "
        "print(json.dumps({'wan_engine': wan_engine.__file__, 'worker': worker.__file__, "
        "'headless_wgp': headless_wgp.__file__, 'presets': str(presets.BUILTIN_PRESETS_DIR), "
        "'loras': str(headless_wgp.BUILTIN_LORAS_DIR)}))"
    )
    located = _run([str(python), "-c", probe], cwd=outside)
    assert located.returncode == 0, located.stderr
    paths = {name: Path(value).resolve() for name, value in json.loads(located.stdout).items()}
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})).resolve()
    for name, path in paths.items():
        assert path.is_relative_to(site_packages), f"{name} comes from {path}, not the venv's {site_packages}"
    assert paths["presets"] == site_packages / "wan_engine" / "_defaults"
    assert (paths["presets"] / "tiny_t2v.json").is_file()
    assert paths["loras"] == site_packages / "wan_engine" / "_loras"
    assert (paths["loras"] / "README.md").is_file()

    wan_worker = str(_venv_bin(venv, "wan-worker"))
    models = _run([wan_worker, "models"], cwd=outside, timeout=120)
    assert models.returncode == 0, models.stderr
    assert "tiny_t2v" in models.stdout and "t2v_2_2" in models.stdout

    demo = _run([wan_worker, "demo", "--dir", str(outside / "demo_run")], cwd=outside, timeout=600)
    assert demo.returncode == 0, f"{demo.stdout[-3000:]}\n{demo.stderr[-3000:]}"
    assert "tiny_t2v" in demo.stdout

    # With no presets at all, `models` is an error naming the folder it looked in, not an empty table.
    shutil.rmtree(paths["presets"])
    empty = _run([wan_worker, "models"], cwd=outside, timeout=120)
    assert empty.returncode == 2, empty.stdout + empty.stderr
    assert "no model presets" in empty.stderr and str(paths["presets"]) in empty.stderr
