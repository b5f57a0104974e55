"""`archive`: the database's change stream into S3 exactly once; `ls`, `snapshot` and `retain`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pipeline.archive import CompactionPolicy
from pipeline.codec import Codec
from pipeline.errors import PipelineError
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

if TYPE_CHECKING:
    from connectors.s3.archiver import Archiver
    from connectors.s3.store import ArchiveStore


def archive_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="archive",
        description="Archive a database's change stream to S3 exactly once (action run, the "
        "default), list what is archived (ls), write a base snapshot now (snapshot), apply retention (retain), "
        "or merge small segments now (compact; `run` does it as it goes).",
    )
    p.add_argument("action", nargs="?", choices=("run", "ls", "snapshot", "retain", "compact"), default="run")
    p.add_argument("--database", help="the database to archive (or --pattern)")
    p.add_argument(
        "--pattern",
        help="run: archive every database whose name matches this regex, spread over the members of "
        "--group (start one archiver per machine; each database lands under the same --bucket)",
    )
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
        "--compact",
        default="60,3600",
        metavar="SECONDS,...",
        help="merge the segments of each window of this many seconds of source time into one, level by level "
        "(default 60,3600: minutes, then hours), so a restore fetches few objects; 'off' keeps every segment",
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
    p.add_argument(
        "--sse",
        choices=("AES256", "aws:kms"),
        help="server-side encryption of every object the archiver writes (segments, multipart uploads, "
        "snapshot files and manifests): AES256 (SSE-S3) or aws:kms (SSE-KMS)",
    )
    p.add_argument("--sse-kms-key-id", metavar="ID", help="with --sse aws:kms: the KMS key (default: the bucket's)")
    p.add_argument("--keep-snapshots", type=int, help="retain: keep the newest K base snapshots")
    p.add_argument("--keep-days", type=float, help="retain: keep every restore point of the last D days")
    p.add_argument("--dry-run", action="store_true", help="retain: only show what would be deleted")
    add_kafka(p)
    add_encryption(p)
    return p


def _archiver(args: argparse.Namespace, store: ArchiveStore, codec: Codec, work_dir: Path) -> Archiver:
    """The archiver of one database, as the options say."""
    from connectors.kafka.topics import topic_for
    from connectors.s3.archiver import Archiver
    from pipeline.archive import Rotation, SnapshotPolicy

    return Archiver(
        store,
        codec,
        rotation=Rotation(args.segment_txns, args.segment_bytes, int(args.segment_span * 1000)),
        snapshots=SnapshotPolicy(args.snapshot_every_txns, args.snapshot_every_bytes),
        work_dir=work_dir,
        topic=topic_for(store.database),
        log=lambda line: print(line, flush=True),
        max_delay=None if args.once else args.max_delay,  # --once archives the tail when it ends
        compaction=_compaction(args.compact),
        **({"part_bytes": args.part_bytes} if args.part_bytes is not None else {}),
    )


def _archive(args: argparse.Namespace) -> int:
    from connectors.kafka.reader import TopicSource
    from connectors.kafka.topics import topic_for
    from connectors.s3.retention import apply_retention, describe
    from connectors.s3.store import open_store, sse_args

    if args.max_delay < 0:
        fail("--max-delay must be 0 or more seconds", EXIT_USAGE)
    if args.sse_kms_key_id and args.sse != "aws:kms":
        fail("--sse-kms-key-id needs --sse aws:kms", EXIT_USAGE)
    if args.pattern is not None:
        if args.database or args.action != "run" or args.skip_to_snapshot:
            fail(
                "--pattern goes with the run action, instead of --database (and without --skip-to-snapshot)", EXIT_USAGE
            )
        return _archive_group(args)
    if not args.database:
        fail("give --database NAME (or, to run, --pattern REGEX)", EXIT_USAGE)
    database = check_database_name(args.database)
    store = open_store(args.bucket, database, args.endpoint_url, sse_args(args.sse, args.sse_kms_key_id))
    if args.action == "ls":
        print(describe(store.catalog(), store.url))
        return 0
    compaction = _compaction(args.compact)
    if args.action == "compact":
        from connectors.s3.compactor import compact

        if compaction is None:
            fail("compact needs compaction windows: --compact SECONDS,...", EXIT_USAGE)
        work_dir = Path(args.work_dir) if args.work_dir else state_home() / "archive" / database
        log = lambda line: print(line, flush=True)  # noqa: E731
        sealed = Codec(load_schemas(), keyring=args.keyring)  # merging frames the records: it decrypts
        merged = with_retries(
            f"archive {database}: compact",
            lambda: len(compact(store, sealed, topic_for(database), work_dir, compaction, log)),
        )
        print(f"archive {database}: {merged or 'no'} merged segments written", flush=True)
        return 0
    if args.action == "retain":
        if args.keep_snapshots is None and args.keep_days is None:
            fail("retain needs --keep-snapshots K and/or --keep-days D", EXIT_USAGE)
        keep_ms = int(args.keep_days * 86_400_000) if args.keep_days is not None else None
        apply_retention(store, keep_snapshots=args.keep_snapshots, keep_ms=keep_ms, dry_run=args.dry_run)
        return 0
    store.ensure_bucket()
    codec = Codec(load_schemas(), keyring=args.keyring)
    work_dir = Path(args.work_dir) if args.work_dir else state_home() / "archive" / database
    archiver = _archiver(args, store, codec, work_dir)
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


def _archive_group(args: argparse.Namespace) -> int:
    """Many databases in one consumer group: Kafka spreads them over the members, and each member
    runs one archiver per database it holds, fed from its one consumer. A database whose archive
    fails for good stops alone; the others go on."""
    from kafka.structs import TopicPartition

    from connectors.kafka.reader import GroupReader
    from connectors.kafka.topics import PARTITION, topic_for
    from connectors.s3.store import open_store, sse_args

    codec = Codec(load_schemas(), keyring=args.keyring)
    work_root = Path(args.work_dir) if args.work_dir else state_home() / "archive"
    archivers: dict[str, Archiver] = {}
    busy: list[str] = []  # the database being archived right now
    revoked: set[str] = set()
    stop = GracefulStop().install()
    stop.flushing = True  # a signal ends the loop; every archiver then flushes what it holds
    readers: list[GroupReader] = []

    def start_offset(database: str) -> int:
        """A database was assigned to us: S3 says where its archive ends, we read on from there."""
        if database in archivers:  # a restart after a retriable error: begin again from S3
            drop(database)
        store = open_store(args.bucket, database, args.endpoint_url, sse_args(args.sse, args.sse_kms_key_id))
        store.ensure_bucket()
        archiver = _archiver(args, store, codec, work_root / database)
        try:
            offset = archiver.resume()
        except BaseException:
            archiver.close()
            raise
        tp = TopicPartition(topic_for(database), PARTITION)
        archiver.on_archived = lambda txn: readers[0].offsets.applied(tp, txn)
        archiver.start()
        archivers[database] = archiver
        held = f"up to {archiver.position}" if archiver.position else "nothing yet"
        print(f"archive {database}: assigned; {store.url} holds {held}; reading from offset {offset}", flush=True)
        return offset

    def drop(database: str, flush: bool = False) -> None:
        archiver = archivers.pop(database, None)
        if archiver is None:
            return
        try:
            if flush:
                archiver.finish()
        finally:
            archiver.shutdown()
            archiver.close()
        print(f"archive {database}: archived up to {archiver.position or 'nothing'}; released", flush=True)

    def release(database: str) -> None:
        """Kafka moved the database to another member: flush what it holds, then let go."""
        if database in busy:
            revoked.add(database)  # released once its current step ends
            return
        guarded(database, lambda: drop(database, flush=True))
        readers[0].offsets.flush()  # what the flush archived, before the partition changes hands

    def guarded(database: str, step: Callable[[], object]) -> None:
        """One database's step; an error stops (or, if retriable, restarts) that database only."""
        try:
            step()
        except PipelineError as exc:
            reader = readers[0]
            if exc.retriable:
                print(f"archive {database}: {exc} (starting again from what S3 holds)", file=sys.stderr, flush=True)
                with contextlib.suppress(PipelineError):
                    drop(database)
                reader.restart(database)
            else:
                print(f"error: archive {database} stopped: {exc}", file=sys.stderr, flush=True)
                with contextlib.suppress(PipelineError):
                    drop(database)
                reader.fail(database)

    def tick() -> None:
        for database, archiver in list(archivers.items()):
            guarded(database, lambda a=archiver: a.feed(None))  # type: ignore[misc]

    def attempt() -> int:
        reader = GroupReader(
            args.kafka,
            args.group,
            args.pattern,
            codec,
            start_offset,
            once=args.once,
            on_revoked=release,
            log=lambda line: print(line, file=sys.stderr, flush=True),
            idle=tick,
            should_stop=stop.event.is_set,
            role="archive",
        )
        readers[:] = [reader]
        try:
            for source in reader.sources():
                database = source.database
                archiver = archivers.get(database)
                if archiver is None:
                    continue
                busy[:] = [database]

                def feed_all() -> None:
                    for rec in source.records():  # noqa: B023 - called at once
                        archiver.feed(rec)  # noqa: B023

                guarded(database, feed_all)
                busy.clear()
                for database in list(revoked):
                    revoked.discard(database)
                    guarded(database, lambda: drop(database, flush=True))  # noqa: B023
                tick()
            for database in sorted(archivers):
                guarded(database, lambda: drop(database, flush=True))  # noqa: B023 - called at once
        finally:
            for database in list(archivers):
                with contextlib.suppress(PipelineError):
                    drop(database)
            reader.close()
        if reader.failed:
            print(f"archive: stopped databases: {', '.join(sorted(reader.failed))}", file=sys.stderr)
            return 1
        return 0

    return with_retries(f"archive group {args.group}", attempt, kafka=args.kafka)


def _compaction(spec: str) -> CompactionPolicy | None:
    """--compact: 'off', or growing window widths in seconds."""
    if spec.strip().lower() in ("off", "no", "none", "0"):
        return None
    try:
        widths = tuple(int(float(w) * 1000) for w in spec.split(","))
        return CompactionPolicy(widths)
    except (ValueError, PipelineError):
        fail(f"--compact takes growing window widths in seconds, like 60,3600, or 'off'; got {spec!r}", EXIT_USAGE)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(_archive, parse(archive_parser(), argv))
