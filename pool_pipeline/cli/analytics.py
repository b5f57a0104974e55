"""`analytics`: per-window statistics of change streams, written exactly once."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from pipeline.codec import Codec
from pipeline.model import check_database_name
from pool_pipeline.cli.common import (
    EXIT_USAGE,
    add_encryption,
    add_kafka,
    fail,
    parse,
    run,
    topic_ready,
    with_retries,
)
from schemas import load_schemas


def analytics_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="analytics",
        description="Per-window statistics of change streams, written exactly once to <db topic>.stats "
        "(Avro WindowStats) and optionally to a SQLite file. Windows are by source time, "
        "so a replay gives identical records; a window is written once a later one starts.",
    )
    p.add_argument("--database", help="database to analyse")
    p.add_argument("--pattern", help="regex of databases; the group's members share them")
    p.add_argument("--group", default="analytics", help="consumer group (default analytics)")
    p.add_argument("--window", type=float, default=60.0, help="window length in seconds (default 60)")
    p.add_argument("--top-blocks", type=int, default=10, help="hottest blocks kept per window (default 10)")
    p.add_argument(
        "--stats-topic",
        default="{topic}.stats",
        help="output topic; {topic} and {database} are replaced; must end in .stats (default {topic}.stats)",
    )
    p.add_argument("--sqlite", metavar="PATH", help="also write windows (with their offsets) to this SQLite file")
    p.add_argument("--no-stats-topic", action="store_true", help="write only to --sqlite")
    p.add_argument("--once", action="store_true", help="catch up to the current end, then exit")
    p.add_argument(
        "--instance-id",
        help="static group member id (unique per process): a restarted member gets "
        "its databases back at once (default with --database: the database)",
    )
    add_kafka(p)
    add_encryption(p)
    return p


def _analytics(args: argparse.Namespace) -> int:
    from pool_pipeline.analytics import Analytics
    from pool_pipeline.changes import ChangeStream

    if bool(args.database) == bool(args.pattern):
        fail("give --database or --pattern", EXIT_USAGE)
    if args.no_stats_topic and not args.sqlite:
        fail("--no-stats-topic needs --sqlite", EXIT_USAGE)
    if args.window <= 0 or args.top_blocks < 0:
        fail("--window must be > 0 and --top-blocks >= 0", EXIT_USAGE)
    if args.database:
        check_database_name(args.database)
    what = f"analytics {args.database or args.pattern} ({args.group})"

    def attempt() -> int:
        if args.database and not topic_ready(args.kafka, args.database, args.once, what):
            return 0
        # With one database there is one member: static membership lets it restart without waiting
        # for its dead predecessor's session to time out.
        stream = ChangeStream(
            args.kafka,
            args.group,
            databases=[args.database] if args.database else None,
            pattern=args.pattern,
            once=args.once,
            instance_id=args.instance_id or args.database,
            batches=True,
            codec=Codec(load_schemas(), keyring=args.keyring),
        )  # statistics only count blocks: no object per block
        consumer = None
        try:
            consumer = Analytics(
                stream,
                window_ms=max(1, round(args.window * 1000)),
                top_blocks=args.top_blocks,
                to_kafka=not args.no_stats_topic,
                stats_topic_template=args.stats_topic,
                sqlite_path=args.sqlite,
                log=lambda line: print(line, flush=True),
            )
            written = consumer.run()
            print(f"{what}: {written} windows written, {consumer.txns} txns read", flush=True)
            return 0
        finally:
            if consumer is not None:
                consumer.close()
            stream.close()

    return with_retries(what, attempt, kafka=args.kafka)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(_analytics, parse(analytics_parser(), argv))
