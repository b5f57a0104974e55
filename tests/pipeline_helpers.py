"""Helpers for end-to-end tests and soak scripts: run the CLIs as real processes, read a database topic.

Everything here drives the real console scripts (capture-agent, replica, verify) against a real
broker and real PicoLisp pools (tests/picolisp_fixtures.PicoApp); nothing is stubbed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from connectors.picolisp.blobs import compare_blob_trees
from connectors.picolisp.format import compare_pools
from pipeline.checksum import RollingChecksum
from pipeline.codec import Codec, Record
from pipeline.model import BlockWrite, FileLayout, Transaction

__all__ = [
    "CrashStats",
    "check_caught_up",
    "crash_kill",
    "replica_at_boundary",
    "replica_txn",
    "BIN",
    "Cli",
    "Proc",
    "TopicTxn",
    "codec",
    "ok",
    "committed_transactions",
    "create_topic",
    "end_offset",
    "produce_transactional",
    "read_committed_records",
    "replica_position",
    "unique_name",
    "wait_for",
]

# The console scripts installed next to the interpreter running the tests (the project venv).
BIN = Path(sys.executable).parent
TOPIC_PREFIX = "pool."


def unique_name(prefix: str) -> str:
    """A database name no other test (or earlier run against the same broker) has used."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def ok(result: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    """Assert a CLI run succeeded, showing its output tails if not."""
    assert result.returncode == 0, (
        f"{what} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def codec() -> Codec:
    from schemas import load_schemas

    return Codec(load_schemas())


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll `cond` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Proc:
    """A CLI running in the background; stdout and stderr go to files so pipes never block it."""

    name: str
    popen: subprocess.Popen
    out_path: Path
    err_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> int:
        """SIGKILL this one process (by its own pid) and reap it."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        return self.popen.wait(timeout=30)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM (the CLIs stop cleanly on it), SIGKILL if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return self.kill9()
        return self.popen.returncode

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def output(self) -> str:
        return (
            f"--- {self.name} (pid {self.pid}) stdout:\n{self.stdout()[-3000:]}\n--- stderr:\n{self.stderr()[-3000:]}"
        )


@dataclass
class Cli:
    """Runs capture-agent / replica / verify for one PicoApp (cwd = app root, relative paths as in the docs)."""

    root: Path
    bootstrap_servers: str
    database: str
    procs: list[Proc] = field(default_factory=list)
    _n: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. the S3 endpoint and keys for archive/restore

    # Paths relative to the app root, the layout PicoApp creates.
    pool: str = "db/app/"
    journal: str = "fifo/app"
    blob: str = "blob/app/"

    def env(self) -> dict[str, str]:
        return dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=self.bootstrap_servers, PYTHONUNBUFFERED="1", **self.extra_env)

    def agent_args(self, *extra: str, database: str | None = None) -> list[str]:
        return [
            str(BIN / "capture-agent"),
            "--pool",
            self.pool,
            "--journal",
            self.journal,
            "--blob",
            self.blob,
            "--database",
            database or self.database,
            *extra,
        ]

    def replica_args(
        self,
        target: str = "rpl/db/app/",
        blob: str | None = "rpl/blob/app/",
        group: str = "replica",
        *extra: str,
        database: str | None = None,
    ) -> list[str]:
        args = [str(BIN / "replica"), "--database", database or self.database, "--target", target, "--group", group]
        if blob is not None:
            args += ["--blob", blob]
        return args + list(extra)

    def run(self, args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args),
            cwd=self.root,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, name: str, args: Sequence[str]) -> Proc:
        self._n += 1
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        out, err = logs / f"{self._n:04d}-{name}.out", logs / f"{self._n:04d}-{name}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            popen = subprocess.Popen(
                list(args), cwd=self.root, env=self.env(), stdin=subprocess.DEVNULL, stdout=o, stderr=e
            )
        proc = Proc(name, popen, out, err)
        self.procs.append(proc)
        return proc

    # The commands, each as a foreground run (`--once`) or a follow-mode background process.
    def agent_once(self, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run(self.agent_args("--once", *extra), timeout)

    def start_agent(self, *extra: str, name: str = "agent") -> Proc:
        return self.start(name, self.agent_args(*extra))

    def replica_once(
        self,
        target: str = "rpl/db/app/",
        blob: str | None = "rpl/blob/app/",
        group: str = "replica",
        *extra: str,
        database: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess:
        return self.run(self.replica_args(target, blob, group, "--once", *extra, database=database), timeout)

    def start_replica(
        self,
        target: str = "rpl/db/app/",
        blob: str | None = "rpl/blob/app/",
        group: str = "replica",
        *extra: str,
        name: str = "replica",
    ) -> Proc:
        return self.start(name, self.replica_args(target, blob, group, *extra))

    def verify(self, target: str = "rpl/db/app/", blob: str = "rpl/blob/app/") -> subprocess.CompletedProcess:
        return self.run(
            [
                str(BIN / "verify"),
                "--pool",
                self.pool,
                "--replica",
                target,
                "--blob",
                self.blob,
                "--replica-blob",
                blob,
            ],
            timeout=120,
        )

    def differences(self, target: str = "rpl/db/app/", blob: str = "rpl/blob/app/") -> list[str]:
        """The same comparison verify makes, in-process, for assertion messages."""
        return compare_pools(self.root / self.pool, self.root / target) + compare_blob_trees(
            self.root / self.blob, self.root / blob
        )

    def stop_all(self) -> None:
        """Stop every process this Cli started (each by its own pid)."""
        for proc in self.procs:
            if proc.alive():
                proc.kill9()


def replica_position(target: Path) -> dict | None:
    """The replica's stored position (position.json beside its pool files), None before its first txn."""
    path = Path(target) / ".pool-pipeline" / "position.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def replica_txn(target: Path) -> int:
    pos = replica_position(target)
    return pos["txn_id"] if pos else 0


# --- the topic ---------------------------------------------------------------------------------


def _consumer(bootstrap_servers: str, isolation_level: str = "read_committed"):
    from kafka import KafkaConsumer

    return KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level=isolation_level,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )


def end_offset(bootstrap_servers: str, database: str, isolation_level: str = "read_uncommitted") -> int:
    """The topic's end offset (high watermark, or LSO with read_committed); 0 if the topic does not exist."""
    from kafka.structs import TopicPartition

    consumer = _consumer(bootstrap_servers, isolation_level)
    try:
        topic = TOPIC_PREFIX + database
        if topic not in consumer.topics():
            return 0
        tp = TopicPartition(topic, 0)
        return consumer.end_offsets([tp])[tp]
    finally:
        consumer.close()


def read_committed_records(bootstrap_servers: str, database: str, timeout: float = 60) -> list[Record]:
    """Every committed record of the database topic, up to its current last stable offset."""
    from kafka.structs import TopicPartition

    topic = TOPIC_PREFIX + database
    tp = TopicPartition(topic, 0)
    consumer = _consumer(bootstrap_servers)
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        records: list[Record] = []
        deadline = time.monotonic() + timeout
        while consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out reading {topic} up to offset {end}")
            for r in consumer.poll(timeout_ms=200).get(tp, []):
                if r.offset < end:
                    records.append(r)
        return records
    finally:
        consumer.close()


@dataclass(frozen=True)
class TopicTxn:
    txn_id: int
    snapshot: bool
    checksum_before: int
    checksum_after: int
    change_count: int
    offset: int
    end_offset: int
    blocks: int = 0
    blob_chunks: int = 0
    blob_deletes: int = 0
    source_time_ms: int = 0


def committed_transactions(bootstrap_servers: str, database: str) -> list[TopicTxn]:
    """Decode the committed stream with the pipeline's own codec (which checks framing) into transactions."""
    from pipeline.model import BlobChunk, BlobDelete, BlockWrite

    out = []
    txn: Transaction
    for txn in codec().read_transactions(read_committed_records(bootstrap_servers, database), database):
        kinds = {BlockWrite: 0, BlobChunk: 0, BlobDelete: 0}
        for change in txn.changes:
            kinds[type(change)] += 1
        assert txn.end_offset is not None
        out.append(
            TopicTxn(
                txn.txn_id,
                txn.snapshot,
                txn.checksum_before,
                txn.checksum_after,
                txn.change_count,
                txn.offset or 0,
                txn.end_offset,
                kinds[BlockWrite],
                kinds[BlobChunk],
                kinds[BlobDelete],
                txn.source_time_ms,
            )
        )
    return out


def create_topic(bootstrap_servers: str, topic: str, timeout: float = 30) -> bool:
    """Create a one-partition topic unless it exists (brokers run with auto.create.topics.enable=false,
    as in production); True if this call created it. Replication factor from the cluster size: 1 on
    fewer than 3 brokers, else 3, as the brokers' own default.replication.factor."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers, client_id="pool-pipeline-tests", request_timeout_ms=int(timeout * 1000)
    )
    try:
        if topic in admin.list_topics():
            return False
        brokers = len(admin.describe_cluster()["brokers"])
        try:
            admin.create_topics([NewTopic(topic, 1, 1 if brokers < 3 else 3)])
        except TopicAlreadyExistsError:
            return False
        # Producers fail on a topic whose metadata has not reached the broker they ask; wait for it.
        wait_for(lambda: topic in admin.list_topics(), timeout, f"topic {topic} to appear", interval=0.1)
        return True
    finally:
        admin.close()


def produce_transactional(
    bootstrap_servers: str, database: str, records: Iterable[tuple[bytes, bytes]], transactional_id: str | None = None
) -> None:
    """Publish (key, value) records into the database topic as one committed Kafka transaction,
    creating the topic first if no capture-agent has."""
    from kafka import KafkaProducer

    create_topic(bootstrap_servers, TOPIC_PREFIX + database)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap_servers,
        enable_idempotence=True,
        acks="all",
        transactional_id=transactional_id or f"test-{uuid.uuid4().hex}",
    )
    try:
        producer.init_transactions()
        producer.begin_transaction()
        for key, value in records:
            producer.send(TOPIC_PREFIX + database, key=key, value=value, partition=0)
        producer.commit_transaction()
    finally:
        producer.close(timeout=10)


# --- invariants --------------------------------------------------------------------------------


def replica_at_boundary(target: Path) -> str | None:
    """None if the replica's files are exactly the state its position.json names; else what is wrong.

    A replica killed between its redo commit point and dropping the redo file is mid-apply by
    design (the next start replays the redo), so that state is accepted here.
    """
    from connectors.picolisp.format import pool_files, scan_blocks
    from pipeline.checksum import checksum_of

    state = Path(target) / ".pool-pipeline"
    pos = replica_position(target)
    if pos is None:
        return None if not pool_files(target) else "pool files without position.json"
    if (state / "redo").exists():
        return None
    files = pool_files(target)
    if len(files) != len(pos["files"]):
        return f"{len(files)} pool files, position.json describes {len(pos['files'])}"

    layouts = [FileLayout(**f) for f in pos["files"]]
    for f, path in zip(layouts, files):
        if path.stat().st_size != f.block_size * f.blocks:
            return f"{path}: {path.stat().st_size} bytes, position says {f.blocks} x {f.block_size}"
    fds = [os.open(path, os.O_RDONLY) for path in files]
    try:
        value = checksum_of((b.file, b.index, b.data) for b in scan_blocks(fds.__getitem__, layouts))
    finally:
        for fd in fds:
            os.close(fd)
    if value != pos["checksum"]:
        return f"files have checksum {value:016x}, position.json says txn {pos['txn_id']} {pos['checksum']:016x}"
    return None


@dataclass
class CrashStats:
    iterations: int = 0
    agent_kills: int = 0
    replica_kills: int = 0
    workload_runs: int = 0
    workload_txns: int = 0
    boundary_checks: int = 0
    txns: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.iterations} iterations in {self.seconds:.1f} s: {self.agent_kills} agent kills, "
            f"{self.replica_kills} replica kills, {self.workload_txns} PicoLisp commits in "
            f"{self.workload_runs} workload runs, {self.txns} pipeline txns, "
            f"{self.boundary_checks} replica boundary checks after kill -9"
        )


def crash_kill(
    cli: Cli,
    app,
    iterations: int,
    rng,
    *,
    min_sleep: float = 0.05,
    max_sleep: float = 1.0,
    target: str = "rpl/db/app/",
    blob: str = "rpl/blob/app/",
    workload_txns: int = 300,
    workload_sleep_ms: int = 2,
    log: Callable[[str], None] | None = None,
) -> CrashStats:
    """kill -9 the agent and/or the replica (follow mode) at random points while PicoLisp commits.

    Each iteration starts whatever is not running, sleeps a random time, then SIGKILLs the
    agent, the replica or both. A process that exits on its own is a failure. After the loop
    the workload finishes and both are stopped; the caller then catches up and checks.
    """
    stats = CrashStats()
    started = time.monotonic()
    agent: Proc | None = None
    replica: Proc | None = None
    wl = None
    seed = rng.randrange(1 << 30)

    def check_exited(proc: Proc | None) -> None:
        if proc is not None and not proc.alive():
            raise AssertionError(f"{proc.name} exited on its own with status {proc.popen.returncode}\n{proc.output()}")

    def finish_workload(p) -> None:
        out, err = p.communicate(timeout=120)
        if p.returncode != 0:
            raise AssertionError(f"PicoLisp workload failed ({p.returncode}): {out[-1000:]} {err[-2000:]}")
        stats.workload_runs += 1
        stats.workload_txns += workload_txns

    try:
        for i in range(iterations):
            if wl is not None and wl.poll() is not None:
                finish_workload(wl)
                wl = None
            if wl is None:
                seed += 1
                wl = app.workload_proc(workload_txns, seed=seed, sleep_ms=workload_sleep_ms)
            check_exited(agent)
            check_exited(replica)
            if agent is None:
                agent = cli.start_agent(name=f"agent-{i}")
            if replica is None:
                replica = cli.start_replica(target, blob, name=f"replica-{i}")
            time.sleep(rng.uniform(min_sleep, max_sleep))
            check_exited(agent)
            check_exited(replica)
            victim = rng.choice(("agent", "replica", "both"))
            if victim in ("agent", "both"):
                agent.kill9()
                agent = None
                stats.agent_kills += 1
            if victim in ("replica", "both"):
                replica.kill9()
                replica = None
                stats.replica_kills += 1
                problem = replica_at_boundary(cli.root / target)
                if problem:
                    raise AssertionError(
                        f"iteration {i}: after kill -9 the replica is not at a txn boundary: {problem}"
                    )
                stats.boundary_checks += 1
            stats.iterations += 1
            if log is not None:
                log(f"iteration {i + 1}/{iterations}: killed {victim}; replica at txn {replica_txn(cli.root / target)}")
        if wl is not None:
            finish_workload(wl)
            wl = None
    finally:
        for proc in (agent, replica):
            if proc is not None:
                proc.kill9()
        if wl is not None and wl.poll() is None:
            wl.kill()
            wl.wait()
    stats.seconds = time.monotonic() - started
    return stats


def check_caught_up(cli: Cli, app, target: str = "rpl/db/app/", blob: str = "rpl/blob/app/") -> list[TopicTxn]:
    """Run agent and replica --once, then assert: txn ids 1..N each exactly once, replica at N, md5-equal,
    blobs equal, the same PicoLisp query output. Returns the topic's transactions."""
    r = cli.agent_once()
    assert r.returncode == 0, f"final capture-agent --once failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    r = cli.replica_once(target, blob)
    assert r.returncode == 0, f"final replica --once failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    txns = committed_transactions(cli.bootstrap_servers, cli.database)
    ids = [t.txn_id for t in txns]
    assert ids == list(range(1, len(ids) + 1)), f"txn ids in the topic are not 1..N each once: {_gaps(ids)}"
    for prev, nxt in zip(txns, txns[1:]):
        assert nxt.checksum_before == prev.checksum_after, f"txn {nxt.txn_id} does not continue txn {prev.txn_id}"
    pos = replica_position(cli.root / target)
    assert pos is not None and pos["txn_id"] == len(ids), f"replica at {pos and pos['txn_id']}, topic has {len(ids)}"
    assert pos["checksum"] == txns[-1].checksum_after, f"replica checksum {pos['checksum']:016x} at txn {pos['txn_id']}"
    v = cli.verify(target, blob)
    assert v.returncode == 0, f"verify failed:\n{v.stdout[-3000:]}{v.stderr[-2000:]}"
    diffs = cli.differences(target, blob)
    assert diffs == [], f"replica differs: {diffs[:10]}"
    source = app.query(app.prefix, app.blob_dir)
    replica = app.query(cli.root / target, cli.root / blob)
    if source != replica:
        import difflib

        diff = list(
            difflib.unified_diff(source.splitlines(), replica.splitlines(), "source", "replica", lineterm="", n=0)
        )
        raise AssertionError("the PicoLisp query prints different text on the replica:\n" + "\n".join(diff[:30]))
    return txns


def _gaps(ids: list[int]) -> str:
    seen: dict[int, int] = {}
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
    doubled = sorted(i for i, n in seen.items() if n > 1)
    missing = sorted(set(range(1, max(ids, default=0) + 1)) - set(seen))
    out_of_order = [b for a, b in zip(ids, ids[1:]) if b <= a][:10]
    return f"{len(ids)} txns, doubled {doubled[:20]}, missing {missing[:20]}, out of order {out_of_order}"


SYNTHETIC_BLOCK = 4096


def synthetic_block(rng: random.Random) -> bytes:
    """Half random, half zeros: compresses to about half (real pool blocks compress further)."""
    return rng.randbytes(SYNTHETIC_BLOCK // 2) + bytes(SYNTHETIC_BLOCK // 2)


def synthetic_stream(database: str, pool_blocks: int, txns: int, per_txn: int, seed: int) -> Iterator[Transaction]:
    """Transactions of a one-file pool with correct rolling checksums: txn 1 a snapshot of
    `pool_blocks` 4 KiB blocks, then `txns` updates of `per_txn` blocks. For sizes PicoLisp
    would take long to build (the archive benchmark, big-transaction tests)."""
    rng = random.Random(seed)
    rolling = RollingChecksum()
    layout = [FileLayout(0, SYNTHETIC_BLOCK, pool_blocks)]

    def snapshot_changes(txn: Transaction) -> Iterator[BlockWrite]:
        for i in range(pool_blocks):
            data = synthetic_block(rng)
            rolling.set_block(0, i, data)
            yield BlockWrite(0, i, data)
        txn.checksum_after = rolling.value

    t = Transaction(database, 1, 0, 1_700_000_000_000, snapshot=True, files=layout, change_count=pool_blocks)
    t.changes = snapshot_changes(t)
    yield t
    for n in range(2, txns + 2):
        before = rolling.value
        changes = []
        for i in rng.sample(range(pool_blocks), per_txn):
            data = synthetic_block(rng)
            rolling.set_block(0, i, data)
            changes.append(BlockWrite(0, i, data))
        yield Transaction(
            database,
            n,
            before,
            1_700_000_000_000 + n * 10,
            changes,
            checksum_after=rolling.value,
            files=layout,
            change_count=per_txn,
        )
