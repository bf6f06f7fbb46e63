"""What a task means and how it runs: the one parameter schema, input-path confinement, the generation
runner (one resident model, switching only when needed) and the travel coordinator.

May import: `worker.task`, `worker.config`, `worker.store`, `worker.loop`, `wan_engine`,
`travel_between_images`. Not `headless_*`: the orchestrator comes in through the `Orchestrator` protocol.
"""
