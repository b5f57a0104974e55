"""Point-in-time restore: a base image and the segments after it, applied through the replica's own sink."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from connectors.picolisp.format import hax
from connectors.picolisp.replica import ReplicaDir, state_dir_for, write_position
from connectors.s3.sealed import blob_key, get_file, open_bytes
from connectors.s3.store import PROGRESS, Store
from pipeline.archive import (
    Manifest,
    RestorePlan,
    Segment,
    Snapshot,
    read_segment,
)
from pipeline.codec import Codec, Record
from pipeline.crypto import Keyring, snapshot_context
from pipeline.errors import PipelineError
from pipeline.model import Position, Transaction, safe_blob_path
from pipeline.replicate import replicate

_MAX_RELISTS = 5  # compaction moves a segment once per level; more means something else deletes them


class _SegmentSource:
    """Transactions of a restore plan's segments, downloaded one at a time (a Source)."""

    def __init__(
        self, store: Store, codec: Codec, plan: RestorePlan, topic: str, work_dir: Path, progress: PROGRESS
    ) -> None:
        self.store, self.codec, self.plan, self.topic, self.work_dir = store, codec, plan, topic, work_dir
        self.progress = progress
        self.last: Transaction | None = None

    def _records(self, after: Position) -> Iterator[Record]:
        segments = list(self.plan.segments)
        next_txn = after.txn_id + 1  # the first txn the segments still to read must hold
        relisted = 0
        while segments:
            seg = segments.pop(0)
            if seg.last_txn < next_txn:
                self.progress({"bytes": seg.size})
                continue
            key = seg.key(self.store.root)
            tmp = self.work_dir / f".segment-{os.getpid()}"
            try:
                try:
                    self.store.download(key, tmp, lambda n: self.progress({"bytes": n}))
                except PipelineError:
                    # Compaction may have merged it into a bigger object since we listed: list again
                    # and go on from the same txn (replicate() skips the txns applied already).
                    if relisted >= _MAX_RELISTS or self._listed(key):
                        raise
                    relisted += 1
                    segments = self._segments_from(next_txn)
                    continue
                with open(tmp, "rb") as fo:
                    yield from read_segment(fo, self.store.database, self.topic, key)
                next_txn = seg.last_txn + 1
            finally:
                tmp.unlink(missing_ok=True)

    def _listed(self, key: str) -> bool:
        return any(k == key for k, _ in self.store.list(key))

    def _segments_from(self, txn: int) -> list[Segment]:
        """The stored segments that continue the restore at `txn` (after a compaction moved them)."""
        segments = [s for s in self.store.catalog().segments if s.last_txn >= txn]
        if not segments or segments[0].first_txn > txn:
            raise PipelineError(
                f"txn {txn} is no longer in the archive at {self.store.url} (retention deleted it?)",
                database=self.store.database,
                txn_id=txn,
            )
        return segments

    def _beyond(self, txn: Transaction) -> bool:
        if self.plan.target_txn is not None:
            return txn.txn_id > self.plan.target_txn
        return self.plan.time_ms is not None and txn.source_time_ms > self.plan.time_ms

    def transactions(self, after: Position) -> Iterator[Transaction]:
        txns = self.codec.read_transactions(self._records(after), self.store.database, batches=True)
        return itertools.takewhile(lambda t: not self._beyond(t), txns)

    def buffered(self) -> bool:
        return True  # archived txns are all at hand: let the sink's batch caps decide when to commit

    def acknowledge(self, txn: Transaction) -> None:
        self.last = txn
        self.progress({"txn": txn.txn_id})


def materialise(
    store: Store,
    codec: Codec,
    plan: RestorePlan,
    db_dir: Path,
    blob_dir: Path,
    topic: str,
    work_dir: Path,
    *,
    reuse: bool = False,
    progress: PROGRESS = lambda event: None,
) -> ReplicaDir:
    """Bring `db_dir`/`blob_dir` to the plan's target: the base, then the segments, checking txn ids
    and the rolling checksum after every txn (ReplicaDir). With `reuse`, a copy already between the
    base and the target only applies what it lacks. Returns the open ReplicaDir at the target."""
    sink: ReplicaDir | None = None
    if reuse and state_dir_for(f"{db_dir}/").exists():
        try:
            sink = ReplicaDir(f"{db_dir}/", store.database, blob_dir, topic=topic, group_commit=True)
        except PipelineError:
            sink = None
        if sink is not None:
            at = sink.position().txn_id
            if not (plan.start_txn <= at and (plan.target_txn is None or at <= plan.target_txn)):
                sink.close()
                sink = None
    if sink is None:
        for d in (db_dir, blob_dir):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        if plan.base is not None:
            _download_snapshot(store, plan.base, db_dir, blob_dir, topic, progress, codec.keyring)
        try:
            sink = ReplicaDir(f"{db_dir}/", store.database, blob_dir, topic=topic, group_commit=True)
        except PipelineError as exc:
            raise PipelineError(
                f"base snapshot at txn {plan.base.txn if plan.base else '?'} does not match its manifest: {exc}",
                database=store.database,
            ) from exc
    try:
        _apply(store, codec, plan, sink, topic, work_dir, progress)
    except BaseException:
        sink.close()
        raise
    return sink


def _apply(
    store: Store, codec: Codec, plan: RestorePlan, sink: ReplicaDir, topic: str, work_dir: Path, progress: PROGRESS
) -> Position:
    """Apply the plan's segments after the sink's position, through the replica's own checks."""
    source = _SegmentSource(store, codec, plan, topic, work_dir, progress)
    position = replicate(source, sink)
    if plan.target_txn is not None and position.txn_id != plan.target_txn:
        raise PipelineError(
            f"the archive ended at txn {position.txn_id} before the requested txn {plan.target_txn}",
            database=store.database,
            txn_id=position.txn_id,
        )
    return position


def bootstrap(
    store: Store, codec: Codec, sink: ReplicaDir, topic: str, *, progress: PROGRESS = lambda event: None
) -> Position | None:
    """Bring a replica to the newest txn the archive holds (`replica --archive`); None if the archive
    holds nothing it can use.

    An empty replica restores the newest base and the segments after it into its bootstrap dir,
    then adopts them (ReplicaDir.adopt); a kill meanwhile leaves the replica empty and the next run
    reuses what was restored. A replica at txn N applies the archived segments after N, one txn at a
    time like any replica; it can use the archive only if a segment holds txn N+1.
    Afterwards the sink's next_offset is the Kafka offset after the last restored txn's commit.
    """
    if store.database != sink.database:
        raise PipelineError(
            f"the archive {store.url} is of database {store.database!r}, the replica of {sink.database!r}",
            database=sink.database,
        )
    catalog = store.catalog()
    work_dir = sink.bootstrap_dir
    at = sink.position().txn_id
    if at > 0:
        plan = catalog.continuing(at)
        if plan is None:
            return None
        if plan.segments:
            work_dir.mkdir(parents=True, exist_ok=True)
            try:
                _apply(store, codec, plan, sink, topic, work_dir, progress)
            finally:
                shutil.rmtree(work_dir, ignore_errors=True)
        return sink.position()
    if not catalog.restore_points():
        return None
    plan = catalog.plan()
    progress({"total_bytes": plan_size(store, plan), "plan": plan})
    work_dir.mkdir(parents=True, exist_ok=True)
    restored = materialise(
        store, codec, plan, work_dir / "db", work_dir / "blob", topic, work_dir, reuse=True, progress=progress
    )
    checksum = restored.checksum
    restored.close()
    sink.adopt(checksum)
    return sink.position()


def _download_snapshot(
    store: Store,
    snap: Snapshot,
    db_dir: Path,
    blob_dir: Path,
    topic: str,
    progress: PROGRESS,
    keyring: Keyring | None = None,
) -> None:
    prefix = snap.prefix(store.root)
    where = snap.manifest_key(store.root)
    data, sealed = open_bytes(
        store.get(where), keyring, snapshot_context(store.database, snap.txn, "manifest.json"), f"snapshot {where}"
    )
    manifest = Manifest.from_json(data, where)

    def fetch(name: str, key: str, path: Path) -> None:  # each object opened with the context it was sealed in
        context = snapshot_context(store.database, snap.txn, name)
        get_file(store, key, path, keyring, context, sealed, lambda n: progress({"bytes": n}))

    if manifest.database != store.database or manifest.txn_id != snap.txn:
        raise PipelineError(
            f"snapshot {prefix} holds database {manifest.database!r} txn {manifest.txn_id}, not "
            f"{store.database!r} txn {snap.txn}",
            database=store.database,
        )
    for layout in manifest.files:
        path = db_dir / hax(layout.file)
        fetch(f"db/{hax(layout.file)}", f"{prefix}db/{hax(layout.file)}", path)
        if path.stat().st_size != layout.blocks * layout.block_size:
            raise PipelineError(
                f"snapshot file {prefix}db/{hax(layout.file)} has {path.stat().st_size} bytes, "
                f"the manifest says {layout.blocks * layout.block_size}",
                database=store.database,
            )
    for index, (rel, size) in enumerate(manifest.blobs.items()):
        safe_blob_path(rel)
        dest = blob_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fetch(f"blob/{rel}", blob_key(prefix, index, rel, sealed), dest)
        if dest.stat().st_size != size:
            raise PipelineError(
                f"snapshot blob {prefix}blob/{rel} has {dest.stat().st_size} bytes, the manifest says {size}",
                database=store.database,
            )
    state = state_dir_for(f"{db_dir}/")
    state.mkdir(parents=True, exist_ok=True)
    # ReplicaDir rescans the files and refuses them unless their checksum is the manifest's.
    write_position(
        state, store.database, topic, manifest.position, manifest.next_offset, manifest.source_time_ms, manifest.files
    )


def plan_size(store: Store, plan: RestorePlan) -> int:
    """Bytes a restore downloads (for the progress bar)."""
    total = sum(s.size for s in plan.segments)
    if plan.base is not None:
        total += sum(size for _, size in store.list(plan.base.prefix(store.root)))
    return total


def restore(
    store: Store,
    codec: Codec,
    target: Path,
    *,
    txn: int | None = None,
    time_ms: int | None = None,
    topic: str,
    progress: PROGRESS = lambda event: None,
) -> Position:
    """Restore the pool at `txn` / `time_ms` (default: the newest) into `target`/db and `target`/blob.

    Everything happens in a temp directory beside `target`, renamed into place only once every
    txn applied with a matching checksum: on any error `target` is untouched.
    """
    target = target.absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise PipelineError(
            f"restore target {target} exists and is not empty; give a new directory", database=store.database
        )
    catalog = store.catalog()
    plan = catalog.plan(txn=txn, time_ms=time_ms)
    progress({"total_bytes": plan_size(store, plan), "plan": plan})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))
    try:
        sink = materialise(store, codec, plan, tmp / "db", tmp / "blob", topic, tmp, progress=progress)
        position = sink.position()
        sink.close()
        shutil.rmtree(state_dir_for(f"{tmp / 'db'}/"))  # the restored pool is a plain pool
        for leftover in tmp.glob(".segment-*"):
            leftover.unlink()
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return position
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
