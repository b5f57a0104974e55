"""Kafka cluster faults: brokers and the transaction coordinator die while PicoLisp commits (real 3-broker KRaft).

Kafka's TransactionsTest in miniature: RF 3, min.insync.replicas 2, the agent and a replica in
follow mode all along; afterwards the committed stream holds txn ids 1..N exactly once, chained
by checksum, and the replica is md5-equal with the same PicoLisp query output.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster_faults import FAST_BOUNCE, FaultStats, bounce_round, victims_for
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp
from tests.pipeline_helpers import Cli, check_caught_up, replica_txn, unique_name, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A fresh 3-broker cluster for this module alone: its brokers get killed."""
    from pool_pipeline.devstack import StackError, start_kafka

    try:
        cluster = start_kafka(
            tmp_path_factory.mktemp("kafka3"), brokers=3, detach=False, overrides=FAST_BOUNCE, ready_timeout=180
        )
    except StackError as exc:
        pytest.fail(f"a local 3-broker Kafka cluster could not start: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


def _heal(cluster: Any) -> None:
    """Bring back any broker a failed test left down, so the next test starts with three."""
    from tests.cluster_faults import restart

    down = [i for i, alive in enumerate(cluster.alive()) if not alive]
    if down:
        restart(cluster, down)


def _start(cli: Cli, app: PicoApp) -> tuple[Any, Any]:
    app.workload(20, seed=1)
    agent = cli.start_agent("--replication-factor", "3", "--min-insync-replicas", "2")
    replica = cli.start_replica()
    wait_for(lambda: replica_txn(cli.root / "rpl/db/app/") > 0, 120, "the replica's first txn")
    return agent, replica


def test_broker_and_coordinator_loss_loses_no_txn(cluster3: Any, pil_app: PicoApp) -> None:
    """(a) the topic's leader, (b) leader + transaction coordinator, (c) two of three brokers: each killed
    with SIGKILL while the app commits, down for a few seconds, then restarted."""
    _heal(cluster3)
    cli = Cli(pil_app.root, cluster3.bootstrap_servers, unique_name("faults"))
    stats = FaultStats()
    rng = random.Random(13)
    try:
        agent, replica = _start(cli, pil_app)
        for n, kind in enumerate(("leader", "leader+coordinator", "two", "leader+coordinator")):
            victims = victims_for(kind, cluster3, cli.database, rng)
            stats.recoveries.append(
                bounce_round(
                    cluster3,
                    cli,
                    pil_app,
                    agent,
                    replica,
                    victims,
                    down_s=6,
                    workload_txns=150,
                    seed=100 + n,
                    log=print,
                )
            )
            stats.rounds += 1
            stats.brokers_killed += len(victims)
            stats.workload_txns += 150
        print(stats.summary())
        assert agent.alive() and replica.alive()
        assert agent.stop() in (0, 130), agent.output()
        assert replica.stop() in (0, 130), replica.output()
        check_caught_up(cli, pil_app)
    finally:
        cli.stop_all()
        _heal(cluster3)


def test_a_commit_the_cluster_never_answers_is_given_up_and_the_producer_rebuilt(
    cluster3: Any, pil_app: PicoApp
) -> None:
    """Every broker frozen (SIGSTOP) while the agent publishes: kafka-python's commit_transaction() waits
    with no timeout. The agent gives up after --kafka-timeout, logs why on each retry, rebuilds its
    producer once the cluster answers again, and nothing is lost or doubled."""
    _heal(cluster3)
    cli = Cli(pil_app.root, cluster3.bootstrap_servers, unique_name("frozen"))
    try:
        pil_app.workload(10, seed=2)
        agent = cli.start_agent("--replication-factor", "3", "--min-insync-replicas", "2", "--kafka-timeout", "5")
        replica = cli.start_replica()
        wait_for(lambda: replica_txn(cli.root / "rpl/db/app/") > 0, 120, "the replica's first txn")
        wl = pil_app.workload_proc(60, seed=3, sleep_ms=20)
        time.sleep(0.5)
        for pid in cluster3.pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            try:
                wait_for(lambda: "retry" in agent.stderr(), 90, "the agent to give up on the frozen cluster")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{agent.output()}") from None
            assert wl.wait(timeout=120) == 0
        finally:
            for pid in cluster3.pids:
                os.kill(pid, signal.SIGCONT)
        wait_for(lambda: cli.differences() == [], 120, "an md5-equal replica after the cluster thawed", interval=0.3)
        assert agent.alive(), agent.output()
        assert "waiting for" in agent.stderr() or "brokers" in agent.stderr(), agent.output()
        assert agent.stop() in (0, 130) and replica.stop() in (0, 130)
        check_caught_up(cli, pil_app)
    finally:
        cli.stop_all()
        _heal(cluster3)
