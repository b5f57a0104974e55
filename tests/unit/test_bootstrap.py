"""replica --archive without a network: bootstrap() against a directory store, a kill while adopting, the plan."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connectors.picolisp import replica as replica_module
from connectors.picolisp.replica import ReplicaDir
from connectors.s3.restore import bootstrap
from pipeline.archive import Catalog, Segment, Snapshot
from pipeline.codec import StreamRecord
from pipeline.model import Transaction
from pipeline.replicate import replicate
from tests.dir_store import DirStore
from tests.unit.test_archiver_dir_store import CODEC, DB, TOPIC, TXNS, archive, records_of
from tests.unit.test_replica_crash_points import ListSource, disk_state, expected_state, make_stream


class Killed(BaseException):
    """A kill -9, simulated in-process."""


def open_replica(root: Path) -> ReplicaDir:
    return ReplicaDir(f"{root / 'db'}/", DB, root / "blob")


def apply_all(root: Path, txns: list[Transaction]) -> None:
    sink = open_replica(root)
    try:
        replicate(ListSource(txns), sink)
    finally:
        sink.close()


@pytest.fixture(scope="module")
def stream() -> tuple[list[Transaction], list[StreamRecord]]:
    txns = make_stream(TXNS, seed=7, database=DB)
    return txns, records_of(txns)


def commit_offset(records: list[StreamRecord], txn_id: int) -> int:
    """The offset of txn `txn_id`'s TxnCommit: the records are TxnBegin ... TxnCommit per txn, in order."""
    commits = [r.offset for r in records if r.key == b"txn"][1::2]
    return commits[txn_id - 1]


def test_an_empty_replica_restores_the_newest_base_and_segments_and_knows_the_next_offset(
    tmp_path: Path, stream: tuple[list[Transaction], list[StreamRecord]]
) -> None:
    txns, records = stream
    store = DirStore(tmp_path / "store", DB)
    archive(store, tmp_path / "work", records, every_txns=4)
    assert [s.txn for s in store.catalog().snapshots] == [6, 10]
    sink = open_replica(tmp_path / "rpl")
    try:
        events: list[dict] = []
        position = bootstrap(store, CODEC, sink, TOPIC, progress=events.append)
        assert position == sink.position() == txns[-1].after
        assert sink.next_offset == commit_offset(records, TXNS) + 1  # Kafka continues right after it
        assert next(e["plan"] for e in events if "plan" in e).base.txn == 10  # the newest base
        assert not sink.bootstrap_dir.exists()
    finally:
        sink.close()
    assert disk_state(tmp_path / "rpl") == expected_state(txns, TXNS)
    reopened = open_replica(tmp_path / "rpl")  # its files match its position
    assert reopened.position() == txns[-1].after
    reopened.close()


def test_a_replica_at_a_txn_applies_the_archived_segments_after_it(
    tmp_path: Path, stream: tuple[list[Transaction], list[StreamRecord]]
) -> None:
    txns, records = stream
    store = DirStore(tmp_path / "store", DB)
    archive(store, tmp_path / "work", records, every_txns=4)
    apply_all(tmp_path / "rpl", txns[:2])
    sink = open_replica(tmp_path / "rpl")
    try:
        assert bootstrap(store, CODEC, sink, TOPIC) == txns[-1].after
        assert sink.next_offset == commit_offset(records, TXNS) + 1
    finally:
        sink.close()
    assert disk_state(tmp_path / "rpl") == expected_state(txns, TXNS)


def test_nothing_usable_in_the_archive_changes_nothing(
    tmp_path: Path, stream: tuple[list[Transaction], list[StreamRecord]]
) -> None:
    txns, records = stream
    empty = DirStore(tmp_path / "empty", DB)
    sink = open_replica(tmp_path / "new")
    assert bootstrap(empty, CODEC, sink, TOPIC) is None and sink.position().txn_id == 0
    sink.close()
    store = DirStore(tmp_path / "store", DB)
    archive(store, tmp_path / "work", records_of(txns[:5]))  # txns 1-5
    apply_all(tmp_path / "ahead", txns[:6])
    sink = open_replica(tmp_path / "ahead")
    assert bootstrap(store, CODEC, sink, TOPIC) is None and sink.position() == txns[5].after
    sink.close()


@pytest.mark.parametrize("kill_at", [1, 2, 4, 6, 99])
def test_a_kill_while_adopting_is_finished_by_the_next_open(
    tmp_path: Path, stream: tuple[list[Transaction], list[StreamRecord]], monkeypatch: pytest.MonkeyPatch, kill_at: int
) -> None:
    """Killed at the kill_at-th rename of adopt() (99: after all of them, before the marker goes)."""
    txns, records = stream
    store = DirStore(tmp_path / "store", DB)
    archive(store, tmp_path / "work", records, every_txns=4)
    calls = [0]
    adopting = [False]
    real_replace, real_unlink, real_adopt = os.replace, Path.unlink, ReplicaDir._adopt

    def replace(src: object, dst: object) -> None:
        if adopting[0]:
            calls[0] += 1
            if calls[0] == kill_at:
                raise Killed()
        real_replace(src, dst)  # type: ignore[arg-type]

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if adopting[0] and kill_at == 99 and self.name == "adopt":
            raise Killed()
        real_unlink(self, missing_ok=missing_ok)

    def adopt(self: ReplicaDir) -> None:
        adopting[0] = True
        try:
            real_adopt(self)
        finally:
            adopting[0] = False

    sink = open_replica(tmp_path / "rpl")
    monkeypatch.setattr(replica_module.os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(ReplicaDir, "_adopt", adopt)
    with pytest.raises(Killed):
        bootstrap(store, CODEC, sink, TOPIC)
    monkeypatch.undo()
    sink.close()
    assert (sink.state / "adopt").exists()  # past the commit point
    reopened = open_replica(tmp_path / "rpl")
    try:
        assert reopened.position() == txns[-1].after
        assert reopened.next_offset == commit_offset(records, TXNS) + 1
        assert not reopened.bootstrap_dir.exists() and not (reopened.state / "adopt").exists()
    finally:
        reopened.close()
    assert disk_state(tmp_path / "rpl") == expected_state(txns, TXNS)


def test_a_kill_before_adopting_leaves_an_empty_replica_and_the_next_run_reuses_the_restored_copy(
    tmp_path: Path, stream: tuple[list[Transaction], list[StreamRecord]], monkeypatch: pytest.MonkeyPatch
) -> None:
    txns, records = stream
    store = DirStore(tmp_path / "store", DB)
    archive(store, tmp_path / "work", records, every_txns=4)
    sink = open_replica(tmp_path / "rpl")

    def killed(self: object, checksum: object = None) -> None:
        raise Killed()

    monkeypatch.setattr(replica_module.ReplicaDir, "adopt", killed)
    with pytest.raises(Killed):
        bootstrap(store, CODEC, sink, TOPIC)
    monkeypatch.undo()
    sink.close()
    sink = open_replica(tmp_path / "rpl")
    try:
        assert sink.position().txn_id == 0 and sink.bootstrap_dir.exists()
        downloads = store.calls.get("download", 0)
        assert bootstrap(store, CODEC, sink, TOPIC) == txns[-1].after
        assert store.calls.get("download", 0) == downloads  # the restored copy was complete: reused
    finally:
        sink.close()
    assert disk_state(tmp_path / "rpl") == expected_state(txns, TXNS)


def test_continuing_plans_the_segments_after_a_txn_within_its_run() -> None:
    segs = [Segment(1, 3, 0, 0, 0, starts_with_snapshot=True), Segment(4, 6, 9, 0, 0), Segment(9, 12, 30, 0, 0)]
    catalog = Catalog(DB, segs, [])
    plan = catalog.continuing(4)
    assert plan is not None and plan.base is None and plan.segments == segs[1:2]
    assert catalog.continuing(0) is not None and catalog.continuing(0).segments == segs[:2]  # type: ignore[union-attr]
    assert catalog.continuing(6) is None  # txn 7 is in a gap of the archive
    assert catalog.continuing(8) is not None and catalog.continuing(8).segments == segs[2:]  # type: ignore[union-attr]
    assert catalog.continuing(12) is None  # the archive has not reached txn 13


def test_behind_says_the_newest_archived_txn_and_how_far_the_source_is_ahead() -> None:
    assert Catalog(DB).behind(7, 5_000) == {
        "archived_txn": None,
        "archived_time_ms": None,
        "behind_txns": 7,
        "behind_seconds": None,
    }
    catalog = Catalog(DB, [Segment(1, 3, 0, 1_000, 2_000), Segment(4, 6, 9, 2_500, 3_000)], [Snapshot(6, 3_000)])
    assert catalog.newest() == (6, 3_000)
    assert catalog.behind(10, 4_500) == {
        "archived_txn": 6,
        "archived_time_ms": 3_000,
        "behind_txns": 4,
        "behind_seconds": 1.5,
    }
    assert catalog.behind(6, 3_000)["behind_txns"] == 0 and catalog.behind(6, 3_000)["behind_seconds"] == 0.0
