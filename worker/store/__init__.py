"""The database: table definitions, Alembic migrations, and every SQL statement of the project.

`schema.py` (tables, engine creation), `migrate.py` + `migrations/` (Alembic), `db.py` (the database
clock, transactions, row decoding), `repository.py` (the `TaskRepository` protocol and `SqlTaskRepository`:
insert, claim, guarded writes), `sweeps.py` (stale leases, blocked and cyclic dependencies), `queries.py`
(read-only queries for the CLI and live pages), `side_tables.py` (the `workers` and `eta_stats` tables),
`file_identity.py` (noticing a SQLite file replaced under a running worker).

May import: `worker.task` (and SQLAlchemy / Alembic). Nothing here knows about models, presets or the loop:
a claim receives plain data (the resident model key, a claim filter) and runs no model code.
"""
