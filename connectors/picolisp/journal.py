"""The PicoLisp journal: the one parser of its entries, and the consumer taking it under its lock (FORMAT.md §2, §4)."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import TypeVar

from connectors.picolisp.format import hax, pread_all, shift_of
from pipeline.errors import PipelineError

T = TypeVar("T")


# Entry header: size code (1), file number (2, LE), address (6, LE) split as 4 + 2 bytes (§2.2).
_HEADER = struct.Struct("<BHIH")


JOURNAL_HEADER = _HEADER.size  # 9


@dataclass(frozen=True)
class JournalEntry:
    """One write PicoLisp made to a DB file: put `payload` at byte `address << shift(file)`."""

    file: int
    address: int
    payload: bytes

    def position(self, block_size: int) -> int:
        return self.address << shift_of(block_size)


JOURNAL_WINDOW = 32 << 20  # journal and spool are parsed from preads of this size: bounded memory, few syscalls


def _walk(
    data: bytes | memoryview,
    block_sizes: Sequence[int],
    base_offset: int,
    *,
    start: int = 0,
    end: int | None = None,
    reload: Callable[[int], bytes] | None = None,
) -> Iterator[tuple[int, int, int, int, int]]:
    """(payload offset, file, address, length, block) per entry, reading only the headers (§2.2).

    The one parser: raises PipelineError, naming what and where, at the first entry that is cut
    short, names a file the pool lacks, or crosses a block boundary.

    `data` holds bytes [start, start + len(data)) of a journal that ends at `end` (default: the end
    of `data`). When an entry's header lies beyond `data`, `reload(pos)` must return the bytes from
    `pos` on (at least a header's worth; the caller checked that many are left): a payload is never
    read, so an entry may cross any number of windows. Offsets yielded are journal offsets."""
    shifts = [shift_of(bs) for bs in block_sizes]
    files = len(shifts)
    unpack = _HEADER.unpack_from
    buf, buf_start = data, start
    pos = start
    if end is None:
        end = start + len(data)
    while pos < end:
        if end - pos < JOURNAL_HEADER:
            raise PipelineError(
                f"journal truncated: entry at byte {base_offset + pos} needs {JOURNAL_HEADER} bytes, "
                f"only {end - pos} left"
            )
        rel = pos - buf_start
        if rel + JOURNAL_HEADER > len(buf):
            assert reload is not None, "data ends before `end` and there is no reload"
            buf, buf_start, rel = reload(pos), pos, 0
        size, file, lo, hi = unpack(buf, rel)
        if file >= files:
            raise PipelineError(
                f"journal entry at byte {base_offset + pos} names file {file} but the pool has {files} files"
            )
        shift = shifts[file]
        # 0 = full block (pil21); 64 = full block too (pil64 wrote it, `journal` still accepts it, §2.3).
        length = 64 << shift if size == 0 or size == 64 else size
        need = JOURNAL_HEADER + length
        if end - pos < need:
            raise PipelineError(
                f"journal truncated: entry at byte {base_offset + pos} needs {need} bytes, only {end - pos} left"
            )
        address = lo | hi << 32
        offset = address << shift
        block = offset >> (shift + 6)
        if (offset + length - 1) >> (shift + 6) != block:
            raise PipelineError(
                f"journal entry at byte {base_offset + pos} writes {length} bytes at offset {offset} of file "
                f"{hax(file)}, crossing a {64 << shift}-byte block boundary; PicoLisp never does that"
            )
        yield pos + JOURNAL_HEADER, file, address, length, block
        pos += need


def parse_journal(data: bytes, block_sizes: Sequence[int], *, base_offset: int = 0) -> list[JournalEntry]:
    """Split journal bytes into entries (§2.2); raise PipelineError unless `data` is exactly whole entries.

    `block_sizes[f]` is file f's block size (the journal does not say how long a full-block entry is).
    `base_offset` is added to byte offsets in error messages, for callers parsing from the middle.
    """
    view = memoryview(data)
    return [
        JournalEntry(file, address, bytes(view[start : start + length]))
        for start, file, address, length, _ in _walk(view, block_sizes, base_offset)
    ]


def journal_blocks(data: bytes, block_sizes: Sequence[int], *, base_offset: int = 0) -> set[tuple[int, int]]:
    """The (file, block) pairs the journal bytes write into, with parse_journal's checks and errors.

    Only the headers are read: parse_journal copies every payload into an entry, which made it the
    costliest part of a capture round (and of its memory)."""
    return {(file, block) for _, file, _, _, block in _walk(data, block_sizes, base_offset)}


_BITS = [tuple(bit for bit in range(8) if byte >> bit & 1) for byte in range(256)]


class BlockSet:
    """A set of (file, block) pairs as one bitmap per file, sized to the file's block count (`limits`).

    One bit a block: memory follows the pool's size (a 1 GiB file of 64-byte blocks costs 2 MiB),
    never the journal's, where a set of tuples cost over 100 bytes a block. Iterates in (file, block)
    order. A block at or beyond its file's limit is not stored: the first one is kept in `beyond`."""

    def __init__(self, limits: Sequence[int]) -> None:
        self.maps = [bytearray((n + 7) >> 3) for n in limits]
        self.limits = list(limits)
        self.beyond: tuple[int, int] | None = None

    def add(self, file: int, block: int) -> None:
        if block >= self.limits[file]:
            if self.beyond is None:
                self.beyond = (file, block)
            return
        self.maps[file][block >> 3] |= 1 << (block & 7)

    def add_range(self, file: int, start: int, stop: int) -> None:
        """Add blocks start..stop-1 (stop at most the file's limit)."""
        m = self.maps[file]
        stop = min(stop, self.limits[file])
        while start < stop and start & 7:
            m[start >> 3] |= 1 << (start & 7)
            start += 1
        full = (stop - start) >> 3
        if full > 0:
            m[start >> 3 : (start >> 3) + full] = b"\xff" * full
            start += full << 3
        while start < stop:
            m[start >> 3] |= 1 << (start & 7)
            start += 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for file in range(len(self.maps)):
            for index in self.indexes(file):
                yield file, index

    def indexes(self, file: int) -> list[int]:
        """The blocks of `file` in the set, ascending."""
        m = self.maps[file]
        return [(i << 3) + bit for i in compress(range(len(m)), m) for bit in _BITS[m[i]]]

    def __len__(self) -> int:
        return sum(int.from_bytes(m, "little").bit_count() for m in self.maps)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        file, block = key
        return (
            0 <= file < len(self.maps)
            and 0 <= block < self.limits[file]
            and bool(self.maps[file][block >> 3] >> (block & 7) & 1)
        )


def journal_blocks_fd(
    fd: int,
    size: int,
    block_sizes: Sequence[int],
    into: BlockSet,
    *,
    window: int = JOURNAL_WINDOW,
) -> BlockSet:
    """Add to `into` the blocks the first `size` bytes of the file `fd` write, read `window` bytes at a time.

    Memory is one window plus the bitmaps, whatever the journal's size: a 1.2 GiB backlog read whole
    (and its blocks as a set of tuples) took the agent to 2.4 GiB. Same checks and errors as
    journal_blocks (offsets are file offsets)."""
    window = max(window, JOURNAL_HEADER)

    def reload(pos: int) -> bytes:
        return pread_all(fd, min(window, size - pos), pos)

    maps, limits = into.maps, into.limits
    first = reload(0) if size else b""
    for _, file, _, _, block in _walk(first, block_sizes, 0, end=size, reload=reload):
        if block < limits[file]:
            maps[file][block >> 3] |= 1 << (block & 7)
        elif into.beyond is None:
            into.beyond = (file, block)
    return into


def touched_blocks(entries: Iterable[JournalEntry], block_sizes: Sequence[int]) -> dict[int, set[int]]:
    """File number -> indexes of the blocks the entries wrote into."""
    shifts = [shift_of(bs) for bs in block_sizes]
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


class JournalConsumer:
    """Takes the journal like bin/ssl (§4.2): a whole-file F_WRLCK, read it all, release; the capture agent
    empties it under the same lock. Never renames or deletes the journal.

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

    def locked(self, fn: Callable[[int | None, int], T]) -> T:
        """Lock the journal, return fn(fd, size) computed before unlocking; fd is None (size 0) while
        the journal does not exist. Same rules as read_locked, without reading the journal into memory:
        fn preads what it needs (journal_blocks_fd) and must not close fd."""
        fd = self._open()
        if fd is None:
            return fn(None, 0)
        self._check_same_file()
        self._lock(fd)
        try:
            return fn(fd, os.fstat(fd).st_size)
        finally:
            self._unlock(fd)

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
            data = pread_all(fd, os.fstat(fd).st_size)
            return fn(data)
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

    def __enter__(self) -> JournalConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
