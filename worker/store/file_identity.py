"""Notice a SQLite database file replaced or removed under a running worker.

A SQLite connection holds the file it opened, not its path: after `mv backup.db tasks.db` (a restored
backup) the worker would keep claiming from, and recording into, the deleted inode while the new file's
tasks wait forever. `FileIdentity` records the file's identity (st_dev, st_ino) at start-up; `changed()`
says, in words, when the path now names another file or nothing. The CLI polls it from a thread and
stops the worker with `DATABASE_REPLACED_EXIT`, so a supervisor restarts it on the new file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine, make_url

log = logging.getLogger(__name__)

DATABASE_REPLACED_EXIT = 3  # `wan-worker run`'s exit code: the database file was replaced; restart on the new one


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL opens (absolute), or None: another backend, an in-memory or a URI database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:") or parsed.query.get("uri"):
        return None  # no file, or a URI whose path SQLite parses itself: nothing reliable to watch
    return Path(database).absolute()  # before anyone chdirs: the path the engine resolved


@dataclass(frozen=True)
class FileIdentity:
    """A file's path and the (st_dev, st_ino) it had when recorded."""

    path: Path
    device: int
    inode: int

    @classmethod
    def record(cls, path: Path) -> FileIdentity:
        """The identity `path` has now (OSError if it does not exist)."""
        st = os.stat(path)
        return cls(path, st.st_dev, st.st_ino)

    def changed(self) -> str | None:
        """None while `path` is still the recorded file; else what changed, as a phrase for the log."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "the file was removed (no file at that path now)"
        except OSError:  # EACCES, ESTALE on NFS...: cannot tell, so do not stop a worker for it
            return None
        if (st.st_dev, st.st_ino) != (self.device, self.inode):
            return (
                f"the file was replaced (device/inode {self.device}/{self.inode} at start-up, "
                f"{st.st_dev}/{st.st_ino} now)"
            )
        return None


def truncate_wal(engine: Engine) -> None:
    """Checkpoint this engine's WAL into the file it has open and truncate the `-wal` file to zero bytes.

    SQLite names the `-wal` and `-shm` files after the path, not the inode: once the database file was
    replaced, the `-wal` beside it still holds the old file's pages, and the next process to open the path
    would replay them into the new file. Called on the way out, when this process holds the last
    connections to the old file; an empty WAL replays nothing. Busy or failing: logged, not raised."""
    raw = engine.raw_connection()
    try:
        # The raw DBAPI connection runs in autocommit (schema._configure_sqlite): no BEGIN IMMEDIATE around it.
        busy, frames, _checkpointed = raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.error("could not truncate the old database file's WAL (%d frames): it is still in use", frames)
    except Exception as exc:  # a sqlite3 error: the exit must still happen
        log.error("could not truncate the old database file's WAL: %s", exc)
    finally:
        raw.close()
