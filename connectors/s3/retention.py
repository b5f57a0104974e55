"""What the archive holds (`archive ls`) and what retention deletes (`archive retain`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from connectors.s3.store import Store
from pipeline.archive import (
    Catalog,
    RetentionPlan,
    Snapshot,
    retention_plan,
)


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def describe(catalog: Catalog, url: str) -> str:
    """`archive ls` / `restore --list`: snapshots, contiguous txn ranges with times, gaps, restore points."""
    lines = [f"archive of {catalog.database!r} at {url}"]
    lines.append(f"base snapshots: {len(catalog.snapshots)}")
    for s in catalog.snapshots:
        lines.append(f"  txn {s.txn:>10}  {_when(s.time_ms)}")
    runs = catalog.runs()
    levels = sorted({s.level for s in catalog.segments})
    by_level = ", ".join(f"level {n}: {sum(1 for s in catalog.segments if s.level == n)}" for n in levels)
    lines.append(
        f"segments: {len(catalog.segments)} objects, {sum(s.size for s in catalog.segments)} bytes"
        + (f" ({by_level})" if len(levels) > 1 or levels[-1:] != [0] else "")
    )
    if catalog.superseded:
        lines.append(f"  {len(catalog.superseded)} more already merged into others, deleted by the next compaction")
    for i, run in enumerate(runs):
        if i:
            lines.append(f"  GAP: txns {runs[i - 1][-1].last_txn + 1}-{run[0].first_txn - 1} are missing")
        lines.append(
            f"  txns {run[0].first_txn}-{run[-1].last_txn}  {_when(run[0].first_ms)} .. "
            f"{_when(run[-1].last_ms)}  ({len(run)} objects, {sum(s.size for s in run)} bytes)"
        )
    lines.append(catalog.describe_points())
    return "\n".join(lines)


def apply_retention(
    store: Store, *, keep_snapshots: int | None, keep_ms: int | None, dry_run: bool, log: Callable[[str], None] = print
) -> list[str]:
    """Delete what the policy no longer needs (or only list it, with `dry_run`); returns the keys."""
    catalog = store.catalog()
    plan = retention_plan(catalog, keep_snapshots=keep_snapshots, keep_ms=keep_ms, now_ms=int(time.time() * 1000))
    keys = [s.key(store.root) for s in plan.delete_segments]
    for snap in plan.delete_snapshots:
        keys += sorted(k for k, _ in store.list(snap.prefix(store.root)))
    # Files of a snapshot an archiver was stopped in the middle of writing (no manifest): once a
    # newer snapshot is complete, nothing will ever finish or use them.
    newest = catalog.snapshots[-1].txn if catalog.snapshots else 0
    orphans = sorted(
        k
        for k, _ in store.list(f"{store.root}/snapshots/")
        if (leftover := Snapshot.parse(store.root, k, manifest=False)) is not None
        and leftover not in catalog.snapshots
        and leftover.txn < newest
    )
    if plan.keep_from is None and not orphans:
        log("retention: no snapshot is old enough to be the oldest restore point; nothing to delete")
        return []
    keys += orphans
    if plan.keep_from is None:
        plan = RetentionPlan(None, [], [])
    verb = "would delete" if dry_run else "deleting"
    kept = (
        f"keeping everything from the snapshot at txn {plan.keep_from.txn} ({_when(plan.keep_from.time_ms)})"
        if plan.keep_from
        else "no snapshot is old enough to be the oldest restore point"
    )
    log(
        f"retention: {kept}; {verb} {len(plan.delete_snapshots)} snapshots, {len(plan.delete_segments)} segments "
        f"and {len(orphans)} files of unfinished snapshots ({len(keys)} objects)"
    )
    for key in keys:
        log(f"  {verb} {key}")
    if not dry_run and keys:
        # Manifests first: a half-deleted snapshot must not look complete.
        manifests = [k for k in keys if k.endswith("/manifest.json")]
        store.delete(manifests)
        store.delete([k for k in keys if k not in set(manifests)])
    return keys
