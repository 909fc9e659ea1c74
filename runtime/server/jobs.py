"""The job store: every job the server ever accepted, in one sqlite file (stdlib `sqlite3`).

ComfyUI's queue, its history, the jobs API and the OpenAI videos API are all views of this one
table, so a job submitted through any of them is visible through all of them, and a restart
loses nothing: pending jobs stay pending, finished ones stay in the history. A job that was
running when the process died is put back in the queue on the next start (it never finished,
so running it again is the only way to deliver what the client asked for).

One connection shared by the event loop and the worker thread, serialised by a lock: every
statement is a few microseconds, far below what a second connection's locking would cost.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

PENDING = "pending"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
ALL_STATUSES = (PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
QUEUED_STATUSES = (PENDING, IN_PROGRESS)
FINISHED_STATUSES = (COMPLETED, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    number REAL NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs_to_execute TEXT NOT NULL,
    request TEXT,
    progress REAL NOT NULL DEFAULT 0,
    outputs TEXT NOT NULL DEFAULT '{}',
    messages TEXT NOT NULL DEFAULT '[]',
    meta TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status_number ON jobs (status, number);
"""
# Back to the queue, looking never started: its old `number` keeps its place in the queue.
_REQUEUE = "UPDATE jobs SET status = ?, started_at = NULL, progress = 0"
_JSON_COLUMNS = ("prompt", "extra_data", "outputs_to_execute", "request", "outputs", "messages", "meta", "error")


@dataclass
class Job:
    id: str
    number: float
    """Queue position: pending jobs run in ascending `number` (ComfyUI's priority)."""
    source: str
    """Which API submitted it: "comfy" (POST /prompt) or "openai" (/v1/...)."""
    status: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any] = field(default_factory=dict)
    outputs_to_execute: list[str] = field(default_factory=list)
    request: dict[str, Any] | None = None
    """The OpenAI request that produced the prompt (what the Video object reports back)."""
    progress: float = 0.0
    """0..1 over the sampling steps of the whole job."""
    outputs: dict[str, Any] = field(default_factory=dict)
    messages: list[list[Any]] = field(default_factory=list)
    """ComfyUI history `status.messages`: [[event, data], ...]."""
    meta: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _where(statuses: Iterable[str], source: str | None = None) -> tuple[str, list[Any]]:
    """The WHERE clause (and its parameters) selecting jobs by status and, optionally, source."""
    wanted = tuple(statuses)
    sql, params = f"status IN ({_marks(len(wanted))})", list(wanted)
    if source is not None:
        sql += " AND source = ?"
        params.append(source)
    return sql, params


def _row_to_job(row: sqlite3.Row) -> Job:
    values = dict(row)
    for column in _JSON_COLUMNS:
        if values[column] is not None:
            values[column] = json.loads(values[column])
    return Job(**values)


class JobStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # WAL: readers never block the worker's writes, and a crash keeps every committed job.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, tuple(params))

    # --- writing -------------------------------------------------------------------------

    def add(
        self,
        job_id: str,
        prompt: dict[str, Any],
        *,
        source: str,
        extra_data: dict[str, Any] | None = None,
        outputs_to_execute: list[str] | None = None,
        request: dict[str, Any] | None = None,
        front: bool = False,
    ) -> Job:
        """Queue a job; `front` puts it before every pending job (ComfyUI's `front: true`)."""
        now = time.time()
        with self._lock:
            low, high = self._db.execute("SELECT MIN(number), MAX(number) FROM jobs").fetchone()
            number = (low - 1 if low is not None else 0) if front else (high + 1 if high is not None else 0)
            job = Job(
                id=job_id, number=number, source=source, status=PENDING, prompt=prompt,
                extra_data=dict(extra_data or {}), outputs_to_execute=list(outputs_to_execute or []),
                request=request, created_at=now,
            )
            self._db.execute(
                "INSERT INTO jobs (id, number, source, status, prompt, extra_data, outputs_to_execute,"
                " request, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.number, job.source, job.status, json.dumps(prompt), json.dumps(job.extra_data),
                 json.dumps(job.outputs_to_execute), json.dumps(request) if request is not None else None, now),
            )
        return job

    def claim_next(self) -> Job | None:
        """Mark the first pending job as running and return it (None when the queue is empty)."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE status = ? ORDER BY number LIMIT 1", (PENDING,)
            ).fetchone()
            if row is None:
                return None
            started = time.time()
            self._db.execute(
                "UPDATE jobs SET status = ?, started_at = ? WHERE id = ?", (IN_PROGRESS, started, row["id"])
            )
        job = _row_to_job(row)
        job.status, job.started_at = IN_PROGRESS, started
        return job

    def set_progress(self, job_id: str, progress: float) -> None:
        self._execute("UPDATE jobs SET progress = ? WHERE id = ?", (progress, job_id))

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        outputs: dict[str, Any],
        messages: list[list[Any]],
        meta: dict[str, Any],
        error: dict[str, Any] | None = None,
    ) -> None:
        progress = 1.0 if status == COMPLETED else None
        self._execute(
            "UPDATE jobs SET status = ?, outputs = ?, messages = ?, meta = ?, error = ?, finished_at = ?,"
            " progress = COALESCE(?, progress) WHERE id = ?",
            (status, json.dumps(outputs), json.dumps(messages), json.dumps(meta),
             json.dumps(error) if error is not None else None, time.time(), progress, job_id),
        )

    def requeue(self, job_id: str) -> None:
        """Put a started job back in the queue, at its old place."""
        self._execute(f"{_REQUEUE} WHERE id = ?", (PENDING, job_id))

    def requeue_unfinished(self) -> int:
        """After a restart: jobs left `in_progress` by a dead process go back to the queue."""
        return self._execute(f"{_REQUEUE} WHERE status = ?", (PENDING, IN_PROGRESS)).rowcount

    def delete(self, job_ids: Iterable[str], statuses: Iterable[str] = ALL_STATUSES) -> list[str]:
        """Delete the given jobs that are in one of `statuses`; returns the ids deleted."""
        ids = list(job_ids)
        if not ids:
            return []
        where, params = _where(statuses)
        with self._lock:
            found = [r["id"] for r in self._db.execute(
                f"SELECT id FROM jobs WHERE id IN ({_marks(len(ids))}) AND {where}", (*ids, *params)
            )]
            if found:
                self._db.execute(f"DELETE FROM jobs WHERE id IN ({_marks(len(found))})", found)
        return found

    def clear(self, statuses: Iterable[str]) -> int:
        where, params = _where(statuses)
        return self._execute(f"DELETE FROM jobs WHERE {where}", params).rowcount

    # --- reading -------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        row = self._execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row is not None else None

    def list(
        self,
        statuses: Iterable[str] = ALL_STATUSES,
        *,
        source: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[Job]:
        where, params = _where(statuses, source)
        order = "created_at DESC, number DESC" if newest_first else "number"
        params += [limit if limit is not None else -1, offset]
        sql = f"SELECT * FROM jobs WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?"
        return [_row_to_job(r) for r in self._execute(sql, params).fetchall()]

    def count(self, statuses: Iterable[str] = ALL_STATUSES, *, source: str | None = None) -> int:
        where, params = _where(statuses, source)
        return self._execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", params).fetchone()[0]
