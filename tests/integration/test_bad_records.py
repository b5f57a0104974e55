"""A bad record in a topic, topics only the agent makes, retention: real Kafka, SeaweedFS and PicoLisp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_archive import archive_args, assert_same, restore_args, s3_env, source_copy
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp
from tests.pipeline_helpers import Cli, committed_transactions, ok, produce_transactional, unique_name, wait_for

pytestmark = pytest.mark.integration


def topics(bootstrap_servers: str) -> set[str]:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_a_bad_record_has_a_documented_way_past_for_replicas_and_the_archiver(
    app: PicoApp, kafka: Any, s3: Any, tmp_path: Path
) -> None:
    """A record nobody can read stops the replica and the archiver with its offset; after
    `capture-agent --snapshot`, `--skip-to-snapshot` takes both past it to an md5-equal state."""
    cli = Cli(app.root, kafka.bootstrap_servers, unique_name("bad-record"), extra_env=s3_env(s3))
    try:
        app.workload(30, seed=1)
        ok(cli.agent_once(), "capture-agent --once")
        ok(cli.replica_once(), "replica --once")
        ok(cli.run(archive_args(cli, s3.bucket, "--once")), "archive --once")
        bad_offset = committed_transactions(cli.bootstrap_servers, cli.database)[-1].end_offset + 2  # after a marker
        produce_transactional(cli.bootstrap_servers, cli.database, [(b"txn", b"\xc3\x01 not an avro record")])
        app.workload(20, seed=2)
        ok(cli.agent_once(), "capture-agent --once after the bad record")  # it reads back past what is not its own

        r = cli.replica_once()
        assert r.returncode == 1, r
        assert f"offset={bad_offset}" in r.stderr and "Traceback" not in r.stderr, r.stderr
        r = cli.run(archive_args(cli, s3.bucket, "--once"))
        assert r.returncode == 1 and f"offset={bad_offset}" in r.stderr and "Traceback" not in r.stderr, r

        r = cli.replica_once("rpl/db/app/", "rpl/blob/app/", "replica", "--skip-to-snapshot")
        assert r.returncode == 1 and "capture-agent --snapshot" in r.stderr, r  # no snapshot yet: says what to do
        ok(cli.agent_once("--snapshot"), "capture-agent --snapshot --once")
        r = ok(
            cli.replica_once("rpl/db/app/", "rpl/blob/app/", "replica", "--skip-to-snapshot"),
            "replica --skip-to-snapshot",
        )
        assert "skipping offsets" in r.stdout, r.stdout
        ok(cli.verify(), "verify after the skip")
        ok(cli.run(archive_args(cli, s3.bucket, "--once", "--skip-to-snapshot")), "archive --skip-to-snapshot")

        app.workload(20, seed=3)  # and on from there, without the flag
        ok(cli.agent_once(), "capture-agent --once")
        ok(cli.replica_once(), "replica --once")
        ok(cli.verify(), "verify")
        ok(cli.run(archive_args(cli, s3.bucket, "--once")), "archive --once")
        expected = source_copy(app, tmp_path / "expected")
        ok(cli.run(restore_args(cli, s3.bucket, "--target", str(tmp_path / "restored"))), "restore")
        assert_same(expected, tmp_path / "restored", app)
    finally:
        cli.stop_all()


def test_readers_never_create_a_topic_and_wait_for_the_agent(app: PicoApp, kafka: Any) -> None:
    """A replica started before the agent (or with a typo in --database) creates no topic: with --once it
    says so and exits 0, in follow mode it waits (one line) and starts once the agent has published."""
    cli = Cli(app.root, kafka.bootstrap_servers, unique_name("early-replica"))
    try:
        r = ok(cli.replica_once(), "replica --once before any agent")
        assert "does not exist yet" in r.stdout, r.stdout
        assert f"pool.{cli.database}" not in topics(cli.bootstrap_servers)
        replica = cli.start_replica()
        wait_for(lambda: "waiting for topic" in replica.stdout(), 60, "the replica to say it waits")
        assert f"pool.{cli.database}" not in topics(cli.bootstrap_servers)
        app.workload(10, seed=4)
        ok(cli.agent_once(), "capture-agent --once")
        wait_for(lambda: cli.differences() == [], 60, "the waiting replica to catch up", interval=0.3)
        assert replica.stdout().count("waiting for topic") == 1, replica.stdout()
        assert replica.alive()
    finally:
        cli.stop_all()


def test_status_shows_where_the_replica_really_is_after_a_stale_group_offset(app: PicoApp, kafka: Any) -> None:
    """The group offset only shows lag; when it is stale (an outage swallowed the commits, or it was
    reset), a replica that starts puts back where it really is, even with nothing new to apply."""
    from kafka import KafkaConsumer
    from kafka.structs import OffsetAndMetadata, TopicPartition

    from tests.pipeline_helpers import BIN

    cli = Cli(app.root, kafka.bootstrap_servers, unique_name("status-truth"))
    try:
        app.workload(15, seed=5)
        ok(cli.agent_once(), "capture-agent --once")
        ok(cli.replica_once(), "replica --once")
        last = committed_transactions(cli.bootstrap_servers, cli.database)[-1].txn_id
        stale = KafkaConsumer(bootstrap_servers=cli.bootstrap_servers, group_id="replica", enable_auto_commit=False)
        try:
            stale.commit({TopicPartition(f"pool.{cli.database}", 0): OffsetAndMetadata(0, '{"txn": 0}', -1)})
        finally:
            stale.close()

        def applied() -> str:
            out = ok(cli.run([str(BIN / "pipeline"), "status", "--database", cli.database]), "pipeline status").stdout
            line = next(line for line in out.splitlines() if line.strip().startswith("replica"))
            return line.split()[1]

        assert applied() == "0"
        ok(cli.replica_once(), "replica --once with nothing new")
        assert applied() == str(last)
    finally:
        cli.stop_all()


def test_capture_agent_sets_the_retention_it_is_given_and_warns_about_another(app: PicoApp, kafka: Any) -> None:
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    cli = Cli(app.root, kafka.bootstrap_servers, unique_name("retention"))
    app.workload(3, seed=6)
    r = ok(cli.agent_once("--retention", "7d"), "capture-agent --retention 7d")
    assert "retention 168 h" in r.stdout, r.stdout
    admin = KafkaAdminClient(bootstrap_servers=cli.bootstrap_servers)
    try:
        topic = f"pool.{cli.database}"
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all")
        assert configs["topic"][topic]["retention.ms"]["value"] == str(7 * 86_400_000)
    finally:
        admin.close()
    r = ok(cli.agent_once(), "capture-agent with the default (infinite) on a 7-day topic")
    assert "keeps records for retention.ms=604800000, not the retention.ms=-1 asked for" in r.stdout, r.stdout
    r = cli.agent_once("--retention", "7y")
    assert r.returncode == 2 and "duration like 7d" in r.stderr, r
