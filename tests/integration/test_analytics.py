"""Analytics end to end: the change-stream API, `analytics` exactly once under kill -9, replay, groups, SQLite.

Real broker, real processes; one test drives a real PicoLisp app through capture-agent. Expected
windows are computed independently of the consumer: the committed records of the database topic,
decoded with the codec and windowed with pipeline.stats, with each transaction's publish time
taken from its TxnCommit record's broker timestamp.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from connectors.kafka.status import status
from connectors.kafka.topics import ensure_topic, topic_for
from pipeline.model import BlobChunk, BlobDelete, BlockWrite, FileLayout, Transaction
from pipeline.stats import TxnSummary, Windows, WindowStats, summarize
from pool_pipeline.analytics import STATS_RECORD, read_sqlite_stats
from pool_pipeline.changes import ChangeStream, KafkaTransactions
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp
from tests.pipeline_helpers import BIN, Cli, Proc, codec, end_offset, read_committed_records, unique_name, wait_for

pytestmark = pytest.mark.integration


# --- helpers -----------------------------------------------------------------------------------


def synthetic(database: str, first: int, n: int, t0: int, step_ms: int = 50) -> list[Transaction]:
    """Deterministic transactions: block writes to 2 files, a 3-chunk blob every 7th, a delete every 11th."""
    out = []
    for txn_id in range(first, first + n):
        rng = random.Random(txn_id)
        changes: list = [
            BlockWrite(f, rng.randrange(30), bytes([txn_id % 251]) * (64 << f))
            for f in (rng.randrange(2) for _ in range(rng.randrange(1, 6)))
        ]
        if txn_id % 7 == 0:
            changes += [
                BlobChunk(f"d/{txn_id}.doc", 25, "0" * 64, i, 3, b"%d" % i * 10 if i < 2 else b"end!!")
                for i in range(3)
            ]
        if txn_id % 11 == 0:
            changes.append(BlobDelete(f"d/{txn_id - 4}.doc"))
        out.append(
            Transaction(
                database,
                txn_id,
                txn_id,
                t0 + txn_id * step_ms,
                changes,
                checksum_after=txn_id + 1,
                files=[FileLayout(0, 64, 30), FileLayout(1, 128, 30)],
                change_count=len(changes),
            )
        )
    return out


def publish(bootstrap: str, database: str, txns: list[Transaction], per_kafka_txn: int = 10) -> None:
    """Publish pipeline transactions the way capture-agent frames them, `per_kafka_txn` per Kafka transaction."""
    c = codec()
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=2,
        transactional_id=f"test-analytics.{database}",
    )
    try:
        producer.init_transactions()
        for i in range(0, len(txns), per_kafka_txn):
            producer.begin_transaction()
            for txn in txns[i : i + per_kafka_txn]:
                for key, value in c.transaction_records(txn):
                    producer.send(topic_for(database), key=key, value=value, partition=0)
            producer.commit_transaction()
    finally:
        producer.close(timeout=10)


def expected_windows(bootstrap: str, database: str, window_ms: int) -> list[WindowStats]:
    """The closed windows of the topic as it is now, computed without the analytics consumer."""
    records = read_committed_records(bootstrap, database)
    published = {r.offset: r.timestamp for r in records}
    windows = Windows(database, window_ms)
    out = []
    for txn in codec().read_transactions(records, database):
        s: TxnSummary = summarize(txn, 0)
        s.publish_time_ms = published[txn.end_offset]
        closed = windows.add(s)
        if closed is not None:
            out.append(closed)
    return out


def stats(bootstrap: str, topic_suffix: str) -> list[WindowStats]:
    """The committed WindowStats records of topic pool.<topic_suffix> (read_committed), in order."""
    if not end_offset(bootstrap, topic_suffix, "read_committed"):
        return []
    c = codec()
    out = []
    for r in read_committed_records(bootstrap, topic_suffix):
        name, value = c.decode(r.value, topic=r.topic, offset=r.offset)
        assert name == STATS_RECORD
        w = WindowStats.from_record(value)
        assert r.key == w.key
        out.append(w)
    return out


def assert_each_window_once(got: list[WindowStats], expected: list[WindowStats], what: str) -> None:
    keys = [w.key for w in got]
    doubled = sorted({k for k in keys if keys.count(k) > 1})
    assert not doubled, f"{what}: windows written more than once: {doubled[:10]}"
    missing = sorted({w.key for w in expected} - set(keys))
    assert not missing, f"{what}: windows missing: {missing[:10]} ({len(got)} of {len(expected)} written)"
    assert got == expected, f"{what}: windows differ from the independently computed ones"


def analytics_argv(*args: str) -> list[str]:
    return [str(BIN / "analytics"), *args]


def owned(proc: Proc) -> set[str]:
    """The databases a member holds now, from its log (assigned / released lines, in order)."""
    held: set[str] = set()
    for m in re.finditer(r"^analytics (\S+): (assigned to|released by) this member", proc.stdout(), re.M):
        (held.add if m[2] == "assigned to" else held.discard)(m[1])
    return held


def ok(result: Any, what: str) -> Any:
    assert result.returncode == 0, (
        f"{what} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    return result


def group_row(bootstrap: str, database: str, group: str) -> dict:
    rows = status(bootstrap, codec(), [database])
    found = [g for row in rows for g in row["groups"] if g["group"] == group]
    assert found, f"pipeline status shows no group {group} for {database}: {rows}"
    return found[0]


@pytest.fixture
def tmp_cli(tmp_path: Path, kafka: Any) -> Any:
    c = Cli(tmp_path, kafka.bootstrap_servers, unique_name("analytics"))
    yield c
    c.stop_all()


# --- the public API ----------------------------------------------------------------------------


def test_change_stream_api_reassembles_resumes_and_produces_exactly_once(tmp_cli: Cli) -> None:
    bs, db = tmp_cli.bootstrap_servers, tmp_cli.database
    ensure_topic(bs, topic_for(db))
    publish(bs, db, synthetic(db, 1, 20, t0=int(time.time()) * 1000), per_kafka_txn=3)
    blobs: dict[str, bytes] = {}
    with ChangeStream(bs, f"{db}-api", databases=[db], once=True) as stream:
        for txn in stream:
            assert txn.database == db and txn.topic == topic_for(db) and txn.checksum_before == txn.txn_id
            kinds = [type(ch).__name__ for ch in txn.changes]  # read once, in order
            for ch in synthetic(db, txn.txn_id, 1, 0)[0].changes:
                if isinstance(ch, BlobChunk):
                    blobs[ch.path] = blobs.get(ch.path, b"") + ch.data
            assert kinds == [type(ch).__name__ for ch in synthetic(db, txn.txn_id, 1, 0)[0].changes]
            assert txn.checksum_after == txn.txn_id + 1 and txn.end_offset is not None and txn.publish_time_ms > 0
            if txn.txn_id == 5:
                stream.commit(txn)
                break
    assert blobs == {}  # no blob before txn 7
    with ChangeStream(bs, f"{db}-api", databases=[db], once=True) as stream:
        first = next(iter(stream))
        assert first.txn_id == 6, "a group resumes after its committed transaction"
    assert group_row(bs, db, f"{db}-api")["applied_txn"] == 5

    # Consume-transform-produce: one output record per txn and the offset, in one Kafka transaction.
    out_topic = f"{topic_for(db)}.api.stats"
    ensure_topic(bs, out_topic)
    with ChangeStream(bs, f"{db}-eos", databases=[db], once=True) as stream:
        out = KafkaTransactions(stream, "test-api")
        for txn in stream:
            data = b"".join(ch.data for ch in txn.changes if isinstance(ch, BlobChunk))
            assert out.send(txn, [(out_topic, b"%d" % txn.txn_id, data)])
            assert not out.send(txn, [(out_topic, b"again", b"")]), "an input already committed is not redone"
        out.close()
    produced = read_committed_records(bs, f"{db}.api.stats")
    assert [int(r.key) for r in produced] == list(range(1, 21))
    assert produced[6].value == b"0" * 10 + b"1" * 10 + b"end!!"  # txn 7's blob, its 3 chunks in order
    row = group_row(bs, db, f"{db}-eos")
    assert row["applied_txn"] == 20 and row["lag_txns"] == 0


# --- analytics under kill -9, with a real PicoLisp app ------------------------------------------


def test_kill_9_mid_window_writes_each_window_once_and_a_replay_is_identical(
    tmp_path: Path, picolisp: str, kafka: Any
) -> None:
    app = PicoApp(tmp_path / "app", picolisp)
    app.create()
    cli = Cli(app.root, kafka.bootstrap_servers, unique_name("analytics-crash"))
    bs, db = cli.bootstrap_servers, cli.database
    args = ["--database", db, "--window", "0.25", "--group", "stats"]
    rng = random.Random(11)
    written_by_killed = 0
    try:
        agent = cli.start_agent()
        # The bootstrap snapshot first: a workload it swallowed whole would leave no window to close.
        wait_for(lambda: "topic is at" in agent.stdout(), 60, "the agent to start")
        before = 0
        for i in range(4):
            wl = app.workload_proc(150, seed=20 + i, sleep_ms=3)
            proc = cli.start(f"analytics-{i}", analytics_argv(*args))
            # Killed at a random point once it is writing windows (a fixed sleep missed that under load).
            wait_for(
                lambda b=before: len(stats(bs, f"{db}.stats")) > b,  # type: ignore[misc]
                90,
                f"analytics-{i} to write a window",
                interval=0.2,
            )
            time.sleep(rng.uniform(0.0, 0.8))
            assert proc.alive(), proc.output()
            proc.kill9()
            now = len(stats(bs, f"{db}.stats"))
            written_by_killed += now > before  # this process committed windows before it was killed
            before = now
            out, err = wl.communicate(timeout=120)
            assert wl.returncode == 0, f"workload failed: {out[-500:]} {err[-1000:]}"
        assert agent.alive(), agent.output()
        agent.stop()
        ok(cli.agent_once(), "capture-agent --once")
        ok(cli.run(analytics_argv(*args, "--once")), "analytics --once")
    finally:
        cli.stop_all()
    assert written_by_killed >= 2, "the kills should land while windows are being written"
    expected = expected_windows(bs, db, 250)
    assert len(expected) >= 8 and sum(w.txns for w in expected) >= 30
    assert sum(w.blob_chunks for w in expected) > 0 and sum(w.snapshots for w in expected) == 1
    got = stats(bs, f"{db}.stats")
    assert_each_window_once(got, expected, "after 4 kill -9")
    # The open window is not written yet; the group's offset stands just after the last written one.
    row = group_row(bs, db, "stats")
    assert row["applied_txn"] == got[-1].last_txn and row["offset"] == got[-1].end_offset + 1
    assert row["lag_txns"] > 0 and row["lag_seconds"] is not None

    # Replay from the beginning with a new group (into another stats topic): identical records.
    ok(
        cli.run(
            analytics_argv(
                "--database",
                db,
                "--window",
                "0.25",
                "--group",
                "replay",
                "--once",
                "--stats-topic",
                "{topic}.replay.stats",
            )
        ),
        "analytics replay",
    )
    assert stats(bs, f"{db}.replay.stats") == got


# --- a group of two members over four databases --------------------------------------------------


def test_two_members_share_four_databases_and_one_takes_over_without_double_counting(tmp_cli: Cli) -> None:
    bs = tmp_cli.bootstrap_servers
    prefix = unique_name("grp")
    dbs = [f"{prefix}-{i}" for i in range(4)]
    t0 = int(time.time()) * 1000
    for db in dbs:
        ensure_topic(bs, topic_for(db))
        publish(bs, db, synthetic(db, 1, 60, t0))
    args = analytics_argv("--pattern", re.escape(prefix) + r"-\d", "--group", f"{prefix}-g", "--window", "1")
    a = tmp_cli.start("member-a", args)
    b = tmp_cli.start("member-b", args)

    def each_holds_two() -> bool:
        assert a.alive() and b.alive(), a.output() + b.output()
        return len(owned(a)) == 2 and len(owned(b)) == 2 and owned(a) | owned(b) == set(dbs)

    wait_for(each_holds_two, 60, "the group to spread 4 databases over 2 members", interval=0.2)
    for db in dbs:
        wait_for(
            lambda: stats(bs, f"{db}.stats") == expected_windows(bs, db, 1000),  # noqa: B023 - waited on at once
            30,
            f"the first windows of {db}",
            interval=0.3,
        )
    a_dbs = owned(a)
    for db in dbs:
        publish(bs, db, synthetic(db, 61, 60, t0))
    time.sleep(0.3)
    a.kill9()  # possibly in the middle of its next windows
    for db in dbs:
        publish(bs, db, synthetic(db, 121, 60, t0))

    wait_for(lambda: owned(b) == set(dbs), 60, f"member b to take over {sorted(a_dbs)}", interval=0.3)
    for db in dbs:
        wait_for(
            lambda: len(stats(bs, f"{db}.stats")) >= len(expected_windows(bs, db, 1000)),  # noqa: B023
            30,
            f"all windows of {db}",
            interval=0.3,
        )
    assert b.alive(), b.output()
    b.stop()
    for db in dbs:
        expected = expected_windows(bs, db, 1000)
        assert len(expected) == 9  # txns at t0 + 50 ms .. t0 + 9 s: 10 windows of 1 s, the last still open
        assert_each_window_once(stats(bs, f"{db}.stats"), expected, f"{db} (member a held {sorted(a_dbs)})")


# --- SQLite output -------------------------------------------------------------------------------


def test_sqlite_and_topic_outputs_each_exactly_once_after_kill_9(tmp_cli: Cli) -> None:
    bs, db = tmp_cli.bootstrap_servers, tmp_cli.database
    ensure_topic(bs, topic_for(db))
    path = tmp_cli.root / "stats.sqlite"
    args = analytics_argv("--database", db, "--group", "both", "--window", "0.5", "--sqlite", str(path))
    rng = random.Random(3)
    t0 = int(time.time()) * 1000
    before = written_by_killed = 0
    for i in range(4):
        publish(bs, db, synthetic(db, 1 + 80 * i, 80, t0), per_kafka_txn=2)
        proc = tmp_cli.start(f"analytics-{i}", args)
        time.sleep(rng.uniform(0.8, 2.0))
        assert proc.alive(), proc.output()
        proc.kill9()
        now = len(read_sqlite_stats(str(path))) if path.exists() else 0
        written_by_killed += now > before
        before = now
    assert written_by_killed >= 2, "the kills should land while windows are being written"
    ok(tmp_cli.run([*args, "--once"]), "analytics --once")
    expected = expected_windows(bs, db, 500)
    assert len(expected) == 32  # txns at t0 + 50 ms .. t0 + 16 s: 33 windows of 0.5 s, the last still open
    assert_each_window_once(read_sqlite_stats(str(path)), expected, "SQLite")
    assert_each_window_once(stats(bs, f"{db}.stats"), expected, "stats topic")

    # SQLite alone: its offsets live in the file; the group offset is committed for `pipeline status`.
    only = tmp_cli.root / "only.sqlite"
    ok(
        tmp_cli.run(
            analytics_argv(
                "--database",
                db,
                "--group",
                "sqlite-only",
                "--window",
                "0.5",
                "--once",
                "--sqlite",
                str(only),
                "--no-stats-topic",
            )
        ),
        "analytics --sqlite --no-stats-topic",
    )
    assert_each_window_once(read_sqlite_stats(str(only)), expected, "SQLite only")
    assert group_row(bs, db, "sqlite-only")["applied_txn"] == expected[-1].last_txn
    # Run again: nothing new is closed, nothing is written twice.
    ok(
        tmp_cli.run(
            analytics_argv(
                "--database",
                db,
                "--group",
                "sqlite-only",
                "--window",
                "0.5",
                "--once",
                "--sqlite",
                str(only),
                "--no-stats-topic",
            )
        ),
        "analytics again",
    )
    assert read_sqlite_stats(str(only)) == expected
