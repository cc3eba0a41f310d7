"""History of the aggregate values: SQLite, written in batches, readable with HistoryRead.

asyncua's stock SQLite backend commits once per sample and names tables after
numeric NodeIds; this one keys rows by the vocabulary name (``soc``,
``demand_w``...), buffers samples in memory and commits one transaction per
`flush_s`. Reads see the buffer too, so a HistoryRead right after a change is
complete. `load_series()` reads the same file without a server, e.g. for the
forecast to start from the recorded demand after a restart.

A file SQLite finds damaged (not a database, a malformed page) is moved aside
(`history.sqlite.corrupt-<UTC time>`, kept for a post-mortem) with a log line and
the record starts anew: the history serves the forecasts and SCADA, and must not
stop the server. Other write errors (a full disk) drop the batch with a log line.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

from asyncua import ua
from asyncua.server.history import HistoryStorageInterface

from vbatt.programs.recorded import HISTORY_FILE, load_series  # noqa: F401  (re-exported)

__all__ = ["BatchHistory", "load_series", "HISTORY_FILE"]
log = logging.getLogger("vbatt.opcua.history")
_DAMAGED = ("SQLITE_NOTADB", "SQLITE_CORRUPT")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (name TEXT NOT NULL, t_ns INTEGER NOT NULL, value REAL);
CREATE INDEX IF NOT EXISTS samples_name_t ON samples (name, t_ns);
"""


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    return getattr(exc, "sqlite_errorname", "") in _DAMAGED or "not a database" in str(exc) \
        or "malformed" in str(exc)


def _ns(t: datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp() * 1e9)


def _dt(t_ns: int) -> datetime:
    return datetime.fromtimestamp(t_ns / 1e9, tz=timezone.utc)


class BatchHistory(HistoryStorageInterface):
    """`names`: NodeId -> stored name; `scale`: stored name -> factor applied to values on read."""

    def __init__(self, path: Path, names: dict[ua.NodeId, str], scale: dict[str, float] | None = None,
                 retention_s: float = 30 * 86400.0, max_response: int = 10000):
        super().__init__(max_response)
        self.path = Path(path)
        self.names = names
        self.scale = scale or {}
        self.retention_ns = int(retention_s * 1e9)
        self.pending: list[tuple[str, int, float]] = []
        self.db: sqlite3.Connection | None = None
        self.flushes = 0

    async def init(self) -> None:
        self.open()

    def open(self) -> None:
        if self.db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.db = self._connect()
            except sqlite3.DatabaseError as exc:
                if not _damaged(exc):
                    raise
                self._move_aside(exc)
                self.db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, exc: sqlite3.DatabaseError) -> None:
        """The damaged file (with its WAL and shared-memory files) out of the way, kept for a post-mortem."""
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
            self.db = None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = self.path.with_name(self.path.name + suffix)
            if src.exists():
                src.replace(aside.with_name(aside.name + suffix))
        log.error("history file %s is damaged (%s: %s): moved to %s, the record starts anew",
                  self.path, type(exc).__name__, exc, aside)

    # -- writing (the server's updater) -------------------------------------------------------
    def append(self, name: str, t_ns: int, value: float) -> None:
        self.pending.append((name, t_ns, value))

    def flush(self) -> int:
        """One transaction for everything buffered; returns the number of rows written."""
        if not self.pending:
            return 0
        self.open()
        rows, self.pending = self.pending, []
        try:
            self._write(rows)
        except sqlite3.DatabaseError as exc:
            if not _damaged(exc):
                log.error("history: %d samples not written to %s (%s: %s)", len(rows), self.path,
                          type(exc).__name__, exc)
                return 0
            self._move_aside(exc)
            self.open()
            self._write(rows)
        self.flushes += 1
        return len(rows)

    def _write(self, rows) -> None:
        with self.db:
            self.db.executemany("INSERT INTO samples (name, t_ns, value) VALUES (?, ?, ?)", rows)
            if self.flushes % 100 == 0:
                self.db.execute("DELETE FROM samples WHERE t_ns < ?", (time.time_ns() - self.retention_ns,))

    # -- HistoryStorageInterface ------------------------------------------------------------------
    async def new_historized_node(self, node_id, period, count=0) -> None:
        pass  # the updater appends historized values itself; no subscription needed

    async def save_node_value(self, node_id, datavalue) -> None:
        name = self.names.get(node_id)
        if name is not None and datavalue.Value is not None and datavalue.SourceTimestamp is not None:
            self.append(name, _ns(datavalue.SourceTimestamp), float(datavalue.Value.Value))

    async def read_node_history(self, node_id, start, end, nb_values):
        name = self.names.get(node_id)
        if name is None:
            return [], None
        lo = _ns(start) if start and start > datetime(1601, 1, 2, tzinfo=timezone.utc) else 0
        hi = _ns(end) if end and end > datetime(1601, 1, 2, tzinfo=timezone.utc) else 2**62
        reverse = lo > hi  # Part 11: start after end = newest first
        a, b = (hi, lo) if reverse else (lo, hi)
        self.open()
        rows = self.db.execute("SELECT t_ns, value FROM samples WHERE name = ? AND t_ns BETWEEN ? AND ? "
                               "ORDER BY t_ns", (name, a, b)).fetchall()
        rows += [(t, v) for n, t, v in self.pending if n == name and a <= t <= b]
        rows.sort(reverse=reverse)
        limit = nb_values if nb_values else self.max_history_data_response_size
        cont = None
        if len(rows) > limit:
            cont = _dt(rows[limit][0])
            rows = rows[:limit]
        k = self.scale.get(name, 1.0)
        out = [ua.DataValue(ua.Variant(v * k if v is not None else None, ua.VariantType.Double),
                            SourceTimestamp=_dt(t), ServerTimestamp=_dt(t)) for t, v in rows]
        return out, cont

    async def new_historized_event(self, source_id, evtypes, period, count=0) -> None:
        raise NotImplementedError("event history is not kept")

    async def save_event(self, event) -> None:
        pass

    async def read_event_history(self, source_id, start, end, nb_values, evfilter):
        return [], None

    async def stop(self) -> None:
        self.close()

    def close(self) -> None:
        if self.db is not None:
            self.flush()
            self.db.close()
            self.db = None
