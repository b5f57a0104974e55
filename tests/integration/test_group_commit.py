"""Replica group commit: several fetched transactions applied in one redo/fsync cycle, kill -9 safe.

Real Kafka, real journaled PicoLisp pools, real processes. The crash windows group commit adds
(a kill while a multi-txn batch is being staged, replayed, or its blobs and position written) are
hit deterministically: a small driver process runs the replica loop in-process and SIGKILLs itself
at the n-th call of a chosen step.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from connectors.picolisp.blobs import compare_blob_trees
from connectors.picolisp.format import compare_pools
from pipeline.model import Position
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp
from tests.pipeline_helpers import (
    Cli,
    TopicTxn,
    codec,
    committed_transactions,
    end_offset,
    ok,
    produce_transactional,
    replica_at_boundary,
    replica_position,
)

pytestmark = pytest.mark.integration

RPL = "rpl/db/app/"
RPL_BLOB = "rpl/blob/app/"
REPO = Path(__file__).resolve().parents[2]


def publish_many(app: PicoApp, cli: Cli, rounds: int, txns_per_round: int = 25, seed: int = 500) -> list[TopicTxn]:
    """`rounds` capture txns, one `capture-agent --once` per workload: each a txn with blocks and blobs."""
    for i in range(rounds):
        app.workload(txns_per_round, seed=seed + i)
        ok(cli.agent_once(), f"capture-agent --once #{i + 1}")
    return committed_transactions(cli.bootstrap_servers, cli.database)


def redo_trailer(target: Path) -> dict | None:
    """The plan of a committed redo file (the batch a killed replica will replay), None if there is none."""
    redo = target / ".pool-pipeline" / "redo"
    if not redo.exists():
        return None
    data = redo.read_bytes()
    (length,) = struct.unpack("<Q", data[-8:])
    return json.loads(data[-8 - length : -8])


def check_at_topic_boundary(target: Path, txns: list[TopicTxn], where: str) -> int:
    """The replica's files match its position.json, and that position is a txn of the topic (same id and
    checksum): nothing lost, doubled or torn. Returns its txn id."""
    problem = replica_at_boundary(target)
    assert problem is None, f"{where}: {problem}"
    pos = replica_position(target)
    if pos is None:
        return 0
    by_id = {t.txn_id: t for t in txns}
    assert pos["txn_id"] in by_id, f"{where}: replica at txn {pos['txn_id']}, not a txn of the topic"
    assert pos["checksum"] == by_id[pos["txn_id"]].checksum_after, f"{where}: checksum of txn {pos['txn_id']} differs"
    return pos["txn_id"]


DRIVER = textwrap.dedent('''
    """Replica loop (as pool_pipeline.cli.replica wires it) that SIGKILLs itself at the n-th call of one step."""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import connectors.picolisp.replica as rd
    from connectors.kafka.reader import TopicSource
    from connectors.kafka.topics import topic_for
    from pipeline.codec import Codec
    from pipeline.replicate import replicate
    from schemas import load_schemas

    _, _, bootstrap, database, target, blob, step, nth = sys.argv
    calls = [0]

    def bomb(fn):
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return wrapped

    if step == "stage-block":      # inside _stage, n blocks into the batch: redo.tmp is partial
        rd.block_hash = bomb(rd.block_hash)
    elif step == "pwrite":          # after the commit point, n frames into the replay of the batch
        os.pwrite = bomb(os.pwrite)
    elif step == "rename":          # 1st: the commit point (redo.tmp -> redo); then the blobs moving into
        os.replace = bomb(os.replace)  # place, then position.json
    elif step == "position":        # writing position.json of the n-th batch
        rd.write_atomic = bomb(rd.write_atomic)
    sink = rd.ReplicaDir(target, database, blob, topic=topic_for(database), group_commit=True)
    source = TopicSource(bootstrap, database, Codec(load_schemas()), "crash-driver", sink.next_offset, once=True)
    replicate(source, sink)
    print("finished without being killed", sink.position())
''')


def test_kill_9_inside_multi_txn_group_commits_leaves_the_replica_at_a_txn_boundary(
    app: PicoApp, cli: Cli, tmp_path: Path
) -> None:
    from connectors.picolisp.replica import ReplicaDir

    app.workload(60, seed=401)
    ok(cli.agent_once(), "capture-agent --once (snapshot)")
    ok(cli.replica_once(), "replica --once (to the snapshot)")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    target = cli.root / RPL
    multi_txn_redo = 0
    seed = 500
    # Each kill lands in a different step of a batch spanning several txns: they are all in the topic
    # before the driver starts, so everything fetched is staged into one batch.
    for step, nth in (
        ("stage-block", 40),
        ("pwrite", 25),
        ("rename", 1),
        ("rename", 3),
        ("position", 1),
        ("pwrite", 90),
    ):
        before = replica_position(target)["txn_id"]
        txns = committed_transactions(cli.bootstrap_servers, cli.database)
        if txns[-1].txn_id - before < 3:
            txns = publish_many(app, cli, 4, seed=seed)  # at least 3 txns for the batch to come
            seed += 4
        assert sum(t.blob_chunks for t in txns if t.txn_id > before) > 0
        r = subprocess.run(
            [
                sys.executable,
                str(driver),
                str(REPO),
                cli.bootstrap_servers,
                cli.database,
                str(target) + "/",
                str(cli.root / RPL_BLOB),
                step,
                str(nth),
            ],
            cwd=cli.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        where = f"kill -9 at {step} #{nth} (replica was at txn {before}, topic at {txns[-1].txn_id})"
        assert r.returncode == -9, f"{where}: exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
        plan = redo_trailer(target)
        if plan is not None:  # killed after the commit point: the next start replays the whole batch
            assert plan["txn_id"] > before
            multi_txn_redo += plan["txns"] > 1
        check_at_topic_boundary(target, txns, where)  # accepts a pending redo: it is complete by design
        # Opening the replica replays a committed redo or discards a partial one; then it is whole.
        ReplicaDir(str(target) + "/", cli.database, cli.root / RPL_BLOB).close()
        at = check_at_topic_boundary(target, txns, f"{where}, after recovery")
        assert not (target / ".pool-pipeline" / "redo").exists()
        assert not (target / ".pool-pipeline" / "redo.tmp").exists()
        replayed = f"redo of txns {plan['first_txn']}..{plan['txn_id']} replayed" if plan else "no redo"
        print(f"{where}: {replayed} -> replica at txn {at}")
        if plan is not None:
            assert at == plan["txn_id"], f"{where}: the replayed batch ends at txn {plan['txn_id']}, replica at {at}"
        else:
            assert at == before, f"{where}: killed before the commit point, yet the replica moved to txn {at}"
    assert multi_txn_redo >= 3, "too few kills landed after the commit point of a batch of several txns"
    ok(cli.replica_once(), "replica --once after the kills")
    txns = committed_transactions(cli.bootstrap_servers, cli.database)
    assert replica_position(target)["txn_id"] == txns[-1].txn_id
    assert compare_pools(app.prefix, target) == []
    assert compare_blob_trees(app.blob_dir, cli.root / RPL_BLOB) == []
    assert app.query(app.prefix, app.blob_dir) == app.query(target, cli.root / RPL_BLOB)


def test_a_bad_txn_behind_good_ones_in_one_batch_stops_the_replica_at_the_last_good_txn(app: PicoApp, cli: Cli) -> None:
    """Txns 2..6 and a corrupt txn 7 are staged into one batch: 2..6 are committed together, txn 7 is
    refused (named with its offset), nothing of it is visible, and a restart refuses it again."""
    from connectors.kafka.reader import TopicSource
    from connectors.kafka.topics import topic_for
    from connectors.picolisp.replica import ReplicaDir
    from pipeline.errors import PipelineError
    from pipeline.model import BlockWrite, Transaction
    from pipeline.replicate import replicate

    app.workload(40, seed=411)
    ok(cli.agent_once(), "capture-agent --once (snapshot)")
    ok(cli.replica_once(), "replica --once (to the snapshot)")
    txns = publish_many(app, cli, 5, seed=420)
    last = txns[-1]
    bad_offset = end_offset(cli.bootstrap_servers, cli.database)
    bad = Transaction(
        database=cli.database,
        txn_id=last.txn_id + 1,
        checksum_before=last.checksum_after,
        source_time_ms=int(time.time() * 1000),
        changes=[BlockWrite(1, 1, os.urandom(256))],
        files=committed_layout(cli),
        change_count=1,
        checksum_after=last.checksum_after,
    )  # a lie: block 1 changes
    produce_transactional(cli.bootstrap_servers, cli.database, list(codec().transaction_records(bad)))
    target = cli.root / RPL

    class AlwaysBuffered(TopicSource):
        """Claims more is always at hand, so that the loop stages everything into one batch."""

        def buffered(self) -> bool:
            return True

    sink = ReplicaDir(
        str(target) + "/", cli.database, cli.root / RPL_BLOB, topic=topic_for(cli.database), group_commit=True
    )
    source = AlwaysBuffered(cli.bootstrap_servers, cli.database, codec(), "replica", sink.next_offset, once=True)
    try:
        with pytest.raises(PipelineError) as failed:
            replicate(source, sink)
        assert "checksum mismatch" in str(failed.value)
        assert (failed.value.database, failed.value.txn_id, failed.value.offset) == (
            cli.database,
            bad.txn_id,
            bad_offset,
        )
        assert sink.position() == Position(last.txn_id, last.checksum_after)
    finally:
        source.close()
        sink.close()
    pos = replica_position(target)
    assert pos["batch"] == {"first_txn": 2, "txns": last.txn_id - 1}, pos  # one group commit for 2..6
    for attempt in ("first look", "the CLI"):
        if attempt == "the CLI":
            r = cli.replica_once()
            assert r.returncode == 1, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
            assert "checksum mismatch" in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert (
                f"database={cli.database}" in r.stderr
                and f"txn={bad.txn_id}" in r.stderr
                and f"offset={bad_offset}" in r.stderr
            ), r.stderr
        pos = replica_position(target)
        assert (pos["txn_id"], pos["checksum"]) == (last.txn_id, last.checksum_after), attempt
        # The source is still at txn 6 (nothing was captured since): the replica equals it exactly.
        assert compare_pools(app.prefix, target) == [], attempt
        assert compare_blob_trees(app.blob_dir, cli.root / RPL_BLOB) == [], attempt
        assert not (target / ".pool-pipeline" / "redo").exists()


def committed_layout(cli: Cli) -> list:
    from connectors.kafka.topics import last_commit

    last = last_commit(cli.bootstrap_servers, cli.database, codec())
    assert last is not None
    return last.files


def test_replica_dir_group_commit_is_durable_only_at_flush_and_close_discards(app: PicoApp, cli: Cli) -> None:
    """The opt-in mode for other callers (restore): apply() stages and verifies, flush() commits."""
    from connectors.kafka.reader import TopicSource
    from connectors.kafka.topics import topic_for
    from connectors.picolisp.replica import ReplicaDir

    app.workload(40, seed=431)
    txns = publish_many(app, cli, 4, seed=440)  # txn 1 is the snapshot
    target = cli.root / "api/db/app"
    blob = cli.root / "api/blob/app"
    sink = ReplicaDir(f"{target}/", cli.database, blob, topic=topic_for(cli.database), group_commit=True)
    source = TopicSource(cli.bootstrap_servers, cli.database, codec(), "api", 0, once=True)
    try:
        it = iter(source.transactions(sink.position()))
        sink.apply(next(it))  # a snapshot is always committed at once, on its own
        assert sink.position().txn_id == 1 and sink.pending() == 0
        for _ in range(2):
            sink.apply(next(it))
        assert sink.pending() == 2 and sink.position().txn_id == 1, "staged txns must not be visible yet"
        assert replica_position(target)["txn_id"] == 1 and replica_at_boundary(target) is None
        sink.flush()
        assert sink.pending() == 0 and sink.position() == Position(txns[2].txn_id, txns[2].checksum_after)
        assert replica_position(target)["batch"] == {"first_txn": 2, "txns": 2}
        assert replica_at_boundary(target) is None
        sink.apply(next(it))
        assert sink.pending() == 1
    finally:
        sink.close()  # discards the staged txn 4
        source.close()
    reopened = ReplicaDir(f"{target}/", cli.database, blob)
    try:
        assert reopened.position() == Position(txns[2].txn_id, txns[2].checksum_after)
    finally:
        reopened.close()
    assert not (target / ".pool-pipeline" / "redo.tmp").exists()
