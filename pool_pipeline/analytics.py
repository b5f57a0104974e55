"""The built-in analytics consumer: per-window statistics of change streams, exactly once to Kafka or SQLite."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable

from connectors.kafka.topics import topic_for
from pipeline.errors import PipelineError
from pipeline.stats import (
    DEFAULT_TOP_BLOCKS,
    DEFAULT_WINDOW_MS,
    STATS_SUFFIX,
    Windows,
    WindowStats,
    stats_topic,
    summarize,
)
from pool_pipeline.changes import (
    ChangeStream,
    Checkpoint,
    KafkaTransactions,
    Rebalanced,
    SqliteOutput,
)

STATS_RECORD = "pool.pipeline.WindowStats"
TRANSACTIONAL_PREFIX = "pool-pipeline.analytics"
_COLUMNS = list(WindowStats.__dataclass_fields__)
_QUOTED = ", ".join(f'"{c}"' for c in _COLUMNS)  # "database" and "bytes" are SQL words


class Analytics:
    """Reads a ChangeStream, keeps one open window per assigned database, writes each window once it closes.

    A window closes when a transaction of a later window arrives. Its record and the offset just
    after its last transaction are committed together (one Kafka transaction, and/or one SQLite
    transaction), so after a crash the open window is rebuilt from the committed offset and
    every window is written exactly once, identical on every replay.
    """

    def __init__(
        self,
        stream: ChangeStream,
        *,
        window_ms: int = DEFAULT_WINDOW_MS,
        top_blocks: int = DEFAULT_TOP_BLOCKS,
        to_kafka: bool = True,
        stats_topic_template: str = "{topic}" + STATS_SUFFIX,
        sqlite_path: str | None = None,
        transactional_prefix: str = TRANSACTIONAL_PREFIX,
        commit_interval_s: float = 0.5,
        log: Callable[[str], None] = print,
    ) -> None:
        if not to_kafka and not sqlite_path:
            raise PipelineError("analytics needs an output: the stats topic, a SQLite file, or both")
        stats_topic(topic_for("x"), stats_topic_template, "x")  # reject a bad template before reading anything
        self.stream = stream
        self.codec = stream.codec
        self.window_ms = window_ms
        self.top_blocks = top_blocks
        self.template = stats_topic_template
        self.log = log
        self.windows: dict[str, Windows] = {}
        # Closed windows not written yet. Written every commit_interval_s and whenever the stream is
        # idle: one Kafka transaction per database and interval, not one per window, so replaying a
        # long history with short windows is not bound by transaction round trips.
        self.pending: dict[str, list[WindowStats]] = {}
        self.commit_interval_s = commit_interval_s
        self._last_flush = 0.0
        self.written: dict[str, int] = {}  # windows written per database, this run
        self.txns = 0
        self._last_log = 0.0
        stream.listen(self)  # first, so a moved database's open window is dropped before outputs re-init
        stream.on_idle(self.flush)
        self.kafka = (
            KafkaTransactions(stream, transactional_prefix, topics=lambda db: [self.stats_topic(db)])
            if to_kafka
            else None
        )
        self.sqlite = SqliteOutput(stream, sqlite_path, commit_group=not to_kafka) if sqlite_path else None
        if self.sqlite is not None:
            self.sqlite.conn.execute(
                f'CREATE TABLE IF NOT EXISTS window_stats ({_QUOTED}, PRIMARY KEY ("database", window_start_ms))'
            )

    # StreamListener: a database given to or taken from this member.
    def assigned(self, database: str) -> None:
        self.windows.pop(database, None)
        self.pending.pop(database, None)
        self.log(f"analytics {database}: assigned to this member of group {self.stream.group}")
        return None

    def revoked(self, database: str) -> None:
        self.windows.pop(database, None)  # its open window is rebuilt by whoever reads it next
        self.pending.pop(database, None)  # not committed: rebuilt too
        self.log(f"analytics {database}: released by this member of group {self.stream.group}")

    def stats_topic(self, database: str) -> str:
        return stats_topic(topic_for(database), self.template, database)

    def run(self) -> int:
        """Follow the stream (until caught up with `once`); returns the number of windows written."""
        for txn in self.stream:
            try:
                summary = summarize(txn)
            except Rebalanced:
                continue  # the database moved mid-transaction; its new reader starts at the committed offset
            self.txns += 1
            windows = self.windows.get(txn.database)
            if windows is None:
                windows = self.windows[txn.database] = Windows(txn.database, self.window_ms, self.top_blocks)
            closed = windows.add(summary)
            if closed is not None:
                self.pending.setdefault(txn.database, []).append(closed)
            if self.pending and time.monotonic() - self._last_flush >= self.commit_interval_s:
                self.flush()
        self.flush()
        for database, windows in sorted(self.windows.items()):
            if windows.open is not None:
                self.log(
                    f"analytics {database}: {self.written.get(database, 0)} windows written; the open window "
                    f"(txns {windows.open.first.txn_id}..{windows.open.last.txn_id}) is written once it closes"
                )
        return sum(self.written.values())

    def flush(self) -> None:
        """Write every closed window not written yet: per database, one transaction per output."""
        for database in sorted(self.pending):
            batch = self.pending.pop(database, [])
            if batch:
                self._write(database, batch)
        self._last_flush = time.monotonic()

    def _write(self, database: str, batch: list[WindowStats]) -> None:
        cp = _checkpoint(batch[-1])
        try:
            if self.kafka is not None:
                # After a restart an output may already hold some of these windows: skip those.
                todo = [w for w in batch if not self.kafka.done(_checkpoint(w))]
                if todo:
                    topic = self.stats_topic(database)
                    self.kafka.send(cp, [(topic, w.key, self.codec.encode(STATS_RECORD, w.to_record())) for w in todo])
            if self.sqlite is not None:
                todo = [w for w in batch if not self.sqlite.done(_checkpoint(w))]
                if todo:
                    with self.sqlite.transaction(cp) as db:
                        db.executemany(
                            f"INSERT INTO window_stats VALUES ({', '.join('?' * len(_COLUMNS))})",
                            [_row(w) for w in todo],
                        )
        except PipelineError as exc:
            if not exc.retriable:
                raise
            self.log(f"analytics {database}: {exc}; re-reading it from its committed offset")
            if self.sqlite is not None:
                self.stream.restart(database)  # KafkaTransactions.send restarts by itself
            return
        self.written[database] = self.written.get(database, 0) + len(batch)
        now = time.monotonic()
        if now - self._last_log >= 2:
            self._last_log = now
            self.log(
                f"analytics {database}: windows up to {batch[-1].window_start_ms} (txn {batch[-1].last_txn}) "
                f"written; {sum(self.written.values())} windows, {self.txns} txns this run"
            )

    def close(self) -> None:
        if self.kafka is not None:
            self.kafka.close()
        if self.sqlite is not None:
            self.sqlite.close()


def _checkpoint(w: WindowStats) -> Checkpoint:
    """Where reading resumes once `w` is written: just after its last transaction."""
    return Checkpoint(w.database, w.last_txn, w.last_source_time_ms, w.end_offset)


def _row(w: WindowStats) -> list[object]:
    rec = w.to_record()
    return [json.dumps(rec[c]) if isinstance(rec[c], list) else rec[c] for c in _COLUMNS]


def read_sqlite_stats(path: str) -> list[WindowStats]:
    """Every window in an analytics SQLite file, by database and window."""
    conn = sqlite3.connect(path)
    try:
        conn.row_factory = sqlite3.Row
        out = []
        for row in conn.execute('SELECT * FROM window_stats ORDER BY "database", window_start_ms'):
            rec = {c: (json.loads(row[c]) if c in ("files", "hottest_blocks") else row[c]) for c in _COLUMNS}
            out.append(WindowStats.from_record(rec))
        return out
    finally:
        conn.close()
