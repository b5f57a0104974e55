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
    add_kafka(p)
    add_encryption(p)
    return p


def _replica(args: argparse.Namespace) -> int:
    from connectors.kafka.reader import TopicSource
    from connectors.kafka.topics import topic_for
    from connectors.picolisp.replica import ReplicaDir

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
        start = _start_offset(args.kafka, args.database, codec, sink, args.skip_to_snapshot)
        print(f"replica {args.database}: at {sink.position()}, reading from offset {start}", flush=True)
        source = TopicSource(args.kafka, args.database, codec, args.group, start, once=args.once)
        if sink.position().txn_id > 0:  # the group offset shows where the replica really is, not a stale one
            source.offsets.at(source.tp, start, sink.position().txn_id, sink.source_time_ms)
        try:
            final = replicate(source, sink, on_applied=progress)
        finally:
            source.close()
        print(f"replica {args.database}: at {final}", flush=True)
        return 0

    try:
        return with_retries(f"replica {args.database}", attempt, kafka=args.kafka)
    finally:
        sink.close()


def _start_offset(kafka: KafkaSettings, database: str, codec: Codec, sink: ReplicaDir, skip: bool = False) -> int:
    """Where a replica reads from: its stored position, or for an empty one the newest snapshot."""
    from connectors.kafka.topics import latest_snapshot

    if sink.position().txn_id > 0 and skip:
        return skip_to_snapshot(kafka, database, codec, sink.next_offset, sink.position().txn_id, "replica")
    if sink.position().txn_id > 0:
        return sink.next_offset
    snapshot = latest_snapshot(kafka, database, codec)
    if snapshot is None:
        return 0
    print(
        f"replica {database}: empty, starting at the newest snapshot (txn {snapshot[0]}, offset {snapshot[1]})",
        flush=True,
    )
    return snapshot[1]


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
            lambda db: _start_offset(args.kafka, db, codec, sink_for(db), args.skip_to_snapshot),
            once=args.once,
            on_revoked=release,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        try:
            for source in reader.sources():
                busy[:] = [source.database]
                _guarded(
                    reader,
                    source.database,
                    lambda: replicate(source, sink_for(source.database), on_applied=progress[source.database]),  # noqa: B023 - called at once
                    None,
                )
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
