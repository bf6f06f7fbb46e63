"""The wan-worker daemon, by responsibility. Each sub-package's docstring says what it owns and may import.

Layers, bottom to top (a module imports only from its own layer or the ones below;
`tests/unit/test_import_direction.py` checks it):

- `worker.task`, `worker.config`, `worker.logs`: the shared vocabulary (task rows, settings, log format).
- `worker.store`: the database. Schema, Alembic migrations and the repository: all SQL of the project.
- `worker.loop`: the work loop. Claim, run with a lease keeper, persist the outcome, retry policy, scheduling.
- `worker.live`: live progress. Events, ETAs, resource monitor, the HTTP/WebSocket server, `status --follow`.
- `worker.tasks`: what a task means. The parameter schema, input paths, the generation runner, travel.
- `worker.processes`: OS processes. The per-GPU supervisor, the group launcher, the ranks of a group.
- `worker.cli`, `worker.demo`: the programs. The only modules that import `headless_*`.

Model code (torch, diffusers, `wan_engine`, `headless_wgp`) is reached only from `worker.tasks` upwards;
the store, the loop and the live layer import none of it.
"""
