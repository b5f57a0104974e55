"""Console entry points: parse options (defaults from the environment), build connectors, run the loop."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from pipeline.errors import PipelineError

EXIT_USAGE = 2


def _bootstrap_default() -> str:
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


def _add_kafka(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap-servers",
        default=_bootstrap_default(),
        help="Kafka brokers, host:port[,host:port] (default: $KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092)",
    )


def _dev_state_dir() -> Path:
    return Path(os.environ.get("POOL_PIPELINE_HOME", Path.home() / ".local/state/pool-pipeline")) / "dev"


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _not_implemented(command: str) -> NoReturn:
    _fail(f"{command}: not implemented yet", EXIT_USAGE)


def _run(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> NoReturn:
    """Run a command; turn pipeline errors into one clear line and an exit code."""
    try:
        code = fn(args)
    except PipelineError as exc:
        _fail(str(exc), 3 if exc.retriable else 1)
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


# --- parsers: one per console script --------------------------------------------------------------


def capture_agent_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capture-agent",
        description="Publish every committed change of a PicoLisp pool to Kafka topic pool.<database>.",
    )
    p.add_argument("--pool", required=True, help="pool prefix, e.g. db/app/ (files db/app/@, db/app/A, ...)")
    p.add_argument("--journal", required=True, help="the pool's replication journal, e.g. fifo/app")
    p.add_argument("--blob", help="the pool's blob directory (*Blob), e.g. blob/app/")
    p.add_argument("--database", help="database name (default: last component of --pool)")
    _add_kafka(p)
    p.add_argument("--replication-factor", type=int, default=1, help="for a topic the agent creates (default 1)")
    p.add_argument("--min-insync-replicas", type=int, default=1, help="for a topic the agent creates (default 1)")
    p.add_argument("--snapshot", action="store_true", help="publish a full snapshot before streaming")
    p.add_argument("--once", action="store_true", help="publish what is pending, then exit")
    p.add_argument("--poll-interval", type=float, default=0.02, help="seconds between journal polls")
    p.add_argument("--state-dir", help="lock file and blob spool (default: <journal>.agent/)")
    return p


def replica_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="replica", description="Materialise a byte-identical replica of a pool.")
    p.add_argument("--database", help="database to replicate")
    p.add_argument("--target", help="replica pool directory, e.g. rpl/db/app/")
    p.add_argument("--blob", help="replica blob directory")
    p.add_argument("--group", default="replica", help="consumer group (one per replica set)")
    p.add_argument("--pattern", help="regex of databases to replicate (with --root)")
    p.add_argument("--root", help="with --pattern: one directory per database under this root")
    p.add_argument("--once", action="store_true", help="catch up to the current end, then exit")
    _add_kafka(p)
    return p


def archive_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archive", description="Archive a database's change stream to S3, exactly once.")
    p.add_argument("--database", required=True)
    p.add_argument("--bucket", required=True, help="s3://bucket/prefix")
    p.add_argument("--group", default="archive")
    _add_kafka(p)
    return p


def analytics_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analytics", description="Per-window statistics of a change stream.")
    p.add_argument("--database", required=True)
    p.add_argument("--group", default="analytics")
    _add_kafka(p)
    return p


def restore_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="restore", description="Restore a pool from the S3 archive.")
    p.add_argument("--bucket", required=True)
    p.add_argument("--database", required=True)
    p.add_argument("--target")
    p.add_argument("--txn", type=int)
    p.add_argument("--time")
    p.add_argument("--list", action="store_true")
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verify", description="Compare a replica with its source, file by file.")
    p.add_argument("--pool", required=True, help="source pool prefix")
    p.add_argument("--replica", required=True, help="replica pool prefix")
    p.add_argument("--blob", help="source blob directory")
    p.add_argument("--replica-blob", help="replica blob directory")
    return p


def pipeline_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description="pool-pipeline administration.")
    sub = p.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="a local Kafka + S3 stack as real processes (no Docker)")
    dev_sub = dev.add_subparsers(dest="action", required=True)
    up = dev_sub.add_parser("up", help="start the stack (idempotent)")
    up.add_argument("--brokers", type=int, choices=(1, 3), default=1)
    up.add_argument("--kafka-port", type=int, default=9092)
    up.add_argument("--s3-port", type=int, default=8333)
    for name in ("status", "down", "env"):
        dev_sub.add_parser(name)
    for q in dev_sub.choices.values():
        q.add_argument("--state-dir", type=Path, default=_dev_state_dir(), help="where the stack keeps its data")
    status = sub.add_parser("status", help="per database: last captured txn, and each group's applied txn and lag")
    status.add_argument("--database", action="append", help="only these databases (repeatable)")
    _add_kafka(status)
    return p


# --- commands ----------------------------------------------------------------------------------


def _dev(args: argparse.Namespace) -> int:
    from connectors import localstack

    try:
        if args.action == "up":
            info = localstack.dev_up(args.state_dir, brokers=args.brokers, kafka_port=args.kafka_port, s3_port=args.s3_port)
            print(f"kafka:  {info['bootstrap_servers']} ({info['brokers']} broker(s))")
            print(f"s3:     {info['s3_endpoint']} bucket {info['bucket']}")
            print('use it:  eval "$(pipeline dev env)"')
        elif args.action == "status":
            print(json.dumps(localstack.dev_status(args.state_dir), indent=2))
        elif args.action == "down":
            localstack.dev_down(args.state_dir)
        elif args.action == "env":
            status = localstack.dev_status(args.state_dir)
            if not status.get("running"):
                _fail("the dev stack is not running: start it with `pipeline dev up`")
            print(localstack.env_exports(status["info"]))
    except localstack.StackError as exc:
        _fail(str(exc))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    if args.command == "dev":
        return _dev(args)
    _not_implemented("pipeline status")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(argv)


def capture_agent(argv: Sequence[str] | None = None) -> NoReturn:
    _parse(capture_agent_parser(), argv)
    _not_implemented("capture-agent")


def replica(argv: Sequence[str] | None = None) -> NoReturn:
    _parse(replica_parser(), argv)
    _not_implemented("replica")


def archive(argv: Sequence[str] | None = None) -> NoReturn:
    _parse(archive_parser(), argv)
    _not_implemented("archive")


def analytics(argv: Sequence[str] | None = None) -> NoReturn:
    _parse(analytics_parser(), argv)
    _not_implemented("analytics")


def restore(argv: Sequence[str] | None = None) -> NoReturn:
    _parse(restore_parser(), argv)
    _not_implemented("restore")


def verify(argv: Sequence[str] | None = None) -> NoReturn:
    _parse(verify_parser(), argv)
    _not_implemented("verify")


def pipeline_admin(argv: Sequence[str] | None = None) -> NoReturn:
    _run(_pipeline, _parse(pipeline_parser(), argv))


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "capture-agent": capture_agent_parser,
    "replica": replica_parser,
    "archive": archive_parser,
    "analytics": analytics_parser,
    "restore": restore_parser,
    "verify": verify_parser,
    "pipeline": pipeline_parser,
}
