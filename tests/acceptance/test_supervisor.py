"""`wan-worker run --gpus`: one real worker process per GPU under a supervisor, on a SQLite file.

There is no GPU here: CUDA_VISIBLE_DEVICES has no effect, so both children run the tiny models on the
CPU, but everything the supervisor does (children, worker ids, restarts, signal forwarding, reaping) is
real. The restart loop is also driven with throw-away Python children, and the pure parts directly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

from tests.support.processes import Stack, wan_worker_command
from wan_engine.vram import nvml_index
from worker.processes.supervisor import (
    Child,
    RestartPolicy,
    Supervisor,
    build_children,
    child_argv,
    child_env,
    count_gpus,
    parse_gpus,
)

pytestmark = pytest.mark.acceptance

NAME = "multi"
GPU_IDS = (f"{NAME}-gpu0", f"{NAME}-gpu1")
LEASE_S = 8.0  # short: a task held by the killed child is re-queued within the test
# Enough tiny denoising work that a task is still running while the test signals (aborted long before the end).
SLOW = {"num_inference_steps": 300, "resolution": "128x96", "video_length": 33}


def tiny(prompt: str, **params: object) -> dict[str, object]:
    return {
        "model": "tiny_t2v",
        "prompt": prompt,
        "resolution": "32x32",
        "video_length": 5,
        "num_inference_steps": 2,
        **params,
    }


def worker_pids(stack: Stack) -> dict[str, int]:
    """worker id -> pid of the live (not stopped) rows of the workers table."""
    with stack.engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT id, pid, status FROM workers")).all()
    return {row.id: int(row.pid) for row in rows if row.status != "stopped"}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_one_worker_per_gpu_restarts_a_killed_child_and_stops_on_two_signals(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    supervisor = stack.start_worker("--gpus", "0,1", name=NAME, lease_s=LEASE_S)
    assert supervisor.process is not None
    stack.wait_for(lambda: set(GPU_IDS) <= set(worker_pids(stack)), 90, "both GPU workers registered")
    pids = worker_pids(stack)
    for gpu, worker_id in enumerate(GPU_IDS):
        child = psutil.Process(pids[worker_id])
        assert child.ppid() == supervisor.process.pid, f"{worker_id} is not a child of the supervisor"
        assert child.environ().get("CUDA_VISIBLE_DEVICES") == str(gpu)
        assert "--gpus" not in child.cmdline()
    seen_pids = set(pids.values())

    # A crash while the queue is busy (kill -9, not a signal the supervisor sent): the child is restarted
    # under the same id with a new pid, the other keeps serving, and a task the dead one held is
    # re-queued once its lease expires.
    batch = [stack.insert("t2v", tiny(f"cat {i}")) for i in range(6)]
    stack.wait_for(lambda: any(stack.row(t)["status"] == "Complete" for t in batch), 90, "a first task complete")
    killed = pids[GPU_IDS[0]]
    os.kill(killed, signal.SIGKILL)
    stack.wait_for(
        lambda: worker_pids(stack).get(GPU_IDS[0], killed) != killed, 90, "the killed worker restarted (new pid)"
    )
    restarted = worker_pids(stack)[GPU_IDS[0]]
    assert psutil.Process(restarted).ppid() == supervisor.process.pid
    seen_pids.add(restarted)
    for task_id in batch:
        row = stack.wait_status(task_id, ("Complete", "Failed"), timeout=90)
        assert row["status"] == "Complete", row["error_message"]
        assert row["worker_id"] in GPU_IDS
    log = supervisor.log_text()
    assert "was killed by SIGKILL" in log and "restarting worker on GPU 0" in log

    # First SIGTERM: forwarded once, so the busy child keeps its task and the idle one exits.
    slow = stack.insert("t2v", tiny("long", **SLOW))
    stack.wait_for(lambda: (stack.row(slow)["progress"] or {}).get("stage") == "denoising", 90, "slow task denoising")
    busy = worker_pids(stack)[stack.row(slow)["worker_id"]]
    idle = next(pid for pid in worker_pids(stack).values() if pid != busy)
    supervisor.signal(signal.SIGTERM)
    stack.wait_for(lambda: gone(idle), 60, "the idle worker exiting after the first SIGTERM")
    assert supervisor.log_text().count("stopping after the current task (send again to abort it)") == 2
    assert stack.row(slow)["status"] == "In Progress" and not gone(busy)
    assert supervisor.process.poll() is None, "the supervisor waits for the busy worker"

    # Second SIGTERM: forwarded again, the task is abandoned and re-queued; everything exits 0.
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait_exit(60) == 0, supervisor.log_text()[-3000:]
    row = stack.row(slow)
    assert row["status"] == "Queued" and row["attempts"] == 0 and row["worker_id"] is None
    assert "aborting the current task" in supervisor.log_text()
    orphans = [pid for pid in seen_pids if not gone(pid)]
    assert not orphans, f"child processes left running: {orphans}"
    assert worker_pids(stack) == {}, "every worker recorded itself as stopped"


def test_gpus_all_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    if count_gpus():
        pytest.skip("this machine has a GPU")
    db = f"sqlite:///{tmp_path / 'tasks.db'}"
    result = subprocess.run(
        [*wan_worker_command(), "run", "--db", db, "--gpus", "all"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--gpus all: no GPU found" in result.stderr


# ---- the restart loop with throw-away children ----------------------------------------------------------

# On each start: exits with the next code of argv[1] (comma-separated; -N: killed by signal N), counting
# starts in the file argv[2].
CHILD = """
import os, sys
from pathlib import Path
codes, counter = sys.argv[1].split(","), Path(sys.argv[2])
runs = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(runs + 1))
code = int(codes[min(runs, len(codes) - 1)])
if code < 0:
    os.kill(os.getpid(), -code)
sys.exit(code)
"""
FAST = RestartPolicy(base_delay_s=0.05, max_delay_s=0.2, max_per_minute=100)


def scripted(tmp_path: Path, codes: str) -> tuple[Supervisor, Path]:
    counter = tmp_path / "starts"
    child = Child(gpu=0, worker_id="w-gpu0", argv=[codes, str(counter)], env=dict(os.environ))
    return Supervisor([child], command=[sys.executable, "-c", CHILD], policy=FAST), counter


def test_crashes_are_restarted_until_a_clean_exit(tmp_path: Path) -> None:
    supervisor, counter = scripted(tmp_path, "1,-9,3,0")
    assert supervisor.run() == 0
    assert counter.read_text() == "4"  # three crashes, three restarts, then exit 0 is not restarted


def test_a_configuration_error_is_not_restarted(tmp_path: Path) -> None:
    supervisor, counter = scripted(tmp_path, "2,0")  # a wrong restart would end (exit 0), not loop
    assert supervisor.run() == 2
    assert counter.read_text() == "1"


# ---- pure parts --------------------------------------------------------------------------------------------


def test_restart_back_off_doubles_caps_and_respects_the_per_minute_limit() -> None:
    policy = RestartPolicy(base_delay_s=1, max_delay_s=8, max_per_minute=3, window_s=60)
    delays = [policy.decide(n, [], now=100).delay_s for n in (1, 2, 3, 4, 5, 9)]
    assert delays == [1, 2, 4, 8, 8, 8]
    # Three restarts in the last minute: the fourth waits until the oldest leaves the window.
    limited = policy.decide(1, [50.0, 70.0, 90.0], now=100)
    assert limited.limited and limited.delay_s == pytest.approx(10.0)
    # Restarts older than the window do not count.
    assert policy.decide(1, [10.0, 20.0, 30.0], now=100) == policy.decide(1, [], now=100)
    assert not policy.decide(2, [70.0, 90.0], now=100).limited


def test_parse_gpus() -> None:
    assert parse_gpus("0,1", gpu_count=0) == (0, 1)  # no GPU: each index still gets a CPU worker
    assert parse_gpus(" 1, 3 ", gpu_count=4) == (1, 3)
    assert parse_gpus("all", gpu_count=3) == (0, 1, 2)
    assert parse_gpus("ALL", gpu_count=8, visible_devices="2,5") == (2, 5)
    for value, count, message in [
        ("all", 0, "no GPU found"),
        ("0,0", 2, "listed twice"),
        ("0,x", 2, "expected GPU indices"),
        ("", 2, "expected GPU indices"),
        ("0,2", 2, "GPU 2 not found"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_gpus(value, gpu_count=count)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES is empty"):
        parse_gpus("all", gpu_count=2, visible_devices="")


def test_child_command_line_and_environment() -> None:
    argv = ["--log-level", "DEBUG", "run", "--db", "sqlite:///t.db", "--gpus", "0,1", "--worker-id", "box"]
    assert child_argv(argv, "box-gpu1") == [
        "--log-level",
        "DEBUG",
        "run",
        "--db",
        "sqlite:///t.db",
        "--worker-id",
        "box",
        "--worker-id",
        "box-gpu1",  # argparse keeps the last value
    ]
    assert child_argv(["run", "--gpus=all", "--gpu", "1"], "x") == ["run", "--worker-id", "x"]  # = and prefixes
    environ = {"WAN_GPUS": "all", "PATH": "/bin"}
    env = child_env(environ, 3, children=2, gpus_found=True, ram_bytes=64 * 2**30)
    assert "WAN_GPUS" not in env and env["CUDA_VISIBLE_DEVICES"] == "3" and env["PATH"] == "/bin"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["WAN_PINNED_CACHE_GB"] == "16.00"  # half the RAM, shared by the two children
    assert "WAN_PINNED_CACHE_GB" not in child_env(environ, 0, children=2, gpus_found=False, ram_bytes=64 * 2**30)
    children = build_children([0, 1], ["run"], "box", {}, gpus_found=True, http=("127.0.0.1", 8765))
    assert [c.worker_id for c in children] == ["box-gpu0", "box-gpu1"]
    assert [c.argv[-1] for c in children] == ["127.0.0.1:8765", "127.0.0.1:8766"]  # one --http port per child


def test_nvml_index_follows_the_visible_gpu() -> None:
    # NVML ignores CUDA_VISIBLE_DEVICES: a `--gpus` child must read its own GPU's memory, not GPU 0's.
    assert nvml_index({"CUDA_VISIBLE_DEVICES": "3"}) == 3
    assert nvml_index({"CUDA_VISIBLE_DEVICES": "2,5"}) == 2
    assert nvml_index({}) == 0 and nvml_index({"CUDA_VISIBLE_DEVICES": "GPU-1a2b"}) == 0
