"""connectors.picolisp against real PicoLisp 23.2 pools, journals, locks and blobs (tests/lisp/*.l)."""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest

from connectors.picolisp.blobs import blob_markers, blob_tree, compare_blob_trees
from connectors.picolisp.format import (
    compare_pools,
    lock_db_exclusive,
    lock_db_shared,
    md5_file,
    pool_files,
    read_shift,
    unlock_db,
)
from connectors.picolisp.journal import JournalConsumer, parse_journal, touched_blocks
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import APP_BLOCK_SIZES, APP_DBS, PicoApp, copy_pool, replay_journal

pytestmark = pytest.mark.integration


def pool_md5s(prefix: str | Path) -> list[str]:
    return [md5_file(p) for p in pool_files(prefix)]


def expected_blob_path(marker: str) -> str:
    """What PicoLisp's (blob Obj Var) gives for marker '=<name>.<var>': hax letters, then octal in groups of 3."""
    name, var = marker[1:].split(".", 1)
    letters, digits = re.fullmatch(r"([@A-O]*)([0-7]+)", name).groups()
    groups = []
    while digits:
        groups.insert(0, digits[-3:])
        digits = digits[:-3]
    return "/".join(([letters] if letters else []) + groups) + "." + var


def test_created_pool_matches_app_layout_and_is_deterministic(pil_app: PicoApp, tmp_path: Path) -> None:
    assert [p.name for p in pil_app.files()] == ["@", "A", "B", "C", "D"]
    assert [read_shift(p) for p in pil_app.files()] == list(APP_DBS)
    assert pil_app.block_sizes() == list(APP_BLOCK_SIZES)
    assert pil_app.journal.exists() and pil_app.journal.stat().st_size == 0  # creation is not journaled
    # §1.8: an empty pool created elsewhere with the same *Dbs is byte-identical
    other = pil_app.create_empty(tmp_path / "other")
    assert compare_pools(pil_app.initial_prefix, other) == []
    assert compare_pools(pil_app.prefix, other) == []


def test_replaying_the_journal_onto_the_empty_pool_reproduces_the_live_pool(pil_app: PicoApp, tmp_path: Path) -> None:
    out = pil_app.workload(400, seed=1)
    assert out.stdout.startswith("done 400")
    data = pil_app.journal.read_bytes()
    sizes = pil_app.block_sizes()
    entries = parse_journal(data, sizes)  # the whole journal is whole entries
    # the workload really spreads over all files, with full blocks, allocations and frees
    touched = touched_blocks(entries, sizes)
    assert sorted(touched) == [0, 1, 2, 3, 4]
    kinds = {(e.file, len(e.payload) if len(e.payload) in (6, 12) else "full") for e in entries}
    assert {(f, "full") for f in range(5)} <= kinds
    assert {(f, 12) for f in range(5)} <= kinds
    assert any(k[1] == 6 for k in kinds)
    # some file grew to several blocks, and some object spans several blocks (continuation tags >= 2)
    assert all(p.stat().st_size > bs for p, bs in zip(pil_app.files()[:4], sizes))
    assert any(e.payload[0] & 63 >= 2 for e in entries if len(e.payload) == sizes[e.file] and e.address)

    replica = copy_pool(pil_app.initial_prefix, tmp_path / "replica")
    assert compare_pools(replica, pil_app.prefix) != []
    replay_journal(replica, data)
    assert compare_pools(replica, pil_app.prefix) == []
    assert pool_md5s(replica) == pool_md5s(pil_app.prefix)
    # PicoLisp answers queries on the replica exactly like on the source
    assert pil_app.query(replica) == pil_app.query()


def test_workload_is_deterministic(picolisp: str, tmp_path: Path) -> None:
    apps = [PicoApp(tmp_path / name, picolisp) for name in ("one", "two")]
    for app in apps:
        app.create()
        app.workload(150, seed=99)
    assert md5_file(apps[0].journal) == md5_file(apps[1].journal)
    assert pool_md5s(apps[0].prefix) == pool_md5s(apps[1].prefix)
    assert compare_blob_trees(apps[0].blob_dir, apps[1].blob_dir) == []


def test_journal_consumer_under_concurrent_commits(pil_app: PicoApp, picolisp: str, tmp_path: Path) -> None:
    txns, seed = 500, 5
    replica = copy_pool(pil_app.initial_prefix, tmp_path / "replica")
    sizes = pil_app.block_sizes()
    db_fds = [os.open(p, os.O_RDONLY) for p in pil_app.files()]

    def snapshot(data: bytes) -> tuple[bytes, list[bytes]]:
        # Runs under the journal lock: no commit is in flight, so the DB matches the journal's end. The
        # journal is then emptied under the same lock, as the capture agent does.
        images = [os.pread(fd, os.fstat(fd).st_size, 0) for fd in db_fds]
        os.ftruncate(consumer.fd, 0)
        return data, images

    chunks: list[bytes] = []
    rng = random.Random(3)
    proc = pil_app.workload_proc(txns, seed, sleep_ms=2)
    try:
        with JournalConsumer(pil_app.journal) as consumer:
            while True:
                running = proc.poll() is None
                data, images = consumer.read_locked(snapshot)
                if data:
                    replay_journal(replica, data, sizes)  # raises unless the chunk is whole entries
                    chunks.append(data)
                    # the replica is now exactly at the state the source had when the chunk was cut
                    assert [p.read_bytes() for p in pool_files(replica)] == images, f"after chunk {len(chunks)}"
                if not running and not data:
                    break
                time.sleep(rng.uniform(0, 0.03))
            assert consumer.size() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stdout, stderr = proc.communicate(timeout=60)
        for fd in db_fds:
            os.close(fd)
    assert proc.returncode == 0, stderr
    assert stdout.startswith(f"done {txns}")
    assert len(chunks) > 5, "the consumer should have seen the journal in several pieces"
    print(f"{len(chunks)} chunks, {sum(map(len, chunks))} bytes")

    assert compare_pools(replica, pil_app.prefix) == []
    # the concatenated chunks are byte for byte what a twin run of the same workload journals
    twin = PicoApp(tmp_path / "twin", picolisp)
    twin.create()
    twin.workload(txns, seed)
    assert b"".join(chunks) == twin.journal.read_bytes()


def test_db_locks_block_picolisp_commits(pil_app: PicoApp) -> None:
    pil_app.workload(5, seed=2)
    at = pil_app.journal.stat().st_size
    fd = os.open(pil_app.files()[0], os.O_RDWR)
    try:
        for seed, lock in enumerate((lock_db_shared, lock_db_exclusive)):
            lock(fd)
            proc = pil_app.workload_proc(3, seed=seed)
            try:
                time.sleep(0.5)
                assert proc.poll() is None, "pil committed although we held the DB lock"
                assert pil_app.journal.stat().st_size == at
            finally:
                unlock_db(fd)
            assert proc.wait(timeout=30) == 0
            assert pil_app.journal.stat().st_size > at
            at = pil_app.journal.stat().st_size
    finally:
        os.close(fd)


def test_blob_markers_created_by_blob(pil_app: PicoApp) -> None:
    pil_app.workload(300, seed=8)
    markers = blob_markers(pil_app.blob_dir)
    tree = blob_tree(pil_app.blob_dir)
    assert markers, "blob! with *Jnl set must leave '=' markers"
    existing = [(m, t) for m, t in markers if (pil_app.blob_dir / t).is_file()]
    assert existing
    for marker, target in markers:
        assert os.readlink(pil_app.blob_dir / marker) == target
        assert target == expected_blob_path(marker)
    for _marker, target in existing:
        assert target in tree
    # markers whose blob was deleted (zap> of the item) are dangling; every other blob file has a marker
    # (nobody consumed them yet)
    assert {t for _, t in markers} >= set(tree)
    assert not any(name.startswith("=") for name in tree)


def test_blob_marker_needs_jnl(pil_app: PicoApp) -> None:
    script = """
(openApp "db/app/" "fifo/app" "blob/app/")
(out "x.tmp" (prin "hello"))
(let Obj (new! '(+Item) 'nr 1 'nm "x")
   (blob! Obj 'doc "x.tmp")
   (off *Jnl)
   (let Obj2 (new! '(+Item) 'nr 2 'nm "y")
      (blob! Obj2 'doc "x.tmp")
      (println Obj Obj2) ) )
"""
    out = pil_app.run(script).stdout.split()
    assert out == ["{A1}", "{A2}"]
    assert blob_markers(pil_app.blob_dir) == [("=A1.doc", "A/1.doc")]  # none for {A2}: *Jnl was NIL
    assert set(blob_tree(pil_app.blob_dir)) == {"A/1.doc", "A/2.doc"}
    assert (pil_app.blob_dir / "A" / "1.doc").read_bytes() == b"hello"


def test_query_reads_without_writing_and_sees_every_commit(pil_app: PicoApp, tmp_path: Path) -> None:
    pil_app.workload(200, seed=4)
    before = pool_md5s(pil_app.prefix)
    jnl_size = pil_app.journal.stat().st_size
    text = pil_app.query()
    assert pool_md5s(pil_app.prefix) == before and pil_app.journal.stat().st_size == jnl_size
    assert "# items" in text and text.count("\n") > 100

    copy = copy_pool(pil_app.prefix, tmp_path / "copy")
    assert pil_app.query(copy) == text
    assert pool_md5s(copy) == before
    with_blobs = pil_app.query(blob_dir=pil_app.blob_dir)
    assert "\nblob " in with_blobs and with_blobs != text

    pil_app.workload(1, seed=12345)
    assert pil_app.query() != text
    assert pil_app.query(copy) == text


def test_query_refuses_an_incomplete_pool(pil_app: PicoApp, tmp_path: Path) -> None:
    partial = copy_pool(pil_app.prefix, tmp_path / "partial")
    os.unlink(Path(partial) / "D")
    with pytest.raises(AssertionError, match="4 pool files"):
        pil_app.query(partial)
    assert not (Path(partial) / "D").exists()
