"""Kafka: one topic per database, the transactional publisher (capture side) and the committed-stream reader."""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Callable, Iterator, NamedTuple, TypeVar

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import (
    InvalidProducerEpochError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    TopicAlreadyExistsError,
    TransactionalIdAuthorizationFailedError,
)
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from kafka.structs import OffsetAndMetadata, TopicPartition

from connectors.faults import as_pipeline_error, unreachable
from pipeline.codec import BEGIN, COMMIT, Codec, Record
from pipeline.errors import PipelineError
from pipeline.model import FileLayout, Position, Transaction, check_database_name

T = TypeVar("T")
TOPIC_PREFIX = "pool."
PARTITION = 0  # one partition per database topic: a total order of transactions
FENCED = (ProducerFencedError, InvalidProducerEpochError, TransactionalIdAuthorizationFailedError)
IN_FLIGHT_BYTES = 24 << 20  # TopicSink: unacknowledged record bytes at most (plus one MiB)
# Settings every client of ours gets. kafka-python backs off reconnecting up to 30 s by default, so
# after an outage a client could sit out half a minute with the cluster back (seen in recovery times).
CLIENT_DEFAULTS: dict[str, object] = {"reconnect_backoff_max_ms": 2_000}
# Records per poll for every reader: all that is fetched. Each poll costs a round of client
# bookkeeping, which at 2000 records per poll cost analytics a tenth of its throughput.
POLL_RECORDS = 20_000


def topic_for(database: str) -> str:
    return TOPIC_PREFIX + check_database_name(database)


def database_for(topic: str) -> str:
    if not topic.startswith(TOPIC_PREFIX) or topic.endswith(".stats"):
        raise PipelineError(f"topic {topic!r} is not a pool-pipeline database topic (pool.<database>)")
    return topic[len(TOPIC_PREFIX):]


def is_fenced(exc: BaseException) -> bool:
    """A fencing error, also when kafka-python reports it later as a plain KafkaError (seen after
    InvalidProducerEpochError: "Invalid transition ... BUMPING_PRODUCER_EPOCH"). Retrying one would
    re-run init_transactions and fence the new agent back: two agents would take turns forever."""
    seen: BaseException | None = exc
    while seen is not None:
        text = f"{type(seen).__name__} {seen}"
        if isinstance(seen, FENCED) or any(m in text for m in ("Fenced", "ProducerEpoch", "PRODUCER_EPOCH")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _broker_error(what: str, exc: Exception, **ctx: object) -> PipelineError:
    return as_pipeline_error(what, exc, **ctx)


# What the agent needs of its topic, and whether a different existing setting is fatal.
_REQUIRED_CONFIGS = {"cleanup.policy": "delete"}


def ensure_topic(
    bootstrap_servers: str, topic: str, *, replication_factor: int = 1, min_insync_replicas: int = 1,
    timeout_s: float = 30, log: Callable[[str], None] = print,
) -> bool:
    """Create the database topic if it is missing; True if this call created it.

    Only the agent creates topics (every client sets allow_auto_create_topics=False). Retention is
    unlimited so that a replica started at any time can bootstrap from the topic alone (it replays
    from the first snapshot); see README "Bootstrapping". An existing topic is checked: more than
    one partition or a compacted topic is refused, weaker durability or finite retention is logged.
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="pool-pipeline-admin",
                             request_timeout_ms=int(timeout_s * 1000), **CLIENT_DEFAULTS)
    try:
        if topic in admin.list_topics():
            _check_topic(admin, topic, min_insync_replicas, log)
            return False
        configs = {
            "cleanup.policy": "delete",
            "retention.ms": "-1",
            "retention.bytes": "-1",
            "min.insync.replicas": str(min_insync_replicas),
            "max.message.bytes": str(2 * 1024 * 1024),
        }
        try:
            admin.create_topics([NewTopic(topic, 1, replication_factor, topic_configs=configs)])
        except TopicAlreadyExistsError:
            return False
        deadline = time.monotonic() + timeout_s
        while topic not in admin.list_topics():
            if time.monotonic() > deadline:
                raise PipelineError(f"topic {topic} was created but did not appear within {timeout_s:.0f} s", retriable=True)
            time.sleep(0.1)
        return True
    except KafkaError as exc:
        raise _broker_error(f"cannot create topic {topic} on {bootstrap_servers}", exc) from exc
    finally:
        admin.close()


def _check_topic(admin: KafkaAdminClient, topic: str, min_insync_replicas: int, log: Callable[[str], None]) -> None:
    """Refuse an existing topic the pipeline cannot work with; warn about weaker settings."""
    from kafka.admin import ConfigResource, ConfigResourceType

    described = admin.describe_topics([topic])
    partitions = len(described[0].get("partitions") or []) if described else 1
    if partitions != 1:
        raise PipelineError(f"topic {topic} has {partitions} partitions; a database topic needs exactly 1 (a total "
                            "order of transactions): delete it or use another --database", topic=topic)
    result = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all")
    configs = _config_values(result, topic)
    for key, wanted in _REQUIRED_CONFIGS.items():
        if key in configs and configs[key] != wanted:
            raise PipelineError(f"topic {topic} has {key}={configs[key]}; the pipeline needs {key}={wanted} "
                                f"(fix it with kafka-configs --alter --add-config {key}={wanted})", topic=topic)
    isr = int(configs.get("min.insync.replicas", min_insync_replicas) or 0)
    if isr < min_insync_replicas:
        log(f"warning: topic {topic} has min.insync.replicas={isr}, below the {min_insync_replicas} asked for: "
            "a committed transaction may be lost with a single broker")
    retention = configs.get("retention.ms")
    if retention not in (None, "-1"):
        log(f"warning: topic {topic} keeps records for retention.ms={retention}: a replica started later must "
            "bootstrap from a snapshot still in the topic")


def _config_values(result: dict, topic: str) -> dict[str, str]:
    """{name: value} from describe_configs' answer."""
    entries = result.get("topic", {}).get(topic, {})
    return {k: (v.get("value") if isinstance(v, dict) else v) for k, v in entries.items()}


def reachability(bootstrap_servers: str) -> str:
    """One line on what the cluster looks like from here, for the retry log of an outage."""
    down, total = unreachable(bootstrap_servers)
    if down:
        return (f"waiting for Kafka: {len(down)} of {total} brokers unreachable ({', '.join(down)}); "
                "writes need min.insync.replicas of the topic's replicas up")
    return (f"all {total} bootstrap brokers accept connections; waiting for partition leaders, in-sync "
            "replicas or the transaction coordinator")


def wait_for_topic(bootstrap_servers: str, database: str, *, once: bool, log: Callable[[str], None],
                   interval: float = 0.25, stop: Callable[[], bool] = lambda: False) -> bool:
    """True once the database's topic exists. Only the capture-agent creates it, so a reader started
    first waits (logging once); with `once`, False at once."""
    topic = topic_for(database)
    consumer = committed_consumer(bootstrap_servers, None)
    logged = False
    try:
        while not stop():
            try:
                if topic in consumer.topics():
                    return True
            except KafkaError as exc:
                raise _broker_error(f"cannot list topics on {bootstrap_servers}", exc, database=database) from exc
            if once:
                return False
            if not logged:
                log(f"waiting for topic {topic}: no capture-agent has published database {database!r} yet")
                logged = True
            time.sleep(interval)
        return False
    finally:
        consumer.close()


def committed_consumer(bootstrap_servers: str, group: str | None, **extra: object) -> KafkaConsumer:
    """A consumer that sees only committed transactions and never commits on its own."""
    return KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=group,
        client_id=f"pool-pipeline-{group or 'reader'}",
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
        allow_auto_create_topics=False,  # topics are made only by the capture-agent
        **{**CLIENT_DEFAULTS, **extra},
    )


class LastCommit(NamedTuple):
    position: Position
    files: list[FileLayout]
    offset: int
    source_time_ms: int


def _newest(bootstrap_servers: str, database: str, codec: Codec, pick: Callable[[Iterator[tuple[str, dict, int]]], T | None],
            what: str, window: int, timeout_s: float) -> T | None:
    """Search the topic backwards in growing windows: `pick` gets the decoded transaction markers
    (name, value, offset) of [start, end) in order and returns what it found there, or None."""
    topic = topic_for(database)
    tp = TopicPartition(topic, PARTITION)
    consumer = committed_consumer(bootstrap_servers, None)

    def markers(start: int, end: int) -> Iterator[tuple[str, dict, int]]:
        for rec in _records_until(consumer, tp, start, end, timeout_s):
            if rec.key == b"txn":  # TxnBegin and TxnCommit: small, so decoding them is cheap
                try:
                    name, value = codec.decode(rec.value, topic=topic, offset=rec.offset)
                except PipelineError:
                    continue  # not ours: the search is for our own markers (README "A bad record in a topic")
                if value.get("database") == database:
                    yield name, value, rec.offset

    try:
        consumer.assign([tp])
        begin = consumer.beginning_offsets([tp])[tp]
        end = consumer.end_offsets([tp])[tp]
        start = end
        while start > begin:
            start = max(begin, end - window)
            found = pick(markers(start, end))
            if found is not None:
                return found
            window *= 8
        return None
    except KafkaError as exc:
        raise _broker_error(f"cannot {what} in topic {topic}", exc, database=database) from exc
    finally:
        consumer.close()


def last_commit(bootstrap_servers: str, database: str, codec: Codec, timeout_s: float = 30) -> LastCommit | None:
    """The last committed transaction in the topic as (position, pool layout, commit offset), None if empty."""

    def pick(markers: Iterator[tuple[str, dict, int]]) -> LastCommit | None:
        found = None
        for name, value, offset in markers:
            if name == COMMIT:
                found = LastCommit(
                    Position(value["txn_id"], value["checksum_after"] & 0xFFFFFFFFFFFFFFFF),
                    [FileLayout(f["file"], f["block_size"], f["blocks"]) for f in value["files"]],
                    offset, value["source_time_ms"])
        return found

    return _newest(bootstrap_servers, database, codec, pick, "read the last transaction", 256, timeout_s)


def latest_snapshot(bootstrap_servers: str, database: str, codec: Codec, timeout_s: float = 30) -> tuple[int, int] | None:
    """(txn id, offset of its TxnBegin) of the newest committed snapshot in the topic, None if none.

    A fresh replica starts there instead of replaying all history from offset 0.
    """

    def pick(markers: Iterator[tuple[str, dict, int]]) -> tuple[int, int] | None:
        found = pending = None  # pending: a snapshot TxnBegin whose TxnCommit is not seen yet
        for name, value, offset in markers:
            if name == BEGIN:
                pending = (value["txn_id"], offset) if value["snapshot"] else None
            elif name == COMMIT and pending is not None and pending[0] == value["txn_id"]:
                found, pending = pending, None
        return found

    return _newest(bootstrap_servers, database, codec, pick, "search for a snapshot", 4096, timeout_s)


def _records_until(consumer: KafkaConsumer, tp: TopicPartition, start: int, end: int, timeout_s: float) -> Iterator:
    consumer.seek(tp, start)
    deadline = time.monotonic() + timeout_s
    while consumer.position(tp) < end:
        batch = consumer.poll(timeout_ms=200).get(tp, [])
        if batch:
            deadline = time.monotonic() + timeout_s
        elif time.monotonic() > deadline:
            raise PipelineError(f"timed out reading {tp.topic} offsets {start}..{end}", retriable=True)
        for rec in batch:
            if rec.offset < end:
                yield rec


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
        self.at(tp, txn.end_offset + 1, txn.txn_id, txn.source_time_ms)

    def at(self, tp: TopicPartition, next_offset: int, txn_id: int, source_time_ms: int | None) -> None:
        """The sink holds everything before `next_offset`, up to `txn_id`."""
        meta = {"txn": txn_id}
        if source_time_ms:
            meta["source_time_ms"] = source_time_ms
        self.pending[tp] = OffsetAndMetadata(next_offset, json.dumps(meta), -1)
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
        raise KafkaTimeoutError(f"no answer from the transaction coordinator within {timeout_s:.0f} s "
                                f"to {'commit' if commit else 'abort'} the transaction")


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

    def __init__(self, bootstrap_servers: str, database: str, codec: Codec, position: Position | None = None,
                 *, transaction_timeout_ms: int = 600_000, timeout_s: float = 15.0) -> None:
        self.database = database
        self.topic = topic_for(database)
        self.codec = codec
        self.timeout_s = timeout_s
        self._position = position or Position(0, 0)
        self.bytes_sent = 0
        timeout_ms = int(timeout_s * 1000)
        try:
            self.producer = KafkaProducer(
                bootstrap_servers=bootstrap_servers,
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
                **CLIENT_DEFAULTS,
            )
        except KafkaError as exc:
            raise _broker_error("cannot start the transactional producer", exc, database=database) from exc
        try:
            self.producer.init_transactions()
        except FENCED as exc:
            self.producer.close(timeout=1)
            raise self._fenced(exc) from exc
        except KafkaError as exc:
            self.producer.close(timeout=1)
            raise _broker_error("cannot start the transactional producer", exc, database=database) from exc

    def _fenced(self, exc: Exception) -> PipelineError:
        return PipelineError(
            f"fenced: another capture-agent now publishes database {self.database!r} "
            f"(transactional.id pool-pipeline.capture.{self.database}); this one stops ({type(exc).__name__})",
            database=self.database, txn_id=self._position.txn_id + 1,
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
            raise _broker_error("publishing failed, the transaction was not committed", exc,
                                database=txn.database, txn_id=txn.txn_id) from exc
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


class TopicSource:
    """Reads committed transactions of one database from its topic, from a given offset (a Source).

    The sink's stored position decides where reading starts; group offsets are committed
    after each applied transaction only so that lag is visible to operators.
    """

    def __init__(self, bootstrap_servers: str, database: str, codec: Codec, group: str, start_offset: int,
                 *, once: bool = False, idle: Callable[[], None] | None = None) -> None:
        self.database = database
        self.topic = topic_for(database)
        self.codec = codec
        self.once = once
        self.idle = idle
        self.tp = TopicPartition(self.topic, PARTITION)
        self.consumer = committed_consumer(bootstrap_servers, group)
        self.offsets = OffsetCommitter(self.consumer)
        try:
            if self.topic not in self.consumer.topics():
                raise PipelineError(f"topic {self.topic} does not exist: is a capture-agent running for "
                                    f"{database!r}?", database=database, retriable=True)
            self.consumer.assign([self.tp])
            begin = self.consumer.beginning_offsets([self.tp])[self.tp]
            if start_offset < begin:
                raise PipelineError(
                    f"the replica needs offset {start_offset} but topic {self.topic} starts at {begin} "
                    "(retention removed it); start a fresh replica", database=database, offset=start_offset)
            self.consumer.seek(self.tp, start_offset)
            self.end_at_start = self.consumer.end_offsets([self.tp])[self.tp]
        except KafkaError as exc:
            self.consumer.close()
            raise _broker_error(f"cannot read topic {self.topic}", exc, database=database) from exc
        self._fetched: list = []  # the last poll's records; _records() hands them out from _next on
        self._next = 0

    def _fetch(self, timeout_ms: int) -> bool:
        # max_records is high so that one poll hands over everything the client already fetched:
        # that is what buffered() reports, and so what one group commit of the replica may cover.
        self._fetched = self.consumer.poll(timeout_ms=timeout_ms, max_records=POLL_RECORDS).get(self.tp, [])
        self._next = 0
        return bool(self._fetched)

    def _records(self) -> Iterator[Record]:
        while True:
            while self._next < len(self._fetched):  # buffered() may refill the list while we are suspended
                r = self._fetched[self._next]
                self._next += 1
                yield r
            if self.once and self.consumer.position(self.tp) >= self.end_at_start:
                return
            if not self._fetch(100):
                self.offsets.flush()  # idle: make the lag display exact
                if self.idle is not None:
                    self.idle()

    def buffered(self) -> bool:
        """True if records the last poll returned are still unread: a group-committing sink keeps
        batching (pipeline.replicate). Never touches the network: a poll(timeout_ms=0) here made
        kafka-python 3 miss the wake-up of the next poll, adding 100 ms stalls (bench/lag.py p99)."""
        return self._next < len(self._fetched)

    def transactions(self, after: Position) -> Iterator[Transaction]:
        return self.codec.read_transactions(self._records(), self.database)

    def records(self) -> Iterator[Record]:
        """The raw committed records, for consumers that keep them as they are (the archiver)."""
        return self._records()

    def acknowledge(self, txn: Transaction) -> None:
        self.offsets.applied(self.tp, txn)

    def lag(self) -> int:
        return max(0, self.consumer.end_offsets([self.tp])[self.tp] - self.consumer.position(self.tp))

    def close(self) -> None:
        self.offsets.flush()
        self.consumer.close()


def status(bootstrap_servers: str, codec: Codec, databases: list[str] | None = None,
           byte_cap: int = 64 * 1024 * 1024) -> list[dict]:
    """Per database: the last captured txn, and per consumer group its applied txn and lag.

    Lag in bytes is the size of the records a group has yet to read, counted up to `byte_cap`.
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="pool-pipeline-status", **CLIENT_DEFAULTS)
    consumer = committed_consumer(bootstrap_servers, None)
    try:
        topics = sorted(t for t in consumer.topics() if t.startswith(TOPIC_PREFIX) and not t.endswith(".stats"))
        wanted = {topic_for(d) for d in databases} if databases else None
        groups = [g if isinstance(g, str) else (g.get("group_id") if isinstance(g, dict) else g[0])
                  for g in admin.list_groups()]
        offsets = {g: admin.list_group_offsets({g: None}).get(g, {}) for g in groups}
        rows = []
        for topic in topics:
            if wanted is not None and topic not in wanted:
                continue
            database = database_for(topic)
            tp = TopicPartition(topic, PARTITION)
            last = last_commit(bootstrap_servers, database, codec)
            end = consumer.end_offsets([tp])[tp]
            row: dict = {"database": database, "topic": topic, "captured_txn": last[0].txn_id if last else 0,
                         "captured_time_ms": last.source_time_ms if last else None, "end_offset": end, "groups": []}
            for group, committed in offsets.items():
                meta = committed.get(tp)
                if meta is None:
                    continue
                try:
                    info = json.loads(meta.metadata or "{}")
                except ValueError:
                    info = {}
                applied = info.get("txn")
                lag_bytes = _bytes_between(consumer, tp, meta.offset, end, byte_cap)
                row["groups"].append({
                    "group": group, "applied_txn": applied, "offset": meta.offset,
                    "lag_txns": (row["captured_txn"] - applied) if applied is not None else None,
                    "lag_bytes": lag_bytes,
                    "lag_seconds": ((row["captured_time_ms"] - info["source_time_ms"]) / 1000
                                    if last and "source_time_ms" in info else None),
                })
            rows.append(row)
        return rows
    except KafkaError as exc:
        raise _broker_error("cannot read status", exc) from exc
    finally:
        consumer.close()
        admin.close()


def _bytes_between(consumer: KafkaConsumer, tp: TopicPartition, start: int, end: int, cap: int) -> int | None:
    """Bytes of the committed records in [start, end); None when more than `cap` (not worth reading)."""
    if start >= end:
        return 0
    consumer.assign([tp])
    total = 0
    for rec in _records_until(consumer, tp, start, end, 30):
        total += len(rec.value or b"") + len(rec.key or b"")
        if total > cap:
            return None
    return total


class GroupReader:
    """One consumer in a group subscribed to many database topics (`replica --pattern`).

    Kafka spreads the topics' partitions over the group's members. `sources()` yields, for each
    assigned database with pending records, a Source over that partition alone: it pauses the
    other partitions while a transaction is open and ends at a transaction boundary, so one
    replicate() loop per database can run in turn without buffering whole transactions.
    """

    def __init__(self, bootstrap_servers: str, group: str, pattern: str, codec: Codec,
                 start_offset: Callable[[str], int], *, once: bool = False,
                 on_revoked: Callable[[str], None] = lambda database: None,
                 log: Callable[[str], None] = print) -> None:
        self.codec = codec
        self.once = once
        self.start_offset = start_offset
        self.on_revoked = on_revoked
        self.log = log
        # A member that dies hands its databases over after session_timeout_ms (10 s, not 45). Database
        # topics have one partition each, so the default range assignor would give all to one member;
        # sticky spreads them and moves as few as possible on a rebalance.
        self.consumer = committed_consumer(
            bootstrap_servers, group, max_poll_interval_ms=600_000, session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            partition_assignment_strategy=(StickyPartitionAssignor, RoundRobinPartitionAssignor))
        self._new: set[TopicPartition] = set()
        self.failed: set[str] = set()  # databases stopped by a non-retriable error; never read again
        self.offsets = OffsetCommitter(self.consumer)
        self.consumer.subscribe(pattern=f"^{TOPIC_PREFIX}(?!.*\\.stats$)(?:{pattern})$", listener=_Rebalance(self))
        self._idle_rounds = 0

    def assigned(self) -> list[str]:
        return sorted(database_for(tp.topic) for tp in self.consumer.assignment())

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
                self.log(f"error: replica {database} stopped: {exc}")
                self.fail(database)
                self._new.discard(tp)
                continue
            self.consumer.seek(tp, offset)
            self.consumer.resume(tp)
            self._new.discard(tp)

    def sources(self) -> Iterator["PartitionSource"]:
        """Sources for databases with records waiting, round robin; ends when idle in --once mode."""
        while True:
            batch = self.consumer.poll(timeout_ms=200, max_records=1)
            new = set(self._new)  # assigned during that poll: start at the replica's own position
            self._seek_new()
            batch = {tp: recs for tp, recs in batch.items() if tp not in self._new}  # still waiting
            if not batch:
                self.offsets.flush()
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
        return all(self.consumer.position(tp) >= ends[tp] for tp in assignment
                   if database_for(tp.topic) not in self.failed)

    def close(self) -> None:
        self.offsets.flush()
        self.consumer.close()


class _Rebalance(ConsumerRebalanceListener):
    """Newly assigned partitions start at each replica's own stored position, not the group offset."""

    def __init__(self, reader: GroupReader) -> None:
        self.reader = reader

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.reader.offsets.flush()  # before the partitions change hands
        for tp in revoked:
            self.reader._new.discard(tp)
            self.reader.on_revoked(database_for(tp.topic))  # release the replica for its next owner

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.reader._new.update(assigned)


class PartitionSource:
    """The committed transactions of one assigned partition, up to the next idle boundary (a Source)."""

    def __init__(self, reader: GroupReader, tp: TopicPartition) -> None:
        self.reader = reader
        self.tp = tp
        self.database = database_for(tp.topic)
        self._fetched: list = []  # the last poll's records; _records() hands them out from _next on
        self._next = 0

    def _fetch(self, timeout_ms: int) -> bool:
        self._fetched = self.reader.consumer.poll(timeout_ms=timeout_ms, max_records=POLL_RECORDS).get(self.tp, [])
        self._next = 0
        return bool(self._fetched)

    def buffered(self) -> bool:
        """True if records of this partition the last poll returned are still unread (see TopicSource.buffered)."""
        return self._next < len(self._fetched)

    def _records(self) -> Iterator[Record]:
        consumer = self.reader.consumer
        others = [tp for tp in consumer.assignment() if tp != self.tp]
        consumer.pause(*others)
        inside = False  # between a TxnBegin and its TxnCommit (both keyed b"txn")
        try:
            while True:
                if self.tp not in consumer.assignment():
                    raise PipelineError(f"partition of {self.database} was reassigned to another group member "
                                        "mid-transaction; nothing of it was applied here",
                                        database=self.database, retriable=True)
                if not self._fetch(100) and not inside:
                    return
                while self._next < len(self._fetched):  # buffered() may refill the list while we are suspended
                    r = self._fetched[self._next]
                    self._next += 1
                    if r.key == b"txn":
                        inside = not inside
                    yield r
        finally:
            consumer.resume(*[tp for tp in others if tp in consumer.assignment()
                              and database_for(tp.topic) not in self.reader.failed])

    def transactions(self, after: Position) -> Iterator[Transaction]:
        return self.reader.codec.read_transactions(self._records(), self.database)

    def acknowledge(self, txn: Transaction) -> None:
        self.reader.offsets.applied(self.tp, txn)
