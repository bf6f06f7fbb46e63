"""Headless-Wan2GP's own tables and inserts, written from HW's source (github.com/peteromallet/Headless-Wan2GP).

- SQLite: the DDL of HW's `source/db_operations._init_db_sqlite` (June 2025, when HW ran on SQLite) and the
  INSERT of its `add_task_to_db` (created_at as local `%Y-%m-%d %H:%M:%S` text; HW clients also write ISO
  `...T...Z` text, which its `update_task_status_sqlite` uses for `updated_at`).
- Postgres: HW's Supabase table as its code reads and writes it (uuid ids, jsonb params, a status enum,
  timestamptz times, `project_id` naming a project, `worker_id` naming a row of its `workers` table); the
  create-task edge function inserts id, params, task_type, project_id, dependant_on, status 'Queued'.

These are test fixtures of ours, not HW code: they only follow HW's column lists and formats.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

HW_SQLITE_DDL = [
    "CREATE TABLE projects (id TEXT PRIMARY KEY, name TEXT)",
    """CREATE TABLE IF NOT EXISTS tasks (
        id TEXT PRIMARY KEY,
        task_type TEXT NOT NULL,
        params TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'Queued',
        dependant_on TEXT NULL,
        output_location TEXT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NULL,
        project_id TEXT NOT NULL,
        FOREIGN KEY (project_id) REFERENCES projects(id)
    )""",
    "CREATE INDEX IF NOT EXISTS idx_status_created ON tasks(status, created_at)",
    "CREATE INDEX IF NOT EXISTS idx_dependant_on ON tasks(dependant_on)",
]

HW_POSTGRES_DDL = [
    "CREATE TYPE task_status AS ENUM ('Queued', 'In Progress', 'Complete', 'Failed')",
    "CREATE TABLE projects (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text NOT NULL)",
    """CREATE TABLE workers (
        id text PRIMARY KEY,
        instance_type text,
        status text NOT NULL DEFAULT 'inactive',
        last_heartbeat timestamptz,
        metadata jsonb DEFAULT '{}'::jsonb,
        created_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE tasks (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        task_type text NOT NULL,
        params jsonb NOT NULL,
        status task_status NOT NULL DEFAULT 'Queued',
        dependant_on uuid NULL REFERENCES tasks(id),
        output_location text NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NULL,
        project_id uuid NOT NULL REFERENCES projects(id),
        worker_id text NULL REFERENCES workers(id),
        generation_started_at timestamptz NULL,
        generation_processed_at timestamptz NULL,
        error_message text NULL,
        attempts integer NOT NULL DEFAULT 0,
        thumbnail_url text NULL
    )""",
    "CREATE INDEX idx_tasks_status_created ON tasks(status, created_at)",
]

HW_PROJECT = "default_project_id"
HW_PG_PROJECT = "ea5709f3-4592-4d5b-b9a5-87ed2ecf07c9"


def create_hw_tables(engine: Engine) -> None:
    """HW's tables on this backend, with HW's project row."""
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        for statement in HW_POSTGRES_DDL if postgres else HW_SQLITE_DDL:
            conn.exec_driver_sql(statement)
        project = HW_PG_PROJECT if postgres else HW_PROJECT
        conn.execute(sa.text("INSERT INTO projects (id, name) VALUES (:id, 'Default')"), {"id": project})


def hw_add_task(
    engine: Engine,
    task_type: str,
    payload: dict[str, Any],
    *,
    dependant_on: str | None = None,
    created_at: str | None = None,
    iso: bool = False,
) -> str:
    """Insert a row as HW's `add_task_to_db` does (SQLite) or its create-task edge function (Postgres)."""
    postgres = engine.dialect.name == "postgresql"
    params = dict(payload)
    params.pop("task_type", None)
    with engine.begin() as conn:
        if postgres:
            task_id = str(uuid.uuid4())
            project = params.get("project_id", HW_PG_PROJECT)
            conn.execute(
                sa.text(
                    "INSERT INTO tasks (id, params, task_type, project_id, dependant_on, status) "
                    "VALUES (CAST(:id AS uuid), CAST(:params AS jsonb), :task_type, CAST(:project AS uuid), "
                    "CAST(:dep AS uuid), 'Queued')"
                ),
                {"id": task_id, "params": json.dumps(params), "task_type": task_type, "project": project,
                 "dep": dependant_on},
            )  # fmt: skip
            return task_id
        task_id = params.get("task_id") or f"{task_type[:8]}_{uuid.uuid4().hex[:12]}"
        params.setdefault("task_id", task_id)
        if created_at is None:
            now = datetime.now(timezone.utc)
            created_at = now.isoformat().replace("+00:00", "Z") if iso else now.strftime("%Y-%m-%d %H:%M:%S")
        conn.execute(
            sa.text(
                "INSERT INTO tasks (id, params, task_type, status, created_at, project_id, dependant_on) "
                "VALUES (:id, :params, :task_type, 'Queued', :created_at, :project, :dep)"
            ),
            {"id": task_id, "params": json.dumps(params), "task_type": task_type, "created_at": created_at,
             "project": params.get("project_id", HW_PROJECT), "dep": dependant_on},
        )  # fmt: skip
        return task_id


def seconds_ago(seconds: float, iso: bool) -> str:
    when = datetime.now(timezone.utc) - timedelta(seconds=seconds)
    return when.isoformat().replace("+00:00", "Z") if iso else when.strftime("%Y-%m-%d %H:%M:%S")


def hw_rows(engine: Engine) -> dict[str, dict[str, Any]]:
    """Every row with HW's own columns only, as stored (for before/after comparisons)."""
    postgres = engine.dialect.name == "postgresql"
    columns = "id, task_type, params, status, dependant_on, output_location, created_at, project_id"
    if postgres:
        columns = "id::text AS id, task_type, params::text AS params, status::text AS status, "
        columns += "dependant_on::text AS dependant_on, output_location, created_at, project_id::text AS project_id"
    with engine.begin() as conn:
        rows = conn.execute(sa.text(f"SELECT {columns} FROM tasks")).mappings().all()
    return {row["id"]: dict(row) for row in rows}
