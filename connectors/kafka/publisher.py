"""The capture side: each pipeline transaction as one Kafka transaction, committed once every record is acked."""

from __future__ import annotations

from collections import deque

from kafka import KafkaProducer
from kafka.errors import (
    KafkaError,
    KafkaTimeoutError,
)

from connectors.kafka.client import (
    FENCED,
    Kafka,
    KafkaSettings,
    broker_error,
    is_fenced,
)
from connectors.kafka.topics import PARTITION, topic_for
from pipeline.codec import Codec
from pipeline.errors import PipelineError
from pipeline.model import Position, Transaction

IN_FLIGHT_BYTES = 24 << 20  # TopicSink: unacknowledged record bytes at most (plus one MiB)


def end_transaction(producer: KafkaProducer, *, commit: bool, timeout_s: float) -> None:
    """commit_transaction()/abort_transaction(), but bounded: kafka-python waits for the coordinator's
    answer with no timeout, and a coordinator that never answered hung the agent forever."""
    manager = getattr(producer, "_transaction_manager", None)
    sender = getattr(producer, "_sender", None)
    if manager is None or sender is None or not hasattr(manager, "begin_commit"):
        (producer.commit_transaction if commit else producer.abort_transaction)()  # a later kafka-python
        return
    result = manager.begin_commit() if commit else manager.begin_abort()
    sender.wakeup()
    if not result.wait(timeout_ms=int(timeout_s * 1000)):
        raise KafkaTimeoutError(
            f"no answer from the transaction coordinator within {timeout_s:.0f} s "
            f"to {'commit' if commit else 'abort'} the transaction"
        )


def flush_checked(producer: KafkaProducer, failed: list[BaseException], timeout_s: float) -> None:
    """Wait until every record sent in this transaction is acknowledged; raise the first that was not.

    kafka-python 3.0 fails a batch of a transaction without making the transaction abortable when the
    error is retriable but its time or retries ran out, or when an epoch bump dropped it: a commit
    after that succeeds and writes a COMMIT marker over missing records. So no commit without this.
    `failed` is filled by each send's errback.
    """
    producer.flush(timeout=timeout_s)  # raises KafkaTimeoutError if records are still out
    if failed:
        raise failed[0]


class TopicSink:
    """Publishes each transaction as one Kafka transaction (the capture agent's Sink).

    The transactional.id is derived from the database, so a second agent for the same
    database fences the first: the broker rejects the older producer epoch.

    A transaction commits only if every record of it was acknowledged: kafka-python 3.0 lets a
    transaction commit after one of its batches failed with a retriable error (delivery timeout,
    retries spent) or an epoch bump dropped it, which wrote a COMMIT marker over missing records
    (README "Kafka faults"). Every wait is bounded by `timeout_s`; after any failure the producer
    is closed and the error is retriable, so the caller rebuilds it (init_transactions fences the
    old epoch and settles its open transaction) and reads the topic's last txn back before
    publishing again.
    """

    def __init__(
        self,
        kafka: Kafka,
        database: str,
        codec: Codec,
        position: Position | None = None,
        *,
        transaction_timeout_ms: int = 600_000,
        timeout_s: float = 10.0,
    ) -> None:
        self.database = database
        self.topic = topic_for(database)
        self.codec = codec
        self.timeout_s = timeout_s
        self._position = position or Position(0, 0)
        self.bytes_sent = 0
        timeout_ms = int(timeout_s * 1000)
        try:
            self.producer = KafkaSettings.of(kafka).producer(
                client_id=f"capture-agent-{database}",
                transactional_id=f"pool-pipeline.capture.{database}",
                enable_idempotence=True,
                acks="all",
                linger_ms=5,
                batch_size=1024 * 1024,
                max_request_size=4 * 1024 * 1024,
                transaction_timeout_ms=transaction_timeout_ms,
                # kafka-python waits retry_backoff_ms before a transaction that begins right after a
                # commit; the 100 ms default put 100 ms stalls into commit->replica lag (bench/lag.py).
                retry_backoff_ms=10,
                allow_auto_create_topics=False,
                max_block_ms=timeout_ms,  # send() waiting for metadata, init_transactions
                request_timeout_ms=timeout_ms,
                delivery_timeout_ms=max(2 * timeout_ms, timeout_ms + 5_000),
            )
        except KafkaError as exc:
            raise broker_error("cannot start the transactional producer", exc, database=database) from exc
        try:
            self.producer.init_transactions()
        except FENCED as exc:
            self.producer.close(timeout=1)
            raise self._fenced(exc) from exc
        except KafkaError as exc:
            self.producer.close(timeout=1)
            raise broker_error(
                f"cannot start the transactional producer (transactional.id pool-pipeline.capture.{database}, "
                f"topic {self.topic})",
                exc,
                database=database,
            ) from exc

    def _fenced(self, exc: Exception) -> PipelineError:
        return PipelineError(
            f"fenced: another capture-agent now publishes database {self.database!r} "
            f"(transactional.id pool-pipeline.capture.{self.database}); this one stops ({type(exc).__name__})",
            database=self.database,
            txn_id=self._position.txn_id + 1,
        )

    def set_position(self, position: Position) -> None:
        self._position = position

    def position(self) -> Position:
        return self._position

    def apply(self, txn: Transaction) -> None:
        # kafka-python has no buffer_memory bound: a producer fed faster than the broker acks (a 1 GiB
        # snapshot, a big backlog round) buffered it all. Wait for the record sent IN_FLIGHT_BYTES ago,
        # so memory stays bounded whatever the transaction's size (bench/rss.py).
        marks: deque[tuple[int, object]] = deque()  # (bytes sent so far, future of that record), every MiB
        failed: list[BaseException] = []  # any record of this transaction the broker did not take
        sent = next_mark = 0
        try:
            self.producer.begin_transaction()
            send = self.producer.send
            for key, value in self.codec.transaction_records(txn):
                future = send(self.topic, value=value, key=key, partition=PARTITION)
                future.add_errback(failed.append)
                sent += len(value) + len(key)
                if sent >= next_mark:
                    marks.append((sent, future))
                    next_mark = sent + (1 << 20)
                    while sent - marks[0][0] > IN_FLIGHT_BYTES:
                        marks.popleft()[1].get(timeout=self.timeout_s)  # type: ignore[attr-defined]
                if failed:
                    raise failed[0]
            flush_checked(self.producer, failed, self.timeout_s)
            self.bytes_sent += sent
            self._end(commit=True)
        except PipelineError:
            self._abandon()
            raise
        except Exception as exc:
            if is_fenced(exc):
                self._abandon(abort=False)
                raise self._fenced(exc) from exc
            self._abandon()
            raise broker_error(
                "publishing failed, the transaction was not committed", exc, database=txn.database, txn_id=txn.txn_id
            ) from exc
        self._position = txn.after

    def _end(self, *, commit: bool) -> None:
        end_transaction(self.producer, commit=commit, timeout_s=self.timeout_s)

    def _abandon(self, abort: bool = True) -> None:
        """After a failure: abort if the producer still can (bounded), then close it. The caller rebuilds
        a producer, whose init_transactions fences this epoch and settles whatever is left open."""
        if abort:
            try:
                self._end(commit=False)
            except Exception:  # noqa: BLE001 - the caller reports the first failure
                pass
        self.close(timeout=2)

    def close(self, timeout: float = 10) -> None:
        try:
            self.producer.close(timeout=timeout)
        except Exception:  # noqa: BLE001 - closing a producer in a fatal state may raise; nothing to keep
            pass
