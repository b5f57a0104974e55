"""Unit tests for the one-of-each pieces: journal_blocks, blob_files, scan_blocks, write_atomic (no network)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import connectors.picolisp.format as fmt
from connectors.files import write_atomic, write_synced
from connectors.picolisp.blobs import blob_files, blob_tree
from connectors.picolisp.format import scan_blocks
from connectors.picolisp.journal import journal_blocks, parse_journal, touched_blocks
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
