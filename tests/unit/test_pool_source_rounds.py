"""PoolSource rounds on a hand-made pool and journal: bootstrap snapshot, deltas, a corrupt journal, a kill."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import connectors.picolisp.source as source_mod
from connectors.picolisp.format import compare_pools
from connectors.picolisp.replica import ReplicaDir
from connectors.picolisp.source import PoolSource
from pipeline.checksum import checksum_of
from pipeline.errors import PipelineError
from pipeline.model import BlockBatch, BlockWrite, FileLayout, Position, Transaction
from tests.unit.test_picolisp_journal import entry, make_pool

DB = "app"
SHIFTS = [1, 2]  # file @: 128-byte blocks (block 0 and the root block 1), file A: 256-byte blocks (block 0)


class App:
    """Plays PicoLisp's part: every write goes into the pool file and, as an entry, into the journal (§2.2)."""

    def __init__(self, root: Path) -> None:
        self.db = root / "db"
        self.paths = make_pool(self.db, SHIFTS)
        self.journal = root / "fifo"
        self.journal.touch()

    def bs(self, file: int) -> int:
        return 64 << SHIFTS[file]

    def write(self, file: int, index: int, data: bytes, at: int = 0) -> None:
        """Write `data` at byte `at` of block `index` (a whole block, or fewer than 64 bytes)."""
        bs = self.bs(file)
        assert len(data) == bs or (len(data) < 64 and at + len(data) <= bs)
        offset = index * bs + at
        fd = os.open(self.paths[file], os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        with open(self.journal, "ab") as j:
            j.write(entry(0 if len(data) == bs else len(data), file, offset >> SHIFTS[file], data))

    def grow(self, file: int, data: bytes | None = None) -> int:
        """Allocate a block at the end (block 0's next-free field, then the new block); its index."""
        index = self.layout()[file].blocks
        self.write(file, 0, bytes(6) + ((index + 1) * 64).to_bytes(6, "little"))
        self.write(file, index, data if data is not None else bytes([index]) * self.bs(file))
        return index

    def layout(self) -> list[FileLayout]:
        return [FileLayout(f, self.bs(f), p.stat().st_size // self.bs(f)) for f, p in enumerate(self.paths)]

    def block(self, file: int, index: int) -> bytes:
        bs = self.bs(file)
        return self.paths[file].read_bytes()[index * bs : (index + 1) * bs]

    def checksum(self) -> int:
        return checksum_of((f.file, i, self.block(f.file, i)) for f in self.layout() for i in range(f.blocks))


def source(root: Path, app: App, last_layout: list[FileLayout] | None = None) -> PoolSource:
    (root / "state").mkdir(exist_ok=True)
    return PoolSource(
        f"{app.db}/", app.journal, None, DB, root / "state", last_layout=last_layout, once=True, log=lambda line: None
    )


def take(txns: Iterator[Transaction]) -> Transaction:
    """The next transaction, its changes read as a publisher reads them (the trailer is known after)."""
    txn = next(txns)
    txn.changes = list(txn.changes)
    return txn


def final_images(txn: Transaction) -> dict[tuple[int, int], bytes]:
    """The last image of every block the txn writes (a snapshot may carry a block twice: later wins)."""
    blocks = (b for c in txn.changes for b in (c.blocks() if isinstance(c, BlockBatch) else [c]))
    return {(b.file, b.index): b.data for b in blocks if isinstance(b, BlockWrite)}


def replica(root: Path) -> ReplicaDir:
    return ReplicaDir(f"{root / 'rpl'}/", DB)


@pytest.fixture
def app(tmp_path: Path) -> App:
    return App(tmp_path)


def test_the_first_round_on_an_empty_topic_is_a_snapshot_of_the_whole_pool(tmp_path: Path, app: App) -> None:
    app.write(0, 1, b"\x11" * 128)  # commits made before the agent ever ran: still in the journal
    app.grow(1)
    journal = app.journal.read_bytes()
    src = source(tmp_path, app)
    sink = replica(tmp_path)
    try:
        txn = take(src.transactions(Position(0, 0)))
        assert txn.snapshot and txn.txn_id == 1 and txn.checksum_before == 0
        assert txn.files == app.layout() == [FileLayout(0, 128, 2), FileLayout(1, 256, 2)]
        assert final_images(txn) == {(f.file, i): app.block(f.file, i) for f in app.layout() for i in range(f.blocks)}
        assert txn.change_count == len(txn.changes) and txn.checksum_after == app.checksum()
        # The journal went into the agent's spool, kept until the txn is committed downstream.
        assert app.journal.read_bytes() == b"" and (tmp_path / "state" / "journal.spool").read_bytes() == journal
        assert json.loads((tmp_path / "state" / "last-txn.json").read_text())["txn_id"] == 1
        sink.apply(txn)
        src.acknowledge(txn)
        assert not (tmp_path / "state" / "journal.spool").exists()
        assert compare_pools(app.db, tmp_path / "rpl") == []
    finally:
        sink.close()
        src.close()


def test_a_later_round_carries_the_final_images_of_the_touched_blocks_and_the_new_layout(
    tmp_path: Path, app: App
) -> None:
    src = source(tmp_path, app)
    sink = replica(tmp_path)
    try:
        txns = src.transactions(Position(0, 0))
        first = take(txns)
        sink.apply(first)
        src.acknowledge(first)
        # Two commits: block 1 of @ rewritten twice (and once partly), A grows by a block.
        app.write(0, 1, b"\x22" * 128)
        app.write(0, 1, b"\x33" * 128)
        app.write(0, 1, b"link!!", at=10)
        new = app.grow(1, b"\x44" * 256)
        journal = app.journal.read_bytes()
        second = take(txns)
        assert not second.snapshot and second.txn_id == 2 and second.checksum_before == first.checksum_after
        assert second.files == [FileLayout(0, 128, 2), FileLayout(1, 256, 2)]
        images = final_images(second)
        assert sorted(images) == [(0, 1), (1, 0), (1, new)]  # each touched block once, nothing else
        assert all(data == app.block(*key) for key, data in images.items())
        assert images[(0, 1)][:10] == b"\x33" * 10 and images[(0, 1)][10:16] == b"link!!"
        assert second.change_count == 3 and second.checksum_after == app.checksum()
        assert app.journal.read_bytes() == b"" and (tmp_path / "state" / "journal.spool").read_bytes() == journal
        sink.apply(second)
        src.acknowledge(second)
        assert compare_pools(app.db, tmp_path / "rpl") == []
        with pytest.raises(StopIteration):  # --once: nothing more in the journal
            next(txns)
    finally:
        sink.close()
        src.close()


CORRUPTIONS = {
    "truncated entry": entry(0, 0, 64, b"\x55" * 100),  # a full 128-byte block cut short
    "unknown file": entry(8, 7, 0, b"\x00" * 8),
    "write crossing a block": entry(20, 0, 60, b"\x66" * 20),  # bytes 120..139 of file @: blocks 0 and 1
}


def published_txn(tmp_path: Path) -> dict:
    """What last-txn.json says was published (not the boot it was written on, nor whether it was synced)."""
    last = json.loads((tmp_path / "state" / "last-txn.json").read_text())
    return {k: last[k] for k in ("txn_id", "checksum_before", "checksum_after")}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_journal_at_bootstrap_stops_before_the_snapshot_and_leaves_it_intact(
    tmp_path: Path, app: App, corruption: str
) -> None:
    app.write(0, 1, b"\x11" * 128)
    with open(app.journal, "ab") as j:
        j.write(CORRUPTIONS[corruption])
    journal = app.journal.read_bytes()
    src = source(tmp_path, app)
    try:
        with pytest.raises(PipelineError) as info:
            take(src.transactions(Position(0, 0)))
    finally:
        src.close()
    message = str(info.value)
    assert f"journal {app.journal}" in message and "nothing was published and the journal is left intact" in message
    assert "byte 137" in message or "crossing" in message, message  # where: after the good 137-byte entry
    assert app.journal.read_bytes() == journal
    assert not (tmp_path / "state" / "journal.spool").exists()


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_journal_after_a_kill_leaves_journal_and_spool_intact_and_resumes_once_repaired(
    tmp_path: Path, app: App, corruption: str
) -> None:
    src = source(tmp_path, app)
    sink = replica(tmp_path)
    try:
        txns = src.transactions(Position(0, 0))
        first = take(txns)
        sink.apply(first)
        src.acknowledge(first)
        app.write(0, 1, b"\x22" * 128)
        take(txns)  # round 2 is read and sent, then the agent is killed before its Kafka commit
    finally:
        src.close()
    spool = (tmp_path / "state" / "journal.spool").read_bytes()
    last_txn = published_txn(tmp_path)
    good = len(app.journal.read_bytes())
    app.grow(1, b"\x77" * 256)
    good_journal = app.journal.read_bytes()
    with open(app.journal, "ab") as j:
        j.write(CORRUPTIONS[corruption])
    journal = app.journal.read_bytes()
    assert good == 0 and spool  # the journal was consumed into the spool by round 2

    src = source(tmp_path, app, first.files)
    try:
        with pytest.raises(PipelineError) as info:
            take(src.transactions(first.after))  # the topic holds txn 1 only
        assert f"journal {app.journal}" in str(info.value) and "left intact" in str(info.value)
        assert app.journal.read_bytes() == journal
        assert (tmp_path / "state" / "journal.spool").read_bytes() == spool
        assert published_txn(tmp_path) == last_txn
    finally:
        src.close()
    app.journal.write_bytes(good_journal)  # an operator cuts the bad tail off
    src = source(tmp_path, app, first.files)
    try:
        txn = take(src.transactions(first.after))
        assert txn.txn_id == 2 and not txn.snapshot and sorted(final_images(txn)) == [(0, 1), (1, 0), (1, 1)]
        assert txn.checksum_after == app.checksum()
        sink.apply(txn)
        src.acknowledge(txn)
        assert compare_pools(app.db, tmp_path / "rpl") == []
    finally:
        sink.close()
        src.close()


@pytest.mark.parametrize("committed", [False, True], ids=["killed-before-kafka-commit", "killed-before-ack"])
def test_after_a_kill_the_next_round_merges_spool_and_journal(tmp_path: Path, app: App, committed: bool) -> None:
    """Killed after taking round 2 (journal -> spool, last-txn.json written) and before dropping the spool.
    Whether or not txn 2 reached the topic, the restarted agent's first txn covers spool + journal."""
    src = source(tmp_path, app)
    sink = replica(tmp_path)
    try:
        txns = src.transactions(Position(0, 0))
        first = take(txns)
        sink.apply(first)
        src.acknowledge(first)
        app.write(0, 1, b"\x22" * 128)
        app.write(1, 0, b"ab", at=32)
        second = take(txns)
        assert sorted(final_images(second)) == [(0, 1), (1, 0)]
        if committed:
            sink.apply(second)  # in the topic, and a replica has it; the agent died before its ack
    finally:
        src.close()
    spool = tmp_path / "state" / "journal.spool"
    assert spool.exists() and app.journal.read_bytes() == b""
    # Meanwhile the app commits on: other blocks, and a new one.
    app.write(0, 0, bytes(6) + (2 * 64).to_bytes(6, "little"))  # block 0 only (no growth): a header rewrite
    grown = app.grow(0, b"\x99" * 128)
    app.write(1, 0, b"cd", at=64)
    topic = second if committed else first
    src = source(tmp_path, app, topic.files)
    try:
        txn = take(src.transactions(topic.after))
        assert not txn.snapshot and txn.txn_id == topic.txn_id + 1 and txn.checksum_before == topic.checksum_after
        images = final_images(txn)
        # The spool's blocks (0,1) and (1,0) are re-sent even though the journal no longer names (0,1).
        assert sorted(images) == [(0, 0), (0, 1), (0, grown), (1, 0)]
        assert all(data == app.block(*key) for key, data in images.items())
        assert txn.files == app.layout() and txn.checksum_after == app.checksum()
        sink.apply(txn)
        src.acknowledge(txn)
        assert not spool.exists()
        assert compare_pools(app.db, tmp_path / "rpl") == []
    finally:
        sink.close()
        src.close()


def test_a_round_that_dies_while_spooling_the_journal_leaves_spool_and_journal_as_they_were(
    tmp_path: Path, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal goes into the spool by a chunked file-to-file copy: into a new file renamed in when
    there is no spool, else appended after marking the spool's length. Dying mid-copy (an exception
    after half the journal, then what a kill -9 would leave) changes neither file in effect, and the
    next agent publishes spool + journal."""
    src = source(tmp_path, app)
    sink = replica(tmp_path)
    try:
        txns = src.transactions(Position(0, 0))
        first = take(txns)
        sink.apply(first)
        src.acknowledge(first)
        app.write(0, 1, b"\x22" * 128)
        take(txns)  # round 2 went into the spool; the agent dies before its Kafka commit
    finally:
        src.close()
    spool_path = tmp_path / "state" / "journal.spool"
    spool = spool_path.read_bytes()
    app.grow(1, b"\x77" * 256)
    app.write(1, 0, b"cd", at=64)
    journal = app.journal.read_bytes()
    real = source_mod.copy_range

    def dies_half_way(src_fd: int, dst: int, size: int, src_offset: int = 0, dst_offset: int = 0) -> None:
        if src_fd == jfd:  # the journal's copy: half of it, then the process "dies"
            real(src_fd, dst, size // 2, src_offset, dst_offset)
            raise KeyboardInterrupt
        real(src_fd, dst, size, src_offset, dst_offset)

    monkeypatch.setattr(source_mod, "copy_range", dies_half_way)
    src = source(tmp_path, app, first.files)
    jfd = src.journal.fd
    try:
        with pytest.raises(KeyboardInterrupt):
            take(src.transactions(first.after))
    finally:
        src.close()
    assert spool_path.read_bytes() == spool and app.journal.read_bytes() == journal
    assert not (tmp_path / "state" / "journal.spool.mark").exists()
    # What a kill -9 in the middle of the append leaves: the old length marked, a cut-off copy after it.
    (tmp_path / "state" / "journal.spool.mark").write_text(str(len(spool)))
    with open(spool_path, "ab") as f:
        f.write(journal[:7])
    (tmp_path / "state" / "journal.spool.tmp").write_bytes(journal[:5])  # and one of an empty spool's copy
    monkeypatch.setattr(source_mod, "copy_range", real)
    src = source(tmp_path, app, first.files)
    try:
        txn = take(src.transactions(first.after))
        assert txn.txn_id == 2 and not txn.snapshot and sorted(final_images(txn)) == [(0, 1), (1, 0), (1, 1)]
        assert txn.checksum_after == app.checksum()
        assert spool_path.read_bytes() == spool + journal and app.journal.read_bytes() == b""
        assert not (tmp_path / "state" / "journal.spool.mark").exists()
        sink.apply(txn)
        src.acknowledge(txn)
        assert compare_pools(app.db, tmp_path / "rpl") == []
    finally:
        sink.close()
        src.close()


def test_a_journal_writing_beyond_a_files_end_is_refused_changing_nothing(tmp_path: Path, app: App) -> None:
    src = source(tmp_path, app)
    try:
        txns = src.transactions(Position(0, 0))
        first = take(txns)
        src.acknowledge(first)
        app.write(0, 1, b"\x22" * 128)
        with open(app.journal, "ab") as j:  # block 1000 of file A, which has one block
            j.write(entry(0, 1, 1000 * 256 >> SHIFTS[1], bytes(256)))
        journal = app.journal.read_bytes()
        with pytest.raises(PipelineError, match="block 1000 of file A, beyond its end"):
            take(txns)
        assert app.journal.read_bytes() == journal
        assert not (tmp_path / "state" / "journal.spool").exists()
    finally:
        src.close()


def test_a_first_spooling_that_dies_leaves_no_spool_and_the_journal_whole(
    tmp_path: Path, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = source(tmp_path, app)
    try:
        txns = src.transactions(Position(0, 0))
        first = take(txns)
        src.acknowledge(first)
        app.write(0, 1, b"\x22" * 128)
        app.write(1, 0, b"ab", at=32)
        journal = app.journal.read_bytes()
        real = source_mod.copy_range

        def dies_half_way(src_fd: int, dst: int, size: int, src_offset: int = 0, dst_offset: int = 0) -> None:
            real(src_fd, dst, size // 2, src_offset, dst_offset)
            raise KeyboardInterrupt

        monkeypatch.setattr(source_mod, "copy_range", dies_half_way)
        with pytest.raises(KeyboardInterrupt):
            take(txns)
        state = tmp_path / "state"
        assert app.journal.read_bytes() == journal
        assert not (state / "journal.spool").exists() and not (state / "journal.spool.tmp").exists()
    finally:
        src.close()


# --- state kept in the page cache: trusted on the boot that wrote it, or after a clean stop ---------------


def stopped_after_round_two(tmp_path: Path, app: App, *, clean: bool = False) -> Transaction:
    """Txn 1 published; round 2 taken into the spool, then a kill -9 (nothing synced) or a clean stop."""
    src = source(tmp_path, app)
    txns = src.transactions(Position(0, 0))
    first = take(txns)
    src.acknowledge(first)
    app.write(0, 1, b"\x22" * 128)
    take(txns)
    if clean:
        src.close()  # spool and state synced
    else:
        src.journal.close()  # what a kill leaves: no close(), so no sync
        src.pool.close()
    return first


def test_state_written_on_another_boot_without_a_clean_stop_is_not_trusted_a_snapshot_follows(
    tmp_path: Path, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = stopped_after_round_two(tmp_path, app)
    state = tmp_path / "state"
    assert json.loads((state / "last-txn.json").read_text())["boot_id"] == source_mod._boot_id()
    monkeypatch.setattr(source_mod, "_boot_id", lambda: "another-boot")  # the machine went down meanwhile
    src = source(tmp_path, app, first.files)
    try:
        assert not (state / "journal.spool").exists(), "a spool of the lost boot may be torn: dropped"
        txn = take(src.transactions(first.after))
        assert txn.snapshot and txn.txn_id == 2 and txn.checksum_after == app.checksum()
    finally:
        src.close()
    # Its snapshot was never committed (Kafka down, another kill): the next start still snapshots.
    assert (state / "needs-snapshot").exists()
    src = source(tmp_path, app, first.files)
    try:
        txn = take(src.transactions(first.after))
        assert txn.snapshot
        src.acknowledge(txn)  # committed: the state is whole again
        assert not (state / "needs-snapshot").exists()
    finally:
        src.close()
    src = source(tmp_path, app, txn.files)
    try:
        app.write(0, 1, b"\x33" * 128)
        nxt = take(src.transactions(txn.after))
        assert not nxt.snapshot and nxt.txn_id == txn.txn_id + 1
    finally:
        src.close()


def test_a_clean_stop_syncs_the_state_so_the_next_boot_goes_on_with_a_delta(
    tmp_path: Path, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = stopped_after_round_two(tmp_path, app, clean=True)
    assert json.loads((tmp_path / "state" / "last-txn.json").read_text())["synced"] is True
    monkeypatch.setattr(source_mod, "_boot_id", lambda: "next-boot")
    src = source(tmp_path, app, first.files)
    try:
        txn = take(src.transactions(first.after))
        assert not txn.snapshot and txn.txn_id == 2 and sorted(final_images(txn)) == [(0, 1)]
        # Claimed for this boot at once (durably): a crash later in this boot cannot look like a clean stop.
        last = json.loads((tmp_path / "state" / "last-txn.json").read_text())
        assert last["boot_id"] == "next-boot" and "synced" not in last
    finally:
        src.journal.close()
        src.pool.close()
