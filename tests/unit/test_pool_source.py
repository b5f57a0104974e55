"""connectors.picolisp.source on hand-made pools: start-order wait, layout changes, hostile blob names."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from connectors.picolisp.blobs import blob_markers
from connectors.picolisp.source import PoolSource, layout_change, pool_missing, wait_for_pool
from pipeline.errors import PipelineError
from pipeline.model import BlobChunk, BlobDelete, FileLayout, Position, safe_blob_path
from tests.unit.test_picolisp_journal import make_pool

BAD = b"bad\xff\xfe.doc"  # not UTF-8


# --- start order --------------------------------------------------------------------------------


def test_pool_missing_names_what_the_app_has_yet_to_create(tmp_path: Path) -> None:
    prefix, journal = f"{tmp_path}/db/app/", tmp_path / "fifo" / "app"
    assert pool_missing(prefix, journal) == [f"the pool {tmp_path}/db/app/@", f"the journal {journal}"]
    (tmp_path / "db" / "app").mkdir(parents=True)
    (tmp_path / "db" / "app" / "@").write_bytes(b"")  # `pool` has opened it, not yet written block 0
    assert "still being created" in pool_missing(prefix, journal)[0]
    make_pool(tmp_path / "db" / "app", [1, 2])
    assert pool_missing(prefix, journal) == [f"the journal {journal}"]
    journal.parent.mkdir()
    journal.touch()
    assert pool_missing(prefix, journal) == []
    (tmp_path / "db" / "app" / "@").write_bytes(bytes(12) + b"\x40" + bytes(51))  # a whole header, not PicoLisp's
    with pytest.raises(PipelineError, match="not a PicoLisp DB file"):
        pool_missing(prefix, journal)


def test_wait_for_pool_with_once_returns_false_at_once_and_touches_nothing(tmp_path: Path) -> None:
    lines: list[str] = []
    assert not wait_for_pool(f"{tmp_path}/db/app/", tmp_path / "fifo/app", "app", once=True, log=lines.append)
    assert len(lines) == 1 and "--once" in lines[0] and "db/app/@" in lines[0] and "fifo/app" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_wait_for_pool_waits_with_one_line_until_pool_and_journal_exist(tmp_path: Path) -> None:
    lines: list[str] = []
    journal = tmp_path / "fifo" / "app"

    def app_starts() -> None:
        time.sleep(0.15)
        make_pool(tmp_path / "db" / "app", [1, 2])
        time.sleep(0.15)
        journal.parent.mkdir()
        journal.touch()

    thread = threading.Thread(target=app_starts)
    thread.start()
    started = time.monotonic()
    try:
        assert wait_for_pool(f"{tmp_path}/db/app/", journal, "app", once=False, interval=0.02, log=lines.append)
    finally:
        thread.join()
    assert time.monotonic() - started >= 0.3
    assert len(lines) == 1 and lines[0].startswith("capture-agent app: waiting for the pool"), lines
    assert wait_for_pool(f"{tmp_path}/db/app/", journal, "app", once=True, log=lines.append) and len(lines) == 1


# --- layout changes -----------------------------------------------------------------------------


def test_layout_change_allows_growth_only() -> None:
    old = [FileLayout(0, 128, 10), FileLayout(1, 256, 3)]
    assert layout_change(old, old) is None
    assert layout_change([], old) is None  # nothing published yet
    assert layout_change(old, [FileLayout(0, 128, 11), FileLayout(1, 256, 3), FileLayout(2, 64, 2)]) is None
    assert "256-byte blocks" in layout_change(old, [FileLayout(0, 256, 10), FileLayout(1, 256, 3)])  # type: ignore[operator]
    assert "gone" in layout_change(old, [FileLayout(0, 128, 10)])  # type: ignore[operator]
    assert "fewer than the 10" in layout_change(old, [FileLayout(0, 128, 9), FileLayout(1, 256, 3)])  # type: ignore[operator]


def _source(
    tmp_path: Path, last_layout: list[FileLayout] | None, lines: list[str], blob_dir: Path | None = None
) -> PoolSource:
    journal = tmp_path / "fifo"
    journal.touch()
    (tmp_path / "state").mkdir(exist_ok=True)  # AgentLock makes it in the agent
    return PoolSource(
        f"{tmp_path}/db/",
        journal,
        blob_dir,
        "app",
        tmp_path / "state",
        last_layout=last_layout,
        once=True,
        log=lines.append,
    )


@pytest.mark.parametrize(
    "shifts, published",
    [
        ([2, 2], [FileLayout(0, 128, 2), FileLayout(1, 256, 1)]),  # other block sizes (*Dbs)
        ([1], [FileLayout(0, 128, 2), FileLayout(1, 256, 1)]),  # fewer files
        ([1, 2], [FileLayout(0, 128, 5), FileLayout(1, 256, 1)]),  # a file shorter than published
    ],
)
def test_a_recreated_pool_on_an_existing_topic_is_published_as_a_snapshot(
    tmp_path: Path, shifts: list[int], published: list[FileLayout]
) -> None:
    make_pool(tmp_path / "db", shifts)
    state = tmp_path / "state"
    state.mkdir()
    (state / "journal.spool").write_bytes(b"\x07" * 5)  # the old pool's: must not be parsed, nor wedge the agent
    (state / "last-txn.json").write_text('{"txn_id": 4, "checksum_before": 1, "checksum_after": 9}')
    lines: list[str] = []
    source = _source(tmp_path, published, lines)
    try:
        txn = next(source.transactions(Position(4, 9)))
        assert txn.snapshot and txn.txn_id == 5 and txn.checksum_before == 9
        list(txn.changes)
        assert [(f.block_size, f.blocks) for f in txn.files] == [
            (64 << s, 2 if n == 0 else 1) for n, s in enumerate(shifts)
        ]
        assert any("snapshot" in line and "not the one the topic holds" in line for line in lines), lines
        assert not (state / "journal.spool").exists()
    finally:
        source.close()


def test_a_delta_round_never_publishes_a_layout_replicas_reject(tmp_path: Path) -> None:
    """Steady state: the pool deleted and recreated with other block sizes under a running agent."""
    files = make_pool(tmp_path / "db", [1, 2])
    lines: list[str] = []
    source = _source(tmp_path, None, lines)
    try:
        source.once = False
        txns = source.transactions(Position(0, 0))
        first = next(txns)
        list(first.changes)
        source.acknowledge(first)
        for path in files:
            path.unlink()
        make_pool(tmp_path / "db", [2, 2])
        second = next(txns)
        list(second.changes)
        assert second.snapshot and second.txn_id == 2, second
        assert [f.block_size for f in second.files] == [256, 256]
        assert any("was deleted" in line or "replaced" in line for line in lines), lines
    finally:
        source.close()


def test_the_in_lock_guard_refuses_a_delta_to_another_layout(tmp_path: Path) -> None:
    make_pool(tmp_path / "db", [1, 2])
    source = _source(tmp_path, [FileLayout(0, 64, 4), FileLayout(1, 256, 1)], [])
    try:
        with pytest.raises(PipelineError, match="64-byte ones") as exc:
            source._take_journal()
        assert exc.value.retriable
    finally:
        source.close()


# --- hostile blob names ---------------------------------------------------------------------------


def test_safe_blob_path_refuses_names_that_are_not_utf8() -> None:
    with pytest.raises(PipelineError, match="not valid UTF-8"):
        safe_blob_path(os.fsdecode(b"A/" + BAD))
    assert safe_blob_path("A/\u00e9t\u00e9.doc") == "A/\u00e9t\u00e9.doc"


def test_blob_markers_pass_refused_ones_to_the_callback(tmp_path: Path) -> None:
    os.symlink("../etc/passwd", tmp_path / "=evil.doc")
    os.symlink("A/1.doc", tmp_path / "=A1.doc")
    refused: list[tuple[str, str]] = []
    assert blob_markers(tmp_path, refused=lambda n, t, e: refused.append((n, t))) == [("=A1.doc", "A/1.doc")]
    assert refused == [("=evil.doc", "../etc/passwd")]


def test_unpublishable_blob_names_are_skipped_with_one_warning_each(tmp_path: Path) -> None:
    make_pool(tmp_path / "db", [1])
    blob = tmp_path / "blob"
    (blob / "A").mkdir(parents=True)
    (blob / "A" / "1.doc").write_bytes(b"one")
    fd = os.open(os.fsencode(blob / "A") + b"/" + BAD, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"hostile")
    os.close(fd)
    (blob / "back\\slash.doc").write_bytes(b"refused by safe_blob_path")
    os.symlink("../../etc/passwd", blob / "=evil.doc")
    state = tmp_path / "state"
    state.mkdir()
    # An earlier version recorded the bad name as known: its later delete would wedge every round.
    (state / "known-blobs.json").write_text('["A/bad\\udcff\\udcfe.doc", "A/1.doc"]')
    lines: list[str] = []
    source = _source(tmp_path, None, lines, blob)
    try:
        source.once = False
        source.delete_scan_interval = 0
        txns = source.transactions(Position(0, 0))
        first = next(txns)
        changes = list(first.changes)
        assert [c.path for c in changes if isinstance(c, BlobChunk)] == ["A/1.doc"]
        source.acknowledge(first)
        os.unlink(os.fsencode(blob / "A") + b"/" + BAD)
        (blob / "A" / "1.doc").write_bytes(b"one, again")
        os.symlink("A/1.doc", blob / "=A1.doc")
        second = next(txns)
        changes = list(second.changes)
        assert [c.path for c in changes if isinstance(c, (BlobChunk, BlobDelete))] == ["A/1.doc"]
        source.acknowledge(second)
        assert os.path.islink(blob / "=evil.doc"), "a refused marker is left in place"
        assert "bad" not in (state / "known-blobs.json").read_text()
    finally:
        source.close()
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 3, warnings
    assert any(repr(b"A/" + BAD) in w and "not valid UTF-8" in w for w in warnings), warnings
    assert any("b'=evil.doc'" in w and "escapes" in w for w in warnings), warnings
    assert any("back\\\\slash" in w for w in warnings), warnings


def test_known_blobs_are_logged_per_round_and_read_back_whole_after_a_kill(tmp_path: Path) -> None:
    """Each round appends the names it adds or deletes; a restart replays the log over the last full list,
    also one whose last line a kill cut off. The log is folded into the list once it grows as long."""
    make_pool(tmp_path / "db", [1])
    blob = tmp_path / "blob"
    (blob / "A").mkdir(parents=True)
    (blob / "A" / "0.doc").write_bytes(b"zero")
    state = tmp_path / "state"
    source = _source(tmp_path, None, [], blob)
    try:
        source.once = False
        source.delete_scan_interval = 0
        txns = source.transactions(Position(0, 0))
        first = next(txns)
        list(first.changes)
        source.acknowledge(first)  # a snapshot: the full list
        assert (state / "known-blobs.json").read_text() == '["A/0.doc"]'
        for i in range(1, 4):
            (blob / "A" / f"{i}.doc").write_bytes(b"x" * i)
            os.symlink(f"A/{i}.doc", blob / f"={i}.doc")
            if i == 3:
                (blob / "A" / "1.doc").unlink()
            txn = next(txns)
            list(txn.changes)
            source.acknowledge(txn)
        assert (state / "known-blobs.json").read_text() == '["A/0.doc"]'  # not rewritten each round
        log = (state / "known-blobs.log").read_bytes()
        assert log.splitlines() == [b'+"A/1.doc"', b'+"A/2.doc"', b'+"A/3.doc"', b'-"A/1.doc"']
        (state / "known-blobs.log").write_bytes(log + b'+"A/cut')  # a torn last line
    finally:
        source.journal.close()
        source.pool.close()
    source = _source(tmp_path, None, [], blob)
    try:
        assert source._known_blobs == {"A/0.doc", "A/2.doc", "A/3.doc"}
        source._known_log_lines = 5000  # as if the log had grown long: the next change folds it in
        source._log_known(["A/4.doc"], [])
        assert json.loads((state / "known-blobs.json").read_text()) == ["A/0.doc", "A/2.doc", "A/3.doc"]
        assert (state / "known-blobs.log").read_bytes() == b""
    finally:
        source.close()


def test_a_fresh_state_dir_records_the_blobs_it_starts_with_so_logged_changes_are_kept(tmp_path: Path) -> None:
    """An agent that adopts a pool without a snapshot (a promoted replica) logs the blobs it puts; the
    next start must read that log, which needs the list it applies to (the first start writes it)."""
    make_pool(tmp_path / "db", [1])
    blob = tmp_path / "blob"
    (blob / "A").mkdir(parents=True)
    (blob / "A" / "1.doc").write_bytes(b"one")
    source = _source(tmp_path, None, [], blob)
    try:
        source._known_blobs.add("A/2.doc")
        source._log_known(["A/2.doc"], [])
    finally:
        source.close()
    source = _source(tmp_path, None, [], blob)
    try:
        assert source._known_blobs == {"A/1.doc", "A/2.doc"}  # A/2.doc's later delete will be published
    finally:
        source.close()
