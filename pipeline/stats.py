"""Per-window statistics of a change stream, windowed by record time so that a replay gives identical output."""

from __future__ import annotations

import builtins
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain

from pipeline.errors import PipelineError
from pipeline.model import BlobChunk, BlobDelete, BlockBatch, BlockWrite, Transaction

STATS_SUFFIX = ".stats"
DEFAULT_WINDOW_MS = 60_000
DEFAULT_TOP_BLOCKS = 10
HIT_BATCH = 65_536  # blocks held before they are counted into a window's hits


@dataclass(slots=True)  # not frozen: one is built per transaction, and frozen construction is 3x slower
class TxnSummary:
    """What the statistics need from one transaction; its changes can be read only once, so they are summed here.

    `publish_time_ms` is the broker timestamp of the transaction's TxnCommit record: it comes from
    the topic, not from the analytics host's clock, so the lag derived from it replays identically.
    """

    database: str
    txn_id: int
    source_time_ms: int
    publish_time_ms: int
    offset: int
    end_offset: int
    snapshot: bool = False
    file_blocks: tuple[tuple[int, int, int], ...] = ()  # (file, blocks written, bytes), by file
    # (file, indexes of its blocks written, in order), by file; empty for a snapshot. Per file rather than a
    # pair per block, so that counting the hottest blocks runs in C (Counter.update on a list of ints).
    blocks: tuple[tuple[int, tuple[int, ...]], ...] = ()
    blob_bytes: int = 0
    blob_chunks: int = 0
    blobs_written: int = 0
    blob_deletes: int = 0

    @property
    def block_writes(self) -> int:
        return sum(n for _, n, _ in self.file_blocks)

    @property
    def block_bytes(self) -> int:
        return sum([b for _, _, b in self.file_blocks])

    @property
    def bytes(self) -> int:
        """Payload size of the transaction: block images plus blob content."""
        return self.block_bytes + self.blob_bytes

    @property
    def lag_ms(self) -> int:
        return self.publish_time_ms - self.source_time_ms


def summarize(txn: Transaction, publish_time_ms: int | None = None) -> TxnSummary:
    """Consume `txn.changes` and return its summary (the trailer is filled once the changes are exhausted).

    Without `publish_time_ms`, the transaction's own (filled in once its changes are read from a
    topic) is used, else its source time.
    """
    files: dict[int, list] = {}  # file -> [blocks written, bytes, their indexes]
    hot = not txn.snapshot  # a snapshot rewrites every block: that says nothing about which are hot
    blob_bytes = blob_chunks = blobs_written = blob_deletes = 0
    for change in txn.changes:
        if isinstance(change, BlockBatch):
            indexes: list[int] | tuple[int] = change.indexes
        elif isinstance(change, BlockWrite):
            indexes = (change.index,)
        elif isinstance(change, BlobChunk):
            blob_chunks += 1
            blob_bytes += len(change.data)
            if change.index == change.count - 1:
                blobs_written += 1
            continue
        elif isinstance(change, BlobDelete):
            blob_deletes += 1
            continue
        else:
            raise txn.error(f"summarize got a {type(change).__name__}, not a change")
        acc = files.get(change.file)
        if acc is None:
            acc = files[change.file] = [0, 0, []]
        acc[0] += len(indexes)
        acc[1] += len(change.data)
        if hot:
            acc[2].extend(indexes)
    if txn.end_offset is None or txn.offset is None:
        raise txn.error("transaction has no offsets: summarize it only after reading it from a topic")
    if publish_time_ms is None:
        publish_time_ms = txn.publish_time_ms or txn.source_time_ms
    by_file = sorted(files.items())
    return TxnSummary(
        database=txn.database,
        txn_id=txn.txn_id,
        source_time_ms=txn.source_time_ms,
        publish_time_ms=publish_time_ms,
        offset=txn.offset,
        end_offset=txn.end_offset,
        snapshot=txn.snapshot,
        file_blocks=tuple([(f, n, b) for f, (n, b, _) in by_file]),
        blocks=tuple([(f, tuple(indexes)) for f, (_, _, indexes) in by_file if indexes]),
        blob_bytes=blob_bytes,
        blob_chunks=blob_chunks,
        blobs_written=blobs_written,
        blob_deletes=blob_deletes,
    )


def percentile(values: list[int], p: float) -> int:
    """Nearest-rank percentile of integers (0 for none): always one of the values, so exact on replay."""
    if not values:
        return 0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class FileWrites:
    file: int
    blocks: int
    bytes: int


@dataclass(frozen=True)
class HotBlock:
    file: int
    index: int
    writes: int


@dataclass(frozen=True)
class WindowStats:
    """Statistics of one closed window of one database (the WindowStats Avro record, schemas/window_stats.v1.avsc)."""

    database: str
    window_start_ms: int
    window_ms: int
    first_txn: int
    last_txn: int
    first_offset: int
    end_offset: int  # offset of the last txn's TxnCommit: consumers resume at end_offset + 1
    last_source_time_ms: int
    txns: int
    snapshots: int
    blocks: int
    block_bytes: int
    files: tuple[FileWrites, ...]
    blob_bytes: int
    blob_chunks: int
    blobs_written: int
    blob_deletes: int
    bytes: int
    txn_bytes_p50: int
    txn_bytes_p99: int
    txn_bytes_max: int
    hottest_blocks: tuple[HotBlock, ...]
    capture_lag_ms_p50: int
    capture_lag_ms_p99: int
    capture_lag_ms_max: int

    @property
    def key(self) -> builtins.bytes:  # the field `bytes` shadows the builtin in the class body
        """Kafka key: one window of one database (compaction-safe, and what tests check for uniqueness)."""
        return f"{self.database}/{self.window_start_ms}".encode()

    def to_record(self) -> dict:
        rec = dict(self.__dict__)
        rec["files"] = [dict(f.__dict__) for f in self.files]
        rec["hottest_blocks"] = [dict(h.__dict__) for h in self.hottest_blocks]
        return rec

    @classmethod
    def from_record(cls, rec: dict) -> WindowStats:
        rec = dict(rec)
        rec["files"] = tuple(FileWrites(**f) for f in rec["files"])
        rec["hottest_blocks"] = tuple(HotBlock(**h) for h in rec["hottest_blocks"])
        return cls(**{k: rec[k] for k in cls.__dataclass_fields__})


@dataclass
class _Open:
    """The window being filled."""

    start_ms: int
    first: TxnSummary
    last: TxnSummary
    txns: int = 0
    snapshots: int = 0
    files: dict[int, list[int]] = field(default_factory=dict)
    blob_bytes: int = 0
    blob_chunks: int = 0
    blobs_written: int = 0
    blob_deletes: int = 0
    sizes: list[int] = field(default_factory=list)
    lags: list[int] = field(default_factory=list)
    hits: dict[int, Counter] = field(default_factory=dict)  # file -> writes per block index
    # Blocks of the latest transactions, counted into `hits` in bulk (one Counter.update per file
    # rather than per file and transaction), at most HIT_BATCH blocks at a time to bound memory.
    uncounted: list[tuple[tuple[int, tuple[int, ...]], ...]] = field(default_factory=list)
    uncounted_blocks: int = 0

    def add(self, s: TxnSummary) -> None:
        self.last = s
        self.txns += 1
        self.snapshots += s.snapshot
        files = self.files
        written = block_bytes = 0
        for f, n, b in s.file_blocks:
            acc = files.get(f)
            if acc is None:
                files[f] = [n, b]
            else:
                acc[0] += n
                acc[1] += b
            written += n
            block_bytes += b
        if s.blob_chunks or s.blob_deletes:
            self.blob_bytes += s.blob_bytes
            self.blob_chunks += s.blob_chunks
            self.blobs_written += s.blobs_written
            self.blob_deletes += s.blob_deletes
        self.sizes.append(block_bytes + s.blob_bytes)
        self.lags.append(s.publish_time_ms - s.source_time_ms)
        if s.blocks:
            self.uncounted.append(s.blocks)
            self.uncounted_blocks += written
            if self.uncounted_blocks >= HIT_BATCH:
                self.count_hits()

    def count_hits(self) -> dict[int, Counter]:
        """Count the blocks not counted yet into `hits`, and return it."""
        by_file: dict[int, list[int]] = {}
        for blocks in self.uncounted:
            for f, indexes in blocks:
                pending = by_file.get(f)
                if pending is None:
                    by_file[f] = list(indexes)
                else:
                    pending.extend(indexes)
        for f, pending in by_file.items():
            counts = self.hits.get(f)
            if counts is None:
                self.hits[f] = Counter(pending)
            else:
                counts.update(pending)
        self.uncounted.clear()
        self.uncounted_blocks = 0
        return self.hits


class Windows:
    """Tumbling windows of `window_ms` over one database's transactions, by source time (record time).

    `add()` returns a window only when it is closed, i.e. when a transaction of a later window
    arrives; the open window is never emitted, so a consumer that restarts from the offset after
    the last emitted window rebuilds exactly the same windows. A transaction whose source time
    lies before the open window (a source clock step back) is counted in the open window: the
    assignment depends only on the order of the stream, so it is still identical on replay.
    """

    def __init__(self, database: str, window_ms: int = DEFAULT_WINDOW_MS, top_blocks: int = DEFAULT_TOP_BLOCKS) -> None:
        if window_ms < 1:
            raise PipelineError(f"window must be at least 1 ms, got {window_ms}", database=database)
        if top_blocks < 0:
            raise PipelineError(f"top blocks must be >= 0, got {top_blocks}", database=database)
        self.database = database
        self.window_ms = window_ms
        self.top_blocks = top_blocks
        self.open: _Open | None = None

    def window_of(self, source_time_ms: int) -> int:
        return source_time_ms - source_time_ms % self.window_ms

    def add(self, s: TxnSummary) -> WindowStats | None:
        if s.database != self.database:
            raise PipelineError(
                f"transaction of database {s.database!r} in the windows of {self.database!r}",
                database=self.database,
                txn_id=s.txn_id,
                offset=s.offset,
            )
        if self.open is not None and s.txn_id <= self.open.last.txn_id:
            raise PipelineError(
                f"txn {s.txn_id} after txn {self.open.last.txn_id}: the stream went backwards",
                database=self.database,
                txn_id=s.txn_id,
                offset=s.offset,
            )
        start = self.window_of(s.source_time_ms)
        closed = None
        if self.open is not None and start > self.open.start_ms:
            closed = self._close(self.open)
            self.open = None
        if self.open is None:
            self.open = _Open(start, s, s)
        self.open.add(s)
        return closed

    def add_all(self, summaries: Iterable[TxnSummary]) -> list[WindowStats]:
        return [w for w in map(self.add, summaries) if w is not None]

    def _close(self, w: _Open) -> WindowStats:
        hottest = self._hottest(w.count_hits())
        blocks = sum(n for n, _ in w.files.values())
        block_bytes = sum(b for _, b in w.files.values())
        return WindowStats(
            database=self.database,
            window_start_ms=w.start_ms,
            window_ms=self.window_ms,
            first_txn=w.first.txn_id,
            last_txn=w.last.txn_id,
            first_offset=w.first.offset,
            end_offset=w.last.end_offset,
            last_source_time_ms=w.last.source_time_ms,
            txns=w.txns,
            snapshots=w.snapshots,
            blocks=blocks,
            block_bytes=block_bytes,
            files=tuple(FileWrites(f, n, b) for f, (n, b) in sorted(w.files.items())),
            blob_bytes=w.blob_bytes,
            blob_chunks=w.blob_chunks,
            blobs_written=w.blobs_written,
            blob_deletes=w.blob_deletes,
            bytes=block_bytes + w.blob_bytes,
            txn_bytes_p50=percentile(w.sizes, 50),
            txn_bytes_p99=percentile(w.sizes, 99),
            txn_bytes_max=max(w.sizes),
            hottest_blocks=hottest,
            capture_lag_ms_p50=percentile(w.lags, 50),
            capture_lag_ms_p99=percentile(w.lags, 99),
            capture_lag_ms_max=max(w.lags),
        )

    def _hottest(self, hits: dict[int, Counter]) -> tuple[HotBlock, ...]:
        """The top_blocks most written blocks, hottest first, ties by block address (never by hashing order)."""
        counts = sorted(chain.from_iterable(c.values() for c in hits.values()), reverse=True)
        if not counts or not self.top_blocks:
            return ()
        least = counts[min(self.top_blocks, len(counts)) - 1]  # only blocks written this often can make the list
        top = sorted((-n, f, i) for f, c in hits.items() for i, n in c.items() if n >= least)[: self.top_blocks]
        return tuple(HotBlock(f, i, -negative) for negative, f, i in top)


def stats_topic(database_topic: str, template: str = "{topic}" + STATS_SUFFIX, database: str = "") -> str:
    """The output topic of a database topic; it must end in `.stats`, which status and --pattern skip."""
    topic = template.format(topic=database_topic, database=database)
    if not topic.endswith(STATS_SUFFIX) or topic == STATS_SUFFIX:
        raise PipelineError(f"stats topic {topic!r} must end in {STATS_SUFFIX!r} (status and --pattern skip those)")
    return topic
