"""Source and Sink contracts and the one loop that moves transactions from a Source to a Sink.

Group commit lives here as a contract, not as I/O: a sink that can defer durability has a
`flush()`, a source that knows whether more is already fetched has a `buffered()`. The loop then
flushes only when the source has nothing more at hand, so a batch never waits for data to arrive
(follow mode keeps its latency) and always ends at a transaction boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from pipeline.errors import PipelineError
from pipeline.model import Position, Transaction


class Source(Protocol):
    """Yields committed transactions of one database, in txn-id order.

    Optionally, `buffered() -> bool`: True if the next transaction is already (at least partly) at
    hand, so reading it will not wait for new data. The loop lets a batching sink keep staging while
    it is True. A source without it is treated as never buffered (every txn is flushed at once).
    """

    def transactions(self, after: Position) -> Iterator[Transaction]:
        """Transactions following `after` (a source may redeliver earlier ones; the loop skips them)."""
        ...

    def acknowledge(self, txn: Transaction) -> None:
        """`txn` is durably applied downstream; the source may forget it (commit offsets, truncate)."""
        ...


class Sink(Protocol):
    """Applies transactions atomically and idempotently, storing its position with its data.

    Optionally, `flush() -> None` (a batching sink): apply() may then only stage and verify a txn,
    and flush() makes every staged txn durable and visible at once. position() is always the durable
    position, so after flush() it is the last applied txn's.
    """

    def position(self) -> Position: ...

    def apply(self, txn: Transaction) -> None:
        """Stage `txn.changes`, verify `txn.checksum_after`, then make it visible all at once.

        On any error nothing of `txn` may be visible (or staged) and position() must be unchanged.
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
        raise txn.error(f"txn id gap: replica is at txn {position.txn_id}, next record is txn {txn.txn_id}")
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
    at-least-once delivery exactly-once at the sink. Transactions are acknowledged and reported
    (`on_applied`) only once durable: for a batching sink, after the flush that committed them.
    If anything fails, the txns applied before the failure are still flushed, so the sink stops
    at the last good txn.
    """
    flush: Callable[[], None] | None = getattr(sink, "flush", None)
    buffered: Callable[[], bool] | None = getattr(source, "buffered", None)
    position = sink.position()
    pending: list[Transaction] = []  # applied, and durable only after the next flush

    def commit(failing: bool = False) -> None:
        """Flush, then acknowledge the pending txns the sink made durable.

        `failing`: another error is being reported, and the sink may have dropped its staged txns
        because of it (a full disk). Then only the durable ones are acknowledged, the rest are read
        again after a restart, and the position is not compared: a mismatch would hide the cause.
        """
        if not pending:
            return
        if flush is not None:
            flush()
        applied, last = sink.position(), pending[-1]
        if failing:
            done = [txn for txn in pending if txn.txn_id <= applied.txn_id]
        elif applied != last.after:
            raise PipelineError(
                f"sink reports {applied} after applying txn {last.txn_id}, expected {last.after}",
                database=last.database,
                txn_id=last.txn_id,
                offset=last.offset,
            )
        else:
            done = list(pending)
        pending.clear()
        for txn in done:
            source.acknowledge(txn)
            if on_applied is not None:
                on_applied(txn)

    try:
        for txn in source.transactions(position):
            if txn.txn_id <= position.txn_id:
                for _ in txn.changes:  # drain: the redelivered txn is already applied
                    pass
                continue
            check_continues(position, txn)
            sink.apply(txn)
            position = txn.after
            pending.append(txn)
            # Commit unless more is already at hand; a sink that committed on its own (a batch cap, a
            # snapshot) already reports the txn's position: acknowledge what it made durable.
            if flush is None or buffered is None or sink.position() == txn.after or not buffered():
                commit()
            if should_stop is not None and should_stop():
                break
    except BaseException as exc:
        # A bad txn, a broken stream, Ctrl-C: what was applied before it is good, keep it.
        try:
            commit(failing=True)
        except Exception as also:  # noqa: BLE001 - the first failure is the one to report
            exc.add_note(f"also, committing the txns applied before it failed: {type(also).__name__}: {also}")
        raise
    commit()
    return sink.position()
