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
    p.add_argument("--kafka-timeout", type=float, default=15.0,
                   help="seconds any one Kafka step (send, flush, commit, abort) may wait before the producer is "
                        "rebuilt and the round retried from the spool (default 15)")
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
    p.add_argument("--skip-to-snapshot", action="store_true",
                   help="the way past a bad record: start at the newest snapshot txn after the replica's position "
                        "(publish one with `capture-agent --snapshot`), skipping what lies before it")
    _add_kafka(p)
    return p


def _add_bucket(p: argparse.ArgumentParser) -> None:
    env = os.environ.get("POOL_PIPELINE_BUCKET", "").strip()
    default = env if env.startswith("s3://") else f"s3://{env}/archive" if env else None
    p.add_argument("--bucket", default=default, required=default is None,
                   help="s3://bucket/prefix (default: s3://$POOL_PIPELINE_BUCKET/archive); the endpoint and "
                        "credentials come from boto3's standard settings (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...)")
    p.add_argument("--endpoint-url", help="S3 endpoint, overriding AWS_ENDPOINT_URL_S3")


def archive_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="archive", description="Archive a database's change stream to S3 exactly once (action run, the "
        "default), list what is archived (ls), write a base snapshot now (snapshot), or apply retention (retain).")
    p.add_argument("action", nargs="?", choices=("run", "ls", "snapshot", "retain"), default="run")
    p.add_argument("--database", required=True)
    _add_bucket(p)
    p.add_argument("--group", default="archive", help="consumer group (offsets committed after each upload)")
    p.add_argument("--once", action="store_true", help="archive up to the current end (including the open "
                   "segment), then exit")
    p.add_argument("--skip-to-snapshot", action="store_true",
                   help="the way past a bad record: continue at the newest snapshot txn after the archive's end "
                        "(publish one with `capture-agent --snapshot`); `archive ls` then shows the gap")
    p.add_argument("--segment-txns", type=int, default=10_000, help="close a segment after N txns (default 10000)")
    p.add_argument("--segment-bytes", type=int, default=64 << 20, help="... or after N record bytes (default 64 MiB)")
    p.add_argument("--part-bytes", type=int,
                   help="a transaction bigger than --segment-bytes and this is uploaded in parts of N bytes while "
                   "it is still read (default 16 MiB, at least 5 MiB)")
    p.add_argument("--segment-span", type=float, default=3600.0,
                   help="... or when a txn is N seconds of source time after the segment's first (default 3600)")
    p.add_argument("--snapshot-every-txns", type=int, default=100_000,
                   help="write a base snapshot every N archived txns (0: off; default 100000)")
    p.add_argument("--snapshot-every-bytes", type=int, default=1 << 30,
                   help="... or every N archived segment bytes (0: off; default 1 GiB)")
    p.add_argument("--work-dir", help="segment spool and the materialised copy snapshots are taken from "
                   "(default: $POOL_PIPELINE_HOME/archive/<database>)")
    p.add_argument("--keep-snapshots", type=int, help="retain: keep the newest K base snapshots")
    p.add_argument("--keep-days", type=float, help="retain: keep every restore point of the last D days")
    p.add_argument("--dry-run", action="store_true", help="retain: only show what would be deleted")
    _add_kafka(p)
    return p


def analytics_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="analytics",
        description="Per-window statistics of change streams, written exactly once to <db topic>.stats "
                    "(Avro WindowStats) and optionally to a SQLite file. Windows are by source time, "
                    "so a replay gives identical records; a window is written once a later one starts.")
    p.add_argument("--database", help="database to analyse")
    p.add_argument("--pattern", help="regex of databases; the group's members share them")
    p.add_argument("--group", default="analytics", help="consumer group (default analytics)")
    p.add_argument("--window", type=float, default=60.0, help="window length in seconds (default 60)")
    p.add_argument("--top-blocks", type=int, default=10, help="hottest blocks kept per window (default 10)")
    p.add_argument("--stats-topic", default="{topic}.stats",
                   help="output topic; {topic} and {database} are replaced; must end in .stats (default {topic}.stats)")
    p.add_argument("--sqlite", metavar="PATH", help="also write windows (with their offsets) to this SQLite file")
    p.add_argument("--no-stats-topic", action="store_true", help="write only to --sqlite")
    p.add_argument("--once", action="store_true", help="catch up to the current end, then exit")
    p.add_argument("--instance-id", help="static group member id (unique per process): a restarted member gets "
                                          "its databases back at once (default with --database: the database)")
    _add_kafka(p)
    return p


def restore_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="restore", description="Restore a pool from the S3 archive as of a txn or a time (default: the "
        "newest archived txn) into TARGET/db (pool files) and TARGET/blob (blobs).")
    _add_bucket(p)
    p.add_argument("--database", required=True)
    p.add_argument("--target", help="a new or empty directory")
    at = p.add_mutually_exclusive_group()
    at.add_argument("--txn", type=int, help="restore the pool as it was after this txn")
    at.add_argument("--time", help="restore the last txn captured at or before this time: ISO 8601 "
                    "(2026-11-21T10:00:00Z; UTC when no offset is given) or ms since the epoch")
    p.add_argument("--list", action="store_true", help="list the snapshots and txn ranges held, then exit")
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verify", description="Compare a replica with its source, file by file.")
    p.add_argument("--pool", required=True, help="source pool prefix")
    p.add_argument("--replica", required=True, help="replica pool prefix")
    p.add_argument("--blob", help="source blob directory")
    p.add_argument("--replica-blob", help="replica blob directory")
    return p


def _broker_number(text: str) -> int:
    """argparse type: a broker number >= 1 (the upper bound is the stack's size, checked against stack.json)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"broker number must be an integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"broker numbers start at 1, got {n}")
    return n


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"timeout must be > 0 s, got {value}")
    return value


def pipeline_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description="pool-pipeline administration.")
    sub = p.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="a local Kafka + S3 stack as real processes (no Docker)")
    dev_sub = dev.add_subparsers(dest="action", required=True)
    up = dev_sub.add_parser("up", help="start the stack (idempotent)")
    up.add_argument("--brokers", type=int, choices=(1, 3), default=1)
    up.add_argument("--kafka-port", type=int, default=9092)
    up.add_argument("--s3-port", type=int, default=8333)
    dev_status = dev_sub.add_parser("status", help="each broker's and S3's node id, port, pid and state")
    dev_status.add_argument("--json", action="store_true", help="the full status as JSON")
    dev_sub.add_parser("down", help="stop every process of the stack, restarted brokers included")
    dev_sub.add_parser("env", help="shell exports for the stack (also while some brokers are down)")
    broker = dev_sub.add_parser("broker", help="kill, stop or restart one broker (fault tests)")
    broker_sub = broker.add_subparsers(dest="broker_action", required=True)
    for name, what in (("kill", "SIGKILL broker N"), ("stop", "stop broker N cleanly (SIGTERM)"),
                       ("start", "restart broker N with its recorded command line and wait until it is ready")):
        b = broker_sub.add_parser(name, help=what)
        b.add_argument("node", type=_broker_number, metavar="N", help="broker number, 1..brokers")
        b.add_argument("--state-dir", type=Path, default=_dev_state_dir(), help="where the stack keeps its data")
        if name != "kill":
            b.add_argument("--timeout", type=_positive_seconds, default=90.0 if name == "start" else 20.0,
                           help="seconds to wait for readiness (start) or a clean exit before SIGKILL (stop)")
    for q in dev_sub.choices.values():
        if q is not broker:
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
            status = localstack.dev_status(args.state_dir)
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                print(localstack.format_status(status), end="")
        elif args.action == "down":
            localstack.dev_down(args.state_dir)
        elif args.action == "env":
            # Only a recorded stack is needed: fault tests want the exports while brokers are down.
            status = localstack.dev_status(args.state_dir)
            if not status["recorded"]:
                _fail(f"no dev stack recorded in {args.state_dir}: start it with `pipeline dev up`")
            down = [p["name"] for p in status["processes"] if not p["alive"]]
            if down:
                print(f"warning: not running: {', '.join(down)}", file=sys.stderr)
            print(localstack.env_exports(status["info"]))
        elif args.action == "broker":
            if args.broker_action == "start":
                localstack.dev_broker_start(args.state_dir, args.node, ready_timeout=args.timeout)
            else:
                hard = args.broker_action == "kill"
                localstack.dev_broker_stop(args.state_dir, args.node, hard=hard, timeout=getattr(args, "timeout", 20.0))
    except localstack.NoSuchBroker as exc:
        _fail(str(exc), EXIT_USAGE)
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


def _with_retries(what: str, attempt: Callable[[], int], *, bootstrap_servers: str | None = None) -> int:
    """Run `attempt`; on a retriable PipelineError log why, wait (the one retry policy) and run it again.
    A step that fails part way is safe to run again: every sink stores its position with its data."""
    from connectors.faults import Backoff, retry

    explain = None
    if bootstrap_servers is not None:
        from connectors.kafka import reachability

        explain = lambda: reachability(bootstrap_servers)  # noqa: E731
    # Outages are retried every 3 s at most, so a cluster that is back is used within seconds.
    return retry(what, attempt, lambda line: print(line, file=sys.stderr, flush=True),
                 backoff=Backoff(cap=3.0), explain=explain)


def _capture(args: argparse.Namespace) -> int:
    from connectors.kafka import TopicSink, ensure_topic, last_commit, topic_for
    from connectors.pool_source import AgentLock, PoolSource, wait_for_pool

    database = args.database or Path(args.pool.rstrip("/")).name
    check_database_name(database)
    # Started before the app: wait for its pool and journal, creating nothing (no topic, lock, state dir).
    if not wait_for_pool(args.pool, Path(args.journal), database, once=args.once,
                         log=lambda line: print(line, flush=True)):
        return 0
    codec = Codec(load_schemas())
    state_dir = Path(args.state_dir or f"{args.journal.rstrip('/')}.agent")
    lock = AgentLock(state_dir, database, journal=Path(args.journal))
    progress = _Progress(f"capture-agent {database}")

    def attempt() -> int:
        if ensure_topic(args.bootstrap_servers, topic_for(database), replication_factor=args.replication_factor,
                        min_insync_replicas=args.min_insync_replicas, log=lambda line: print(line, flush=True)):
            print(f"created topic {topic_for(database)} (RF {args.replication_factor}, "
                  f"min.insync.replicas {args.min_insync_replicas})", flush=True)
        # init_transactions fences older agents, and settles what a failed producer of ours left open
        sink = TopicSink(args.bootstrap_servers, database, codec, timeout_s=args.kafka_timeout)
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
        return _with_retries(f"capture-agent {database}", attempt, bootstrap_servers=args.bootstrap_servers)
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
    # Group commit: each txn is verified on its own, and what is already fetched is committed together.
    sink = ReplicaDir(args.target, args.database, args.blob, topic=topic_for(args.database), group_commit=True)
    progress = _Progress(f"replica {args.database} ({args.group})")

    def attempt() -> int:
        if not _topic_ready(args.bootstrap_servers, args.database, args.once, f"replica {args.database}"):
            return 0
        start = _start_offset(args.bootstrap_servers, args.database, codec, sink, args.skip_to_snapshot)
        print(f"replica {args.database}: at {sink.position()}, reading from offset {start}", flush=True)
        source = TopicSource(args.bootstrap_servers, args.database, codec, args.group, start, once=args.once)
        if sink.position().txn_id > 0:  # the group offset shows where the replica really is, not a stale one
            source.offsets.at(source.tp, start, sink.position().txn_id, sink.source_time_ms)
        try:
            final = replicate(source, sink, on_applied=progress)
        finally:
            source.close()
        print(f"replica {args.database}: at {final}", flush=True)
        return 0

    try:
        return _with_retries(f"replica {args.database}", attempt, bootstrap_servers=args.bootstrap_servers)
    finally:
        sink.close()


def _topic_ready(bootstrap_servers: str, database: str, once: bool, what: str) -> bool:
    """Wait for the database's topic (only the capture-agent creates it); with --once, say so and go."""
    from connectors.kafka import topic_for, wait_for_topic

    if wait_for_topic(bootstrap_servers, database, once=once, log=lambda line: print(f"{what}: {line}", flush=True)):
        return True
    print(f"{what}: topic {topic_for(database)} does not exist yet (no capture-agent has published "
          f"{database!r}); nothing to do", flush=True)
    return False


def _start_offset(bootstrap: str, database: str, codec: Codec, sink: ReplicaDir, skip_to_snapshot: bool = False) -> int:
    """Where a replica reads from: its stored position, or for an empty one the newest snapshot."""
    from connectors.kafka import latest_snapshot

    if sink.position().txn_id > 0 and skip_to_snapshot:
        return _skip_to_snapshot(bootstrap, database, codec, sink.next_offset, sink.position().txn_id, "replica")
    if sink.position().txn_id > 0:
        return sink.next_offset
    snapshot = latest_snapshot(bootstrap, database, codec)
    if snapshot is None:
        return 0
    print(f"replica {database}: empty, starting at the newest snapshot (txn {snapshot[0]}, offset {snapshot[1]})",
          flush=True)
    return snapshot[1]


def _skip_to_snapshot(bootstrap: str, database: str, codec: Codec, next_offset: int, txn_id: int, what: str) -> int:
    """The offset of the newest snapshot txn after `next_offset`: the way past a bad record (--skip-to-snapshot)."""
    from connectors.kafka import latest_snapshot

    snapshot = latest_snapshot(bootstrap, database, codec)
    if snapshot is None or snapshot[1] < next_offset or snapshot[0] <= txn_id:
        raise PipelineError(f"{what} {database}: --skip-to-snapshot found no snapshot after offset {next_offset} "
                            f"(txn {txn_id}): publish one with `capture-agent --snapshot` first, or run without --skip-to-snapshot",
                            database=database)
    if snapshot[1] > next_offset:
        print(f"{what} {database}: skipping offsets {next_offset}..{snapshot[1] - 1} to the snapshot txn "
              f"{snapshot[0]} at offset {snapshot[1]} (--skip-to-snapshot)", flush=True)
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
                                         topic=topic_for(database), group_commit=True)
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
                             lambda db: _start_offset(args.bootstrap_servers, db, codec, sink_for(db),
                                                      args.skip_to_snapshot),
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
        return _with_retries(f"replica group {args.group}", attempt, bootstrap_servers=args.bootstrap_servers)
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


def _state_home() -> Path:
    return Path(os.environ.get("POOL_PIPELINE_HOME", Path.home() / ".local/state/pool-pipeline"))


def _archive(args: argparse.Namespace) -> int:
    from connectors.kafka import TopicSource, topic_for
    from connectors.s3 import Archiver, apply_retention, describe, open_store
    from pipeline.archive import Rotation, SnapshotPolicy

    database = check_database_name(args.database)
    store = open_store(args.bucket, database, args.endpoint_url)
    if args.action == "ls":
        print(describe(store.catalog(), store.url))
        return 0
    if args.action == "retain":
        if args.keep_snapshots is None and args.keep_days is None:
            _fail("retain needs --keep-snapshots K and/or --keep-days D", EXIT_USAGE)
        keep_ms = int(args.keep_days * 86_400_000) if args.keep_days is not None else None
        apply_retention(store, keep_snapshots=args.keep_snapshots, keep_ms=keep_ms, dry_run=args.dry_run)
        return 0
    store.ensure_bucket()
    codec = Codec(load_schemas())
    work_dir = Path(args.work_dir) if args.work_dir else _state_home() / "archive" / database
    archiver = Archiver(
        store, codec, rotation=Rotation(args.segment_txns, args.segment_bytes, int(args.segment_span * 1000)),
        snapshots=SnapshotPolicy(args.snapshot_every_txns, args.snapshot_every_bytes), work_dir=work_dir,
        topic=topic_for(database), log=lambda line: print(line, flush=True),
        **({"part_bytes": args.part_bytes} if args.part_bytes is not None else {}))
    if args.action == "snapshot":
        try:
            archiver.resume(abort_unfinished=False)  # a running archiver's upload may be in flight
            if archiver.position is None:
                _fail(f"nothing is archived for {database!r} yet: run the archiver first")
            archiver.write_snapshot(archiver.position.txn_id)
            return 0
        finally:
            archiver.close()

    def attempt() -> int:
        if not _topic_ready(args.bootstrap_servers, database, args.once, f"archive {database}"):
            return 0
        start = archiver.resume()
        if args.skip_to_snapshot and archiver.position is not None:
            start = _skip_to_snapshot(args.bootstrap_servers, database, codec, start, archiver.position.txn_id,
                                      "archive")
        held = f"up to {archiver.position}" if archiver.position else "nothing yet"
        print(f"archive {database}: {store.url} holds {held}; reading {topic_for(database)} from offset {start}",
              flush=True)
        source = TopicSource(args.bootstrap_servers, database, codec, args.group, start, once=args.once)

        def archived(txn: Transaction) -> None:  # offsets only after the upload: S3 holds the txn now
            source.acknowledge(txn)
            source.offsets.flush()

        archiver.on_archived = archived
        try:
            archiver.run(source.records())
        finally:
            source.close()
        print(f"archive {database}: archived up to {archiver.position or 'nothing'}", flush=True)
        return 0

    try:
        return _with_retries(f"archive {database}", attempt, bootstrap_servers=args.bootstrap_servers)
    finally:
        archiver.close()


def _parse_time(text: str) -> int:
    """ms since the epoch from ISO 8601 (UTC unless an offset is given) or a plain integer of ms."""
    from datetime import datetime, timezone

    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"--time {text!r}: give ISO 8601 like 2026-11-21T10:00:00Z, or ms since the epoch", EXIT_USAGE)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


class _TransferProgress:
    """A progress line for restores: bytes downloaded and the txn reached; redrawn in place on a terminal."""

    def __init__(self, label: str, stream: object = sys.stderr, every: float = 1.0) -> None:
        self.label, self.stream, self.every = label, stream, every
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.total = self.done = self.txns = 0
        self.txn = 0
        self.last = 0.0
        self.started = time.monotonic()

    def __call__(self, event: dict) -> None:
        self.total = event.get("total_bytes", self.total)
        self.done += event.get("bytes", 0)
        if "txn" in event:
            self.txn, self.txns = event["txn"], self.txns + 1
        now = time.monotonic()
        if now - self.last >= (0.1 if self.tty else self.every):
            self.last = now
            self.draw()

    def draw(self, end: str = "") -> None:
        mib = 1 << 20
        pct = f"{100 * self.done / self.total:5.1f}% " if self.total else ""
        width = 24
        bar = ""
        if self.tty and self.total:
            filled = min(width, int(width * self.done / self.total))
            bar = "[" + "#" * filled + "." * (width - filled) + "] "
        line = (f"{self.label}: {bar}{pct}{self.done / mib:.1f}/{self.total / mib:.1f} MiB, "
                f"{self.txns} txns applied (at txn {self.txn}), {time.monotonic() - self.started:.1f} s")
        if self.tty:
            print("\r" + line + end, file=self.stream, end="", flush=True)
        else:
            print(line, file=self.stream, flush=True)


def _restore(args: argparse.Namespace) -> int:
    from connectors.kafka import topic_for
    from connectors.s3 import describe, open_store, restore

    database = check_database_name(args.database)
    store = open_store(args.bucket, database, args.endpoint_url)
    if args.list:
        print(describe(store.catalog(), store.url))
        return 0
    if not args.target:
        _fail("restore needs --target DIR (or --list)", EXIT_USAGE)
    time_ms = _parse_time(args.time) if args.time else None
    progress = _TransferProgress(f"restore {database}")
    position = restore(store, Codec(load_schemas()), Path(args.target), txn=args.txn, time_ms=time_ms,
                       topic=topic_for(database), progress=progress)
    progress.draw(end="\n")
    print(f"restore {database}: {args.target} holds the pool at {position} "
          f"(pool files in {Path(args.target) / 'db'}, blobs in {Path(args.target) / 'blob'})")
    return 0


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(argv)


def capture_agent(argv: Sequence[str] | None = None) -> NoReturn:
    _run(_capture, _parse(capture_agent_parser(), argv))


def replica(argv: Sequence[str] | None = None) -> NoReturn:
    _run(_replica, _parse(replica_parser(), argv))


def archive(argv: Sequence[str] | None = None) -> NoReturn:
    _run(_archive, _parse(archive_parser(), argv))


def _analytics(args: argparse.Namespace) -> int:
    from connectors.analytics import Analytics
    from connectors.changes import ChangeStream

    if bool(args.database) == bool(args.pattern):
        _fail("give --database or --pattern", EXIT_USAGE)
    if args.no_stats_topic and not args.sqlite:
        _fail("--no-stats-topic needs --sqlite", EXIT_USAGE)
    if args.window <= 0 or args.top_blocks < 0:
        _fail("--window must be > 0 and --top-blocks >= 0", EXIT_USAGE)
    if args.database:
        check_database_name(args.database)
    what = f"analytics {args.database or args.pattern} ({args.group})"

    def attempt() -> int:
        if args.database and not _topic_ready(args.bootstrap_servers, args.database, args.once, what):
            return 0
        # With one database there is one member: static membership lets it restart without waiting
        # for its dead predecessor's session to time out.
        stream = ChangeStream(args.bootstrap_servers, args.group, databases=[args.database] if args.database else None,
                              pattern=args.pattern, once=args.once, instance_id=args.instance_id or args.database,
                              batches=True)  # statistics only count blocks: no object per block
        consumer = None
        try:
            consumer = Analytics(stream, window_ms=max(1, round(args.window * 1000)), top_blocks=args.top_blocks,
                                 to_kafka=not args.no_stats_topic, stats_topic_template=args.stats_topic,
                                 sqlite_path=args.sqlite, log=lambda line: print(line, flush=True))
            written = consumer.run()
            print(f"{what}: {written} windows written, {consumer.txns} txns read", flush=True)
            return 0
        finally:
            if consumer is not None:
                consumer.close()
            stream.close()

    return _with_retries(what, attempt, bootstrap_servers=args.bootstrap_servers)


def analytics(argv: Sequence[str] | None = None) -> NoReturn:
    _run(_analytics, _parse(analytics_parser(), argv))


def restore(argv: Sequence[str] | None = None) -> NoReturn:
    _run(_restore, _parse(restore_parser(), argv))


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
