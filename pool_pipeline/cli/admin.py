"""`pipeline`: `status` of every database and group, `keygen` for payload encryption, `dev` for the local stack."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pipeline.codec import Codec
from pipeline.errors import PipelineError
from pool_pipeline.cli.common import (
    EXIT_USAGE,
    add_bucket,
    add_encryption,
    add_kafka,
    dev_state_dir,
    fail,
    parse,
    run,
)
from schemas import load_schemas


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
    up.add_argument(
        "--secure",
        action="store_true",
        help="Kafka with SASL_SSL only (SCRAM-SHA-512 user per role, ACLs) and S3 over https, with a CA made "
        "on the fly; `dev env` then exports KAFKA_CLIENT_CONFIG and AWS_CA_BUNDLE",
    )
    up.add_argument(
        "--database",
        action="append",
        dest="stats_databases",
        metavar="NAME",
        help="with --secure: databases whose pool.<NAME>.stats topic analytics may write (repeatable; "
        "Kafka ACLs cannot match a suffix; default app)",
    )
    dev_status = dev_sub.add_parser("status", help="each broker's and S3's node id, port, pid and state")
    dev_status.add_argument("--json", action="store_true", help="the full status as JSON")
    dev_sub.add_parser("down", help="stop every process of the stack, restarted brokers included")
    env = dev_sub.add_parser("env", help="shell exports for the stack (also while some brokers are down)")
    env.add_argument(
        "--role",
        choices=("agent", "replica", "archive", "analytics", "admin"),
        help="secured stack: KAFKA_CLIENT_CONFIG of this principal (default admin)",
    )
    broker = dev_sub.add_parser("broker", help="kill, stop or restart one broker (fault tests)")
    broker_sub = broker.add_subparsers(dest="broker_action", required=True)
    for name, what in (
        ("kill", "SIGKILL broker N"),
        ("stop", "stop broker N cleanly (SIGTERM)"),
        ("start", "restart broker N with its recorded command line and wait until it is ready"),
    ):
        b = broker_sub.add_parser(name, help=what)
        b.add_argument("node", type=_broker_number, metavar="N", help="broker number, 1..brokers")
        b.add_argument("--state-dir", type=Path, default=dev_state_dir(), help="where the stack keeps its data")
        if name != "kill":
            b.add_argument(
                "--timeout",
                type=_positive_seconds,
                default=90.0 if name == "start" else 20.0,
                help="seconds to wait for readiness (start) or a clean exit before SIGKILL (stop)",
            )
    for q in dev_sub.choices.values():
        if q is not broker:
            q.add_argument("--state-dir", type=Path, default=dev_state_dir(), help="where the stack keeps its data")
    keygen = sub.add_parser(
        "keygen",
        help="write a new AES-256 key file for --encryption-key (mode 0600), or add a key to one (rotation)",
    )
    keygen.add_argument("file", type=Path, metavar="FILE", help="the key file; an existing one is never overwritten")
    keygen.add_argument(
        "--add",
        action="store_true",
        help="append a new key to the existing FILE: it encrypts from now on, the older keys still decrypt",
    )
    status = sub.add_parser("status", help="per database: last captured txn, and each group's applied txn and lag")
    status.add_argument("--database", action="append", help="only these databases (repeatable)")
    add_kafka(status)
    add_bucket(status, required=False, what="also show how far the archive there is behind the source: ")
    add_encryption(status, reader=False)
    return p


def _dev(args: argparse.Namespace) -> int:
    from pool_pipeline import devstack

    try:
        if args.action == "up":
            if args.stats_databases and not args.secure:
                fail("--database is for ACLs: it needs --secure", EXIT_USAGE)
            info = devstack.dev_up(
                args.state_dir,
                brokers=args.brokers,
                kafka_port=args.kafka_port,
                s3_port=args.s3_port,
                secure=args.secure,
                stats_databases=args.stats_databases or ("app",),
            )
            secured = " SASL_SSL, SCRAM-SHA-512, ACLs" if info.get("secure") else ""
            print(f"kafka:  {info['bootstrap_servers']} ({info['brokers']} broker(s){secured})")
            print(f"s3:     {info['s3_endpoint']} bucket {info['bucket']}")
            if info.get("secure"):
                print(f"ca:     {info['ca_bundle']}")
                for role, path in sorted(info["kafka_client_configs"].items()):
                    print(f"client config of {role + ':':<10} {path}")
            print('use it:  eval "$(pipeline dev env)"')
        elif args.action == "status":
            status = devstack.dev_status(args.state_dir)
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                print(devstack.format_status(status), end="")
        elif args.action == "down":
            devstack.dev_down(args.state_dir)
        elif args.action == "env":
            # Only a recorded stack is needed: fault tests want the exports while brokers are down.
            status = devstack.dev_status(args.state_dir)
            if not status["recorded"]:
                fail(f"no dev stack recorded in {args.state_dir}: start it with `pipeline dev up`")
            down = [p["name"] for p in status["processes"] if not p["alive"]]
            if down:
                print(f"warning: not running: {', '.join(down)}", file=sys.stderr)
            print(devstack.env_exports(status["info"], args.role))
        elif args.action == "broker":
            if args.broker_action == "start":
                devstack.dev_broker_start(args.state_dir, args.node, ready_timeout=args.timeout)
            else:
                hard = args.broker_action == "kill"
                devstack.dev_broker_stop(args.state_dir, args.node, hard=hard, timeout=getattr(args, "timeout", 20.0))
    except devstack.NoSuchBroker as exc:
        fail(str(exc), EXIT_USAGE)
    except devstack.StackError as exc:
        fail(str(exc))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    if args.command == "dev":
        return _dev(args)
    if args.command == "keygen":
        return _keygen(args)
    return _status(args)


def _keygen(args: argparse.Namespace) -> int:
    from connectors.keys import keygen

    key = keygen(args.file, add=args.add)
    # Only the id: the key itself stays in the file.
    print(f"{'added' if args.add else 'wrote'} key {key.id_hex} to {args.file} (mode 0600); it encrypts from now on")
    return 0


def _status(args: argparse.Namespace) -> int:
    from connectors.kafka.status import status

    problem = args.kafka.security_problem()
    if problem:
        raise PipelineError(f"pipeline status: {problem}")
    rows = status(args.kafka, Codec(load_schemas(), keyring=args.keyring), args.database)
    if not rows:
        print(f"no database topics (pool.*) on {args.kafka.bootstrap_servers}")
        return 0
    if args.bucket:
        from connectors.s3.store import open_store

        for row in rows:
            try:
                catalog = open_store(args.bucket, row["database"], args.endpoint_url).catalog()
            except PipelineError as exc:  # the Kafka side is still worth showing
                row["archive_error"] = str(exc)
                continue
            row["archive"] = catalog.behind(row["captured_txn"], row["captured_time_ms"])

    def fmt_bytes(n: int | None) -> str:
        if n is None:
            return ">64MiB"
        return f"{n}B" if n < 1024 else f"{n / 1024:.1f}KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f}MiB"

    print(
        f"{'database':<16} {'captured':>9} {'group':<18} {'applied':>9} {'lag txns':>9} {'lag bytes':>10} {'lag s':>7}"
    )
    for row in rows:
        when = (
            time.strftime("%H:%M:%S", time.localtime(row["captured_time_ms"] / 1000))
            if row["captured_time_ms"]
            else "-"
        )
        print(f"{row['database']:<16} {row['captured_txn']:>9} (last capture {when})")
        for g in row["groups"]:
            lag_s = f"{g['lag_seconds']:.1f}" if g["lag_seconds"] is not None else "-"
            print(
                f"{'':<16} {'':>9} {g['group']:<18} {str(g['applied_txn']):>9} {str(g['lag_txns']):>9} "
                f"{fmt_bytes(g['lag_bytes']):>10} {lag_s:>7}"
            )
        if "archive_error" in row:
            print(f"{'':<16} {'':>9} {'(archive)':<18} {row['archive_error']}")
        if "archive" in row:
            a = row["archive"]
            lag_s = f"{a['behind_seconds']:.1f}" if a["behind_seconds"] is not None else "-"
            archived = "none" if a["archived_txn"] is None else str(a["archived_txn"])
            print(f"{'':<16} {'':>9} {'(archive)':<18} {archived:>9} {a['behind_txns']:>9} {'':>10} {lag_s:>7}")
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(_pipeline, parse(pipeline_parser(), argv))
