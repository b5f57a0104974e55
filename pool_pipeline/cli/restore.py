"""`restore`: a pool from the S3 archive as of a txn or a time."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path
from typing import NoReturn, TextIO

from pipeline.codec import Codec
from pipeline.model import check_database_name
from pool_pipeline.cli.common import EXIT_USAGE, add_bucket, add_encryption, fail, parse, run
from schemas import load_schemas


def restore_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="restore",
        description="Restore a pool from the S3 archive as of a txn or a time (default: the "
        "newest archived txn) into TARGET/db (pool files) and TARGET/blob (blobs).",
    )
    add_bucket(p)
    p.add_argument("--database", required=True)
    p.add_argument("--target", help="a new or empty directory")
    at = p.add_mutually_exclusive_group()
    at.add_argument("--txn", type=int, help="restore the pool as it was after this txn")
    at.add_argument(
        "--time",
        help="restore the last txn captured at or before this time: ISO 8601 "
        "(2026-11-21T10:00:00Z; UTC when no offset is given) or ms since the epoch",
    )
    p.add_argument("--list", action="store_true", help="list the snapshots and txn ranges held, then exit")
    add_encryption(p)
    return p


def _parse_time(text: str) -> int:
    """ms since the epoch from ISO 8601 (UTC unless an offset is given) or a plain integer of ms."""
    from datetime import datetime

    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--time {text!r}: give ISO 8601 like 2026-11-21T10:00:00Z, or ms since the epoch", EXIT_USAGE)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


class _TransferProgress:
    """A progress line for restores: bytes downloaded and the txn reached; redrawn in place on a terminal."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, every: float = 1.0) -> None:
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
        line = (
            f"{self.label}: {bar}{pct}{self.done / mib:.1f}/{self.total / mib:.1f} MiB, "
            f"{self.txns} txns applied (at txn {self.txn}), {time.monotonic() - self.started:.1f} s"
        )
        if self.tty:
            print("\r" + line + end, file=self.stream, end="", flush=True)
        else:
            print(line, file=self.stream, flush=True)


def _restore(args: argparse.Namespace) -> int:
    from connectors.kafka.topics import topic_for
    from connectors.s3.restore import restore
    from connectors.s3.retention import describe
    from connectors.s3.store import open_store

    database = check_database_name(args.database)
    store = open_store(args.bucket, database, args.endpoint_url)
    if args.list:
        print(describe(store.catalog(), store.url))
        return 0
    if not args.target:
        fail("restore needs --target DIR (or --list)", EXIT_USAGE)
    time_ms = _parse_time(args.time) if args.time else None
    progress = _TransferProgress(f"restore {database}")
    position = restore(
        store,
        Codec(load_schemas(), keyring=args.keyring),
        Path(args.target),
        txn=args.txn,
        time_ms=time_ms,
        topic=topic_for(database),
        progress=progress,
    )
    progress.draw(end="\n")
    print(
        f"restore {database}: {args.target} holds the pool at {position} "
        f"(pool files in {Path(args.target) / 'db'}, blobs in {Path(args.target) / 'blob'})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(_restore, parse(restore_parser(), argv))
