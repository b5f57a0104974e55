"""The archiver and restore against a directory store: exactly once across kills, a second writer refused."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from connectors.s3.archiver import Archiver
from connectors.s3.restore import restore
from pipeline.archive import Rotation, Segment, SnapshotPolicy
from pipeline.checksum import RollingChecksum
from pipeline.codec import Codec, StreamRecord
from pipeline.errors import PipelineError
from pipeline.model import BlockWrite, FileLayout, Transaction
from schemas import load_schemas
from tests.dir_store import DirStore
from tests.unit.test_replica_crash_points import disk_state, expected_state, make_stream

DB = "archdb"
TOPIC = f"pool.{DB}"
CODEC = Codec(load_schemas())
TXNS = 10  # segments of 3 txns: [1-3] [4-6] [7-9] [10]


class Killed(BaseException):
    """A kill -9 of the archiver, simulated in-process."""


def records_of(txns: Iterable[Transaction], start: int = 0) -> list[StreamRecord]:
    """The committed Kafka records of `txns`, as the archiver reads them from the topic."""
    out: list[StreamRecord] = []
    for txn in txns:
        txn = dataclasses.replace(txn, changes=list(txn.changes))
        for key, value in CODEC.transaction_records(txn):
            offset = start + len(out)
            out.append(StreamRecord(TOPIC, 0, offset, key, value, 1_000_000 + offset))
    return out


def archiver(
    store: DirStore,
    work: Path,
    lines: list[str],
    *,
    every_txns: int = 0,
    max_txns: int = 3,
    max_bytes: int = 64 << 20,
    part_bytes: int = 16 << 20,
) -> Archiver:
    return Archiver(
        store,
        CODEC,
        rotation=Rotation(max_txns=max_txns, max_bytes=max_bytes),
        snapshots=SnapshotPolicy(every_txns, 0),
        work_dir=work,
        topic=TOPIC,
        log=lines.append,
        part_bytes=part_bytes,
    )


def archive(store: DirStore, work: Path, records: list[StreamRecord], **kw: int) -> list[str]:
    """One archiver run as `archive --once`: resume from the store, archive the rest, stop."""
    lines: list[str] = []
    a = archiver(store, work, lines, **kw)
    try:
        a.run(records[a.resume() :])
    finally:
        a.close()
    return lines


def dying(records: list[StreamRecord], after: int, until: Callable[[], bool] = lambda: True) -> Iterator[StreamRecord]:
    """The records up to `after`, then a kill (once `until()` holds: what the upload thread did by then)."""
    yield from records[:after]
    deadline = time.monotonic() + 10
    while not until() and time.monotonic() < deadline:
        time.sleep(0.01)
    raise Killed()


def archived_txn_ids(store: DirStore) -> list[int]:
    return [t for s in store.catalog().segments for t in range(s.first_txn, s.last_txn + 1)]


@pytest.fixture(scope="module")
def stream() -> tuple[list[Transaction], list[StreamRecord]]:
    txns = make_stream(TXNS, seed=5, database=DB)
    return txns, records_of(txns)


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, stream: tuple[list[Transaction], list[StreamRecord]]
) -> dict[str, bytes]:
    """The objects one uninterrupted run writes."""
    base = tmp_path_factory.mktemp("reference")
    store = DirStore(base / "store", DB)
    archive(store, base / "work", stream[1])
    return store.objects()


def test_one_run_writes_whole_contiguous_segments(reference: dict[str, bytes]) -> None:
    segs = sorted(s for key in reference if (s := Segment.parse(f"archive/{DB}", key)) is not None)
    assert [(s.first_txn, s.last_txn, s.starts_with_snapshot) for s in segs] == [
        (1, 3, True),
        (4, 6, False),
        (7, 9, False),
        (10, 10, False),
    ]
    assert len(reference) == 4


@pytest.mark.parametrize("kill_after", [1, 30, 55, -2])
def test_a_killed_archiver_resumes_from_what_the_store_holds_and_writes_each_txn_once(
    tmp_path: Path, stream: tuple[list[Transaction], list[StreamRecord]], reference: dict[str, bytes], kill_after: int
) -> None:
    records = stream[1]
    kill_after %= len(records)
    store = DirStore(tmp_path / "store", DB)
    lines: list[str] = []
    first = archiver(store, tmp_path / "work", lines)
    assert first.resume() == 0
    with pytest.raises(Killed):
        first.run(dying(records, kill_after))
    first.close()
    before = store.objects()
    assert set(before) <= set(reference) and all(before[k] == reference[k] for k in before)  # whole objects only
    second = archiver(store, tmp_path / "work", lines)
    try:
        offset = second.resume()
        if before:  # it reads Kafka from the offset after the last archived txn
            last = store.catalog().segments[-1]
            assert second.position is not None and second.position.txn_id == last.last_txn
            assert records[offset - 1].key == b"txn" and offset > 0
        else:
            assert offset == 0 and second.position is None
        second.run(records[offset:])
    finally:
        second.close()
    assert store.objects() == reference  # same keys, same bytes: as if never killed
    assert archived_txn_ids(store) == list(range(1, TXNS + 1))


def test_rewriting_segments_already_stored_is_accepted_and_changes_nothing(
    tmp_path: Path, stream: tuple[list[Transaction], list[StreamRecord]], reference: dict[str, bytes]
) -> None:
    """A kill after an upload and before the offset commit: the same bytes are written again."""
    store = DirStore(tmp_path / "store", DB)
    archive(store, tmp_path / "work", stream[1])
    lines: list[str] = []
    again = archiver(store, tmp_path / "work", lines)  # no resume(): reads the topic from offset 0
    try:
        again.run(stream[1])
    finally:
        again.close()
    assert store.objects() == reference
    assert store.calls["put_new"] == 8  # every segment was offered twice, and kept once


def test_a_second_writer_with_different_bytes_is_refused(
    tmp_path: Path, stream: tuple[list[Transaction], list[StreamRecord]], reference: dict[str, bytes]
) -> None:
    txns = stream[0]
    store = DirStore(tmp_path / "store", DB)
    archive(store, tmp_path / "work", stream[1])
    # Another writer's txn 5: the same shape (so the same segment key), other block bytes.
    other = list(txns)
    other[4] = dataclasses.replace(
        txns[4],
        changes=[
            BlockWrite(c.file, c.index, bytes(reversed(c.data))) if isinstance(c, BlockWrite) else c
            for c in txns[4].changes
        ],
    )
    other_records = records_of(other)
    assert [r.offset for r in other_records] == [r.offset for r in stream[1]]
    lines: list[str] = []
    intruder = archiver(store, tmp_path / "other-work", lines)
    try:
        with pytest.raises(PipelineError, match="already exists with different content: is another archiver"):
            intruder.run(other_records)
    finally:
        intruder.close()
    assert store.objects() == reference  # the first writer's objects stand


def test_restore_of_the_archived_stream_gives_the_source_files_at_any_txn(
    tmp_path: Path, stream: tuple[list[Transaction], list[StreamRecord]]
) -> None:
    txns, records = stream
    store = DirStore(tmp_path / "store", DB)
    lines = archive(store, tmp_path / "work", records, every_txns=4)  # base snapshots after 4+ txns
    assert [s.txn for s in store.catalog().snapshots] == [6, 10], lines
    for txn, base in ((None, 10), (2, None), (5, None), (6, 6), (8, 6)):
        events: list[dict] = []
        target = tmp_path / f"restored-{txn}"
        position = restore(store, CODEC, target, txn=txn, topic=TOPIC, progress=events.append)
        want = txn or TXNS
        assert position == txns[want - 1].after
        plan = next(e["plan"] for e in events if "plan" in e)
        assert (plan.base.txn if plan.base else None) == base
        assert disk_state(target) == expected_state(txns, want), f"restore of txn {txn}"
        assert sorted(p.name for p in target.iterdir()) == ["blob", "db"]  # a plain pool: no replica state


def test_restore_refuses_a_txn_that_is_not_archived_and_leaves_the_target_untouched(
    tmp_path: Path, stream: tuple[list[Transaction], list[StreamRecord]]
) -> None:
    store = DirStore(tmp_path / "store", DB)
    archive(store, tmp_path / "work", records_of(stream[0][:7]))  # the tail is not archived
    have = archived_txn_ids(store)[-1]
    assert have == 7
    with pytest.raises(PipelineError, match=f"txn {have + 1} .*is not archived"):
        restore(store, CODEC, tmp_path / "target", txn=have + 1, topic=TOPIC)
    assert not (tmp_path / "target").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".target")] == []


# --- multipart: a transaction bigger than a part ------------------------------------------------


BIG_BLOCKS = 1400  # random 4 KiB blocks: a 5.5 MiB snapshot txn that stays over the 5 MiB part compressed
PART = 5 << 20


@pytest.fixture(scope="module")
def big_stream() -> tuple[list[Transaction], list[StreamRecord]]:
    rng = random.Random(9)
    rolling = RollingChecksum()
    layout = [FileLayout(0, 4096, BIG_BLOCKS)]
    changes = []
    for i in range(BIG_BLOCKS):
        changes.append(BlockWrite(0, i, rng.randbytes(4096)))
        rolling.set_block(0, i, changes[-1].data)
    txns = [
        Transaction(
            DB, 1, 0, 1_000, changes, snapshot=True, checksum_after=rolling.value, files=layout, change_count=BIG_BLOCKS
        )
    ]
    for n in (2, 3, 4):
        before = rolling.value
        changes = [BlockWrite(0, n, rng.randbytes(4096))]
        rolling.set_block(0, n, changes[0].data)
        txns.append(
            Transaction(DB, n, before, 1_000 + n, changes, checksum_after=rolling.value, files=layout, change_count=1)
        )
    return txns, records_of(txns)


def test_a_kill_during_a_multipart_upload_leaves_an_unfinished_upload_the_next_run_aborts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, big_stream: tuple[list[Transaction], list[StreamRecord]]
) -> None:
    txns, records = big_stream
    reference = DirStore(tmp_path / "reference", DB)
    archive(reference, tmp_path / "ref-work", records, max_txns=2, max_bytes=PART, part_bytes=PART)
    assert reference.calls["complete_new"] == 1 and reference.calls["upload_part"] >= 2  # streamed in parts

    store = DirStore(tmp_path / "store", DB)
    monkeypatch.setattr(store, "abort_upload", lambda key, upload_id: None)  # a kill runs no cleanup
    lines: list[str] = []
    first = archiver(store, tmp_path / "work", lines, max_txns=2, max_bytes=PART, part_bytes=PART)
    assert first.resume() == 0
    commit_of_snapshot = next(r.offset for r in records[1:] if r.key == b"txn")
    with pytest.raises(Killed):
        # Killed before the snapshot txn's commit record, once its first part is up.
        first.run(dying(records, commit_of_snapshot, until=lambda: store.calls.get("upload_part", 0) >= 1))
    first.close()
    monkeypatch.undo()
    assert store.objects() == {} and len(store.unfinished_uploads()) == 1

    lines.clear()
    second = archiver(store, tmp_path / "work", lines, max_txns=2, max_bytes=PART, part_bytes=PART)
    try:
        assert second.resume() == 0
        assert store.unfinished_uploads() == []
        assert any("aborting the unfinished upload" in line for line in lines), lines
        second.run(records)
    finally:
        second.close()
    assert store.objects() == reference.objects()
    assert archived_txn_ids(store) == [t.txn_id for t in txns]
    position = restore(store, CODEC, tmp_path / "restored", topic=TOPIC)
    assert position == txns[-1].after


def test_the_dir_store_and_the_s3_store_both_implement_the_store_protocol() -> None:
    import inspect

    from connectors.s3.store import ArchiveStore, Store

    members = [n for n in vars(Store) if not n.startswith("_")]
    assert {"put_new", "complete_new", "unfinished_uploads", "download", "catalog"} <= set(members)
    for cls in (DirStore, ArchiveStore):
        for name in members:
            ours, theirs = getattr(Store, name), getattr(cls, name, None)
            assert theirs is not None, f"{cls.__name__} lacks {name}"
            if inspect.isfunction(ours):
                assert list(inspect.signature(theirs).parameters) == list(inspect.signature(ours).parameters), (
                    f"{cls.__name__}.{name}"
                )
