"""The one error classifier and retry policy, against the real exception classes of kafka-python and botocore."""

from __future__ import annotations

import threading

import kafka.errors as ke
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

from connectors.faults import Backoff, as_pipeline_error, classify, retry
from pipeline.errors import PipelineError


@pytest.mark.parametrize(
    "exc",
    [
        ke.NotEnoughReplicasError(),
        ke.NotEnoughReplicasAfterAppendError(),
        ke.NotLeaderForPartitionError(),
        ke.LeaderNotAvailableError(),
        ke.CoordinatorNotAvailableError(),
        ke.NotCoordinatorError(),
        ke.CoordinatorLoadInProgressError(),
        ke.RequestTimedOutError(),
        ke.KafkaTimeoutError("commit"),
        ke.KafkaConnectionError("refused"),
        ke.NodeNotReadyError(),
        ke.ConcurrentTransactionsError(),
        ke.UnknownTopicOrPartitionError(),
        ke.OutOfOrderSequenceNumberError(),
        ke.UnknownProducerIdError(),
        ke.TransactionAbortedError(),
        ConnectionRefusedError(111, "refused"),
    ],
)
def test_transient_kafka_and_network_errors_are_retriable(exc: BaseException) -> None:
    assert classify(exc)[0] is True, type(exc).__name__


@pytest.mark.parametrize(
    "exc, fix",
    [
        (ke.SaslAuthenticationFailedError(), "password"),
        (ke.TopicAuthorizationFailedError(), "ACLs"),
        (ke.GroupAuthorizationFailedError(), "ACLs"),
        (ke.TransactionalIdAuthorizationFailedError(), "transactional id"),
        (ke.ClusterAuthorizationFailedError(), "ACLs"),
        (ke.MessageSizeTooLargeError(), "max.message.bytes"),
        (ke.InvalidConfigurationError(), "configuration"),
        (ke.KafkaConfigurationError("bad option"), "client settings"),
        (ke.InvalidReplicationFactorError(), "brokers"),
        (ke.ProducerFencedError(), "transactional id"),
        (ke.InvalidProducerEpochError(), "transactional id"),
    ],
)
def test_permanent_kafka_errors_stop_with_what_to_fix(exc: BaseException, fix: str) -> None:
    retriable, hint = classify(exc)
    assert retriable is False and fix in hint, (type(exc).__name__, hint)
    error = as_pipeline_error("cannot publish", exc, database="app", txn_id=7, offset=42)
    assert not error.retriable
    assert fix in str(error) and "database=app" in str(error) and "txn=7" in str(error) and "offset=42" in str(error)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "msg"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


@pytest.mark.parametrize(
    "exc, retriable",
    [
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("ServiceUnavailable", 503), True),
        (_client_error("RequestTimeout", 400), True),
        (_client_error("AccessDenied", 403), False),
        (_client_error("NoSuchBucket", 404), False),
        (_client_error("InvalidAccessKeyId", 403), False),
        (_client_error("SignatureDoesNotMatch", 403), False),
        (_client_error("PreconditionFailed", 412), False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
        (NoCredentialsError(), False),
    ],
)
def test_s3_errors(exc: BaseException, retriable: bool) -> None:
    assert classify(exc)[0] is retriable


def test_a_transactional_request_that_timed_out_is_retriable() -> None:
    """Seen with a frozen coordinator: kafka-python wraps the cause in a plain KafkaError."""
    wrapped = ke.KafkaError(
        "Could not execute transactional request for unknown reasons: [Error 7] RequestTimedOutError: "
        "Request timed out after 4999 ms"
    )
    assert classify(wrapped)[0] is True
    assert classify(ke.KafkaError("something else entirely"))[0] is False


def test_a_pipeline_error_keeps_its_own_flag() -> None:
    assert classify(PipelineError("x", retriable=True)) == (True, "")
    assert classify(PipelineError("x")) == (False, "")


def test_retry_logs_each_wait_and_raises_permanent_errors_at_once() -> None:
    calls, lines = [], []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise PipelineError("broker away", retriable=True)
        return 5

    assert (
        retry(
            "agent",
            flaky,
            lines.append,
            backoff=Backoff(first=0.001, cap=0.002),
            explain=lambda: "2 of 3 brokers unreachable",
        )
        == 5
    )
    assert len(lines) == 2 and all("broker away" in line and "2 of 3 brokers unreachable" in line for line in lines)

    def bad() -> int:
        calls.append(1)
        raise PipelineError("wrong password")

    before = len(calls)
    with pytest.raises(PipelineError, match="wrong password"):
        retry("agent", bad, lines.append, backoff=Backoff(first=0.001))
    assert len(calls) == before + 1


def test_backoff_is_capped_and_stop_ends_the_wait() -> None:
    b = Backoff(first=0.5, cap=2.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 2.0, 2.0]
    stop = threading.Event()
    stop.set()
    with pytest.raises(PipelineError):
        retry("x", lambda: (_ for _ in ()).throw(PipelineError("down", retriable=True)), lambda line: None, stop=stop)


def test_retention_durations() -> None:
    import argparse

    from pool_pipeline.cli.common import duration_ms

    assert duration_ms("infinite") == -1 and duration_ms("7d") == 7 * 86_400_000
    assert duration_ms("12h") == 43_200_000 and duration_ms("90m") == 5_400_000 and duration_ms("1.5s") == 1_500
    for bad in ("7", "7y", "x", "0.5s", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            duration_ms(bad)
