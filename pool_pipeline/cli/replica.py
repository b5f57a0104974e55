"""`replica`: materialise a byte-identical replica of one database, or of many in a consumer group."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pipeline.codec import Codec
from pipeline.errors import PipelineError
from pipeline.replicate import replicate
from pool_pipeline.cli.common import (
    EXIT_USAGE,
    Progress,
    add_encryption,
    add_kafka,
    fail,
    parse,
    run,
    skip_to_snapshot,
    topic_ready,
    with_retries,
)
from schemas import load_schemas

if TYPE_CHECKING:
    from connectors.kafka.client import KafkaSettings
    from connectors.kafka.reader import PartitionSource
    from connectors.picolisp.replica import ReplicaDir


def replica_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="replica", description="Materialise a byte-identical replica of a pool.")
    p.add_argument("--database", help="database to replicate")
    p.add_argument("--target", help="replica pool directory, e.g. rpl/db/app/")
    p.add_argument("--blob", help="replica blob directory")
    p.add_argument("--group", default="replica", help="consumer group (one per replica set)")
    p.add_argument("--pattern", help="regex of databases to replicate (with --root)")
    p.add_argument("--root", help="with --pattern: one directory per database under this root")
    p.add_argument("--once", action="store_true", help="catch up to the current end, then exit")
    p.add_argument(
        "--skip-to-snapshot",
        action="store_true",
        help="the way past a bad record: start at the newest snapshot txn after the replica's position "
        "(publish one with `capture-agent --snapshot`), skipping what lies before it",
    )
    p.add_argument(
        "--archive",
        metavar="s3://BUCKET/PREFIX",
        help="the S3 archive of the database (what `archive --bucket` writes): "
        "a new replica, or one behind the topic's retention, first restores from it, then continues from "
        "Kafka. The endpoint and credentials come from boto3's standard settings (AWS_ENDPOINT_URL_S3, ...)",
    )
    p.add_argument("--endpoint-url", help="S3 endpoint of --archive, overriding AWS_ENDPOINT_URL_S3")
    p.add_argument(
        "--min-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="fetch at most every S seconds while the stream is slow (the broker holds a fetch until S "
        "passed or 1 MiB is ready): fewer, larger group commits, so less CPU and fewer fsyncs, for up to S "
        "more lag; a backlog still comes at full speed (default 0: apply each txn as it arrives; at most 10)",
    )
    add_kafka(p)
    add_encryption(p)
    return p


def _replica(args: argparse.Namespace) -> int:
    from connectors.kafka.reader import TopicSource
    from connectors.kafka.topics import topic_for
    from connectors.picolisp.replica import ReplicaDir

    if not 0 <= args.min_interval <= 10:
        fail("--min-interval takes 0 to 10 seconds", EXIT_USAGE)
    if args.pattern or args.root:
        if not (args.pattern and args.root) or args.database or args.target:
            fail("--pattern and --root go together, instead of --database/--target", EXIT_USAGE)
        return _replica_group(args)
    codec = Codec(load_schemas(), keyring=args.keyring)
    # Group commit: each txn is verified on its own, and what is already fetched is committed together.
    sink = ReplicaDir(args.target, args.database, args.blob, topic=topic_for(args.database), group_commit=True)
    progress = Progress(f"replica {args.database} ({args.group})")

    def attempt() -> int:
        if not topic_ready(args.kafka, args.database, args.once, f"replica {args.database}"):
            return 0
        start = _start_offset(
            args.kafka, args.database, codec, sink, args.skip_to_snapshot, args.archive, args.endpoint_url
        )
        print(f"replica {args.database}: at {sink.position()}, reading from offset {start}", flush=True)
        source = TopicSource(
            args.kafka, args.database, codec, args.group, start, once=args.once, min_interval=args.min_interval
        )
        if sink.position().txn_id > 0:  # the group offset shows where the replica really is, not a stale one
            source.offsets.at(source.tp, start, sink.position().txn_id, sink.source_time_ms)
        try:
            final = replicate(source, sink, on_applied=progress)
        except PipelineError as exc:
            if exc.retriable:
                raise
            behind = _overtaken(args.kafka, args.database, sink, args.archive)
            if behind is None:
                raise
            raise behind from exc
        finally:
            source.close()
        print(f"replica {args.database}: at {final}", flush=True)
        return 0

    try:
        return with_retries(f"replica {args.database}", attempt, kafka=args.kafka)
    finally:
        sink.close()


def _start_offset(
    kafka: KafkaSettings,
    database: str,
    codec: Codec,
    sink: ReplicaDir,
    skip: bool = False,
    archive: str | None = None,
    endpoint_url: str | None = None,
) -> int:
    """Where a replica reads from: its stored position; for an empty one the archive's end (with
    --archive) or else the newest snapshot in the topic; for one behind the topic's retention, the
    archive's end (with --archive) or else an error saying so."""
    from connectors.kafka.topics import latest_snapshot, offset_range, topic_for

    at = sink.position().txn_id
    if at > 0 and skip:
        return skip_to_snapshot(kafka, database, codec, sink.next_offset, at, "replica")
    first, end = offset_range(kafka, database)
    if at > 0 and (start := _seam(kafka, database, codec, sink, first, end)) is not None:
        return start
    if at > 0 and archive is None:
        raise PipelineError(
            f"replica {database} is at txn {at} and needs offset {sink.next_offset}, but topic "
            f"{topic_for(database)} now starts at offset {first} (retention deleted the records between): "
            "run it with --archive s3://BUCKET/PREFIX (the archive of this database) to catch up from S3",
            database=database,
            txn_id=at,
            offset=sink.next_offset,
        )
    if archive is not None and _from_archive(archive, database, codec, sink, endpoint_url):
        start = _seam(kafka, database, codec, sink, first, end)
        if start is None:
            raise PipelineError(
                f"replica {database}: the archive {archive} ends at txn {sink.position().txn_id} (Kafka offset "
                f"{sink.next_offset - 1}), but topic {topic_for(database)} now starts at offset {first}, after "
                f"txn {sink.position().txn_id + 1} began: the txns between are in neither. Is the archiver "
                "running (`archive --database ...`)? Once it has caught up, or after `capture-agent --snapshot`, "
                "start again",
                database=database,
                txn_id=sink.position().txn_id,
                offset=sink.next_offset,
            )
        return start
    if sink.position().txn_id > 0:  # the archive does not hold the txn after this replica's
        raise PipelineError(
            f"replica {database} is at txn {sink.position().txn_id} and needs offset {sink.next_offset}, but "
            f"topic {topic_for(database)} now starts at offset {first} and the archive {archive} holds no txn "
            f"{sink.position().txn_id + 1} (see `archive ls`): start a new, empty replica with --archive",
            database=database,
            txn_id=sink.position().txn_id,
            offset=sink.next_offset,
        )
    snapshot = latest_snapshot(kafka, database, codec)
    if snapshot is None:
        if first > 0:
            fix = (
                "run with --archive s3://BUCKET/PREFIX to start from the S3 archive"
                if archive is None
                else f"the archive {archive} holds nothing restorable yet either: let `archive` catch up"
            )
            raise PipelineError(
                f"replica {database}: topic {topic_for(database)} no longer holds a snapshot to start from (it "
                f"starts at offset {first}; retention deleted the first): {fix}, or publish a snapshot with "
                "`capture-agent --snapshot`",
                database=database,
                offset=first,
            )
        return 0
    print(
        f"replica {database}: empty, starting at the newest snapshot (txn {snapshot[0]}, offset {snapshot[1]})",
        flush=True,
    )
    return snapshot[1]


def _overtaken(kafka: KafkaSettings, database: str, sink: ReplicaDir, archive: str | None) -> PipelineError | None:
    """If retention deleted the replica's next records while it was reading, the error to report instead
    of the gap the consumer then saw (it jumps to the first offset): with --archive a retriable one, so
    the next attempt catches up from the archive; None if the topic still holds them."""
    from connectors.kafka.topics import offset_range, topic_for

    first, _ = offset_range(kafka, database)
    if sink.next_offset >= first:
        return None
    at = sink.position().txn_id
    what = (
        f"replica {database} is at txn {at} and needs offset {sink.next_offset}, but retention deleted the "
        f"records of topic {topic_for(database)} before offset {first} while it was reading"
    )
    if archive is None:
        return PipelineError(
            f"{what}: run it with --archive s3://BUCKET/PREFIX to catch up from the S3 archive",
            database=database,
            txn_id=at,
            offset=sink.next_offset,
        )
    return PipelineError(
        f"{what}; catching up from the archive {archive}", database=database, txn_id=at, retriable=True
    )


def _seam(kafka: KafkaSettings, database: str, codec: Codec, sink: ReplicaDir, first: int, end: int) -> int | None:
    """The offset to continue the replica's txn from, or None if the topic no longer holds its next txn.

    Retention may have cut just past the replica's last commit (its marker, say): what counts is that
    the topic still holds the next txn from its beginning. replicate() then checks its checksum."""
    from connectors.kafka.topics import first_txn_from

    if sink.next_offset >= first:
        return sink.next_offset
    if first >= end:
        return first  # nothing left to compare with: the next txn to arrive is checked by replicate()
    found = first_txn_from(kafka, database, codec, first)
    return found[1] if found is not None and found[0] == sink.position().txn_id + 1 else None


def _from_archive(archive: str, database: str, codec: Codec, sink: ReplicaDir, endpoint_url: str | None = None) -> bool:
    """Restore what the replica lacks from the S3 archive; False if the archive holds nothing it can use."""
    from connectors.kafka.topics import topic_for
    from connectors.s3.restore import bootstrap
    from connectors.s3.store import open_store
    from pool_pipeline.cli.restore import _TransferProgress

    before = sink.position().txn_id
    what = "empty" if before == 0 else f"at txn {before}"
    print(f"replica {database}: {what}, restoring from the archive {archive}", flush=True)
    progress = _TransferProgress(f"replica {database}: from the archive")
    position = bootstrap(
        open_store(archive, database, endpoint_url), codec, sink, topic_for(database), progress=progress
    )
    if progress.txns or progress.done:
        progress.draw(end="\n")
    if position is None:
        print(f"replica {database}: the archive {archive} holds nothing to start from", flush=True)
        return False
    if position.txn_id == before:
        print(f"replica {database}: the archive {archive} holds nothing after txn {before}", flush=True)
        return True
    print(
        f"replica {database}: restored txns {before + 1}..{position.txn_id} from the archive; continuing "
        f"from Kafka at offset {sink.next_offset}",
        flush=True,
    )
    return True


def _replica_group(args: argparse.Namespace) -> int:
    """Many databases in one consumer group: Kafka spreads them over the members."""
    from connectors.kafka.reader import GroupReader
    from connectors.kafka.topics import topic_for
    from connectors.picolisp.replica import ReplicaDir

    codec = Codec(load_schemas(), keyring=args.keyring)
    root = Path(args.root)
    sinks: dict[str, ReplicaDir] = {}
    progress: dict[str, Progress] = {}

    def sink_for(database: str) -> ReplicaDir:
        if database not in sinks:
            sinks[database] = ReplicaDir(
                f"{root / database / 'db'}/",
                database,
                root / database / "blob",
                topic=topic_for(database),
                group_commit=True,
            )
            progress[database] = Progress(f"replica {database} ({args.group})")
            print(f"replica {database}: assigned; at {sinks[database].position()}", flush=True)
        return sinks[database]

    busy: list[str] = []  # the database being applied right now
    revoked: set[str] = set()

    def release(database: str) -> None:
        """Kafka moved the database to another member: close its replica so the new owner can lock it."""
        if database in busy:
            revoked.add(database)  # closed once its current step ends
        elif database in sinks:
            sinks.pop(database).close()
            print(f"replica {database}: moved to another member of {args.group}", flush=True)

    def attempt() -> int:
        reader = GroupReader(
            args.kafka,
            args.group,
            args.pattern,
            codec,
            lambda db: _start_offset(
                args.kafka, db, codec, sink_for(db), args.skip_to_snapshot, args.archive, args.endpoint_url
            ),
            once=args.once,
            on_revoked=release,
            log=lambda line: print(line, file=sys.stderr, flush=True),
            min_interval=args.min_interval,
        )

        def step(source: PartitionSource) -> None:
            sink = sink_for(source.database)
            try:
                replicate(source, sink, on_applied=progress[source.database])
            except PipelineError as exc:
                behind = None if exc.retriable else _overtaken(args.kafka, source.database, sink, args.archive)
                if behind is None:
                    raise
                if not behind.retriable:
                    raise behind from exc
                print(f"replica {source.database}: {behind}", file=sys.stderr, flush=True)
                reader.restart(source.database)  # its next start catches up from the archive

        try:
            for source in reader.sources():
                busy[:] = [source.database]
                _guarded(reader, source.database, lambda: step(source), None)  # noqa: B023 - called at once
                busy.clear()
                for database in list(revoked):
                    revoked.discard(database)
                    release(database)
        finally:
            reader.close()
        for db, sink in sorted(sinks.items()):
            print(f"replica {db}: at {sink.position()}", flush=True)
        if reader.failed:
            print(f"replica: stopped databases: {', '.join(sorted(reader.failed))}", file=sys.stderr)
            return 1
        return 0

    try:
        return with_retries(f"replica group {args.group}", attempt, kafka=args.kafka)
    finally:
        for sink in sinks.values():
            sink.close()


def _guarded(reader: object, database: str, fn: Callable[[], object], default: object) -> object:
    """Run one database's step; a non-retriable error stops that database only, with its message."""
    try:
        return fn()
    except PipelineError as exc:
        if exc.retriable:
            print(f"replica {database}: {exc} (will retry)", file=sys.stderr, flush=True)
            return default
        print(f"error: replica {database} stopped: {exc}", file=sys.stderr, flush=True)
        reader.fail(database)  # type: ignore[attr-defined]
        return default


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(_replica, parse(replica_parser(), argv))
