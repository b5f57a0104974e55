"""PicoLisp pool, journal, lock and blob primitives (see docs/picolisp-format.md); stdlib only."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

from pipeline.errors import PipelineError
from pipeline.model import safe_blob_path

__all__ = [
    "JOURNAL_HEADER",
    "JournalConsumer",
    "JournalEntry",
    "MAX_SHIFT",
    "blob_markers",
    "blob_tree",
    "block_size_of",
    "compare_blob_trees",
    "compare_pools",
    "hax",
    "lock_db_exclusive",
    "lock_db_shared",
    "md5_file",
    "parse_journal",
    "pool_files",
    "read_shift",
    "touched_blocks",
    "unlock_db",
]

T = TypeVar("T")

# Entry header: size code (1), file number (2, LE), address (6, LE) split as 4 + 2 bytes (§2.2).
_HEADER = struct.Struct("<BHIH")
JOURNAL_HEADER = _HEADER.size  # 9
# A shift beyond this (64 MiB blocks) means byte 12 is not a PicoLisp header, not a real setting.
MAX_SHIFT = 20
_COPY_CHUNK = 1 << 20


def hax(n: int) -> str:
    """PicoLisp's base-16 file suffix: digits '@'..'O', most significant first (0->'@', 16->'A@')."""
    if n < 0:
        raise ValueError(f"hax of a negative number: {n}")
    digits = ""
    while True:
        digits = chr(64 + (n & 15)) + digits
        n >>= 4
        if not n:
            return digits


def _file_name(prefix: str | Path, n: int) -> Path:
    base = os.fspath(prefix)
    # Path() drops the trailing '/', so a directory prefix ("db/app" for "db/app/") means files inside it.
    if base.endswith("/") or os.path.isdir(base):
        return Path(base) / hax(n)
    return Path(base + hax(n))


def pool_files(prefix: str | Path) -> list[Path]:
    """The pool's files prefix+'@', prefix+'A', ... up to the first missing one (the count is stored nowhere).

    A directory prefix (with or without trailing '/') means the files inside it. A prefix that is
    itself a regular file and has no '@' sibling is a single-file pool (`pool` with a non-list Dbs).
    """
    files: list[Path] = []
    while (path := _file_name(prefix, len(files))).is_file():
        files.append(path)
    if not files and os.path.isfile(os.fspath(prefix)):
        return [Path(prefix)]
    return files


def read_shift(path: Path | int) -> int:
    """The block-size shift stored in byte 12 of block 0 (it overrides *Dbs, §1.2).

    Given a path it opens and closes the file, which drops any fcntl lock this process holds on
    it (§3.3); while holding a lock pass the already-open fd instead.
    """
    name = f"fd {path}" if isinstance(path, int) else str(path)
    if isinstance(path, int):
        header = os.pread(path, 64, 0)
    else:
        with open(path, "rb") as f:
            header = os.pread(f.fileno(), 64, 0)
    if len(header) < 64:
        raise PipelineError(f"{name}: {len(header)} bytes is too short for a PicoLisp DB file (block 0 needs 64)")
    shift = header[12]
    if shift > MAX_SHIFT:
        raise PipelineError(f"{name}: byte 12 holds block shift {shift}; this is not a PicoLisp DB file")
    return shift


def block_size_of(path: Path | int) -> int:
    """64 << read_shift(path); a path or an open fd."""
    return 64 << read_shift(path)


def _shift_of(block_size: int) -> int:
    shift = block_size.bit_length() - 7
    if shift < 0 or 64 << shift != block_size:
        raise ValueError(f"block size {block_size} is not 64 << n")
    return shift


@dataclass(frozen=True)
class JournalEntry:
    """One write PicoLisp made to a DB file: put `payload` at byte `address << shift(file)`."""

    file: int
    address: int
    payload: bytes

    def position(self, block_size: int) -> int:
        return self.address << _shift_of(block_size)


def parse_journal(data: bytes, block_sizes: Sequence[int], *, base_offset: int = 0) -> list[JournalEntry]:
    """Split journal bytes into entries (§2.2); raise PipelineError unless `data` is exactly whole entries.

    `block_sizes[f]` is file f's block size (the journal does not say how long a full-block entry is).
    `base_offset` is added to byte offsets in error messages, for callers parsing from the middle.
    """
    shifts = [_shift_of(bs) for bs in block_sizes]
    view = memoryview(data)
    end = len(view)
    entries: list[JournalEntry] = []
    append = entries.append
    unpack = _HEADER.unpack_from
    pos = 0
    while pos < end:
        if end - pos < JOURNAL_HEADER:
            raise PipelineError(
                f"journal truncated: entry at byte {base_offset + pos} needs {JOURNAL_HEADER} bytes, "
                f"only {end - pos} left"
            )
        size, file, lo, hi = unpack(view, pos)
        if file >= len(shifts):
            raise PipelineError(
                f"journal entry at byte {base_offset + pos} names file {file} "
                f"but the pool has {len(shifts)} files"
            )
        shift = shifts[file]
        block_size = 64 << shift
        # 0 = full block (pil21); 64 = full block too (pil64 wrote it, `journal` still accepts it, §2.3).
        length = block_size if size == 0 or size == 64 else size
        need = JOURNAL_HEADER + length
        if end - pos < need:
            raise PipelineError(
                f"journal truncated: entry at byte {base_offset + pos} needs {need} bytes, only {end - pos} left"
            )
        address = lo | hi << 32
        offset = address << shift
        if offset // block_size != (offset + length - 1) // block_size:
            raise PipelineError(
                f"journal entry at byte {base_offset + pos} writes {length} bytes at offset {offset} of file "
                f"{hax(file)}, crossing a {block_size}-byte block boundary; PicoLisp never does that"
            )
        append(JournalEntry(file, address, bytes(view[pos + JOURNAL_HEADER : pos + need])))
        pos += need
    return entries


def touched_blocks(entries: Iterable[JournalEntry], block_sizes: Sequence[int]) -> dict[int, set[int]]:
    """File number -> indexes of the blocks the entries wrote into."""
    shifts = [_shift_of(bs) for bs in block_sizes]
    touched: dict[int, set[int]] = {}
    for e in entries:
        shift = shifts[e.file]
        first = (e.address << shift) >> (shift + 6)
        last = ((e.address << shift) + max(len(e.payload), 1) - 1) >> (shift + 6)
        blocks = touched.setdefault(e.file, set())
        if first == last:
            blocks.add(first)
        else:  # only hand-made entries cross blocks; parse_journal rejects them
            blocks.update(range(first, last + 1))
    return touched


# Byte 0 (len 1) of '@' is PicoLisp's DB lock (§3.1); lockf(len=1, start=0) is exactly F_SETLKW there.
def lock_db_shared(fd: int) -> None:
    """Wait for a read lock on the DB: no commit/new/dbck runs while it is held (§3.2)."""
    fcntl.lockf(fd, fcntl.LOCK_SH, 1, 0, os.SEEK_SET)


def lock_db_exclusive(fd: int) -> None:
    """Wait for the DB write lock, as commit takes it (`fd` must be open for writing)."""
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0, os.SEEK_SET)


def unlock_db(fd: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0, os.SEEK_SET)


def _pread_all(fd: int, size: int, offset: int = 0) -> bytes:
    parts: list[bytes] = []
    done = 0
    while done < size:
        part = os.pread(fd, min(size - done, 1 << 30), offset + done)
        if not part:
            raise PipelineError(f"file shrank while reading: got {done} of {size} bytes", retriable=True)
        parts.append(part)
        done += len(part)
    return b"".join(parts)


class JournalConsumer:
    """Consumes the journal exactly like bin/ssl (§4.2): whole-file F_WRLCK, read all, release; later re-lock, move the unconsumed tail to the front, ftruncate. Never renames/deletes the journal.

    The one fd stays open for the consumer's life: closing any fd of the journal would drop this
    process's fcntl locks on it (§3.3). fcntl locks belong to the process, so two threads sharing
    one consumer do not exclude each other; use one consumer per process.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._open()

    def _open(self) -> int | None:
        if self._fd is None:
            try:
                # No O_CREAT: the app creates the journal (ssl does the same); O_RDWR because F_WRLCK needs it.
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise PipelineError(f"journal {self.path} is not a regular file")
            self._fd, self._ino = fd, (st.st_dev, st.st_ino)
        return self._fd

    def _check_same_file(self) -> None:
        # The app appends to the inode it opened; a journal replaced under us would be read forever stale.
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self._ino:
            raise PipelineError(
                f"journal {self.path} was deleted or replaced while being consumed; "
                "PicoLisp keeps appending to the old file, so restart the app and the consumer"
            )

    def _lock(self, fd: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0, os.SEEK_SET)  # F_SETLKW F_WRLCK start 0 len 0 = whole file

    def _unlock(self, fd: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_UN, 0, 0, os.SEEK_SET)

    def read_locked(self, fn: Callable[[bytes], T]) -> T:
        """Lock the journal, read all of it, return fn(data) computed before unlocking.

        While fn runs no commit or `new` can be in progress (they take this lock before their
        first DB write), so DB blocks pread inside fn match the end of `data` exactly.
        fn must not wait for the DB lock: commit holds it while waiting for ours (deadlock).
        """
        fd = self._open()
        if fd is None:
            return fn(b"")
        self._check_same_file()
        self._lock(fd)
        try:
            data = _pread_all(fd, os.fstat(fd).st_size)
            return fn(data)
        finally:
            self._unlock(fd)

    def consume(self, n: int) -> None:
        """Drop the first n bytes (already processed), keeping whatever the app appended meanwhile."""
        if n < 0:
            raise ValueError(f"cannot consume {n} bytes")
        if n == 0:
            return
        fd = self._open()
        if fd is None:
            raise PipelineError(f"cannot consume {n} bytes: journal {self.path} does not exist")
        self._check_same_file()
        self._lock(fd)
        try:
            size = os.fstat(fd).st_size
            if n > size:
                raise PipelineError(
                    f"cannot consume {n} bytes of journal {self.path}: it holds only {size}; "
                    "is another consumer (bin/ssl?) truncating it?"
                )
            # A signal in the middle of moving the tail would leave the journal garbled (ssl defers
            # SIGTERM here too); blocked signals are delivered right after.
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                rest = size - n
                # Forward copy is safe although the ranges overlap: destination < source.
                done = 0
                while done < rest:
                    chunk = _pread_all(fd, min(_COPY_CHUNK, rest - done), n + done)
                    written = 0
                    while written < len(chunk):
                        written += os.pwrite(fd, chunk[written:], done + written)
                    done += len(chunk)
                os.ftruncate(fd, rest)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        finally:
            self._unlock(fd)

    @property
    def fd(self) -> int | None:
        """The consumer's journal fd (None while the journal does not exist); never close it yourself."""
        return self._open()

    def size(self) -> int:
        fd = self._open()
        return 0 if fd is None else os.fstat(fd).st_size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "JournalConsumer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def blob_markers(blob_dir: Path, refused: Callable[[str, str, PipelineError], None] | None = None
                 ) -> list[tuple[str, str]]:
    """Pending blob transfers: ('=A1234.doc', 'A/1/234.doc') for each '=' symlink in blob_dir (§4.4), sorted.

    A marker whose target safe_blob_path refuses raises, or with `refused` is passed to it and left out.
    """
    markers: list[tuple[str, str]] = []
    try:
        names = os.listdir(blob_dir)
    except FileNotFoundError:
        return markers
    for name in sorted(names):
        if not name.startswith("="):
            continue
        try:
            target = os.readlink(os.path.join(blob_dir, name))
        except FileNotFoundError:
            continue  # removed meanwhile (another consumer, or PicoLisp's zap)
        except OSError:
            continue  # not a symlink, so not a marker blob+ made
        try:
            safe_blob_path(target)
        except PipelineError as exc:
            if refused is None:
                shown = os.fsencode(name).decode("utf-8", "backslashreplace")  # printable even if not UTF-8
                raise PipelineError(f"blob marker {shown} in {blob_dir}: {exc.message}") from None
            refused(name, target, exc)
            continue
        markers.append((name, target))
    return markers


def blob_tree(blob_dir: Path) -> dict[str, Path]:
    """Relative path -> file for every regular blob file; skips '=' markers, symlinks and '.' names (temp dirs)."""
    root = Path(blob_dir)
    tree: dict[str, Path] = {}
    if not root.is_dir():
        return tree
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "=")))
        for name in sorted(filenames):
            if name.startswith((".", "=")):
                continue
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            tree[path.relative_to(root).as_posix()] = path
    return tree


def md5_file(path: str | Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _first_difference(a: Path, b: Path) -> int | None:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            ca, cb = fa.read(_COPY_CHUNK), fb.read(_COPY_CHUNK)
            if ca != cb:
                for i, (x, y) in enumerate(zip(ca, cb)):
                    if x != y:
                        return pos + i
                return pos + min(len(ca), len(cb))
            if not ca:
                return None
            pos += len(ca)


def compare_pools(a_prefix: str | Path, b_prefix: str | Path) -> list[str]:
    """Human-readable differences between two pools (file count, per-file md5); [] if byte-identical."""
    a_files, b_files = pool_files(a_prefix), pool_files(b_prefix)
    diffs: list[str] = []
    if len(a_files) != len(b_files):
        diffs.append(f"file count: {a_prefix} has {len(a_files)}, {b_prefix} has {len(b_files)}")
    for n, (a, b) in enumerate(zip(a_files, b_files)):
        ma, mb = md5_file(a), md5_file(b)
        if ma == mb:
            continue
        sa, sb = a.stat().st_size, b.stat().st_size
        text = f"file {hax(n)}: md5 {ma} != {mb}, sizes {sa} and {sb}"
        first = _first_difference(a, b)
        if first is not None:
            try:
                text += f", first difference at byte {first} (block {first // block_size_of(a)})"
            except PipelineError:
                text += f", first difference at byte {first}"
        diffs.append(text)
    return diffs


def compare_blob_trees(a_dir: str | Path, b_dir: str | Path) -> list[str]:
    """Blobs missing from b, extra in b, or with different content; [] if the trees hold the same files."""
    a, b = blob_tree(Path(a_dir)), blob_tree(Path(b_dir))
    diffs = [f"blob {p}: missing from {b_dir}" for p in sorted(a.keys() - b.keys())]
    diffs += [f"blob {p}: only in {b_dir}, not in {a_dir}" for p in sorted(b.keys() - a.keys())]
    for p in sorted(a.keys() & b.keys()):
        ma, mb = md5_file(a[p]), md5_file(b[p])
        if ma != mb:
            diffs.append(
                f"blob {p}: md5 {ma} != {mb}, sizes {a[p].stat().st_size} and {b[p].stat().st_size}"
            )
    return diffs
