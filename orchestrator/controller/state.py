"""The controller's state in SQLite: its jobs, every attempt, and why each ended.

A job is one run (``run.name``) submitted from one spec with its overrides to one cluster. Its
``status`` moves through

    pending -> submitting -> submitted -> succeeded
                                       -> failed   (the user's fault: not retried)
                                       -> backoff -> submitting -> ...   (infrastructure)
                                       -> gave_up  (max_restarts used)
    any active status -> stopping -> stopped       (``raydiff controller stop``)

``submitting`` is written *before* ``submit_job`` is called, with the submission id it will use:
a controller killed between the two finds, on restart, either that Ray knows the id (the job is
adopted) or that it does not (it is submitted then), never a second copy.

WAL mode and a busy timeout let ``raydiff controller status``/``stop`` read and write while a
controller runs. The schema version is SQLite's ``user_version``; a newer file than this code
knows is refused instead of misread.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError

SCHEMA_VERSION = 1
ACTIVE = ("pending", "submitting", "submitted", "backoff", "stopping")
TERMINAL = ("succeeded", "failed", "gave_up", "stopped")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,           -- run.name
    spec TEXT NOT NULL,              -- the job spec's path
    overrides TEXT NOT NULL,         -- JSON list of key.sub=value
    working_dir TEXT NOT NULL,
    address TEXT NOT NULL,           -- the head's dashboard, http://HEAD:8265
    env TEXT NOT NULL,               -- JSON object: extra environment for the job
    run_uri TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,   -- submissions ever made for this run (names the ids)
    restarts INTEGER NOT NULL DEFAULT 0,   -- resubmissions since it was last registered
    max_restarts INTEGER NOT NULL,
    submission_id TEXT,              -- the current (or last) attempt's submission id
    reason TEXT,                     -- why the last attempt ended / what the job waits for
    next_retry_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL REFERENCES jobs(name),
    attempt INTEGER NOT NULL,
    submission_id TEXT NOT NULL UNIQUE,
    submitted_at REAL,
    running_at REAL,
    ended_at REAL,
    ray_status TEXT,
    exit_code INTEGER,
    kind TEXT,                       -- user | infra | NULL (succeeded or stopped)
    reason TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_JOB_FIELDS = ("spec", "overrides", "working_dir", "address", "env", "run_uri", "status", "attempts", "restarts",
               "max_restarts", "submission_id", "reason", "next_retry_at")
_ATTEMPT_FIELDS = ("running_at", "ended_at", "ray_status", "exit_code", "kind", "reason")


@dataclass
class Job:
    name: str
    spec: str
    overrides: list[str]
    working_dir: str
    address: str
    env: dict[str, str]
    run_uri: str | None
    status: str
    attempts: int
    restarts: int
    max_restarts: int
    submission_id: str | None
    reason: str | None
    next_retry_at: float | None
    created_at: float
    updated_at: float

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclass
class Attempt:
    job: str
    attempt: int
    submission_id: str
    submitted_at: float | None
    running_at: float | None
    ended_at: float | None
    ray_status: str | None
    exit_code: int | None
    kind: str | None
    reason: str | None


def default_db_path() -> Path:
    return Path.home() / ".raydiff" / "controller.db"


class State:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit; every change below is one statement or one explicit transaction.
            self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA busy_timeout=30000")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"controller state {str(self.path)!r} cannot be used ({e}). Fix: pass another --db, "
                              "or move the file away if it is not a raydiff controller database") from None

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(f"controller state {str(self.path)!r} has schema version {version}, newer than this "
                              f"raydiff's {SCHEMA_VERSION}. Fix: use the raydiff version that wrote it, or another --db")
        if version < SCHEMA_VERSION:
            self.conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        self.conn.close()

    # -- jobs -----------------------------------------------------------------------------------
    def _job(self, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["overrides"] = json.loads(d["overrides"])
        d["env"] = json.loads(d["env"])
        return Job(**d)

    def get(self, name: str) -> Job | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
        return self._job(row) if row else None

    def jobs(self, *, active: bool | None = None) -> list[Job]:
        rows = self.conn.execute("SELECT * FROM jobs ORDER BY created_at, name").fetchall()
        out = [self._job(r) for r in rows]
        return out if active is None else [j for j in out if j.active == active]

    def register(self, name: str, *, spec: str, overrides: list[str], working_dir: str, address: str,
                 env: dict[str, str], run_uri: str | None, max_restarts: int, status: str = "pending",
                 reason: str | None = None) -> Job:
        """Add the job, or start it over if it had ended (its attempt count, which names the
        submission ids, carries on). Registering an active job is the caller's decision to avoid."""
        now = time.time()
        with self._tx():
            self.conn.execute(
                "INSERT INTO jobs (name, spec, overrides, working_dir, address, env, run_uri, status, attempts, "
                "restarts, max_restarts, submission_id, reason, next_retry_at, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, NULL, ?, NULL, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET spec=excluded.spec, overrides=excluded.overrides, "
                "working_dir=excluded.working_dir, address=excluded.address, env=excluded.env, "
                "run_uri=excluded.run_uri, status=excluded.status, restarts=0, max_restarts=excluded.max_restarts, "
                "reason=excluded.reason, next_retry_at=NULL, updated_at=excluded.updated_at",
                (name, spec, json.dumps(overrides), working_dir, address, json.dumps(env), run_uri, status,
                 max_restarts, reason, now, now),
            )
        job = self.get(name)
        if job is None:
            raise RuntimeError(f"job {name!r} vanished from {self.path} right after it was written")
        return job

    def update(self, name: str, *, expect_status: str | None = None, **fields: Any) -> Job | None:
        """Set ``fields``; with ``expect_status`` only if the job is still in that status (a
        ``controller stop`` from another process may have changed it since it was read): None
        when it was not."""
        bad = set(fields) - set(_JOB_FIELDS)
        if bad:
            raise ValueError(f"unknown job fields {sorted(bad)}")
        for k in ("overrides", "env"):
            if k in fields:
                fields[k] = json.dumps(fields[k])
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        where, args = "name = ?", [name]
        if expect_status is not None:
            where, args = where + " AND status = ?", [name, expect_status]
        with self._tx():
            changed = self.conn.execute(f"UPDATE jobs SET {cols} WHERE {where}", (*fields.values(), *args)).rowcount
        if not changed:
            if self.get(name) is None:
                raise KeyError(name)
            return None
        return self.get(name)

    def request_stop(self, name: str) -> Job | None:
        """Mark an active job ``stopping`` (atomically: a job that ended meanwhile stays ended)."""
        with self._tx():
            self.conn.execute(f"UPDATE jobs SET status = 'stopping', updated_at = ? WHERE name = ? AND status IN "
                              f"({', '.join('?' * len(ACTIVE))})", (time.time(), name, *ACTIVE))
        return self.get(name)

    def readdress(self, old: str, new: str) -> int:
        """Point the active jobs of the cluster at ``old`` to ``new``; returns how many moved."""
        with self._tx():
            return self.conn.execute(
                f"UPDATE jobs SET address = ?, updated_at = ? WHERE address = ? AND status IN "
                f"({', '.join('?' * len(ACTIVE))})", (new, time.time(), old, *ACTIVE)).rowcount

    # -- attempts -------------------------------------------------------------------------------
    def begin_attempt(self, name: str, submission_id: str, attempt: int, *, expect_status: str,
                      **job_fields: Any) -> Job | None:
        """Record the submission about to be made and the job's new state in one transaction, if
        the job is still in ``expect_status`` (else nothing is written and None is returned)."""
        now = time.time()
        with self._tx():
            fields = {**job_fields, "submission_id": submission_id, "attempts": attempt, "updated_at": now}
            cols = ", ".join(f"{k} = ?" for k in fields)
            changed = self.conn.execute(f"UPDATE jobs SET {cols} WHERE name = ? AND status = ?",
                                        (*fields.values(), name, expect_status)).rowcount
            if changed:
                self.conn.execute("INSERT OR IGNORE INTO attempts (job, attempt, submission_id, submitted_at) "
                                  "VALUES (?, ?, ?, ?)", (name, attempt, submission_id, now))
        return self.get(name) if changed else None

    def update_attempt(self, submission_id: str, **fields: Any) -> None:
        bad = set(fields) - set(_ATTEMPT_FIELDS)
        if bad:
            raise ValueError(f"unknown attempt fields {sorted(bad)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx():
            self.conn.execute(f"UPDATE attempts SET {cols} WHERE submission_id = ?", (*fields.values(), submission_id))

    def attempts(self, name: str | None = None) -> list[Attempt]:
        q, args = "SELECT * FROM attempts", ()
        if name is not None:
            q, args = q + " WHERE job = ?", (name,)
        rows = self.conn.execute(q + " ORDER BY id", args).fetchall()
        return [Attempt(**{k: r[k] for k in Attempt.__dataclass_fields__}) for r in rows]

    # -- meta -----------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str | None) -> None:
        with self._tx():
            if value is None:
                self.conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self.conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                                  "value = excluded.value", (key, value))

    # -- one controller per database -----------------------------------------------------------
    def lock_controller(self) -> Any:
        """Hold ``<db>.lock`` for as long as the returned file stays open: a second controller on
        the same state would submit the same jobs twice. The kernel drops the lock when the
        holder dies, so a killed controller never blocks its successor."""
        f = open(self.path.with_name(self.path.name + ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise ConfigError(f"another controller (pid {holder}) is running on {self.path}. Fix: let it watch the "
                              "jobs (`raydiff controller status`), stop it first, or pass another --db") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        return f

    # -- plumbing -------------------------------------------------------------------------------
    def _tx(self):
        return _Transaction(self.conn)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: the write lock is taken at the start, so two processes
    never interleave a read-modify-write (busy_timeout makes the second one wait)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *exc: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
