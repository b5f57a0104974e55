"""ReplicaDir killed at each step of its commit protocol: a new ReplicaDir is at a txn boundary and carries on."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connectors.picolisp.format import hax, pool_files
from connectors.picolisp.replica import ReplicaDir
from pipeline.checksum import RollingChecksum
from pipeline.model import BlobChunk, BlobDelete, BlockWrite, Change, FileLayout, Position, Transaction
from pipeline.replicate import replicate
from tests.pipeline_helpers import replica_at_boundary

DB = "crashdb"
LAYOUT = [FileLayout(0, 64, 8), FileLayout(1, 128, 4)]
BLOB_CHUNK = 100  # small chunks, so a blob of several chunks streams to a staged file


class Killed(BaseException):
    """What the monkeypatched step raises after copying the disk state a kill there leaves."""


class ListSource:
    """A Source of materialised transactions; `buffered` True lets a group-commit sink batch them all."""

    def __init__(self, txns: list[Transaction], buffered: bool = True) -> None:
        self.txns = txns
        self._buffered = buffered
        self.acked: list[int] = []

    def transactions(self, after: Position) -> Iterator[Transaction]:
        return iter([fresh(t) for t in self.txns])

    def acknowledge(self, txn: Transaction) -> None:
        self.acked.append(txn.txn_id)

    def buffered(self) -> bool:
        return self._buffered


def fresh(txn: Transaction) -> Transaction:
    """A copy whose changes can be iterated again."""
    return dataclasses.replace(txn, changes=list(txn.changes))


def _blob(path: str, data: bytes) -> list[BlobChunk]:
    sha = hashlib.sha256(data).hexdigest()
    pieces = [data[i : i + BLOB_CHUNK] for i in range(0, len(data), BLOB_CHUNK)] or [b""]
    return [BlobChunk(path, len(data), sha, i, len(pieces), p) for i, p in enumerate(pieces)]


def make_stream(n: int, seed: int, database: str = DB) -> list[Transaction]:
    """Txn 1 a snapshot (every block, two blobs), then n-1 deltas: 3 block writes, one small blob, one
    blob of several chunks, and from txn 3 on a delete of an older blob. Correct rolling checksums."""
    rng = random.Random(seed)
    rolling = RollingChecksum()
    txns: list[Transaction] = []
    changes: list[Change] = []
    for f in LAYOUT:
        for i in range(f.blocks):
            data = rng.randbytes(f.block_size)
            rolling.set_block(f.file, i, data)
            changes.append(BlockWrite(f.file, i, data))
    changes += _blob("A/0.doc", b"snap" * 30) + _blob("B/0.txt", b"zero")
    txns.append(
        Transaction(
            database,
            1,
            0,
            1_000,
            changes,
            snapshot=True,
            checksum_after=rolling.value,
            files=list(LAYOUT),
            change_count=len(changes),
        )
    )
    for t in range(2, n + 1):
        before = rolling.value
        changes = []
        for _ in range(3):
            f = rng.choice(LAYOUT)
            i = rng.randrange(f.blocks)
            data = rng.randbytes(f.block_size)
            rolling.set_block(f.file, i, data)
            changes.append(BlockWrite(f.file, i, data))
        changes += _blob(f"B/{t}.txt", f"small {t}".encode())
        changes += _blob(f"A/{t}.doc", rng.randbytes(250 + t))
        if t >= 3:
            changes.append(BlobDelete(f"B/{t - 1}.txt"))
        txns.append(
            Transaction(
                database,
                t,
                before,
                1_000 + t,
                changes,
                checksum_after=rolling.value,
                files=list(LAYOUT),
                change_count=len(changes),
            )
        )
    return txns


def expected_state(txns: list[Transaction], upto: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The pool files and blobs (relative path -> bytes) after txn `upto`."""
    files = {f.file: bytearray(f.blocks * f.block_size) for f in LAYOUT}
    blobs: dict[str, bytes] = {}
    for txn in txns[:upto]:
        for c in txn.changes:
            if isinstance(c, BlockWrite):
                files[c.file][c.index * len(c.data) : (c.index + 1) * len(c.data)] = c.data
            elif isinstance(c, BlobChunk):
                blobs[c.path] = (blobs[c.path] if c.index else b"") + c.data
            else:
                blobs.pop(c.path, None)
    return {hax(f): bytes(b) for f, b in files.items()}, blobs


def disk_state(root: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    db, blob = root / "db", root / "blob"
    files = {p.name: p.read_bytes() for p in pool_files(f"{db}/")}
    blobs = {str(p.relative_to(blob)): p.read_bytes() for p in blob.rglob("*") if p.is_file()}
    return files, blobs


def open_replica(root: Path, **kw: object) -> ReplicaDir:
    return ReplicaDir(f"{root / 'db'}/", DB, root / "blob", **kw)  # type: ignore[arg-type]


def apply_all(root: Path, txns: list[Transaction], **kw: object) -> Position:
    sink = open_replica(root, **kw)
    try:
        return replicate(ListSource(txns), sink)
    finally:
        sink.close()


class Crash:
    """Copies the live replica's directories (what kill -9 at this instant leaves) to `into`, then raises Killed."""

    def __init__(self, live: Path, into: Path) -> None:
        self.live, self.into, self.fired = live, into, False

    def __call__(self) -> None:
        if self.fired:
            return
        self.fired = True
        for name in ("db", "blob"):
            if (self.live / name).exists():
                shutil.copytree(self.live / name, self.into / name, symlinks=True)
        raise Killed()


def _on_call(
    monkeypatch: pytest.MonkeyPatch,
    owner: object,
    name: str,
    crash: Crash,
    match: Callable[..., bool],
    nth: int = 1,
    after: bool = False,
) -> None:
    """Crash at the `nth` call of owner.name whose arguments `match`, before it runs or right `after`."""
    real = getattr(owner, name)
    seen = [0]

    def wrapper(*args: object, **kwargs: object) -> object:
        hit = not crash.fired and match(*args) and (seen.__setitem__(0, seen[0] + 1) or seen[0] == nth)
        if hit and not after:
            crash()
        result = real(*args, **kwargs)
        if hit:
            crash()
        return result

    monkeypatch.setattr(owner, name, wrapper)


def _name(p: object) -> str:
    return os.fspath(p).rsplit("/", 1)[-1]  # type: ignore[arg-type]


# Each kill point of the commit protocol: how to get there, and whether the batch is then committed.
POINTS: dict[str, tuple[Callable[[pytest.MonkeyPatch, Crash], None], bool]] = {
    "redo.tmp complete, not renamed": (
        lambda mp, c: _on_call(mp, os, "replace", c, lambda src, dst: _name(src) == "redo.tmp"),
        False,
    ),
    "redo renamed, nothing written": (
        lambda mp, c: _on_call(mp, os, "replace", c, lambda src, dst: _name(src) == "redo.tmp", after=True),
        True,
    ),
    "blocks half written": (lambda mp, c: _on_call(mp, os, "pwrite", c, lambda *a: True, nth=2), True),
    "blocks written, blobs staged": (
        lambda mp, c: _on_call(mp, os, "replace", c, lambda src, dst: _name(os.path.dirname(src)) == "stage"),
        True,
    ),
    "some blobs moved": (
        lambda mp, c: _on_call(mp, os, "replace", c, lambda src, dst: _name(os.path.dirname(src)) == "stage", nth=2),
        True,
    ),
    "position.json.tmp written, not renamed": (
        lambda mp, c: _on_call(mp, os, "replace", c, lambda src, dst: _name(dst) == "position.json"),
        True,
    ),
    "position written, redo not dropped": (
        lambda mp, c: _on_call(mp, os, "replace", c, lambda src, dst: _name(dst) == "position.json", after=True),
        True,
    ),
    "redo dropped, stage dir left": (
        lambda mp, c: _on_call(mp, Path, "unlink", c, lambda self, *a: self.name == "redo", after=True),
        True,
    ),
}

# What each kill leaves in the state dir besides position.json and replica.lock.
LEFT = {
    "redo.tmp complete, not renamed": {"redo.tmp", "reserve", "stage"},
    "redo renamed, nothing written": {"redo", "reserve", "stage"},
    "blocks half written": {"redo", "stage"},
    "blocks written, blobs staged": {"redo", "stage"},
    "some blobs moved": {"redo", "stage"},
    "position.json.tmp written, not renamed": {"position.json.tmp", "redo", "stage"},
    "position written, redo not dropped": {"redo", "stage"},
    "redo dropped, stage dir left": {"stage"},
}


@pytest.mark.parametrize("group_commit", [False, True], ids=["per-txn", "group-commit"])
@pytest.mark.parametrize("point", list(POINTS))
def test_a_kill_at_each_step_of_flush_leaves_a_txn_boundary_and_a_restart_carries_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, group_commit: bool
) -> None:
    txns = make_stream(6, seed=hash(point) & 0xFFFF)
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    assert apply_all(live, txns[:2]) == txns[1].after
    crash = Crash(live, crashed)
    install, committed = POINTS[point]
    sink = open_replica(live, group_commit=group_commit)
    install(monkeypatch, crash)
    try:
        with pytest.raises(Killed):
            replicate(ListSource(txns[2:5]), sink)
    finally:
        monkeypatch.undo()
        sink.close()
    assert crash.fired, f"the kill point {point!r} was never reached"
    left = set(os.listdir(crashed / "db" / ".pool-pipeline")) - {"position.json", "replica.lock"}
    assert left == LEFT[point], f"{point}: the kill left {left}"  # the point is where it claims to be
    staged = os.listdir(crashed / "db" / ".pool-pipeline" / "stage")
    if point in ("redo.tmp complete, not renamed", "blocks written, blobs staged"):
        assert len(staged) == (4 if group_commit else 2)  # every put blob still staged
    elif point == "some blobs moved":
        assert len(staged) == (3 if group_commit else 1)
    # One flush: the whole batch (txns 3..5) with group commit, else txn 3's.
    last_of_batch = 5 if group_commit else 3
    want = last_of_batch if committed else 2
    sink = open_replica(crashed, group_commit=group_commit)
    try:
        assert sink.position() == txns[want - 1].after, point
        assert disk_state(crashed) == expected_state(txns, want), point
        assert set(os.listdir(crashed / "db" / ".pool-pipeline")) == {"position.json", "replica.lock"}
        assert replica_at_boundary(crashed / "db") is None
        assert replicate(ListSource(txns), sink) == txns[-1].after  # redelivery from txn 1 is skipped
    finally:
        sink.close()
    assert disk_state(crashed) == expected_state(txns, len(txns))
    assert replica_at_boundary(crashed / "db") is None


@pytest.mark.parametrize("group_commit", [False, True], ids=["per-txn", "group-commit"])
def test_a_kill_while_redo_tmp_is_half_written_leaves_the_last_committed_txn(
    tmp_path: Path, group_commit: bool
) -> None:
    txns = make_stream(6, seed=7)
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    assert apply_all(live, txns[:2]) == txns[1].after
    crash = Crash(live, crashed)
    sink = open_replica(live, group_commit=group_commit)
    victim = 4 if group_commit else 3  # with group commit, txn 3 is already staged in the same redo.tmp

    class Dying(ListSource):
        def transactions(self, after: Position) -> Iterator[Transaction]:
            for txn in super().transactions(after):
                if txn.txn_id == victim:
                    txn.changes = self._dying(txn.changes)  # type: ignore[arg-type]
                yield txn

        def _dying(self, changes: list[Change]) -> Iterator[Change]:
            for n, change in enumerate(changes):
                if n == 4:  # 3 blocks and the first blob are staged
                    assert sink._batch is not None
                    sink._batch.redo.flush()  # what the kernel holds of redo.tmp at the kill
                    assert (live / "db" / ".pool-pipeline" / "redo.tmp").stat().st_size > 0
                    crash()
                yield change

    try:
        with pytest.raises(Killed):
            replicate(Dying(txns[2:5]), sink)
    finally:
        sink.close()
    assert (crashed / "db" / ".pool-pipeline" / "redo.tmp").exists()
    sink = open_replica(crashed, group_commit=group_commit)
    try:
        assert sink.position() == txns[1].after
        assert disk_state(crashed) == expected_state(txns, 2)
        assert set(os.listdir(crashed / "db" / ".pool-pipeline")) == {"position.json", "replica.lock"}
        assert replicate(ListSource(txns[2:]), sink) == txns[-1].after
    finally:
        sink.close()
    assert disk_state(crashed) == expected_state(txns, len(txns))


@pytest.mark.parametrize(
    "point", ["redo renamed, nothing written", "blocks half written", "position.json.tmp written, not renamed"]
)
def test_a_kill_during_the_very_first_txn_after_its_commit_point_is_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """No position.json yet, but pool files half written by the replay: the committed redo still wins."""
    txns = make_stream(3, seed=11)
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    crash = Crash(live, crashed)
    sink = open_replica(live)
    POINTS[point][0](monkeypatch, crash)
    try:
        with pytest.raises(Killed):
            replicate(ListSource(txns[:1]), sink)
    finally:
        monkeypatch.undo()
        sink.close()
    sink = open_replica(crashed)
    try:
        assert sink.position() == txns[0].after
        assert disk_state(crashed) == expected_state(txns, 1)
        assert replicate(ListSource(txns), sink) == txns[-1].after
    finally:
        sink.close()
    assert disk_state(crashed) == expected_state(txns, len(txns))


def test_blob_directories_are_fsynced_before_the_position_that_claims_their_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut may undo a rename whose directory was not fsynced: position.json must not be stored
    before the blob directories a batch moved files into (or deleted from) are durable."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)  # type: ignore[arg-type]

    txns = make_stream(4, seed=3)
    apply_all(tmp_path, txns[:2])
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    apply_all(tmp_path, txns, group_commit=True)  # txns 3 and 4 in one batch: blobs into A/ and B/, a delete in B/
    monkeypatch.undo()

    stored = max(i for i, (what, path) in enumerate(events) if what == "replace" and path.endswith("position.json"))
    blob_root = os.path.realpath(tmp_path / "blob")
    for d in ("A", "B"):
        moved = max(
            i for i, (what, path) in enumerate(events) if what == "replace" and path.startswith(f"{blob_root}/{d}/")
        )
        synced = [i for i, (what, path) in enumerate(events) if what == "fsync" and path == f"{blob_root}/{d}"]
        assert any(moved < i < stored for i in synced), (
            f"blob dir {d} not fsynced between its renames and position.json"
        )
    assert disk_state(tmp_path) == expected_state(txns, 4)
