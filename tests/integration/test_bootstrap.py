"""replica --archive end to end: retention made real with delete_records, a new and an old replica
restored from SeaweedFS and continued from a real broker, on a real PicoLisp pool."""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

import pytest

from connectors.kafka.client import KafkaSettings
from tests.integration.test_archive import archive_args, run_stage, s3_env, store_for
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp
from tests.pipeline_helpers import (
    BIN,
    Cli,
    committed_transactions,
    ok,
    replica_position,
    replica_txn,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def cli(app: PicoApp, kafka: Any, s3: Any, request: pytest.FixtureRequest) -> Any:
    name = request.node.originalname.removeprefix("test_").replace("_", "-")[:40]
    c = Cli(app.root, kafka.bootstrap_servers, unique_name(name), extra_env=s3_env(s3))
    yield c
    c.stop_all()


def delete_records_before(cli: Cli, offset: int) -> int:
    """What retention does: the topic's first offset moves up to `offset`. Returns the new first offset."""
    from kafka.structs import TopicPartition

    tp = TopicPartition(f"pool.{cli.database}", 0)
    admin = KafkaSettings(cli.bootstrap_servers).admin(client_id="test-retention")
    try:
        admin.delete_records({tp: offset}, timeout_ms=30_000)
    finally:
        admin.close()
    consumer = KafkaSettings(cli.bootstrap_servers).consumer(group_id=None)
    try:
        return consumer.beginning_offsets([tp])[tp]
    finally:
        consumer.close()


def replica(cli: Cli, name: str, *extra: str) -> Any:
    return cli.replica_once(f"rpl/{name}/db/", f"rpl/{name}/blob/", f"replica-{name}", *extra)


def test_replicas_behind_retention_bootstrap_from_the_archive(app: PicoApp, cli: Cli, s3: Any, s3_client: Any) -> None:
    app.workload(25, seed=1)
    ok(cli.agent_once(), "capture-agent --once")  # txn 1: the bootstrap snapshot
    t1 = run_stage(cli, app, 80, seed=2)
    ok(replica(cli, "old"), "old replica")
    assert replica_txn(app.root / "rpl/old/db") == t1
    t2 = run_stage(cli, app, 80, seed=3)
    # A base snapshot between t1 and t2 (a new replica starts from one): the first segment end after
    # t1 txns. Half of t2 was not enough when the second stage made fewer capture rounds than the first.
    every = str(t1 + 1)
    ok(
        cli.run(
            archive_args(
                cli, s3.bucket, "--once", "--segment-txns", "10", "--snapshot-every-txns", every,
                "--snapshot-every-bytes", "0",
            )
        ),
        "archive --once",
    )  # fmt: skip
    catalog = store_for(s3_client, s3.bucket, "arch", cli.database).catalog()
    assert catalog.last is not None and catalog.last.last_txn == t2
    assert catalog.snapshots and catalog.snapshots[-1].txn > t1, catalog.snapshots
    t3 = run_stage(cli, app, 60, seed=4)  # only in Kafka
    txns = {t.txn_id: t for t in committed_transactions(cli.bootstrap_servers, cli.database)}
    assert t3 > t2 + 2, (t2, t3)

    # pipeline status --bucket: the newest archived txn and how far it is behind the source.
    out = ok(
        cli.run([str(BIN / "pipeline"), "status", "--database", cli.database, "--bucket", f"s3://{s3.bucket}/arch"]),
        "pipeline status --bucket",
    ).stdout
    line = next(line for line in out.splitlines() if "(archive)" in line)
    seconds = (txns[t3].source_time_ms - txns[t2].source_time_ms) / 1000
    assert line.split()[1:4] == [str(t2), str(t3 - t2), f"{seconds:.1f}"], out

    # Retention: the topic now starts at txn t2+1, past the old replica's position and the first snapshot.
    first = delete_records_before(cli, txns[t2 + 1].offset)
    assert first == txns[t2 + 1].offset
    old_offset = replica_position(app.root / "rpl/old/db")["next_offset"]  # type: ignore[index]
    assert old_offset < first

    # Without --archive: the clear error, naming --archive, offsets and txn; nothing changes.
    for name, at in (("old", t1), ("fresh", 0)):
        result = replica(cli, name)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "--archive" in result.stderr and f"starts at offset {first}" in result.stderr, result.stderr
        assert replica_txn(app.root / f"rpl/{name}/db") == at

    # With --archive: a new replica (base snapshot + segments, then Kafka) and the old one (the
    # archived segments after its txn, then Kafka) end md5-equal to the source at the last txn.
    archive = ["--archive", f"s3://{s3.bucket}/arch"]
    for name, at in (("new", 0), ("old", t1)):
        if name == "new":  # --endpoint-url overrides AWS_ENDPOINT_URL_S3 (made to point nowhere here)
            endpoint = cli.extra_env.get("AWS_ENDPOINT_URL_S3") or os.environ["AWS_ENDPOINT_URL_S3"]
            cli.extra_env["AWS_ENDPOINT_URL_S3"] = "http://127.0.0.1:9"
            try:
                result = ok(replica(cli, name, *archive, "--endpoint-url", endpoint), "replica new --endpoint-url")
            finally:
                cli.extra_env["AWS_ENDPOINT_URL_S3"] = endpoint
        else:
            result = ok(replica(cli, name, *archive), f"replica {name} --archive")
        assert f"restored txns {at + 1}..{t2} from the archive" in result.stdout, result.stdout
        assert f"continuing from Kafka at offset {txns[t2].end_offset + 1}" in result.stdout, result.stdout
        assert replica_txn(app.root / f"rpl/{name}/db") == t3
        assert cli.differences(f"rpl/{name}/db/", f"rpl/{name}/blob/") == []
        assert not (app.root / f"rpl/{name}/db/.pool-pipeline/bootstrap").exists()
    ok(cli.verify("rpl/new/db/", "rpl/new/blob/"), "verify new")

    # Once at the topic again, --archive changes nothing: the replica reads Kafka from its position.
    result = ok(replica(cli, "new", *archive), "replica new --archive again")
    assert "archive" not in result.stdout, result.stdout

    # A gap: the topic loses txn t2+1 as well, the archive still ends at t2.
    first = delete_records_before(cli, txns[t2 + 2].offset)
    result = replica(cli, "gap", *archive)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"ends at txn {t2} (Kafka offset {txns[t2].end_offset})" in result.stderr, result.stderr
    assert f"now starts at offset {first}" in result.stderr, result.stderr


def test_a_replica_group_bootstraps_its_databases_from_the_archive(app: PicoApp, cli: Cli, s3: Any) -> None:
    """`replica --pattern --root --archive`: the same start, per database, inside a consumer group."""
    app.workload(25, seed=11)
    ok(cli.agent_once(), "capture-agent --once")
    t1 = run_stage(cli, app, 40, seed=12)
    ok(cli.run(archive_args(cli, s3.bucket, "--once")), "archive --once")
    t2 = run_stage(cli, app, 30, seed=13)
    txns = {t.txn_id: t for t in committed_transactions(cli.bootstrap_servers, cli.database)}
    assert t2 > t1 + 1
    delete_records_before(cli, txns[t1 + 1].offset)
    db = cli.database
    group = [str(BIN / "replica"), "--pattern", re.escape(db), "--root", "grp", "--group", f"{db}-g", "--once"]

    result = cli.run(group)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"error: replica {db} stopped" in result.stderr and "--archive" in result.stderr, result.stderr

    result = ok(cli.run([*group, "--archive", f"s3://{s3.bucket}/arch"]), "replica --pattern --archive")
    assert f"restored txns 1..{t1} from the archive" in result.stdout, result.stdout
    assert replica_txn(app.root / "grp" / db / "db") == t2
    assert cli.differences(f"grp/{db}/db/", f"grp/{db}/blob/") == []


def test_a_running_replica_overtaken_by_retention_catches_up_from_the_archive(app: PicoApp, cli: Cli, s3: Any) -> None:
    """Retention deletes what following replicas (frozen with SIGSTOP) read next: the ones with --archive
    (one alone, one a --pattern group member) catch up from S3 by themselves and follow on; the other
    stops naming --archive."""
    app.workload(25, seed=21)
    ok(cli.agent_once(), "capture-agent --once")
    t1 = run_stage(cli, app, 30, seed=22)
    archive = ["--archive", f"s3://{s3.bucket}/arch"]
    with_archive = cli.start_replica("rpl/a/db/", "rpl/a/blob/", "follow-a", *archive, name="replica-a")
    without = cli.start_replica("rpl/b/db/", "rpl/b/blob/", "follow-b", name="replica-b")
    db = cli.database
    member = cli.start(
        "member",
        [str(BIN / "replica"), "--pattern", re.escape(db), "--root", "grp", "--group", f"{db}-g", *archive],
    )
    grp = app.root / "grp" / db / "db"
    wait_for(
        lambda: replica_txn(app.root / "rpl/a/db") == t1 == replica_txn(app.root / "rpl/b/db") == replica_txn(grp),
        60,
        "all three to follow",
    )
    time.sleep(1)  # the group offsets and an idle fetch: nothing in flight
    for proc in (with_archive, without, member):
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        t2 = run_stage(cli, app, 40, seed=23)
        ok(cli.run(archive_args(cli, s3.bucket, "--once")), "archive --once")
        txns = {t.txn_id: t for t in committed_transactions(cli.bootstrap_servers, cli.database)}
        delete_records_before(cli, txns[t2].offset)  # all but the last txn
    finally:
        for proc in (with_archive, without, member):
            os.kill(proc.pid, signal.SIGCONT)
    assert without.wait(60) == 1, without.output()
    assert "--archive" in without.stderr() and "while it was reading" in without.stderr(), without.output()
    assert replica_txn(app.root / "rpl/b/db") >= t1
    wait_for(lambda: replica_txn(app.root / "rpl/a/db") == t2, 90, f"replica a to catch up to txn {t2}")
    assert with_archive.alive(), with_archive.output()
    assert "catching up from the archive" in with_archive.stderr(), with_archive.output()
    wait_for(lambda: replica_txn(grp) == t2, 90, f"the group member to catch up to txn {t2}")
    assert member.alive() and "catching up from the archive" in member.stderr(), member.output()
    t3 = run_stage(cli, app, 10, seed=24)  # and they follow Kafka again
    wait_for(lambda: replica_txn(app.root / "rpl/a/db") == t3, 60, f"replica a to follow to txn {t3}")
    wait_for(lambda: replica_txn(grp) == t3, 60, f"the group member to follow to txn {t3}")
    with_archive.stop()
    member.stop()
    assert cli.differences("rpl/a/db/", "rpl/a/blob/") == []
    assert cli.differences(f"grp/{db}/db/", f"grp/{db}/blob/") == []
