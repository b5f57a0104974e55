"""Building kafka-python clients: the settings every client gets, the committed-stream consumer, errors as PipelineErrors."""

from __future__ import annotations

import time
from typing import Iterator

from kafka import KafkaConsumer
from kafka.errors import (
    InvalidProducerEpochError,
    ProducerFencedError,
    TransactionalIdAuthorizationFailedError,
)
from kafka.structs import TopicPartition
from pipeline.errors import PipelineError

from connectors.faults import as_pipeline_error

FENCED = (ProducerFencedError, InvalidProducerEpochError, TransactionalIdAuthorizationFailedError)


# Settings every client of ours gets. kafka-python backs off reconnecting up to 30 s by default, so
# after an outage a client could sit out half a minute with the cluster back (seen in recovery times).
CLIENT_DEFAULTS: dict[str, object] = {"reconnect_backoff_max_ms": 2_000}


# Records per poll for every reader: all that is fetched. Each poll costs a round of client
# bookkeeping, which at 2000 records per poll cost analytics a tenth of its throughput.
POLL_RECORDS = 20_000


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


def broker_error(what: str, exc: Exception, **ctx: object) -> PipelineError:
    return as_pipeline_error(what, exc, **ctx)


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


def records_until(consumer: KafkaConsumer, tp: TopicPartition, start: int, end: int, timeout_s: float) -> Iterator:
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
