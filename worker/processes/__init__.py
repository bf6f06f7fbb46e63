"""Operating-system processes: the `--gpus` supervisor (one worker per GPU), the `--parallel` group
launcher and the ranks of a context-parallel group.

May import: everything in `worker` below the programs, `wan_engine` and torch. Not `headless_*`
(the group ranks receive the orchestrator through the `Orchestrator` protocol).
"""
