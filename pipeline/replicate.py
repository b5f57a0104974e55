"""Source and Sink contracts and the one loop that moves transactions from a Source to a Sink."""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

from pipeline.errors import PipelineError
from pipeline.model import Position, Transaction


class Source(Protocol):
    """Yields committed transactions of one database, in txn-id order."""

    def transactions(self, after: Position) -> Iterator[Transaction]:
        """Transactions following `after` (a source may redeliver earlier ones; the loop skips them)."""
        ...

    def acknowledge(self, txn: Transaction) -> None:
        """`txn` is durably applied downstream; the source may forget it (commit offsets, truncate)."""
        ...


class Sink(Protocol):
    """Applies transactions atomically and idempotently, storing its position with its data."""

    def position(self) -> Position:
        ...

    def apply(self, txn: Transaction) -> None:
        """Stage `txn.changes`, verify `txn.checksum_after`, then make it visible all at once.

        On any error nothing of `txn` may be visible and position() must be unchanged.
        """
        ...


def check_continues(position: Position, txn: Transaction) -> None:
    """Raise unless `txn` is the next transaction after `position` (LiteFS: a write must continue the position).

    A snapshot is a full image, so it needs no continuity: it may follow any earlier position (a
    fresh replica starting at the latest snapshot, or a replica re-based after a divergence).
    """
    if txn.snapshot and txn.txn_id > position.txn_id:
        return
    if txn.txn_id != position.txn_id + 1:
        raise txn.error(
            f"txn id gap: replica is at txn {position.txn_id}, next record is txn {txn.txn_id}"
        )
    if txn.checksum_before != position.checksum:
        raise txn.error(
            f"diverged: replica checksum at txn {position.txn_id} is {position.checksum:016x}, "
            f"but txn {txn.txn_id} continues from {txn.checksum_before:016x}"
        )


def replicate(
    source: Source,
    sink: Sink,
    *,
    on_applied: Callable[[Transaction], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Position:
    """Apply every transaction the source yields after the sink's position; return the final position.

    Redelivered transactions (txn id at or below the position) are skipped, which makes
    at-least-once delivery exactly-once at the sink.
    """
    position = sink.position()
    for txn in source.transactions(position):
        if txn.txn_id <= position.txn_id:
            for _ in txn.changes:  # drain: the redelivered txn is already applied
                pass
            continue
        check_continues(position, txn)
        sink.apply(txn)
        applied = sink.position()
        if applied != txn.after:
            raise PipelineError(
                f"sink reports {applied} after applying txn {txn.txn_id}, expected {txn.after}",
                database=txn.database, txn_id=txn.txn_id, offset=txn.offset,
            )
        position = applied
        source.acknowledge(txn)
        if on_applied is not None:
            on_applied(txn)
        if should_stop is not None and should_stop():
            break
    return position
