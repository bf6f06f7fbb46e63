"""The database: table definitions, Alembic migrations and the repository that holds all SQL.

May import: `worker.task` (and SQLAlchemy / Alembic). Nothing here knows about models, presets or the loop:
a claim receives plain data (the resident model key, a claim filter) and runs no model code.
"""
