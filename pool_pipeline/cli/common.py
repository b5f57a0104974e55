"""What every command shares: Kafka and S3 options, one-line errors, exit codes, progress, the retry wrapper."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pipeline.codec import Codec
from pipeline.errors import PipelineError
from pipeline.model import Transaction

if TYPE_CHECKING:
    from connectors.kafka.client import KafkaSettings

EXIT_USAGE = 2


def add_kafka(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None,
        help="Kafka brokers, host:port[,host:port] (default: $KAFKA_BOOTSTRAP_SERVERS, else bootstrap.servers "
        "of the client config, else 127.0.0.1:9092)",
    )
    p.add_argument(
        "--kafka-config",
        metavar="FILE",
        default=os.environ.get("KAFKA_CLIENT_CONFIG") or None,
        help="Kafka client properties file with librdkafka key names (security.protocol, sasl.mechanism, "
        "sasl.username, sasl.password, ssl.ca.location, ...) (default: $KAFKA_CLIENT_CONFIG)",
    )


def add_encryption(p: argparse.ArgumentParser, *, reader: bool = True) -> None:
    """--encryption-key (and for readers --allow-plaintext); parse() turns them into args.keyring."""
    p.add_argument(
        "--encryption-key",
        metavar="FILE",
        default=os.environ.get("POOL_PIPELINE_KEY_FILE") or None,
        help="key file (from `pipeline keygen`, mode 0600): record values and archived snapshots are "
        "AES-256-GCM encrypted with its newest key, read with any of its keys (default: $POOL_PIPELINE_KEY_FILE)",
    )
    if reader:
        p.add_argument(
            "--allow-plaintext",
            action="store_true",
            help="with a key: also accept records and snapshots written without encryption (a topic or "
            "archive from before encryption was turned on); otherwise they are refused",
        )


def dev_state_dir() -> Path:
    return Path(os.environ.get("POOL_PIPELINE_HOME", Path.home() / ".local/state/pool-pipeline")) / "dev"


def fail(message: str, code: int = 1) -> NoReturn:
    from connectors.faults import redact

    print(f"error: {redact(message)}", file=sys.stderr)
    raise SystemExit(code)


def run(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> NoReturn:
    """Run a command; turn pipeline errors into one clear line and an exit code."""
    # SIGTERM stops like Ctrl-C; every step is crash-safe, so stopping anywhere is fine.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        code = fn(args)
    except PipelineError as exc:
        fail(str(exc), 3 if exc.retriable else 1)
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


class GracefulStop:
    """SIGTERM/SIGINT for a command that can finish what it holds (the archiver flushes its open
    segment): the first signal sets `event` while `flushing` is true and the command winds down on
    its own; outside that, or at a second signal, it stops at once (KeyboardInterrupt).
    `signals` counts them, so the command can tell a first signal (a clean stop) from a second."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.flushing = False
        self.signals = 0

    def install(self) -> GracefulStop:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals += 1
        self.event.set()
        if self.signals > 1 or not self.flushing:
            raise KeyboardInterrupt


def add_bucket(p: argparse.ArgumentParser, *, required: bool = True, what: str = "") -> None:
    env = os.environ.get("POOL_PIPELINE_BUCKET", "").strip()
    default = env if env.startswith("s3://") else f"s3://{env}/archive" if env else None
    p.add_argument(
        "--bucket",
        default=default,
        required=required and default is None,
        help=f"{what}s3://bucket/prefix (default: s3://$POOL_PIPELINE_BUCKET/archive); the endpoint and "
        "credentials come from boto3's standard settings (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...)",
    )
    p.add_argument("--endpoint-url", help="S3 endpoint, overriding AWS_ENDPOINT_URL_S3")


class Progress:
    """Prints one status line every `every` seconds rather than one per transaction."""

    def __init__(self, label: str, every: float = 2.0) -> None:
        self.label, self.every = label, every
        self.last_print = time.monotonic()
        self.txns = 0
        self.last_txn = 0

    def __call__(self, txn: Transaction, extra: str = "") -> None:
        self.txns += 1
        self.last_txn = txn.txn_id
        now = time.monotonic()
        if now - self.last_print >= self.every:
            rate = self.txns / (now - self.last_print)
            lag_ms = max(0, int(time.time() * 1000) - txn.source_time_ms)
            print(
                f"{self.label}: txn {txn.txn_id} ({rate:.0f} txn/s, {lag_ms} ms behind the source){extra}", flush=True
            )
            self.last_print, self.txns = now, 0


def with_retries(what: str, attempt: Callable[[], int], *, kafka: KafkaSettings | None = None) -> int:
    """Run `attempt`; on a retriable PipelineError log why, wait (the one retry policy) and run it again.
    A step that fails part way is safe to run again: every sink stores its position with its data."""
    from connectors.faults import Backoff, retry

    explain = None
    step = attempt
    if kafka is not None:
        from connectors.kafka.topics import reachability

        explain = lambda: reachability(kafka)  # noqa: E731

        checked: list[bool] = []

        def step() -> int:
            # kafka-python retries a failed TLS handshake or a refused login like an outage: look first.
            if not checked:
                checked.append(True)
                problem = kafka.security_problem()
                if problem:
                    raise PipelineError(f"{what}: {problem}")
            try:
                return attempt()
            except PipelineError as exc:
                # Later, only with security settings and a failure that looks like them: during a broker
                # bounce the probe could mistake a restarting broker for a refused login.
                if exc.retriable and kafka.secured and _looks_like_security(exc):
                    problem = kafka.security_problem()
                    if problem:
                        raise PipelineError(f"{what}: {problem}") from None
                raise

    # Outages are retried every 3 s at most, so a cluster that is back is used within seconds.
    return retry(
        what, step, lambda line: print(line, file=sys.stderr, flush=True), backoff=Backoff(cap=3.0), explain=explain
    )


def _looks_like_security(exc: PipelineError) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("bootstrap", "authentication", "ssl", "sasl", "certificate"))


def duration_ms(text: str) -> int:
    """A retention: `infinite` (-1), or a number with a unit s, m, h, d or w, in ms (argparse type)."""
    text = text.strip().lower()
    if text in ("infinite", "inf", "-1"):
        return -1
    units = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
    number, unit = text[:-1], text[-1:]
    try:
        value = float(number) * units[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: give a duration like 7d, 12h, 90m, 3600s, or infinite") from None
    if value < 1_000:
        raise argparse.ArgumentTypeError(f"{text!r}: a retention must be at least 1 s")
    return int(value)


def topic_ready(kafka: KafkaSettings, database: str, once: bool, what: str) -> bool:
    """Wait for the database's topic (only the capture-agent creates it); with --once, say so and go."""
    from connectors.kafka.topics import topic_for, wait_for_topic

    if wait_for_topic(kafka, database, once=once, log=lambda line: print(f"{what}: {line}", flush=True)):
        return True
    print(
        f"{what}: topic {topic_for(database)} does not exist yet (no capture-agent has published "
        f"{database!r}); nothing to do",
        flush=True,
    )
    return False


def skip_to_snapshot(
    kafka: KafkaSettings, database: str, codec: Codec, next_offset: int, txn_id: int, what: str
) -> int:
    """The offset of the newest snapshot txn after `next_offset`: the way past a bad record (--skip-to-snapshot)."""
    from connectors.kafka.topics import latest_snapshot

    snapshot = latest_snapshot(kafka, database, codec)
    if snapshot is None or snapshot[1] < next_offset or snapshot[0] <= txn_id:
        raise PipelineError(
            f"{what} {database}: --skip-to-snapshot found no snapshot after offset {next_offset} "
            f"(txn {txn_id}): publish one with `capture-agent --snapshot` first, or run without --skip-to-snapshot",
            database=database,
        )
    if snapshot[1] > next_offset:
        print(
            f"{what} {database}: skipping offsets {next_offset}..{snapshot[1] - 1} to the snapshot txn "
            f"{snapshot[0]} at offset {snapshot[1]} (--skip-to-snapshot)",
            flush=True,
        )
    return snapshot[1]


def state_home() -> Path:
    return Path(os.environ.get("POOL_PIPELINE_HOME", Path.home() / ".local/state/pool-pipeline"))


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; Kafka settings are built here once, for every client the command makes."""
    args = parser.parse_args(argv)
    if hasattr(args, "kafka_config"):
        from connectors.kafka.client import KafkaSettings

        try:
            args.kafka = KafkaSettings.from_env(args.bootstrap_servers, args.kafka_config)
        except PipelineError as exc:
            fail(str(exc))
        args.bootstrap_servers = args.kafka.bootstrap_servers
    if hasattr(args, "encryption_key"):
        args.keyring = None
        if args.encryption_key:
            from connectors.keys import load_keyring

            # The agent only reads back its own last commit: plaintext from before encryption was on is fine.
            plain = getattr(args, "allow_plaintext", True)
            try:
                args.keyring = load_keyring(args.encryption_key, allow_plaintext=plain)
            except PipelineError as exc:
                fail(str(exc))
    return args
