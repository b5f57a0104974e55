"""The committed-stream readers: one database from an offset (TopicSource), or many in a group (GroupReader)."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from kafka.errors import (
    KafkaError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from connectors.kafka.client import POLL_RECORDS, Kafka, broker_error, committed_consumer, paced_fetches
from connectors.kafka.topics import PARTITION, TOPIC_PREFIX, database_for, topic_for
from pipeline.codec import Codec, Record
from pipeline.errors import PipelineError
from pipeline.framing import TXN_KEY
from pipeline.model import Position, Transaction
from pipeline.stats import STATS_SUFFIX


def offset_metadata(txn_id: int, source_time_ms: int | None) -> str:
    """The metadata of every pool-pipeline group's offsets, JSON {"txn", "source_time_ms"}, shown by status."""
    meta = {"txn": txn_id}
    if source_time_ms:
        meta["source_time_ms"] = source_time_ms
    return json.dumps(meta)


def read_offset_metadata(metadata: str | None) -> tuple[int | None, int | None]:
    """(applied txn id, its source time in ms) from offset_metadata()'s JSON; None for what it lacks or garbles."""
    try:
        meta = json.loads(metadata or "{}")
    except ValueError:
        meta = None
    return (meta.get("txn"), meta.get("source_time_ms")) if isinstance(meta, dict) else (None, None)


def topic_regex(pattern: str) -> str:
    """The subscription regex of a group over the databases whose names match `pattern`.

    The prefix's dot is literal (`pool.x`, never `poolXx`), and stats topics (`<db topic>.stats`)
    are outputs, never inputs, even when the pattern matches them.
    """
    return f"^{re.escape(TOPIC_PREFIX)}(?!.*{re.escape(STATS_SUFFIX)}$)(?:{pattern})$"


class OffsetCommitter:
    """Group offsets after applied txns, with txn id and time for `pipeline status`.

    They only show lag (the sink's own stored position is the truth), so they are committed
    asynchronously and at most every `interval` s: a synchronous commit per txn took 60% of the
    replica's time (bench/replica_throughput.py). `flush()` commits the last one synchronously.
    An offset that could not be committed (the group coordinator was down) is kept and sent with
    the next commit, so after an outage the group shows where the sink really is.
    """

    def __init__(self, consumer: KafkaConsumer, interval: float = 0.2) -> None:
        self.consumer = consumer
        self.interval = interval
        self.pending: dict[TopicPartition, OffsetAndMetadata] = {}
        self.last = 0.0

    def applied(self, tp: TopicPartition, txn: Transaction) -> None:
        assert txn.end_offset is not None, "a transaction read from a topic has its end offset"
        self.at(tp, txn.end_offset + 1, txn.txn_id, txn.source_time_ms)

    def at(self, tp: TopicPartition, next_offset: int, txn_id: int, source_time_ms: int | None) -> None:
        """The sink holds everything before `next_offset`, up to `txn_id`."""
        self.pending[tp] = OffsetAndMetadata(next_offset, offset_metadata(txn_id, source_time_ms), -1)
        if time.monotonic() - self.last >= self.interval:
            self._commit(sync=False)

    def flush(self) -> None:
        if self.pending:
            self._commit(sync=True)

    def _commit(self, sync: bool) -> None:
        offsets, self.pending, self.last = self.pending, {}, time.monotonic()

        def keep(failed: object = None) -> None:  # newer offsets recorded meanwhile win
            for tp, meta in offsets.items():
                self.pending.setdefault(tp, meta)

        try:
            if sync:
                self.consumer.commit(offsets)
            else:
                future = self.consumer.commit_async(offsets)
                if future is not None and hasattr(future, "add_errback"):
                    future.add_errback(keep)
        except KafkaError:
            keep()  # lag display only: tried again with the next commit


class TopicSource:
    """Reads committed transactions of one database from its topic, from a given offset (a Source).

    The sink's stored position decides where reading starts; group offsets are committed
    after each applied transaction only so that lag is visible to operators.
    """

    def __init__(
        self,
        kafka: Kafka,
        database: str,
        codec: Codec,
        group: str,
        start_offset: int,
        *,
        once: bool = False,
        idle: Callable[[], None] | None = None,
        min_interval: float = 0,
    ) -> None:
        self.database = database
        self.topic = topic_for(database)
        self.codec = codec
        self.once = once
        self.idle = idle
        self.tp = TopicPartition(self.topic, PARTITION)
        self.group = group
        self.consumer = committed_consumer(kafka, group, **paced_fetches(min_interval))
        self.offsets = OffsetCommitter(self.consumer)
        try:
            if self.topic not in self.consumer.topics():
                raise PipelineError(
                    f"topic {self.topic} does not exist: is a capture-agent running for {database!r}?",
                    database=database,
                    retriable=True,
                )
            self.consumer.assign([self.tp])
            begin = self.consumer.beginning_offsets([self.tp])[self.tp]
            if start_offset < begin:
                raise PipelineError(
                    f"reading needs offset {start_offset} but topic {self.topic} starts at {begin} "
                    "(retention deleted the records before it): a replica catches up with --archive "
                    "s3://BUCKET/PREFIX; an archive cannot, it continues after `capture-agent --snapshot` "
                    "with `archive --skip-to-snapshot` (a gap in the archive)",
                    database=database,
                    offset=start_offset,
                )
            self.consumer.seek(self.tp, start_offset)
            self.end_at_start = self.consumer.end_offsets([self.tp])[self.tp]
        except KafkaError as exc:
            self.consumer.close()
            raise broker_error(f"cannot read topic {self.topic}", exc, database=database) from exc
        self._buf: deque = deque()  # records of the last poll not handed out yet

    def _records(self) -> Iterator[Record]:
        while True:
            while self._buf:  # buffered() may see it refilled while we are suspended
                yield self._buf.popleft()
            if self.once and self.consumer.position(self.tp) >= self.end_at_start:
                return
            self._poll()

    def _poll(self) -> None:
        # max_records is high so that one poll hands over everything the client already fetched:
        # that is what buffered() reports, and so what one group commit of the replica may cover.
        try:
            self._buf.extend(self.consumer.poll(timeout_ms=100, max_records=POLL_RECORDS).get(self.tp, []))
        except KafkaError as exc:  # e.g. GroupAuthorizationFailedError: the group's ACLs are missing
            raise broker_error(
                f"cannot read topic {self.topic} as consumer group {self.group}", exc, database=self.database
            ) from exc
        if not self._buf:
            self.offsets.flush()  # idle: make the lag display exact
            if self.idle is not None:
                self.idle()

    def buffered(self) -> bool:
        """True if records the last poll returned are still unread: a group-committing sink keeps
        batching (pipeline.replicate). Never touches the network: a poll(timeout_ms=0) here made
        kafka-python 3 miss the wake-up of the next poll, adding 100 ms stalls (bench/lag.py p99)."""
        return bool(self._buf)

    def transactions(self, after: Position) -> Iterator[Transaction]:
        return self.codec.read_transactions(self._records(), self.database, batches=True)

    def records(self) -> Iterator[Record]:
        """The raw committed records, for consumers that keep them as they are."""
        return self._records()

    def records_or_idle(self) -> Iterator[Record | None]:
        """The raw committed records, and None after each poll that found nothing new (every ~100 ms
        while the topic is quiet): the archiver closes a segment on time even when no record comes."""
        while True:
            while self._buf:
                yield self._buf.popleft()
            if self.once and self.consumer.position(self.tp) >= self.end_at_start:
                return
            self._poll()
            if not self._buf:
                yield None

    def acknowledge(self, txn: Transaction) -> None:
        self.offsets.applied(self.tp, txn)

    def close(self) -> None:
        self.offsets.flush()
        self.consumer.close()


class GroupMember:
    """One member of a consumer group over database topics: what GroupReader (`replica --pattern`) and
    pool_pipeline.changes.ChangeStream share.

    A subclass builds `consumer` and `offsets`, joins with `_join()` and takes its notes of a
    rebalance in `_on_assigned`/`_on_revoked`. kafka-python calls those inside poll(); an error
    there is raised from `_poll_group()` (kafka-python would only log it).
    """

    consumer: KafkaConsumer
    offsets: OffsetCommitter
    _listener_error: BaseException | None = None

    def assigned(self) -> list[str]:
        return sorted(database_for(tp.topic) for tp in self.consumer.assignment())

    def _join(self, pattern: str | None, topics: Sequence[str] = ()) -> None:
        """Subscribe to the database topics `pattern` matches (see topic_regex), or else to `topics`."""
        self.consumer.subscribe(
            topics=topics if pattern is None else (),
            listener=_Rebalance(self),
            pattern=None if pattern is None else topic_regex(pattern),
        )

    def _on_assigned(self, tps: Iterable[TopicPartition]) -> None:
        raise NotImplementedError  # each subclass notes its new partitions

    def _on_revoked(self, tps: Iterable[TopicPartition]) -> None:
        self.offsets.flush()  # before the partitions change hands

    def _poll_group(self, timeout_ms: int, max_records: int) -> dict:
        batch = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        if self._listener_error is not None:
            error, self._listener_error = self._listener_error, None
            raise error
        return batch

    def _resumable(self, tp: TopicPartition) -> bool:
        return tp in self.consumer.assignment()

    @contextlib.contextmanager
    def _only(self, tp: TopicPartition) -> Iterator[None]:
        """Fetch only partition `tp` meanwhile: the others are paused, so they do not pile up in memory."""
        others = [p for p in self.consumer.assignment() if p != tp and p not in self.consumer.paused()]
        self.consumer.pause(*others)
        try:
            yield
        finally:
            self.consumer.resume(*[p for p in others if self._resumable(p)])

    @staticmethod
    def _txn_records(buf: deque, more: Callable[[bool], bool]) -> Iterator[Record]:
        """The records of `buf` up to a transaction boundary (TxnBegin and TxnCommit are keyed TXN_KEY).

        When `buf` runs dry, `more(inside a transaction)` fetches into it and says whether to go on.
        """
        inside = False
        while True:
            while buf:
                r = buf.popleft()
                if r.key == TXN_KEY:
                    inside = not inside
                yield r
            if not more(inside):
                return

    def close(self) -> None:
        self.offsets.flush()
        self.consumer.close()


class GroupReader(GroupMember):
    """One consumer in a group subscribed to many database topics (`replica --pattern`).

    Kafka spreads the topics' partitions over the group's members. `sources()` yields, for each
    assigned database with pending records, a Source over that partition alone: it pauses the
    other partitions while a transaction is open and ends at a transaction boundary, so one
    replicate() loop per database can run in turn without buffering whole transactions.
    """

    def __init__(
        self,
        kafka: Kafka,
        group: str,
        pattern: str,
        codec: Codec,
        start_offset: Callable[[str], int],
        *,
        once: bool = False,
        on_revoked: Callable[[str], None] = lambda database: None,
        log: Callable[[str], None] = print,
        idle: Callable[[], None] = lambda: None,
        should_stop: Callable[[], bool] = lambda: False,
        role: str = "replica",
        min_interval: float = 0,
    ) -> None:
        self.codec = codec
        self.once = once
        self.start_offset = start_offset
        self.on_revoked = on_revoked
        self.log = log
        self.idle = idle  # after each poll that found nothing (the archiver closes segments on time)
        self.should_stop = should_stop  # sources() ends (a SIGTERM the archiver winds down after)
        self.role = role
        # A member that dies hands its databases over after session_timeout_ms (10 s, not 45). Database
        # topics have one partition each, so the default range assignor would give all to one member;
        # sticky spreads them and moves as few as possible on a rebalance.
        self.consumer = committed_consumer(
            kafka,
            group,
            max_poll_interval_ms=600_000,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            partition_assignment_strategy=(StickyPartitionAssignor, RoundRobinPartitionAssignor),
            **paced_fetches(min_interval),
        )
        self._new: set[TopicPartition] = set()
        self.failed: set[str] = set()  # databases stopped by a non-retriable error; never read again
        self.offsets = OffsetCommitter(self.consumer)
        self._join(pattern)

    def _on_revoked(self, tps: Iterable[TopicPartition]) -> None:
        super()._on_revoked(tps)
        for tp in tps:
            self._new.discard(tp)
            self.on_revoked(database_for(tp.topic))  # release the replica for its next owner

    def _on_assigned(self, tps: Iterable[TopicPartition]) -> None:
        self._new.update(tps)  # they start at each replica's own stored position, not the group offset

    def _resumable(self, tp: TopicPartition) -> bool:
        return super()._resumable(tp) and database_for(tp.topic) not in self.failed

    def _seek_new(self) -> None:
        """Position newly assigned partitions at their replica's own offset. A replica the previous
        owner still holds (retriable) stays paused and is tried again on the next round."""
        for tp in sorted(self._new, key=lambda t: t.topic):
            database = database_for(tp.topic)
            if tp not in self.consumer.assignment() or database in self.failed:
                self._new.discard(tp)
                continue
            try:
                offset = self.start_offset(database)
            except PipelineError as exc:
                if exc.retriable:
                    self.consumer.pause(tp)
                    continue
                self.log(f"error: {self.role} {database} stopped: {exc}")
                self.fail(database)
                self._new.discard(tp)
                continue
            self.consumer.seek(tp, offset)
            self.consumer.resume(tp)
            self._new.discard(tp)

    def sources(self) -> Iterator[PartitionSource]:
        """Sources for databases with records waiting, round robin; ends when idle in --once mode."""
        while not self.should_stop():
            batch = self._poll_group(200, 1)
            new = set(self._new)  # assigned during that poll: start at the replica's own position
            self._seek_new()
            batch = {tp: recs for tp, recs in batch.items() if tp not in self._new}  # still waiting
            if not batch:
                self.offsets.flush()
                self.idle()
                if self.once and self.consumer.assignment() and not self._new and self._caught_up():
                    return
                continue
            for tp, records in batch.items():
                if tp not in new:
                    # poll() moved past what it returned: step back so the source re-reads it.
                    self.consumer.seek(tp, records[0].offset)
            for tp in list(batch):
                if tp in self.consumer.assignment() and database_for(tp.topic) not in self.failed:
                    yield PartitionSource(self, tp)
            self._pause_failed()

    def restart(self, database: str) -> None:
        """Start the database again where start_offset() says, at the next poll (as if newly assigned)."""
        tp = TopicPartition(topic_for(database), PARTITION)
        if tp in self.consumer.assignment():
            self.consumer.pause(tp)  # nothing more of it until it is positioned again
            self._new.add(tp)

    def fail(self, database: str) -> None:
        self.failed.add(database)
        self._pause_failed()

    def _pause_failed(self) -> None:
        stopped = [tp for tp in self.consumer.assignment() if database_for(tp.topic) in self.failed]
        if stopped:
            self.consumer.pause(*stopped)

    def _caught_up(self) -> bool:
        assignment = list(self.consumer.assignment())
        ends = self.consumer.end_offsets(assignment)
        return all(
            self.consumer.position(tp) >= ends[tp] for tp in assignment if database_for(tp.topic) not in self.failed
        )


class _Rebalance(ConsumerRebalanceListener):
    """Hands a rebalance to its GroupMember; an error there is raised from the member's next poll."""

    def __init__(self, member: GroupMember) -> None:
        self.member = member

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._guard(self.member._on_revoked, revoked)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._guard(self.member._on_assigned, assigned)

    def _guard(self, fn: Callable[[list[TopicPartition]], None], tps: list[TopicPartition]) -> None:
        try:
            fn(tps)
        except Exception as exc:  # kafka-python would only log it
            self.member._listener_error = exc


class PartitionSource:
    """The committed transactions of one assigned partition, up to the next idle boundary (a Source)."""

    def __init__(self, reader: GroupReader, tp: TopicPartition) -> None:
        self.reader = reader
        self.tp = tp
        self.database = database_for(tp.topic)
        self._buf: deque = deque()  # records of the last poll not handed out yet

    def buffered(self) -> bool:
        """True if records of this partition the last poll returned are still unread (see TopicSource.buffered)."""
        return bool(self._buf)

    def _records(self) -> Iterator[Record]:
        with self.reader._only(self.tp):  # for the whole source: its polls drop other partitions' records
            yield from self.reader._txn_records(self._buf, self._more)

    def _more(self, inside: bool) -> bool:
        if self.tp not in self.reader.consumer.assignment():
            raise PipelineError(
                f"partition of {self.database} was reassigned to another group member "
                "mid-transaction; nothing of it was applied here",
                database=self.database,
                retriable=True,
            )
        self._buf.extend(self.reader._poll_group(100, POLL_RECORDS).get(self.tp, []))
        return bool(self._buf) or inside

    def transactions(self, after: Position) -> Iterator[Transaction]:
        return self.reader.codec.read_transactions(self._records(), self.database, batches=True)

    def records(self) -> Iterator[Record]:
        """The raw committed records, for consumers that keep them as they are (the archiver)."""
        return self._records()

    def acknowledge(self, txn: Transaction) -> None:
        self.reader.offsets.applied(self.tp, txn)
