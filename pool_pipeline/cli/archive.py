"""`archive`: the database's change stream into S3 exactly once; `ls`, `snapshot` and `retain`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pipeline.codec import Codec
from pipeline.model import Transaction, check_database_name
from pool_pipeline.cli.common import (
    EXIT_USAGE,
    GracefulStop,
    add_bucket,
    add_encryption,
    add_kafka,
    fail,
    parse,
    run,
    skip_to_snapshot,
    state_home,
    topic_ready,
    with_retries,
)
from schemas import load_schemas


def archive_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="archive",
        description="Archive a database's change stream to S3 exactly once (action run, the "
        "default), list what is archived (ls), write a base snapshot now (snapshot), or apply retention (retain).",
    )
    p.add_argument("action", nargs="?", choices=("run", "ls", "snapshot", "retain"), default="run")
    p.add_argument("--database", required=True)
    add_bucket(p)
    p.add_argument("--group", default="archive", help="consumer group (offsets committed after each upload)")
    p.add_argument(
        "--once", action="store_true", help="archive up to the current end (including the open segment), then exit"
    )
    p.add_argument(
        "--skip-to-snapshot",
        action="store_true",
        help="the way past a bad record: continue at the newest snapshot txn after the archive's end "
        "(publish one with `capture-agent --snapshot`); `archive ls` then shows the gap",
    )
    p.add_argument("--segment-txns", type=int, default=10_000, help="close a segment after N txns (default 10000)")
    p.add_argument("--segment-bytes", type=int, default=64 << 20, help="... or after N record bytes (default 64 MiB)")
    p.add_argument(
        "--part-bytes",
        type=int,
        help="a transaction bigger than --segment-bytes and this is uploaded in parts of N bytes while "
        "it is still read (default 16 MiB, at least 5 MiB)",
    )
    p.add_argument(
        "--segment-span",
        type=float,
        default=3600.0,
        help="... or when a txn is N seconds of source time after the segment's first (default 3600)",
    )
    p.add_argument(
        "--max-delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="close and upload the open segment (at a whole txn) at most N seconds after its first "
        "txn was read, also when nothing more comes (default 1; the other rules still apply; "
        "--once archives the tail at its end instead)",
    )
    p.add_argument(
        "--snapshot-every-txns",
        type=int,
        default=100_000,
        help="write a base snapshot every N archived txns (0: off; default 100000)",
    )
    p.add_argument(
        "--snapshot-every-bytes",
        type=int,
        default=1 << 30,
        help="... or every N archived segment bytes (0: off; default 1 GiB)",
    )
    p.add_argument(
        "--work-dir",
        help="segment spool and the materialised copy snapshots are taken from "
        "(default: $POOL_PIPELINE_HOME/archive/<database>)",
    )
    p.add_argument("--keep-snapshots", type=int, help="retain: keep the newest K base snapshots")
    p.add_argument("--keep-days", type=float, help="retain: keep every restore point of the last D days")
    p.add_argument("--dry-run", action="store_true", help="retain: only show what would be deleted")
    add_kafka(p)
    add_encryption(p)
    return p


def _archive(args: argparse.Namespace) -> int:
    from connectors.kafka.reader import TopicSource
    from connectors.kafka.topics import topic_for
    from connectors.s3.archiver import Archiver
    from connectors.s3.retention import apply_retention, describe
    from connectors.s3.store import open_store
    from pipeline.archive import Rotation, SnapshotPolicy

    database = check_database_name(args.database)
    store = open_store(args.bucket, database, args.endpoint_url)
    if args.action == "ls":
        print(describe(store.catalog(), store.url))
        return 0
    if args.action == "retain":
        if args.keep_snapshots is None and args.keep_days is None:
            fail("retain needs --keep-snapshots K and/or --keep-days D", EXIT_USAGE)
        keep_ms = int(args.keep_days * 86_400_000) if args.keep_days is not None else None
        apply_retention(store, keep_snapshots=args.keep_snapshots, keep_ms=keep_ms, dry_run=args.dry_run)
        return 0
    if args.max_delay < 0:
        fail("--max-delay must be 0 or more seconds", EXIT_USAGE)
    store.ensure_bucket()
    codec = Codec(load_schemas(), keyring=args.keyring)
    work_dir = Path(args.work_dir) if args.work_dir else state_home() / "archive" / database
    archiver = Archiver(
        store,
        codec,
        rotation=Rotation(args.segment_txns, args.segment_bytes, int(args.segment_span * 1000)),
        snapshots=SnapshotPolicy(args.snapshot_every_txns, args.snapshot_every_bytes),
        work_dir=work_dir,
        topic=topic_for(database),
        log=lambda line: print(line, flush=True),
        max_delay=None if args.once else args.max_delay,  # --once archives the tail when it ends
        **({"part_bytes": args.part_bytes} if args.part_bytes is not None else {}),
    )
    if args.action == "snapshot":
        try:
            archiver.resume(abort_unfinished=False)  # a running archiver's upload may be in flight
            if archiver.position is None:
                fail(f"nothing is archived for {database!r} yet: run the archiver first")
            archiver.write_snapshot(archiver.position.txn_id)
            return 0
        finally:
            archiver.close()

    # SIGTERM/SIGINT while archiving: close the open segment at its last whole txn, upload it, exit 0.
    stop = GracefulStop().install()

    def attempt() -> int:
        if stop.event.is_set():
            return 0
        if not topic_ready(args.kafka, database, args.once, f"archive {database}"):
            return 0
        start = archiver.resume()
        if args.skip_to_snapshot and archiver.position is not None:
            start = skip_to_snapshot(args.kafka, database, codec, start, archiver.position.txn_id, "archive")
        held = f"up to {archiver.position}" if archiver.position else "nothing yet"
        print(
            f"archive {database}: {store.url} holds {held}; reading {topic_for(database)} from offset {start}",
            flush=True,
        )
        source = TopicSource(args.kafka, database, codec, args.group, start, once=args.once)

        def archived(txn: Transaction) -> None:  # offsets only after the upload: S3 holds the txn now
            source.acknowledge(txn)
            source.offsets.flush()

        archiver.on_archived = archived
        stop.flushing = True
        try:
            archiver.run(source.records_or_idle(), stop.event)
        finally:
            stop.flushing = False
            source.close()
        stopped = " (stopped)" if stop.event.is_set() else ""
        print(f"archive {database}: archived up to {archiver.position or 'nothing'}{stopped}", flush=True)
        return 0

    try:
        return with_retries(f"archive {database}", attempt, kafka=args.kafka)
    except KeyboardInterrupt:
        if stop.signals != 1:
            raise
        # The signal came while nothing was open (starting, waiting for the topic, between retries).
        print(f"archive {database}: stopped; archived up to {archiver.position or 'nothing'}", flush=True)
        return 0
    finally:
        archiver.close()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(_archive, parse(archive_parser(), argv))
