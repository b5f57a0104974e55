"""The local replica: a PicoLisp pool directory applied atomically via a redo file, with its position beside it.

Group commit: the fsyncs of an apply cost far more than the writes (about ten per redo cycle), so a
ReplicaDir made with `group_commit=True` stages several transactions into ONE redo file and commits
them together in flush(): one redo fsync, one fsync per changed pool file, one position.json. Every
transaction is still verified against its own checksum as it is staged, and a batch only ever ends
at a transaction boundary, so the files always equal the source at some txn.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from connectors.faults import DiskFault, disk_fault
from connectors.files import fsync_dir, write_atomic, write_synced
from connectors.picolisp.blobs import blob_files
from connectors.picolisp.format import hax, lock_db_exclusive, pool_files, scan_blocks, unlock_db
from pipeline.checksum import RollingChecksum, block_hash
from pipeline.errors import PipelineError
from pipeline.model import (
    BlobChunk,
    BlobDelete,
    BlockBatch,
    BlockWrite,
    FileLayout,
    Position,
    Transaction,
    safe_blob_path,
)

STATE_DIR_NAME = ".pool-pipeline"
_FRAME = struct.Struct("<HQI")  # file, block index, length; then the block bytes
# Group commit caps: a batch is committed when its redo file reaches this size or txn count, so the
# memory a batch holds (one 8-byte hash per block it wrote) and the time PicoLisp readers wait on the
# byte-0 lock stay bounded.
MAX_BATCH_BYTES = 32 << 20
MAX_BATCH_TXNS = 5000
# Single-chunk blobs are held in memory until the batch commits, up to this many bytes per batch, so
# a blob rewritten by several txns of a batch costs one file: creating a file (an inode) is the
# dearest step of a blob here (~0.3 ms, more than fsyncing it). Larger blobs stream to a file.
MAX_HELD_BLOB_BYTES = 16 << 20
PARALLEL_FSYNC_FILES = 16  # a batch with this many blob files fsyncs them on a thread pool
# Space held in reserve before the commit point, beyond the pool files' growth: position.json.tmp and
# new blob directories are written after it, when a full disk could no longer be backed out of.
RESERVE_SLACK_BYTES = 64 << 10
# Temp files of an apply that never reached its commit point; removed on failure and at open.
RESERVE_NAME = "reserve"
TEMP_NAMES = ("redo.tmp", "position.json.tmp", RESERVE_NAME)


def _mount_of(path: Path) -> Path:
    """The mount point holding `path` (or its nearest existing ancestor)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def free_space(path: Path) -> str:
    """'<free> free on <mount>' for the filesystem holding `path`, as an operator wants to read it."""
    mount = _mount_of(path)
    try:
        st = os.statvfs(mount)
    except OSError:
        return f"free space on {mount} unknown"
    return f"{_fmt_bytes(st.f_bavail * st.f_frsize)} free on {mount}"


def reserve_space(path: Path, size: int) -> None:
    """Create `path` with `size` bytes allocated (not sparse): raises ENOSPC now rather than later."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            # No fallocate here (some network filesystems): write the bytes instead.
            view = memoryview(bytes(min(size, 1 << 20)))
            left = size
            while left > 0:
                left -= os.write(fd, view[:left])
    finally:
        os.close(fd)


def state_dir_for(target: str | Path) -> Path:
    """Where a replica keeps its position and redo file: beside the pool files."""
    return Path(str(target) + STATE_DIR_NAME) if not str(target).endswith("/") else Path(target) / STATE_DIR_NAME


class _Held(dict[str, bytes]):
    """Small blobs one txn staged in memory (staged file name -> data), with their total size."""

    total = 0  # bytes


def write_position(
    state: Path,
    database: str,
    topic: str | None,
    position: Position,
    next_offset: int,
    source_time_ms: int,
    files: list[FileLayout],
    batch: dict | None = None,
) -> None:
    """The replica's position record (position.json, written atomically): the truth a replica resumes
    from. Also how a restore adopts files it downloaded from a base snapshot."""
    write_atomic(
        state / "position.json",
        json.dumps(
            {
                "database": database,
                "topic": topic,
                "txn_id": position.txn_id,
                "checksum": position.checksum,
                "next_offset": next_offset,
                "source_time_ms": source_time_ms,
                "files": [f.__dict__ for f in files],
                "applied_at_ms": int(time.time() * 1000),
                **({"batch": batch} if batch else {}),  # the group commit that wrote it: first txn, txns
            },
            separators=(",", ":"),  # no indent: only the C encoder is fast, and this is written per group commit
        ).encode()
        + b"\n",
    )


@dataclass
class _BlobStage:
    chunk: BlobChunk
    tmp: Path
    fh: object
    sha: hashlib._Hash
    written: int
    next_index: int


@dataclass
class _Batch:
    """Transactions staged into redo.tmp and verified, not yet committed (flush() commits them)."""

    redo: BinaryIO
    files: list[FileLayout]  # the pool layout after the last staged txn
    position: Position  # after the last staged txn
    next_offset: int
    source_time_ms: int
    snapshot: bool = False
    fresh: RollingChecksum | None = None  # a snapshot's checksum, built from nothing
    overrides: dict[tuple[int, int], int] = field(default_factory=dict)  # block hashes after the batch
    blobs: dict[str, str] = field(default_factory=dict)  # blob path -> staged file name
    deletes: dict[str, None] = field(default_factory=dict)  # disjoint from blobs: the last op per path wins
    first_txn: int = 0
    txns: int = 0
    size: int = 0  # bytes in redo.tmp
    blob_seq: int = 0
    held: dict[str, bytes] = field(default_factory=dict)  # staged file name -> a small blob not written yet
    held_bytes: int = 0


class ReplicaDir:
    """A Sink that materialises one database as a byte-identical PicoLisp pool.

    Apply protocol (kill -9 safe at every step): stream the changes into redo.tmp while
    computing the new checksum; verify it; fsync and rename redo.tmp -> redo (the commit
    point); pwrite the blocks under PicoLisp's byte-0 write lock; fsync; move staged blobs
    into place; write position.json atomically; drop redo. On start, a complete redo is
    replayed (idempotent) and an incomplete one discarded.

    By default every apply() runs that whole cycle: the txn is visible and durable when it
    returns. With `group_commit=True` ("durable only at flush"), apply() only stages and verifies
    the txn; flush() commits all staged txns in one cycle, and so does apply() itself once the
    batch holds `max_batch_bytes` or `max_batch_txns`, or the txn is a snapshot (always a batch of
    its own). Until then position(), next_offset and files describe the last committed txn, which
    is also what a kill -9 leaves. Call flush() before close(): close() discards what is staged.
    pipeline.replicate() flushes whenever its source has nothing more already fetched.
    """

    def __init__(
        self,
        target: str | Path,
        database: str,
        blob_dir: str | Path | None = None,
        *,
        topic: str | None = None,
        group_commit: bool = False,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        max_batch_txns: int = MAX_BATCH_TXNS,
    ) -> None:
        self.group_commit = group_commit
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_txns = max_batch_txns
        self._batch: _Batch | None = None
        self._broken: str | None = None  # a commit failed after its commit point: only a restart replays it
        self._safe_dirs: set[Path] = set()  # blob directories checked to resolve inside --blob (this batch)
        self._pool: ThreadPoolExecutor | None = None  # for many blob fsyncs (catch-up batches)
        self.prefix = str(target)
        self.database = database
        self.topic = topic
        self.blob_dir = Path(blob_dir) if blob_dir else None
        self.state = state_dir_for(target)
        self.pool_dir = Path(self.prefix).parent if not self.prefix.endswith("/") else Path(self.prefix)
        self._pos_file = self.state / "position.json"
        self._redo = self.state / "redo"
        self._fds: dict[int, int] = {}
        self.next_offset = 0
        self.source_time_ms = 0
        self._position = Position(0, 0)
        self.files: list[FileLayout] = []
        self._lock_fd = -1
        try:
            self._open()
        except OSError as exc:
            fault = disk_fault(exc)
            if self._lock_fd >= 0:
                self.close()
            if fault is None:
                raise
            if self._pos_file.exists():  # failed before reading it (a read-only target): say where it stands
                try:
                    self._load_position()
                except (OSError, PipelineError):
                    pass
            raise self._fault_error(exc, fault, self.state) from None

    def _open(self) -> None:
        """Take the replica's lock, load its position, finish or discard an interrupted apply, verify the files."""
        database = self.database
        self.pool_dir.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(exist_ok=True)
        if self.blob_dir is not None:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            self._blob_real = os.path.realpath(self.blob_dir)
            self._blob_real_slash = self._blob_real.rstrip("/") + "/"
        lock_fd = os.open(self.state / "replica.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise PipelineError(
                f"another replica process is applying to {self.prefix} (lock {self.state / 'replica.lock'})",
                database=database,
                retriable=True,
            ) from None
        self._lock_fd = lock_fd
        self._load_position()
        self._recover()
        self.checksum = self._scan_checksum()
        if self.checksum.value != self._position.checksum:
            raise PipelineError(
                f"replica files in {self.prefix} were changed outside pool-pipeline: their checksum is "
                f"{self.checksum.value:016x}, the stored position says {self._position.checksum:016x}; "
                "start a fresh replica directory",
                database=database,
                txn_id=self._position.txn_id,
            )

    def _fault_error(
        self,
        exc: OSError,
        fault: DiskFault,
        default_path: Path,
        first_txn: int | None = None,
        last_txn: int | None = None,
        committed: bool = False,
    ) -> PipelineError:
        """One line for a full or read-only target: what could not be written, the free space, where the
        replica stands and what is (not) applied, and what to do. Never retriable: waiting does not free space."""
        path = Path(exc.filename) if exc.filename else default_path
        at = f"at txn {self._position.txn_id}"
        if first_txn is not None and last_txn is not None:
            txns = f"txn {last_txn}" if first_txn == last_txn else f"txns {first_txn}..{last_txn}"
            if committed:  # past the commit point: the redo file holds them and the next start replays them
                at += f", {txns} committed in {self._redo} and replayed at the next start"
            else:
                at += f", nothing of {txns} applied"
        return PipelineError(
            f"replica {self.database}: cannot write {path}: {fault.reason} "
            f"({free_space(path)}); {at}; {fault.remedy} and restart",
            database=self.database,
            txn_id=last_txn,
        )

    # --- position ---------------------------------------------------------------------------

    def _load_position(self) -> None:
        if self._pos_file.exists():
            try:
                state = json.loads(self._pos_file.read_text())
            except ValueError as exc:
                raise PipelineError(f"{self._pos_file} is unreadable: {exc}", database=self.database) from exc
            if state.get("database") != self.database:
                raise PipelineError(
                    f"replica directory {self.prefix} holds database {state.get('database')!r}, "
                    f"not {self.database!r}; refusing to mix them",
                    database=self.database,
                )
            self._position = Position(state["txn_id"], state["checksum"])
            self.next_offset = state["next_offset"]
            self.source_time_ms = state.get("source_time_ms", 0)
            self.files = [FileLayout(**f) for f in state["files"]]
        elif pool_files(self.prefix) and not self._redo.exists() and not (self.state / "adopt").exists():
            # (a committed first batch or an adopt under way: _recover finishes it)
            raise PipelineError(
                f"{self.prefix} already holds pool files that pool-pipeline did not write (no "
                f"{self._pos_file}); refusing to overwrite them",
                database=self.database,
            )

    def position(self) -> Position:
        """The last committed (durable, visible) position: what position.json says."""
        return self._position

    def pending(self) -> int:
        """How many applied txns are staged but not flushed yet (group commit)."""
        return self._batch.txns if self._batch is not None else 0

    def _store_position(
        self,
        position: Position,
        next_offset: int,
        source_time_ms: int,
        files: list[FileLayout],
        batch: dict | None = None,
    ) -> None:
        write_position(self.state, self.database, self.topic, position, next_offset, source_time_ms, files, batch)
        self._position, self.next_offset, self.source_time_ms, self.files = position, next_offset, source_time_ms, files

    # --- files ----------------------------------------------------------------------------

    def _path(self, file: int) -> Path:
        return Path(self.prefix + hax(file))

    def _fd(self, file: int) -> int:
        # One descriptor per file for the sink's life: closing any descriptor of '@' would
        # drop this process's fcntl lock on it (POSIX), see connectors/picolisp/FORMAT.md §3.3.
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self._path(file), os.O_RDWR | os.O_CREAT, 0o644)
        return fd

    def _scan_checksum(self) -> RollingChecksum:
        rolling = RollingChecksum()
        for layout in self.files:
            size = os.fstat(self._fd(layout.file)).st_size
            if size != layout.blocks * layout.block_size:
                raise PipelineError(
                    f"replica file {self._path(layout.file)} has {size} bytes, expected "
                    f"{layout.blocks} x {layout.block_size}",
                    database=self.database,
                    txn_id=self._position.txn_id,
                )
        for block in scan_blocks(self._fd, self.files):
            rolling.set_block(block.file, block.index, block.data)
        return rolling

    # --- blobs ------------------------------------------------------------------------------

    def blob_target(self, path: str) -> Path:
        """The replica path of a blob, refusing anything that would land outside --blob."""
        assert self.blob_dir is not None
        safe_blob_path(path)
        dest = self.blob_dir / path
        parent = dest.parent
        if parent not in self._safe_dirs:
            # A symlinked directory inside the blob dir could still lead outside it: the path must
            # resolve inside (realpath follows the links of the part that exists; the path has no
            # '..'). Checked once per directory and batch (it cost more than writing a small blob).
            real = os.path.realpath(parent)
            if not (real == self._blob_real or real.startswith(self._blob_real_slash)):
                raise PipelineError(
                    f"blob path {path!r} resolves outside the blob directory {self.blob_dir}", database=self.database
                )
            self._safe_dirs.add(parent)
        return dest

    # --- apply --------------------------------------------------------------------------------

    def apply(self, txn: Transaction) -> None:
        """Stage `txn` into the current batch and verify its checksum; nothing of it is visible yet.

        Without group commit the batch is committed at once, so the txn is visible and durable when
        this returns. With group commit that happens at the next flush(), or here when the batch
        reached its size cap or the txn is a snapshot. On any error nothing of `txn` is staged
        (txns staged before it stay in the batch) and the stored position is unchanged.
        """
        if self._broken is not None:
            raise PipelineError(
                f"an earlier apply failed after its commit point ({self._broken}); restart to replay {self._redo}",
                database=self.database,
                txn_id=txn.txn_id,
                offset=txn.offset,
            )
        if txn.snapshot and self._batch is not None:
            self.flush()  # a snapshot replaces the whole pool: it is a batch of its own
        first = self._batch.first_txn if self._batch is not None and self._batch.txns else txn.txn_id
        try:
            batch = self._batch if self._batch is not None else self._open_batch()
            mark = batch.redo.tell()
        except OSError as exc:
            self.discard()
            fault = disk_fault(exc)
            if fault is None:
                raise
            raise self._fault_error(exc, fault, self.state / "redo.tmp", first, txn.txn_id) from None
        try:
            self._stage(txn, batch)
        except OSError as exc:
            fault = disk_fault(exc)
            if fault is None:
                self._drop_txn(batch, mark)
                raise
            # The batch's buffered frames cannot be written either (a seek back would flush them): the
            # txns staged before this one go too, and are read again after the restart.
            self._discard(batch)
            raise self._fault_error(exc, fault, self.state / "redo.tmp", first, txn.txn_id) from None
        except BaseException as exc:
            self._drop_txn(batch, mark)
            if isinstance(exc, PipelineError):  # e.g. a blob path check: name the txn at fault
                raise exc.with_context(database=txn.database, txn_id=txn.txn_id, offset=txn.offset) from None
            raise
        if (
            not self.group_commit
            or batch.snapshot
            or batch.size >= self.max_batch_bytes
            or batch.txns >= self.max_batch_txns
        ):
            self.flush()

    def _drop_txn(self, batch: _Batch, mark: int) -> None:
        """Drop the frames of the txn being staged; its staged blob files are unreferenced and go with the stage dir."""
        try:
            batch.redo.seek(mark)
            batch.redo.truncate(mark)
        except OSError:
            self._discard(batch)  # cannot cut the txn out: drop the batch, as if never staged
            raise
        if batch.txns == 0:
            self._discard(batch)

    def flush(self) -> None:
        """Commit every staged txn in one redo/fsync cycle; afterwards position() is the last one's.

        Order (kill -9 safe at every step): trailer + fsync redo.tmp, fsync staged blobs, rename to
        redo (the commit point), pwrite under PicoLisp's byte-0 lock, fsync the changed pool files,
        move the blobs into place, write position.json atomically, drop redo.
        """
        batch, self._batch = self._batch, None
        if batch is None:
            return
        if batch.txns == 0:
            self._discard(batch)
            return
        plan = {
            "txn_id": batch.position.txn_id,
            "checksum": batch.position.checksum,
            "snapshot": batch.snapshot,
            "next_offset": batch.next_offset,
            "source_time_ms": batch.source_time_ms,
            "files": [f.__dict__ for f in batch.files],
            "blobs": batch.blobs,
            "deletes": list(batch.deletes),
            "first_txn": batch.first_txn,
            "txns": batch.txns,
        }
        try:
            trailer = json.dumps(plan).encode()
            batch.redo.write(trailer + struct.pack("<Q", len(trailer)))
            batch.redo.flush()
            os.fsync(batch.redo.fileno())
            batch.redo.close()
            if batch.blobs:
                stage = self.state / "stage"
                jobs = [(stage / name, batch.held.get(name)) for name in batch.blobs.values()]  # versions kept
                batch.held.clear()
                if len(jobs) < PARALLEL_FSYNC_FILES:
                    for path, data in jobs:
                        write_synced(path, data)
                else:  # concurrent fsyncs share the filesystem journal's commits
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="replica-fsync")
                    list(self._pool.map(lambda job: write_synced(*job), jobs))  # list(): re-raise an error
                fsync_dir(stage)
            # What the replay writes after the commit point (the files' growth, position.json.tmp) is
            # allocated now, so a full disk stops the batch here, where it can still be backed out of.
            reserve = self.state / RESERVE_NAME
            reserve_space(reserve, self._growth(batch.files) + len(trailer) + RESERVE_SLACK_BYTES)
        except BaseException as exc:
            self._discard(batch)  # before the commit point: as if never staged; position() is unchanged
            fault = disk_fault(exc)
            if fault is None or not isinstance(exc, OSError):  # disk_fault() finds a fault in OSErrors only
                raise
            raise self._fault_error(
                exc, fault, self.state / "redo.tmp", batch.first_txn, batch.position.txn_id
            ) from None
        try:
            os.replace(self.state / "redo.tmp", self._redo)  # the commit point: from here on the batch is applied
            fsync_dir(self.state)
            reserve.unlink()  # hands its space to the replay
            self._replay(plan)
        except BaseException as exc:
            fault = disk_fault(exc)
            if not self._redo.exists():  # the rename itself failed: still before the commit point
                self._discard(batch)
                if fault is None or not isinstance(exc, OSError):
                    raise
                raise self._fault_error(exc, fault, self._redo, batch.first_txn, batch.position.txn_id) from None
            self._broken = f"{type(exc).__name__}: {exc}"
            if fault is None or not isinstance(exc, OSError):
                raise
            raise self._fault_error(
                exc, fault, Path(self.prefix), batch.first_txn, batch.position.txn_id, committed=True
            ) from None
        if batch.fresh is not None:
            self.checksum = batch.fresh
        else:
            set_hash = self.checksum.set_hash
            for (file, index), h in batch.overrides.items():
                set_hash(file, index, h)

    def _growth(self, files: list[FileLayout]) -> int:
        """Bytes the pool files grow by when they take the layout `files`."""
        old = {f.file: f.blocks * f.block_size for f in self.files}
        return sum(max(0, f.blocks * f.block_size - old.get(f.file, 0)) for f in files)

    def discard(self) -> None:
        """Drop the staged, unflushed txns (they were never visible; position() still precedes them)."""
        batch, self._batch = self._batch, None
        if batch is not None:
            self._discard(batch)

    def _open_batch(self) -> _Batch:
        stage_dir = self.state / "stage"
        if stage_dir.exists():
            shutil.rmtree(stage_dir)  # left by an interrupted apply
        stage_dir.mkdir()
        redo = open(self.state / "redo.tmp", "wb", buffering=1 << 20)
        self._batch = _Batch(redo, list(self.files), self._position, self.next_offset, self.source_time_ms)
        return self._batch

    def _discard(self, batch: _Batch) -> None:
        if self._batch is batch:
            self._batch = None
        try:
            batch.redo.close()  # flushes its buffer: fails again on a full disk, yet closes the file
        except OSError:
            pass
        self._remove_temp_files(stage=True)

    def _remove_temp_files(self, *, stage: bool) -> None:
        """Remove what an apply that never reached its commit point left (a full disk must not stay full).

        Never the committed redo: recovery replays it, and the stage dir holds its blobs then.
        """
        for name in TEMP_NAMES:
            try:
                (self.state / name).unlink(missing_ok=True)
            except OSError:
                pass  # a read-only target: nothing to free, and the error being reported says why
        if stage:
            shutil.rmtree(self.state / "stage", ignore_errors=True)

    def _stage(self, txn: Transaction, batch: _Batch) -> None:
        """Append every change of `txn` to the batch's redo file and staged blobs, verify the checksum
        the txn promises, then fold it into the batch. On an error the batch is left as it was
        (the caller truncates the redo file back)."""
        snapshot = txn.snapshot
        current = {f.file: f for f in batch.files}
        fresh = RollingChecksum() if snapshot else None
        over: dict[tuple[int, int], int] = {}  # this txn's block hashes
        value = 0 if snapshot else batch.position.checksum
        sizes: dict[int, int] = {}
        max_index: dict[int, int] = {}
        ops: dict[str, str | None] = {}  # blob path -> staged file name, or None for a delete; last wins
        held = _Held()  # staged file name -> data, for this txn's small blobs
        blob: _BlobStage | None = None
        count = 0
        redo_write = batch.redo.write
        pack = _FRAME.pack
        batch_hash = batch.overrides.get
        pool_hash = self.checksum.hash_at
        try:
            for change in txn.changes:
                kind = type(change)
                if kind is BlockBatch or kind is BlockWrite:
                    if blob is not None:
                        raise txn.error(
                            f"blob {blob.chunk.path} is incomplete: chunk {blob.next_index} of "
                            f"{blob.chunk.count} missing"
                        )
                    # A run of one file's blocks as it travelled (a BlockBatch), or one block.
                    if kind is BlockBatch:
                        file, width, indexes, data = change.file, change.block_size, change.indexes, change.data  # type: ignore[union-attr]
                    else:
                        file, width, indexes, data = change.file, len(change.data), [change.index], change.data  # type: ignore[union-attr]
                    count += len(indexes)
                    size = sizes.get(file)
                    if size is None:
                        size = sizes[file] = width
                    elif size != width:
                        raise txn.error(f"file {file}: blocks of {size} and {width} bytes")
                    top = max(indexes)
                    if top > max_index.get(file, -1):
                        max_index[file] = top
                    view = memoryview(data)
                    for k, index in enumerate(indexes):
                        block = view[k * size : (k + 1) * size]
                        redo_write(pack(file, index, size))
                        redo_write(block)
                        new = block_hash(file, index, block)
                        if fresh is not None:
                            fresh.set_hash(file, index, new)
                        else:
                            key = (file, index)
                            old = over.get(key)
                            if old is None:
                                old = batch_hash(key)
                                if old is None:
                                    old = pool_hash(file, index)
                            value ^= old ^ new
                            over[key] = new
                    continue
                count += 1
                if isinstance(change, BlobChunk):
                    blob = self._stage_chunk(txn, blob, change, batch, ops, held)
                else:
                    assert isinstance(change, BlobDelete), f"unexpected change {type(change).__name__}"
                    if blob is not None:
                        raise txn.error(f"blob {blob.chunk.path} is incomplete")
                    safe_blob_path(change.path)
                    ops[change.path] = None
            if blob is not None:
                raise txn.error(f"blob {blob.chunk.path} is incomplete at the end of the transaction")
        finally:
            if blob is not None:
                blob.fh.close()  # type: ignore[attr-defined]
        layout = txn.validate_trailer()
        if count != txn.change_count:
            raise txn.error(f"staged {count} changes, the transaction has {txn.change_count}")
        for file, size in sizes.items():
            f = layout.get(file)
            if f is None or f.block_size != size or max_index[file] >= f.blocks:
                raise txn.error(f"block writes to file {file} do not fit the layout {f}")
        # Blocks in the layout that no change wrote are zero-filled by the extension.
        for f in layout.values():
            old_layout = current.get(f.file)
            if not snapshot and old_layout is not None:
                if f.block_size != old_layout.block_size or f.blocks < old_layout.blocks:
                    raise txn.error(f"file {f.file} changed shape from {old_layout} to {f} outside a snapshot")
            first = 0 if snapshot or old_layout is None else old_layout.blocks
            zero = bytes(f.block_size)
            for index in range(first, f.blocks):
                if fresh is not None:
                    if fresh.hash_at(f.file, index) == 0:
                        fresh.set_block(f.file, index, zero)
                elif (f.file, index) not in over:
                    new = block_hash(f.file, index, zero)
                    value ^= new  # a block beyond the file's old end contributed nothing
                    over[(f.file, index)] = new
        if fresh is not None:
            value = fresh.value
        if value != txn.checksum_after:
            raise txn.error(
                f"checksum mismatch: after applying, the replica would be {value:016x} but the source "
                f"was {txn.checksum_after:016x}; the replica stays at txn {batch.position.txn_id}"
            )
        # Verified: fold the txn into the batch.
        if fresh is not None:
            batch.snapshot, batch.fresh = True, fresh
        else:
            batch.overrides.update(over)
        if held:
            batch.held.update(held)
            batch.held_bytes += held.total
        for path, name in ops.items():
            if name is None:
                batch.blobs.pop(path, None)
                batch.deletes[path] = None
            else:
                batch.deletes.pop(path, None)
                batch.blobs[path] = name
        if batch.txns == 0:
            batch.first_txn = txn.txn_id
        batch.txns += 1
        batch.position = txn.after
        batch.files = list(txn.files)
        if txn.end_offset is not None:
            batch.next_offset = txn.end_offset + 1
        batch.source_time_ms = txn.source_time_ms
        batch.size = batch.redo.tell() + batch.held_bytes

    def _stage_chunk(
        self,
        txn: Transaction,
        blob: _BlobStage | None,
        chunk: BlobChunk,
        batch: _Batch,
        ops: dict[str, str | None],
        held: _Held,
    ) -> _BlobStage | None:
        if self.blob_dir is None:
            raise txn.error("the stream carries blobs but this replica has no --blob directory")
        if blob is None:
            self.blob_target(chunk.path)  # later chunks must carry the same path (checked below)
            if chunk.index != 0:
                raise txn.error(f"blob {chunk.path} starts at chunk {chunk.index}")
            name = f"{batch.blob_seq}.blob"
            batch.blob_seq += 1
            if (
                chunk.count == 1
                and not txn.snapshot
                and batch.held_bytes + held.total + len(chunk.data) <= MAX_HELD_BLOB_BYTES
            ):
                if len(chunk.data) != chunk.size or hashlib.sha256(chunk.data).hexdigest() != chunk.sha256:
                    raise txn.error(
                        f"blob {chunk.path}: got {len(chunk.data)} bytes sha256 "
                        f"{hashlib.sha256(chunk.data).hexdigest()[:16]}…, expected {chunk.size} bytes "
                        f"sha256 {chunk.sha256[:16]}…"
                    )
                held[name] = chunk.data  # written by flush() if no later txn of the batch replaces it
                held.total += len(chunk.data)
                ops[chunk.path] = name
                return None
            tmp = self.state / "stage" / name
            blob = _BlobStage(chunk, tmp, open(tmp, "wb"), hashlib.sha256(), 0, 0)
        elif chunk.path != blob.chunk.path or chunk.index != blob.next_index or chunk.count != blob.chunk.count:
            raise txn.error(
                f"blob {blob.chunk.path}: expected chunk {blob.next_index}, got {chunk.path} chunk {chunk.index}"
            )
        blob.fh.write(chunk.data)  # type: ignore[attr-defined]
        blob.sha.update(chunk.data)
        blob.written += len(chunk.data)
        blob.next_index += 1
        if blob.next_index < chunk.count:
            return blob
        blob.fh.close()  # type: ignore[attr-defined]  # fsynced by flush(), once per batch, if still wanted
        if blob.written != chunk.size or blob.sha.hexdigest() != chunk.sha256:
            raise txn.error(
                f"blob {chunk.path}: got {blob.written} bytes sha256 {blob.sha.hexdigest()[:16]}…, "
                f"expected {chunk.size} bytes sha256 {chunk.sha256[:16]}…"
            )
        ops[chunk.path] = blob.tmp.name
        return None

    def _replay(self, plan: dict | None = None) -> None:
        """Apply the committed redo file to the pool files and blobs; safe to repeat.

        Frames are pwritten in redo order, so where several txns of a batch wrote one block the
        last image wins; the files then take the batch's final layout (growth is zero-filled).
        """
        with open(self._redo, "rb", buffering=1 << 20) as redo:
            redo.seek(-8, os.SEEK_END)
            (length,) = struct.unpack("<Q", redo.read(8))
            end = redo.seek(-8 - length, os.SEEK_END)
            if plan is None:
                plan = json.loads(redo.read(length))
            redo.seek(0)
            files = [FileLayout(**f) for f in plan["files"]]
            lock_fd = self._fd(0)
            lock_db_exclusive(lock_fd)  # PicoLisp readers see the transactions whole or not at all
            try:
                written: set[int] = set()
                read, unpack, pwrite, fd_of = redo.read, _FRAME.unpack, os.pwrite, self._fd
                pos, header = 0, _FRAME.size
                while pos < end:
                    file, index, size = unpack(read(header))
                    pwrite(fd_of(file), read(size), index * size)
                    pos += header + size
                    written.add(file)
                for f in files:
                    fd = self._fd(f.file)
                    if os.fstat(fd).st_size != f.blocks * f.block_size:
                        os.ftruncate(fd, f.blocks * f.block_size)
                        written.add(f.file)
                for file in sorted(written):  # only what changed: fsync is most of an apply's cost
                    os.fsync(self._fd(file))
                if plan["snapshot"]:
                    for extra in pool_files(self.prefix)[len(files) :]:
                        os.unlink(extra)  # the snapshot's pool has fewer files than the replica had
                self._apply_blobs(plan)
                position = Position(plan["txn_id"], plan["checksum"])
                batch = {"first_txn": plan["first_txn"], "txns": plan["txns"]} if "txns" in plan else None
                self._store_position(position, plan["next_offset"], plan["source_time_ms"], files, batch)
            finally:
                unlock_db(lock_fd)
        self._redo.unlink()
        shutil.rmtree(self.state / "stage", ignore_errors=True)
        self._safe_dirs.clear()

    def _apply_blobs(self, plan: dict) -> None:
        """Move the batch's staged blobs into place and delete what it deleted, then fsync every directory
        that changed: position.json, written next, must not claim a blob whose rename a power cut can undo."""
        if self.blob_dir is None:
            return
        stage = self.state / "stage"
        made: set[Path] = set()
        changed: set[Path] = set()
        for path, name in plan["blobs"].items():
            dest = self.blob_target(path)
            src = stage / name
            changed.add(dest.parent)
            if src.exists():  # absent when a replay already moved it
                if dest.parent not in made:
                    new = dest.parent
                    while not new.exists() and new != self.blob_dir:  # new dirs are entries of their parents
                        changed.add(new.parent)
                        new = new.parent
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    made.add(dest.parent)
                os.replace(src, dest)
        for path in plan["deletes"]:
            target = self.blob_target(path)
            target.unlink(missing_ok=True)
            changed.add(target.parent)
        if plan["snapshot"]:
            for rel in set(blob_files(self.blob_dir)) - set(plan["blobs"]):
                os.unlink(self.blob_dir / rel)
                changed.add((self.blob_dir / rel).parent)
        for d in sorted(changed):
            if d.is_dir():  # a deleted blob's directory may never have existed here
                fsync_dir(d)

    # --- adopting a pool restored elsewhere (replica --archive) --------------------------------

    @property
    def bootstrap_dir(self) -> Path:
        """Where a new replica restores from the archive before adopt(): inside the state dir, so on the
        same filesystem as the pool files (and, like the stage dir, as the blobs)."""
        return self.state / "bootstrap"

    def adopt(self, checksum: RollingChecksum | None = None) -> None:
        """Take over the replica restored in bootstrap_dir (its db/ with its own position, and blob/).

        Only an empty replica (txn 0, no pool files, no blobs) adopts, so nothing anyone reads is
        replaced. The marker file `adopt` is the commit point: after it the files are moved in by
        rename and position.json comes last; a restart after a kill finishes the moves (_recover).
        `checksum`: the restored replica's own, kept as it was verified (renaming does not change a
        byte), which spares reading the whole pool again; without it the files are scanned.
        """
        staged = self.bootstrap_dir / "db"
        if self._position.txn_id != 0 or pool_files(self.prefix):
            raise PipelineError(
                f"replica {self.prefix} is not empty (at txn {self._position.txn_id}); only an empty replica "
                "is bootstrapped from the archive",
                database=self.database,
                txn_id=self._position.txn_id,
            )
        if self.blob_dir is not None and blob_files(self.blob_dir):
            raise PipelineError(
                f"blob directory {self.blob_dir} of the empty replica {self.prefix} holds files; give an empty "
                "one to bootstrap from the archive",
                database=self.database,
            )
        if not (state_dir_for(f"{staged}/") / "position.json").exists():
            raise PipelineError(f"nothing restored in {staged} to adopt", database=self.database)
        write_synced(self.state / "adopt", b"bootstrap/\n")
        fsync_dir(self.state)
        self._adopt()
        self._load_position()
        self.checksum = checksum if checksum is not None else self._scan_checksum()
        if self.checksum.value != self._position.checksum:
            raise PipelineError(
                f"the pool adopted from the archive in {self.prefix} has checksum {self.checksum.value:016x}, "
                f"its position says {self._position.checksum:016x}",
                database=self.database,
                txn_id=self._position.txn_id,
            )

    def _adopt(self) -> None:
        """Move the restored pool files and blobs in, then its position; safe to repeat after a kill."""
        staged_db, staged_blob = self.bootstrap_dir / "db", self.bootstrap_dir / "blob"
        staged_position = state_dir_for(f"{staged_db}/") / "position.json"
        if staged_position.exists():  # else it was moved last: everything else is in place
            # The layout, not a listing: after a kill some files are moved already.
            for layout in json.loads(staged_position.read_text())["files"]:
                src = staged_db / hax(layout["file"])
                if src.exists():
                    os.replace(src, self._path(layout["file"]))
            dirs = {self.pool_dir}
            if self.blob_dir is not None and staged_blob.exists():
                for rel in blob_files(staged_blob):
                    dest = self.blob_target(rel)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged_blob / rel, dest)
                    dirs.add(dest.parent)
            for d in sorted(dirs):
                fsync_dir(d)
            os.replace(staged_position, self._pos_file)
            fsync_dir(self.state)
        for fd in self._fds.values():  # descriptors of files the pool had before, if any
            os.close(fd)
        self._fds.clear()
        if self.bootstrap_dir.exists():
            shutil.rmtree(self.bootstrap_dir)
        (self.state / "adopt").unlink()
        fsync_dir(self.state)

    def _recover(self) -> None:
        if (self.state / "adopt").exists():  # killed while adopting a bootstrap: finish it
            self._adopt()
            self._load_position()
        # Staged but never committed (a killed or failed run): discard, so its space comes back. The
        # stage dir belongs to a committed redo, if there is one, until its replay moved the blobs.
        for name in TEMP_NAMES:
            (self.state / name).unlink(missing_ok=True)  # raises on a read-only target: reported as such
        if self._redo.exists():
            self._replay()
        elif (self.state / "stage").exists():
            shutil.rmtree(self.state / "stage")

    def close(self) -> None:
        """Release the replica; txns staged and not flushed are discarded (never visible, read again later)."""
        self.discard()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
