"""S3: the archive store, the archiver that writes segments and base snapshots, point-in-time restore, retention."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import itertools
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from connectors.faults import Backoff, classify, retry
from connectors.picolisp import hax
from connectors.replica_dir import ReplicaDir, state_dir_for, write_position
from pipeline.archive import (
    Catalog,
    Framer,
    Manifest,
    RestorePlan,
    RetentionPlan,
    Rotation,
    Segment,
    SegmentWriter,
    Snapshot,
    SnapshotPolicy,
    database_root,
    read_segment,
    retention_plan,
)
from pipeline.codec import Codec, Record
from pipeline.errors import PipelineError
from pipeline.model import Position, Transaction, safe_blob_path
from pipeline.replicate import replicate

PROGRESS = Callable[[dict], None]
_CHUNK = 8 << 20
# A segment being streamed goes up in parts of this size (S3 wants >= 5 MiB, at most 10 000 parts).
PART_BYTES = 16 << 20
MIN_PART_BYTES = 5 << 20


def parse_bucket_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix)."""
    if not url.startswith("s3://") or len(url) <= 5:
        raise PipelineError(f"--bucket must look like s3://bucket[/prefix], got {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 client from the standard configuration (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, profiles...).

    Path-style addressing works with every S3-compatible server; our own retry loop handles outages,
    so boto3 only retries briefly.
    """
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url, config=Config(
        s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5, read_timeout=60))


def _s3_error(what: str, exc: Exception, database: str | None) -> PipelineError:
    """A boto3 failure as one line; whether it is worth retrying is decided by connectors.faults."""
    retriable, fix = classify(exc)
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code", "") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        text = f"S3 said {code}: {response.get('Error', {}).get('Message', exc)}"
    elif retriable:
        text = f"S3 unreachable: {exc}"  # connection refused, timeouts, a server that went away mid-response
    else:
        text = str(exc)
    return PipelineError(f"{what}: {text}" + (f" ({fix})" if fix else ""), database=database, retriable=retriable)


def _status_of(exc: Exception) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


@dataclass
class ArchiveStore:
    """One database's archive under s3://bucket/prefix/<database>/."""

    client: Any
    bucket: str
    prefix: str
    database: str

    @property
    def root(self) -> str:
        return database_root(self.prefix, self.database)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.root}/"

    def call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(what, exc, self.database) from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (and we may)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _status_of(exc) != 404:
                raise _s3_error(f"cannot use bucket {self.bucket}", exc, self.database) from exc
        except BotoCoreError as exc:
            raise _s3_error(f"cannot use bucket {self.bucket}", exc, self.database) from exc
        self.call(f"cannot create bucket {self.bucket}", self.client.create_bucket, Bucket=self.bucket)

    def list(self, under: str) -> Iterator[tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=under):
                for obj in page.get("Contents", []):
                    yield obj["Key"], obj["Size"]
        except Exception as exc:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, (BotoCoreError, ClientError)):
                raise _s3_error(f"cannot list {self.url}", exc, self.database) from exc
            raise

    def catalog(self) -> Catalog:
        segments = [s for key, size in self.list(f"{self.root}/segments/")
                    if (s := Segment.parse(self.root, key, size)) is not None]
        snapshots = [s for key, _ in self.list(f"{self.root}/snapshots/")
                     if (s := Snapshot.parse(self.root, key)) is not None]
        return Catalog(self.database, segments, snapshots)

    def put_new(self, key: str, body: IO[bytes] | bytes) -> None:
        """Create `key` unless it exists (If-None-Match: *). An existing identical object is fine: a
        restarted archiver rewrote the same bytes; a different one means two writers, and stops us."""
        if not isinstance(body, bytes):
            body.seek(0)
        if self._created(key, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")):
            return
        self._check_same(key, io.BytesIO(body) if isinstance(body, bytes) else body)

    def _created(self, key: str, create: Callable[[], Any]) -> bool:
        """Run a conditional create; False if the key already existed."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            create()
            return True
        except (BotoCoreError, ClientError) as exc:
            if _status_of(exc) not in (409, 412):
                raise _s3_error(f"cannot write {key}", exc, self.database) from exc
            return False

    def _check_same(self, key: str, ours: IO[bytes]) -> None:
        """An object found where we were creating one must hold our bytes (compared streaming)."""
        mine, theirs = hashlib.md5(), hashlib.md5()
        ours.seek(0)
        while chunk := ours.read(_CHUNK):
            mine.update(chunk)
        body = self.call(f"cannot read {key}", self.client.get_object, Bucket=self.bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(_CHUNK):
            theirs.update(chunk)
        if mine.digest() != theirs.digest():
            raise PipelineError(f"{key} already exists with different content: is another archiver writing "
                                f"to {self.url}?", database=self.database)

    # Multipart: a big segment is uploaded part by part while it is still being written.

    def start_upload(self, key: str) -> str:
        return self.call(f"cannot start uploading {key}", self.client.create_multipart_upload,
                         Bucket=self.bucket, Key=key)["UploadId"]

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        return self.call(f"cannot upload part {number} of {key}", self.client.upload_part, Bucket=self.bucket,
                         Key=key, UploadId=upload_id, PartNumber=number, Body=data)["ETag"]

    def complete_new(self, key: str, upload_id: str, etags: list[str], ours: IO[bytes]) -> None:
        """Complete a multipart upload unless `key` exists: the same rule as put_new."""
        parts = {"Parts": [{"ETag": etag, "PartNumber": i} for i, etag in enumerate(etags, 1)]}
        if self._created(key, lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload=parts, IfNoneMatch="*")):
            return
        self.abort_upload(key, upload_id)
        self._check_same(key, ours)

    def abort_upload(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(Exception):  # best effort: `archive` aborts leftovers when it starts
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def unfinished_uploads(self) -> list[tuple[str, str]]:
        """(key, upload id) of the multipart uploads under this archive that were never completed."""
        response = self.call(f"cannot list the unfinished uploads of {self.url}", self.client.list_multipart_uploads,
                             Bucket=self.bucket, Prefix=f"{self.root}/")
        return [(u["Key"], u["UploadId"]) for u in response.get("Uploads", [])]

    def upload_file(self, key: str, path: Path) -> None:
        # Snapshot files are deterministic at their txn, so rewriting one is harmless; multipart
        # uploads in parallel parts are what make big pool files fast.
        self.call(f"cannot upload {key}", self.client.upload_file, Filename=str(path), Bucket=self.bucket, Key=key)

    def get(self, key: str) -> bytes:
        response = self.call(f"cannot read {key}", self.client.get_object, Bucket=self.bucket, Key=key)
        return response["Body"].read()

    def download(self, key: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        self.call(f"cannot download {key}", self.client.download_file, Bucket=self.bucket, Key=key,
                  Filename=str(path), Callback=on_bytes)

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            self.call("cannot delete old archive objects", self.client.delete_objects, Bucket=self.bucket,
                      Delete={"Objects": batch, "Quiet": True})


def retrying(what: str, fn: Callable[[], Any], log: Callable[[str], None], *, max_backoff: float = 10.0,
             stop: threading.Event | None = None) -> Any:
    """Run `fn` until it succeeds, waiting with the one retry policy after retriable errors
    (an S3 outage only delays the archive: nothing is acknowledged before it is stored).
    Setting `stop` ends the waiting with the last error."""
    return retry(what, fn, log, backoff=Backoff(cap=max_backoff), stop=stop)


# --- archiving ------------------------------------------------------------------------------


class _OpenSegment:
    """The segment being written: a temp file, and what its key will say."""

    def __init__(self, work_dir: Path, codec: Codec, database: str, partition: int, first_offset: int,
                 first_txn: int, first_ms: int, snapshot: bool) -> None:
        self.file = tempfile.TemporaryFile(dir=work_dir)
        self.writer = SegmentWriter(self.file, codec, database, partition, first_offset)
        self.partition, self.first_offset, self.first_txn, self.first_ms = partition, first_offset, first_txn, first_ms
        self.snapshot = snapshot
        self.txns = 0
        self.last: Transaction | None = None
        self.upload: _PartUpload | None = None  # set once it is uploaded while still being written

    def segment(self) -> Segment:
        assert self.last is not None
        size = self.file.seek(0, os.SEEK_END)
        return Segment(self.first_txn, self.last.txn_id, self.first_offset, self.first_ms, self.last.source_time_ms,
                       self.partition, self.snapshot, size)


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

    def __init__(self, store: ArchiveStore, codec: Codec, *, rotation: Rotation, snapshots: SnapshotPolicy,
                 work_dir: Path, topic: str, log: Callable[[str], None] = print,
                 on_archived: Callable[[Transaction], None] = lambda txn: None, part_bytes: int = PART_BYTES) -> None:
        if part_bytes < MIN_PART_BYTES:
            raise PipelineError(f"the upload part size must be at least {MIN_PART_BYTES >> 20} MiB (S3's minimum), "
                                f"got {part_bytes}", database=store.database)
        self.part_bytes = part_bytes
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
            raise PipelineError(f"another archiver of {self.database!r} is using {self.work_dir}",
                                database=self.database, retriable=True) from None
        self.position: Position | None = None
        self.next_offset = 0
        self._since_snapshot = (0, 0)  # txns, bytes archived after the newest base snapshot
        self.archived: list[Segment] = []

    def close(self) -> None:
        os.close(self._lock_fd)

    def resume(self, *, abort_unfinished: bool = True) -> int:
        """Read the archive's end from S3; return the Kafka offset to read from.

        The archiver about to run takes over its archive: multipart uploads a killed run left
        unfinished are aborted (`archive snapshot`, which may run beside it, passes False).
        """
        catalog = retrying(f"archive {self.database}: listing {self.store.url}", self.store.catalog, self.log)
        catalog.runs()  # refuses overlapping segments
        unfinished = retrying(f"archive {self.database}: listing unfinished uploads", self.store.unfinished_uploads,
                              self.log) if abort_unfinished else []
        for key, upload_id in unfinished:
            self.log(f"archive {self.database}: aborting the unfinished upload of {key} (an earlier run stopped "
                     "while writing it; it is written again)")
            self.store.abort_upload(key, upload_id)
        last = catalog.last
        if last is not None:
            head = retrying(f"archive {self.database}: reading {last.key(self.store.root)}",
                            lambda: self._last_txn(last), self.log)
            assert head.end_offset is not None
            self.position, self.next_offset = head.after, head.end_offset + 1
        newest = catalog.snapshots[-1].txn if catalog.snapshots else 0
        after = [s for s in catalog.segments if s.last_txn > newest]
        self._since_snapshot = (sum(s.last_txn - max(s.first_txn - 1, newest) for s in after),
                                sum(s.size for s in after))
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

    def run(self, records: Iterable[Record]) -> None:
        """Archive every transaction in `records` (which start at the offset `resume()` returned).

        A closed segment uploads on a background thread while the next one fills (at most two in
        flight), and a big one-txn segment already while it is written (_stream); acknowledgements
        still happen here, in order, once each upload succeeded.
        """
        framer = Framer(self.codec, self.database, self.position)
        self._stopping = threading.Event()
        seg: _OpenSegment | None = None
        uploads: deque[tuple[Future, _OpenSegment]] = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-upload") as pool:
            try:
                for rec in records:
                    while uploads and uploads[0][0].done():
                        self._uploaded(*uploads.popleft())
                    frame = framer.begin(rec)
                    if frame is not None:
                        if seg is not None and self.rotation.close_before(seg.txns, seg.first_ms, frame.time_ms,
                                                                          frame.snapshot):
                            self._close(seg, pool, uploads)
                            seg = None
                        if seg is None:
                            seg = _OpenSegment(self.work_dir, self.codec, self.database, rec.partition, rec.offset,
                                               frame.txn_id, frame.time_ms, frame.snapshot)
                        seg.writer.write(rec)
                        continue
                    done = framer.record(rec)
                    assert seg is not None  # framer.record refuses a record outside a transaction
                    seg.writer.write(rec)
                    if seg.txns == 0 and seg.writer.bytes >= max(self.rotation.max_bytes, self.part_bytes):
                        self._stream(seg, pool)
                    if done is not None:
                        seg.txns += 1
                        seg.last = done
                        if self.rotation.close_after(seg.txns, seg.writer.bytes):
                            self._close(seg, pool, uploads)
                            seg = None
                # The stream ended (--once reached the end it saw at start): archive the tail.
                if seg is not None and seg.txns:
                    if framer.open is not None:
                        raise PipelineError("the stream ended inside a transaction", database=self.database,
                                            txn_id=framer.open.txn_id, offset=framer.open.offset, retriable=True)
                    self._close(seg, pool, uploads)
                    seg = None
                while uploads:
                    self._uploaded(*uploads.popleft())
            finally:
                self._stopping.set()  # an upload retrying through an outage gives up, unacknowledged
                pool.shutdown(wait=True, cancel_futures=True)
                for unfinished in ([seg] if seg is not None else []) + [pending for _, pending in uploads]:
                    if unfinished.upload is not None and unfinished.upload.upload_id is not None:
                        self.store.abort_upload(unfinished.upload.key, unfinished.upload.upload_id)
                    unfinished.file.close()

    def _close(self, seg: _OpenSegment, pool: ThreadPoolExecutor,
               uploads: "deque[tuple[Future, _OpenSegment]]") -> None:
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
            key = Segment(seg.first_txn, seg.first_txn, seg.first_offset, seg.first_ms, seg.first_ms,
                          seg.partition, seg.snapshot).key(self.store.root)
            seg.upload = _PartUpload(key, seg.file.fileno())
            self.log(f"archive {self.database}: txn {seg.first_txn} holds over {seg.writer.bytes >> 20} MiB: "
                     f"uploading {key.rsplit('/', 1)[-1]} in parts while it is read")
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
                up.upload_id = retrying(f"archive {self.database}: starting the upload of {up.key}",
                                        lambda: self.store.start_upload(up.key), self.log, stop=self._stopping)
            data = os.pread(up.fd, end - start, start)
            number = len(up.etags) + 1
            up.etags.append(retrying(f"archive {self.database}: uploading part {number} of {up.key}",
                                     lambda: self.store.upload_part(up.key, up.upload_id, number, data),  # type: ignore[arg-type]
                                     self.log, stop=self._stopping))
        except BaseException as exc:  # noqa: BLE001 - raised again by _upload, in order
            up.failed = exc

    def _upload(self, seg: _OpenSegment) -> Segment:
        info = seg.segment()
        key = info.key(self.store.root)
        up = seg.upload
        if up is None:
            retrying(f"archive {self.database}: uploading {key}", lambda: self.store.put_new(key, seg.file), self.log,
                     stop=self._stopping)
            return info
        assert up.key == key, (up.key, key)  # _stream only starts when the key is known
        if info.size > up.queued:  # the tail after the last full part
            self._upload_part(up, up.queued, info.size)
        if up.failed is not None:
            raise up.failed
        retrying(f"archive {self.database}: completing {key}",
                 lambda: self.store.complete_new(key, up.upload_id, up.etags, seg.file),  # type: ignore[arg-type]
                 self.log, stop=self._stopping)
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

    # --- base snapshots ---------------------------------------------------------------------

    def write_snapshot(self, txn: int) -> Snapshot:
        """Materialise the pool at `txn` from the archive itself (which also proves it restores),
        keeping that copy for the next time, and upload it as a base snapshot."""
        state = self.work_dir / "state"
        db_dir, blob_dir = state / "db", state / "blob"
        catalog = retrying(f"archive {self.database}: listing", self.store.catalog, self.log)
        plan = catalog.plan(txn=txn)
        self.log(f"archive {self.database}: writing a base snapshot at txn {txn}")
        sink = retrying(f"archive {self.database}: materialising txn {txn}",
                        lambda: materialise(self.store, self.codec, plan, db_dir, blob_dir, self.topic,
                                            self.work_dir, reuse=True), self.log)
        try:
            snap = retrying(f"archive {self.database}: uploading the snapshot at txn {txn}",
                            lambda: upload_snapshot(self.store, sink, db_dir, blob_dir), self.log)
        finally:
            sink.close()
        self._since_snapshot = (0, 0)
        self.log(f"archive {self.database}: base snapshot at txn {txn} stored")
        return snap


def upload_snapshot(store: ArchiveStore, sink: ReplicaDir, db_dir: Path, blob_dir: Path) -> Snapshot:
    """Upload the materialised pool as a base snapshot; the manifest goes last and makes it count."""
    position = sink.position()
    snap = Snapshot(position.txn_id, sink.source_time_ms)
    prefix = snap.prefix(store.root)
    for layout in sink.files:
        store.upload_file(f"{prefix}db/{hax(layout.file)}", db_dir / hax(layout.file))
    blobs: dict[str, int] = {}
    for path in sorted(_blob_files(blob_dir)):
        blobs[path] = (blob_dir / path).stat().st_size
        store.upload_file(f"{prefix}blob/{path}", blob_dir / path)
    manifest = Manifest(store.database, position.txn_id, position.checksum, sink.next_offset, sink.source_time_ms,
                        list(sink.files), blobs)
    store.put_new(snap.manifest_key(store.root), manifest.to_json())
    return snap


def _blob_files(blob_dir: Path) -> Iterator[str]:
    for root, dirs, names in os.walk(blob_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                yield os.path.relpath(os.path.join(root, name), blob_dir)


# --- restore --------------------------------------------------------------------------------


class _SegmentSource:
    """Transactions of a restore plan's segments, downloaded one at a time (a Source)."""

    def __init__(self, store: ArchiveStore, codec: Codec, plan: RestorePlan, topic: str, work_dir: Path,
                 progress: PROGRESS) -> None:
        self.store, self.codec, self.plan, self.topic, self.work_dir = store, codec, plan, topic, work_dir
        self.progress = progress
        self.last: Transaction | None = None

    def _records(self, after: Position) -> Iterator[Record]:
        for seg in self.plan.segments:
            if seg.last_txn <= after.txn_id:
                self.progress({"bytes": seg.size})
                continue
            key = seg.key(self.store.root)
            tmp = self.work_dir / f".segment-{os.getpid()}"
            try:
                self.store.download(key, tmp, lambda n: self.progress({"bytes": n}))
                with open(tmp, "rb") as fo:
                    yield from read_segment(fo, self.store.database, self.topic, key)
            finally:
                tmp.unlink(missing_ok=True)

    def _beyond(self, txn: Transaction) -> bool:
        if self.plan.target_txn is not None:
            return txn.txn_id > self.plan.target_txn
        return self.plan.time_ms is not None and txn.source_time_ms > self.plan.time_ms

    def transactions(self, after: Position) -> Iterator[Transaction]:
        txns = self.codec.read_transactions(self._records(after), self.store.database)
        return itertools.takewhile(lambda t: not self._beyond(t), txns)

    def buffered(self) -> bool:
        return True  # archived txns are all at hand: let the sink's batch caps decide when to commit

    def acknowledge(self, txn: Transaction) -> None:
        self.last = txn
        self.progress({"txn": txn.txn_id})


def materialise(store: ArchiveStore, codec: Codec, plan: RestorePlan, db_dir: Path, blob_dir: Path, topic: str,
                work_dir: Path, *, reuse: bool = False, progress: PROGRESS = lambda event: None) -> ReplicaDir:
    """Bring `db_dir`/`blob_dir` to the plan's target: the base, then the segments, checking txn ids
    and the rolling checksum after every txn (ReplicaDir). With `reuse`, a copy already between the
    base and the target only applies what it lacks. Returns the open ReplicaDir at the target."""
    sink: ReplicaDir | None = None
    if reuse and state_dir_for(f"{db_dir}/").exists():
        try:
            sink = ReplicaDir(f"{db_dir}/", store.database, blob_dir, topic=topic, group_commit=True)
        except PipelineError:
            sink = None
        if sink is not None:
            at = sink.position().txn_id
            if not (plan.start_txn <= at and (plan.target_txn is None or at <= plan.target_txn)):
                sink.close()
                sink = None
    if sink is None:
        for d in (db_dir, blob_dir):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        if plan.base is not None:
            _download_snapshot(store, plan.base, db_dir, blob_dir, topic, progress)
        try:
            sink = ReplicaDir(f"{db_dir}/", store.database, blob_dir, topic=topic, group_commit=True)
        except PipelineError as exc:
            raise PipelineError(f"base snapshot at txn {plan.base.txn if plan.base else '?'} does not match its "
                                f"manifest: {exc}", database=store.database) from exc
    try:
        source = _SegmentSource(store, codec, plan, topic, work_dir, progress)
        position = replicate(source, sink)
        if plan.target_txn is not None and position.txn_id != plan.target_txn:
            raise PipelineError(f"the archive ended at txn {position.txn_id} before the requested txn "
                                f"{plan.target_txn}", database=store.database, txn_id=position.txn_id)
    except BaseException:
        sink.close()
        raise
    return sink


def _download_snapshot(store: ArchiveStore, snap: Snapshot, db_dir: Path, blob_dir: Path, topic: str,
                       progress: PROGRESS) -> None:
    prefix = snap.prefix(store.root)
    manifest = Manifest.from_json(store.get(snap.manifest_key(store.root)), snap.manifest_key(store.root))
    if manifest.database != store.database or manifest.txn_id != snap.txn:
        raise PipelineError(f"snapshot {prefix} holds database {manifest.database!r} txn {manifest.txn_id}, not "
                            f"{store.database!r} txn {snap.txn}", database=store.database)
    for layout in manifest.files:
        path = db_dir / hax(layout.file)
        store.download(f"{prefix}db/{hax(layout.file)}", path, lambda n: progress({"bytes": n}))
        if path.stat().st_size != layout.blocks * layout.block_size:
            raise PipelineError(f"snapshot file {prefix}db/{hax(layout.file)} has {path.stat().st_size} bytes, "
                                f"the manifest says {layout.blocks * layout.block_size}", database=store.database)
    for rel, size in manifest.blobs.items():
        safe_blob_path(rel)
        dest = blob_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.download(f"{prefix}blob/{rel}", dest, lambda n: progress({"bytes": n}))
        if dest.stat().st_size != size:
            raise PipelineError(f"snapshot blob {prefix}blob/{rel} has {dest.stat().st_size} bytes, the manifest "
                                f"says {size}", database=store.database)
    state = state_dir_for(f"{db_dir}/")
    state.mkdir(parents=True, exist_ok=True)
    # ReplicaDir rescans the files and refuses them unless their checksum is the manifest's.
    write_position(state, store.database, topic, manifest.position, manifest.next_offset, manifest.source_time_ms,
                   manifest.files)


def plan_size(store: ArchiveStore, plan: RestorePlan) -> int:
    """Bytes a restore downloads (for the progress bar)."""
    total = sum(s.size for s in plan.segments)
    if plan.base is not None:
        total += sum(size for _, size in store.list(plan.base.prefix(store.root)))
    return total


def restore(store: ArchiveStore, codec: Codec, target: Path, *, txn: int | None = None, time_ms: int | None = None,
            topic: str, progress: PROGRESS = lambda event: None) -> Position:
    """Restore the pool at `txn` / `time_ms` (default: the newest) into `target`/db and `target`/blob.

    Everything happens in a temp directory beside `target`, renamed into place only once every
    txn applied with a matching checksum: on any error `target` is untouched.
    """
    target = target.absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PipelineError(f"restore target {target} exists and is not empty; give a new directory",
                            database=store.database)
    catalog = store.catalog()
    plan = catalog.plan(txn=txn, time_ms=time_ms)
    progress({"total_bytes": plan_size(store, plan), "plan": plan})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))
    try:
        sink = materialise(store, codec, plan, tmp / "db", tmp / "blob", topic, tmp, progress=progress)
        position = sink.position()
        sink.close()
        shutil.rmtree(state_dir_for(f"{tmp / 'db'}/"))  # the restored pool is a plain pool
        for leftover in tmp.glob(".segment-*"):
            leftover.unlink()
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return position
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- listing and retention ------------------------------------------------------------------


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def describe(catalog: Catalog, url: str) -> str:
    """`archive ls` / `restore --list`: snapshots, contiguous txn ranges with times, gaps, restore points."""
    lines = [f"archive of {catalog.database!r} at {url}"]
    lines.append(f"base snapshots: {len(catalog.snapshots)}")
    for s in catalog.snapshots:
        lines.append(f"  txn {s.txn:>10}  {_when(s.time_ms)}")
    runs = catalog.runs()
    lines.append(f"segments: {len(catalog.segments)} objects, {sum(s.size for s in catalog.segments)} bytes")
    for i, run in enumerate(runs):
        if i:
            lines.append(f"  GAP: txns {runs[i - 1][-1].last_txn + 1}-{run[0].first_txn - 1} are missing")
        lines.append(f"  txns {run[0].first_txn}-{run[-1].last_txn}  {_when(run[0].first_ms)} .. "
                     f"{_when(run[-1].last_ms)}  ({len(run)} objects, {sum(s.size for s in run)} bytes)")
    lines.append(catalog.describe_points())
    return "\n".join(lines)


def apply_retention(store: ArchiveStore, *, keep_snapshots: int | None, keep_ms: int | None, dry_run: bool,
                    log: Callable[[str], None] = print) -> list[str]:
    """Delete what the policy no longer needs (or only list it, with `dry_run`); returns the keys."""
    catalog = store.catalog()
    plan = retention_plan(catalog, keep_snapshots=keep_snapshots, keep_ms=keep_ms, now_ms=int(time.time() * 1000))
    keys = [s.key(store.root) for s in plan.delete_segments]
    for snap in plan.delete_snapshots:
        keys += sorted(k for k, _ in store.list(snap.prefix(store.root)))
    # Files of a snapshot an archiver was stopped in the middle of writing (no manifest): once a
    # newer snapshot is complete, nothing will ever finish or use them.
    newest = catalog.snapshots[-1].txn if catalog.snapshots else 0
    orphans = sorted(k for k, _ in store.list(f"{store.root}/snapshots/")
                     if (snap := Snapshot.parse(store.root, k, manifest=False)) is not None
                     and snap not in catalog.snapshots and snap.txn < newest)
    if plan.keep_from is None and not orphans:
        log("retention: no snapshot is old enough to be the oldest restore point; nothing to delete")
        return []
    keys += orphans
    if plan.keep_from is None:
        plan = RetentionPlan(None, [], [])
    verb = "would delete" if dry_run else "deleting"
    kept = (f"keeping everything from the snapshot at txn {plan.keep_from.txn} ({_when(plan.keep_from.time_ms)})"
            if plan.keep_from else "no snapshot is old enough to be the oldest restore point")
    log(f"retention: {kept}; {verb} {len(plan.delete_snapshots)} snapshots, {len(plan.delete_segments)} segments "
        f"and {len(orphans)} files of unfinished snapshots ({len(keys)} objects)")
    for key in keys:
        log(f"  {verb} {key}")
    if not dry_run and keys:
        # Manifests first: a half-deleted snapshot must not look complete.
        manifests = [k for k in keys if k.endswith("/manifest.json")]
        store.delete(manifests)
        store.delete([k for k in keys if k not in set(manifests)])
    return keys


def open_store(bucket_url: str, database: str, endpoint_url: str | None = None) -> ArchiveStore:
    bucket, prefix = parse_bucket_url(bucket_url)
    return ArchiveStore(s3_client(endpoint_url), bucket, prefix, database)

