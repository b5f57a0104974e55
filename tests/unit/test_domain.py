"""Domain rules: blob path safety, checksum algebra, and the replicate loop's gap/divergence checks."""

from __future__ import annotations

import pytest

from pipeline.checksum import RollingChecksum, block_hash, checksum_of
from pipeline.errors import PipelineError
from pipeline.model import BlockWrite, FileLayout, Position, Transaction, safe_blob_path
from pipeline.replicate import replicate


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "A/../../x", "A/./b", "", "a\\b", "A//b", "a\x00b", "..", "A/.."]
)
def test_escaping_blob_paths_are_rejected(path: str) -> None:
    with pytest.raises(PipelineError):
        safe_blob_path(path)


@pytest.mark.parametrize("path", ["A/1.doc", "A/1/234.doc", "1/234.doc", "A@/1.doc", "x..y/z"])
def test_normal_blob_paths_pass(path: str) -> None:
    assert safe_blob_path(path) == path


def test_rolling_checksum_equals_full_recomputation_and_is_order_free() -> None:
    rolling = RollingChecksum()
    image: dict[tuple[int, int], bytes] = {}
    for step in range(200):
        key = (step % 3, (step * 7) % 11)
        data = bytes([step % 256]) * 64
        rolling.set_block(*key, data)
        image[key] = data
    assert rolling.value == checksum_of((f, i, d) for (f, i), d in image.items())
    # the same block content at another place changes the sum
    assert block_hash(0, 1, b"a" * 64) != block_hash(0, 2, b"a" * 64) != block_hash(1, 1, b"a" * 64)


class ListSource:
    def __init__(self, txns: list[Transaction]) -> None:
        self.txns = txns
        self.acked: list[int] = []

    def transactions(self, after: Position):
        return iter(self.txns)

    def acknowledge(self, txn: Transaction) -> None:
        self.acked.append(txn.txn_id)


class MemorySink:
    def __init__(self) -> None:
        self.pos = Position(0, 0)
        self.applied: list[int] = []

    def position(self) -> Position:
        return self.pos

    def apply(self, txn: Transaction) -> None:
        list(txn.changes)
        self.applied.append(txn.txn_id)
        self.pos = txn.after


def t(txn_id: int, before: int, after: int) -> Transaction:
    return Transaction(
        "app",
        txn_id,
        before,
        0,
        [BlockWrite(0, 1, bytes(64))],
        checksum_after=after,
        files=[FileLayout(0, 64, 2)],
        change_count=1,
    )


def test_redelivered_transactions_are_skipped_exactly_once() -> None:
    source = ListSource([t(1, 0, 11), t(2, 11, 22), t(1, 0, 11), t(2, 11, 22), t(3, 22, 33)])
    sink = MemorySink()
    assert replicate(source, sink) == Position(3, 33)
    assert sink.applied == [1, 2, 3]
    assert source.acked == [1, 2, 3]


def test_gap_stops_before_applying() -> None:
    sink = MemorySink()
    with pytest.raises(PipelineError, match=r"txn id gap: replica is at txn 1, next record is txn 3") as exc:
        replicate(ListSource([t(1, 0, 11), t(3, 22, 33)]), sink)
    assert sink.applied == [1] and exc.value.txn_id == 3 and exc.value.database == "app"


def test_divergent_checksum_stops_before_applying() -> None:
    sink = MemorySink()
    with pytest.raises(PipelineError, match="diverged"):
        replicate(ListSource([t(1, 0, 11), t(2, 99, 22)]), sink)
    assert sink.applied == [1]


def test_error_text_names_database_txn_and_offset() -> None:
    err = PipelineError("boom", database="app", txn_id=5, offset=42)
    assert str(err) == "boom [database=app txn=5 offset=42]"
    assert not err.retriable


def test_a_snapshot_needs_no_continuity_but_must_move_forward() -> None:
    snap = Transaction(
        "app",
        7,
        999,
        0,
        [BlockWrite(0, 1, bytes(64))],
        snapshot=True,
        checksum_after=77,
        files=[FileLayout(0, 64, 2)],
        change_count=1,
    )
    sink = MemorySink()
    assert replicate(ListSource([t(1, 0, 11), snap, t(8, 77, 88)]), sink) == Position(8, 88)
    assert sink.applied == [1, 7, 8]
    old = Transaction("app", 1, 5, 0, [], snapshot=True, checksum_after=5, files=[FileLayout(0, 64, 2)])
    sink = MemorySink()
    replicate(ListSource([t(1, 0, 11), t(2, 11, 22), old]), sink)  # an older snapshot is a redelivery
    assert sink.applied == [1, 2]
