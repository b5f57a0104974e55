"""A replica on a full or read-only filesystem: errno classification, one clear error, no temp files left."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.faults import disk_fault
from connectors.picolisp.replica import RESERVE_NAME, ReplicaDir
from pipeline.errors import PipelineError
from pipeline.model import Position, Transaction
from pipeline.replicate import replicate
from tests.pipeline_helpers import replica_at_boundary, synthetic_stream

DB = "diskdb"


@pytest.mark.parametrize(
    "code, reason",
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
        (errno.EPERM, "operation not permitted"),
    ],
)
def test_full_and_read_only_errnos_are_disk_faults(code: int, reason: str) -> None:
    fault = disk_fault(OSError(code, os.strerror(code), "/x"))
    assert fault is not None and fault.reason == reason and "restart" not in fault.remedy


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EIO, "I/O error"),
        OSError(errno.ENOENT, "gone"),
        FileNotFoundError("x"),
        OSError("no errno"),
        ValueError("not an OSError"),
    ],
)
def test_other_errors_are_not_disk_faults(exc: BaseException) -> None:
    assert disk_fault(exc) is None


class ListSource:
    """Transactions from a list, all 'already fetched', so a group-commit sink batches them."""

    def __init__(self, txns: list[Transaction]) -> None:
        self.txns = txns
        self.acked: list[int] = []

    def transactions(self, after: Position) -> Iterator[Transaction]:
        return iter(self.txns)

    def acknowledge(self, txn: Transaction) -> None:
        self.acked.append(txn.txn_id)

    def buffered(self) -> bool:
        return True


def stream(pool_blocks: int, txns: int, per_txn: int, seed: int) -> list[Transaction]:
    """synthetic_stream, materialised so it can be applied more than once (a snapshot's trailer is
    only known once its changes were read, and the next txn continues from it)."""
    out = []
    for txn in synthetic_stream(DB, pool_blocks, txns, per_txn, seed):
        txn.changes = list(txn.changes)
        out.append(txn)
    return out


def state_files(target: Path) -> set[str]:
    return {p.name for p in (target / ".pool-pipeline").iterdir()}


def test_open_removes_temp_files_of_a_killed_apply_and_keeps_the_position(tmp_path: Path) -> None:
    target = tmp_path / "db"
    txns = stream(16, 3, 2, 1)
    sink = ReplicaDir(f"{target}/", DB)
    replicate(ListSource(txns), sink)
    at = sink.position()
    sink.close()
    state = target / ".pool-pipeline"
    for name in ("redo.tmp", "position.json.tmp", RESERVE_NAME):
        (state / name).write_bytes(b"x" * 100_000)  # what a kill -9 before the commit point leaves
    (state / "stage").mkdir()
    (state / "stage" / "0.blob").write_bytes(b"y" * 1000)
    sink = ReplicaDir(f"{target}/", DB)
    try:
        assert sink.position() == at
    finally:
        sink.close()
    assert state_files(target) == {"position.json", "replica.lock"}
    assert replica_at_boundary(target) is None


def test_open_replays_a_committed_redo_and_its_staged_blobs_instead_of_deleting_them(tmp_path: Path) -> None:
    target, blobs = tmp_path / "db", tmp_path / "blob"
    sink = ReplicaDir(f"{target}/", DB, blobs)
    stream = synthetic_stream(DB, pool_blocks=16, txns=2, per_txn=2, seed=2)
    sink.apply(next(stream))
    # A failure after the commit point (here a plain I/O error in the replay) leaves the redo committed.
    replay = sink._replay

    def broken_replay(plan: dict | None = None) -> None:
        raise OSError(errno.EIO, "simulated I/O error")

    sink._replay = broken_replay  # type: ignore[method-assign]
    txn2 = next(stream)
    with pytest.raises(OSError):
        sink.apply(txn2)
    sink._replay = replay  # type: ignore[method-assign]
    sink.close()
    state = target / ".pool-pipeline"
    assert (state / "redo").exists() and json.loads((state / "position.json").read_text())["txn_id"] == 1
    (state / "redo.tmp").write_bytes(b"stale")
    sink = ReplicaDir(f"{target}/", DB, blobs)
    try:
        assert sink.position() == txn2.after  # the committed batch was replayed, not thrown away
    finally:
        sink.close()
    assert state_files(target) == {"position.json", "replica.lock"}
    assert replica_at_boundary(target) is None


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """A ballast file leaving about `leave` bytes free on `mnt`."""
    st = os.statvfs(mnt)
    ballast = mnt / "ballast"
    with open(ballast, "wb") as f:
        f.write(bytes(max(0, st.f_bavail * st.f_frsize - leave)))
    return ballast


def test_a_full_disk_stops_the_replica_with_one_clear_error_no_temp_files_then_it_resumes(small_fs: Path) -> None:
    target = small_fs / "db"
    txns = stream(256, 40, 16, 3)  # 1 MiB pool, 64 KiB txns
    sink = ReplicaDir(f"{target}/", DB, group_commit=True)
    replicate(ListSource(txns[:5]), sink)
    assert sink.position() == txns[4].after
    ballast = fill(small_fs, 100_000)
    source = ListSource(txns[5:])
    with pytest.raises(PipelineError) as info:
        replicate(source, sink)
    err = info.value
    message = str(err)
    print(message)
    assert not err.retriable and "\n" not in message
    assert f"replica {DB}: cannot write " in message and "no space left on device" in message, message
    assert f"free on {small_fs}" in message and "at txn 5, nothing of txn" in message, message
    assert "sink reports" not in message and not getattr(err, "__notes__", None), message
    assert sink.position() == txns[4].after
    assert state_files(target) == {"position.json", "replica.lock"}  # nothing keeps the disk full
    assert replica_at_boundary(target) is None
    assert source.acked == []  # nothing became durable, nothing is acknowledged
    sink.close()
    ballast.unlink()  # space is back: a restart catches up
    sink = ReplicaDir(f"{target}/", DB, group_commit=True)
    try:
        assert sink.position() == txns[4].after
        assert replicate(ListSource(txns[5:]), sink) == txns[-1].after
    finally:
        sink.close()
    assert replica_at_boundary(target) is None


def test_a_read_only_target_is_refused_at_open_with_one_clear_error(small_fs: Path) -> None:
    target = small_fs / "db"
    txns = stream(16, 3, 2, 4)
    sink = ReplicaDir(f"{target}/", DB)
    replicate(ListSource(txns[:2]), sink)
    sink.close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        with pytest.raises(PipelineError) as info:
            ReplicaDir(f"{target}/", DB)
        assert not info.value.retriable
        assert "read-only file system" in str(info.value) and "make it writable and restart" in str(info.value)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    sink = ReplicaDir(f"{target}/", DB)
    try:
        assert replicate(ListSource(txns[2:]), sink) == txns[-1].after
    finally:
        sink.close()
