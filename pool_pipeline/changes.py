"""The public change-stream API: committed transactions from a consumer group, exactly-once outputs.

    from pool_pipeline.changes import ChangeStream, KafkaTransactions

    with ChangeStream("127.0.0.1:9092", "my-group", databases=["app"]) as stream:
        out = KafkaTransactions(stream, "my-app")        # optional: exactly-once output to Kafka
        for txn in stream:                               # ChangeTransaction: header, changes, trailer
            n = sum(1 for _ in txn.changes)              # BlockWrite / BlobChunk / BlobDelete, read once
            out.send(txn, [("my-output.stats", txn.database.encode(), str(n).encode())])

Without an output helper, `stream.commit(txn)` records progress (at least once). The group's
offsets carry {"txn", "source_time_ms"} metadata, so `pipeline status` shows every group's
applied txn and lag.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from kafka import KafkaProducer
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from connectors.kafka.client import (
    POLL_RECORDS,
    Kafka,
    KafkaSettings,
    broker_error,
    committed_consumer,
    is_fenced,
)
from connectors.kafka.publisher import end_transaction, flush_checked
from connectors.kafka.reader import GroupMember, OffsetCommitter, offset_metadata
from connectors.kafka.topics import (
    PARTITION,
    database_for,
    ensure_topic,
    topic_for,
)
from pipeline.codec import Codec, Record
from pipeline.crypto import Keyring
from pipeline.errors import PipelineError
from pipeline.model import Transaction
from schemas import load_schemas

COMMITTED = -1  # a listener's answer to assigned(): "start at the group's committed offset"


@dataclass
class ChangeTransaction(Transaction):
    """A Transaction as read from its topic. Its trailer, with `end_offset` and `publish_time_ms`
    (the broker timestamp of its TxnCommit record), is filled in once `changes` is exhausted."""

    @property
    def topic(self) -> str:
        return topic_for(self.database)


@dataclass(frozen=True)
class Checkpoint:
    """A resume point in one database's stream: just after txn `txn_id`, whose TxnCommit is at `end_offset`."""

    database: str
    txn_id: int
    source_time_ms: int
    end_offset: int

    @property
    def next_offset(self) -> int:
        return self.end_offset + 1

    @classmethod
    def of(cls, upto: Checkpoint | Transaction) -> Checkpoint:
        if isinstance(upto, Checkpoint):
            return upto
        if upto.end_offset is None:
            raise upto.error("the transaction has not been read to its end: exhaust txn.changes first")
        return cls(upto.database, upto.txn_id, upto.source_time_ms, upto.end_offset)


class StreamListener(Protocol):
    """Told when Kafka gives this member a database or takes one away (see ChangeStream.listen)."""

    def assigned(self, database: str) -> int | None:
        """Where this listener needs reading to start: an offset, COMMITTED, or None (no opinion)."""

    def revoked(self, database: str) -> None:
        """The database moved away (or is being restarted): drop any state kept for it."""


class Rebalanced(PipelineError):
    """Raised from `txn.changes` when the database moved to another member mid-transaction.

    Nothing of that transaction may be used; the stream itself goes on (catch it and `continue`).
    """


class ChangeStream(GroupMember):
    """Committed transactions of many databases, read by one member of a consumer group.

    Give `databases` (names) or `pattern` (a regex over names; `.stats` topics are never matched).
    `instance_id` makes this a static member (KIP-345): use a stable, unique one per process.
    Kafka spreads the databases over the group's members (cooperative sticky assignment: a
    rebalance moves only the databases that change owner). Each assigned database is read from
    its resume point: the group's committed offset, or what the registered listeners ask for
    (an output that stores its own offsets, see SqliteOutput). Transactions of one database come
    in order, each whole; those of different databases interleave. Blob chunks come in order, so
    a blob is reassembled by appending its chunks (`BlobChunk.index` 0..count-1). Changes are
    BlockWrite, BlobChunk and BlobDelete; with `batches=True` block images come as BlockBatch
    (one file's blocks as they travel in one record, `.blocks()` splits them), which is much
    cheaper for consumers that count or copy blocks.

    With encrypted topics (`capture-agent --encryption-key`), pass
    `keyring=connectors.keys.load_keyring("app.key")`: every record is decrypted and authenticated
    before it is framed; without it, or with a key file lacking the record's key, iteration raises
    a PipelineError naming the key id, database and offset.
    """

    def __init__(
        self,
        kafka: Kafka,
        group: str,
        *,
        databases: Sequence[str] | None = None,
        pattern: str | None = None,
        codec: Codec | None = None,
        keyring: Keyring | None = None,
        once: bool = False,
        poll_timeout_ms: int = 200,
        max_records: int = POLL_RECORDS,
        session_timeout_ms: int = 10_000,
        instance_id: str | None = None,
        batches: bool = False,
    ) -> None:
        if (databases is None) == (pattern is None):
            raise PipelineError("give either databases or a pattern to a ChangeStream")
        self.kafka = KafkaSettings.of(kafka)
        self.group = group
        self.databases = list(databases or [])
        for database in self.databases:
            topic_for(database)  # validates the name
        self.pattern = pattern
        if codec is not None and keyring is not None and codec.keyring is not keyring:
            raise PipelineError("give a ChangeStream either a codec or a keyring, not both")
        self.codec = codec or Codec(load_schemas(), keyring=keyring)
        self.once = once
        self.batches = batches
        self.poll_timeout_ms = poll_timeout_ms
        self.max_records = max_records
        self.listeners: list[StreamListener] = []
        self.idle_callbacks: list[Callable[[], None]] = []
        # A static member (instance_id) restarted after kill -9 takes its place back at once; a dynamic
        # one waits for the dead member's session to time out first. Two running members with the same
        # instance_id: the newer one fences the older.
        static = {"group_instance_id": instance_id} if instance_id else {}
        self.consumer = committed_consumer(
            self.kafka,
            group,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=2_000,
            max_poll_interval_ms=600_000,
            metadata_max_age_ms=5_000,  # pick up new database topics soon
            partition_assignment_strategy=(CooperativeStickyAssignor,),
            **static,
        )
        self.offsets = OffsetCommitter(self.consumer)
        self._buffers: dict[TopicPartition, deque] = {}
        self._epochs: dict[TopicPartition, int] = {}  # bumped when a partition is revoked or restarted
        self._new: set[TopicPartition] = set()  # assigned, not positioned yet
        self._revoked: list[str] = []  # databases taken away, listeners not told yet
        self._committed: dict[TopicPartition, int | None] = {}
        self._ends: dict[TopicPartition, int] = {}  # with once: the end (last stable offset) when assigned
        self._subscribed = False

    # --- membership ---------------------------------------------------------------------------

    def listen(self, listener: StreamListener) -> None:
        """Register an output or state holder; do it before iterating."""
        self.listeners.append(listener)

    def on_idle(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a poll brought nothing new (and before a `once` stream ends)."""
        self.idle_callbacks.append(callback)

    def _subscribe(self) -> None:
        if self._subscribed:
            return
        try:
            if self.databases and self.once:
                missing = [d for d in self.databases if topic_for(d) not in self.consumer.topics()]
                if missing:
                    raise PipelineError(
                        f"no topic for database(s) {', '.join(missing)}: is a capture-agent running for them?",
                        database=missing[0],
                        retriable=True,
                    )
            self._join(self.pattern, [topic_for(d) for d in self.databases])
        except KafkaError as exc:
            raise broker_error(f"cannot subscribe group {self.group}", exc) from exc
        self._subscribed = True

    # The rebalance callbacks (inside poll()) only take notes: the listeners (which may block, e.g.
    # to start a transactional producer) run right after poll() returns, before any record is used.

    def _on_assigned(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._new.add(tp)
            self._drop(tp)

    def _on_revoked(self, tps: Iterable[TopicPartition]) -> None:
        super()._on_revoked(tps)
        self._forget(tps)

    def _drop(self, tp: TopicPartition) -> None:
        buf = self._buffers.pop(tp, None)
        if buf:
            buf.clear()  # a transaction being read of it ends there (_records)

    def _forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._epochs[tp] = self._epochs.get(tp, 0) + 1  # a transaction being read of it is void
            self._drop(tp)
            self._new.discard(tp)
            self._committed.pop(tp, None)
            self._ends.pop(tp, None)
            self._revoked.append(database_for(tp.topic))

    def _notify_revoked(self) -> None:
        while self._revoked:
            database = self._revoked.pop(0)
            for listener in self.listeners:
                listener.revoked(database)

    def restart(self, database: str) -> None:
        """Forget everything read of `database` and read it again from its resume point.

        For an output whose commit failed: its listeners drop their state (revoked), then are
        asked for their start offset again (assigned), as if the database had just been assigned.
        """
        tp = TopicPartition(topic_for(database), PARTITION)
        if tp in self.consumer.assignment():
            self._forget([tp])
            self._notify_revoked()
            self._new.add(tp)  # positioned again by the next poll

    def committed_offset(self, database: str) -> int | None:
        """The group's committed offset of an assigned database, as read when reading it started."""
        tp = TopicPartition(topic_for(database), PARTITION)
        if tp not in self._committed:
            self._committed[tp] = self._fetch_committed(tp)
        return self._committed[tp]

    def _fetch_committed(self, tp: TopicPartition) -> int | None:
        try:
            return self.consumer.committed(tp)
        except KafkaError as exc:
            raise broker_error(
                f"cannot read the committed offset of group {self.group}", exc, database=database_for(tp.topic)
            ) from exc

    def _position_new(self) -> None:
        """Tell the listeners, then seek each newly assigned partition to the earliest start any of them needs.

        A listener may fence and abort a crashed predecessor's transaction (KafkaTransactions), so
        the group's committed offset is read only after all of them ran.
        """
        assignment = self.consumer.assignment()
        wanted: dict[TopicPartition, list[int]] = {}
        for tp in sorted(self._new):
            if tp in assignment:
                database = database_for(tp.topic)
                wanted[tp] = [
                    s for s in (listener.assigned(database) for listener in self.listeners) if s is not None
                ] or [COMMITTED]
        for tp, starts in wanted.items():
            if COMMITTED in starts:
                committed = self._committed[tp] = self._fetch_committed(tp)
                starts = [s for s in starts if s != COMMITTED] + [committed if committed is not None else 0]
            try:
                begin = self.consumer.beginning_offsets([tp])[tp]
                if self.once:
                    self._ends[tp] = self.consumer.end_offsets([tp])[tp]
            except KafkaError as exc:
                raise broker_error(
                    f"cannot read the offsets of {tp.topic}", exc, database=database_for(tp.topic)
                ) from exc
            self.consumer.seek(tp, max(begin, min(starts)))
            self._buffers[tp] = deque()
        self._new.clear()

    # --- reading ------------------------------------------------------------------------------

    def _poll(self, timeout_ms: int) -> None:
        """One poll; records go to their partition's buffer. Rebalances happen in here."""
        try:
            batch = self._poll_group(timeout_ms, self.max_records)
        except KafkaError as exc:
            raise broker_error(f"consumer group {self.group} cannot poll", exc) from exc
        self._notify_revoked()
        fresh = set(self._new)
        if fresh:
            self._position_new()
        for tp, records in batch.items():
            # Records of a partition assigned during this poll were fetched before the seek: drop them.
            if tp not in fresh and tp in self._buffers:
                self._buffers[tp].extend(records)

    def __iter__(self) -> Iterator[ChangeTransaction]:
        self._subscribe()
        while True:
            if self.once and self._caught_up():
                self._idle()
                if self._caught_up():  # an idle callback may have restarted a database
                    return
            self._poll(self.poll_timeout_ms)
            yielded = False
            for tp in sorted(self._buffers):
                if not self._buffers.get(tp):
                    continue
                try:
                    for txn in self._transactions(tp):
                        yielded = True
                        yield txn
                except Rebalanced:
                    continue  # the partition was revoked or restarted: _poll positions it again
            if not yielded:
                self._idle()

    def _idle(self) -> None:
        for callback in self.idle_callbacks:
            callback()
        self.offsets.flush()  # idle: make the lag display exact

    def _caught_up(self) -> bool:
        """With once: every assigned database read up to where its topic ended when it was assigned."""
        assignment = list(self.consumer.assignment())
        if not assignment or self._new:
            return False
        try:
            return all(
                tp in self._ends and not self._buffers.get(tp) and self.consumer.position(tp) >= self._ends[tp]
                for tp in assignment
            )
        except KafkaError as exc:
            raise broker_error(f"consumer group {self.group} cannot read its positions", exc) from exc

    def _transactions(self, tp: TopicPartition) -> Iterator[ChangeTransaction]:
        txns = self.codec.read_transactions(
            self._records(tp), database_for(tp.topic), batches=self.batches, kind=ChangeTransaction
        )
        return cast(Iterator[ChangeTransaction], txns)

    def _records(self, tp: TopicPartition) -> Iterator[Record]:
        """The buffered records of one partition up to a transaction boundary; fetches more mid-transaction."""
        epoch, buf = self._epochs.get(tp, 0), self._buffers[tp]

        def more(inside: bool) -> bool:
            if not inside:
                return False
            with self._only(tp):
                self._poll(100)
            if self._epochs.get(tp, 0) != epoch or self._buffers.get(tp) is not buf:
                raise Rebalanced(
                    f"{database_for(tp.topic)} was reassigned while its transaction was read; "
                    "nothing of it may be used",
                    database=database_for(tp.topic),
                    retriable=True,
                )
            return True

        return self._txn_records(buf, more)

    # --- progress -----------------------------------------------------------------------------

    def commit(self, upto: Checkpoint | Transaction) -> None:
        """Record progress (at least once): the group resumes after `upto`. Asynchronous and throttled;
        flushed when idle, on a rebalance and on close."""
        cp = Checkpoint.of(upto)
        tp = TopicPartition(topic_for(cp.database), PARTITION)
        self.offsets.applied(tp, cp)  # type: ignore[arg-type]  # duck-typed: txn_id, source_time_ms, end_offset

    def __enter__(self) -> ChangeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KafkaTransactions:
    """Exactly once into Kafka: output records and the input offset committed in one Kafka transaction.

    One transactional producer per assigned database, `transactional.id` = `<prefix>.<group>.<database>`.
    Its init_transactions() runs when the database is assigned, before the group's offset is read:
    it aborts whatever a crashed predecessor left open and fences a zombie one. The offset goes in
    with send_offsets_to_transaction(offsets, consumer.group_metadata()) (KIP-447: a member that
    has lost its place in the group cannot commit), with the same metadata as every group's offsets.
    `topics(database)`, if given, names the output topics of a database: they are created if missing
    and their metadata loaded at assignment, so the first transaction waits for neither.
    """

    def __init__(
        self,
        stream: ChangeStream,
        transactional_prefix: str,
        *,
        transaction_timeout_ms: int = 30_000,
        topics: Callable[[str], Sequence[str]] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.stream = stream
        self.timeout_s = timeout_s
        self.prefix = transactional_prefix
        self.transaction_timeout_ms = transaction_timeout_ms
        self.topics = topics
        self._created: set[str] = set()
        self.producers: dict[str, KafkaProducer] = {}
        self.next_offsets: dict[str, int] = {}  # what the group has committed so far, per database
        stream.listen(self)

    def transactional_id(self, database: str) -> str:
        return f"{self.prefix}.{self.stream.group}.{database}"

    def assigned(self, database: str) -> int:
        self._close(database)
        tid = self.transactional_id(database)
        try:
            producer = self.stream.kafka.producer(
                client_id=f"pool-pipeline-{tid}",
                transactional_id=tid,
                enable_idempotence=True,
                acks="all",
                linger_ms=5,
                max_request_size=4 * 1024 * 1024,
                transaction_timeout_ms=self.transaction_timeout_ms,
                # kafka-python's sender re-checks in-flight transactional requests at this interval, so
                # it paces every round trip of a transaction: the first send_offsets_to_transaction took
                # 33 ms at 10, 23 ms at 5, 15 ms at 2 (one broker on loopback). Retries are rare here.
                retry_backoff_ms=2,
                allow_auto_create_topics=False,
                max_block_ms=int(self.timeout_s * 1000),
                request_timeout_ms=int(self.timeout_s * 1000),
                delivery_timeout_ms=int(self.timeout_s * 2000),
            )
            producer.init_transactions()
        except KafkaError as exc:
            raise broker_error(f"cannot start the transactional producer {tid}", exc, database=database) from exc
        self.producers[database] = producer
        for topic in self.topics(database) if self.topics else ():
            if topic not in self._created:
                ensure_topic(self.stream.kafka, topic)
                self._created.add(topic)
            try:
                producer.partitions_for(topic)  # loads its metadata now rather than inside the first send
            except KafkaError as exc:
                raise broker_error(f"cannot read the metadata of output topic {topic}", exc, database=database) from exc
        return COMMITTED

    def revoked(self, database: str) -> None:
        self._close(database)

    def _close(self, database: str) -> None:
        self.next_offsets.pop(database, None)
        producer = self.producers.pop(database, None)
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close(timeout=5)

    def done(self, upto: Checkpoint | Transaction) -> bool:
        """True if the group has already committed past `upto` (its output is in Kafka already)."""
        cp = Checkpoint.of(upto)
        if cp.database not in self.next_offsets:
            self.next_offsets[cp.database] = self.stream.committed_offset(cp.database) or 0
        return cp.next_offset <= self.next_offsets[cp.database]

    def send(self, upto: Checkpoint | Transaction, records: Iterable[tuple[str, bytes | None, bytes]]) -> bool:
        """Produce (topic, key, value) records and commit the group's offset after `upto`, atomically.

        Returns False, producing nothing, if the group has committed past `upto` already. On a
        failure the transaction is aborted and the database is re-read from its committed offset
        (ChangeStream.restart): the output and the offset are never apart.
        """
        cp = Checkpoint.of(upto)
        if self.done(cp):
            return False
        producer = self.producers.get(cp.database)
        if producer is None:
            raise PipelineError(
                f"database {cp.database} is not assigned to this member of group {self.stream.group}",
                database=cp.database,
                txn_id=cp.txn_id,
                offset=cp.end_offset,
                retriable=True,
            )
        tp = TopicPartition(topic_for(cp.database), PARTITION)
        failed: list[BaseException] = []
        try:
            producer.begin_transaction()
            for topic, key, value in records:
                producer.send(topic, key=key, value=value, partition=PARTITION).add_errback(failed.append)
            producer.send_offsets_to_transaction(
                {tp: OffsetAndMetadata(cp.next_offset, offset_metadata(cp.txn_id, cp.source_time_ms), -1)},
                self.stream.consumer.group_metadata(),
            )
            flush_checked(producer, failed, self.timeout_s)
            end_transaction(producer, commit=True, timeout_s=self.timeout_s)
        except KafkaError as exc:
            fenced = is_fenced(exc)
            with contextlib.suppress(Exception):
                end_transaction(producer, commit=False, timeout_s=self.timeout_s)
            self.stream.restart(cp.database)  # drops state and re-reads from the committed offset
            if fenced:
                raise PipelineError(
                    f"fenced: another member of group {self.stream.group} now writes database "
                    f"{cp.database!r} (transactional.id {self.transactional_id(cp.database)})",
                    database=cp.database,
                    txn_id=cp.txn_id,
                    offset=cp.end_offset,
                ) from exc
            # A producer that failed may be in any state: the next owner (or this member, at the next
            # assignment) starts a new one, whose init_transactions settles what this one left open.
            self._close(cp.database)
            raise broker_error(
                "exactly-once output to Kafka failed and was aborted",
                exc,
                database=cp.database,
                txn_id=cp.txn_id,
                offset=cp.end_offset,
            ) from exc
        self.next_offsets[cp.database] = cp.next_offset
        return True

    def close(self) -> None:
        for database in list(self.producers):
            self._close(database)


class SqliteOutput:
    """Exactly once into a local SQLite file: output rows and the input offset in one SQLite transaction.

    Offsets live in table `pool_pipeline_offsets` (group, topic) of the same file, and reading
    resumes from them, never from Kafka. Use one file per database reader: if Kafka moves a
    database to a member with another file, that member starts it from its own file's offset.
    With `commit_group=True` the group offset is also committed (throttled, only for `pipeline
    status`); leave it off when another output (KafkaTransactions) owns the group's offsets.
    """

    def __init__(self, stream: ChangeStream, path: str, *, commit_group: bool = True) -> None:
        self.stream = stream
        self.path = path
        self.commit_group = commit_group
        self.conn = sqlite3.connect(path, isolation_level=None)  # autocommit; transactions are explicit
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only kill -9
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS pool_pipeline_offsets (grp TEXT NOT NULL, topic TEXT NOT NULL, "
            "next_offset INTEGER NOT NULL, txn_id INTEGER NOT NULL, source_time_ms INTEGER NOT NULL, "
            "PRIMARY KEY (grp, topic))"
        )
        stream.listen(self)

    def offset(self, database: str) -> int | None:
        row = self.conn.execute(
            "SELECT next_offset FROM pool_pipeline_offsets WHERE grp = ? AND topic = ?",
            (self.stream.group, topic_for(database)),
        ).fetchone()
        return row[0] if row else None

    def assigned(self, database: str) -> int:
        stored = self.offset(database)
        return 0 if stored is None else stored

    def revoked(self, database: str) -> None:
        pass

    def done(self, upto: Checkpoint | Transaction) -> bool:
        cp = Checkpoint.of(upto)
        return cp.next_offset <= (self.offset(cp.database) or 0)

    @contextlib.contextmanager
    def transaction(self, upto: Checkpoint | Transaction) -> Iterator[sqlite3.Connection]:
        """`with out.transaction(txn) as db: db.execute(...)`: the rows and the offset after `upto` commit together.

        If the file already holds an offset past `upto`, the block still runs but is rolled back.
        """
        cp = Checkpoint.of(upto)
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            cur = self.conn.execute(
                "INSERT INTO pool_pipeline_offsets VALUES (?, ?, ?, ?, ?) ON CONFLICT (grp, topic) DO UPDATE SET "
                "next_offset = excluded.next_offset, txn_id = excluded.txn_id, "
                "source_time_ms = excluded.source_time_ms "
                "WHERE excluded.next_offset > pool_pipeline_offsets.next_offset",
                (self.stream.group, topic_for(cp.database), cp.next_offset, cp.txn_id, cp.source_time_ms),
            )
            if cur.rowcount == 0:
                raise _AlreadyDone()
            self.conn.execute("COMMIT")
        except _AlreadyDone:
            self.conn.execute("ROLLBACK")
            return
        except BaseException as exc:
            self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise PipelineError(
                    f"SQLite output {self.path}: {exc}",
                    database=cp.database,
                    txn_id=cp.txn_id,
                    offset=cp.end_offset,
                    retriable=isinstance(exc, sqlite3.OperationalError),
                ) from exc
            raise
        if self.commit_group:
            self.stream.commit(cp)

    def close(self) -> None:
        self.conn.close()


class _AlreadyDone(Exception):
    """The SQLite file already holds this output: roll it back."""
