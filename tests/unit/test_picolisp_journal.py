"""Unit tests for connectors.picolisp on hand-made journal bytes and pools (no PicoLisp needed)."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from connectors.picolisp.blobs import blob_markers, blob_tree, compare_blob_trees
from connectors.picolisp.format import block_size_of, compare_pools, hax, md5_file, pool_files, read_shift
from connectors.picolisp.journal import JournalConsumer, JournalEntry, parse_journal, touched_blocks
from pipeline.errors import PipelineError


def entry(size_code: int, file: int, address: int, payload: bytes) -> bytes:
    """One journal entry as PicoLisp writes it (§2.2)."""
    return struct.pack("<BH", size_code, file) + address.to_bytes(6, "little") + payload


def make_pool(prefix: Path, shifts: list[int]) -> list[Path]:
    """A freshly created pool like PicoLisp makes it (§1.8)."""
    prefix.mkdir(parents=True, exist_ok=True)
    files = []
    for n, sh in enumerate(shifts):
        bs = 64 << sh
        block0 = bytearray(bs)
        block0[6:12] = (128 if n == 0 else 64).to_bytes(6, "little")
        block0[12] = sh
        data = bytes(block0)
        if n == 0:
            root = bytearray(bs)
            root[0] = 1
            data += bytes(root)
        path = prefix / hax(n)
        path.write_bytes(data)
        files.append(path)
    return files


def replay(files: list[Path], entries: list[JournalEntry], block_sizes: list[int]) -> None:
    for e in entries:
        with open(files[e.file], "r+b") as f:
            os.pwrite(f.fileno(), e.payload, e.position(block_sizes[e.file]))


# --- hax / pool files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, text",
    [(0, "@"), (1, "A"), (15, "O"), (16, "A@"), (17, "AA"), (256, "A@@"), (299, "ABK")],
)
def test_hax(n: int, text: str) -> None:
    assert hax(n) == text


def test_hax_rejects_negative() -> None:
    with pytest.raises(ValueError):
        hax(-1)


def test_pool_files_stop_at_first_gap_and_ignore_other_names(tmp_path: Path) -> None:
    db = tmp_path / "db" / "app"
    make_pool(db, [1, 2, 0])
    (db / "E").write_bytes(bytes(64))  # after the gap at D: not part of the pool
    (db / "blob").mkdir()
    expected = [db / "@", db / "A", db / "B"]
    assert pool_files(f"{db}/") == expected
    assert pool_files(db) == expected  # a directory prefix without '/' means the same
    assert pool_files(tmp_path / "nothing/") == []


def test_pool_files_plain_prefix_and_single_file(tmp_path: Path) -> None:
    for n in range(3):
        (tmp_path / f"dbFile{hax(n)}").write_bytes(bytes(64))
    assert [p.name for p in pool_files(str(tmp_path / "dbFile"))] == ["dbFile@", "dbFileA", "dbFileB"]
    single = tmp_path / "single.db"
    single.write_bytes(bytes(256))
    assert pool_files(single) == [single]


def test_read_shift_and_block_size(tmp_path: Path) -> None:
    files = make_pool(tmp_path / "p", [0, 1, 2, 4, 6])
    assert [read_shift(f) for f in files] == [0, 1, 2, 4, 6]
    assert [block_size_of(f) for f in files] == [64, 128, 256, 1024, 4096]
    short = tmp_path / "short"
    short.write_bytes(bytes(63))
    with pytest.raises(PipelineError, match="too short"):
        read_shift(short)
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(12) + b"\xff" + bytes(51))
    with pytest.raises(PipelineError, match="not a PicoLisp DB file"):
        read_shift(bad)


# --- parse_journal ----------------------------------------------------------------------------

SIZES = [128, 256, 64, 4096]


def test_parse_full_and_partial_entries() -> None:
    full = bytes(range(256))
    data = (
        entry(12, 1, 0, b"\x00" * 6 + (0x300).to_bytes(6, "little"))
        + entry(0, 1, 11 * 64, full)
        + entry(6, 0, 3 * 64, b"\x81\x00\x00\x00\x00\x00")
        + entry(0, 3, 2 * 64, b"\xab" * 4096)
    )
    entries = parse_journal(data, SIZES)
    assert entries == [
        JournalEntry(1, 0, b"\x00" * 6 + (0x300).to_bytes(6, "little")),
        JournalEntry(1, 704, full),
        JournalEntry(0, 192, b"\x81" + b"\x00" * 5),
        JournalEntry(3, 128, b"\xab" * 4096),
    ]
    assert entries[1].position(256) == 11 * 256
    assert entries[3].position(4096) == 2 * 4096


def test_parse_size_code_64_is_a_full_block_whatever_the_block_size() -> None:
    # pil64 wrote 64 for every full block; `journal` still reads it as one (§2.3)
    data = entry(64, 1, 64, b"\x01" * 256) + entry(64, 2, 128, b"\x02" * 64)
    assert parse_journal(data, SIZES) == [JournalEntry(1, 64, b"\x01" * 256), JournalEntry(2, 128, b"\x02" * 64)]


def test_parse_large_file_numbers_and_addresses() -> None:
    sizes = [64] * 300
    addr = (1 << 40) | 64  # uses the high 2 address bytes
    data = entry(0, 299, addr, b"\x07" * 64)
    assert data[1:3] == b"\x2b\x01"
    assert parse_journal(data, sizes) == [JournalEntry(299, addr, b"\x07" * 64)]


def test_parse_empty() -> None:
    assert parse_journal(b"", SIZES) == []


@pytest.mark.parametrize("cut", [1, 5, 8, 9, 100, 9 + 255])
def test_parse_truncated_entry_names_its_offset(cut: int) -> None:
    first = entry(12, 0, 0, bytes(12))
    data = first + entry(0, 1, 64, bytes(256))[:cut]
    with pytest.raises(
        PipelineError, match=rf"journal truncated: entry at byte {len(first)} needs \d+ bytes, only {cut} left"
    ) as exc:
        parse_journal(data, SIZES)
    assert not exc.value.retriable


def test_parse_truncated_partial_entry() -> None:
    with pytest.raises(PipelineError, match="entry at byte 0 needs 21 bytes, only 15 left"):
        parse_journal(entry(12, 0, 0, bytes(6)), SIZES)


def test_parse_unknown_file() -> None:
    data = entry(6, 0, 0, bytes(6)) + entry(0, 4, 64, bytes(64))
    with pytest.raises(PipelineError, match="journal entry at byte 15 names file 4 but the pool has 4 files"):
        parse_journal(data, SIZES)


def test_parse_base_offset_in_messages() -> None:
    with pytest.raises(PipelineError, match="entry at byte 1000 "):
        parse_journal(b"\x00\x00", SIZES, base_offset=1000)


def test_parse_rejects_writes_crossing_a_block() -> None:
    # 12 bytes starting 6 bytes before the end of block 0 of a 64-byte-block file
    with pytest.raises(PipelineError, match="at byte 0 .*crossing a 64-byte block boundary"):
        parse_journal(entry(12, 2, 58, bytes(12)), SIZES)
    # a full block at an address that is not a block start
    with pytest.raises(PipelineError, match="crossing"):
        parse_journal(entry(0, 1, 65, bytes(256)), SIZES)
    # a partial write bigger than the file's block
    with pytest.raises(PipelineError, match="crossing"):
        parse_journal(entry(100, 2, 64, bytes(100)), SIZES)


def test_parse_rejects_bad_block_sizes() -> None:
    with pytest.raises(ValueError):
        parse_journal(b"", [100])


def test_parse_accepts_memoryview_and_bytearray() -> None:
    data = entry(6, 0, 64, b"abcdef")
    assert parse_journal(memoryview(data), SIZES) == parse_journal(bytearray(data), SIZES)


# --- touched_blocks ---------------------------------------------------------------------------


def test_touched_blocks() -> None:
    entries = [
        JournalEntry(1, 0, bytes(12)),  # block 0 header
        JournalEntry(1, 11 * 64, bytes(256)),
        JournalEntry(1, 11 * 64, bytes(6)),
        JournalEntry(0, 3 * 64, bytes(6)),
        JournalEntry(3, 7 * 64, bytes(4096)),
    ]
    assert touched_blocks(entries, SIZES) == {1: {0, 11}, 0: {3}, 3: {7}}
    assert touched_blocks([], SIZES) == {}


def test_touched_blocks_of_a_hand_made_entry_crossing_blocks() -> None:
    assert touched_blocks([JournalEntry(2, 32, bytes(100))], SIZES) == {2: {0, 1, 2}}


# --- replay on synthetic data -----------------------------------------------------------------


def synthetic_journal(rng: random.Random, shifts: list[int], commits: int) -> bytes:
    """A journal that allocates, rewrites and frees blocks like PicoLisp does (§1.7)."""
    nxt = [2 if n == 0 else 1 for n in range(len(shifts))]  # blocks per file
    out = bytearray()
    for _ in range(commits):
        for _ in range(rng.randint(1, 5)):
            f = rng.randrange(len(shifts))
            bs = 64 << shifts[f]
            kind = rng.random()
            if kind < 0.3:  # allocation: block-0 header (12 bytes) + zero block at the end
                nxt[f] += 1
                out += entry(12, f, 0, bytes(6) + (nxt[f] * 64).to_bytes(6, "little"))
                out += entry(0, f, (nxt[f] - 1) * 64, bytes(bs))
            elif kind < 0.8 and nxt[f] > 1:  # full-block rewrite, sometimes coded 64 (pil64)
                blk = rng.randrange(1, nxt[f])
                out += entry(rng.choice([0, 0, 64]), f, blk * 64, rng.randbytes(bs))
            elif nxt[f] > 1:  # free: a 6-byte link write
                blk = rng.randrange(1, nxt[f])
                out += entry(6, f, blk * 64, rng.randbytes(6))
    return bytes(out)


def test_replay_of_chunks_equals_replay_of_whole_journal(tmp_path: Path) -> None:
    shifts = [1, 2, 0, 6]
    sizes = [64 << s for s in shifts]
    data = synthetic_journal(random.Random(42), shifts, 200)

    whole = make_pool(tmp_path / "whole", shifts)
    replay(whole, parse_journal(data, sizes), sizes)

    # Cut at entry boundaries into random chunks, replaying each like a replica would,
    # and re-applying some chunks twice (at-least-once delivery of the latest chunk, §2.5).
    entries = parse_journal(data, sizes)
    chunked = make_pool(tmp_path / "chunked", shifts)
    rng = random.Random(7)
    i = 0
    while i < len(entries):
        j = min(len(entries), i + rng.randint(1, 20))
        chunk = b"".join(
            entry(0 if len(e.payload) == sizes[e.file] else len(e.payload), e.file, e.address, e.payload)
            for e in entries[i:j]
        )
        parsed = parse_journal(chunk, sizes)
        replay(chunked, parsed, sizes)
        if rng.random() < 0.3:
            replay(chunked, parsed, sizes)
        i = j

    assert compare_pools(tmp_path / "whole", tmp_path / "chunked") == []
    assert [read_shift(p) for p in whole] == shifts
    for n, path in enumerate(whole):
        assert path.stat().st_size % sizes[n] == 0
    # the blocks touched are exactly the blocks that differ from the empty pool (or were appended)
    empty = make_pool(tmp_path / "empty", shifts)
    touched = touched_blocks(entries, sizes)
    for n, (a, b) in enumerate(zip(empty, whole)):
        old, new = a.read_bytes(), b.read_bytes()
        changed = {
            k
            for k in range(len(new) // sizes[n])
            if old[k * sizes[n] : (k + 1) * sizes[n]] != new[k * sizes[n] : (k + 1) * sizes[n]]
        }
        assert changed <= touched.get(n, set())


def test_compare_pools_reports_differences(tmp_path: Path) -> None:
    a = make_pool(tmp_path / "a", [1, 2])
    make_pool(tmp_path / "b", [1, 2])
    assert compare_pools(tmp_path / "a", tmp_path / "b") == []
    with open(tmp_path / "b" / "A", "r+b") as f:
        f.seek(300)
        f.write(b"x")
    diffs = compare_pools(tmp_path / "a", tmp_path / "b")
    assert len(diffs) == 1
    assert diffs[0].startswith(f"file A: md5 {md5_file(a[1])} != ")
    assert "sizes 256 and 301" in diffs[0] and "first difference at byte 256 (block 1)" in diffs[0]
    make_pool(tmp_path / "c", [1, 2, 3])
    assert any("file count" in d for d in compare_pools(tmp_path / "a", tmp_path / "c"))


# --- JournalConsumer (plain files; the PicoLisp-concurrent test is an integration test) -------


def test_journal_consumer_reads_under_its_lock(tmp_path: Path) -> None:
    jnl = tmp_path / "fifo"
    consumer = JournalConsumer(jnl)
    assert consumer.read_locked(lambda d: d) == b"" and consumer.size() == 0  # missing journal
    jnl.write_bytes(b"")
    assert consumer.read_locked(len) == 0
    with open(jnl, "ab") as f:
        f.write(b"0123456789")
    assert consumer.read_locked(bytes) == b"0123456789"
    consumer.close()


def test_journal_consumer_detects_replaced_journal(tmp_path: Path) -> None:
    jnl = tmp_path / "fifo"
    jnl.write_bytes(b"abc")
    with JournalConsumer(jnl) as consumer:
        jnl.unlink()
        jnl.write_bytes(b"xyz")
        with pytest.raises(PipelineError, match="deleted or replaced"):
            consumer.read_locked(bytes)


# --- blobs ------------------------------------------------------------------------------------


def test_blob_markers_and_tree(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    (blob / "A" / "1").mkdir(parents=True)
    (blob / "A" / "1" / "234.doc").write_bytes(b"doc")
    (blob / "A" / "7.doc").write_bytes(b"seven")
    (blob / "1.txt").write_bytes(b"root")
    (blob / ".agent-tmp").mkdir()
    (blob / ".agent-tmp" / "x").write_bytes(b"tmp")
    (blob / ".partial").write_bytes(b"tmp")
    os.symlink("A/1/234.doc", blob / "=A1234.doc")
    os.symlink("A/9.doc", blob / "=A9.doc")  # target gone: still listed, caller decides
    (blob / "=stray").write_bytes(b"not a symlink")
    assert blob_markers(blob) == [("=A1234.doc", "A/1/234.doc"), ("=A9.doc", "A/9.doc")]
    assert set(blob_tree(blob)) == {"A/1/234.doc", "A/7.doc", "1.txt"}
    assert blob_tree(blob)["A/7.doc"] == blob / "A" / "7.doc"
    assert blob_markers(tmp_path / "missing") == [] and blob_tree(tmp_path / "missing") == {}


@pytest.mark.parametrize("target", ["../etc/passwd", "/etc/passwd", "A/../../x", "./A/1.doc"])
def test_blob_markers_reject_escaping_targets(tmp_path: Path, target: str) -> None:
    os.symlink(target, tmp_path / "=A1.doc")
    with pytest.raises(PipelineError, match="blob marker =A1.doc"):
        blob_markers(tmp_path)


def test_compare_blob_trees(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "A").mkdir(parents=True)
        (d / "A" / "1.doc").write_bytes(b"same")
    assert compare_blob_trees(a, b) == []
    (a / "A" / "2.doc").write_bytes(b"only a")
    (b / "A" / "3.doc").write_bytes(b"only b")
    (b / "A" / "1.doc").write_bytes(b"changed")
    diffs = compare_blob_trees(a, b)
    assert diffs[0] == f"blob A/2.doc: missing from {b}"
    assert diffs[1] == f"blob A/3.doc: only in {b}, not in {a}"
    assert diffs[2].startswith("blob A/1.doc: md5 ") and "sizes 4 and 7" in diffs[2]
