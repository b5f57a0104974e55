"""Peak RSS (VmHWM) of capture-agent and replica: a small pool versus a >= 1 GiB pool.

    .venv/bin/python bench/rss.py [--sizes 32,1024] [--workload 3000] [--base /tmp]

For each pool size S (MiB), with its own database name (topic pool.rss-<S>) on one private broker:
 1. A PicoLisp program (bench/lisp/bigpool.l) grows a fresh app pool by S MiB of big +Item objects
    (1 MiB distinct texts, +Swap'ped into file C), WITHOUT a journal: the pool predates the agent.
 2. `capture-agent` (follow mode) starts: its bootstrap snapshot streams the whole pool into one
    Kafka transaction. `replica` (follow mode) starts too and applies it.
 3. Once the replica holds the snapshot, the app commits --workload transactions of the usual mix
    (tests/lisp/workload.l, journaled, with blobs) which both follow.
 4. When the replica is at the topic's last txn, /proc/<pid>/status VmHWM (peak RSS over the
    process's life) is read for both. VmRSS is also sampled every 0.2 s to show the peak per phase
    (snapshot, workload).
 5. Unless --backlog 0: the agent is stopped, the app commits --backlog txns (the journal grows),
    and a new agent process publishes that backlog; its VmHWM is reported separately (the capture
    round used to hold the journal in memory; it now reads it in bounded pieces, issue 17).
Goal: < 200 MiB each, and independent of pool size (compare the rows). The data (pool, replica,
Kafka log: about 3x S) lives under --base and is deleted at exit; check `df -h` first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH,
    agent_argv,
    capture_pending,
    dir_bytes,
    env_with,
    kafka,
    log,
    mib,
    new_app,
    proc_status,
    replica_argv,
    spawn,
    stop,
    table,
    verify_replica,
    workdir,
)
from kafka.structs import TopicPartition  # noqa: E402

from connectors.kafka.client import committed_consumer
from connectors.kafka.topics import last_commit, topic_for  # noqa: E402
from pipeline.codec import COMMIT, Codec  # noqa: E402
from schemas import load_schemas  # noqa: E402


class Sampler:
    """VmRSS of some pids every `every` s, peak per named phase."""

    def __init__(self, pids: dict[str, int], every: float = 0.2) -> None:
        self.pids = pids
        self.every = every
        self.phase = "start"
        self.peaks: dict[tuple[str, str], int] = {}
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            for name, pid in self.pids.items():
                rss = proc_status(pid, "VmRSS")
                if rss is not None:
                    key = (name, self.phase)
                    self.peaks[key] = max(self.peaks.get(key, 0), rss)
            time.sleep(self.every)

    def stop(self) -> None:
        self.running = False
        self.thread.join(2)


def replica_txn(app) -> int:
    try:
        return json.loads((app.root / "rpl/db/app/.pool-pipeline/position.json").read_text())["txn_id"]
    except (OSError, ValueError, KeyError):
        return 0


def txn_sizes(bs: str, topic: str, start: int, codec: Codec) -> list[tuple[int, int, int]]:
    """(txn id, records, bytes) of every committed txn from offset `start` to the end of the topic."""
    tp = TopicPartition(topic, 0)
    c = committed_consumer(bs, None)
    out, records, nbytes = [], 0, 0
    try:
        c.assign([tp])
        end = c.end_offsets([tp])[tp]
        c.seek(tp, start)
        while c.position(tp) < end:
            for r in c.poll(timeout_ms=200).get(tp, []):
                records += 1
                nbytes += len(r.key or b"") + len(r.value or b"")
                if r.key == b"txn":
                    name, value = codec.decode(r.value)
                    if name == COMMIT:
                        out.append((value["txn_id"], records, nbytes))
                        records = nbytes = 0
    finally:
        c.close()
    return out


def end_offset(bs: str, topic: str) -> int:
    tp = TopicPartition(topic, 0)
    c = committed_consumer(bs, None)
    try:
        return c.end_offsets([tp])[tp]
    finally:
        c.close()


def wait_until(cond, what: str, timeout: float, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{what}: a process exited early (rc {p.returncode}); see its log")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def run_size(size_mib: int, args, bs: str, codec: Codec, base: Path) -> dict:
    db = f"rss-{size_mib}"
    root = base / db
    app = new_app(root / "app")
    t = time.monotonic()
    items = max(1, size_mib)  # 1 MiB per item
    app.run(BENCH / "lisp/bigpool.l", items, 1024, timeout=1800)
    pool_bytes = dir_bytes(app.db_dir)
    log(f"{db}: pool of {mib(pool_bytes):.0f} MiB built in {time.monotonic() - t:.1f} s")
    env = env_with(bs)
    t = time.monotonic()
    agent = spawn(agent_argv(app, "--database", db), cwd=app.root, env=env, log=root / "agent.log")
    replica = spawn(replica_argv(database=db), cwd=app.root, env=env, log=root / "replica.log")
    sampler = Sampler({"agent": agent.pid, "replica": replica.pid})
    baseline = {}
    sampler.phase = "snapshot"

    def topic_last() -> int:
        c = committed_consumer(bs, None)
        try:
            if topic_for(db) not in c.topics():
                return 0
        finally:
            c.close()
        lc = last_commit(bs, db, codec, timeout_s=30)
        return lc.position.txn_id if lc else 0

    wait_until(lambda: topic_last() >= 1, f"{db}: the agent's snapshot", 900, (agent, replica))
    t_agent = time.monotonic() - t
    wait_until(lambda: replica_txn(app) >= 1, f"{db}: the replica applying the snapshot", 900, (agent, replica))
    t_snap = time.monotonic() - t
    log(
        f"{db}: snapshot published {t_agent:.1f} s after the agent started, applied by the replica after {t_snap:.1f} s"
    )
    for name, p in (("agent", agent), ("replica", replica)):
        baseline[name] = proc_status(p.pid, "VmHWM")
    sampler.phase = "workload"
    t = time.monotonic()
    wl = app.workload_proc(args.workload, seed=5, blobs=True)  # no journal-growth check: the agent consumes it
    _, err = wl.communicate(timeout=600)
    if wl.returncode != 0:
        raise SystemExit(f"{db}: workload failed: {err[-2000:]}")
    log(f"{db}: workload {args.workload} txns in {time.monotonic() - t:.1f} s")
    prev = [-1]

    def settled() -> bool:
        # Pending first: if nothing is pending now, every capture txn was committed before the topic is read.
        pending = capture_pending(app)
        last = topic_last()
        ok = not pending and last == prev[0] and replica_txn(app) == last
        prev[0] = last
        return ok

    wait_until(settled, f"{db}: agent and replica to catch up", 300, (agent, replica))
    hwm = {name: proc_status(p.pid, "VmHWM") for name, p in (("agent", agent), ("replica", replica))}
    backlog = None
    if args.backlog:
        # The agent was down for a while: the journal holds a backlog that one round publishes.
        stop(agent)
        t = time.monotonic()
        app.workload(args.backlog, seed=6, blobs=True)
        jbytes = app.journal.stat().st_size
        log(
            f"{db}: agent stopped; {args.backlog} txns left a {mib(jbytes):.1f} MiB journal backlog "
            f"({time.monotonic() - t:.1f} s)"
        )
        sampler.phase = "backlog"
        start_offset = end_offset(bs, topic_for(db))
        agent = spawn(agent_argv(app, "--database", db), cwd=app.root, env=env, log=root / "agent.log")
        sampler.pids["agent"] = agent.pid
        prev[0] = -1
        wait_until(settled, f"{db}: the restarted agent and the replica to catch up", 300, (agent, replica))
        backlog = {
            "journal": jbytes,
            "agent": proc_status(agent.pid, "VmHWM"),
            "replica": proc_status(replica.pid, "VmHWM"),
            "txns": txn_sizes(bs, topic_for(db), start_offset, codec),
        }
    sampler.stop()
    for p in (agent, replica):
        stop(p)
    verify = verify_replica(app)
    out = {
        "size": size_mib,
        "db": db,
        "pool": pool_bytes,
        "hwm": hwm,
        "hwm_after_snapshot": baseline,
        "peaks": sampler.peaks,
        "t_agent": t_agent,
        "t_snap": t_snap,
        "verify": verify,
        "txns": replica_txn(app),
        "backlog": backlog,
    }
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,1024", help="pool sizes in MiB, comma-separated")
    ap.add_argument("--workload", type=int, default=3000, help="txns committed after the snapshot")
    ap.add_argument(
        "--backlog", type=int, default=3000, help="then stop the agent, commit this many txns, restart it (0: skip)"
    )
    ap.add_argument("--base", default="/tmp", help="parent directory for the data")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    free = shutil.disk_usage(args.base).free
    need = sum(sizes) * 3.5 * (1 << 20)
    print(
        f"disk: {mib(free) / 1024:.1f} GiB free under {args.base}; this run needs about {need / (1 << 30):.1f} GiB",
        file=sys.stderr,
    )
    if free < need + (2 << 30):
        raise SystemExit("not enough free disk space")

    base = workdir("rss", base=args.base, keep=args.keep)
    log(f"workdir {base}")
    codec = Codec(load_schemas())
    results = []
    with kafka(base) as cluster:
        for s in sizes:
            results.append(run_size(s, args, cluster.bootstrap_servers, codec, base))

    rows = []
    for r in results:
        for name in ("agent", "replica"):
            rows.append(
                [
                    f"{name} @ {mib(r['pool']):.0f} MiB pool",
                    mib(r["hwm"][name] or 0),
                    mib(r["hwm_after_snapshot"][name] or 0),
                    mib(r["peaks"].get((name, "snapshot"), 0)),
                    mib(r["peaks"].get((name, "workload"), 0)),
                    "yes" if (r["hwm"][name] or 0) < 200 * (1 << 20) else "NO",
                ]
            )
    print()
    print(
        table(
            [
                "process",
                "VmHWM MiB (end)",
                "VmHWM after snapshot",
                "peak VmRSS snapshot",
                "peak VmRSS workload",
                "< 200 MiB",
            ],
            rows,
            title="Peak RSS (VmHWM from /proc/<pid>/status; VmRSS sampled every 0.2 s)",
        )
    )
    brows = [
        [
            f"{mib(r['pool']):.0f} MiB pool",
            mib(r["backlog"]["journal"]),
            max((t[1] for t in r["backlog"]["txns"]), default=0),
            mib(max((t[2] for t in r["backlog"]["txns"]), default=0)),
            mib(r["backlog"]["agent"] or 0),
            mib(r["peaks"].get(("agent", "backlog"), 0)),
            mib(r["backlog"]["replica"] or 0),
        ]
        for r in results
        if r.get("backlog")
    ]
    if brows:
        print()
        print(
            table(
                [
                    "restarted agent",
                    "journal backlog MiB",
                    "biggest txn records",
                    "biggest txn MiB",
                    "agent VmHWM MiB",
                    "agent peak VmRSS",
                    "replica VmHWM MiB (whole run)",
                ],
                brows,
                title="Agent restarted on a journal backlog (one capture round takes it all)",
            )
        )
    print()
    for r in results:
        print(
            f"{r['db']}: pool {mib(r['pool']):.0f} MiB; snapshot published in {r['t_agent']:.1f} s incl. agent start "
            f"({mib(r['pool']) / r['t_agent']:.1f} MiB/s), applied by the replica after {r['t_snap']:.1f} s; "
            f"{r['txns']} capture txns; {r['verify']}"
        )
    if len(results) >= 2:
        a, b = results[0], results[-1]
        for name in ("agent", "replica"):
            ha, hb = a["hwm"][name] or 0, b["hwm"][name] or 0
            print(
                f"{name}: VmHWM {mib(ha):.0f} MiB -> {mib(hb):.0f} MiB ({mib(hb - ha):+.0f} MiB) for a "
                f"{mib(b['pool']) / mib(a['pool']):.0f}x bigger pool"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
