"""Local files: the one atomic write (temp file, fsync, rename, fsync of the directory)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make the directory entries under `path` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | Path, data: bytes | None = None) -> None:
    """Write `data` to a new file at `path` (None: the file is already written), then fsync it.

    An error names `path`, so that a full or read-only disk can be reported with the file at fault."""
    flags = os.O_RDONLY if data is None else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o644)
    try:
        if data is not None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes, tmp_name: str | None = None, *, durable: bool = True) -> None:
    """Replace `path` with `data`: readers see the old or the new content, never a mix, even after a crash.

    The temp file is `tmp_name` beside `path` (default: name + '.tmp'); writers that may race on one
    path give each their own. `durable=False` skips both fsyncs (5 ms of wall time here): the file
    then survives a kill -9 (the page cache), not a power cut, which suits state that is checked
    against the boot id on start (connectors/picolisp/source.py)."""
    path = Path(path)
    tmp = path.with_name(tmp_name or path.name + ".tmp")
    if durable:
        write_synced(tmp, data)
    else:
        try:
            with open(tmp, "wb") as fo:
                fo.write(data)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(tmp)) from None
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
