"""PicoLisp pool files: names, block sizes, the locks PicoLisp takes, reads, comparison (FORMAT.md here)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.model import BlockWrite, FileLayout

# A shift beyond this (64 MiB blocks) means byte 12 is not a PicoLisp header, not a real setting.
MAX_SHIFT = 20


COPY_CHUNK = 1 << 20
SCAN_SLICE = 4 << 20  # whole-pool reads go in slices of about this size: few syscalls, bounded memory


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


def shift_of(block_size: int) -> int:
    shift = block_size.bit_length() - 7
    if shift < 0 or 64 << shift != block_size:
        raise ValueError(f"block size {block_size} is not 64 << n")
    return shift


# Byte 0 (len 1) of '@' is PicoLisp's DB lock (§3.1); lockf(len=1, start=0) is exactly F_SETLKW there.
def lock_db_shared(fd: int) -> None:
    """Wait for a read lock on the DB: no commit/new/dbck runs while it is held (§3.2)."""
    fcntl.lockf(fd, fcntl.LOCK_SH, 1, 0, os.SEEK_SET)


def lock_db_exclusive(fd: int) -> None:
    """Wait for the DB write lock, as commit takes it (`fd` must be open for writing)."""
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0, os.SEEK_SET)


def unlock_db(fd: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0, os.SEEK_SET)


def pread_all(fd: int, size: int, offset: int = 0) -> bytes:
    parts: list[bytes] = []
    done = 0
    while done < size:
        part = os.pread(fd, min(size - done, 1 << 30), offset + done)
        if not part:
            raise PipelineError(f"file shrank while reading: got {done} of {size} bytes", retriable=True)
        parts.append(part)
        done += len(part)
    return b"".join(parts)


COPY_CHUNK = 64 << 20  # file-to-file copies go in pieces of this size


def copy_range(src: int, dst: int, size: int, src_offset: int = 0, dst_offset: int = 0) -> None:
    """Copy `size` bytes of `src` at `src_offset` to `dst` at `dst_offset`, in the kernel where it can
    (copy_file_range) and through a bounded buffer where it cannot: never the whole range in memory."""
    done = 0
    kernel = hasattr(os, "copy_file_range")
    while done < size:
        n = min(COPY_CHUNK, size - done)
        got = 0
        if kernel:
            try:
                got = os.copy_file_range(src, dst, n, src_offset + done, dst_offset + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                kernel = False
        if not kernel:
            data = os.pread(src, min(n, 1 << 24), src_offset + done)
            got = len(data)
            view, written = memoryview(data), 0
            while written < got:
                written += os.pwrite(dst, view[written:], dst_offset + done + written)
        if not got:
            raise PipelineError(f"file shrank while copying: got {done} of {size} bytes", retriable=True)
        done += got


def scan_blocks(fd_of: Callable[[int], int], layout: Iterable[FileLayout]) -> Iterator[BlockWrite]:
    """Every block of `layout`, file after file, read from `fd_of(file)` in SCAN_SLICE slices.

    It takes no lock: what it reads while PicoLisp writes is a fuzzy copy, which callers repair
    or check. A file shorter than its layout raises a retriable PipelineError (pread_all)."""
    for f in layout:
        fd, bs = fd_of(f.file), f.block_size
        step = max(1, SCAN_SLICE // bs)
        for first in range(0, f.blocks, step):
            n = min(step, f.blocks - first)
            buf = pread_all(fd, n * bs, first * bs)
            for k in range(n):
                yield BlockWrite(f.file, first + k, buf[k * bs : (k + 1) * bs])


def md5_file(path: str | Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _first_difference(a: Path, b: Path) -> int | None:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            ca, cb = fa.read(COPY_CHUNK), fb.read(COPY_CHUNK)
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
