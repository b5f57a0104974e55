"""Window statistics (pipeline/stats.py): closing rules, replay from a window boundary, percentiles, hottest blocks."""

from __future__ import annotations

import random

import pytest

from pipeline import stats
from pipeline.codec import Codec, StreamRecord
from pipeline.errors import PipelineError
from pipeline.model import BlobChunk, BlobDelete, BlockWrite, FileLayout, Transaction
from pipeline.stats import HotBlock, TxnSummary, Windows, percentile, stats_topic, summarize
from schemas import load_schemas

DB = "app"
T0 = 1_700_000_000_000


def txn(txn_id: int, t_ms: int, changes: list, *, snapshot: bool = False, publish_ms: int | None = None) -> TxnSummary:
    """Summary of a transaction read from offsets 10*id .. 10*id+9, published `publish_ms` (default +5 ms) later."""
    t = Transaction(DB, txn_id, 0, t_ms, iter(changes), snapshot=snapshot, offset=10 * txn_id)
    t.end_offset = 10 * txn_id + 9  # what the codec fills in once the changes are read
    return summarize(t, t_ms + 5 if publish_ms is None else publish_ms)


def block(file: int, index: int, size: int = 64) -> BlockWrite:
    return BlockWrite(file, index, bytes(size))


def stream(n: int, seed: int = 1, step_ms: int = 70) -> list[TxnSummary]:
    rng = random.Random(seed)
    out = []
    for i in range(1, n + 1):
        changes: list = [
            block(rng.randrange(3), rng.randrange(8), 64 << rng.randrange(3)) for _ in range(rng.randrange(1, 6))
        ]
        if i % 5 == 0:
            changes += [BlobChunk(f"d/{i}", 700, "0" * 64, k, 2, bytes(350)) for k in range(2)]
        if i % 9 == 0:
            changes.append(BlobDelete(f"d/{i - 5}"))
        out.append(txn(i, T0 + i * step_ms + rng.randrange(40), changes, publish_ms=T0 + i * step_ms + 100 + i % 17))
    return out


def test_a_window_is_emitted_only_when_a_later_window_starts() -> None:
    w = Windows(DB, window_ms=1000)
    assert w.add(txn(1, T0 + 10, [block(0, 1)])) is None
    assert w.add(txn(2, T0 + 990, [block(0, 1), block(1, 2, 128)])) is None
    closed = w.add(txn(3, T0 + 1000, [block(0, 3)]))
    assert closed is not None and (closed.first_txn, closed.last_txn, closed.txns) == (1, 2, 2)
    assert (closed.window_start_ms, closed.window_ms, closed.first_offset, closed.end_offset) == (T0, 1000, 10, 29)
    assert closed.blocks == 3 and closed.block_bytes == 64 + 64 + 128
    assert [(f.file, f.blocks, f.bytes) for f in closed.files] == [(0, 2, 128), (1, 1, 128)]
    assert closed.key == f"{DB}/{T0}".encode()
    assert closed.last_source_time_ms == T0 + 990
    # Empty windows in between are skipped; the open window (txn 3) only closes with txn 4.
    closed = w.add(txn(4, T0 + 5500, []))
    assert closed is not None and (closed.window_start_ms, closed.first_txn, closed.last_txn) == (T0 + 1000, 3, 3)
    assert w.open is not None and w.open.start_ms == T0 + 5000


def test_resuming_at_any_emitted_window_boundary_rebuilds_identical_windows() -> None:
    """What a restarted consumer does: start at the txn after the last emitted window, rebuild the rest."""
    txns = stream(300)
    full = Windows(DB, 500).add_all(txns)
    assert len(full) > 20
    for cut in (0, 1, 7, len(full) // 2, len(full) - 1):
        first = full[cut - 1].last_txn if cut else 0  # the committed offset points just after it
        resumed = Windows(DB, 500).add_all(t for t in txns if t.txn_id > first)
        assert resumed == full[cut:], f"resume after window {cut} differs"


def test_counts_sizes_blobs_and_lag() -> None:
    w = Windows(DB, 1000)
    w.add(
        txn(
            1,
            T0,
            [
                block(0, 1),
                BlobChunk("a.doc", 900, "0" * 64, 0, 2, bytes(512)),
                BlobChunk("a.doc", 900, "0" * 64, 1, 2, bytes(388)),
            ],
            publish_ms=T0 + 30,
        )
    )
    w.add(txn(2, T0 + 1, [BlobDelete("b.doc"), block(2, 0, 256)], publish_ms=T0 + 11))
    w.add(txn(3, T0 + 2, [BlobChunk("c.doc", 0, "0" * 64, 0, 1, b"")], publish_ms=T0 + 2))
    s = w.add(txn(4, T0 + 1000, []))
    assert s is not None
    assert (s.blob_bytes, s.blob_chunks, s.blobs_written, s.blob_deletes) == (900, 3, 2, 1)
    assert s.bytes == 64 + 256 + 900 and s.txns == 3
    assert (s.txn_bytes_p50, s.txn_bytes_p99, s.txn_bytes_max) == (256, 964, 964)
    assert (s.capture_lag_ms_p50, s.capture_lag_ms_p99, s.capture_lag_ms_max) == (10, 30, 30)


def test_hottest_blocks_ordered_by_writes_then_address_and_snapshots_not_counted() -> None:
    w = Windows(DB, 1000, top_blocks=3)
    w.add(txn(1, T0, [block(f, i) for f in range(2) for i in range(50)], snapshot=True))
    w.add(txn(2, T0 + 1, [block(1, 7), block(0, 9)]))
    w.add(txn(3, T0 + 2, [block(1, 7), block(0, 3), block(0, 9)]))
    w.add(txn(4, T0 + 3, [block(1, 7), block(0, 2)]))
    s = w.add(txn(5, T0 + 2000, [block(0, 0)]))
    assert s is not None and s.snapshots == 1 and s.blocks == 100 + 7
    assert s.hottest_blocks == (HotBlock(1, 7, 3), HotBlock(0, 9, 2), HotBlock(0, 2, 1))


def test_hot_blocks_counted_in_small_batches_give_the_same_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A window counts block writes in bulk, every HIT_BATCH blocks: where the batches end must not matter."""
    summaries = stream(400)
    whole = Windows(DB, window_ms=1000, top_blocks=5).add_all(summaries)
    monkeypatch.setattr(stats, "HIT_BATCH", 3)
    assert Windows(DB, window_ms=1000, top_blocks=5).add_all(summaries) == whole
    assert len(whole) > 10 and all(len(w.hottest_blocks) == 5 for w in whole)


def test_source_clock_stepping_back_counts_in_the_open_window() -> None:
    w = Windows(DB, 1000)
    w.add(txn(1, T0 + 1500, [block(0, 1)]))
    assert w.add(txn(2, T0 + 200, [block(0, 2)])) is None  # earlier window: stays in the open one
    s = w.add(txn(3, T0 + 2100, []))
    assert s is not None and s.window_start_ms == T0 + 1000 and s.txns == 2


def test_a_stream_going_backwards_or_foreign_is_refused_with_context() -> None:
    w = Windows(DB, 1000)
    w.add(txn(5, T0, []))
    with pytest.raises(PipelineError, match=r"txn 5 after txn 5.*database=app txn=5 offset=50"):
        w.add(txn(5, T0, []))
    other = Transaction("other", 6, 0, T0, iter(()), offset=60)
    other.end_offset = 61
    with pytest.raises(PipelineError, match="database 'other'"):
        w.add(summarize(other, T0))
    with pytest.raises(PipelineError, match="window must be at least 1 ms"):
        Windows(DB, 0)


def test_summarize_needs_offsets_and_reads_the_changes_once() -> None:
    t = Transaction(DB, 1, 0, T0, iter([block(0, 1)]))
    with pytest.raises(PipelineError, match="no offsets"):
        summarize(t, T0)


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) == 0
    assert percentile([7], 99) == 7
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50, 99, 100)
    assert percentile([5, 1, 3], 50) == 3


def test_window_stats_round_trip_through_the_avro_schema() -> None:
    codec = Codec(load_schemas())
    for s in Windows(DB, 700).add_all(stream(120)):
        name, record = codec.decode(codec.encode("pool.pipeline.WindowStats", s.to_record()))
        assert name == "pool.pipeline.WindowStats"
        assert type(s).from_record(record) == s


def test_stats_topic_must_end_in_dot_stats() -> None:
    assert stats_topic("pool.app") == "pool.app.stats"
    assert stats_topic("pool.app", "{topic}.replay.stats") == "pool.app.replay.stats"
    assert stats_topic("pool.app", "stats.{database}.stats", "app") == "stats.app.stats"
    with pytest.raises(PipelineError, match="must end in"):
        stats_topic("pool.app", "{topic}.out")


def test_layout_is_not_needed_for_stats() -> None:
    """Stats use only what the changes carry; a transaction's trailer layout does not change them."""
    a = Transaction(DB, 1, 0, T0, iter([block(0, 1)]), files=[FileLayout(0, 64, 2)], offset=0)
    b = Transaction(DB, 1, 0, T0, iter([block(0, 1)]), offset=0)
    a.end_offset = b.end_offset = 3
    assert summarize(a, T0) == summarize(b, T0)


def test_a_summary_of_block_batches_equals_the_summary_of_their_blocks() -> None:
    """The analytics CLI reads BlockBatch changes whole (batches=True): the figures must not change."""
    codec = Codec(load_schemas())
    changes = (
        [BlockWrite(0, i, bytes([i]) * 64) for i in (5, 1, 9)]
        + [BlobChunk("d/1", 3, "0" * 64, 0, 1, b"abc")]
        + [BlockWrite(1, i, bytes(4096)) for i in range(70)]
        + [BlobDelete("d/2")]
    )
    t = Transaction(
        DB,
        4,
        0,
        T0,
        changes,
        files=[FileLayout(0, 64, 10), FileLayout(1, 4096, 70)],
        change_count=len(changes),
        checksum_after=1,
    )
    records = [StreamRecord("pool.app", 0, 100 + i, k, v) for i, (k, v) in enumerate(codec.transaction_records(t))]

    def summary(batches: bool) -> tuple[TxnSummary, list]:
        got = next(codec.read_transactions(records, DB, batches=batches))  # changes are read lazily
        kinds, inner = [], got.changes

        def seen():
            for change in inner:
                kinds.append(type(change).__name__)
                yield change

        got.changes = seen()
        return summarize(got, T0 + 5), kinds

    whole, whole_kinds = summary(True)
    split, split_kinds = summary(False)
    assert "BlockBatch" in whole_kinds and "BlockBatch" not in split_kinds
    assert whole == split
    assert whole.file_blocks == ((0, 3, 192), (1, 70, 70 * 4096))
    assert whole.blocks == ((0, (5, 1, 9)), (1, tuple(range(70))))


def test_summarize_refuses_what_is_not_a_change() -> None:
    t = Transaction(DB, 3, 0, T0, iter([block(0, 1), "not a change"]), offset=30)
    t.end_offset = 39
    with pytest.raises(PipelineError, match=r"summarize got a str, not a change.*txn=3"):
        summarize(t)
