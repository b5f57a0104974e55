"""Unit tests for the one-of-each pieces: journal_blocks, blob_files, scan_blocks, write_atomic (no network)."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

import connectors.picolisp.format as fmt
import connectors.picolisp.journal as jrn
from connectors.files import write_atomic, write_synced
from connectors.picolisp.blobs import blob_files, blob_tree
from connectors.picolisp.format import scan_blocks
from connectors.picolisp.journal import BlockSet, journal_blocks, journal_blocks_fd, parse_journal, touched_blocks
from pipeline.errors import PipelineError
from pipeline.model import BlockWrite, FileLayout
from tests.unit.test_picolisp_journal import entry

SIZES = [256, 256, 64, 1024]


# --- journal_blocks -----------------------------------------------------------------------------


def test_journal_blocks_agrees_with_parse_journal() -> None:
    rng = random.Random(7)
    data = b""
    for _ in range(300):
        file = rng.randrange(len(SIZES))
        bs = SIZES[file]
        block = rng.randrange(50)
        if rng.random() < 0.3:
            data += entry(0, file, block * bs >> (bs.bit_length() - 7), bytes(bs))
        else:
            length = rng.randrange(1, min(bs, 255))
            start = rng.randrange(bs - length + 1)
            data += entry(length, file, (block * bs + start) >> (bs.bit_length() - 7), bytes(length))
    expected = {(f, b) for f, blocks in touched_blocks(parse_journal(data, SIZES), SIZES).items() for b in blocks}
    assert journal_blocks(data, SIZES) == expected
    assert journal_blocks(b"", SIZES) == set()


@pytest.mark.parametrize(
    "data",
    [
        entry(12, 0, 0, bytes(12)) + entry(0, 1, 64, bytes(256))[:20],  # truncated payload
        b"\x00\x00\x00",  # truncated header
        entry(6, 0, 0, bytes(6)) + entry(0, 4, 64, bytes(64)),  # a file the pool lacks
        entry(12, 2, 58, bytes(12)),  # crosses a block boundary
        entry(0, 1, 65, bytes(256)),  # a full block not at a block start
    ],
)
def test_journal_blocks_raises_what_parse_journal_raises(data: bytes) -> None:
    with pytest.raises(PipelineError) as parsed:
        parse_journal(data, SIZES, base_offset=500)
    with pytest.raises(PipelineError) as fast:
        journal_blocks(data, SIZES, base_offset=500)
    assert fast.value.message == parsed.value.message
    assert "at byte 5" in fast.value.message


# --- blob_files ---------------------------------------------------------------------------------


def test_blob_files_skip_rule_and_refused_names(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    (blob / "A" / "1").mkdir(parents=True)
    (blob / "A" / "1" / "234.doc").write_bytes(b"x")
    (blob / "B.txt").write_bytes(b"y")
    (blob / ".inflight").mkdir()
    (blob / ".inflight" / "z").write_bytes(b"tmp")  # a '.' dir is not walked
    (blob / ".part").write_bytes(b"tmp")
    (blob / "=stray").write_bytes(b"not a marker")
    os.symlink("A/1/234.doc", blob / "=A1234.doc")
    os.symlink("B.txt", blob / "link.txt")  # symlinks are not blobs
    os.symlink("A", blob / "dirlink")
    os.mkfifo(blob / "fifo")  # nor is anything but a regular file
    bad = os.fsdecode(b"bad\xff.doc")
    (blob / bad).write_bytes(b"z")
    assert blob_files(blob) == sorted(["A/1/234.doc", "B.txt", bad])
    refused: list[str] = []
    assert blob_files(blob, lambda rel, exc: refused.append(rel)) == ["A/1/234.doc", "B.txt"]
    assert refused == [bad]
    assert blob_tree(blob)["A/1/234.doc"] == blob / "A" / "1" / "234.doc"
    assert blob_files(tmp_path / "missing") == [] and blob_files(blob / "B.txt") == []


# --- scan_blocks --------------------------------------------------------------------------------


def test_scan_blocks_reads_every_block_in_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "SCAN_SLICE", 3 * 64)  # slices of 3 blocks, so runs of 7 span three slices
    rng = random.Random(3)
    layout = [FileLayout(0, 64, 7), FileLayout(1, 128, 2)]
    images = {f.file: rng.randbytes(f.block_size * f.blocks) for f in layout}
    fds = []
    for f in layout:
        (tmp_path / str(f.file)).write_bytes(images[f.file])
        fds.append(os.open(tmp_path / str(f.file), os.O_RDONLY))
    try:
        got = list(scan_blocks(fds.__getitem__, layout))
        want = [
            BlockWrite(f.file, i, images[f.file][i * f.block_size : (i + 1) * f.block_size])
            for f in layout
            for i in range(f.blocks)
        ]
        assert got == want
        with pytest.raises(PipelineError, match="shrank") as exc:
            list(scan_blocks(fds.__getitem__, [FileLayout(0, 64, 8)]))
        assert exc.value.retriable
    finally:
        for fd in fds:
            os.close(fd)


# --- write_atomic -------------------------------------------------------------------------------


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new content")
    assert path.read_bytes() == b"new content"
    write_atomic(path, b"mine", ".state.json.tmp-1")
    assert path.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_write_synced_names_the_file_in_errors(tmp_path: Path) -> None:
    with pytest.raises(OSError) as exc:
        write_synced(tmp_path / "no-such-dir" / "f", b"x")
    assert exc.value.filename == str(tmp_path / "no-such-dir" / "f")
    (tmp_path / "f").write_bytes(b"written elsewhere")
    write_synced(tmp_path / "f")  # None: only the fsync
    assert (tmp_path / "f").read_bytes() == b"written elsewhere"


# --- journal_blocks_fd: the journal parsed in bounded windows ----------------------------------


def _random_journal(seed: int, n: int = 300) -> bytes:
    rng = random.Random(seed)
    parts = []
    for _ in range(n):
        file = rng.randrange(len(SIZES))
        bs = SIZES[file]
        block = rng.randrange(50)
        if rng.random() < 0.3:
            parts.append(entry(0, file, block * bs >> (bs.bit_length() - 7), bytes(bs)))
        else:
            length = rng.choice([n for n in range(1, min(bs, 255)) if n != 64])  # size code 64 = a full block
            start = rng.randrange(bs - length + 1)
            parts.append(entry(length, file, (block * bs + start) >> (bs.bit_length() - 7), bytes(length)))
    return b"".join(parts)


def _room() -> BlockSet:
    return BlockSet([1000] * len(SIZES))  # room for every block the journals here write


def test_block_set_is_a_set_of_pairs_in_order_one_bit_a_block() -> None:
    rng = random.Random(3)
    limits = [0, 70, 1, 1000]
    blocks = BlockSet(limits)
    want: set[tuple[int, int]] = set()
    for _ in range(500):
        file = rng.choice([1, 2, 3])
        block = rng.randrange(limits[file])
        blocks.add(file, block)
        want.add((file, block))
    for file, start, stop in ((3, 5, 5), (3, 13, 14), (3, 17, 100), (3, 990, 1000), (1, 0, 70)):
        blocks.add_range(file, start, stop)
        want.update((file, b) for b in range(start, stop))
    assert list(blocks) == sorted(want) and len(blocks) == len(want)
    assert (1, 69) in blocks and (0, 0) not in blocks and (3, 1000) not in blocks
    assert blocks.beyond is None
    blocks.add(1, 70)  # at its file's end: not stored, remembered (the caller refuses the journal)
    blocks.add(3, 5000)
    assert blocks.beyond == (1, 70) and len(blocks) == len(want)
    assert [len(m) for m in blocks.maps] == [0, 9, 1, 125]  # one bit a block


def _fd_of(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "journal"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


@pytest.mark.parametrize("window", [1, 9, 10, 13, 64, 255, 1000, 1 << 20])
def test_journal_blocks_fd_agrees_with_journal_blocks_whatever_the_window(tmp_path: Path, window: int) -> None:
    # Windows of 9..1000 bytes put headers and payloads across every kind of window boundary.
    data = _random_journal(11)
    fd = _fd_of(tmp_path, data)
    try:
        assert set(journal_blocks_fd(fd, len(data), SIZES, _room(), window=window)) == journal_blocks(data, SIZES)
        assert set(journal_blocks_fd(fd, 0, SIZES, _room(), window=window)) == set()
    finally:
        os.close(fd)


def test_journal_blocks_fd_reads_only_up_to_size_in_bounded_preads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _random_journal(12)
    size = len(data) - 17  # what a commit appends after the size was taken is not read
    fd = _fd_of(tmp_path, data)
    reads: list[tuple[int, int]] = []
    real = jrn.pread_all

    def spy(fd: int, n: int, offset: int = 0) -> bytes:
        reads.append((n, offset))
        return real(fd, n, offset)

    monkeypatch.setattr(jrn, "pread_all", spy)
    try:
        assert set(journal_blocks_fd(fd, len(data), SIZES, _room(), window=100)) == journal_blocks(data, SIZES)
        assert reads and max(n for n, _ in reads) <= 100
        assert all(off + n <= len(data) for n, off in reads)
        reads.clear()
        with pytest.raises(PipelineError):  # 17 bytes short: the last entry is cut
            journal_blocks_fd(fd, size, SIZES, _room(), window=100)
        assert all(off + n <= size for n, off in reads)
    finally:
        os.close(fd)


def _corrupt_at_edges() -> list[tuple[str, bytes, int]]:
    """(name, journal, window): a bad entry whose header or payload meets a window edge."""
    good = entry(12, 0, 0, bytes(12)) + entry(0, 1, 64, bytes(256))  # 21 + 265 = 286 bytes
    cases = []
    for window in (280, 286, 287, 290, 295, 300):
        cases += [
            ("truncated payload", good + entry(0, 1, 64, bytes(256))[:40], window),
            ("truncated header", good + b"\x00\x00\x00", window),
            ("file the pool lacks", good + entry(6, 4, 0, bytes(6)), window),
            ("crosses a block", good + entry(12, 2, 58, bytes(12)), window),
            ("full block not at a block start", good + entry(0, 1, 65, bytes(256)), window),
        ]
    return cases


@pytest.mark.parametrize(("name", "data", "window"), _corrupt_at_edges())
def test_journal_blocks_fd_refuses_a_corrupt_entry_at_a_window_edge(
    tmp_path: Path, name: str, data: bytes, window: int
) -> None:
    fd = _fd_of(tmp_path, data)
    try:
        with pytest.raises(PipelineError) as whole:
            journal_blocks(data, SIZES)
        with pytest.raises(PipelineError) as windowed:
            journal_blocks_fd(fd, len(data), SIZES, _room(), window=window)
    finally:
        os.close(fd)
    assert windowed.value.message == whole.value.message
    assert "at byte 286" in windowed.value.message, name


# --- copy_range ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_range_copies_in_bounded_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: bool) -> None:
    monkeypatch.setattr(fmt, "COPY_CHUNK", 1000)
    calls: list[int] = []
    if kernel:
        real = os.copy_file_range

        def spy(src: int, dst: int, n: int, *offsets: int) -> int:
            calls.append(n)
            return real(src, dst, n, *offsets)

        monkeypatch.setattr(os, "copy_file_range", spy)
    else:  # e.g. a file system without copy_file_range: the pread/pwrite loop

        def unsupported(*args: int) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    src_data = os.urandom(5500)
    (tmp_path / "src").write_bytes(src_data)
    (tmp_path / "dst").write_bytes(b"head")
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY)
    try:
        fmt.copy_range(src, dst, 5000, 100, 4)
        assert (tmp_path / "dst").read_bytes() == b"head" + src_data[100:5100]
        with pytest.raises(PipelineError, match="shrank"):  # the source is shorter than asked
            fmt.copy_range(src, dst, 6000, 0, 0)
    finally:
        os.close(src)
        os.close(dst)
    if kernel:
        assert calls and max(calls) <= 1000
