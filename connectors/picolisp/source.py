"""The capture side of a PicoLisp pool: journal rounds, snapshots and blob changes turned into Transactions."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from connectors.files import fsync_dir, write_atomic, write_synced
from connectors.picolisp.blobs import blob_files, blob_markers
from connectors.picolisp.format import (
    SCAN_SLICE,
    _file_name,
    block_size_of,
    copy_range,
    hax,
    pool_files,
    pread_all,
    scan_blocks,
)
from connectors.picolisp.journal import BlockSet, JournalConsumer, journal_blocks_fd
from connectors.picolisp.watch import ChangeWatch
from pipeline.checksum import RollingChecksum, block_hash
from pipeline.codec import BATCH_BYTES
from pipeline.errors import PipelineError
from pipeline.model import (
    MAX_BLOB_CHUNK,
    BlobChunk,
    BlobDelete,
    BlockBatch,
    BlockWrite,
    Change,
    FileLayout,
    Position,
    Transaction,
    safe_blob_path,
)

INFLIGHT = ".pool-pipeline-inflight"  # markers renamed aside live here, inside the blob dir (same filesystem)
_HEADER_BYTES = 64  # block 0's first 64 bytes hold the block shift (byte 12); a shorter file is being created


def pool_missing(prefix: str, journal: Path) -> list[str]:
    """What the app has yet to create before capture can start: its pool's first file, its journal.

    A first file shorter than its header is still being written by `pool`; a whole header that is not
    a PicoLisp one is refused, since waiting would not fix a wrong --pool."""
    missing = []
    files = pool_files(prefix)
    if not files:
        missing.append(f"the pool {_file_name(prefix, 0)}")
    elif files[0].stat().st_size < _HEADER_BYTES:
        missing.append(f"the pool {files[0]} (still being created)")
    else:
        block_size_of(files[0])  # raises on a file that is not a PicoLisp DB file
    if not os.path.isfile(journal):
        missing.append(f"the journal {journal}")
    return missing


def wait_for_pool(
    prefix: str, journal: Path, database: str, *, once: bool, interval: float = 0.5, log: Callable[[str], None] = print
) -> bool:
    """Wait, touching nothing, until the app has created its pool and journal, as PicoLisp's `ssl` does:
    an agent may be started before the app. True once both exist; False at once with `once`.
    Interruptible: SIGTERM raises KeyboardInterrupt out of the sleep."""
    missing = pool_missing(prefix, journal)
    if not missing:
        return True
    what = " and ".join(missing)
    if once:
        log(f"capture-agent {database}: {what} not there yet, nothing to publish (--once)")
        return False
    log(f"capture-agent {database}: waiting for {what} (the app creates them); touching nothing until then")
    while pool_missing(prefix, journal):
        time.sleep(interval)
    return True


def layout_change(published: Sequence[FileLayout], current: Sequence[FileLayout]) -> str | None:
    """Why replicas holding the `published` layout would refuse a delta to `current`, or None if it fits.

    Outside a snapshot a replica accepts only growth: new files, more blocks (ReplicaDir, "changed
    shape"). A file gone, with another block size or shorter means the pool was recreated."""
    now = {f.file: f for f in current}
    for old in published:
        new = now.get(old.file)
        if new is None:
            return (
                f"pool file {hax(old.file)} is gone: the topic holds {len(published)} files, "
                f"the pool has {len(current)}"
            )
        if new.block_size != old.block_size:
            return (
                f"pool file {hax(old.file)} has {new.block_size}-byte blocks, the topic holds "
                f"{old.block_size}-byte ones"
            )
        if new.blocks < old.blocks:
            return f"pool file {hax(old.file)} has {new.blocks} blocks, fewer than the {old.blocks} published"
    return None


class AgentLock:
    """One capture agent per pool on this host: fcntl locks on a file in the state dir and, given the
    journal, on a file beside it. Two agents with different state dirs on one journal would each take
    part of it, so each would publish transactions missing the other's blocks."""

    def __init__(self, state_dir: Path, database: str, journal: Path | None = None) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        paths = [state_dir / "agent.lock"]
        if journal is not None:
            paths.append(journal.parent / f".{journal.name}.capture-agent.lock")
        self.path = paths[0]
        self.fds: list[int] = []
        try:
            for path in paths:
                self.fds.append(self._lock(path, database))
        except BaseException:
            self.release()
            raise
        self.fd = self.fds[0]

    @staticmethod
    def _lock(path: Path, database: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PipelineError(
                f"another capture-agent (pid {holder}) is already running for this pool (lock {path})",
                database=database,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class _Pool:
    """Open descriptors on the pool files, their block sizes, and the block counts last published."""

    def __init__(self, prefix: str, database: str) -> None:
        self.prefix = prefix
        self.database = database
        self.fds: list[int] = []
        self.paths: list[Path] = []
        self.block_sizes: list[int] = []
        self.refresh()
        if not self.fds:
            raise PipelineError(
                f"no pool at {prefix!r}: expected {prefix}@ (is --pool the prefix PicoLisp was given, e.g. db/app/?)",
                database=database,
            )

    def refresh(self) -> None:
        """Open files PicoLisp created since the last look (pools can gain files when *Dbs grows)."""
        paths = pool_files(self.prefix)
        for path in paths[len(self.fds) :]:
            self.block_sizes.append(block_size_of(path))
            self.fds.append(os.open(path, os.O_RDONLY))
            self.paths.append(path)

    def replaced(self) -> str | None:
        """Why the open files are no longer the pool's (one deleted, or recreated as a new file), or None.
        The descriptors would go on reading the old files, so no layout check could see the new ones."""
        for fd, path in zip(self.fds, self.paths):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return f"pool file {path} was deleted"
            old = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (old.st_dev, old.st_ino):
                return f"pool file {path} was replaced by a new file"
        return None

    def layout(self) -> list[FileLayout]:
        out = []
        for f, (fd, bs) in enumerate(zip(self.fds, self.block_sizes)):
            size = os.fstat(fd).st_size
            if size % bs:
                raise PipelineError(
                    f"pool file {self.prefix}{hax(f)} has {size} bytes, not a whole number of {bs}-byte blocks",
                    database=self.database,
                    retriable=True,
                )
            out.append(FileLayout(f, bs, size // bs))
        return out

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.paths.clear()
        self.block_sizes.clear()


# With inotify the agent sleeps until the app writes; it still runs a round this often, for blob
# deletions (found by a scan) and anything a watch cannot see.
IDLE_ROUND_S = 1.0


class _Images:
    """A round's final block images, in `keys` order, back to back in the image spool (see
    PoolSource._copy_images). Iterating reads them back in slices; valid until the next round."""

    def __init__(self, fd: int, keys: BlockSet, block_sizes: list[int], total: int) -> None:
        self.fd = fd
        self.keys = keys
        self.block_sizes = block_sizes
        self.total = total  # bytes in the image spool
        self._len = len(keys)

    def __len__(self) -> int:
        return self._len

    def batches(self) -> Iterator[BlockBatch]:
        """The images as runs of one file's blocks (up to BATCH_BYTES), each read with one pread: the
        way they travel (one BlockBatch record each), with no object per block."""
        pos = 0
        for file, size in enumerate(self.block_sizes):
            indexes = self.keys.indexes(file)
            per = max(1, BATCH_BYTES // size)
            for start in range(0, len(indexes), per):
                run = indexes[start : start + per]
                yield BlockBatch(file, size, run, pread_all(self.fd, len(run) * size, pos))
                pos += len(run) * size

    def __iter__(self) -> Iterator[BlockWrite]:
        sizes = self.block_sizes
        buf, buf_pos, off = b"", 0, 0
        for file, index in self.keys:
            bs = sizes[file]
            if off + bs > len(buf):
                buf_pos += off
                buf, off = pread_all(self.fd, max(bs, min(SCAN_SLICE, self.total - buf_pos)), buf_pos), 0
            yield BlockWrite(file, index, buf[off : off + bs])
            off += bs


def _boot_id() -> str:
    """This boot of the kernel: the page cache, and what the state dir holds unsynced, lives as long."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class PoolSource:
    """Yields the transactions of one PicoLisp pool (a Source for the capture agent).

    Each round takes the journal lock (every PicoLisp writer holds it for its whole commit),
    parses the journal, preads the final image of every touched or new block, appends the
    raw journal bytes to the agent's spool and truncates the journal to 0, then releases the
    lock. The app is blocked only for that. The spool is cleared once the transaction is
    committed in Kafka; after a crash, spool + journal are re-read and merged into the next
    transaction, which is correct because images are final states.
    """

    def __init__(
        self,
        prefix: str,
        journal: Path,
        blob_dir: Path | None,
        database: str,
        state_dir: Path,
        *,
        last_layout: list[FileLayout] | None = None,
        force_snapshot: bool = False,
        once: bool = False,
        poll_interval: float = 0.02,
        min_interval: float = 0.0,
        delete_scan_interval: float = 1.0,
        log: Callable[[str], None] = print,
    ) -> None:
        self.database = database
        self.prefix = prefix
        self.state_dir = state_dir
        self.blob_dir = blob_dir
        self.once = once
        self.poll_interval = poll_interval
        self.min_interval = min_interval  # between the starts of two rounds that publish
        self.delete_scan_interval = delete_scan_interval
        self.log = log
        self.force_snapshot = force_snapshot
        self.pool = _Pool(prefix, database)
        self.journal = JournalConsumer(journal)
        self.watch = ChangeWatch(journal, blob_dir) if not once else None
        self.spool_path = state_dir / "journal.spool"
        self.spool_mark = state_dir / "journal.spool.mark"  # the spool's length while a copy is appended to it
        self.blob_spool = state_dir / "blobs.spool"  # the blobs of the round being published, back to back
        self._spool_fd: int | None = None
        self.image_spool = state_dir / "images.spool"  # the block images of the round being published
        self._image_fd: int | None = None
        self._inflight_ready = False
        shutil.rmtree(state_dir / "blobs", ignore_errors=True)  # a file per blob, from earlier versions
        self.known_blobs_path = state_dir / "known-blobs.json"
        self.known_log_path = state_dir / "known-blobs.log"  # changes since known-blobs.json, one a line
        self._known_log_lines = 0
        self.last_txn_path = state_dir / "last-txn.json"
        self.lost_marker = state_dir / "needs-snapshot"  # the state was lost: only a snapshot may follow
        self._last_record: dict[str, object] = {}
        self.published = {f.file: f.blocks for f in (last_layout or [])}
        self.published_layout: list[FileLayout] = list(last_layout or [])  # what replicas hold: see layout_change
        self._refused: set[str] = set()  # blob entries already warned about (once per name, not per round)
        self.rolling = RollingChecksum()
        self._ack: Callable[[], None] | None = None
        self._known_blobs: set[str] = set()
        self._last_delete_scan = 0.0
        self._untrusted = self._lost_state()
        self._restore_inflight_markers()
        self._repair_spool()

    # --- journal ------------------------------------------------------------------------------

    def _touched(self, journal_fd: int | None, journal_size: int, layout: list[FileLayout]) -> BlockSet:
        """(file, block) pairs the spool and the journal wrote; a bad entry is refused before any change.

        Both are parsed from bounded preads (journal_blocks_fd), headers only: memory does not grow
        with the backlog, and the touched blocks are one bit each (BlockSet, one bitmap a file)."""
        want = BlockSet([f.blocks for f in layout])
        try:
            spool_fd: int | None = os.open(self.spool_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            spool_fd = None
        try:
            spool_size = 0 if spool_fd is None else os.fstat(spool_fd).st_size
            for fd, size, what, path in (
                (spool_fd, spool_size, "agent spool", self.spool_path),
                (journal_fd, journal_size, "journal", self.journal.path),
            ):
                if fd is None:
                    continue
                try:
                    journal_blocks_fd(fd, size, self.pool.block_sizes, want)
                except PipelineError as exc:
                    raise PipelineError(
                        f"{what} {path}: {exc.message}; nothing was published and the journal is left intact",
                        database=self.database,
                    ) from None
        finally:
            if spool_fd is not None:
                os.close(spool_fd)
        return want

    def _check_journal(self) -> None:
        """Parse spool and journal under the journal lock, changing nothing: fail before a snapshot starts
        streaming, so that a corrupt journal leaves no aborted records in the topic."""

        def locked(fd: int | None, size: int) -> None:
            self.pool.refresh()  # under the lock: the journal may name a file PicoLisp created just before
            self._touched(fd, size, self.pool.layout())

        self.journal.locked(locked)

    def _take_journal(self, *, delta: bool = True) -> tuple[_Images, list[FileLayout]]:
        """Under the journal lock: parse it, copy touched and grown blocks to the image spool, spool the
        journal, truncate it. For a `delta`, refuse (retriable, changing nothing) a layout replicas would
        reject: the restarted attempt's _resume then takes a snapshot."""

        def locked(fd: int | None, size: int) -> tuple[_Images, list[FileLayout]]:
            self.pool.refresh()
            layout = self.pool.layout()
            # Checked before parsing: the spool and journal of an older pool need not parse with these sizes.
            if delta and (reason := layout_change(self.published_layout, layout)):
                raise PipelineError(
                    f"the pool's layout changed ({reason}); a snapshot is needed",
                    database=self.database,
                    retriable=True,
                )
            want = self._touched(fd, size, layout)
            if want.beyond is not None:
                file, index = want.beyond
                raise PipelineError(
                    f"journal writes block {index} of file {hax(file)}, beyond its end ({layout[file].blocks} blocks)",
                    database=self.database,
                )
            for f in layout:
                want.add_range(f.file, self.published.get(f.file, 0), f.blocks)
            images = self._copy_images(want)
            if fd is not None and size:
                self._spool_journal(fd, size)
                os.ftruncate(fd, 0)  # lock held: atomic, nothing lost
            return images, layout

        return self.journal.locked(locked)

    def _spool_journal(self, fd: int, size: int) -> None:
        """Append the journal's `size` bytes to the spool, copied file to file in bounded pieces.

        A kill -9 at any point must leave the spool as whole entries (the journal is truncated only
        after this returns, so a cut-off copy loses nothing). No spool yet, the usual case: the copy
        is built beside it and renamed in. A spool left by an unpublished round (Kafka down, a kill):
        the copy is appended in place, after noting the spool's old length in `spool_mark`; the next
        start (or the except below) cuts the spool back to it (_repair_spool), so the spool is never
        copied again. No fsync: like the journal, they must survive kill -9 (page cache), not a
        power cut."""
        try:
            spooled = os.stat(self.spool_path).st_size
        except FileNotFoundError:
            spooled = 0
        if not spooled:
            tmp = self.spool_path.with_name(self.spool_path.name + ".tmp")
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                copy_range(fd, out, size)
            except BaseException:
                os.close(out)
                tmp.unlink(missing_ok=True)
                raise
            os.close(out)
            os.replace(tmp, self.spool_path)
            return
        mark_tmp = self.spool_mark.with_name(self.spool_mark.name + ".tmp")
        mark_tmp.write_text(str(spooled))
        os.replace(mark_tmp, self.spool_mark)
        out = os.open(self.spool_path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            copy_range(fd, out, size, 0, spooled)
        except BaseException:
            os.ftruncate(out, spooled)
            self.spool_mark.unlink()
            raise
        finally:
            os.close(out)
        self.spool_mark.unlink()

    def _repair_spool(self) -> None:
        """A run killed while appending to its spool left the spool's old length in `spool_mark`: cut
        the spool back to it. The journal still holds everything that copy was taking (it is truncated
        only after the copy), so the cut loses nothing."""
        try:
            spooled = int(self.spool_mark.read_text())
        except FileNotFoundError:
            return
        except ValueError:  # killed while writing the mark: the append had not started
            self.spool_mark.unlink()
            return
        if os.path.exists(self.spool_path):
            os.truncate(self.spool_path, spooled)
        self.spool_mark.unlink()

    def _copy_images(self, keys: BlockSet) -> _Images:
        """The current images of `keys` (in order), copied into the image spool in runs of adjacent blocks.

        A file, not memory: one round can touch far more block bytes than its journal holds (a few
        bytes written into each of many 4 KiB blocks), and holding them all took a restarted agent
        past 200 MiB. The copy is taken under the journal lock, so it is the state the journal ends at.
        """
        if self._image_fd is None:
            self._image_fd = os.open(self.image_spool, os.O_RDWR | os.O_CREAT, 0o644)
        fd = self._image_fd
        os.ftruncate(fd, 0)
        sizes = self.pool.block_sizes
        buf = bytearray()
        written = 0

        def read_run(file: int, first: int, n: int) -> None:
            nonlocal written
            buf.extend(pread_all(self.pool.fds[file], n * sizes[file], first * sizes[file]))
            if len(buf) >= SCAN_SLICE:
                os.pwrite(fd, buf, written)
                written += len(buf)
                buf.clear()

        run_file, run_first, run_n = -1, 0, 0
        for file, index in keys:
            if file == run_file and index == run_first + run_n and (run_n + 1) * sizes[file] <= SCAN_SLICE:
                run_n += 1
                continue
            if run_n:
                read_run(run_file, run_first, run_n)
            run_file, run_first, run_n = file, index, 1
        if run_n:
            read_run(run_file, run_first, run_n)
        if buf:
            os.pwrite(fd, buf, written)
            written += len(buf)
        return _Images(fd, keys, list(sizes), written)

    # --- blobs --------------------------------------------------------------------------------

    def _restore_inflight_markers(self) -> None:
        """Markers renamed aside by a run that died before publishing go back to be sent again."""
        if self.blob_dir is None:
            return
        inflight = self.blob_dir / INFLIGHT
        if inflight.is_dir():
            for name in os.listdir(inflight):
                src, dst = inflight / name, self.blob_dir / name
                if os.path.lexists(dst):
                    os.unlink(src)  # the app made a newer marker for the same blob
                else:
                    os.replace(src, dst)
        known = self._load_known_blobs()
        if known is None:
            # No record yet: what is there now is what replicas hold (or will, with the next snapshot).
            # Written at once, so that the changes logged from now on have a list to apply to.
            self._known_blobs = set(self._blob_paths())
            self._write_known_blobs()
        else:
            # An earlier version recorded names it could not publish: their delete would wedge the agent too.
            self._known_blobs = set(filter(self._publishable, known))

    def _open_blob_spool(self) -> int:
        """The round's blob spool, emptied: one file reused by every round. A file per blob cost an
        inode creation each (~0.3 ms here, more than copying a small blob)."""
        if self._spool_fd is None:
            self._spool_fd = os.open(self.blob_spool, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self._spool_fd, 0)
        return self._spool_fd

    def _spool_blob(self, rel: str, spool: int, offset: int) -> tuple[int, int, str] | None:
        """Append a blob to the round's spool at `offset` (so it cannot change under us): (offset, size,
        sha256), or None if it is gone."""
        assert self.blob_dir is not None
        sha = hashlib.sha256()
        size = 0
        try:
            with open(self.blob_dir / rel, "rb", buffering=0) as src:
                while chunk := src.read(1 << 20):
                    sha.update(chunk)
                    os.pwrite(spool, chunk, offset + size)
                    size += len(chunk)
        except FileNotFoundError:
            return None
        return offset, size, sha.hexdigest()

    def _chunks(self, rel: str, offset: int, size: int, sha: str) -> Iterator[BlobChunk]:
        count = max(1, -(-size // MAX_BLOB_CHUNK))
        for index in range(count):
            start = index * MAX_BLOB_CHUNK
            assert self._spool_fd is not None
            data = pread_all(self._spool_fd, min(MAX_BLOB_CHUNK, size - start), offset + start)
            yield BlobChunk(rel, size, sha, index, count, data)

    def _warn_once(self, key: str, text: str) -> None:
        """Log `text` the first time `key` is refused: a refused entry is met again every round."""
        if key not in self._refused:
            self._refused.add(key)
            self.log(f"{self.database}: warning: {text}")

    def _publishable(self, rel: str) -> bool:
        """True if `rel` can go into the topic; else warn once per name (_unpublishable) and return False."""
        try:
            safe_blob_path(rel)
        except PipelineError as exc:
            self._unpublishable(rel, exc)
            return False
        return True

    def _unpublishable(self, rel: str, exc: PipelineError) -> None:
        """A name that is not UTF-8 or that safe_blob_path refuses would otherwise fail every round, and stay
        in known-blobs after the file is gone: warn once, and let the pool's replication go on without it."""
        self._warn_once(
            rel, f"skipping blob {os.fsencode(rel)!r} in {self.blob_dir}: it cannot be replicated ({exc.message})"
        )

    def _blob_paths(self) -> list[str]:
        """Every publishable blob file, sorted."""
        assert self.blob_dir is not None
        return blob_files(self.blob_dir, self._unpublishable)

    def _blob_changes(self, snapshot: bool) -> tuple[list[tuple[str, int, int, str]], list[str], list[str]]:
        """(puts as (path, spool offset, size, sha256), deletes, inflight marker names) to publish in this round."""
        if self.blob_dir is None:
            return [], [], []
        inflight = self.blob_dir / INFLIGHT
        if not self._inflight_ready:
            inflight.mkdir(exist_ok=True)
            self._inflight_ready = True
        markers = []
        paths: dict[str, None] = {}
        for name, target in blob_markers(self.blob_dir, refused=self._refused_marker):
            # Renaming the marker before copying closes the original's lost-update race: a rewrite
            # during our copy makes blob+ create a fresh marker, which the next round picks up.
            os.replace(self.blob_dir / name, inflight / name)
            markers.append(name)
            paths[target] = None
        if snapshot:
            paths.update(dict.fromkeys(self._blob_paths()))
        puts, deletes = [], []
        if paths:
            spool, offset = self._open_blob_spool(), 0
            for rel in paths:
                spooled = self._spool_blob(rel, spool, offset)
                if spooled is None:
                    if not snapshot:
                        deletes.append(rel)
                else:
                    puts.append((rel, *spooled))
                    offset += spooled[1]
        now = time.monotonic()
        if not snapshot and now - self._last_delete_scan >= self.delete_scan_interval:
            # The original never replicates deletes (zap> just unlinks the file): find them by scanning.
            self._last_delete_scan = now
            present = set(self._blob_paths())
            put_paths = {p for p, *_ in puts}
            deletes.extend(sorted(p for p in self._known_blobs - present if p not in put_paths and p not in deletes))
        return puts, deletes, markers

    def _refused_marker(self, name: str, target: str, exc: PipelineError) -> None:
        """A marker leading outside the blob dir (or naming no UTF-8 path) is left in place, unsent: warned
        about once, so that it does not stop the rest of the pool's replication."""
        self._warn_once(
            name, f"skipping blob marker {os.fsencode(name)!r} in {self.blob_dir}, left in place: {exc.message}"
        )

    # --- transactions -------------------------------------------------------------------------

    def _transaction(
        self,
        after: Position,
        blocks: _Images,
        layout: list[FileLayout],
        puts: list,
        deletes: list[str],
        markers: list[str],
        *,
        snapshot: bool,
    ) -> Transaction:
        blob_records = sum(max(1, -(-size // MAX_BLOB_CHUNK)) for _, _, size, _ in puts)
        txn = Transaction(
            database=self.database,
            txn_id=after.txn_id + 1,
            checksum_before=after.checksum,
            source_time_ms=int(time.time() * 1000),
            snapshot=snapshot,
            files=layout,
            change_count=len(blocks) + blob_records + len(deletes),
        )

        def changes() -> Iterator[Change | BlockBatch]:
            # The images are hashed as they stream out (one pass over the image spool), so the trailer
            # is known only at the end, as for a snapshot: TxnCommit is encoded after the changes.
            hashed: list[tuple[int, list[int], array]] = []
            for batch in blocks.batches():
                file, size, view = batch.file, batch.block_size, memoryview(batch.data)
                hashes = array(
                    "Q", [block_hash(file, i, view[k * size : (k + 1) * size]) for k, i in enumerate(batch.indexes)]
                )
                hashed.append((file, batch.indexes, hashes))
                yield batch
            for rel, offset, size, sha in puts:
                yield from self._chunks(rel, offset, size, sha)
            for rel in deletes:
                yield BlobDelete(rel)
            set_hash = self.rolling.set_hash
            for file, indexes, hashes in hashed:
                for index, h in zip(indexes, hashes):
                    set_hash(file, index, h)
            txn.checksum_after = self.rolling.value
            self._record_txn(txn.txn_id, txn.checksum_before, txn.checksum_after)  # before the Kafka commit

        txn.changes = changes()
        self._remember_blobs(puts)
        self._ack = self._acknowledger(layout, puts, deletes, markers, snapshot=snapshot)
        return txn

    # --- the agent's state: kept in the page cache, trusted only on the boot it was written in ---
    #
    # Like the spool (and PicoLisp's own journal), the state files are not fsynced each round: two
    # fsyncs cost 5 ms of wall time and 0.6 ms of CPU here, several times a round (bench/agent_cpu.py).
    # They survive a kill -9. A power cut or a kernel crash may lose or tear them, so last-txn.json
    # carries the boot id it was written under, and a start on another boot takes a snapshot instead
    # of trusting them, unless the agent stopped cleanly and synced them first (close()).

    def _lost_state(self) -> bool:
        """True if the state dir was written on another boot and not synced at a clean stop: the machine
        went down meanwhile, so the spool, last-txn.json and known blobs may be torn or stale."""
        if self.lost_marker.exists():
            return True  # found earlier; the snapshot that settles it is not committed yet
        try:
            last = json.loads(self.last_txn_path.read_text())
        except FileNotFoundError:
            return False
        except ValueError:
            last = {"boot_id": None}  # torn
        if not isinstance(last, dict):
            return False
        if last.get("synced") or "boot_id" not in last:
            # Synced at a clean stop, or written by an earlier version (which fsynced): trusted. Claim it
            # for this boot, durably, so that a crash later in this boot cannot leave it looking synced.
            last = {**{k: v for k, v in last.items() if k != "synced"}, "boot_id": _boot_id()}
            write_atomic(self.last_txn_path, json.dumps(last).encode())
            return False
        if last["boot_id"] == _boot_id():
            return False
        write_atomic(self.lost_marker, b"the machine restarted without a clean stop of the agent\n")
        for path in (self.spool_path, self.spool_mark, self.known_blobs_path, self.known_log_path, self.last_txn_path):
            path.unlink(missing_ok=True)
        return True

    def _record_txn(self, txn_id: int, checksum_before: int | None, checksum_after: int) -> None:
        """Note, before it is committed, which txn this state dir publishes (see _continues)."""
        self._last_record = {
            "txn_id": txn_id,
            "checksum_before": checksum_before,
            "checksum_after": checksum_after,
            "boot_id": _boot_id(),
        }
        write_atomic(self.last_txn_path, json.dumps(self._last_record).encode(), durable=False)

    def _sync_state(self) -> None:
        """At a clean stop: make the spool and the state durable, and say so in last-txn.json."""
        for path in (self.spool_path, self.spool_mark, self.known_blobs_path, self.known_log_path):
            with contextlib.suppress(FileNotFoundError):
                write_synced(path)
        if self._last_record:
            write_atomic(self.last_txn_path, json.dumps({**self._last_record, "synced": True}).encode())
        else:
            fsync_dir(self.state_dir)

    def _continues(self, after: Position) -> bool:
        """True if this state dir published the topic's last txn (`after`) or was about to publish the next:
        only then do its spool and the journal hold every change since `after`."""
        try:
            last = json.loads(self.last_txn_path.read_text())
        except (FileNotFoundError, ValueError):
            return False
        return (last["txn_id"] == after.txn_id and last["checksum_after"] == after.checksum) or (
            last["txn_id"] == after.txn_id + 1 and last["checksum_before"] == after.checksum
        )

    def _load_known_blobs(self) -> set[str] | None:
        """known-blobs.json, then the changes logged after it (None: no record yet)."""
        try:
            known = set(json.loads(self.known_blobs_path.read_text()))
        except FileNotFoundError:
            return None
        try:
            log = self.known_log_path.read_bytes()
        except FileNotFoundError:
            log = b""
        lines = log.split(b"\n")[:-1]  # a last line without its newline was cut off: its round was not published
        for line in lines:
            name = json.loads(line[1:])
            (known.add if line[:1] == b"+" else known.discard)(name)
        self._known_log_lines = len(lines)
        return known

    def _write_known_blobs(self) -> None:
        """The whole set, and an empty log (on a snapshot, or when the log grew as long as the set)."""
        write_atomic(self.known_blobs_path, json.dumps(sorted(self._known_blobs)).encode(), durable=False)
        with open(self.known_log_path, "wb"):
            pass
        self._known_log_lines = 0

    def _log_known(self, added: Iterable[str], removed: Iterable[str]) -> None:
        """Append blob names that became known or gone: a round costs its own changes, not a rewrite of
        every name (a log replayed in order over either the old or the new set gives the same set)."""
        lines = [b"+" + json.dumps(n).encode() for n in added] + [b"-" + json.dumps(n).encode() for n in removed]
        if not lines:
            return
        if self._known_log_lines + len(lines) > max(1024, len(self._known_blobs)):
            self._write_known_blobs()
            return
        fd = os.open(self.known_log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, b"\n".join(lines) + b"\n")  # one write: a kill -9 cannot tear it
        finally:
            os.close(fd)
        self._known_log_lines += len(lines)

    def _remember_blobs(self, puts: list) -> None:
        """Before publishing: record the blobs being put as known. Were this left to the acknowledgement,
        a crash between the Kafka commit and it would forget them, and their later deletion would never
        be published. A superset is harmless: deleting a blob the replica lacks changes nothing."""
        new = {p for p, *_ in puts} - self._known_blobs
        if new:
            self._known_blobs |= new
            self._log_known(sorted(new), ())

    def _acknowledger(
        self, layout: list[FileLayout], puts: list, deletes: list[str], markers: list[str], *, snapshot: bool
    ) -> Callable[[], None]:
        """What to forget once the transaction is committed in Kafka: spool, markers, staged blobs."""

        def acknowledge() -> None:
            self.spool_path.unlink(missing_ok=True)
            for name in markers:
                assert self.blob_dir is not None
                (self.blob_dir / INFLIGHT / name).unlink(missing_ok=True)
            for fd in (self._spool_fd, self._image_fd):
                if fd is not None:
                    os.ftruncate(fd, 0)  # give the round's disk space back now, not under the next lock
            known = (set() if snapshot else set(self._known_blobs)) | {p for p, *_ in puts}
            known -= set(deletes)
            if snapshot:
                self._known_blobs = known
                self._write_known_blobs()
                self.lost_marker.unlink(missing_ok=True)
                self._untrusted = False
            elif known != self._known_blobs:
                added, removed = sorted(known - self._known_blobs), sorted(self._known_blobs - known)
                self._known_blobs = known
                self._log_known(added, removed)
            self.published = {f.file: f.blocks for f in layout}
            self.published_layout = list(layout)

        return acknowledge

    def _snapshot(self, after: Position, reason: str) -> Transaction:
        """A full image, streamed: a fuzzy copy without locks, then the blocks the journal touched
        meanwhile re-read under its lock (later records win), then every blob."""
        # Refuse bad input before the snapshot's records start flowing (they would be aborted, not
        # published, but the topic should not even see them).
        self._check_journal()  # (a marker leading outside the blob dir is skipped with a warning, not refused)
        self.log(f"{self.database}: taking a snapshot ({reason})")
        txn = Transaction(
            database=self.database,
            txn_id=after.txn_id + 1,
            checksum_before=after.checksum,
            source_time_ms=int(time.time() * 1000),
            snapshot=True,
        )

        def changes() -> Iterator[Change]:
            rolling = RollingChecksum()
            count = 0
            start = self.pool.layout()
            for block in scan_blocks(self.pool.fds.__getitem__, start):
                rolling.set_block(block.file, block.index, block.data)
                count += 1
                yield block
            self.published = {f.file: f.blocks for f in start}
            repair, layout = self._take_journal(delta=False)
            for block in repair:
                rolling.set_block(block.file, block.index, block.data)
                count += 1
                yield block
            puts, _, markers = self._blob_changes(snapshot=True)
            self._remember_blobs(puts)
            for rel, offset, size, sha in puts:
                for chunk in self._chunks(rel, offset, size, sha):
                    count += 1
                    yield chunk
            self.rolling = rolling
            txn.change_count, txn.checksum_after, txn.files = count, rolling.value, layout
            self._record_txn(txn.txn_id, txn.checksum_before, txn.checksum_after)
            self._ack = self._acknowledger(layout, puts, [], markers, snapshot=True)

        txn.changes = changes()
        return txn

    def _rebase(self, after: Position, reason: str) -> Transaction:
        """The pool is not the one the topic describes (recreated with other *Dbs, fewer or shorter files):
        a delta would stop every replica, so publish a full image.

        The agent's spool goes: it holds the old pool's journal, which need not even parse with the new
        block sizes, and the snapshot covers all it could name. Should the snapshot not be committed, the
        next start sees the same mismatch against the topic and takes it again; and without last-txn.json
        (see _continues) it cannot take the new pool's journal for a delta from the old pool's checksum."""
        self.spool_path.unlink(missing_ok=True)
        self.last_txn_path.unlink(missing_ok=True)
        return self._snapshot(after, f"the pool is not the one the topic holds: {reason}")

    def _resume(self, after: Position) -> Transaction | None:
        """After a restart: rebuild the checksum from the pool, then publish what the last run had not."""
        if reason := layout_change(self.published_layout, self.pool.layout()):
            return self._rebase(after, reason)
        for block in scan_blocks(self.pool.fds.__getitem__, self.pool.layout()):
            self.rolling.set_block(block.file, block.index, block.data)
        blocks, layout = self._take_journal()
        if not blocks and self.rolling.value != after.checksum:
            return self._snapshot(
                after,
                f"the pool's checksum {self.rolling.value:016x} differs from the "
                f"topic's {after.checksum:016x} with no journal to explain it",
            )
        if not self._continues(after):
            if blocks:
                # Another agent or a lost state dir: a spool we cannot see may hold changes the journal
                # no longer has, and a delta missing them would stop every replica at a checksum mismatch.
                return self._snapshot(
                    after,
                    f"{self.state_dir} did not publish the topic's last txn "
                    f"{after.txn_id}, so the journal alone may not explain the pool",
                )
            self._record_txn(after.txn_id, None, after.checksum)  # the pool equals the topic: adopt it
        puts, deletes, markers = self._blob_changes(snapshot=False)
        if not blocks and not puts and not deletes:
            return None
        return self._transaction(after, blocks, layout, puts, deletes, markers, snapshot=False)

    def _round(self, after: Position) -> Transaction | None:
        # PicoLisp never changes a file's block size nor shrinks it, but a pool deleted and recreated
        # under a running agent would: the open descriptors still show the old files, so look at the paths.
        if reason := self.pool.replaced():
            self.pool.close()
            self.pool = _Pool(self.prefix, self.database)
            return self._rebase(after, reason)
        blocks, layout = self._take_journal()
        puts, deletes, markers = self._blob_changes(snapshot=False)
        if not blocks and not puts and not deletes:
            return None
        return self._transaction(after, blocks, layout, puts, deletes, markers, snapshot=False)

    def transactions(self, after: Position) -> Iterator[Transaction]:
        first: Transaction | None
        if after.txn_id == 0:
            first = self._snapshot(after, "bootstrap: the topic is empty")
        elif self.force_snapshot:
            first = self._snapshot(after, "requested with --snapshot")
        elif self._untrusted:
            first = self._snapshot(
                after, f"the machine restarted since {self.state_dir} was last written, without a clean stop"
            )
        else:
            first = self._resume(after)
        pending = first
        position = after
        started = time.monotonic()
        while True:
            if pending is not None:
                yield pending
                position = pending.after
                if self.min_interval and not self.once:
                    time.sleep(max(0.0, started + self.min_interval - time.monotonic()))
            elif self.once:
                return
            elif self.watch is not None and self.watch.active:
                self.watch.wait(IDLE_ROUND_S)  # wakes at the app's next write; a round anyway every second
            else:
                time.sleep(self.poll_interval)
            started = time.monotonic()
            pending = self._round(position)

    def acknowledge(self, txn: Transaction) -> None:
        if self._ack is not None:
            self._ack()
            self._ack = None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # best effort: without it the next boot takes a snapshot
            self._sync_state()
        self.pool.close()
        self.journal.close()
        if self.watch is not None:
            self.watch.close()
        for fd in (self._spool_fd, self._image_fd):
            if fd is not None:
                os.close(fd)
        self._spool_fd = self._image_fd = None
