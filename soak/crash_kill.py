#!/usr/bin/env python3
"""Soak: kill -9 the capture-agent and the replica at random points while a PicoLisp app commits.

    .venv/bin/python soak/crash_kill.py [--iterations 200] [--seed N] [--check-every 50]

Uses $KAFKA_BOOTSTRAP_SERVERS, or starts a local single-node broker (pool_pipeline.devstack) for
the run. Every --check-every iterations (and at the end) it stops, catches up with `--once`, and
checks: topic txn ids are 1..N each exactly once and chained by checksum, only txn 1 is a
snapshot, the replica is at N, md5-equal per file, blob-equal, and a PicoLisp query prints the
same on source and replica. After every replica kill it also checks that the replica's files
match its position.json (a txn boundary) unless a committed redo file is pending.
Exit status 0 if every check passed. The same loop runs 20 iterations in
tests/integration/test_capture_replica.py.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.picolisp_fixtures import PicoApp, find_pil  # noqa: E402
from tests.pipeline_helpers import Cli, CrashStats, check_caught_up, crash_kill, unique_name  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--check-every", type=int, default=50, help="catch up and verify every N iterations")
    p.add_argument("--min-sleep", type=float, default=0.05, help="shortest run before a kill (s)")
    p.add_argument("--max-sleep", type=float, default=1.0, help="longest run before a kill (s)")
    p.add_argument("--dir", type=Path, help="work directory (default: a temp dir, removed on success)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every iteration")
    args = p.parse_args()

    pil = find_pil()
    if pil is None:
        print("error: PicoLisp (pil) is not installed", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = args.dir or Path(tempfile.mkdtemp(prefix="crash-kill-"))
    print(f"crash-kill soak: {args.iterations} iterations, seed {seed}, work dir {work}", flush=True)

    cluster = None
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if not servers:
        from pool_pipeline.devstack import start_kafka

        cluster = start_kafka(work / "kafka", brokers=1, detach=False)
        servers = cluster.bootstrap_servers
        print(f"started a local broker at {servers}", flush=True)
    app = PicoApp(work / "app", pil)
    app.create()
    cli = Cli(app.root, servers, unique_name("soak"))
    total = CrashStats()
    started = time.monotonic()
    ok = False
    try:
        done = 0
        while done < args.iterations:
            n = min(args.check_every, args.iterations - done)
            stats = crash_kill(
                cli,
                app,
                n,
                rng,
                min_sleep=args.min_sleep,
                max_sleep=args.max_sleep,
                log=print if args.verbose else None,
            )
            txns = check_caught_up(cli, app)
            snapshots = [t.txn_id for t in txns if t.snapshot]
            assert snapshots == [1], f"restarts should resume from the spool, but txns {snapshots} are snapshots"
            done += n
            for name in (
                "iterations",
                "agent_kills",
                "replica_kills",
                "workload_runs",
                "workload_txns",
                "boundary_checks",
            ):
                setattr(total, name, getattr(total, name) + getattr(stats, name))
            total.txns = len(txns)
            total.seconds = time.monotonic() - started
            print(f"[{done}/{args.iterations}] verified: {total.summary()}", flush=True)
        ok = True
    except AssertionError as exc:
        import traceback

        traceback.print_exc()
        print(
            f"FAILED after {total.iterations} verified iterations (seed {seed}, work dir {work}):\n{exc}",
            file=sys.stderr,
            flush=True,
        )
    finally:
        cli.stop_all()
        if cluster is not None:
            cluster.stop()
    if ok:
        print(f"PASSED: {total.summary()}; no txn lost or doubled, replica md5-equal (seed {seed})")
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
