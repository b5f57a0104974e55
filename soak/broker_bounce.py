#!/usr/bin/env python3
"""Soak: kill -9 Kafka brokers at random on a 3-broker cluster while a PicoLisp app commits.

    .venv/bin/python soak/broker_bounce.py [--minutes 20] [--seed N] [--down 3:15]

Starts its own 3-broker KRaft cluster (RF 3, min.insync.replicas 2), a capture-agent and a
replica in follow mode, and bounces brokers until the time is up: each round kills the topic's
leader, the leader and the agent's transaction coordinator, or two of three brokers (chosen at
random), keeps them down for a random time while the app commits, restarts them and waits for
the replica to be md5-equal. At the end it stops both, catches up with --once and checks: txn
ids 1..N exactly once chained by checksum, replica md5-equal, blobs and a PicoLisp query dump
equal. Prints faults injected, txns, lost and duplicated counts, and recovery times.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cluster_faults import FAST_BOUNCE, FaultStats, bounce_round, victims_for  # noqa: E402
from tests.picolisp_fixtures import PicoApp, find_pil  # noqa: E402
from tests.pipeline_helpers import Cli, check_caught_up, replica_txn, unique_name, wait_for  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--down", default="3:15", help="MIN:MAX seconds a killed broker stays down (default 3:15)")
    p.add_argument("--txns", type=int, default=200, help="PicoLisp commits per round (default 200)")
    p.add_argument("--dir", type=Path, help="work directory (default: a temp dir, removed on success)")
    args = p.parse_args()
    pil = find_pil()
    if pil is None:
        print("error: PicoLisp (pil) is not installed", file=sys.stderr)
        return 2
    lo, hi = (float(x) for x in args.down.split(":"))
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = args.dir or Path(tempfile.mkdtemp(prefix="broker-bounce-"))
    print(f"broker-bounce soak: {args.minutes:g} min, seed {seed}, work dir {work}", flush=True)

    from pool_pipeline.devstack import start_kafka

    cluster = start_kafka(work / "kafka", brokers=3, detach=False, overrides=FAST_BOUNCE, ready_timeout=180)
    app = PicoApp(work / "app", pil)
    app.create()
    cli = Cli(app.root, cluster.bootstrap_servers, unique_name("bounce"))
    stats = FaultStats()
    kinds: dict[str, int] = {}
    ok = False
    try:
        app.workload(20, seed=seed)
        agent = cli.start_agent("--replication-factor", "3", "--min-insync-replicas", "2")
        replica = cli.start_replica()
        wait_for(lambda: replica_txn(cli.root / "rpl/db/app/") > 0, 120, "the replica's first txn")
        deadline = time.monotonic() + args.minutes * 60
        while time.monotonic() < deadline:
            kind = rng.choice(("leader", "leader+coordinator", "two"))
            victims = victims_for(kind, cluster, cli.database, rng)
            recovered = bounce_round(
                cluster,
                cli,
                app,
                agent,
                replica,
                victims,
                down_s=rng.uniform(lo, hi),
                workload_txns=args.txns,
                seed=rng.randrange(1 << 30),
                log=print,
            )
            stats.recoveries.append(recovered)
            stats.rounds += 1
            stats.brokers_killed += len(victims)
            stats.workload_txns += args.txns
            kinds[kind] = kinds.get(kind, 0) + 1
            print(f"[{stats.rounds}] {kind}: {stats.summary()}", flush=True)
        agent.stop()
        replica.stop()
        txns = check_caught_up(cli, app)
        print(
            f"PASSED: {stats.summary()}; faults by kind {kinds}; {len(txns)} txns in the topic, lost 0, "
            f"duplicated 0, replica md5-equal (seed {seed})",
            flush=True,
        )
        ok = True
    except AssertionError as exc:
        import traceback

        traceback.print_exc()
        print(f"FAILED after {stats.rounds} rounds (seed {seed}, work dir {work}):\n{exc}", file=sys.stderr)
    finally:
        cli.stop_all()
        cluster.stop()
    if ok and args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
