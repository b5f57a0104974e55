"""The archive's pure rules: keys, segment files, framing, rotation, restore plans and retention (no network)."""

from __future__ import annotations

import io

import pytest

from pipeline.archive import (
    Catalog,
    Framer,
    Rotation,
    Segment,
    SegmentWriter,
    Snapshot,
    SnapshotPolicy,
    read_segment,
    retention_plan,
)
from pipeline.codec import Codec, StreamRecord
from pipeline.errors import PipelineError
from pipeline.model import BlockWrite, FileLayout, Position, Transaction
from schemas import load_schemas

ROOT = "prefix/app"
CODEC = Codec(load_schemas())


def seg(first: int, last: int, *, snap: bool = False, ms: int | None = None) -> Segment:
    t0 = 1_000_000 + first * 1000 if ms is None else ms
    return Segment(first, last, first * 10, t0, 1_000_000 + last * 1000, 0, snap, 100)


def snapshot(txn: int) -> Snapshot:
    return Snapshot(txn, 1_000_000 + txn * 1000)


def test_segment_and_snapshot_keys_round_trip_and_sort_by_offset() -> None:
    s = Segment(12, 40, 1234, 1_700_000_000_000, 1_700_000_005_000, 0, True, 55)
    key = s.key(ROOT)
    assert key == (
        "prefix/app/segments/p0/00000000000000001234"
        "_txn000000000012-000000000040_ms1700000000000-1700000005000_snap.avro"
    )
    assert Segment.parse(ROOT, key, 55) == s
    # Keys of earlier builds, with the last offset, still parse, and name the same object.
    old = key.replace("1234_txn", "1234-00000000000000009876_txn")
    assert Segment.parse(ROOT, old, 55) == s and Segment.parse(ROOT, old).key(ROOT) == old  # type: ignore[union-attr]
    assert Segment.parse(ROOT, key.replace(".avro", ".tmp")) is None
    assert Segment.parse("prefix/other", key) is None
    snap = Snapshot(40, 1_700_000_005_000)
    assert Snapshot.parse(ROOT, snap.manifest_key(ROOT)) == snap
    assert Snapshot.parse(ROOT, snap.prefix(ROOT) + "db/@") is None
    keys = sorted(seg(a, b).key(ROOT) for a, b in ((100, 120), (1, 9), (10, 99)))
    assert [Segment.parse(ROOT, k).first_txn for k in keys] == [1, 10, 100]  # type: ignore[union-attr]


def records_of(txns: list[Transaction], start: int = 0) -> list[StreamRecord]:
    out, offset = [], start
    for txn in txns:
        for key, value in CODEC.transaction_records(txn):
            out.append(StreamRecord("pool.app", 0, offset, key, value, 1_000 + offset))
            offset += 1
        offset += 1  # the commit marker Kafka writes after a transaction
    return out


def txn(n: int, before: int, after: int, *, snap: bool = False, blocks: int = 2) -> Transaction:
    changes = [BlockWrite(1, i, bytes([n % 256]) * 64) for i in range(blocks)]
    return Transaction(
        "app",
        n,
        before,
        1_000_000 + n * 1000,
        changes,
        snapshot=snap,
        checksum_after=after,
        files=[FileLayout(1, 64, blocks)],
        change_count=blocks,
    )


def test_segment_file_is_byte_identical_when_rewritten_and_reads_back() -> None:
    recs = records_of([txn(1, 0, 11, snap=True), txn(2, 11, 22), txn(3, 22, 33)])

    def write() -> bytes:
        out = io.BytesIO()
        w = SegmentWriter(out, CODEC, "app", 0, recs[0].offset)
        for r in recs:
            w.write(r)
        w.close()
        return out.getvalue()

    first, second = write(), write()
    assert first == second
    back = list(read_segment(io.BytesIO(first), "app", "pool.app", "k"))
    assert back == recs
    with pytest.raises(PipelineError, match="belongs to database 'app', not 'other'"):
        list(read_segment(io.BytesIO(first), "other", "pool.other", "k"))
    broken = bytearray(first)
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(PipelineError):
        for r in read_segment(io.BytesIO(bytes(broken)), "app", "pool.app", "k"):
            CODEC.decode(r.value)


def test_framer_accepts_contiguous_txns_and_refuses_gaps_foreign_records_and_broken_counts() -> None:
    good = records_of([txn(1, 0, 11, snap=True), txn(2, 11, 22)])
    framer = Framer(CODEC, "app", None)
    done = []
    for r in good:
        if framer.begin(r) is None:
            t = framer.record(r)
            if t is not None:
                done.append((t.txn_id, t.checksum_after, t.end_offset))
    assert done == [(1, 11, good[4].offset), (2, 22, good[-1].offset)]  # blocks travel in one batch

    def feed(framer: Framer, recs: list[StreamRecord]) -> None:
        for r in recs:
            if framer.begin(r) is None:
                framer.record(r)

    with pytest.raises(PipelineError, match="txn id gap"):
        feed(Framer(CODEC, "app", Position(1, 11)), records_of([txn(3, 22, 33)]))
    with pytest.raises(PipelineError, match="diverged"):
        feed(Framer(CODEC, "app", Position(1, 11)), records_of([txn(2, 99, 33)]))
    with pytest.raises(PipelineError, match="foreign database 'app'"):
        feed(Framer(CODEC, "other", None), good)
    missing_change = [r for i, r in enumerate(records_of([txn(2, 11, 22)])) if i != 1]
    with pytest.raises(PipelineError, match="has 0 change records, commit says 1"):
        feed(Framer(CODEC, "app", Position(1, 11)), missing_change)
    # A snapshot may follow any earlier position (it is a full image).
    feed(Framer(CODEC, "app", Position(1, 11)), records_of([txn(5, 0, 55, snap=True)]))


def test_rotation_closes_on_count_bytes_record_time_and_before_snapshots() -> None:
    r = Rotation(max_txns=3, max_bytes=1000, max_span_ms=60_000)
    assert r.close_after(3, 10) and r.close_after(1, 1000) and not r.close_after(2, 999)
    assert r.close_before(2, 0, 60_000, False) and not r.close_before(2, 0, 59_999, False)
    assert r.close_before(1, 0, 1, True) and not r.close_before(0, 0, 1, True)
    assert SnapshotPolicy(10, 0).due(10, 0) and not SnapshotPolicy(10, 0).due(9, 10**12)
    assert not SnapshotPolicy(0, 0).due(10**9, 10**12)


def test_restore_plan_takes_the_newest_base_at_or_before_the_target() -> None:
    cat = Catalog("app", [seg(1, 10, snap=True), seg(11, 20), seg(21, 30), seg(31, 40)], [snapshot(20), snapshot(35)])
    p = cat.plan(txn=5)
    assert p.base is None and [s.first_txn for s in p.segments] == [1]
    p = cat.plan(txn=25)
    assert p.base == snapshot(20) and [s.first_txn for s in p.segments] == [21]
    p = cat.plan()
    assert p.target_txn == 40 and p.base == snapshot(35) and [s.first_txn for s in p.segments] == [31]
    p = cat.plan(txn=20)
    assert p.base == snapshot(20) and p.segments == []
    # By time: segments up to the one holding the boundary; the base must not be newer than the time.
    p = cat.plan(time_ms=1_000_000 + 26_500)
    assert p.base == snapshot(20) and [s.first_txn for s in p.segments] == [21]
    with pytest.raises(PipelineError, match="txn 41 .* not archived; restorable: txns 1-40"):
        cat.plan(txn=41)


def test_restore_plan_reports_gaps_and_unrestorable_ranges() -> None:
    cat = Catalog("app", [seg(1, 10, snap=True), seg(11, 20), seg(31, 40)], [])
    assert cat.restore_points() == [(1, 20)]
    with pytest.raises(PipelineError, match="txn 35 .* not archived; restorable: txns 1-20"):
        cat.plan(txn=35)
    with pytest.raises(PipelineError, match="falls in a gap of the archive after txn 20"):
        cat.plan(time_ms=1_000_000 + 25_000)
    with pytest.raises(PipelineError, match="overlapping segments"):
        Catalog("app", [seg(1, 10, snap=True), seg(5, 20)]).runs()
    with pytest.raises(PipelineError, match="nothing is archived"):
        Catalog("app").plan()
    # A later base snapshot makes the part after the gap restorable.
    cat = Catalog("app", [seg(1, 10, snap=True), seg(11, 20), seg(31, 40)], [snapshot(30)])
    assert cat.restore_points() == [(1, 20), (30, 40)]
    assert cat.plan(txn=35).base == snapshot(30)
    # Only a snapshot left (retention after a snapshot at the last txn): it is a restore point.
    cat = Catalog("app", [], [snapshot(120)])
    assert cat.describe_points() == "restorable: txn 120"
    with pytest.raises(PipelineError, match="txn 1 .* not archived; restorable: txn 120"):
        cat.plan(txn=1)
    assert cat.plan().base == snapshot(120)


def test_retention_never_deletes_what_a_retained_point_needs() -> None:
    cat = Catalog(
        "app",
        [seg(1, 10, snap=True), seg(11, 20), seg(21, 30), seg(31, 40)],
        [snapshot(15), snapshot(25), snapshot(35)],
    )
    plan = retention_plan(cat, keep_snapshots=2)
    assert plan.keep_from == snapshot(25)
    assert plan.delete_snapshots == [snapshot(15)]
    # Segment 21-30 holds txns 26-30, which restores after the kept snapshot 25 need.
    assert [s.first_txn for s in plan.delete_segments] == [1, 11]
    assert retention_plan(cat, keep_snapshots=5).delete_segments == []
    # A time window keeps the newest snapshot at or before its start.
    plan = retention_plan(cat, keep_ms=12_000, now_ms=1_000_000 + 40_000)
    assert plan.keep_from == snapshot(25)
    plan = retention_plan(cat, keep_ms=100_000, now_ms=1_000_000 + 40_000)
    assert plan.keep_from is None and plan.delete_segments == []
    # Both: the older bound wins.
    plan = retention_plan(cat, keep_snapshots=1, keep_ms=12_000, now_ms=1_000_000 + 40_000)
    assert plan.keep_from == snapshot(25)
    with pytest.raises(PipelineError, match="keep at least one"):
        retention_plan(cat, keep_snapshots=0)
