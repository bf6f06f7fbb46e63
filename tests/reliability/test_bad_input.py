"""Bad input battery: rows written by other programs that cannot run, all in one real worker's queue.

More than fifty distinct bad rows (malformed or non-object JSON, wrong types, unknown keys, models and task
types, out-of-range sizes, path traversal, symlinks out of the input roots, files that are not what they
claim, LoRA names with paths or pickle suffixes, oversized text, NUL bytes, missing and cyclic dependencies,
out-of-range priorities) are queued together with good rows: a text-to-video task after them, a VACE task
whose guide (inside the input root) has shell metacharacters in its name, an image-to-video task, and
good tasks whose ids are hostile file names. One `wan-worker run` process works through all of it.

Each bad row must end `Failed` with a message naming what is wrong, without retries; the worker must never
crash or log a traceback; every good row must complete, with its output named by the worker directly in
the outputs dir, and nothing may be written anywhere else.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.reliability.figures import Figures
from tests.reliability.harness import all_files, insert_many, read_rows, start_worker, wait_all_final
from tests.support.processes import Stack, WorkerProcess, build_stack
from wan_engine.video_io import read_video_info, write_video
from worker.tasks.params import MAX_PARAMS_BYTES, MAX_PROMPT_CHARS

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

T2V = {"model": "tiny_t2v", "prompt": "a cat", "resolution": "64x48", "video_length": 9, "num_inference_steps": 2}
VACE = {**T2V, "model": "tiny_vace"}
I2V = {**T2V, "model": "tiny_i2v"}
SHELL_NAME = "guide;touch PWNED&&$(touch PWNED2)`touch PWNED3`.mp4"
ABS_ESCAPE = f"/tmp/wan-escape-{uuid.uuid4().hex[:8]}"
HOSTILE_IDS = ["../../escape-up", ABS_ESCAPE, "a/b/c", ".hidden" + "x" * 300, "$(touch PWNED4) with space"]
CYCLE = {name: f"cycle-{name}-{uuid.uuid4().hex[:6]}" for name in ("self", "a", "b", "c", "d", "e")}


@dataclass(frozen=True)
class Case:
    """One bad row and the words its error_message must contain."""

    name: str
    params: dict[str, Any] | str
    expected: tuple[str, ...]
    task_type: str = "t2v"
    columns: dict[str, Any] = field(default_factory=dict)
    claimed: bool = True  # False: failed by the sweep without being claimed (attempts stay 0)


def dependency(name: str, on: str, *expected: str, task: str | None = None) -> Case:
    """A row whose dependant_on names `on` (a CYCLE key, or a literal id); with `task`, its own id is CYCLE[task]."""
    columns = {"dependant_on": CYCLE.get(on, on)}
    if task is not None:
        columns["id"] = CYCLE[task]
    return Case(name, T2V, expected, columns=columns, claimed=False)


def cases(inputs: Path, outside: Path) -> list[Case]:
    outside_mp4 = str(outside / "outside.mp4")
    refs_out = ["../outside/i.png"]
    return [
        # ---- the params text itself
        Case("malformed-json", '{"model": "tiny_t2v", "prompt": ', ("not valid JSON",)),
        Case("params-array", '["tiny_t2v", "a cat"]', ("must be a JSON object, got list",)),
        Case("params-string", '"a cat"', ("must be a JSON object, got str",)),
        Case("params-null", "null", ("must be a JSON object, got NoneType",)),
        Case("params-number", "42", ("must be a JSON object, got int",)),
        Case("params-empty", "{}", ("missing required key 'prompt'",)),
        Case("params-oversized", {**T2V, "negative_prompt": "y" * (MAX_PARAMS_BYTES + 10)}, ("at most 262144 bytes",)),
        # ---- wrong types, unknown keys / models / task types
        Case("prompt-not-text", {**T2V, "prompt": 5}, ("prompt = 5",)),
        Case("frames-not-int", {**T2V, "video_length": "long"}, ("video_length = 'long'",)),
        Case("seed-float", {**T2V, "seed": 1.5}, ("seed = 1.5",)),
        Case("steps-bool", {**T2V, "num_inference_steps": True}, ("num_inference_steps = True",)),
        Case("lora-names-not-list", {**T2V, "lora_names": "style"}, ("lora_names = 'style'",)),
        Case("unknown-key", {**T2V, "colour": "red"}, ("unknown key 'colour'",)),
        Case("output-path-key", {**T2V, "output_path": "/tmp/mine.mp4"}, ("unknown key 'output_path'",)),
        Case("unknown-model", {**T2V, "model": "no_such_model"}, ("no_such_model",)),
        Case("unknown-task-type", T2V, ("unknown task_type 'teleport'",), task_type="teleport"),
        Case("wrong-architecture", {**T2V, "model": "tiny_vace"}, ("is a vace model", "t2v tasks need")),
        # ---- out-of-range sizes
        Case("frames-negative", {**T2V, "video_length": -3}, ("video_length = -3",)),
        Case("frames-huge", {**T2V, "video_length": 100_000}, ("video_length = 100000",)),
        Case("steps-zero", {**T2V, "num_inference_steps": 0}, ("num_inference_steps = 0",)),
        Case("steps-negative", {**T2V, "num_inference_steps": -5}, ("num_inference_steps = -5",)),
        Case("steps-huge", {**T2V, "num_inference_steps": 10**6}, ("num_inference_steps = 1000000",)),
        Case("steps-repeat-timesteps", {**T2V, "num_inference_steps": 900}, ("num_inference_steps=900", "repeats")),
        Case("resolution-not-16", {**T2V, "resolution": "100x100"}, ("resolution = '100x100'", "multiples of 16")),
        Case("resolution-huge", {**T2V, "resolution": "16384x16384"}, ("resolution = '16384x16384'",)),
        Case("resolution-negative", {**T2V, "resolution": "-64x48"}, ("resolution = '-64x48'",)),
        Case("guidance-negative", {**T2V, "guidance_scale": -1}, ("guidance_scale = -1",)),
        Case("fps-zero", {**T2V, "fps": 0}, ("fps = 0",)),
        # ---- oversized text, NUL bytes
        Case("prompt-oversized", {**T2V, "prompt": "a" * (MAX_PROMPT_CHARS + 1)}, (f"at most {MAX_PROMPT_CHARS}",)),
        Case("prompt-nul", {**T2V, "prompt": "a\x00b"}, ("must not contain NUL bytes",)),
        Case("guide-nul", {**VACE, "video_guide": "guide\x00.mp4"}, ("video_guide", "non-empty file path"), "vace"),
        # ---- input files: missing, outside the roots, not what they claim
        Case("vace-no-guide", VACE, ("missing required key 'video_guide'",), "vace"),
        Case("guide-missing", {**VACE, "video_guide": "nope.mp4"}, ("'nope.mp4' is not a readable file",), "vace"),
        Case("guide-traversal", {**VACE, "video_guide": "../outside/outside.mp4"}, ("inside the input roots",), "vace"),
        Case("guide-deep-traversal", {**VACE, "video_guide": "../" * 12 + "etc/hostname"}, ("input roots",), "vace"),
        Case("guide-absolute-outside", {**VACE, "video_guide": outside_mp4}, ("inside the input roots",), "vace"),
        Case("guide-symlink-out", {**VACE, "video_guide": "link-out.mp4"}, ("'link-out.mp4' is not",), "vace"),
        Case("guide-directory", {**VACE, "video_guide": "a-directory.mp4"}, ("not a readable file",), "vace"),
        Case("guide-dangling-link", {**VACE, "video_guide": "dangling.mp4"}, ("not a readable file",), "vace"),
        Case("guide-not-a-video", {**VACE, "video_guide": "not-a-video.mp4"}, ("is not a readable video",), "vace"),
        Case("guide-unsupported-type", {**VACE, "video_guide": "guide.txt"}, ("unsupported type",), "vace"),
        Case("mask-outside", {**VACE, "video_guide": "guide.mp4", "video_mask": outside_mp4}, ("video_mask",), "vace"),
        Case("refs-outside", {**VACE, "video_guide": "guide.mp4", "image_refs": refs_out}, ("image_refs[0]",), "vace"),
        Case("i2v-no-image", I2V, ("missing required key 'image_start'",), "i2v"),
        Case("i2v-image-missing", {**I2V, "image_start": "nope.png"}, ("'nope.png' is not a readable file",), "i2v"),
        Case("i2v-not-an-image", {**I2V, "image_start": "not-an-image.png"}, ("is not a readable image",), "i2v"),
        # ---- LoRAs: by name from loras/ only, safetensors only
        Case("lora-slash", {**T2V, "lora_names": ["sub/evil"]}, ("Invalid lora_names entry 'sub/evil'",)),
        Case("lora-traversal", {**T2V, "lora_names": ["../evil"]}, ("Invalid lora_names entry '../evil'",)),
        Case("lora-absolute", {**T2V, "lora_names": ["/etc/passwd"]}, ("Invalid lora_names entry '/etc/passwd'",)),
        Case("lora-ckpt", {**T2V, "lora_names": ["evil.ckpt"]}, ("only .safetensors",)),
        Case("lora-pickle-bin", {**T2V, "lora_names": ["evil.bin"]}, ("only .safetensors",)),
        Case("lora-missing", {**T2V, "lora_names": ["no_such_lora"]}, ("LoRA 'no_such_lora' not found",)),
        Case("lora-multipliers", {**T2V, "lora_names": ["x"], "lora_multipliers": "abc"}, ("lora_multipliers",)),
        # ---- dependencies and priority (columns)
        dependency("dependency-missing", "no-such-task", "does not exist"),
        dependency("dependency-self-cycle", "self", "dependency cycle of 1", CYCLE["self"], task="self"),
        dependency("dependency-cycle-of-2", "b", "dependency cycle of 2", CYCLE["a"], CYCLE["b"], task="a"),
        dependency("dependency-cycle-of-2b", "a", "dependency cycle of 2", task="b"),
        dependency("dependency-cycle-of-3", "d", "dependency cycle of 3", CYCLE["c"], CYCLE["d"], CYCLE["e"], task="c"),
        dependency("dependency-cycle-of-3b", "e", "dependency cycle of 3", task="d"),
        dependency("dependency-cycle-of-3c", "c", "dependency cycle of 3", task="e"),
        dependency("depends-on-a-cycle", "c", f"prerequisite task {CYCLE['c']} ended Failed", "dependency cycle"),
        Case("priority-huge", T2V, ("priority 5000 is out of range", "-1000 to 1000"), columns={"priority": 5000}),
        Case("priority-very-negative", T2V, ("priority -5000 is out of range",), columns={"priority": -5000}),
    ]


def make_inputs(root: Path) -> tuple[Path, Path]:
    """The input root (good and bad files) and a folder outside it holding perfectly valid media."""
    inputs, outside = root / "inputs", root / "outside"
    inputs.mkdir()
    outside.mkdir()
    frames = np.random.default_rng(0).integers(0, 255, (9, 48, 64, 3), dtype=np.uint8)
    for path in (inputs / "guide.mp4", inputs / SHELL_NAME, outside / "outside.mp4"):
        write_video(frames, path, fps=16)
    for path in (inputs / "image.png", outside / "i.png"):
        Image.fromarray(frames[0]).save(path)
    (inputs / "not-a-video.mp4").write_text("this is text, not a video\n")
    (inputs / "not-an-image.png").write_text("this is text, not an image\n")
    (inputs / "guide.txt").write_text("a guide, in words\n")
    (inputs / "a-directory.mp4").mkdir()
    (inputs / "link-out.mp4").symlink_to(outside / "outside.mp4")
    (inputs / "dangling.mp4").symlink_to(root / "gone.mp4")
    return inputs, outside


@dataclass
class Battery:
    """The finished run: rows by case name, the good rows, the worker and what the files look like."""

    stack: Stack
    worker: WorkerProcess
    cases: list[Case]
    rows: dict[str, dict[str, Any]]
    good: dict[str, dict[str, Any]]
    files_before: set[Path]
    inputs: Path


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Battery]:
    root = tmp_path_factory.mktemp("battery")
    stack = build_stack(f"sqlite:///{root / 'tasks.db'}", root, tiny_models_dir)
    inputs, outside = make_inputs(root)
    all_cases = cases(inputs, outside)
    bad_ids = insert_many(
        stack, [{"task_type": c.task_type, "params": c.params, "max_attempts": 3, **c.columns} for c in all_cases]
    )
    good_rows = {
        "vace-shell-name": {"task_type": "vace", "params": {**VACE, "video_guide": SHELL_NAME}},
        "i2v": {"task_type": "i2v", "params": {**I2V, "image_start": str(inputs / "image.png")}},
        **{f"id:{i}": {"task_type": "t2v", "params": T2V, "id": i} for i in HOSTILE_IDS},
        "t2v-after-all": {"task_type": "t2v", "params": T2V, "priority": -1},  # claimed after every bad row
    }
    good_ids = dict(zip(good_rows, insert_many(stack, list(good_rows.values())), strict=True))
    files_before = set(all_files(root))
    worker = start_worker(stack, "battery", lease_s=10, extra=["--input-roots", str(inputs)])
    try:
        wait_all_final(stack, [*bad_ids, *good_ids.values()], timeout=300, what="every battery row to end")
        rows = read_rows(stack)
        yield Battery(
            stack=stack,
            worker=worker,
            cases=all_cases,
            rows={case.name: rows[task_id] for case, task_id in zip(all_cases, bad_ids, strict=True)},
            good={name: rows[task_id] for name, task_id in good_ids.items()},
            files_before=files_before,
            inputs=inputs,
        )
    finally:
        worker.stop()
        stack.engine.dispose()


def test_battery_is_large_enough(battery: Battery, figures: Figures) -> None:
    names = [case.name for case in battery.cases]
    assert len(set(names)) == len(names) >= 30
    failed = sum(row["status"] == "Failed" for row in battery.rows.values())
    figures.record(
        "bad_input[sqlite]",
        bad_rows=len(names),
        failed_with_specific_message=sum(
            row["status"] == "Failed" and all(e in (row["error_message"] or "") for e in case.expected)
            for case, row in zip(battery.cases, battery.rows.values(), strict=True)
        ),
        ended_failed=failed,
        good_rows_completed=sum(row["status"] == "Complete" for row in battery.good.values()),
        worker_crashes=int(battery.worker.process is None or battery.worker.process.poll() is not None),
    )


@pytest.mark.parametrize("name", [case.name for case in cases(Path("/in"), Path("/out"))])
def test_bad_row_fails_with_a_specific_message(battery: Battery, name: str) -> None:
    (case,) = [case for case in battery.cases if case.name == name]
    row = battery.rows[case.name]
    message = row["error_message"] or ""
    assert row["status"] == "Failed", f"{case.name}: {row['status']} ({message})"
    for expected in case.expected:
        assert expected in message, f"{case.name}: {expected!r} not in {message!r}"
    assert row["attempts"] == (1 if case.claimed else 0), f"{case.name}: bad input is never retried"
    assert row["output_location"] is None


def test_worker_never_crashed_and_good_rows_completed(battery: Battery) -> None:
    worker = battery.worker
    assert worker.process is not None and worker.process.poll() is None, "the worker exited"
    log = worker.log_text()
    assert "Traceback" not in log, "an unexpected exception was logged"
    assert log.count("worker started") == 1, "the worker restarted"
    for name, row in battery.good.items():
        assert row["status"] == "Complete", f"{name}: {row['status']} ({row['error_message']})"
        assert row["attempts"] == 1
    last = battery.good["t2v-after-all"]
    claimed_before = [row for row in battery.rows.values() if row["attempts"] and row["priority"] >= 0]
    assert all(last["generation_started_at"] >= row["updated_at"] for row in claimed_before), "not after the bad rows"


def test_outputs_are_named_by_the_worker_inside_the_outputs_dir(battery: Battery) -> None:
    outputs_dir = battery.stack.outputs_dir.resolve()
    outputs = [Path(row["output_location"]) for row in battery.good.values()]
    assert len(set(outputs)) == len(outputs), "two tasks shared an output"
    for row in battery.good.values():
        path = Path(row["output_location"])
        assert path.parent == outputs_dir, f"{path} is not directly in the outputs dir"
        assert path.stem == row["id"] if row["id"] not in HOSTILE_IDS else path.stem.startswith("task-"), path
        assert read_video_info(path).frames == 9
    assert sorted(all_files(battery.stack.outputs_dir)) == sorted(outputs), "stray or partial files in outputs"
    root = battery.stack.root
    created = {p.resolve() for p in all_files(root)} - {p.resolve() for p in battery.files_before}
    expected_elsewhere = ("battery.log", "tasks.db-wal", "tasks.db-shm")
    unexpected = {p for p in created if not p.is_relative_to(outputs_dir) and p.name not in expected_elsewhere}
    assert not unexpected, f"files written outside the outputs dir: {unexpected}"
    assert not list(Path("/tmp").glob(Path(ABS_ESCAPE).name + "*")), "an output escaped to /tmp"
    assert not (root.parent / "escape-up.mp4").exists()


def test_shell_metacharacters_in_file_names_are_never_run(battery: Battery) -> None:
    row = battery.good["vace-shell-name"]
    assert row["status"] == "Complete", row["error_message"]
    assert SHELL_NAME in json.dumps(row["result_data"]["inputs"]), "the guide was read under its literal name"
    for marker in ("PWNED", "PWNED2", "PWNED3", "PWNED4"):
        for where in (battery.stack.root, battery.inputs, battery.stack.outputs_dir, Path.cwd()):
            assert not (where / marker).exists(), f"a shell ran: {where / marker} exists"
