"""Begin/commit framing of one database's record stream: the one place that checks it, with no decoding and no I/O.

A transaction travels as a TxnBegin, its change records (and SnapshotMarkers), and a TxnCommit
that carries the count of change records; TxnBegin and TxnCommit are keyed b"txn". The codec
(every record decoded), the archiver (only begins, markers and commits decoded) and the readers
(keys only: where a transaction ends) all frame with what is here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pipeline.errors import PipelineError

TXN_KEY = b"txn"  # the key of TxnBegin and TxnCommit records: a reader finds transaction boundaries by it
BEGIN = "pool.pipeline.TxnBegin"
COMMIT = "pool.pipeline.TxnCommit"
SNAPSHOT = "pool.pipeline.SnapshotMarker"


class Record(Protocol):
    """What is read of a record: kafka-python's ConsumerRecord has these, so readers pass its records on uncopied."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int: ...


@dataclass
class TxnFrame:
    """The transaction being framed: where it starts and what its begin said."""

    txn_id: int
    offset: int
    time_ms: int
    snapshot: bool
    checksum_before: int  # as the begin record carries it (signed)
    records: int = 0  # change records so far (SnapshotMarkers are not counted)
    phase: str | None = None  # the last SnapshotMarker's phase


class TxnFramer:
    """Checks a record stream transaction by transaction; the caller decodes and says what each record is.

    `begin()` for a TxnBegin, `record()` for any other record (with its name, database and txn id,
    which every record starts with), then `marker()` for a SnapshotMarker or `commit()` for a
    TxnCommit. Every error names the database, txn id, topic and offset.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self.open: TxnFrame | None = None

    def error(self, message: str, rec: Record, txn_id: int | None = None) -> PipelineError:
        return PipelineError(message, database=self.database, txn_id=txn_id, topic=rec.topic, offset=rec.offset)

    def _foreign(self, database: str | None, txn_id: int | None, rec: Record) -> PipelineError:
        return self.error(f"record of foreign database {database!r} in the stream of {self.database!r}", rec, txn_id)

    def _begin_inside(self, rec: Record) -> PipelineError:
        assert self.open is not None
        return self.error("TxnBegin inside an open transaction (missing TxnCommit)", rec, self.open.txn_id)

    def begin(self, value: dict, rec: Record) -> TxnFrame:
        """A decoded TxnBegin: opens its transaction."""
        if value["database"] != self.database:
            raise self._foreign(value["database"], value["txn_id"], rec)
        if self.open is not None:
            raise self._begin_inside(rec)
        self.open = TxnFrame(
            value["txn_id"], rec.offset, value["source_time_ms"], value["snapshot"], value["checksum_before"]
        )
        return self.open

    def record(self, name: str, database: str | None, txn_id: int | None, rec: Record) -> TxnFrame:
        """Any record but a TxnBegin that opens a transaction: checks that it belongs to the open one."""
        frame = self.open
        if database != self.database:
            raise self._foreign(database, txn_id, rec)
        if frame is None:
            raise self.error(f"{name.rsplit('.', 1)[-1]} record outside a transaction (expected TxnBegin)", rec, txn_id)
        if name == BEGIN:
            raise self._begin_inside(rec)
        if txn_id != frame.txn_id:
            raise self.error(f"record of txn {txn_id} inside txn {frame.txn_id} (missing TxnCommit)", rec, frame.txn_id)
        if name != COMMIT and name != SNAPSHOT:
            frame.records += 1
        return frame

    def marker(self, phase: str, rec: Record) -> None:
        """A decoded SnapshotMarker's phase (after `record()`): START, then END, in snapshot transactions only."""
        frame = self.open
        assert frame is not None, "marker() without an open transaction (record() checks that first)"
        if not frame.snapshot or phase != ("START" if frame.phase is None else "END"):
            raise self.error(f"unexpected SnapshotMarker {phase}", rec, frame.txn_id)
        frame.phase = phase

    def commit(self, value: dict, rec: Record) -> TxnFrame:
        """A decoded TxnCommit (after `record()`): checks the count and closes the transaction."""
        frame = self.open
        assert frame is not None, "commit() without an open transaction (record() checks that first)"
        if value["record_count"] != frame.records:
            raise self.error(
                f"transaction has {frame.records} change records, commit says {value['record_count']}",
                rec,
                frame.txn_id,
            )
        if value["checksum_before"] != frame.checksum_before:
            raise self.error("commit's checksum_before differs from begin's", rec, frame.txn_id)
        if frame.snapshot and frame.phase != "END":
            raise self.error("snapshot transaction without SnapshotMarker END", rec, frame.txn_id)
        self.open = None
        return frame

    def end(self) -> None:
        """The stream ended: an open transaction there is an error (retriable: the rest may still come)."""
        if self.open is not None:
            raise PipelineError(
                "stream ended inside a transaction (no TxnCommit)",
                database=self.database,
                txn_id=self.open.txn_id,
                offset=self.open.offset,
                retriable=True,
            )
