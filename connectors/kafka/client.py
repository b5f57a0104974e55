"""The one Kafka client factory (KafkaSettings), the committed-stream consumer, Kafka errors as PipelineErrors."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import (
    InvalidProducerEpochError,
    ProducerFencedError,
    TransactionalIdAuthorizationFailedError,
)
from kafka.structs import TopicPartition

from connectors.faults import as_pipeline_error
from pipeline.errors import PipelineError

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


_CLIENT_KEYS = (
    set(KafkaProducer.DEFAULT_CONFIG) | set(KafkaConsumer.DEFAULT_CONFIG) | set(KafkaAdminClient.DEFAULT_CONFIG)
)


@dataclass(frozen=True)
class KafkaSettings:
    """Everything every Kafka client of ours is built from: the bootstrap servers and any kafka-python
    client option (security, timeouts, ...). Built once, from flags and environment, in the CLI;
    nothing else constructs a kafka-python client. What a use needs (isolation level, transactional
    id, ...) is given per client and wins over `options`; `options` win over CLIENT_DEFAULTS."""

    bootstrap_servers: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - _CLIENT_KEYS)
        if unknown:
            raise PipelineError(
                f"unknown Kafka client option(s) {', '.join(unknown)} (kafka-python names, e.g. "
                "security_protocol, request_timeout_ms)"
            )

    @staticmethod
    def of(kafka: Kafka) -> KafkaSettings:
        """A bootstrap-servers string means: those servers, default options (API convenience)."""
        return kafka if isinstance(kafka, KafkaSettings) else KafkaSettings(kafka)

    def _config(self, known: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        merged = {**CLIENT_DEFAULTS, **self.options, "bootstrap_servers": self.bootstrap_servers, **config}
        return {k: v for k, v in merged.items() if k in known}

    def producer(self, **config: Any) -> KafkaProducer:
        return KafkaProducer(**self._config(KafkaProducer.DEFAULT_CONFIG, config))

    def consumer(self, **config: Any) -> KafkaConsumer:
        return KafkaConsumer(**self._config(KafkaConsumer.DEFAULT_CONFIG, config))

    def admin(self, **config: Any) -> KafkaAdminClient:
        return KafkaAdminClient(**self._config(KafkaAdminClient.DEFAULT_CONFIG, config))


Kafka = Union[KafkaSettings, str]


def committed_consumer(kafka: Kafka, group: str | None, **extra: object) -> KafkaConsumer:
    """A consumer that sees only committed transactions and never commits on its own."""
    return KafkaSettings.of(kafka).consumer(
        group_id=group,
        client_id=f"pool-pipeline-{group or 'reader'}",
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
        allow_auto_create_topics=False,  # topics are made only by the capture-agent
        **extra,
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
