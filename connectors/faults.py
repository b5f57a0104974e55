"""Transient or permanent: the one classifier of kafka-python, botocore and disk errors, and the one retry policy."""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")

# What to fix, for the permanent Kafka errors an operator causes (by class name, so that this module
# loads without kafka-python and the unit test can check each real class).
_KAFKA_PERMANENT: dict[str, str] = {
    "SaslAuthenticationFailedError": "check the SASL user name and password",
    "AuthenticationFailedError": "check the SASL user name and password",
    "IllegalSaslStateError": "check the SASL settings (security.protocol, sasl.mechanism)",
    "UnsupportedSaslMechanismError": "the broker does not offer this sasl.mechanism",
    "TopicAuthorizationFailedError": "grant this principal access to the topic (ACLs)",
    "GroupAuthorizationFailedError": "grant this principal access to its consumer group (ACLs)",
    "ClusterAuthorizationFailedError": "grant this principal the cluster permission it needs (ACLs)",
    "TransactionalIdAuthorizationFailedError": "grant this principal its transactional id (ACLs)",
    "DelegationTokenAuthorizationFailedError": "check the principal's ACLs",
    "AuthorizationError": "check the principal's ACLs",
    "MessageSizeTooLargeError": "a record is larger than the topic's max.message.bytes",
    "RecordListTooLargeError": "a record batch is larger than the broker accepts",
    "InvalidConfigurationError": "fix the topic or client configuration the broker refused",
    "KafkaConfigurationError": "fix the Kafka client settings",
    "InvalidTopicError": "the topic name is not valid",
    "InvalidReplicationFactorError": "the replication factor is larger than the number of brokers",
    "InvalidPartitionsError": "the partition count is not valid",
    "PolicyViolationError": "the broker's create-topic policy refused the topic settings",
    "InvalidTransactionTimeoutError": "transaction.timeout.ms is above the broker's transaction.max.timeout.ms",
    "UnsupportedVersionError": "the broker is too old for this client",
    "IncompatibleBrokerVersion": "the broker is too old for this client",
    "UnsupportedCompressionTypeError": "the broker does not support the compression type",
    "TopicDeletionDisabledError": "the broker does not allow deleting topics",
    "SecurityDisabledError": "the broker has no security (ACLs) enabled",
    "InconsistentClusterIdError": "the bootstrap servers belong to different clusters",
}
# Permanent S3 error codes and what to fix.
_S3_PERMANENT: dict[str, str] = {
    "AccessDenied": "check the S3 credentials and the bucket policy",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY",
    "NoSuchBucket": "create the bucket or fix --bucket",
    "AllBucketsAccessDisabled": "check the S3 credentials",
    "InvalidBucketName": "fix --bucket",
    "KMS.NotFoundException": "fix the KMS key id",
}
_S3_RETRIABLE = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "OperationAborted",
    "500",
    "502",
    "503",
    "504",
}


_SECRETS: set[str] = set()
REDACTED = "***"


def register_secret(value: str) -> None:
    """Remember a secret (a password from the Kafka client config) so that `redact` removes it."""
    if len(value) >= 3:  # shorter "secrets" would redact ordinary words
        _SECRETS.add(value)


_PRINCIPAL: list[str] = []


def register_principal(principal: str) -> None:
    """Remember the principal this process authenticates as (User:<SASL user name>), so that an
    authorization error says whose ACLs are missing."""
    _PRINCIPAL[:] = [principal]


def redact(text: str) -> str:
    """`text` with every registered secret replaced by ***."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def classify(exc: BaseException) -> tuple[bool, str]:
    """(retriable, what to fix) for any error from kafka-python, botocore or the network.

    Transient: broker or coordinator unavailable, not enough replicas, leadership or coordinator
    moving, request timeouts, connection refused, S3 5xx/SlowDown. Permanent: authentication and
    authorization, records too large, invalid configuration, S3 403/NoSuchBucket. An error this
    module does not know is retriable only if its own library says so.
    """
    if isinstance(exc, PipelineError):
        return exc.retriable, ""
    names = [cls.__name__ for cls in type(exc).__mro__]
    for name in names:
        if name in _KAFKA_PERMANENT:
            return False, _KAFKA_PERMANENT[name]
    if "ProducerFencedError" in names or "InvalidProducerEpochError" in names:
        return False, "another producer with the same transactional id took over"
    module = type(exc).__module__
    if module.startswith("botocore") or hasattr(exc, "response"):
        return _classify_s3(exc)
    if module.startswith("kafka"):
        if bool(getattr(exc, "retriable", False)):
            return True, ""
        if "KafkaConnectionError" in names or "NodeNotReadyError" in names:
            return True, ""
        if names[0] in (
            "UnknownTopicOrPartitionError",
            "NotLeaderForPartitionError",
            "KafkaTimeoutError",
            "TransactionAbortedError",
            "OutOfOrderSequenceNumberError",
            "UnknownProducerIdError",
            "InvalidTxnStateError",
            "ConcurrentTransactionsError",
            "BrokerNotAvailableError",
            "KafkaStorageError",
            "NotEnoughReplicasError",
            "NotEnoughReplicasAfterAppendError",
            "CommitFailedError",
            "RebalanceInProgressError",
            "IllegalStateError",
            "Cancelled",
        ):
            return True, ""  # the producer or consumer is rebuilt and the step retried
        if names[0] == "KafkaError" and any(name in str(exc) for name in _retriable_kafka_names()):
            # kafka-python wraps a failed transactional request in a plain KafkaError that only names the
            # cause ("Could not execute transactional request ...: RequestTimedOutError ..."): a frozen
            # coordinator must be waited out, not taken for a permanent failure.
            return True, ""
        return False, ""
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True, ""
    if isinstance(exc, OSError):
        return False, ""
    return False, ""


def _retriable_kafka_names() -> set[str]:
    """Names of kafka-python's retriable error classes (imported here: this module loads without kafka)."""
    import kafka.errors as kafka_errors

    names = {"KafkaConnectionError", "NodeNotReadyError", "KafkaTimeoutError"}
    for value in vars(kafka_errors).values():
        if isinstance(value, type) and issubclass(value, kafka_errors.RetriableError):
            names.add(value.__name__)
    names.discard("RetriableError")
    return names


def _classify_s3(exc: BaseException) -> tuple[bool, str]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _S3_PERMANENT:
            return False, _S3_PERMANENT[code]
        if code in _S3_RETRIABLE or status >= 500 or status == 429:
            return True, ""
        if status in (401, 403):
            return False, "check the S3 credentials and the bucket policy"
        return False, ""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        if "mismatch" in text.lower() or "doesn't match" in text.lower():
            return False, "the S3 server's certificate is not valid for the endpoint's host name"
        return False, (
            "the S3 server's certificate is not signed by a CA this client trusts: set AWS_CA_BUNDLE to the CA "
            "that signed it"
        )
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return False, "the S3 endpoint does not speak TLS here: check http:// versus https:// in the endpoint URL"
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return False, "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile"
    if type(exc).__name__ in ("ParamValidationError", "InvalidS3AddressingStyleError", "InvalidEndpointURL"):
        return False, ""
    return True, ""  # connection refused, timeouts, a server that went away mid-response


def as_pipeline_error(what: str, exc: BaseException, **ctx: object) -> PipelineError:
    """`exc` as a PipelineError whose `retriable` flag comes from `classify`."""
    if isinstance(exc, PipelineError):
        return exc.with_context(**ctx)
    retriable, fix = classify(exc)
    if fix and _PRINCIPAL and any("AuthorizationFailed" in c.__name__ for c in type(exc).__mro__):
        fix = f"principal {_PRINCIPAL[0]}: {fix}"
    text = str(exc) or type(exc).__name__
    if not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    message = redact(f"{what}: {text}" + (f" ({fix})" if fix and not retriable else ""))
    return PipelineError(message, retriable=retriable, **ctx)  # type: ignore[arg-type]


class Backoff:
    """Capped exponential backoff: 0.5 s doubling up to `cap`; back to the start after a calm spell."""

    def __init__(self, first: float = 0.5, cap: float = 10.0, calm: float = 60.0) -> None:
        self.first, self.cap, self.calm = first, cap, calm
        self.delay = first
        self.attempts = 0
        self._last_failure = 0.0

    def next(self) -> float:
        now = time.monotonic()
        if now - self._last_failure > self.calm:
            self.delay, self.attempts = self.first, 0  # it ran fine for a while: a new outage
        self._last_failure = now
        delay = self.delay
        self.delay = min(self.cap, self.delay * 2)
        self.attempts += 1
        return delay


def retry(
    what: str,
    fn: Callable[[], T],
    log: Callable[[str], None],
    *,
    backoff: Backoff | None = None,
    stop: threading.Event | None = None,
    explain: Callable[[], str] | None = None,
) -> T:
    """Run `fn` until it succeeds; after a retriable PipelineError log one line and wait (capped backoff).

    A permanent error is raised at once. `explain` adds what the wait is about (e.g. which brokers are
    unreachable) to the line. Setting `stop` ends the waiting with the last error.
    """
    backoff = backoff or Backoff()
    while True:
        try:
            return fn()
        except PipelineError as exc:
            if not exc.retriable or (stop is not None and stop.is_set()):
                raise
            delay = backoff.next()
            extra = ""
            if explain is not None:
                try:
                    extra = explain()
                except Exception as also:  # noqa: BLE001 - the explanation is best effort
                    extra = f"({type(also).__name__} while looking why)"
            why = redact(f"{what}: {exc}{'; ' + extra if extra else ''}")
            log(f"{why} — retrying in {delay:.1f} s (retry {backoff.attempts})")
            if stop is not None:
                if stop.wait(delay):
                    raise
            else:
                time.sleep(delay)


def unreachable(bootstrap_servers: str, timeout: float = 0.5) -> tuple[list[str], int]:
    """(addresses that refuse a TCP connection, number of addresses) of a bootstrap list."""
    addresses = [a.strip() for a in bootstrap_servers.split(",") if a.strip()]
    down = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
        except (OSError, ValueError):
            down.append(address)
    return down, len(addresses)


class DiskFault(NamedTuple):
    """Why the replica target cannot be written, and what the operator has to do about it."""

    reason: str
    remedy: str


_DISK_FAULTS = {
    errno.ENOSPC: DiskFault("no space left on device", "free space"),
    errno.EDQUOT: DiskFault("disk quota exceeded", "free space or raise the quota"),
    errno.EROFS: DiskFault("read-only file system", "make it writable"),
    errno.EACCES: DiskFault("permission denied", "make it writable"),
    errno.EPERM: DiskFault("operation not permitted", "make it writable"),
}


def disk_fault(exc: BaseException) -> DiskFault | None:
    """The target-filesystem condition behind `exc` (full, over quota, read-only), None for anything else.

    These will not go away by retrying: the replica stops with one line naming the cause.
    """
    return _DISK_FAULTS.get(exc.errno) if isinstance(exc, OSError) and exc.errno is not None else None
