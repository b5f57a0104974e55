"""The archive's RPO: a quiet source is archived within --max-delay, a stop flushes, kills lose and repeat nothing.

Real Kafka, real SeaweedFS S3, real journaled PicoLisp pools, the CLIs.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_archive import (
    archive_args,
    archived_txn_ids,
    assert_same,
    cli,  # noqa: F401 - the fixture: a Cli with the S3 settings
    restore_args,
    run_stage,
    source_copy,
    store_for,
)
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp
from tests.pipeline_helpers import Cli, committed_transactions, ok, wait_for

pytestmark = pytest.mark.integration


def last_archived(store: Any) -> int:
    segments = store.catalog().segments
    return segments[-1].last_txn if segments else 0


def test_a_running_archiver_is_restorable_within_3_s_of_the_last_commit_and_flushes_on_sigterm(
    app: PicoApp, cli: Cli, s3: Any, s3_client: Any, tmp_path: Path
) -> None:
    store = store_for(s3_client, s3.bucket, "arch", cli.database)
    app.workload(25, seed=1)
    ok(cli.agent_once(), "capture-agent --once")  # txn 1: the bootstrap snapshot
    archiver = cli.start("archiver", archive_args(cli, s3.bucket))  # the documented command, default options
    agent = cli.start_agent()
    wait_for(lambda: "topic is at" in agent.stdout(), 60, "the agent to start")
    wl = app.workload_proc(300, seed=2, sleep_ms=5)
    out, err = wl.communicate(timeout=180)
    assert wl.returncode == 0, err[-1500:]
    time.sleep(0.3)  # the agent publishes within milliseconds of a commit
    last = committed_transactions(cli.bootstrap_servers, cli.database)[-1]
    assert last.txn_id > 20, last
    wait_for(lambda: last_archived(store) >= last.txn_id, 10, f"txn {last.txn_id} in the archive", interval=0.02)
    rpo = time.time() - last.source_time_ms / 1000
    print(f"txn {last.txn_id} was restorable {rpo:.2f} s after its commit")
    assert rpo <= 3.0, f"txn {last.txn_id} was archived {rpo:.2f} s after its commit"
    # What the agent publishes when it drains the journal (as in run_stage) is archived as fast.
    agent.stop()
    ok(cli.agent_once(), "capture-agent --once")
    t1 = committed_transactions(cli.bootstrap_servers, cli.database)[-1].txn_id
    wait_for(lambda: last_archived(store) >= t1, 3, f"txn {t1} in the archive", interval=0.02)
    expected = source_copy(app, tmp_path / "source-1")
    target = tmp_path / "restored-running"
    result = ok(cli.run(restore_args(cli, s3.bucket, "--target", str(target))), "restore while archiving")
    assert f"txn {t1} " in result.stdout, result.stdout
    assert_same(expected, target, app)
    assert archiver.alive(), archiver.output()
    assert archiver.stop() == 0, archiver.output()
    assert "(stopped)" in archiver.stdout(), archiver.output()

    # A segment only the stop closes: no time limit, and the stage's txns all fit in one segment.
    archiver = cli.start("archiver", archive_args(cli, s3.bucket, "--max-delay", "3600"))
    wait_for(lambda: "reading pool." in archiver.stdout(), 60, "the archiver to start")
    t2 = run_stage(cli, app, 60, seed=3)
    time.sleep(2)  # the archiver reads them within milliseconds, and keeps them open
    assert last_archived(store) == t1 < t2
    assert archiver.stop() == 0, archiver.output()
    assert last_archived(store) == t2, archiver.output()
    assert archived_txn_ids(store) == list(range(1, t2 + 1))
    expected = source_copy(app, tmp_path / "source-2")
    target = tmp_path / "restored-stopped"
    result = ok(cli.run(restore_args(cli, s3.bucket, "--target", str(target))), "restore after SIGTERM")
    assert f"txn {t2} " in result.stdout, result.stdout
    assert_same(expected, target, app)


def test_archiver_killed_at_random_points_with_a_short_max_delay_archives_every_txn_exactly_once(
    app: PicoApp, cli: Cli, s3: Any, s3_client: Any, tmp_path: Path
) -> None:
    rng = random.Random(20261127)
    # No base snapshots: writing one holds the archiver for seconds (test_archive.py kills it there).
    # Compaction windows of 1 s and 4 s: each archiver merges right after its first upload, so
    # kills also land while it merges and deletes.
    flags = ["--max-delay", "0.2", "--snapshot-every-txns", "0", "--snapshot-every-bytes", "0", "--compact", "1,4"]
    store = store_for(s3_client, s3.bucket, "arch", cli.database)
    agent = cli.start_agent()
    wait_for(lambda: "topic is at" in agent.stdout(), 60, "the agent to start")
    wl = app.workload_proc(1200, seed=12, sleep_ms=6)
    archiver = cli.start("archiver", archive_args(cli, s3.bucket, *flags))
    kills = 0
    for _ in range(8):
        # Killed once it reads (reading, closing on time, uploading, acknowledging, snapshotting).
        wait_for(lambda a=archiver: "reading pool." in a.stdout(), 60, "the archiver to start")
        time.sleep(rng.uniform(0.3, 2.0))
        archiver.kill9()
        kills += 1
        archiver = cli.start("archiver", archive_args(cli, s3.bucket, *flags))
    out, err = wl.communicate(timeout=240)
    assert wl.returncode == 0, err[-1500:]
    assert agent.alive(), agent.output()
    agent.stop()
    ok(cli.agent_once(), "capture-agent --once")
    last = committed_transactions(cli.bootstrap_servers, cli.database)[-1].txn_id
    # The last archiver follows and archives the tail on its own (max delay), then stops cleanly.
    wait_for(lambda: last_archived(store) >= last, 60, f"txn {last} in the archive", interval=0.05)
    ok(cli.run(archive_args(cli, s3.bucket, *flags, action="compact")), "archive compact")
    assert archiver.stop() == 0, archiver.output()
    assert kills == 8

    source_ids = [t.txn_id for t in committed_transactions(cli.bootstrap_servers, cli.database)]
    assert archived_txn_ids(store) == source_ids == list(range(1, last + 1))
    catalog = store.catalog()
    assert len(catalog.segments) >= 3  # cut on time, not by the 10 000-txn rule
    assert any(s.level for s in catalog.segments), [s.key(store.root) for s in catalog.segments]
    assert not catalog.superseded  # `archive compact` deleted what the killed merges left
    expected = source_copy(app, tmp_path / "source")
    target = tmp_path / "restored"
    ok(cli.run(restore_args(cli, s3.bucket, "--target", str(target))), "restore")
    assert_same(expected, target, app)
    # Earlier points too: every txn's rolling checksum is checked on the way to each.
    for txn in sorted(rng.sample(range(2, last), 3)):
        result = ok(
            cli.run(restore_args(cli, s3.bucket, "--target", str(tmp_path / f"at-{txn}"), "--txn", str(txn))),
            f"restore to txn {txn}",
        )
        assert f"txn {txn} " in result.stdout, result.stdout
