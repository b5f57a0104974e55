"""Broker faults on a real 3-broker KRaft cluster while PicoLisp commits: the test suite's and the soak's driver.

A round starts a PicoLisp workload, kills brokers with SIGKILL (the topic's leader, the transaction
coordinator of the agent's transactional.id, or two of three), keeps them down while the app goes
on committing, restarts them and measures the time until the replica is md5-equal again. The
agent and the replica run in follow mode all along and must never exit.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.pipeline_helpers import Cli, Proc, replica_txn

TXN_STATE_PARTITIONS = 10  # transaction.state.log.num.partitions of pool_pipeline.devstack's brokers
FAST_BOUNCE = {  # a restarted broker serves after ~3 s instead of ~9 s (DUPLICATE_BROKER_REGISTRATION)
    "broker.session.timeout.ms": "3000",
    "broker.heartbeat.interval.ms": "500",
}


def java_hash(text: str) -> int:
    """Java's String.hashCode, which Kafka uses to place a transactional.id on a coordinator."""
    h = 0
    for ch in text:  # transactional ids here are ASCII: one UTF-16 unit per character
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return h


def leaders(bootstrap_servers: str, topic: str) -> dict[int, int]:
    """{partition: leader node id} of a topic."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=10_000)
    try:
        described = admin.describe_topics([topic])
        return {p["partition_index"]: p["leader_id"] for p in described[0]["partitions"]}
    finally:
        admin.close()


def topic_leader(bootstrap_servers: str, database: str) -> int:
    """0-based index of the broker leading the database topic's partition."""
    return leaders(bootstrap_servers, f"pool.{database}")[0] - 1


def coordinator(bootstrap_servers: str, transactional_id: str) -> int:
    """0-based index of the broker coordinating `transactional_id` (leader of its __transaction_state partition)."""
    partition = (java_hash(transactional_id) & 0x7FFFFFFF) % TXN_STATE_PARTITIONS
    return leaders(bootstrap_servers, "__transaction_state")[partition] - 1


def restart(cluster, indices: list[int], ready_timeout: float = 120) -> float:
    """Start the given stopped brokers together (a quorum may need both) and wait until all serve;
    returns the monotonic time they were started."""
    from pool_pipeline.devstack import _spawn, _wait_kafka_ready

    started = time.monotonic()
    for i in indices:
        node_dir = Path(cluster.commands[i][-1]).parent
        proc = _spawn(cluster.commands[i], cluster.log_files[i], node_dir, cluster.detach)
        cluster.pids[i] = proc.pid
        cluster._procs[i] = proc
    _wait_kafka_ready(cluster, ready_timeout, only=indices)
    return started


@dataclass
class FaultStats:
    rounds: int = 0
    brokers_killed: int = 0
    workload_txns: int = 0
    recoveries: list[float] = field(default_factory=list)

    def summary(self) -> str:
        rec = sorted(self.recoveries)
        p50 = rec[len(rec) // 2] if rec else 0.0
        p99 = rec[min(len(rec) - 1, int(len(rec) * 0.99))] if rec else 0.0
        return (
            f"{self.rounds} rounds, {self.brokers_killed} brokers killed, {self.workload_txns} PicoLisp commits; "
            f"recovery (last broker restarted -> replica md5-equal) p50 {p50:.1f} s, p99 {p99:.1f} s, "
            f"max {max(rec, default=0.0):.1f} s"
        )


def victims_for(kind: str, cluster, database: str, rng: random.Random) -> list[int]:
    """Which brokers a fault kills: 'leader', 'leader+coordinator' (one more if they are the same), 'two'."""
    bs = cluster.bootstrap_servers
    leader = topic_leader(bs, database)
    if kind == "leader":
        return [leader]
    if kind == "leader+coordinator":
        coord = coordinator(bs, f"pool-pipeline.capture.{database}")
        if coord != leader:
            return sorted({leader, coord})
        return sorted({leader, rng.choice([i for i in range(cluster.brokers) if i != leader])})
    if kind == "two":
        return sorted(rng.sample(range(cluster.brokers), 2))
    raise ValueError(kind)


def bounce_round(
    cluster,
    cli: Cli,
    app,
    agent: Proc,
    replica: Proc,
    victims: list[int],
    *,
    down_s: float,
    workload_txns: int,
    seed: int,
    recover_timeout: float = 120,
    log: Callable[[str], None] = lambda line: None,
) -> float:
    """One fault: returns the seconds from restarting the killed brokers to an md5-equal replica."""
    wl = app.workload_proc(workload_txns, seed=seed, sleep_ms=5)
    try:
        time.sleep(0.5 + random.Random(seed).random())
        for i in victims:
            cluster.kill_broker(i, hard=True)
        log(f"killed broker(s) {[i + 1 for i in victims]}; replica at txn {replica_txn(cli.root / 'rpl/db/app/')}")
        time.sleep(down_s)
        out, err = wl.communicate(timeout=300)
        assert wl.returncode == 0, f"PicoLisp workload failed: {out[-1000:]} {err[-2000:]}"
    finally:
        if wl.poll() is None:
            wl.kill()
            wl.wait()
    for proc in (agent, replica):
        assert proc.alive(), f"{proc.name} exited during the outage ({proc.popen.returncode})\n{proc.output()}"
    started = restart(cluster, victims)  # recovery counts the brokers' own start (3-9 s) too
    deadline = started + recover_timeout
    while cli.differences() != []:
        for proc in (agent, replica):
            assert proc.alive(), f"{proc.name} exited after the outage ({proc.popen.returncode})\n{proc.output()}"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the replica is not md5-equal {recover_timeout:.0f} s after brokers "
                f"{[i + 1 for i in victims]} came back: {cli.differences()[:5]}\n"
                f"{agent.output()}\n{replica.output()}"
            )
        time.sleep(0.2)
    recovered = time.monotonic() - started
    log(
        f"brokers {[i + 1 for i in victims]} back; replica md5-equal after {recovered:.1f} s "
        f"(txn {replica_txn(cli.root / 'rpl/db/app/')})"
    )
    return recovered
