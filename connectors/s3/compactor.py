"""Compaction: small archived segments merged into bigger ones, exactly once and safe against a crash at any point."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from connectors.s3.store import Store
from pipeline.archive import (
    Compaction,
    CompactionPolicy,
    Framer,
    Segment,
    SegmentWriter,
    compaction_plan,
    read_segment,
)
from pipeline.codec import Codec
from pipeline.errors import PipelineError

# The order of steps is what makes a crash harmless: the merged object is created (conditionally)
# before any source is deleted, and a listing that holds both prefers the merged one
# (Catalog.superseded), so readers see every txn exactly once at every moment. A restore that
# planned with a source deleted meanwhile lists again (connectors/s3/restore.py).


def compact(
    store: Store,
    codec: Codec,
    topic: str,
    work_dir: Path,
    policy: CompactionPolicy,
    log: Callable[[str], None],
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[Segment]:
    """Merge what `compaction_plan` says is due, and delete sources a crashed merge left; returns
    the merged segments. Readers may run meanwhile; so may a second compactor (both write the same
    bytes under the same key, and deleting twice is harmless)."""
    catalog = store.catalog()
    catalog.runs()  # refuses overlapping segments: that is two archivers, not a compaction
    if catalog.superseded:
        log(
            f"archive {store.database}: deleting {len(catalog.superseded)} segments a merged segment already "
            "holds (an earlier compaction stopped before deleting them)"
        )
        store.delete([s.key(store.root) for s in catalog.superseded])
    merged: list[Segment] = []
    for job in compaction_plan(catalog, policy):
        if should_stop():
            break
        merged.append(merge(store, codec, topic, work_dir, job))
        store.delete([s.key(store.root) for s in job.sources])
        target = merged[-1]
        log(
            f"archive {store.database}: compacted {len(job.sources)} segments of txns "
            f"{target.first_txn}-{target.last_txn} into level {job.level} ({target.size} bytes)"
        )
    return merged


def merge(store: Store, codec: Codec, topic: str, work_dir: Path, job: Compaction) -> Segment:
    """Write the sources' records into one segment and store it (If-None-Match); sources stay.

    The records go through the archive's framer, so a merged object holds the whole, contiguous
    transactions its key names, or nothing is written.
    """
    target = job.target
    database = store.database
    framer = Framer(codec, database, None)
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=work_dir) as out:
        writer = SegmentWriter(out, codec, database, target.partition, target.first_offset)
        first = last = None
        for src in job.sources:
            key = src.key(store.root)
            tmp = work_dir / f".compact-{os.getpid()}"
            try:
                store.download(key, tmp)
                with open(tmp, "rb") as fo:
                    for rec in read_segment(fo, database, topic, key):
                        frame = framer.begin(rec)
                        if frame is not None:
                            first = frame.txn_id if first is None else first
                        else:
                            done = framer.record(rec)
                            last = done.txn_id if done is not None else last
                        writer.write(rec)
            finally:
                tmp.unlink(missing_ok=True)
        writer.close()
        if framer.open is not None or (first, last) != (target.first_txn, target.last_txn):
            raise PipelineError(
                f"segments {job.sources[0].key(store.root)} .. {job.sources[-1].key(store.root)} hold txns "
                f"{first}-{last}, not the whole txns {target.first_txn}-{target.last_txn} their keys name; "
                "left as they are",
                database=database,
                txn_id=target.first_txn,
            )
        size = out.seek(0, os.SEEK_END)
        store.put_new(target.key(store.root), out)
    return Segment(
        target.first_txn,
        target.last_txn,
        target.first_offset,
        target.first_ms,
        target.last_ms,
        target.partition,
        target.starts_with_snapshot,
        size,
        target.level,
    )
