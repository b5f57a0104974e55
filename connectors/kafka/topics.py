"""Database topics: names, creation and checks (only the agent creates them), reading back the last txn."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import (
    KafkaError,
    TopicAlreadyExistsError,
)
from kafka.structs import TopicPartition

from connectors.faults import unreachable
from connectors.kafka.client import (
    Kafka,
    KafkaSettings,
    broker_error,
    committed_consumer,
    records_until,
)
from pipeline.codec import BEGIN, COMMIT, Codec
from pipeline.crypto import KeyMismatch
from pipeline.errors import PipelineError
from pipeline.model import FileLayout, Position, check_database_name

T = TypeVar("T")


TOPIC_PREFIX = "pool."


PARTITION = 0  # one partition per database topic: a total order of transactions


def topic_for(database: str) -> str:
    return TOPIC_PREFIX + check_database_name(database)


def database_for(topic: str) -> str:
    if not topic.startswith(TOPIC_PREFIX) or topic.endswith(".stats"):
        raise PipelineError(f"topic {topic!r} is not a pool-pipeline database topic (pool.<database>)")
    return topic[len(TOPIC_PREFIX) :]


# What the agent needs of its topic, and whether a different existing setting is fatal.
_REQUIRED_CONFIGS = {"cleanup.policy": "delete"}


def ensure_topic(
    kafka: Kafka,
    topic: str,
    *,
    replication_factor: int = 1,
    min_insync_replicas: int = 1,
    retention_ms: int = -1,
    timeout_s: float = 30,
    log: Callable[[str], None] = print,
) -> bool:
    """Create the database topic if it is missing; True if this call created it.

    Only the agent creates topics (every client sets allow_auto_create_topics=False). Retention is
    unlimited by default (-1), so that a replica started at any time can bootstrap from the topic
    alone (it replays from the first snapshot); see README "Retention". An existing topic is checked:
    more than one partition or a compacted topic is refused, weaker durability or another retention
    than asked for is logged.
    """
    settings = KafkaSettings.of(kafka)
    admin = settings.admin(client_id="pool-pipeline-admin", request_timeout_ms=int(timeout_s * 1000))
    try:
        if topic in admin.list_topics():
            _check_topic(admin, topic, min_insync_replicas, retention_ms, log)
            return False
        configs = {
            "cleanup.policy": "delete",
            "retention.ms": str(retention_ms),
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
                raise PipelineError(
                    f"topic {topic} was created but did not appear within {timeout_s:.0f} s", retriable=True
                )
            time.sleep(0.1)
        return True
    except KafkaError as exc:
        raise broker_error(f"cannot create topic {topic} on {settings.bootstrap_servers}", exc) from exc
    finally:
        admin.close()


def _check_topic(
    admin: KafkaAdminClient, topic: str, min_insync_replicas: int, retention_ms: int, log: Callable[[str], None]
) -> None:
    """Refuse an existing topic the pipeline cannot work with; warn about weaker settings."""
    from kafka.admin import ConfigResource, ConfigResourceType

    described = admin.describe_topics([topic])
    partitions = len(described[0].get("partitions") or []) if described else 1
    if partitions != 1:
        raise PipelineError(
            f"topic {topic} has {partitions} partitions; a database topic needs exactly 1 (a total "
            "order of transactions): delete it or use another --database",
            topic=topic,
        )
    result = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all")
    configs = _config_values(result, topic)
    for key, wanted in _REQUIRED_CONFIGS.items():
        if key in configs and configs[key] != wanted:
            raise PipelineError(
                f"topic {topic} has {key}={configs[key]}; the pipeline needs {key}={wanted} "
                f"(fix it with kafka-configs --alter --add-config {key}={wanted})",
                topic=topic,
            )
    isr = int(configs.get("min.insync.replicas", min_insync_replicas) or 0)
    if isr < min_insync_replicas:
        log(
            f"warning: topic {topic} has min.insync.replicas={isr}, below the {min_insync_replicas} asked for: "
            "a committed transaction may be lost with a single broker"
        )
    retention = configs.get("retention.ms")
    if retention is not None and int(retention) != retention_ms:
        kept = "for ever" if int(retention) < 0 else f"for retention.ms={retention}"
        log(
            f"warning: topic {topic} keeps records {kept}, not the retention.ms={retention_ms} asked for (an "
            "existing topic is not changed; use kafka-configs --alter to change it)"
        )


def _config_values(result: dict, topic: str) -> dict[str, str | None]:
    """{name: value} from describe_configs' answer."""
    entries = result.get("topic", {}).get(topic, {})
    return {k: (v.get("value") if isinstance(v, dict) else v) for k, v in entries.items()}


def reachability(kafka: Kafka) -> str:
    """One line on what the cluster looks like from here, for the retry log of an outage."""
    down, total = unreachable(KafkaSettings.of(kafka).bootstrap_servers)
    if down:
        return (
            f"waiting for Kafka: {len(down)} of {total} brokers unreachable ({', '.join(down)}); "
            "writes need min.insync.replicas of the topic's replicas up"
        )
    return (
        f"all {total} bootstrap brokers accept connections; waiting for partition leaders, in-sync "
        "replicas or the transaction coordinator"
    )


def wait_for_topic(
    kafka: Kafka,
    database: str,
    *,
    once: bool,
    log: Callable[[str], None],
    interval: float = 0.25,
    stop: Callable[[], bool] = lambda: False,
) -> bool:
    """True once the database's topic exists. Only the capture-agent creates it, so a reader started
    first waits (logging once); with `once`, False at once."""
    topic = topic_for(database)
    consumer = committed_consumer(kafka, None)
    logged = False
    try:
        while not stop():
            try:
                if topic in consumer.topics():
                    return True
            except KafkaError as exc:
                raise broker_error(
                    f"cannot list topics on {KafkaSettings.of(kafka).bootstrap_servers}", exc, database=database
                ) from exc
            if once:
                return False
            if not logged:
                log(f"waiting for topic {topic}: no capture-agent has published database {database!r} yet")
                logged = True
            time.sleep(interval)
        return False
    finally:
        consumer.close()


def offset_range(kafka: Kafka, database: str) -> tuple[int, int]:
    """(first, end) offsets of the database's topic: retention moves the first up."""
    topic = topic_for(database)
    tp = TopicPartition(topic, PARTITION)
    consumer = committed_consumer(kafka, None)
    try:
        return consumer.beginning_offsets([tp])[tp], consumer.end_offsets([tp])[tp]
    except KafkaError as exc:
        raise broker_error(f"cannot read the offsets of topic {topic}", exc, database=database) from exc
    finally:
        consumer.close()


def first_txn_from(
    kafka: Kafka, database: str, codec: Codec, offset: int, timeout_s: float = 30
) -> tuple[int, int] | None:
    """(txn id, offset of its TxnBegin) of the first committed txn that begins at or after `offset`,
    None if none does yet: what a reader starting there gets first."""
    topic = topic_for(database)
    tp = TopicPartition(topic, PARTITION)
    consumer = committed_consumer(kafka, None)
    try:
        consumer.assign([tp])
        end = consumer.end_offsets([tp])[tp]
        for rec in records_until(consumer, tp, offset, end, timeout_s):
            if rec.key != b"txn":
                continue
            try:
                name, value = codec.decode(rec.value, topic=topic, offset=rec.offset)
            except PipelineError:
                continue  # not ours: the reader stops at it with its offset
            if name == BEGIN and value.get("database") == database:
                return value["txn_id"], rec.offset
        return None
    except KafkaError as exc:
        raise broker_error(f"cannot read topic {topic} from offset {offset}", exc, database=database) from exc
    finally:
        consumer.close()


class LastCommit(NamedTuple):
    position: Position
    files: list[FileLayout]
    offset: int
    source_time_ms: int


def _newest(
    kafka: Kafka,
    database: str,
    codec: Codec,
    pick: Callable[[Iterator[tuple[str, dict, int]]], T | None],
    what: str,
    window: int,
    timeout_s: float,
) -> T | None:
    """Search the topic backwards in growing windows: `pick` gets the decoded transaction markers
    (name, value, offset) of [start, end) in order and returns what it found there, or None."""
    topic = topic_for(database)
    tp = TopicPartition(topic, PARTITION)
    consumer = committed_consumer(kafka, None)

    def markers(start: int, end: int) -> Iterator[tuple[str, dict, int]]:
        for rec in records_until(consumer, tp, start, end, timeout_s):
            if rec.key == b"txn":  # TxnBegin and TxnCommit: small, so decoding them is cheap
                try:
                    name, value = codec.decode(rec.value, topic=topic, offset=rec.offset, database=database)
                except KeyMismatch:
                    raise  # ours, but this reader lacks the key (or requires one): never skip it as foreign
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
        raise broker_error(f"cannot {what} in topic {topic}", exc, database=database) from exc
    finally:
        consumer.close()


def last_commit(kafka: Kafka, database: str, codec: Codec, timeout_s: float = 30) -> LastCommit | None:
    """The last committed transaction in the topic as (position, pool layout, commit offset), None if empty."""

    def pick(markers: Iterator[tuple[str, dict, int]]) -> LastCommit | None:
        found = None
        for name, value, offset in markers:
            if name == COMMIT:
                found = LastCommit(
                    Position(value["txn_id"], value["checksum_after"] & 0xFFFFFFFFFFFFFFFF),
                    [FileLayout(f["file"], f["block_size"], f["blocks"]) for f in value["files"]],
                    offset,
                    value["source_time_ms"],
                )
        return found

    return _newest(kafka, database, codec, pick, "read the last transaction", 256, timeout_s)


def latest_snapshot(kafka: Kafka, database: str, codec: Codec, timeout_s: float = 30) -> tuple[int, int] | None:
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

    return _newest(kafka, database, codec, pick, "search for a snapshot", 4096, timeout_s)
