"""`capture-agent`: publish every committed change of a PicoLisp pool to its Kafka topic."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pipeline.codec import Codec
from pipeline.model import Position, check_database_name
from pipeline.replicate import replicate
from pool_pipeline.cli.common import (
    EXIT_USAGE,
    Progress,
    add_encryption,
    add_kafka,
    duration_ms,
    fail,
    parse,
    run,
    with_retries,
)
from schemas import load_schemas


def capture_agent_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capture-agent",
        description="Publish every committed change of a PicoLisp pool to Kafka topic pool.<database>.",
    )
    p.add_argument("--pool", required=True, help="pool prefix, e.g. db/app/ (files db/app/@, db/app/A, ...)")
    p.add_argument("--journal", required=True, help="the pool's replication journal, e.g. fifo/app")
    p.add_argument("--blob", help="the pool's blob directory (*Blob), e.g. blob/app/")
    p.add_argument("--database", help="database name (default: last component of --pool)")
    add_kafka(p)
    add_encryption(p, reader=False)
    p.add_argument("--replication-factor", type=int, default=1, help="for a topic the agent creates (default 1)")
    p.add_argument("--min-insync-replicas", type=int, default=1, help="for a topic the agent creates (default 1)")
    p.add_argument(
        "--retention",
        type=duration_ms,
        default=-1,
        metavar="DURATION|infinite",
        help="how long a topic the agent creates keeps records, e.g. 7d, 12h, 90m (default infinite). "
        'Finite is safe only with an archive running: README "Retention"',
    )
    p.add_argument(
        "--kafka-timeout",
        type=float,
        default=10.0,
        help="seconds any one Kafka step (send, flush, commit, abort) may wait before the producer is "
        "rebuilt and the round retried from the spool (default 10)",
    )
    p.add_argument("--snapshot", action="store_true", help="publish a full snapshot before streaming")
    p.add_argument("--once", action="store_true", help="publish what is pending, then exit")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=0.02,
        help="seconds between journal polls where inotify is not available (default 0.02); with inotify "
        "the agent wakes at each write of the app, and looks anyway once a second",
    )
    p.add_argument(
        "--min-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="start a round (one Kafka transaction) at most every N seconds: fewer, larger transactions "
        "cost less CPU on this machine and on the brokers, at the price of up to N s more lag "
        "(default 0: publish each commit as soon as it is seen; see README 'Performance')",
    )
    p.add_argument("--state-dir", help="lock file and blob spool (default: <journal>.agent/)")
    return p


def _capture(args: argparse.Namespace) -> int:
    from connectors.kafka.publisher import TopicSink
    from connectors.kafka.topics import ensure_topic, last_commit, topic_for
    from connectors.picolisp.source import AgentLock, PoolSource, wait_for_pool

    database = args.database or Path(args.pool.rstrip("/")).name
    check_database_name(database)
    if not 0 <= args.min_interval <= 60:
        fail("--min-interval takes 0 to 60 seconds", EXIT_USAGE)
    # Started before the app: wait for its pool and journal, creating nothing (no topic, lock, state dir).
    if not wait_for_pool(
        args.pool, Path(args.journal), database, once=args.once, log=lambda line: print(line, flush=True)
    ):
        return 0
    codec = Codec(load_schemas(), keyring=args.keyring)
    state_dir = Path(args.state_dir or f"{args.journal.rstrip('/')}.agent")
    lock = AgentLock(state_dir, database, journal=Path(args.journal))
    progress = Progress(f"capture-agent {database}")

    def attempt() -> int:
        if ensure_topic(
            args.kafka,
            topic_for(database),
            replication_factor=args.replication_factor,
            min_insync_replicas=args.min_insync_replicas,
            retention_ms=args.retention,
            log=lambda line: print(line, flush=True),
        ):
            kept = "infinite" if args.retention < 0 else f"{args.retention / 3_600_000:g} h"
            print(
                f"created topic {topic_for(database)} (RF {args.replication_factor}, "
                f"min.insync.replicas {args.min_insync_replicas}, retention {kept})",
                flush=True,
            )
        # init_transactions fences older agents, and settles what a failed producer of ours left open
        sink = TopicSink(args.kafka, database, codec, timeout_s=args.kafka_timeout)
        source = None
        try:
            last = last_commit(args.kafka, database, codec)
            position, layout = (last[0], last[1]) if last else (Position(0, 0), None)
            sink.set_position(position)
            print(f"capture-agent {database}: topic is at {position}", flush=True)
            source = PoolSource(
                args.pool,
                Path(args.journal),
                Path(args.blob) if args.blob else None,
                database,
                state_dir,
                last_layout=layout,
                force_snapshot=args.snapshot,
                once=args.once,
                poll_interval=args.poll_interval,
                min_interval=args.min_interval,
            )
            final = replicate(source, sink, on_applied=progress)
            print(f"capture-agent {database}: published up to {final}", flush=True)
            return 0
        finally:
            if source is not None:
                source.close()
            sink.close()

    try:
        return with_retries(f"capture-agent {database}", attempt, kafka=args.kafka)
    finally:
        lock.release()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(_capture, parse(capture_agent_parser(), argv))
