"""Compaction of archived segments: which merges are due, and exactly once across crashes and concurrent restores."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.s3.compactor import compact, merge
from connectors.s3.restore import restore
from pipeline.archive import Catalog, CompactionPolicy, Segment, compaction_plan, retention_plan
from pipeline.errors import PipelineError
from pipeline.model import Transaction
from tests.dir_store import DirStore
from tests.unit.test_archiver_dir_store import CODEC, DB, TOPIC, archive, archiver, records_of
from tests.unit.test_replica_crash_points import disk_state, expected_state, make_stream

ROOT = "prefix/app"


def seg(first: int, last: int, ms: int, *, level: int = 0, snap: bool = False, size: int = 100) -> Segment:
    return Segment(first, last, first * 10, ms, ms + (last - first), 0, snap, size, level)


def ranges(plan: list) -> list[tuple[int, list[tuple[int, int]]]]:
    return [(c.level, [(s.first_txn, s.last_txn) for s in c.sources]) for c in plan]


# --- the plan (pure) --------------------------------------------------------------------------------


def test_a_window_merges_once_the_next_stored_segment_continues_it_and_not_before() -> None:
    policy = CompactionPolicy((10, 100))
    # One-txn segments at ms 0..24: windows [0,10) and [10,20) are closed, [20,30) is the head.
    segs = [seg(t + 1, t + 1, t) for t in range(25)]
    plan = compaction_plan(Catalog(DB, segs), policy)
    assert ranges(plan) == [
        (1, [(t, t) for t in range(1, 11)]),
        (1, [(t, t) for t in range(11, 21)]),
    ]
    # A segment still uploading (txn 15 missing) keeps what comes before it from merging; 16-20 are
    # all stored (21 continues them), so they may.
    holey = [s for s in segs if s.first_txn != 15]
    assert ranges(compaction_plan(Catalog(DB, holey), policy)) == [
        (1, [(t, t) for t in range(1, 11)]),
        (1, [(t, t) for t in range(16, 21)]),
    ]
    # Nothing after the newest window: it stays as it is.
    assert compaction_plan(Catalog(DB, segs[:10]), policy) == []


def test_higher_levels_take_whole_closed_windows_and_lower_levels_the_rest() -> None:
    policy = CompactionPolicy((10, 100))
    l1 = [seg(1 + 10 * w, 10 + 10 * w, 10 * w, level=1) for w in range(10)]  # ms 0..99: one level-2 window
    head = [seg(101 + t, 101 + t, 100 + t) for t in range(15)]  # ms 100..114
    plan = compaction_plan(Catalog(DB, l1 + head), policy)
    assert ranges(plan) == [
        (2, [(s.first_txn, s.last_txn) for s in l1]),
        (1, [(t, t) for t in range(101, 111)]),
    ]
    assert plan[0].target.level == 2 and (plan[0].target.first_txn, plan[0].target.last_txn) == (1, 100)


def test_a_snapshot_starts_a_group_and_the_size_cap_splits_one() -> None:
    policy = CompactionPolicy((10,), max_bytes=350)
    segs = [seg(t + 1, t + 1, t, snap=t == 4) for t in range(11)]
    assert ranges(compaction_plan(Catalog(DB, segs), policy)) == [
        (1, [(1, 1), (2, 2), (3, 3), (4, 4)][:3]),  # 3 x 100 bytes fit under 350; txn 4 alone is no merge
        (1, [(5, 5), (6, 6), (7, 7)]),  # the snapshot txn 5 starts the next group
        (1, [(8, 8), (9, 9), (10, 10)]),
    ]
    assert compaction_plan(Catalog(DB, segs), policy)[1].target.starts_with_snapshot


def test_a_listing_with_a_merged_segment_and_its_sources_reads_each_txn_once() -> None:
    merged = seg(1, 3, 0, level=1, snap=True)
    catalog = Catalog(DB, [seg(1, 1, 0, snap=True), merged, seg(2, 2, 1), seg(3, 3, 2), seg(4, 4, 3)])
    assert [(s.first_txn, s.last_txn) for s in catalog.segments] == [(1, 3), (4, 4)]
    assert sorted((s.first_txn, s.last_txn) for s in catalog.superseded) == [(1, 1), (2, 2), (3, 3)]
    assert catalog.runs() and catalog.plan().segments == catalog.segments
    # Retention deletes leftovers too, whatever the policy keeps.
    keep = retention_plan(Catalog(DB, list(catalog.segments) + catalog.superseded), keep_snapshots=1)
    assert keep.delete_segments == []  # no snapshot: nothing can be the oldest point yet


def test_level_keys_round_trip_and_old_keys_are_level_zero() -> None:
    s = seg(12, 40, 1_700_000_000_000, level=2, snap=True)
    key = s.key(ROOT)
    assert key.endswith("_L2_snap.avro")
    parsed = Segment.parse(ROOT, key, 100)
    assert parsed == s and parsed is not None and parsed.level == 2
    assert Segment.parse(ROOT, seg(1, 1, 5).key(ROOT)).level == 0  # type: ignore[union-attr]


def test_bad_windows_are_refused() -> None:
    with pytest.raises(PipelineError, match="positive and growing"):
        CompactionPolicy((3600, 60))


# --- against a store ----------------------------------------------------------------------------------

TXNS = 14
POLICY = CompactionPolicy((4, 12))  # txn t is at 1000 + t ms (make_stream)


@pytest.fixture(scope="module")
def txns() -> list[Transaction]:
    return make_stream(TXNS, seed=11, database=DB)


def one_txn_segments(tmp_path: Path, txns: list[Transaction]) -> DirStore:
    store = DirStore(tmp_path / "store", DB)
    archive(store, tmp_path / "work", records_of(txns), max_txns=1)
    assert len(store.catalog().segments) == TXNS
    return store


def restored(store: DirStore, tmp_path: Path, txn: int, name: str) -> tuple[dict, dict]:
    target = tmp_path / name
    restore(store, CODEC, target, txn=txn, topic=TOPIC)
    return disk_state(target)


def test_compaction_keeps_every_restore_point_with_fewer_objects(tmp_path: Path, txns: list[Transaction]) -> None:
    store = one_txn_segments(tmp_path, txns)
    lines: list[str] = []
    merged = compact(store, CODEC, TOPIC, tmp_path / "work", POLICY, lines.append)
    catalog = store.catalog()
    # Txn t is at 1000 + t ms: txns 1-7 fill the 12-ms window [996, 1008), closed by txn 8; in the
    # head window the 4-ms window [1008, 1012) is closed by txn 12, and 12-14 wait for more.
    assert [(s.first_txn, s.last_txn, s.level) for s in catalog.segments] == [
        (1, 7, 2),
        (8, 11, 1),
        (12, 12, 0),
        (13, 13, 0),
        (14, 14, 0),
    ]
    assert len(catalog.segments) < TXNS and merged and not catalog.superseded, lines
    assert [t for s in catalog.segments for t in range(s.first_txn, s.last_txn + 1)] == list(range(1, TXNS + 1))
    for txn in (1, 2, 7, TXNS):
        assert restored(store, tmp_path, txn, f"r{txn}") == expected_state(txns, txn)
    # A second pass finds nothing more to do; the archiver resumes after the last txn.
    assert compact(store, CODEC, TOPIC, tmp_path / "work", POLICY, lines.append) == []
    a = archiver(store, tmp_path / "work", [])
    try:
        assert a.resume() == len(records_of(txns)) and a.position == txns[-1].after
    finally:
        a.close()


def test_a_crash_between_writing_the_merge_and_deleting_its_sources_changes_nothing_readers_see(
    tmp_path: Path, txns: list[Transaction]
) -> None:
    store = one_txn_segments(tmp_path, txns)
    job = compaction_plan(store.catalog(), POLICY)[0]
    merge(store, CODEC, TOPIC, tmp_path / "work", job)  # ... and the compactor dies here
    store.delete([job.sources[0].key(store.root)])  # or here, part way through deleting
    catalog = store.catalog()
    assert len(catalog.superseded) == len(job.sources) - 1
    assert [t for s in catalog.segments for t in range(s.first_txn, s.last_txn + 1)] == list(range(1, TXNS + 1))
    assert restored(store, tmp_path, 5, "mid") == expected_state(txns, 5)
    # The next pass deletes the leftovers and goes on; the result is what one clean pass gives.
    compact(store, CODEC, TOPIC, tmp_path / "work", POLICY, lambda line: None)
    clean = one_txn_segments(tmp_path / "clean", txns)
    compact(clean, CODEC, TOPIC, tmp_path / "clean-work", POLICY, lambda line: None)
    assert store.objects() == clean.objects()


def test_a_restore_that_planned_before_a_compaction_lists_again_and_ends_equal(
    tmp_path: Path, txns: list[Transaction]
) -> None:
    store = one_txn_segments(tmp_path, txns)

    class CompactingStore(DirStore):
        """Compaction runs right after the restore downloaded its first segment."""

        compacted = False

        def download(self, key, path, on_bytes=None):  # type: ignore[no-untyped-def]
            super().download(key, path, on_bytes)
            if "/segments/" in key and not self.compacted:
                self.compacted = True
                compact(store, CODEC, TOPIC, tmp_path / "work", POLICY, lambda line: None)

    racing = CompactingStore(store.base, DB)
    assert restored(racing, tmp_path, TXNS, "raced") == expected_state(txns, TXNS)
    assert racing.compacted and any(s.level for s in store.catalog().segments)


def test_a_merge_whose_sources_do_not_hold_the_txns_their_keys_name_writes_nothing(
    tmp_path: Path, txns: list[Transaction]
) -> None:
    store = one_txn_segments(tmp_path, txns)
    job = compaction_plan(store.catalog(), POLICY)[0]
    # A source replaced by another txn's bytes under its key (a damaged archive).
    store.path(job.sources[1].key(store.root)).write_bytes(store.path(job.sources[2].key(store.root)).read_bytes())
    before = store.objects()
    with pytest.raises(PipelineError, match="txn id gap|not the whole txns"):
        merge(store, CODEC, TOPIC, tmp_path / "work", job)
    assert store.objects() == before


def test_the_archiver_compacts_as_it_goes_and_every_txn_stays_archived_once(
    tmp_path: Path, txns: list[Transaction]
) -> None:
    store = DirStore(tmp_path / "store", DB)
    lines: list[str] = []
    a = archiver(store, tmp_path / "work", lines, max_txns=1)
    a.compaction, a.compact_every = POLICY, 0.0
    try:
        a.run(records_of(txns)[a.resume() :])
    finally:
        a.close()
    catalog = store.catalog()
    assert any("compacted" in line for line in lines), lines
    assert any(s.level for s in catalog.segments) and not catalog.superseded
    assert [t for s in catalog.segments for t in range(s.first_txn, s.last_txn + 1)] == list(range(1, TXNS + 1))
    assert restored(store, tmp_path, TXNS, "end") == expected_state(txns, TXNS)
