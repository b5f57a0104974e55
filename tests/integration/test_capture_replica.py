"""capture-agent and replica end to end: real Kafka, real journaled PicoLisp pools, the CLIs as processes.

Every test gets its own database name (so its own topic and transactional.id) and its own app
directory; see tests/pipeline_helpers.py for the process and topic helpers.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.picolisp.blobs import compare_blob_trees
from connectors.picolisp.format import compare_pools, md5_file, pool_files
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp, copy_pool
from tests.pipeline_helpers import (
    BIN,
    Cli,
    check_caught_up,
    codec,
    committed_transactions,
    crash_kill,
    end_offset,
    ok,
    produce_transactional,
    replica_position,
    replica_txn,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.integration

RPL = "rpl/db/app/"
RPL_BLOB = "rpl/blob/app/"


def workload(app: PicoApp, txns: int, seed: int, sleep_ms: int = 0) -> None:
    """Commit `txns` PicoLisp transactions while an agent may be consuming the journal."""
    proc = app.workload_proc(txns, seed=seed, sleep_ms=sleep_ms)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"workload failed: {out[-1000:]} {err[-2000:]}"


def last_txn(cli: Cli) -> int:
    txns = committed_transactions(cli.bootstrap_servers, cli.database)
    return txns[-1].txn_id if txns else 0


def replica_state(root: Path, target: str = RPL, blob: str = RPL_BLOB) -> dict[str, str]:
    """md5 of every file under the replica's pool dir (incl. position.json) and blob dir."""
    out = {}
    for base in (root / target, root / blob):
        for dirpath, _dirs, names in os.walk(base):
            for name in names:
                path = Path(dirpath, name)
                out[str(path.relative_to(root))] = md5_file(path)
    return out


# --- equality under load ------------------------------------------------------------------------


def test_replica_equals_source_after_thousands_of_txns_under_load(app: PicoApp, cli: Cli) -> None:
    """The pipeline follows a PicoLisp app committing 2500 txns (5 files, 4 block sizes, blobs,
    deletes, multi-block objects) and ends byte-identical, blob-identical and query-identical."""
    assert len(set(app.block_sizes())) >= 4 and len(app.files()) >= 4
    agent = cli.start_agent()
    replica = cli.start_replica()
    wl = app.workload_proc(2500, seed=7, sleep_ms=1)
    applied_during_load = 0
    while wl.poll() is None:
        applied_during_load = max(applied_during_load, replica_txn(cli.root / RPL))
        time.sleep(0.1)
    out, err = wl.communicate()
    assert wl.returncode == 0, f"workload failed: {out} {err}"
    assert agent.alive(), agent.output()
    assert replica.alive(), replica.output()
    # Follow mode is live: the replica applied transactions while the app was still committing.
    assert applied_during_load >= 5, f"replica applied only {applied_during_load} txns during the load"

    # Catch-up in follow mode: journal drained, and the replica at the topic's last txn for 1.5 s.
    def settled() -> bool:
        if app.journal.stat().st_size or any(n.startswith("=") for n in os.listdir(app.blob_dir)):
            return False
        n = last_txn(cli)
        if replica_txn(cli.root / RPL) != n:
            return False
        time.sleep(1.5)  # a delete scan (every 1 s) may still publish a blob delete
        return last_txn(cli) == n and replica_txn(cli.root / RPL) == n

    wait_for(settled, 60, "the replica to catch up with the agent in follow mode", interval=0.2)
    assert agent.alive() and replica.alive()
    assert cli.differences() == [], "follow mode did not converge"
    replica.stop()
    agent.stop()

    txns = check_caught_up(cli, app)
    assert txns[0].snapshot and not any(t.snapshot for t in txns[1:])
    assert len(txns) >= 20, "the load should have been published as many transactions, not one"
    assert sum(t.blob_deletes for t in txns) > 0, "the workload deletes blobs; the deletes must be published"
    assert sum(t.blob_chunks for t in txns) > 0
    assert len(list((cli.root / "blob/app").rglob("*.doc"))) > 10
    # Objects spanning several blocks (continuation blocks carry link tag >= 2, format spec §1.5) in the
    # 256-byte file A and the 4096-byte file C, and the replica holds them too (md5-equal above).
    assert continuation_blocks(cli.root / RPL, 1) > 50 and continuation_blocks(cli.root / RPL, 3) > 10


def continuation_blocks(prefix: Path, file: int) -> int:
    """How many blocks of pool file `file` continue a multi-block object."""
    data = pool_files(prefix)[file].read_bytes()
    size = 64 << data[12]  # block 0, byte 12: the block shift
    return sum(1 for i in range(1, len(data) // size) if data[i * size] & 63 >= 2)


# --- crash-kill -----------------------------------------------------------------------------------


def test_kill_9_agent_and_replica_at_random_points_loses_and_doubles_nothing(app: PicoApp, cli: Cli) -> None:
    seed = int(os.environ.get("CRASH_SEED", "0")) or random.randrange(1 << 30)
    print(f"crash-kill seed {seed} (rerun with CRASH_SEED={seed})")
    rng = random.Random(seed)
    progress: list[int] = []
    # Up to 1.6 s between kills: a process needs about 1 s to start, connect and check the topic, so
    # shorter lives would mostly test start-up, and the replica would hardly advance (flaky under load).
    stats = crash_kill(cli, app, 20, rng, max_sleep=1.6, log=lambda line: progress.append(replica_txn(cli.root / RPL)))
    assert stats.agent_kills + stats.replica_kills >= 20
    txns = check_caught_up(cli, app)
    stats.txns = len(txns)
    print(stats.summary(), "replica txn after each iteration:", progress)
    # The kills landed while the pipeline was moving, not only during start-up.
    assert len(set(progress)) >= 4, f"the replica hardly advanced during the kills: {progress}"
    assert len(txns) > 20, stats.summary()
    # Every restart resumed from the agent's spool and the journal: no full re-snapshot was needed.
    assert [t.txn_id for t in txns if t.snapshot] == [1]


# --- independent groups, late bootstrap ---------------------------------------------------------


def test_two_replica_groups_and_a_late_replica_bootstrapped_from_kafka_alone(app: PicoApp, cli: Cli) -> None:
    """Two groups follow one topic (the second with --min-interval, so in fewer, larger group commits);
    a third replica starts late from Kafka alone. All end identical, each group's offset at the end."""
    app.workload(300, seed=21)
    agent = cli.start_agent()
    first = cli.start_replica("r1/db/app/", "r1/blob/app/", "group-one", name="replica-1")
    second = cli.start_replica("r2/db/app/", "r2/blob/app/", "group-two", "--min-interval", "1", name="replica-2")
    batches: dict[str, dict[int, int]] = {"r1": {}, "r2": {}}  # first txn of a group commit -> its txns
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            for name, found in batches.items():
                batch = (replica_position(cli.root / f"{name}/db/app") or {}).get("batch")
                if batch:
                    found[batch["first_txn"]] = batch["txns"]
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    workload(app, 800, seed=22, sleep_ms=1)
    agent.stop()
    ok(cli.agent_once(), "capture-agent --once")  # publish whatever the follow-mode agent had not
    n = last_txn(cli)
    assert n > 10
    for target in ("r1/db/app/", "r2/db/app/"):
        wait_for(lambda: replica_txn(cli.root / target) == n, 60, f"{target} to reach txn {n}")  # noqa: B023
    sampling.set()
    sampler.join(5)
    # --min-interval 1: the broker answered the second replica's fetches about once a second, each
    # with the txns of that second, applied in one group commit; the first applied them as they came.
    mean = {name: sum(found.values()) / max(1, len(found)) for name, found in batches.items()}
    assert batches["r1"] and batches["r2"], batches
    assert mean["r2"] >= 3 and mean["r2"] > 2 * mean["r1"], mean
    for proc in (first, second):
        assert proc.alive(), proc.output()
        proc.stop()

    # The source is left alone from here on: the late replica has only Kafka.
    source_md5 = [md5_file(p) for p in pool_files(app.prefix)]
    late = cli.root / "late"
    assert not late.exists()
    ok(cli.replica_once("late/db/app/", "late/blob/app/", "group-late"), "late replica --once")
    assert [md5_file(p) for p in pool_files(app.prefix)] == source_md5
    assert replica_position(late / "db/app")["txn_id"] == n

    expected = app.query(app.prefix, app.blob_dir)
    for target, blob in (
        ("r1/db/app/", "r1/blob/app/"),
        ("r2/db/app/", "r2/blob/app/"),
        ("late/db/app/", "late/blob/app/"),
    ):
        assert ok(cli.verify(target, blob), f"verify {target}").stdout.startswith("verify: identical")
        assert cli.differences(target, blob) == []
        assert app.query(cli.root / target, cli.root / blob) == expected, f"{target}: query output differs"
    # Each group's progress is visible as its committed offset (lag monitoring): all at the end.
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    tp = TopicPartition(f"pool.{cli.database}", 0)
    end = end_offset(cli.bootstrap_servers, cli.database, "read_committed")
    for group in ("group-one", "group-two", "group-late"):
        consumer = KafkaConsumer(bootstrap_servers=cli.bootstrap_servers, group_id=group, enable_auto_commit=False)
        try:
            # The commit record's offset + 1: only the transaction's control marker lies beyond it.
            assert end - 1 <= consumer.committed(tp) <= end, group
        finally:
            consumer.close()


# --- one agent per database ---------------------------------------------------------------------


def test_a_second_agent_fences_the_first_which_exits_with_a_clear_message(
    app: PicoApp, cli: Cli, tmp_path: Path
) -> None:
    """Failover: a replica is promoted and its agent takes over the database; the old agent is a zombie."""
    app.workload(50, seed=31)
    old = cli.start_agent(name="old-agent")
    wait_for(lambda: last_txn(cli) >= 1 and not app.journal.stat().st_size, 60, "the old agent's snapshot")
    ok(cli.replica_once(), "replica --once")
    before = last_txn(cli)
    # Promote the replica: a byte copy of it becomes the new primary's pool (new host, new journal).
    new_app = PicoApp(tmp_path / "promoted", app.pil)
    copy_pool(cli.root / RPL, new_app.db_dir)
    shutil.copytree(cli.root / RPL_BLOB, new_app.blob_dir, dirs_exist_ok=True)
    new_app.journal.touch()
    new_cli = Cli(new_app.root, cli.bootstrap_servers, cli.database)
    try:
        new = new_cli.start_agent(name="new-agent")  # init_transactions bumps the producer epoch
        wait_for(lambda: "topic is at" in new.stdout(), 60, "the new agent to start")
        time.sleep(0.5)
        assert new.alive(), new.output()
        assert last_txn(cli) == before, "the promoted pool equals the topic: no snapshot needed"
        assert old.alive(), old.output()  # idle: it learns of the fence on its next publish
        workload(app, 20, seed=32)  # the old primary keeps committing: the zombie agent must not publish
        rc = old.wait(60)
        assert rc not in (0, -9, 130), old.output()
        err = old.stderr()
        assert "fenced" in err and cli.database in err, err
        assert "Traceback" not in err, err
        assert last_txn(cli) == before, "the fenced agent must not have published anything"
        # The new primary carries on; the replica follows it.
        workload(new_app, 30, seed=33)
        wait_for(lambda: last_txn(cli) > before and not new_app.journal.stat().st_size, 60, "the new agent to publish")
        new.stop()
        ok(new_cli.agent_once(), "new capture-agent --once")
        ok(cli.replica_once(), "replica --once after failover")
        assert compare_pools(new_app.prefix, cli.root / RPL) == []
        assert compare_blob_trees(new_app.blob_dir, cli.root / RPL_BLOB) == []
        assert new_app.query(new_app.prefix) == app.query(cli.root / RPL)
    finally:
        new_cli.stop_all()


def test_a_second_agent_with_the_same_state_dir_is_refused_by_the_local_lock(app: PicoApp, cli: Cli) -> None:
    app.workload(20, seed=41)
    first = cli.start_agent()
    wait_for(lambda: last_txn(cli) >= 1, 60, "the first agent's bootstrap snapshot")
    offset = end_offset(cli.bootstrap_servers, cli.database)
    r = cli.agent_once()
    assert r.returncode != 0
    assert "already running" in r.stderr and str(first.pid) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert first.alive(), "the refused agent must not have fenced the running one"
    assert end_offset(cli.bootstrap_servers, cli.database) == offset
    before = last_txn(cli)
    workload(app, 10, seed=42)
    wait_for(lambda: last_txn(cli) > before, 30, "the running agent to keep publishing")
    assert first.alive(), first.output()


# --- bad input ------------------------------------------------------------------------------------


def _entry(size: int, file: int, address: int, payload: bytes) -> bytes:
    """One journal entry (FORMAT.md §2.2): size code, file, 6-byte address, payload."""
    return struct.pack("<BHIH", size, file, address & 0xFFFFFFFF, address >> 32) + payload


def test_a_bad_journal_is_refused_with_nothing_published_and_the_journal_intact(app: PicoApp, cli: Cli) -> None:
    app.workload(40, seed=51)
    good = app.journal.read_bytes()
    assert good
    cases = {
        "truncated": (good[:-7], "truncated"),
        "unknown file number": (good + _entry(0, 9, 64, bytes(128)), "file 9"),
        "entry crossing a block": (good + _entry(100, 0, 50, bytes(100)), "crossing"),
        "garbage": (good + b"\x07" * 5, "truncated"),
    }

    def refused(case: str, data: bytes, words: str) -> None:
        app.journal.write_bytes(data)
        offset = end_offset(cli.bootstrap_servers, cli.database)
        r = cli.agent_once()
        assert r.returncode not in (0, 3), f"{case}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        assert words in r.stderr and "journal" in r.stderr and "Traceback" not in r.stderr, f"{case}: {r.stderr}"
        assert app.journal.read_bytes() == data, f"{case}: the journal was modified"
        assert end_offset(cli.bootstrap_servers, cli.database) == offset, f"{case}: records were published"

    # On the very first start (bootstrap snapshot) and on a restart (topic already at txn 1).
    refused("truncated, at bootstrap", good[:-7], "truncated")
    assert committed_transactions(cli.bootstrap_servers, cli.database) == []
    app.journal.write_bytes(good)
    ok(cli.agent_once(), "capture-agent --once")
    assert last_txn(cli) == 1
    app.workload(30, seed=52)
    good = app.journal.read_bytes()
    for case, (data, words) in cases.items():
        refused(case, data, words)
    # Nothing was lost: with the journal repaired, everything reaches the replica.
    app.journal.write_bytes(good)
    check_caught_up(cli, app)
    assert last_txn(cli) == 2


def _bad_topic_setup(app: PicoApp, kafka: Any, name: str) -> tuple[Cli, Any, list]:
    """A database (own topic, own replica dir) whose replica is at txn 1; returns (cli, position, layout)."""
    from connectors.kafka.topics import last_commit

    c = Cli(app.root, kafka.bootstrap_servers, unique_name(name))
    ok(c.agent_once("--state-dir", f"fifo/{c.database}.agent"), "capture-agent --once")
    ok(c.replica_once(f"{c.database}/db/app/", f"{c.database}/blob/app/"), "replica --once")
    last = last_commit(kafka.bootstrap_servers, c.database, codec())
    assert last is not None
    return c, last.position, last.files


def test_malformed_foreign_gap_or_escaping_records_stop_the_replica_before_it_applies_anything(
    app: PicoApp, kafka: Any, tmp_path: Path
) -> None:
    from pipeline.model import BlobChunk, BlockWrite, Transaction

    app.workload(60, seed=61)
    c = codec()
    outside = tmp_path / "escaped-blob"

    def txn(
        db: str,
        position: Any,
        layout: list,
        txn_id: int | None = None,
        changes: tuple = (),
        checksum_after: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        t = Transaction(
            database=db,
            txn_id=txn_id or position.txn_id + 1,
            checksum_before=position.checksum,
            source_time_ms=int(time.time() * 1000),
            changes=list(changes),
            files=layout,
            change_count=len(changes),
            checksum_after=position.checksum if checksum_after is None else checksum_after,
        )
        return list(c.transaction_records(t))

    rnd = random.Random(6)
    cases = {
        "malformed": (
            lambda db, p, lay: [(b"txn", b"\x00 this is not an Avro record")],
            "not an Avro single-object record",
            None,
        ),
        "truncated body": (
            lambda db, p, lay: [
                (k, v if k == b"txn" else v[:-3])
                for k, v in txn(db, p, lay, changes=(BlockWrite(1, 1, rnd.randbytes(256)),))
            ],
            "cannot decode",
            2,
        ),
        "foreign database": (lambda db, p, lay: txn("someone-else", p, lay), "foreign database", 2),
        "txn id gap": (lambda db, p, lay: txn(db, p, lay, txn_id=p.txn_id + 2), "gap", 3),
        "checksum mismatch": (
            lambda db, p, lay: txn(db, p, lay, changes=(BlockWrite(1, 1, rnd.randbytes(256)),)),
            "checksum mismatch",
            2,
        ),
        "blob path with ..": (
            lambda db, p, lay: txn(db, p, lay, changes=(BlobChunk("../escaped-blob", 5, "0" * 64, 0, 1, b"pwned"),)),
            "escapes",
            2,
        ),
        "absolute blob path": (
            lambda db, p, lay: txn(db, p, lay, changes=(BlobChunk(str(outside), 5, "0" * 64, 0, 1, b"pwned"),)),
            "absolute",
            2,
        ),
    }
    for case, (records, words, txn_id) in cases.items():
        cli, position, layout = _bad_topic_setup(app, kafka, case.replace(" ", "-").replace(".", ""))
        target, blob = f"{cli.database}/db/app/", f"{cli.database}/blob/app/"
        before = replica_state(cli.root, target, blob)
        bad_offset = end_offset(kafka.bootstrap_servers, cli.database)
        produce_transactional(kafka.bootstrap_servers, cli.database, records(cli.database, position, layout))
        for _attempt in (1, 2):  # stopping is permanent: a restart does not skip the bad record
            r = cli.replica_once(target, blob)
            assert r.returncode == 1, f"{case}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
            err = r.stderr
            assert words in err and "Traceback" not in err, f"{case}: {err}"
            # The record at fault: the begin of the bad transaction, or the truncated record after it.
            at = bad_offset + 1 if case == "truncated body" else bad_offset
            assert f"database={cli.database}" in err and f"offset={at}" in err, f"{case}: {err}"
            if txn_id is not None:
                assert f"txn={txn_id}" in err, f"{case}: {err}"
            assert replica_state(cli.root, target, blob) == before, f"{case}: the replica changed"
            assert replica_txn(cli.root / target) == 1
        assert not outside.exists() and not (cli.root / cli.database / "blob" / "escaped-blob").exists()
        assert not list(cli.root.rglob("escaped-blob")), f"{case}: a blob was written outside --blob"


def test_blob_markers_pointing_outside_the_blob_dir_are_skipped_with_a_warning_and_the_rest_is_published(
    app: PicoApp, cli: Cli
) -> None:
    """Refusing the whole round would wedge the agent for as long as the app leaves the marker there."""
    app.workload(40, seed=71)
    ok(cli.agent_once(), "capture-agent --once")
    for n, (name, target, words) in enumerate(
        (("=evil.doc", "../../etc/passwd", "escapes"), ("=abs.doc", "/etc/passwd", "absolute"))
    ):
        app.workload(20, seed=72 + n)  # pending journal data (and blobs) published despite the marker
        marker = app.blob_dir / name
        os.symlink(target, marker)
        before = last_txn(cli)
        r = ok(cli.agent_once(), f"capture-agent --once with {name}")
        assert f"b'{name}'" in r.stdout and words in r.stdout and "warning" in r.stdout, r.stdout
        assert "Traceback" not in r.stderr, r.stderr
        assert last_txn(cli) == before + 1, f"{name}: the round was not published"
        assert os.readlink(marker) == target, "a refused marker is left where the app put it"
        ok(cli.replica_once(), "replica --once")
        assert cli.differences() == []
        marker.unlink()
    check_caught_up(cli, app)
    assert not (cli.root / "rpl/etc").exists() and not (cli.root / "etc").exists()
    assert not list(cli.root.rglob("passwd"))


def test_a_replica_dir_holding_another_database_or_foreign_files_is_refused(app: PicoApp, cli: Cli, kafka: Any) -> None:
    app.workload(30, seed=81)
    ok(cli.agent_once(), "capture-agent --once")
    ok(cli.replica_once(), "replica --once")
    other = Cli(app.root, kafka.bootstrap_servers, unique_name("other"))
    ok(other.agent_once("--state-dir", "fifo/other.agent"), "capture-agent --once for another database")
    before = replica_state(cli.root)
    r = other.replica_once()
    assert r.returncode == 1, r.stderr
    assert f"holds database '{cli.database}'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert replica_state(cli.root) == before
    # Pool files that pool-pipeline did not write (here: the source pool itself) are never overwritten.
    source = [md5_file(p) for p in pool_files(app.prefix)]
    r = cli.replica_once(cli.pool, "blob-copy/")
    assert r.returncode == 1 and "refusing to overwrite" in r.stderr, r.stderr
    assert [md5_file(p) for p in pool_files(app.prefix)] == source


def test_an_agent_without_the_last_publishers_state_takes_a_snapshot_instead_of_a_wrong_txn(
    app: PicoApp, cli: Cli
) -> None:
    """The state dir (its spool holds journal data taken but not yet published) is lost, and more was
    committed since: the journal alone no longer explains the pool, so a delta would be wrong."""
    app.workload(30, seed=91)
    ok(cli.agent_once(), "capture-agent --once")
    app.workload(20, seed=92)
    # What an agent does right before it is killed: append the journal to its spool, truncate the journal.
    spool = cli.root / "fifo/app.agent/journal.spool"
    spool.write_bytes(app.journal.read_bytes())
    app.journal.write_bytes(b"")
    app.workload(20, seed=93)
    shutil.rmtree(cli.root / "fifo/app.agent")  # lost (or: --state-dir pointed elsewhere)
    r = ok(cli.agent_once(), "capture-agent --once with a fresh state dir")
    assert "snapshot" in r.stdout, r.stdout
    check_caught_up(cli, app)


def test_an_empty_replica_starts_at_the_newest_snapshot_and_skips_history(app: PicoApp, cli: Cli) -> None:
    """A bad record stops every replica that reads through it. `capture-agent --snapshot` re-bases the
    stream, and an empty replica starts at the newest snapshot, so it gets past the damage and still
    ends byte-identical."""
    app.workload(40, seed=71)
    ok(cli.agent_once(), "capture-agent --once")
    produce_transactional(cli.bootstrap_servers, cli.database, [(b"junk", b"not an avro record")])
    app.workload(40, seed=72)
    ok(cli.agent_once(), "capture-agent --once")
    stuck = cli.replica_once()
    assert stuck.returncode == 1 and "not an Avro single-object record" in stuck.stderr, stuck.stderr
    ok(cli.agent_once("--snapshot"), "capture-agent --once --snapshot")
    app.workload(20, seed=73)
    r = ok(cli.replica_once("late/db/app/", "late/blob/app/", "late"), "replica --once (empty target)")
    assert "newest snapshot (txn 3" in r.stdout, r.stdout
    assert cli.verify("late/db/app/", "late/blob/app/").returncode == 1  # the agent has not captured seed 73 yet
    ok(cli.agent_once(), "capture-agent --once")
    ok(cli.replica_once("late/db/app/", "late/blob/app/", "late"), "replica --once (catch up)")
    assert cli.differences("late/db/app/", "late/blob/app/") == []
    assert app.query(app.prefix, app.blob_dir) == app.query(cli.root / "late/db/app/", cli.root / "late/blob/app/")


def test_a_group_of_two_members_spreads_databases_and_takes_over_when_one_dies(
    tmp_path: Path, kafka: Any, picolisp: str
) -> None:
    """`replica --pattern --root`: 4 databases over 2 members sharing a root; one member is killed -9, the
    other takes its databases over (from each replica's own position) and all 4 end byte-identical."""
    prefix = unique_name("grp").replace("-", "")[:20]
    clis: list[Cli] = []
    for i in range(4):
        app = PicoApp(tmp_path / f"app{i}", picolisp)
        app.create()
        app.workload(30, seed=100 + i)
        clis.append(Cli(app.root, kafka.bootstrap_servers, f"{prefix}{i}"))
        ok(clis[-1].agent_once(), f"capture-agent {prefix}{i}")
    root = tmp_path / "rpl"
    member = [str(BIN / "replica"), "--pattern", f"{prefix}[0-9]", "--root", str(root), "--group", prefix]
    runner = clis[0]
    try:
        m1 = runner.start("member1", member)
        m2 = runner.start("member2", member)

        def at(db: str) -> int:
            return replica_txn(root / db / "db")

        wait_for(lambda: all(at(c.database) >= 1 for c in clis), 90, "both members to replicate all 4 databases")
        wait_for(
            lambda: "assigned" in m1.out_path.read_text() and "assigned" in m2.out_path.read_text(),
            30,
            "each member to be assigned databases",
        )
        m1.kill9()
        for i, c in enumerate(clis):
            PicoApp(c.root, picolisp).workload(20, seed=200 + i)
            ok(c.agent_once(), f"capture-agent {c.database}")
        last = {c.database: committed_transactions(c.bootstrap_servers, c.database)[-1].txn_id for c in clis}
        wait_for(
            lambda: all(at(db) == txn for db, txn in last.items()), 120, f"member2 to take over and catch up: {last}"
        )
        assert m2.alive(), m2.err_path.read_text()[-2000:]
    finally:
        runner.stop_all()
    for c in clis:
        db = c.database
        assert compare_pools(c.root / c.pool, root / db / "db") == [], db
        assert compare_blob_trees(c.root / c.blob, root / db / "blob") == [], db
