"""capture-agent against awkward sources: started before the app, a pool with other *Dbs, hostile blob names."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.picolisp.blobs import compare_blob_trees
from connectors.picolisp.format import compare_pools
from tests.picolisp_fixtures import PicoApp
from tests.pipeline_helpers import BIN, Cli, committed_transactions, ok, replica_txn, unique_name, wait_for

pytestmark = pytest.mark.integration

RPL = "rpl/db/app/"
RPL_BLOB = "rpl/blob/app/"


def topic_exists(bootstrap_servers: str, database: str) -> bool:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False)
    try:
        return f"pool.{database}" in consumer.topics()
    finally:
        consumer.close()


def last_txn(cli: Cli) -> int:
    txns = committed_transactions(cli.bootstrap_servers, cli.database)
    return txns[-1].txn_id if txns else 0


def settled(cli: Cli, app: PicoApp) -> bool:
    """Journal drained, no pending blob marker, the replica at the topic's last txn."""
    if app.journal.stat().st_size or any(n.startswith("=") for n in os.listdir(app.blob_dir)):
        return False
    n = last_txn(cli)
    return n > 0 and replica_txn(cli.root / RPL) == n


def workload(app: PicoApp, txns: int, seed: int) -> None:
    """Commit `txns` PicoLisp transactions while an agent consumes the journal."""
    proc = app.workload_proc(txns, seed=seed)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"workload failed: {out[-1000:]} {err[-2000:]}"


def verify_db(cli: Cli) -> str:
    """verify of the DB files alone (md5 per file)."""
    return ok(cli.run([str(BIN / "verify"), "--pool", cli.pool, "--replica", RPL]), "verify").stdout


def test_an_agent_started_before_the_app_waits_touching_nothing(tmp_path: Path, kafka: Any, picolisp: str) -> None:
    app = PicoApp(tmp_path / "app", picolisp)
    for d in ("db", "fifo", "blob"):  # PicoApp makes these; the app would, later
        shutil.rmtree(app.root / d)
    cli = Cli(app.root, kafka.bootstrap_servers, unique_name("early-agent"))
    try:
        r = ok(cli.agent_once(), "capture-agent --once before the app")
        assert "not there yet" in r.stdout and "db/app/@" in r.stdout, r.stdout
        agent = cli.start_agent()
        stopped = cli.start_agent("--state-dir", "elsewhere.agent", name="stopped-agent")
        wait_for(
            lambda: "waiting for" in agent.stdout() and "waiting for" in stopped.stdout(),
            30,
            "the agents to say what they wait for",
        )
        time.sleep(1.5)  # several polls
        assert agent.alive(), agent.output()
        assert agent.stdout().count("waiting for") == 1, agent.output()
        assert "db/app/@" in agent.stdout() and "fifo/app" in agent.stdout(), agent.output()
        assert sorted(os.listdir(app.root)) == ["logs"], "the waiting agents created something"
        assert not topic_exists(kafka.bootstrap_servers, cli.database)
        started = time.monotonic()
        assert stopped.stop() == 130, stopped.output()  # SIGTERM while waiting
        assert time.monotonic() - started < 5
        assert "Traceback" not in stopped.stderr(), stopped.output()

        for d in (app.db_dir, app.journal.parent, app.blob_dir):
            d.mkdir(parents=True)
        app.create()
        app.workload(60, seed=301)
        wait_for(
            lambda: topic_exists(kafka.bootstrap_servers, cli.database) and last_txn(cli) >= 1,
            90,
            "the waiting agent to publish its first txn",
        )
        replica = cli.start_replica()
        wait_for(lambda: settled(cli, app), 90, "the waiting agent to start and the replica to catch up")
        assert agent.alive() and replica.alive(), agent.output() + replica.output()
        assert "Traceback" not in agent.stderr(), agent.output()
        assert verify_db(cli).startswith("verify: identical")
        assert cli.differences() == []
    finally:
        cli.stop_all()


def test_a_pool_recreated_with_other_block_sizes_is_published_as_a_snapshot(app: PicoApp, cli: Cli) -> None:
    app.workload(40, seed=311)
    ok(cli.agent_once(), "capture-agent --once")
    ok(cli.replica_once(), "replica --once")
    # The app is stopped, its pool and journal deleted, and it is started again with another *Dbs:
    # files @, A and D get 256-, 512- and 128-byte blocks instead of 128, 256 and 64.
    shutil.rmtree(app.db_dir)
    app.journal.unlink()
    app.db_dir.mkdir()
    app.run('(pool "db/app/" (2 3 4 6 1) "fifo/app")')
    assert app.block_sizes() == [256, 512, 1024, 4096, 128]
    app.workload(30, seed=312)
    assert app.journal.stat().st_size  # a journal that an agent trusting its spool would publish as a delta
    r = ok(cli.agent_once(), "capture-agent --once on the recreated pool")
    out = r.stdout + r.stderr
    assert "taking a snapshot" in out and "256-byte blocks" in out, out
    txns = committed_transactions(cli.bootstrap_servers, cli.database)
    assert [t.snapshot for t in txns] == [True, True], txns
    assert txns[1].checksum_before == txns[0].checksum_after
    ok(cli.replica_once(), "replica --once (the existing replica)")
    assert replica_txn(cli.root / RPL) == 2
    assert verify_db(cli).startswith("verify: identical")
    assert cli.differences() == []
    # And the pipeline goes on with deltas on the new layout.
    app.workload(20, seed=313)
    ok(cli.agent_once(), "capture-agent --once")
    ok(cli.replica_once(), "replica --once")
    assert [t.snapshot for t in committed_transactions(cli.bootstrap_servers, cli.database)] == [True, True, False]
    assert cli.differences() == []


def test_a_blob_name_that_is_not_utf8_is_skipped_with_one_warning(app: PicoApp, cli: Cli) -> None:
    app.workload(30, seed=321)
    bad = os.fsencode(app.blob_dir) + b"/bad\xff\xfe.doc"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"a blob whose name is not UTF-8")
    os.close(fd)
    shown = repr(b"bad\xff\xfe.doc")
    agent = cli.start_agent()
    replica = cli.start_replica()
    workload(app, 60, seed=322)
    wait_for(lambda: settled(cli, app), 90, "the replica to catch up")
    time.sleep(1.5)  # a few rounds and a delete scan
    assert agent.alive(), agent.output()
    assert agent.stdout().count(shown) == 1, agent.output()
    os.unlink(bad)  # gone: it must not linger as a blob to delete
    workload(app, 30, seed=323)
    wait_for(lambda: settled(cli, app), 90, "the replica to catch up after the bad blob is gone")
    time.sleep(1.5)
    assert agent.alive() and replica.alive(), agent.output() + replica.output()
    out = agent.stdout() + agent.stderr()
    assert out.count(shown) == 1 and "Traceback" not in out, agent.output()
    assert "bad" not in (cli.root / "fifo/app.agent/known-blobs.json").read_text()
    assert compare_pools(app.prefix, cli.root / RPL) == []
    assert verify_db(cli).startswith("verify: identical")
    assert compare_blob_trees(app.blob_dir, cli.root / RPL_BLOB) == []  # every other blob replicated
    assert list((cli.root / RPL_BLOB).rglob("*.doc"))
