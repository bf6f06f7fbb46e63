"""bench/worker_queue_bench.py's own logic, without a worker: phase lists and prerequisites, the worker
environment, the queued-task start predictions (the /api/status snapshot and its errors against the real
starts), and that one phase failing leaves the others' results and the summary in worker_queue.json.

The whole bench (real worker processes over the tiny models) is its CPU dry run:
python bench/worker_queue_bench.py --tiny --out /tmp/wq --work /tmp/wq_work
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "worker_queue_bench.py"


def _load() -> ModuleType:
    name = "worker_queue_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


wq = _load()


def test_phases_default_and_refusals() -> None:
    assert wq.parse_phases("plain,ours,ours_warm") == ["plain", "ours", "ours_warm"]
    assert wq.parse_phases(" ours , ours_warm_nooverlap ") == ["ours", "ours_warm_nooverlap"]
    with pytest.raises(ValueError, match="ours_hot"):
        wq.parse_phases("ours,ours_hot")
    with pytest.raises(ValueError, match="twice"):
        wq.parse_phases("ours,ours")
    with pytest.raises(ValueError):
        wq.parse_phases(" , ")


def test_worker_env_parsing_and_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert wq.parse_worker_env(["WAN_OVERLAP_DECODE=off", "X_1=a=b", "EMPTY="]) == {
        "WAN_OVERLAP_DECODE": "off",
        "X_1": "a=b",
        "EMPTY": "",
    }
    for bad in ("NOVALUE", "=x", "1A=x", "A-B=x"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            wq.parse_worker_env([bad])
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")  # would move the cache off the models dir
    monkeypatch.setenv("WAN_COMPILE_CACHE_DIR", "/elsewhere")
    phase = wq.WORKER_PHASES["ours_warm_nooverlap"]
    env = wq.worker_env(phase, {"WAN_OVERLAP_DECODE": "on", "OTHER": "1"})
    assert env["WAN_OVERLAP_DECODE"] == "off"  # the phase's own setting wins over --worker-env
    assert env["OTHER"] == "1"
    assert "TORCHINDUCTOR_CACHE_DIR" not in env and "WAN_COMPILE_CACHE_DIR" not in env
    assert wq.worker_env(wq.WORKER_PHASES["ours_warm"], {})["HF_HUB_OFFLINE"] == "1"
    assert "WAN_OVERLAP_DECODE" not in wq.worker_env(wq.WORKER_PHASES["ours_warm"], {})


def test_warm_phase_prerequisites(tmp_path: Path) -> None:
    assert wq.missing_prerequisites(["plain", "ours", "ours_warm", "ours_warm_nooverlap"], tmp_path, "full") == []
    problems = wq.missing_prerequisites(["plain", "ours_warm_nooverlap"], tmp_path, "full")
    assert len(problems) == 1 and "--phases ours,ours_warm_nooverlap" in problems[0]
    (tmp_path / "tasks.db").write_bytes(b"")
    (tmp_path / wq.STATE_FILE).write_text(json.dumps({"phase": "ours", "scale": "tiny", "complete": True}))
    assert "tiny" in wq.missing_prerequisites(["ours_warm"], tmp_path, "full")[0]
    assert wq.missing_prerequisites(["ours_warm"], tmp_path, "tiny") == []
    (tmp_path / "tasks.db").unlink()
    assert wq.missing_prerequisites(["ours_warm"], tmp_path, "tiny")


def test_free_prefix_keeps_ids_unique(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    assert wq.free_prefix(db, "w") == "w"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY)")
        conn.executemany("INSERT INTO tasks VALUES (?)", [("q00-a",), ("w00-a",), ("w00-a-seg000",)])
    assert wq.free_prefix(db, "q") == "qb"
    assert wq.free_prefix(db, "w") == "wb"
    assert wq.free_prefix(db, "n") == "n"
    assert wq.owned("w00-a-seg000", ["w00-a"]) and not wq.owned("wb00-a", ["w00-a"])


def test_snapshot_waits_for_a_known_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = ["q00-a", "q01-b", "q02-c"]
    queue = [{"id": "q01-b", "starts_in": 5.0, "done_in": 9.0}, {"id": "q02-c", "starts_in": 9.0, "done_in": 12.0}]
    answers = [
        # claimed (In Progress) but not yet the server's current task: the walk would start from an idle worker
        ({"now": 100.0, "current": None, "queue": queue}, {"q00-a": "In Progress"}),
        # current, but its ETA unknown yet: every start after it is unknown
        (
            {"now": 100.1, "current": {"task_id": "q00-a"}, "queue": [{**q, "starts_in": None} for q in queue]},
            {"q00-a": "In Progress"},
        ),
        ({"now": 100.2, "current": {"task_id": "q00-a"}, "queue": queue}, {"q00-a": "In Progress"}),
    ]
    calls: list[int] = []

    def status(_port: int) -> dict[str, Any]:
        calls.append(1)
        return answers[min(len(calls), len(answers)) - 1][0]

    monkeypatch.setattr(wq, "fetch_status", status)
    monkeypatch.setattr(wq, "row_statuses", lambda _db, _ids: answers[min(len(calls), len(answers)) - 1][1])
    monkeypatch.setattr(wq.time, "sleep", lambda _s: None)
    snap = wq.snapshot_queue(0, Path("unused"), ids, timeout=5)
    assert snap["complete"] is True and snap["now"] == 100.2 and snap["current"] == "q00-a" and snap["polls"] == 3
    assert snap["tasks"]["q02-c"] == {"starts_in": 9.0, "done_in": 12.0}


def test_start_prediction_errors() -> None:
    ours = {
        "ids": ["q00-a", "q01-b", "q02-c", "q03-d"],
        "inserted_at": 99.9,
        "queue_eta": {
            "now": 100.0,
            "current": "q00-a",
            "complete": True,
            "tasks": {
                "q01-b": {"starts_in": 8.0, "done_in": 15.0},
                "q02-c": {"starts_in": 15.0, "done_in": 20.0},
                "q03-d": {"starts_in": 0.2, "done_in": 30.0},
            },
        },
        "table": {"first_running": {"q03-d": 100.5}},
    }
    tasks = [
        {"id": "q00-a", "started_ts": 99.95, "completed_ts": 110.0},
        {"id": "q01-b", "started_ts": 110.0, "completed_ts": 120.0},
        {"id": "q02-c", "started_ts": 120.0, "completed_ts": 125.0},
        {"id": "q03-d", "started_ts": None, "completed_ts": 140.0},  # no event: the table's first In Progress
    ]
    result = wq.start_predictions(ours, tasks)
    rows = {r["id"]: r for r in result["tasks"]}
    assert rows["q00-a"]["note"] == "running at the snapshot" and rows["q00-a"].get("start_error_pct") is None
    assert rows["q01-b"]["actual_start_in_s"] == 10.0 and rows["q01-b"]["start_error_pct"] == -20.0
    assert rows["q02-c"]["start_error_pct"] == -25.0 and rows["q02-c"]["done_error_pct"] == -20.0
    assert rows["q03-d"]["start_error_s"] == -0.3 and rows["q03-d"]["start_error_pct"] is None  # under 1 s
    assert result["start"] == {"n": 2, "median_abs_pct": 22.5, "worst_pct": -25.0}
    assert result["within_25pct"] is True
    assert result["snapshot_after_insert_s"] == 0.1


def test_one_failing_phase_keeps_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wq, "build_assets", lambda _work, _scale: {"images": []})
    seen: list[tuple[str, dict[str, str]]] = []

    def run_worker(_work: Path, _out: Path, scale: Any, _images: Any, _until: float, phase: Any, env: Any) -> Any:
        seen.append((phase.name, env))
        if phase.name == "ours":
            raise RuntimeError("the worker would not start")
        ids = wq.task_ids(scale, phase.prefix)
        return {"ids": ids, "keys": {}, "rows": [], "events": [], "complete": True, "queue_eta": {"now": None}}

    monkeypatch.setattr(wq, "run_worker", run_worker)
    monkeypatch.setattr(wq, "run_plain", lambda *_a: {"tasks": [], "complete": True, "gpu_samples": []})
    out = tmp_path / "out"
    args = ["--tiny", "--out", str(out), "--work", str(tmp_path / "work"), "--phases", "ours,ours_warm,plain"]
    code = wq.main([*args, "--worker-env", "WAN_OVERLAP_DECODE=off"])
    assert code == 0
    assert seen == [("ours", {"WAN_OVERLAP_DECODE": "off"}), ("ours_warm", {"WAN_OVERLAP_DECODE": "off"})]
    results = json.loads((out / "worker_queue.json").read_text())
    assert "the worker would not start" in results["ours"]["error"]
    assert results["ours_warm"]["complete"] is True and results["plain"]["complete"] is True
    assert results["summary"]["ours_warm_complete"] is True and "ours_wall_s" not in results["summary"]
    assert "ours_warm" in (out / "summary.md").read_text()


def test_warm_phase_alone_fails_before_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*_a: Any) -> Any:
        raise AssertionError("assets built for a run that cannot run")

    monkeypatch.setattr(wq, "build_assets", no_build)
    out = tmp_path / "out"
    assert wq.main(["--tiny", "--out", str(out), "--work", str(tmp_path / "w"), "--phases", "ours_warm"]) == 2
    assert "--phases ours,ours_warm" in json.loads((out / "worker_queue.json").read_text())["error"]
