"""Console entry points: parse options (defaults from the environment), build connectors, run the loop."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn, Sequence

from pipeline.codec import Codec
from pipeline.errors import PipelineError
from pipeline.model import Position, Transaction, check_database_name
from pipeline.replicate import replicate
from schemas import load_schemas

if TYPE_CHECKING:
    from connectors.replica_dir import ReplicaDir

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
    # SIGTERM stops like Ctrl-C; every step is crash-safe, so stopping anywhere is fine.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
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
    return _status(args)


def _status(args: argparse.Namespace) -> int:
    from connectors.kafka import status

    rows = status(args.bootstrap_servers, Codec(load_schemas()), args.database)
    if not rows:
        print(f"no database topics (pool.*) on {args.bootstrap_servers}")
        return 0

    def fmt_bytes(n: int | None) -> str:
        if n is None:
            return ">64MiB"
        return f"{n}B" if n < 1024 else f"{n / 1024:.1f}KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f}MiB"

    print(f"{'database':<16} {'captured':>9} {'group':<18} {'applied':>9} {'lag txns':>9} {'lag bytes':>10} {'lag s':>7}")
    for row in rows:
        when = time.strftime("%H:%M:%S", time.localtime(row["captured_time_ms"] / 1000)) if row["captured_time_ms"] else "-"
        print(f"{row['database']:<16} {row['captured_txn']:>9} (last capture {when})")
        for g in row["groups"]:
            lag_s = f"{g['lag_seconds']:.1f}" if g["lag_seconds"] is not None else "-"
            print(f"{'':<16} {'':>9} {g['group']:<18} {str(g['applied_txn']):>9} {str(g['lag_txns']):>9} "
                  f"{fmt_bytes(g['lag_bytes']):>10} {lag_s:>7}")
    return 0


class _Progress:
    """Prints one status line every `every` seconds rather than one per transaction."""

    def __init__(self, label: str, every: float = 2.0) -> None:
        self.label, self.every = label, every
        self.last_print = time.monotonic()
        self.txns = 0
        self.last_txn = 0

    def __call__(self, txn: Transaction, extra: str = "") -> None:
        self.txns += 1
        self.last_txn = txn.txn_id
        now = time.monotonic()
        if now - self.last_print >= self.every:
            rate = self.txns / (now - self.last_print)
            lag_ms = max(0, int(time.time() * 1000) - txn.source_time_ms)
            print(f"{self.label}: txn {txn.txn_id} ({rate:.0f} txn/s, {lag_ms} ms behind the source){extra}",
                  flush=True)
            self.last_print, self.txns = now, 0


def _with_retries(what: str, attempt: Callable[[], int], *, max_backoff: float = 30.0) -> int:
    """Run `attempt`; on a retriable PipelineError wait (capped exponential backoff) and run it again."""
    delay = 0.5
    while True:
        started = time.monotonic()
        try:
            return attempt()
        except PipelineError as exc:
            if not exc.retriable:
                raise
            if time.monotonic() - started > 60:
                delay = 0.5  # it ran fine for a while: this is a new outage
            print(f"{what}: {exc} — retrying in {delay:.1f} s", file=sys.stderr, flush=True)
            time.sleep(delay)
            delay = min(max_backoff, delay * 2)


def _capture(args: argparse.Namespace) -> int:
    from connectors.kafka import TopicSink, ensure_topic, last_commit, topic_for
    from connectors.pool_source import AgentLock, PoolSource

    database = args.database or Path(args.pool.rstrip("/")).name
    check_database_name(database)
    codec = Codec(load_schemas())
    state_dir = Path(args.state_dir or f"{args.journal.rstrip('/')}.agent")
    lock = AgentLock(state_dir, database, journal=Path(args.journal))
    progress = _Progress(f"capture-agent {database}")

    def attempt() -> int:
        if ensure_topic(args.bootstrap_servers, topic_for(database),
                        replication_factor=args.replication_factor, min_insync_replicas=args.min_insync_replicas):
            print(f"created topic {topic_for(database)} (RF {args.replication_factor}, "
                  f"min.insync.replicas {args.min_insync_replicas})", flush=True)
        sink = TopicSink(args.bootstrap_servers, database, codec)  # init_transactions fences older agents
        source = None
        try:
            last = last_commit(args.bootstrap_servers, database, codec)
            position, layout = (last[0], last[1]) if last else (Position(0, 0), None)
            sink.set_position(position)
            print(f"capture-agent {database}: topic is at {position}", flush=True)
            source = PoolSource(args.pool, Path(args.journal), Path(args.blob) if args.blob else None, database,
                                state_dir, last_layout=layout, force_snapshot=args.snapshot, once=args.once,
                                poll_interval=args.poll_interval)
            final = replicate(source, sink, on_applied=progress)
            print(f"capture-agent {database}: published up to {final}", flush=True)
            return 0
        finally:
            if source is not None:
                source.close()
            sink.close()

    try:
        return _with_retries(f"capture-agent {database}", attempt)
    finally:
        lock.release()


def _replica(args: argparse.Namespace) -> int:
    from connectors.kafka import TopicSource, topic_for
    from connectors.replica_dir import ReplicaDir

    if args.pattern or args.root:
        if not (args.pattern and args.root) or args.database or args.target:
            _fail("--pattern and --root go together, instead of --database/--target", EXIT_USAGE)
        return _replica_group(args)
    codec = Codec(load_schemas())
    sink = ReplicaDir(args.target, args.database, args.blob, topic=topic_for(args.database))
    progress = _Progress(f"replica {args.database} ({args.group})")

    def attempt() -> int:
        start = _start_offset(args.bootstrap_servers, args.database, codec, sink)
        print(f"replica {args.database}: at {sink.position()}, reading from offset {start}", flush=True)
        source = TopicSource(args.bootstrap_servers, args.database, codec, args.group, start, once=args.once)
        try:
            final = replicate(source, sink, on_applied=progress)
        finally:
            source.close()
        print(f"replica {args.database}: at {final}", flush=True)
        return 0

    try:
        return _with_retries(f"replica {args.database}", attempt)
    finally:
        sink.close()


def _start_offset(bootstrap: str, database: str, codec: Codec, sink: ReplicaDir) -> int:
    """Where a replica reads from: its stored position, or for an empty one the newest snapshot."""
    from connectors.kafka import latest_snapshot

    if sink.position().txn_id > 0:
        return sink.next_offset
    snapshot = latest_snapshot(bootstrap, database, codec)
    if snapshot is None:
        return 0
    print(f"replica {database}: empty, starting at the newest snapshot (txn {snapshot[0]}, offset {snapshot[1]})",
          flush=True)
    return snapshot[1]


def _replica_group(args: argparse.Namespace) -> int:
    """Many databases in one consumer group: Kafka spreads them over the members."""
    from connectors.kafka import GroupReader, topic_for
    from connectors.replica_dir import ReplicaDir

    codec = Codec(load_schemas())
    root = Path(args.root)
    sinks: dict[str, ReplicaDir] = {}
    progress: dict[str, _Progress] = {}

    def sink_for(database: str) -> ReplicaDir:
        if database not in sinks:
            sinks[database] = ReplicaDir(f"{root / database / 'db'}/", database, root / database / "blob",
                                         topic=topic_for(database))
            progress[database] = _Progress(f"replica {database} ({args.group})")
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
        reader = GroupReader(args.bootstrap_servers, args.group, args.pattern, codec,
                             lambda db: _start_offset(args.bootstrap_servers, db, codec, sink_for(db)),
                             once=args.once, on_revoked=release,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
        try:
            for source in reader.sources():
                busy[:] = [source.database]
                _guarded(reader, source.database,
                         lambda: replicate(source, sink_for(source.database), on_applied=progress[source.database]),
                         None)
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
        return _with_retries(f"replica group {args.group}", attempt)
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


def _verify(args: argparse.Namespace) -> int:
    from connectors.picolisp import blob_tree, compare_blob_trees, compare_pools, pool_files

    diffs = compare_pools(args.pool, args.replica)
    checked = f"{len(pool_files(args.pool))} pool files"
    if args.blob or args.replica_blob:
        if not (args.blob and args.replica_blob):
            _fail("give both --blob and --replica-blob to compare blobs", EXIT_USAGE)
        diffs += compare_blob_trees(args.blob, args.replica_blob)
        checked += f" and {len(blob_tree(Path(args.blob)))} blobs"
    for line in diffs:
        print(f"DIFFERENT: {line}")
    if diffs:
        print(f"verify: {args.replica} differs from {args.pool} ({len(diffs)} difference(s))")
        return 1
    print(f"verify: identical: {checked} (md5 per file)")
    return 0


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(argv)


def capture_agent(argv: Sequence[str] | None = None) -> NoReturn:
    _run(_capture, _parse(capture_agent_parser(), argv))


def replica(argv: Sequence[str] | None = None) -> NoReturn:
    _run(_replica, _parse(replica_parser(), argv))


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
    _run(_verify, _parse(verify_parser(), argv))


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
