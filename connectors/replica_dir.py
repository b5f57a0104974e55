"""The local replica: a PicoLisp pool directory applied atomically via a redo file, with its position beside it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from connectors.picolisp import hax, lock_db_exclusive, pool_files, unlock_db
from pipeline.checksum import RollingChecksum, block_hash
from pipeline.errors import PipelineError
from pipeline.model import (
    BlobChunk,
    BlobDelete,
    BlockWrite,
    FileLayout,
    Position,
    Transaction,
    safe_blob_path,
)

STATE_DIR_NAME = ".pool-pipeline"
_FRAME = struct.Struct("<HQI")  # file, block index, length; then the block bytes


def state_dir_for(target: str | Path) -> Path:
    """Where a replica keeps its position and redo file: beside the pool files."""
    return Path(str(target) + STATE_DIR_NAME) if not str(target).endswith("/") else Path(target) / STATE_DIR_NAME


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename, fsync dir: readers see the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class _BlobStage:
    chunk: BlobChunk
    tmp: Path
    fh: object
    sha: "hashlib._Hash"
    written: int
    next_index: int


class ReplicaDir:
    """A Sink that materialises one database as a byte-identical PicoLisp pool.

    Apply protocol (kill -9 safe at every step): stream the changes into redo.tmp while
    computing the new checksum; verify it; fsync and rename redo.tmp -> redo (the commit
    point); pwrite the blocks under PicoLisp's byte-0 write lock; fsync; move staged blobs
    into place; write position.json atomically; drop redo. On start, a complete redo is
    replayed (idempotent) and an incomplete one discarded.
    """

    def __init__(self, target: str | Path, database: str, blob_dir: str | Path | None = None,
                 *, topic: str | None = None) -> None:
        self.prefix = str(target)
        self.database = database
        self.topic = topic
        self.blob_dir = Path(blob_dir) if blob_dir else None
        self.state = state_dir_for(target)
        self.pool_dir = Path(self.prefix).parent if not self.prefix.endswith("/") else Path(self.prefix)
        self.pool_dir.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(exist_ok=True)
        if self.blob_dir is not None:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            self._blob_root = self.blob_dir.resolve()
        self._lock_fd = os.open(self.state / "replica.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise PipelineError(f"another replica process is applying to {self.prefix} (lock "
                                f"{self.state / 'replica.lock'})", database=database, retriable=True) from None
        self._pos_file = self.state / "position.json"
        self._redo = self.state / "redo"
        self._fds: dict[int, int] = {}
        self.next_offset = 0
        self.source_time_ms = 0
        self._position = Position(0, 0)
        self.files: list[FileLayout] = []
        self._load_position()
        self._recover()
        self.checksum = self._scan_checksum()
        if self.checksum.value != self._position.checksum:
            raise PipelineError(
                f"replica files in {self.prefix} were changed outside pool-pipeline: their checksum is "
                f"{self.checksum.value:016x}, the stored position says {self._position.checksum:016x}; "
                "start a fresh replica directory",
                database=database, txn_id=self._position.txn_id)

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
                    f"not {self.database!r}; refusing to mix them", database=self.database)
            self._position = Position(state["txn_id"], state["checksum"])
            self.next_offset = state["next_offset"]
            self.source_time_ms = state.get("source_time_ms", 0)
            self.files = [FileLayout(**f) for f in state["files"]]
        elif pool_files(self.prefix):
            raise PipelineError(
                f"{self.prefix} already holds pool files that pool-pipeline did not write (no "
                f"{self._pos_file}); refusing to overwrite them", database=self.database)

    def position(self) -> Position:
        return self._position

    def _store_position(self, position: Position, next_offset: int, source_time_ms: int,
                        files: list[FileLayout]) -> None:
        write_atomic(self._pos_file, json.dumps({
            "database": self.database, "topic": self.topic, "txn_id": position.txn_id,
            "checksum": position.checksum, "next_offset": next_offset, "source_time_ms": source_time_ms,
            "files": [f.__dict__ for f in files], "applied_at_ms": int(time.time() * 1000),
        }, indent=1).encode())
        self._position, self.next_offset, self.source_time_ms, self.files = position, next_offset, source_time_ms, files

    # --- files ----------------------------------------------------------------------------

    def _path(self, file: int) -> Path:
        return Path(self.prefix + hax(file))

    def _fd(self, file: int) -> int:
        # One descriptor per file for the sink's life: closing any descriptor of '@' would
        # drop this process's fcntl lock on it (POSIX), see picolisp-format.md §3.3.
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self._path(file), os.O_RDWR | os.O_CREAT, 0o644)
        return fd

    def _scan_checksum(self) -> RollingChecksum:
        rolling = RollingChecksum()
        for layout in self.files:
            fd = self._fd(layout.file)
            size = os.fstat(fd).st_size
            if size != layout.blocks * layout.block_size:
                raise PipelineError(
                    f"replica file {self._path(layout.file)} has {size} bytes, expected "
                    f"{layout.blocks} x {layout.block_size}", database=self.database, txn_id=self._position.txn_id)
            step = max(1, (4 * 1024 * 1024) // layout.block_size)
            for first in range(0, layout.blocks, step):
                n = min(step, layout.blocks - first)
                buf = os.pread(fd, n * layout.block_size, first * layout.block_size)
                for k in range(n):
                    off = k * layout.block_size
                    rolling.set_block(layout.file, first + k, buf[off:off + layout.block_size])
        return rolling

    # --- blobs ------------------------------------------------------------------------------

    def blob_target(self, path: str) -> Path:
        """The replica path of a blob, refusing anything that would land outside --blob."""
        assert self.blob_dir is not None
        safe_blob_path(path)
        dest = self.blob_dir / path
        parent = dest.parent
        # A symlinked directory inside the blob dir could still lead outside it.
        real = parent.resolve() if parent.exists() else parent
        if parent.exists() and not (real == self._blob_root or self._blob_root in real.parents):
            raise PipelineError(f"blob path {path!r} resolves outside the blob directory {self.blob_dir}",
                                database=self.database)
        return dest

    # --- apply --------------------------------------------------------------------------------

    def apply(self, txn: Transaction) -> None:
        stage_dir = self.state / "stage"
        if stage_dir.exists():
            shutil.rmtree(stage_dir)  # left by an interrupted apply
        stage_dir.mkdir()
        tmp = self.state / "redo.tmp"
        try:
            plan = self._stage(txn, tmp, stage_dir)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            shutil.rmtree(stage_dir, ignore_errors=True)
            if isinstance(exc, PipelineError):  # e.g. a blob path check: name the txn at fault
                raise exc.with_context(database=txn.database, txn_id=txn.txn_id, offset=txn.offset)
            raise
        os.replace(tmp, self._redo)  # the commit point: from here on the txn will be applied
        _fsync_dir(self.state)
        self._replay(plan)

    def _stage(self, txn: Transaction, tmp: Path, stage_dir: Path) -> dict:
        """Write every change to the redo file and staged blobs; verify; return the apply plan."""
        current = {f.file: f for f in self.files}
        fresh = RollingChecksum() if txn.snapshot else None
        overrides: dict[tuple[int, int], int] = {}
        value = 0 if txn.snapshot else self.checksum.value
        sizes: dict[int, int] = {}
        max_index: dict[int, int] = {}
        blobs: dict[str, str] = {}  # path -> staged file name
        deletes: list[str] = []
        blob: _BlobStage | None = None
        count = 0
        with open(tmp, "wb") as redo:
            for change in txn.changes:
                count += 1
                if isinstance(change, BlockWrite):
                    if blob is not None:
                        raise txn.error(f"blob {blob.chunk.path} is incomplete: chunk {blob.next_index} of "
                                        f"{blob.chunk.count} missing")
                    size = sizes.setdefault(change.file, len(change.data))
                    if size != len(change.data):
                        raise txn.error(f"file {change.file}: blocks of {size} and {len(change.data)} bytes")
                    if change.index > max_index.get(change.file, -1):
                        max_index[change.file] = change.index
                    redo.write(_FRAME.pack(change.file, change.index, len(change.data)))
                    redo.write(change.data)
                    new = block_hash(change.file, change.index, change.data)
                    if fresh is not None:
                        fresh.set_hash(change.file, change.index, new)
                    else:
                        key = (change.file, change.index)
                        old = overrides.get(key)
                        if old is None:
                            old = self.checksum.hash_at(change.file, change.index)
                        value ^= old ^ new
                        overrides[key] = new
                elif isinstance(change, BlobChunk):
                    blob = self._stage_chunk(txn, blob, change, stage_dir, blobs)
                else:
                    if blob is not None:
                        raise txn.error(f"blob {blob.chunk.path} is incomplete")
                    safe_blob_path(change.path)
                    deletes.append(change.path)
                    blobs.pop(change.path, None)
            if blob is not None:
                raise txn.error(f"blob {blob.chunk.path} is incomplete at the end of the transaction")
            redo.flush()
            os.fsync(redo.fileno())
        layout = txn.validate_trailer()
        if count != txn.record_count:
            raise txn.error(f"staged {count} changes, the transaction has {txn.record_count}")
        for file, size in sizes.items():
            f = layout.get(file)
            if f is None or f.block_size != size or max_index[file] >= f.blocks:
                raise txn.error(f"block writes to file {file} do not fit the layout {f}")
        # Blocks in the layout that no change wrote are zero-filled by the extension.
        for f in layout.values():
            old = current.get(f.file)
            if not txn.snapshot and old is not None:
                if f.block_size != old.block_size or f.blocks < old.blocks:
                    raise txn.error(f"file {f.file} changed shape from {old} to {f} outside a snapshot")
            first = 0 if txn.snapshot or old is None else old.blocks
            zero = bytes(f.block_size)
            for index in range(first, f.blocks):
                if fresh is not None:
                    if fresh.hash_at(f.file, index) == 0:
                        fresh.set_block(f.file, index, zero)
                elif (f.file, index) not in overrides:
                    new = block_hash(f.file, index, zero)
                    value ^= new
                    overrides[(f.file, index)] = new
        if fresh is not None:
            value = fresh.value
        if value != txn.checksum_after:
            raise txn.error(
                f"checksum mismatch: after applying, the replica would be {value:016x} but the source "
                f"was {txn.checksum_after:016x}; the replica stays at txn {self._position.txn_id}")
        plan = {
            "txn_id": txn.txn_id, "checksum": txn.checksum_after, "snapshot": txn.snapshot,
            "next_offset": (txn.end_offset + 1) if txn.end_offset is not None else self.next_offset,
            "source_time_ms": txn.source_time_ms, "files": [f.__dict__ for f in txn.files],
            "blobs": blobs, "deletes": deletes,
        }
        with open(tmp, "ab") as redo:
            trailer = json.dumps(plan).encode()
            redo.write(trailer + struct.pack("<Q", len(trailer)))
            redo.flush()
            os.fsync(redo.fileno())
        self._pending_checksum = fresh if fresh is not None else overrides
        return plan

    def _stage_chunk(self, txn: Transaction, blob: _BlobStage | None, chunk: BlobChunk, stage_dir: Path,
                     blobs: dict[str, str]) -> _BlobStage | None:
        if self.blob_dir is None:
            raise txn.error("the stream carries blobs but this replica has no --blob directory")
        self.blob_target(chunk.path)
        if blob is None:
            if chunk.index != 0:
                raise txn.error(f"blob {chunk.path} starts at chunk {chunk.index}")
            tmp = stage_dir / f"{len(blobs)}.blob"
            blob = _BlobStage(chunk, tmp, open(tmp, "wb"), hashlib.sha256(), 0, 0)
        elif chunk.path != blob.chunk.path or chunk.index != blob.next_index or chunk.count != blob.chunk.count:
            raise txn.error(f"blob {blob.chunk.path}: expected chunk {blob.next_index}, got {chunk.path} "
                            f"chunk {chunk.index}")
        blob.fh.write(chunk.data)  # type: ignore[attr-defined]
        blob.sha.update(chunk.data)
        blob.written += len(chunk.data)
        blob.next_index += 1
        if blob.next_index < chunk.count:
            return blob
        blob.fh.flush()  # type: ignore[attr-defined]
        os.fsync(blob.fh.fileno())  # type: ignore[attr-defined]
        blob.fh.close()  # type: ignore[attr-defined]
        if blob.written != chunk.size or blob.sha.hexdigest() != chunk.sha256:
            raise txn.error(f"blob {chunk.path}: got {blob.written} bytes sha256 {blob.sha.hexdigest()[:16]}…, "
                            f"expected {chunk.size} bytes sha256 {chunk.sha256[:16]}…")
        blobs[chunk.path] = blob.tmp.name
        return None

    def _replay(self, plan: dict | None = None) -> None:
        """Apply the committed redo file to the pool files and blobs; safe to repeat."""
        with open(self._redo, "rb") as redo:
            redo.seek(-8, os.SEEK_END)
            (length,) = struct.unpack("<Q", redo.read(8))
            end = redo.seek(-8 - length, os.SEEK_END)
            if plan is None:
                plan = json.loads(redo.read(length))
                self._pending_checksum = None
            redo.seek(0)
            files = [FileLayout(**f) for f in plan["files"]]
            lock_fd = self._fd(0)
            lock_db_exclusive(lock_fd)  # PicoLisp readers see the transaction whole or not at all
            try:
                written: set[int] = set()
                while redo.tell() < end:
                    file, index, length = _FRAME.unpack(redo.read(_FRAME.size))
                    os.pwrite(self._fd(file), redo.read(length), index * length)
                    written.add(file)
                for f in files:
                    fd = self._fd(f.file)
                    if os.fstat(fd).st_size != f.blocks * f.block_size:
                        os.ftruncate(fd, f.blocks * f.block_size)
                        written.add(f.file)
                for file in sorted(written):  # only what changed: fsync is most of an apply's cost
                    os.fsync(self._fd(file))
                if plan["snapshot"]:
                    for extra in pool_files(self.prefix)[len(files):]:
                        os.unlink(extra)  # the snapshot's pool has fewer files than the replica had
                self._apply_blobs(plan)
                position = Position(plan["txn_id"], plan["checksum"])
                self._store_position(position, plan["next_offset"], plan["source_time_ms"], files)
            finally:
                unlock_db(lock_fd)
        pending = getattr(self, "_pending_checksum", None)
        if isinstance(pending, RollingChecksum):
            self.checksum = pending
        elif isinstance(pending, dict):
            for (file, index), h in pending.items():
                self.checksum.set_hash(file, index, h)
        self._pending_checksum = None
        self._redo.unlink()
        shutil.rmtree(self.state / "stage", ignore_errors=True)

    def _apply_blobs(self, plan: dict) -> None:
        if self.blob_dir is None:
            return
        stage = self.state / "stage"
        for path, name in plan["blobs"].items():
            dest = self.blob_target(path)
            src = stage / name
            if src.exists():  # absent when a replay already moved it
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
        for path in plan["deletes"]:
            self.blob_target(path).unlink(missing_ok=True)
        if plan["snapshot"]:
            keep = set(plan["blobs"])
            for root, _dirs, names in os.walk(self.blob_dir):
                for name in names:
                    rel = os.path.relpath(os.path.join(root, name), self.blob_dir)
                    if rel not in keep and not name.startswith("."):
                        os.unlink(os.path.join(root, name))

    def _recover(self) -> None:
        (self.state / "redo.tmp").unlink(missing_ok=True)  # staged but never committed: discard
        if self._redo.exists():
            self._replay()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self._lock_fd)
