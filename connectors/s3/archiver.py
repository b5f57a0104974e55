"""The archiver: whole transactions from Kafka into S3 segments exactly once, and base snapshots."""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from connectors.faults import as_pipeline_error
from connectors.picolisp.blobs import blob_files
from connectors.picolisp.format import hax
from connectors.picolisp.replica import ReplicaDir
from connectors.s3.compactor import compact
from connectors.s3.restore import materialise
from connectors.s3.sealed import blob_key, put_bytes, put_file
from connectors.s3.store import Store, retrying
from pipeline.archive import (
    CompactionPolicy,
    Framer,
    Manifest,
    Rotation,
    Segment,
    SegmentWriter,
    Snapshot,
    SnapshotPolicy,
    read_segment,
)
from pipeline.codec import Codec, Record
from pipeline.crypto import Keyring, snapshot_context
from pipeline.errors import PipelineError
from pipeline.model import Position, Transaction

# A segment being streamed goes up in parts of this size (S3 wants >= 5 MiB, at most 10 000 parts).
PART_BYTES = 16 << 20


MIN_PART_BYTES = 5 << 20


class _OpenSegment:
    """The segment being written: a temp file, and what its key will say."""

    def __init__(
        self,
        work_dir: Path,
        codec: Codec,
        database: str,
        partition: int,
        first_offset: int,
        first_txn: int,
        first_ms: int,
        snapshot: bool,
    ) -> None:
        self.file = tempfile.TemporaryFile(dir=work_dir)
        self.writer = SegmentWriter(self.file, codec, database, partition, first_offset)
        self.partition, self.first_offset, self.first_txn, self.first_ms = partition, first_offset, first_txn, first_ms
        self.snapshot = snapshot
        self.txns = 0
        self.last: Transaction | None = None
        self.upload: _PartUpload | None = None  # set once it is uploaded while still being written
        self.due: float | None = None  # monotonic time by which it closes (--max-delay after its first commit)

    def segment(self) -> Segment:
        assert self.last is not None
        size = self.file.seek(0, os.SEEK_END)
        return Segment(
            self.first_txn,
            self.last.txn_id,
            self.first_offset,
            self.first_ms,
            self.last.source_time_ms,
            self.partition,
            self.snapshot,
            size,
        )


@dataclass
class _PartUpload:
    """A segment's multipart upload, fed on the upload thread while the segment is still written."""

    key: str
    fd: int
    upload_id: str | None = None
    etags: list[str] = field(default_factory=list)
    queued: int = 0  # bytes of the segment file handed to the upload thread so far
    parts_queued: int = 0
    failed: BaseException | None = None


class Archiver:
    """Writes a database's committed transactions to S3 as segments of whole transactions, and
    base snapshots from a materialised copy, exactly once.

    S3 is the truth: `resume()` finds the last archived txn and the offset after it, and the
    caller reads Kafka from there. A segment is acknowledged (group offsets) only after its
    upload, and its key and bytes depend only on the records, so a crash at any point ends in
    the same objects, each written once.
    """

    def __init__(
        self,
        store: Store,
        codec: Codec,
        *,
        rotation: Rotation,
        snapshots: SnapshotPolicy,
        work_dir: Path,
        topic: str,
        log: Callable[[str], None] = print,
        on_archived: Callable[[Transaction], None] = lambda txn: None,
        part_bytes: int = PART_BYTES,
        max_delay: float | None = None,
        compaction: CompactionPolicy | None = None,
        compact_every: float = 10.0,
    ) -> None:
        if part_bytes < MIN_PART_BYTES:
            raise PipelineError(
                f"the upload part size must be at least {MIN_PART_BYTES >> 20} MiB (S3's minimum), got {part_bytes}",
                database=store.database,
            )
        if max_delay is not None and max_delay < 0:
            raise PipelineError(f"the maximum delay must be 0 s or more, got {max_delay}", database=store.database)
        self.part_bytes = part_bytes
        self.max_delay = max_delay
        self.store = store
        self.codec = codec
        self.database = store.database
        self.rotation = rotation
        self.snapshots = snapshots
        self.work_dir = work_dir
        self.topic = topic
        self.log = log
        self.on_archived = on_archived
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.work_dir / "archiver.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise PipelineError(
                f"another archiver of {self.database!r} is using {self.work_dir}",
                database=self.database,
                retriable=True,
            ) from None
        self.position: Position | None = None
        self.next_offset = 0
        self._since_snapshot = (0, 0)  # txns, bytes archived after the newest base snapshot
        self.archived: list[Segment] = []
        self.compaction = compaction  # None: segments stay as uploaded (`archive compact` merges them later)
        self.compact_every = compact_every
        self._compacting: Future | None = None
        self._compacted_at = 0.0

    def close(self) -> None:
        os.close(self._lock_fd)

    def resume(self, *, abort_unfinished: bool = True) -> int:
        """Read the archive's end from S3; return the Kafka offset to read from.

        The archiver about to run takes over its archive: multipart uploads a killed run left
        unfinished are aborted (`archive snapshot`, which may run beside it, passes False).
        """
        catalog = retrying(f"archive {self.database}: listing {self.store.url}", self.store.catalog, self.log)
        catalog.runs()  # refuses overlapping segments
        unfinished = (
            retrying(f"archive {self.database}: listing unfinished uploads", self.store.unfinished_uploads, self.log)
            if abort_unfinished
            else []
        )
        for key, upload_id in unfinished:
            self.log(
                f"archive {self.database}: aborting the unfinished upload of {key} (an earlier run stopped "
                "while writing it; it is written again)"
            )
            self.store.abort_upload(key, upload_id)
        last = catalog.last
        if last is not None:
            head = retrying(
                f"archive {self.database}: reading {last.key(self.store.root)}", lambda: self._last_txn(last), self.log
            )
            assert head.end_offset is not None
            self.position, self.next_offset = head.after, head.end_offset + 1
        newest = catalog.snapshots[-1].txn if catalog.snapshots else 0
        after = [s for s in catalog.segments if s.last_txn > newest]
        self._since_snapshot = (
            sum(s.last_txn - max(s.first_txn - 1, newest) for s in after),
            sum(s.size for s in after),
        )
        return self.next_offset

    def _last_txn(self, seg: Segment) -> Transaction:
        """A segment's last txn as its commit record tells it, with its offsets (framing only: no
        block body is decoded, and the object streams through a temp file, not memory)."""
        key = seg.key(self.store.root)
        tmp = self.work_dir / f".last-segment-{os.getpid()}"
        framer = Framer(self.codec, self.database, None)
        last: Transaction | None = None
        try:
            self.store.download(key, tmp)
            with open(tmp, "rb") as fo:
                for rec in read_segment(fo, self.database, self.topic, key):
                    if framer.begin(rec) is None:
                        last = framer.record(rec) or last
        finally:
            tmp.unlink(missing_ok=True)
        if last is None or last.txn_id != seg.last_txn:
            raise PipelineError(f"archive object {key} does not end with txn {seg.last_txn}", database=self.database)
        return last

    def run(self, records: Iterable[Record | None], stop: threading.Event | None = None) -> None:
        """Archive every transaction in `records` (which start at the offset `resume()` returned).

        A closed segment uploads on a background thread while the next one fills (at most two in
        flight), and a big one-txn segment already while it is written (_stream); acknowledgements
        still happen on the caller's thread, in order, once each upload succeeded.

        A None in `records` means nothing new has come (TopicSource.records_or_idle): with
        `max_delay`, the open segment closes at its last whole txn once its first commit was read
        `max_delay` seconds ago, whether more records come or not. When `stop` is set, the open
        segment closes at its last whole txn (a txn still being read is left for the next run),
        the uploads in flight finish, and run() returns.
        """
        self.start()
        try:
            for rec in records:
                if stop is not None and stop.is_set():
                    break
                self.feed(rec)
            else:
                # The stream ended (--once reached the end it saw at start): archive the tail.
                if self._seg is not None and self._seg.txns and self._framer.open is not None:
                    raise PipelineError(
                        "the stream ended inside a transaction",
                        database=self.database,
                        txn_id=self._framer.open.txn_id,
                        offset=self._framer.open.offset,
                        retriable=True,
                    )
            self.finish()
        finally:
            self.shutdown()

    def start(self) -> None:
        """Begin archiving at the position `resume()` found; then `feed()` records, and `finish()`."""
        self._framer = Framer(self.codec, self.database, self.position)
        self._stopping = threading.Event()
        self._seg: _OpenSegment | None = None
        self._uploads: deque[tuple[Future, _OpenSegment]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-upload")
        self._compactor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-compact")

    def feed(self, rec: Record | None) -> None:
        """One record of the stream, or None: nothing new came (the open segment may be due, --max-delay)."""
        framer, pool, uploads = self._framer, self._pool, self._uploads
        while uploads and uploads[0][0].done():
            self._uploaded(*uploads.popleft())
        seg = self._seg
        if rec is None:
            if seg is not None and seg.due is not None and time.monotonic() >= seg.due:
                self._seg = self._close_on_time(seg, framer, pool, uploads)
            return
        frame = framer.begin(rec)
        if frame is not None:
            if seg is not None and self.rotation.close_before(seg.txns, seg.first_ms, frame.time_ms, frame.snapshot):
                self._close(seg, pool, uploads)
                seg = self._seg = None
            if seg is None:
                seg = self._seg = _OpenSegment(
                    self.work_dir,
                    self.codec,
                    self.database,
                    rec.partition,
                    rec.offset,
                    frame.txn_id,
                    frame.time_ms,
                    frame.snapshot,
                )
            seg.writer.write(rec)
            return
        done = framer.record(rec)
        assert seg is not None  # framer.record refuses a record outside a transaction
        seg.writer.write(rec)
        if seg.txns == 0 and seg.writer.bytes >= max(self.rotation.max_bytes, self.part_bytes):
            self._stream(seg, pool)
        if done is not None:
            seg.txns += 1
            seg.last = done
            now = time.monotonic()
            if seg.due is None and self.max_delay is not None:
                seg.due = now + self.max_delay
            if self.rotation.close_after(seg.txns, seg.writer.bytes) or (seg.due is not None and now >= seg.due):
                self._close(seg, pool, uploads)
                self._seg = None

    def finish(self) -> None:
        """Close the open segment at its last whole txn (a txn still being read is left for the next
        run) and wait for every upload to be acknowledged."""
        seg = self._seg
        if seg is not None and seg.txns and self._framer.open is not None:
            seg, rest = self._split(seg, self._framer)
            if rest is not None:
                rest.file.close()
        self._seg = None
        if seg is not None and seg.txns:
            self._close(seg, self._pool, self._uploads)
        elif seg is not None:
            seg.file.close()
        while self._uploads:
            self._uploaded(*self._uploads.popleft())

    def shutdown(self) -> None:
        """Stop the background work; what is not uploaded yet is dropped (the next run writes it again)."""
        self._stopping.set()  # an upload retrying through an outage gives up, unacknowledged
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._compactor.shutdown(wait=True, cancel_futures=True)  # a merge ends at its next step
        self._compact_result()
        for unfinished in ([self._seg] if self._seg is not None else []) + [pending for _, pending in self._uploads]:
            if unfinished.upload is not None and unfinished.upload.upload_id is not None:
                self.store.abort_upload(unfinished.upload.key, unfinished.upload.upload_id)
            unfinished.file.close()
        self._seg = None
        self._uploads.clear()

    def _compact_maybe(self) -> None:
        """After an upload: start a compaction pass every `compact_every` s, one at a time, beside the uploads."""
        if self.compaction is None or (self._compacting is not None and not self._compacting.done()):
            return
        self._compact_result()
        if not self.archived or time.monotonic() - self._compacted_at < self.compact_every:
            return
        self._compacted_at = time.monotonic()
        self._compacting = self._compactor.submit(
            compact,
            self.store,
            self.codec,
            self.topic,
            self.work_dir,
            self.compaction,
            self.log,
            should_stop=self._stopping.is_set,
        )

    def _compact_result(self) -> None:
        """Report a finished pass's failure: compaction only saves objects, so archiving goes on."""
        done, self._compacting = self._compacting, None
        if done is None or not done.done() or done.cancelled() or done.exception() is None:
            return
        exc = as_pipeline_error("compacting", done.exception(), database=self.database)  # type: ignore[arg-type]
        if exc.retriable:
            self.log(f"archive {self.database}: compaction failed, tried again in {self.compact_every:g} s: {exc}")
            return
        self.log(
            f"archive {self.database}: error: compaction stopped for this run (archiving goes on; "
            f"`archive compact` retries it): {exc}"
        )
        self.compaction = None

    def _close_on_time(
        self,
        seg: _OpenSegment,
        framer: Framer,
        pool: ThreadPoolExecutor,
        uploads: deque[tuple[Future, _OpenSegment]],
    ) -> _OpenSegment | None:
        """--max-delay is up: close the open segment at its last whole txn; what follows it (a txn
        still being read) stays open, in a segment of its own. Returns the segment left open."""
        if framer.open is None:
            self._close(seg, pool, uploads)
            return None
        head, rest = self._split(seg, framer)
        self._close(head, pool, uploads)
        return rest

    def _split(self, seg: _OpenSegment, framer: Framer) -> tuple[_OpenSegment, _OpenSegment | None]:
        """Cut the open segment after its last whole txn: (the whole txns, the start of the txn
        still being read). The records are written again into two new files, so each holds the
        same bytes as a segment written from its first record (the same key, if written again)."""
        assert seg.last is not None and seg.last.end_offset is not None and seg.upload is None
        assert framer.open is not None
        seg.writer.close()
        seg.file.flush()
        seg.file.seek(0)
        head = _OpenSegment(
            self.work_dir,
            self.codec,
            self.database,
            seg.partition,
            seg.first_offset,
            seg.first_txn,
            seg.first_ms,
            seg.snapshot,
        )
        head.txns, head.last, head.due = seg.txns, seg.last, seg.due
        rest: _OpenSegment | None = None
        try:
            for rec in read_segment(seg.file, self.database, self.topic, "the open segment"):
                if rec.offset <= seg.last.end_offset:
                    head.writer.write(rec)
                    continue
                if rest is None:
                    opening = framer.open
                    rest = _OpenSegment(
                        self.work_dir,
                        self.codec,
                        self.database,
                        rec.partition,
                        rec.offset,
                        opening.txn_id,
                        opening.time_ms,
                        opening.snapshot,
                    )
                rest.writer.write(rec)
        finally:
            seg.file.close()
        return head, rest

    def _close(self, seg: _OpenSegment, pool: ThreadPoolExecutor, uploads: deque[tuple[Future, _OpenSegment]]) -> None:
        if len(uploads) >= 2:  # bound the spool: wait for the older upload
            self._uploaded(*uploads.popleft())
        seg.writer.close()
        seg.file.flush()  # the upload thread reads the file by its descriptor
        uploads.append((pool.submit(self._upload, seg), seg))

    def _stream(self, seg: _OpenSegment, pool: ThreadPoolExecutor) -> None:
        """Upload a segment in parts while it is still written, once its key is known.

        That is when its first txn alone reached the byte limit: the segment then closes right
        after that txn, so its last txn and time are its first. This overlaps a big snapshot
        txn's upload with its reading and compressing, which otherwise come one after the other.
        """
        if seg.upload is None:
            key = Segment(
                seg.first_txn, seg.first_txn, seg.first_offset, seg.first_ms, seg.first_ms, seg.partition, seg.snapshot
            ).key(self.store.root)
            seg.upload = _PartUpload(key, seg.file.fileno())
            self.log(
                f"archive {self.database}: txn {seg.first_txn} holds over {seg.writer.bytes >> 20} MiB: "
                f"uploading {key.rsplit('/', 1)[-1]} in parts while it is read"
            )
        up = seg.upload
        seg.file.flush()
        written = seg.file.tell()
        while True:
            size = self.part_bytes << (up.parts_queued // 2500)  # 10 000 parts (S3's limit) reach ~600 GiB
            if written - up.queued < size:
                return
            pool.submit(self._upload_part, up, up.queued, up.queued + size)
            up.queued += size
            up.parts_queued += 1

    def _upload_part(self, up: _PartUpload, start: int, end: int) -> None:
        """On the upload thread; a failure is kept and raised when the segment's upload finishes."""
        if up.failed is not None:
            return
        try:
            if up.upload_id is None:
                up.upload_id = retrying(
                    f"archive {self.database}: starting the upload of {up.key}",
                    lambda: self.store.start_upload(up.key),
                    self.log,
                    stop=self._stopping,
                )
            data = os.pread(up.fd, end - start, start)
            number = len(up.etags) + 1
            up.etags.append(
                retrying(
                    f"archive {self.database}: uploading part {number} of {up.key}",
                    lambda: self.store.upload_part(up.key, up.upload_id, number, data),  # type: ignore[arg-type]
                    self.log,
                    stop=self._stopping,
                )
            )
        except BaseException as exc:  # noqa: BLE001 - raised again by _upload, in order
            up.failed = exc

    def _upload(self, seg: _OpenSegment) -> Segment:
        info = seg.segment()
        key = info.key(self.store.root)
        up = seg.upload
        if up is None:
            retrying(
                f"archive {self.database}: uploading {key}",
                lambda: self.store.put_new(key, seg.file),
                self.log,
                stop=self._stopping,
            )
            return info
        assert up.key == key, (up.key, key)  # _stream only starts when the key is known
        if info.size > up.queued:  # the tail after the last full part
            self._upload_part(up, up.queued, info.size)
        if up.failed is not None:
            raise up.failed
        retrying(
            f"archive {self.database}: completing {key}",
            lambda: self.store.complete_new(key, up.upload_id, up.etags, seg.file),  # type: ignore[arg-type]
            self.log,
            stop=self._stopping,
        )
        return info

    def _uploaded(self, future: Future, seg: _OpenSegment) -> None:
        """After a segment's upload: move the position, acknowledge, maybe write a base snapshot."""
        try:
            info = future.result()
        finally:
            seg.file.close()
        assert seg.last is not None
        key = info.key(self.store.root)
        assert seg.last.end_offset is not None
        self.position, self.next_offset = seg.last.after, seg.last.end_offset + 1
        self.archived.append(info)
        self.log(f"archive {self.database}: {key.rsplit('/', 1)[-1]} ({info.txns} txns, {info.size} bytes)")
        self.on_archived(seg.last)
        txns, size = self._since_snapshot
        self._since_snapshot = (txns + info.txns, size + info.size)
        if self.snapshots.due(*self._since_snapshot):
            self.write_snapshot(info.last_txn)
        self._compact_maybe()

    # --- base snapshots ---------------------------------------------------------------------

    def write_snapshot(self, txn: int) -> Snapshot:
        """Materialise the pool at `txn` from the archive itself (which also proves it restores),
        keeping that copy for the next time, and upload it as a base snapshot."""
        state = self.work_dir / "state"
        db_dir, blob_dir = state / "db", state / "blob"
        catalog = retrying(f"archive {self.database}: listing", self.store.catalog, self.log)
        plan = catalog.plan(txn=txn)
        self.log(f"archive {self.database}: writing a base snapshot at txn {txn}")
        sink = retrying(
            f"archive {self.database}: materialising txn {txn}",
            lambda: materialise(self.store, self.codec, plan, db_dir, blob_dir, self.topic, self.work_dir, reuse=True),
            self.log,
        )
        try:
            snap = retrying(
                f"archive {self.database}: uploading the snapshot at txn {txn}",
                lambda: upload_snapshot(self.store, sink, db_dir, blob_dir, self.codec.keyring),
                self.log,
            )
        finally:
            sink.close()
        self._since_snapshot = (0, 0)
        self.log(f"archive {self.database}: base snapshot at txn {txn} stored")
        return snap


def upload_snapshot(
    store: Store, sink: ReplicaDir, db_dir: Path, blob_dir: Path, keyring: Keyring | None = None
) -> Snapshot:
    """Upload the materialised pool as a base snapshot; the manifest goes last and makes it count.
    With a keyring every object (files, blobs, manifest) is sealed, bound to its place (sealed.py)."""
    position = sink.position()
    snap = Snapshot(position.txn_id, sink.source_time_ms)
    prefix = snap.prefix(store.root)
    sealed = keyring is not None
    for layout in sink.files:
        name = f"db/{hax(layout.file)}"
        put_file(
            store, prefix + name, db_dir / hax(layout.file), keyring, snapshot_context(store.database, snap.txn, name)
        )
    blobs: dict[str, int] = {}
    for index, path in enumerate(blob_files(blob_dir)):
        blobs[path] = (blob_dir / path).stat().st_size
        context = snapshot_context(store.database, snap.txn, f"blob/{path}")
        put_file(store, blob_key(prefix, index, path, sealed), blob_dir / path, keyring, context)
    manifest = Manifest(
        store.database,
        position.txn_id,
        position.checksum,
        sink.next_offset,
        sink.source_time_ms,
        list(sink.files),
        blobs,
    )
    context = snapshot_context(store.database, snap.txn, "manifest.json")
    put_bytes(store, snap.manifest_key(store.root), manifest.to_json(), keyring, context)
    return snap
