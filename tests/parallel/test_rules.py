"""The rules around `parallel: N`, without a group: degree and token checks, params, presets, the claim
rule (a group of G claims tasks asking for at most G GPUs; one GPU never claims parallel 2), the claim
filter in the repository on SQLite and Postgres, and the supervisor's groups of GPUs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy.engine import Engine

from wan_engine.context_parallel import allowed_degrees, check_degree, check_tokens, enable_context_parallel
from wan_engine.presets import BUILTIN_PRESETS_DIR, load_presets
from worker.processes.supervisor import build_children, gpu_groups
from worker.store.repository import CLAIM_CANDIDATES, SqlTaskRepository
from worker.task import NewTask, Task
from worker.tasks.params import InvalidTaskError, parallel_requested, validate_params
from worker.tasks.runner import GenerationRunner

pytestmark = pytest.mark.parallel


# ---- degree and tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("heads", "degree", "allowed"),
    [(12, 5, "1, 2, 3, 4, 6, 12"), (40, 3, "1, 2, 4, 5, 8, 10, 20, 40"), (12, 8, "1, 2, 3, 4, 6, 12")],
)
def test_a_degree_that_does_not_divide_the_heads_names_the_divisors(heads: int, degree: int, allowed: str) -> None:
    with pytest.raises(ValueError, match=f"parallel {degree}: .*\\({heads} heads\\); allowed: {allowed}$"):
        check_degree(heads, degree)


def test_the_wan_head_counts_split_by_2_and_4() -> None:
    for heads in (12, 40):  # 1.3B, 14B
        check_degree(heads, 2)
        check_degree(heads, 4)
    assert 8 not in allowed_degrees(12) and 8 in allowed_degrees(40)


def test_uneven_token_counts_are_refused_naming_the_size() -> None:
    check_tokens(36, 2, "64x48")
    with pytest.raises(ValueError, match="64x48 gives 35 video tokens, which do not split evenly over 2 ranks"):
        check_tokens(35, 2, "64x48")


@pytest.fixture(scope="module")
def tiny_pipes(tiny_models_dir: Path) -> Iterator[dict[str, object]]:
    from headless_wgp import WanOrchestrator

    pipes = {}
    for key in ("tiny_t2v", "tiny_vace"):
        orchestrator = WanOrchestrator(tiny_models_dir)
        orchestrator.load_model(key)
        pipes[key] = orchestrator.pipeline
    yield pipes


def test_enable_refuses_a_degree_the_tiny_model_cannot_take_before_touching_it(tiny_pipes: dict) -> None:
    pipe = tiny_pipes["tiny_t2v"]
    expected = r"parallel 3: .*WanTransformer3DModel \(transformer\) \(2 heads\); allowed: 1, 2"
    with pytest.raises(ValueError, match=expected):
        enable_context_parallel(pipe, 3)
    assert pipe.transformer._parallel_config is None
    with pytest.raises(RuntimeError, match="needs a process group of 2 ranks"):  # no group in this process
        enable_context_parallel(pipe, 2)
    assert enable_context_parallel(pipe, 1) == []


def test_vace_cannot_be_split(tiny_pipes: dict) -> None:
    with pytest.raises(ValueError, match=r"WanVACETransformer3DModel .* no context-parallel plan"):
        enable_context_parallel(tiny_pipes["tiny_vace"], 2)


# ---- params and presets ------------------------------------------------------------------------------


def test_parallel_param_is_an_integer_of_at_least_one() -> None:
    assert validate_params("t2v", {"prompt": "a", "parallel": 2}).parallel == 2
    assert validate_params("t2v", {"prompt": "a"}).parallel is None  # the preset's, else 1
    for bad in (0, -1, "2", True, 1.5, 65):
        with pytest.raises(InvalidTaskError, match="parallel"):
            validate_params("t2v", {"prompt": "a", "parallel": bad})


def test_parallel_is_not_passed_to_the_pipeline() -> None:
    params = validate_params("t2v", {"prompt": "a", "parallel": 2, "seed": 1})
    assert params.generation_kwargs() == {"seed": 1}


def test_vace_refuses_parallel_above_one() -> None:
    with pytest.raises(InvalidTaskError, match="parallel = 2: vace tasks run on one GPU"):
        validate_params("vace", {"prompt": "a", "video_guide": "g.mp4", "parallel": 2})
    validate_params("vace", {"prompt": "a", "video_guide": "g.mp4", "parallel": 1})


@pytest.mark.parametrize(
    ("text", "expected"),
    [('{"parallel": 4}', 4), ("{}", None), ('{"parallel": "x"}', 1), ('{"parallel": 0}', 1), ("not json", 1)],
)
def test_the_claim_reads_parallel_without_raising(text: str, expected: int | None) -> None:
    assert parallel_requested(text) == expected


def test_a_preset_may_ask_for_parallel(tmp_path: Path) -> None:
    (tmp_path / "tiny_t2v.json").write_text(json.dumps({"parallel": 2}))
    presets = load_presets(BUILTIN_PRESETS_DIR, tmp_path)
    assert presets.get("tiny_t2v").settings.parallel == 2
    assert "parallel" not in presets.get("tiny_t2v").settings.as_params()


# ---- the claim rule ----------------------------------------------------------------------------------


def _task(task_type: str = "t2v", **params: object) -> Task:
    from worker.task import TaskStatus

    return Task(
        id="x",
        task_type=task_type,
        params_text=json.dumps({"prompt": "a", **params}),
        status=TaskStatus.QUEUED,
        priority=0,
        dependant_on=None,
        parent_task_id=None,
        attempts=0,
        max_attempts=3,
    )


def _runner(group_size: int, presets_dir: Path | None = None) -> GenerationRunner:
    orchestrator = SimpleNamespace(presets=load_presets(BUILTIN_PRESETS_DIR, presets_dir))
    return GenerationRunner(orchestrator, Path("out"), group_size=group_size)  # type: ignore[arg-type]


def test_one_gpu_claims_parallel_one_only() -> None:
    runner = _runner(1)
    assert runner.claim_filter(_task())
    assert runner.claim_filter(_task(parallel=1))
    assert not runner.claim_filter(_task(parallel=2))
    assert runner.claim_filter(_task("vace", video_guide="g.mp4"))


def test_a_group_claims_up_to_its_size_and_no_vace() -> None:
    runner = _runner(2)
    assert runner.claim_filter(_task())
    assert runner.claim_filter(_task(parallel=2))
    assert runner.claim_filter(_task("i2v", image_start="a.png", parallel=2))
    assert not runner.claim_filter(_task(parallel=4))
    assert not runner.claim_filter(_task("vace", video_guide="g.mp4"))
    assert not runner.claim_filter(_task("travel_segment"))
    assert runner.claim_filter(_task("travel_orchestrator"))  # loads no model


def test_a_preset_parallel_counts_unless_the_task_says_otherwise(tmp_path: Path) -> None:
    (tmp_path / "tiny_t2v.json").write_text(json.dumps({"parallel": 2}))
    single = _runner(1, tmp_path)
    assert not single.claim_filter(_task(model="tiny_t2v"))
    assert single.claim_filter(_task(model="tiny_t2v", parallel=1))
    assert _runner(2, tmp_path).claim_filter(_task(model="tiny_t2v"))


# ---- the claim filter in the repository (SQLite and Postgres) -------------------------------------------


def _first(candidates: list[Task]) -> Task | None:
    return candidates[0] if candidates else None


def test_claim_passes_over_tasks_needing_more_gpus(engine: Engine) -> None:
    repo = SqlTaskRepository(engine)
    wide = repo.insert(NewTask("t2v", {"prompt": "wide", "parallel": 2}, priority=5))
    narrow = repo.insert(NewTask("t2v", {"prompt": "narrow"}))
    single, group = _runner(1).claim_filter, _runner(2).claim_filter
    claimed = repo.claim_next("one-gpu", 60, _first, accept=single)
    assert claimed is not None and claimed.id == narrow
    assert repo.claim_next("one-gpu", 60, _first, accept=single) is None  # the wide task stays queued
    claimed = repo.claim_next("group", 60, _first, accept=group)
    assert claimed is not None and claimed.id == wide


def test_a_full_window_of_refused_tasks_does_not_hide_the_rest(engine: Engine) -> None:
    repo = SqlTaskRepository(engine)
    for n in range(CLAIM_CANDIDATES + 5):
        repo.insert(NewTask("t2v", {"prompt": f"wide {n}", "parallel": 2}, priority=1))
    narrow = repo.insert(NewTask("t2v", {"prompt": "narrow"}))
    claimed = repo.claim_next("one-gpu", 60, _first, accept=_runner(1).claim_filter)
    assert claimed is not None and claimed.id == narrow


def test_without_a_filter_the_claim_is_unchanged(engine: Engine) -> None:
    repo = SqlTaskRepository(engine)
    wide = repo.insert(NewTask("t2v", {"prompt": "wide", "parallel": 2}, priority=5))
    claimed = repo.claim_next("any", 60, _first)
    assert claimed is not None and claimed.id == wide


# ---- the supervisor's groups -------------------------------------------------------------------------


def test_gpus_split_into_groups_of_parallel() -> None:
    assert gpu_groups([0, 1, 2, 3], 2) == [(0, 1), (2, 3)]
    assert gpu_groups([0, 1], 1) == [(0,), (1,)]
    with pytest.raises(ValueError, match=r"--gpus 0,1,2 with --parallel 2: 3 GPUs do not split into groups of 2"):
        gpu_groups([0, 1, 2], 2)


def test_each_group_is_one_child_with_its_gpus_visible() -> None:
    children = build_children(
        [0, 1, 2, 3], ["run", "--parallel", "2"], "box", {}, gpus_found=True, ram_bytes=64 * 2**30, parallel=2
    )
    assert [c.worker_id for c in children] == ["box-gpu0-1", "box-gpu2-3"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in children] == ["0,1", "2,3"]
    assert children[0].argv[:3] == ["run", "--parallel", "2"] and children[0].label == "GPUs 0,1"
    assert children[0].env["WAN_PINNED_CACHE_GB"] == "8.00"  # half the RAM over 4 rank processes
