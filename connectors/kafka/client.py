"""The one Kafka client factory (KafkaSettings), the committed-stream consumer, Kafka errors as PipelineErrors."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import (
    InvalidProducerEpochError,
    KafkaError,
    ProducerFencedError,
)
from kafka.structs import TopicPartition

from connectors.faults import as_pipeline_error, register_principal, register_secret
from pipeline.errors import PipelineError

# A refused transactional id (TransactionalIdAuthorizationFailedError) is an ACL problem, not fencing:
# connectors.faults reports it as one, naming the principal.
FENCED = (ProducerFencedError, InvalidProducerEpochError)


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


# Options whose values are secrets: shown as *** by repr/str, scrubbed from error messages.
SECRET_OPTIONS = frozenset({"sasl_plain_password", "ssl_password", "sasl_oauth_token_provider"})
REDACTED = "***"

# The client-config file (--kafka-config / $KAFKA_CLIENT_CONFIG): librdkafka / Kafka PEM key -> kafka-python option.
CONFIG_ENV = "KAFKA_CLIENT_CONFIG"
_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_FILE_KEYS = {
    "ssl.ca.location": "ssl_cafile",
    "ssl.certificate.location": "ssl_certfile",
    "ssl.key.location": "ssl_keyfile",
}
_PLAIN_KEYS = {
    "sasl.username": "sasl_plain_username",
    "sasl.password": "sasl_plain_password",
    "ssl.key.password": "ssl_password",
}
_KNOWN_KEYS = (
    {
        "bootstrap.servers",
        "security.protocol",
        "sasl.mechanism",
        "sasl.mechanisms",
        "ssl.endpoint.identification.algorithm",
    }
    | set(_FILE_KEYS)
    | set(_PLAIN_KEYS)
)
_JAVA_HINT = (
    "Java keystores are not supported: export PEM files (keytool -exportcert -rfc, or openssl pkcs12 -in FILE.p12) "
    "and set ssl.ca.location, ssl.certificate.location and ssl.key.location"
)


def load_client_config(path: str | os.PathLike[str]) -> tuple[str | None, dict[str, Any]]:
    """(bootstrap servers or None, kafka-python options) from a client properties file.

    The file uses librdkafka / Kafka PEM client key names (`key=value` or `key: value`, `#` and `!`
    comments, blank lines). Relative file paths are taken relative to the properties file. Any error
    names the file, line and key, never a value that could be a secret.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineError(f"cannot read Kafka client config {source}: {exc.strerror or exc}") from None
    seen: dict[str, tuple[str, int]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        match = re.match(r"([^=:\s]+)\s*[=:]\s*(.*)$", line) or re.match(r"(\S+)\s+(.*)$", line)
        at = f"{source}, line {number}"
        if match is None:
            raise PipelineError(f"{at}: expected key=value")
        key, value = match.group(1), match.group(2).strip()
        java_file = key.endswith(".location") and value.lower().endswith((".jks", ".p12", ".pfx"))
        if key.startswith(("ssl.keystore.", "ssl.truststore.")) or java_file:
            raise PipelineError(f"{at}: {key}: {_JAVA_HINT}")
        if key == "sasl.jaas.config":
            raise PipelineError(f"{at}: {key} is a Java setting: use sasl.mechanism, sasl.username and sasl.password")
        if key not in _KNOWN_KEYS:
            raise PipelineError(
                f"{at}: unknown key {key!r} (supported: {', '.join(sorted(_KNOWN_KEYS - {'sasl.mechanisms'}))})"
            )
        if key == "sasl.mechanisms":
            key = "sasl.mechanism"  # librdkafka's spelling
        if key in seen:
            raise PipelineError(f"{at}: {key} is set twice (first on line {seen[key][1]})")
        seen[key] = (value, number)

    def where(key: str) -> str:
        return f"{source}, line {seen[key][1]}: {key}"

    options: dict[str, Any] = {}
    protocol = seen.get("security.protocol", ("PLAINTEXT", 0))[0].upper()
    if protocol not in _PROTOCOLS:
        raise PipelineError(f"{where('security.protocol')}: {protocol!r} is not one of {', '.join(_PROTOCOLS)}")
    options["security_protocol"] = protocol
    sasl, tls = protocol.startswith("SASL_"), protocol.endswith("SSL")
    if "sasl.mechanism" in seen:
        mechanism = seen["sasl.mechanism"][0].upper()
        if mechanism not in _MECHANISMS:
            raise PipelineError(f"{where('sasl.mechanism')}: {mechanism!r} is not one of {', '.join(_MECHANISMS)}")
        options["sasl_mechanism"] = mechanism
    for key, option in _PLAIN_KEYS.items():
        if key in seen:
            options[option] = seen[key][0]
    for key, option in _FILE_KEYS.items():
        if key in seen:
            file = Path(seen[key][0]).expanduser()
            file = file if file.is_absolute() else source.parent / file
            if not file.is_file():
                raise PipelineError(f"{where(key)}: file {file} does not exist")
            options[option] = str(file)
    if "ssl.endpoint.identification.algorithm" in seen:
        algorithm = seen["ssl.endpoint.identification.algorithm"][0].lower()
        if algorithm not in ("https", "none", ""):
            raise PipelineError(f"{where('ssl.endpoint.identification.algorithm')}: {algorithm!r} is not https or none")
        options["ssl_check_hostname"] = algorithm == "https"
    for key in seen:
        if key.startswith("sasl.") and not sasl:
            raise PipelineError(
                f"{where(key)} is set but security.protocol is {protocol}: use SASL_SSL or SASL_PLAINTEXT"
            )
        if key.startswith("ssl.") and not tls:
            raise PipelineError(f"{where(key)} is set but security.protocol is {protocol}: use SSL or SASL_SSL")
    if sasl:
        for key in ("sasl.mechanism", "sasl.username", "sasl.password"):
            if key not in seen:
                raise PipelineError(f"{source}: security.protocol {protocol} needs {key}")
    if "ssl.key.location" in seen and "ssl.certificate.location" not in seen:
        raise PipelineError(f"{where('ssl.key.location')} is set without ssl.certificate.location")
    bootstrap = seen.get("bootstrap.servers", ("", 0))[0].strip() or None
    return bootstrap, options


@dataclass(frozen=True, repr=False)
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
        for key in SECRET_OPTIONS & set(self.options):
            if isinstance(self.options[key], str):
                register_secret(self.options[key])  # scrubbed from every error message from now on
        user = self.options.get("sasl_plain_username")
        if isinstance(user, str) and str(self.options.get("security_protocol", "")).upper().startswith("SASL_"):
            register_principal(f"User:{user}")  # named in authorization errors from now on

    def __repr__(self) -> str:
        shown = {k: REDACTED if k in SECRET_OPTIONS else v for k, v in self.options.items()}
        return f"KafkaSettings(bootstrap_servers={self.bootstrap_servers!r}, options={shown!r})"

    __str__ = __repr__

    @staticmethod
    def from_properties(
        path: str | os.PathLike[str], bootstrap_servers: str | None = None, **options: Any
    ) -> KafkaSettings:
        """Settings from a client properties file (see load_client_config). `bootstrap_servers` wins over
        the file's bootstrap.servers; without either, $KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092.
        `options` (kafka-python names) win over the file's."""
        from_file, file_options = load_client_config(path)
        servers = bootstrap_servers or from_file or os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "127.0.0.1:9092"
        return KafkaSettings(servers, {**file_options, **options})

    @staticmethod
    def from_env(bootstrap_servers: str | None = None, config: str | os.PathLike[str] | None = None) -> KafkaSettings:
        """What the commands use: `config` or $KAFKA_CLIENT_CONFIG if set; `bootstrap_servers` or
        $KAFKA_BOOTSTRAP_SERVERS win over the file's bootstrap.servers."""
        servers = bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None
        config = config or os.environ.get(CONFIG_ENV) or None
        if config:
            return KafkaSettings.from_properties(config, servers)
        return KafkaSettings(servers or "127.0.0.1:9092")

    def tls_problem(self, timeout: float = 5.0) -> str | None:
        """Why a TLS handshake with the bootstrap servers fails for good (an untrusted or wrong certificate,
        a client certificate the broker wants), None when it works, is not TLS, or the broker is just down.
        kafka-python reports a failed handshake as a connection error and retries it forever."""
        if not str(self.options.get("security_protocol", "PLAINTEXT")).endswith("SSL"):
            return None
        import socket
        import ssl

        from kafka.net.transport import KafkaSSLTransport

        config = {**KafkaProducer.DEFAULT_CONFIG, **self.options}
        try:
            context = KafkaSSLTransport._build_ssl_context(config)
        except (ssl.SSLError, OSError) as exc:
            return f"cannot load the TLS files of the Kafka client config: {exc}"
        for address in (a.strip() for a in self.bootstrap_servers.split(",") if a.strip()):
            host, _, port = address.rpartition(":")
            host = host.strip("[]") or "127.0.0.1"
            try:
                with socket.create_connection((host, int(port)), timeout=timeout) as sock:
                    with context.wrap_socket(sock, server_hostname=host) as tls:
                        tls.recv(0)  # TLS 1.3: a refused client certificate shows up on the first read
            except ssl.SSLCertVerificationError as exc:
                detail = exc.verify_message or str(exc)
                hint = (
                    "the broker's certificate is not valid for this host name: connect by a name it holds, "
                    "or set ssl.endpoint.identification.algorithm=none"
                    if "mismatch" in detail.lower()
                    else "the broker's certificate is not signed by a CA this client trusts: set ssl.ca.location "
                    "to the CA that signed it"
                )
                return f"TLS handshake with {address} failed, certificate verify failed: {detail} ({hint})"
            except ssl.SSLEOFError:
                continue  # the broker went away mid-handshake (or is restarting): retried as usual
            except ssl.SSLError as exc:
                reason = exc.reason or str(exc)
                hint = (
                    "the broker wants a client certificate: set ssl.certificate.location and ssl.key.location"
                    if "CERTIFICATE_REQUIRED" in reason.upper() or "HANDSHAKE_FAILURE" in reason.upper()
                    else "check security.protocol (is this listener TLS?) and the ssl.* settings"
                )
                return f"TLS handshake with {address} failed: {reason} ({hint})"
            except (OSError, ValueError):
                continue  # down or unreachable: the ordinary retry handles that
        return None

    def tls_listener_problem(self, timeout: float = 2.0) -> str | None:
        """A client without TLS at a TLS listener: kafka-python sees only a closed connection and retries
        until its bootstrap timeout. None when the settings ask for TLS, or the servers do not answer TLS."""
        if str(self.options.get("security_protocol", "PLAINTEXT")).upper().endswith("SSL"):
            return None
        import socket
        import ssl

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # only asks "does this port speak TLS?"; nothing is sent
        for address in (a.strip() for a in self.bootstrap_servers.split(",") if a.strip()):
            host, _, port = address.rpartition(":")
            try:
                with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout) as sock:
                    with context.wrap_socket(sock, server_hostname=host.strip("[]") or None):
                        pass
            except (OSError, ValueError):
                continue  # not TLS, down or unreachable: the ordinary checks and retries handle that
            protocol = self.options.get("security_protocol", "PLAINTEXT")
            return (
                f"the broker at {address} speaks TLS but security.protocol is {protocol}: the listener needs other "
                f"security settings (SSL or SASL_SSL, ssl.ca.location, SASL user); give them in a client config "
                f"file (--kafka-config or ${CONFIG_ENV})"
            )
        return None

    def login_problem(self, timeout: float = 5.0) -> str | None:
        """Why a bootstrap server refuses this client for good, None when it works or the broker is just down.

        kafka-python retries a refused SASL login (or a client without SASL on a SASL listener) until its
        bootstrap timeout (30 s), then reports a timeout. The broker closes the connection on a wrong
        password, which kafka-python often sees as a lost connection: a connection that got through
        ApiVersions and then was lost, twice in a row, is taken as refused."""
        from kafka.errors import KafkaConnectionError, SaslAuthenticationFailedError, UnsupportedSaslMechanismError
        from kafka.net.manager import KafkaConnectionManager
        from kafka.net.selector import NetworkSelector

        protocol = str(self.options.get("security_protocol", "PLAINTEXT"))
        config = self._config(KafkaProducer.DEFAULT_CONFIG, {"client_id": "pool-pipeline-probe"})
        for _ in range(2):
            net = NetworkSelector()
            manager = KafkaConnectionManager(net, **config)
            seen: dict[str, Any] = {}

            async def connect(manager: Any = manager, seen: dict[str, Any] = seen) -> None:
                node = manager.cluster.bootstrap_brokers()[0]
                seen["conn"] = manager.get_connection(
                    node.node_id, timeout_ms=int(timeout * 1000), pop_on_close=False, refresh_metadata_on_err=False
                )
                await seen["conn"]
                await manager.cluster.refresh_metadata(node.node_id)

            try:
                net.run(connect)
                return None
            except (SaslAuthenticationFailedError, UnsupportedSaslMechanismError) as exc:
                return f"SASL authentication failed: {exc} (check the SASL user name and password, and sasl.mechanism)"
            except Exception as exc:  # noqa: BLE001 - anything else: did the broker answer ApiVersions first?
                answered = getattr(seen.get("conn"), "broker_version_data", None) is not None
                if not (answered and isinstance(exc, KafkaConnectionError)):
                    return None  # down, unreachable, starting or not Kafka: the ordinary retry handles that
            finally:
                manager.close()
                net.close()
        if protocol.startswith("SASL_"):
            user = self.options.get("sasl_plain_username")
            return (
                f"SASL authentication as {user!r} with {self.options.get('sasl_mechanism')} failed: the broker "
                "closed the connection during authentication (check the SASL user name and password, and "
                "sasl.mechanism)"
            )
        return (
            f"the broker at {self.bootstrap_servers} closes the connection after the first request with "
            f"security.protocol {protocol}: the listener needs other security settings (SASL?); give them in "
            f"a client config file (--kafka-config or ${CONFIG_ENV})"
        )

    @property
    def secured(self) -> bool:
        """True when the client config asks for TLS or SASL."""
        return str(self.options.get("security_protocol", "PLAINTEXT")).upper() != "PLAINTEXT"

    def security_problem(self) -> str | None:
        """What tls_problem or login_problem finds: a setting that can never work, worth stopping for."""
        return self.tls_problem() or self.tls_listener_problem() or self.login_problem()

    @staticmethod
    def of(kafka: Kafka) -> KafkaSettings:
        """A bootstrap-servers string means: those servers, default options (API convenience)."""
        return kafka if isinstance(kafka, KafkaSettings) else KafkaSettings(kafka)

    def _config(self, known: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        merged = {**CLIENT_DEFAULTS, **self.options, "bootstrap_servers": self.bootstrap_servers, **config}
        return {k: v for k, v in merged.items() if k in known}

    def _build(self, kind: type[Any], config: Mapping[str, Any]) -> Any:
        """A client; a failure to bootstrap (kafka-python raises it from the constructor) as a PipelineError."""
        try:
            return kind(**self._config(kind.DEFAULT_CONFIG, config))
        except KafkaError as exc:
            raise broker_error(f"cannot connect to Kafka at {self.bootstrap_servers}", exc) from exc

    def producer(self, **config: Any) -> KafkaProducer:
        return self._build(KafkaProducer, config)

    def consumer(self, **config: Any) -> KafkaConsumer:
        return self._build(KafkaConsumer, config)

    def admin(self, **config: Any) -> KafkaAdminClient:
        return self._build(KafkaAdminClient, config)


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


def paced_fetches(min_interval: float) -> dict[str, int]:
    """Consumer settings for `--min-interval S`: the broker holds each fetch until S seconds passed or
    1 MiB is ready, so a slow stream arrives in fewer, larger pieces (one group commit each) while a
    backlog still comes at full speed. Nothing for 0."""
    if min_interval <= 0:
        return {}
    return {"fetch_min_bytes": 1 << 20, "fetch_max_wait_ms": int(min_interval * 1000)}


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
