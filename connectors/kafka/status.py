"""`pipeline status`: per database the last captured txn, per consumer group its applied txn and lag."""

from __future__ import annotations

from kafka import KafkaConsumer
from kafka.errors import (
    KafkaError,
)
from kafka.structs import TopicPartition

from connectors.kafka.client import (
    Kafka,
    KafkaSettings,
    broker_error,
    committed_consumer,
    records_until,
)
from connectors.kafka.reader import read_offset_metadata
from connectors.kafka.topics import (
    PARTITION,
    TOPIC_PREFIX,
    database_for,
    last_commit,
    topic_for,
)
from pipeline.codec import Codec


def status(
    kafka: Kafka, codec: Codec, databases: list[str] | None = None, byte_cap: int = 64 * 1024 * 1024
) -> list[dict]:
    """Per database: the last captured txn, and per consumer group its applied txn and lag.

    Lag in bytes is the size of the records a group has yet to read, counted up to `byte_cap`.
    """
    admin = KafkaSettings.of(kafka).admin(client_id="pool-pipeline-status")
    consumer = committed_consumer(kafka, None)
    try:
        topics = sorted(t for t in consumer.topics() if t.startswith(TOPIC_PREFIX) and not t.endswith(".stats"))
        wanted = {topic_for(d) for d in databases} if databases else None
        groups = [
            g if isinstance(g, str) else (g.get("group_id") if isinstance(g, dict) else g[0])
            for g in admin.list_groups()
        ]
        offsets = {g: admin.list_group_offsets({g: None}).get(g, {}) for g in groups}
        rows = []
        for topic in topics:
            if wanted is not None and topic not in wanted:
                continue
            database = database_for(topic)
            tp = TopicPartition(topic, PARTITION)
            last = last_commit(kafka, database, codec)
            end = consumer.end_offsets([tp])[tp]
            row: dict = {
                "database": database,
                "topic": topic,
                "captured_txn": last[0].txn_id if last else 0,
                "captured_time_ms": last.source_time_ms if last else None,
                "end_offset": end,
                "groups": [],
            }
            for group, committed in offsets.items():
                meta = committed.get(tp)
                if meta is None:
                    continue
                applied, applied_time_ms = read_offset_metadata(meta.metadata)
                lag_bytes = _bytes_between(consumer, tp, meta.offset, end, byte_cap)
                row["groups"].append(
                    {
                        "group": group,
                        "applied_txn": applied,
                        "offset": meta.offset,
                        "lag_txns": (row["captured_txn"] - applied) if applied is not None else None,
                        "lag_bytes": lag_bytes,
                        "lag_seconds": (
                            (row["captured_time_ms"] - applied_time_ms) / 1000
                            if last and applied_time_ms is not None
                            else None
                        ),
                    }
                )
            rows.append(row)
        return rows
    except KafkaError as exc:
        raise broker_error("cannot read status", exc) from exc
    finally:
        consumer.close()
        admin.close()


def _bytes_between(consumer: KafkaConsumer, tp: TopicPartition, start: int, end: int, cap: int) -> int | None:
    """Bytes of the committed records in [start, end); None when more than `cap` (not worth reading)."""
    if start >= end:
        return 0
    consumer.assign([tp])
    total = 0
    for rec in records_until(consumer, tp, start, end, 30):
        total += len(rec.value or b"") + len(rec.key or b"")
        if total > cap:
            return None
    return total
