"""The work loop: check stop, claim, run under a lease keeper, persist the outcome; retries and scheduling.

May import: `worker.task`, `worker.config`, `worker.store` (the repository protocol). The runner and the
event sink are Protocols defined here, so the loop runs with in-memory fakes in unit tests and never
imports model code.
"""
