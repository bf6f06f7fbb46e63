"""Test support code shared by several test folders (helpers, not tests; pytest collects nothing here).

- `tests.support.db`: database URLs (the local Postgres admin URL, the CI rule that Postgres is required),
  and engines migrated to head (`migrated_engine`, `open_engine`, behind the root `engine` fixture).
- `tests.support.processes`: the real `wan-worker` process harness: `wan_worker_command`, `WorkerProcess`,
  `Stack` (a database, dirs and workers), `build_stack` / `running_stack`, and `output_files`.
- `tests.support.fakes`: `BaseFakeRunner`, the task-runner protocol boilerplate the fake runners build on.
- `tests.support.media`: small random images, videos and masks written with real codecs.

Fixtures used by several folders live in `tests/conftest.py` (built from these modules); each folder's
conftest keeps only its own fixtures (e.g. the reliability sizes and stacks in `tests/reliability/`).
"""
