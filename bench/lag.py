"""Commit -> replica-applied lag at a steady PicoLisp commit rate (default 500 txn/s for 20 s).

    .venv/bin/python bench/lag.py [--rate 500] [--duration 20] [--mode both|probe|plain]
                                  [--poll-interval 0.02] [--no-blobs]

A PicoLisp app (tests/lisp/app.l + workload.l's transaction mix, paced by bench/lisp/paced.l)
commits at --rate and prints the wall-clock time of every commit right after `commit` returns.
A capture-agent and a replica run in follow mode as separate processes against a private broker.

Per PicoLisp commit k (time c_k):
  lag_k = time the replica made the capture txn holding k visible (position.json written) - c_k.
Goal: p50 < 20 ms, p99 < 100 ms.

Modes (default both, one after the other on the same broker and pool):
  probe  agent and replica run through bench/_probe.py: the unchanged CLI code, with timestamps
         logged at journal lock, TopicSink.apply start/end, ReplicaDir.apply start/staged/applied
         (+ fsync count and time). This splits each commit's lag into
           capture wait  c_k -> the agent's journal lock that took k (journal append -> capture,
                         bounded by --poll-interval),
           agent build   lock -> TopicSink.apply starts (journal parse, pread, blob spool, checksum),
           publish       encode + send + commit_transaction (Kafka transaction latency),
           delivery      commit_transaction returned -> replica starts applying (consumer fetch of
                         read_committed data, including the broker writing the commit markers),
           replica apply redo staging + verify, then the group commit that made it visible
                         (fsyncs + pwrite + position.json, shared with the txns batched with it).
  plain  the real console scripts, no probes. Commit k is mapped to the first capture txn whose
         TxnBegin.source_time_ms (read back from the topic) is >= c_k, and position.json is polled
         every millisecond for its applied_at_ms (txns overwritten before a poll use the next one's
         time, an upper bound). This is the cross-check that the probes do not distort.
Both modes also report per capture txn: applied_at - TxnBegin.source_time_ms (the agent's own stamp).

What-if (probe mode only; emulates proposed changes inside the probe, see bench/_probe.py):
  --what-if-no-fsync     replica's os.fsync is a no-op (UNSAFE: only attributes the fsync share)
  --poll-interval S      capture-agent --poll-interval (an existing option; default 0.02)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from bisect import bisect_right
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH,
    REPO,
    agent_argv,
    capture_pending,
    env_with,
    kafka,
    log,
    new_app,
    percentile,
    replica_argv,
    spawn,
    stop,
    table,
    verify_replica,
    workdir,
)
from kafka.structs import TopicPartition  # noqa: E402

from connectors.kafka.client import committed_consumer
from connectors.kafka.topics import PARTITION, last_commit, topic_for  # noqa: E402
from pipeline.codec import BEGIN, Codec  # noqa: E402
from schemas import load_schemas  # noqa: E402

DB = "app"
POSITION = "rpl/db/app/.pool-pipeline/position.json"


def read_position(app) -> dict | None:
    try:
        return json.loads((app.root / POSITION).read_text())
    except (OSError, ValueError):
        return None


def wait_caught_up(app, bs: str, codec: Codec, timeout: float = 60) -> int:
    """Until the capture side is idle and the replica is at the topic's last committed txn (stable 2.5 s)."""
    deadline = time.monotonic() + timeout
    stable_since = None
    while time.monotonic() < deadline:
        # Pending first: if nothing is pending now, every capture txn was committed before the topic is read.
        pending = capture_pending(app)
        last = last_commit(bs, DB, codec, timeout_s=10)
        pos = read_position(app)
        ok = not pending and last is not None and pos is not None and pos["txn_id"] == last.position.txn_id
        if ok:
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since >= 2.5:  # blob deletions are found by a scan every second
                return pos["txn_id"]
        else:
            stable_since = None
        time.sleep(0.1)
    raise SystemExit(f"replica did not catch up within {timeout} s (position {read_position(app)})")


def topic_begins(bs: str, codec: Codec) -> dict[int, int]:
    """txn id -> TxnBegin.source_time_ms for every committed txn in the topic."""
    topic = topic_for(DB)
    tp = TopicPartition(topic, PARTITION)
    c = committed_consumer(bs, None)
    out = {}
    try:
        c.assign([tp])
        end = c.end_offsets([tp])[tp]
        c.seek_to_beginning(tp)
        deadline = time.monotonic() + 60
        while c.position(tp) < end and time.monotonic() < deadline:
            for rec in c.poll(timeout_ms=200).get(tp, []):
                if rec.key == b"txn":
                    name, value = codec.decode(rec.value, database=DB)
                    if name == BEGIN:
                        out[value["txn_id"]] = value["source_time_ms"]
    finally:
        c.close()
    return out


class PacedWorkload:
    """bench/lisp/paced.l in the background; stamps every commit line on arrival."""

    def __init__(self, app, txns: int, rate: int, seed: int, blobs: bool) -> None:
        b = "1" if blobs else "0"
        argv = [
            app.pil,
            str(REPO / "tests/lisp/app.l"),
            str(REPO / "tests/lisp/workload.l"),
            "0",
            str(seed),
            b,
            "0",
            "0",
            str(BENCH / "lisp/paced.l"),
            str(txns),
            str(rate),
            b,
            "-bye",
        ]
        self.proc = spawn(argv, cwd=app.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[tuple[int, int, float]] = []  # (i, usec, received wall time)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t = time.time()
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit():
                self.lines.append((int(parts[0]), int(parts[1]), t))

    def wait(self, timeout: float) -> None:
        rc = self.proc.wait(timeout)
        self.thread.join(5)
        if rc != 0:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise SystemExit(f"paced workload failed rc={rc}: {err[-2000:]}")

    def commit_times(self) -> list[float]:
        """Wall-clock commit times: usec + offset, offset = min(receive time - usec) (least-delayed line)."""
        offset = min(t - us / 1e6 for _, us, t in self.lines)
        return [us / 1e6 + offset for _, us, _ in self.lines]


class PositionPoller:
    """Polls position.json every `every` s and keeps (txn_id, applied_at_ms) of each new txn seen."""

    def __init__(self, app, every: float = 0.001) -> None:
        self.path = app.root / POSITION
        self.every = every
        self.seen: dict[int, int] = {}
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        last_mtime = None
        while self.running:
            try:
                st = os.stat(self.path)
                if st.st_mtime_ns != last_mtime:
                    last_mtime = st.st_mtime_ns
                    pos = json.loads(self.path.read_text())
                    self.seen.setdefault(pos["txn_id"], pos["applied_at_ms"])
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(self.every)

    def stop(self) -> None:
        self.running = False
        self.thread.join(2)


def parse_events(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def stats_row(name: str, values_s: list[float]) -> list[object]:
    ms = [v * 1000 for v in values_s]
    return [
        name,
        percentile(ms, 50),
        percentile(ms, 90),
        percentile(ms, 99),
        max(ms) if ms else float("nan"),
        sum(ms) / len(ms) if ms else float("nan"),
    ]


STAT_HEADERS = ["ms", "p50", "p90", "p99", "max", "mean"]


def run_phase(mode: str, app, bs: str, codec: Codec, root: Path, args, seed: int) -> dict:
    env = env_with(bs)
    if mode == "probe" and args.what_if_no_fsync:
        env["BENCH_NO_FSYNC"] = "1"
    poll = ["--poll-interval", str(args.poll_interval)]
    if mode == "probe":
        agent_ev, replica_ev = root / f"agent-{seed}.events", root / f"replica-{seed}.events"
        agent = spawn(
            [sys.executable, str(BENCH / "_probe.py"), "agent", str(agent_ev), "--", *agent_argv(app, *poll)[1:]],
            cwd=app.root,
            env=env,
            log=root / "agent.log",
        )
        replica = spawn(
            [sys.executable, str(BENCH / "_probe.py"), "replica", str(replica_ev), "--", *replica_argv()[1:]],
            cwd=app.root,
            env=env,
            log=root / "replica.log",
        )
    else:
        agent = spawn(agent_argv(app, *poll), cwd=app.root, env=env, log=root / "agent.log")
        replica = spawn(replica_argv(), cwd=app.root, env=env, log=root / "replica.log")
    start_txn = wait_caught_up(app, bs, codec, timeout=120)
    log(f"{mode}: agent and replica caught up at txn {start_txn}; committing {args.rate} txn/s for {args.duration} s")
    poller = PositionPoller(app) if mode == "plain" else None
    n = int(args.rate * args.duration)
    wl = PacedWorkload(app, n, args.rate, seed, not args.no_blobs)
    wl.wait(timeout=args.duration * 5 + 60)
    end_txn = wait_caught_up(app, bs, codec, timeout=120)
    if poller:
        poller.stop()
    for p in (agent, replica):
        stop(p)
    commits = wl.commit_times()
    rate = (len(commits) - 1) / (commits[-1] - commits[0]) if len(commits) > 1 else float("nan")
    log(f"{mode}: {len(commits)} commits at {rate:.0f} txn/s -> capture txns {start_txn + 1}..{end_txn}")
    begins = topic_begins(bs, codec)
    res = {"mode": mode, "commits": len(commits), "rate": rate, "txns": end_txn - start_txn}

    if mode == "probe":
        rounds = []  # (t_locked, images, txn or None)
        publish: dict[int, tuple[float, float, int]] = {}
        t_lock = None
        for ev in parse_events(root / f"agent-{seed}.events"):
            if ev[0] == "L":
                t_lock = float(ev[1])
            elif ev[0] == "J":
                rounds.append([t_lock if t_lock is not None else float(ev[1]), int(ev[3]), None])
            elif ev[0] == "P":
                txn = int(ev[1])
                publish[txn] = (float(ev[2]), float(ev[3]), int(ev[4]))
                if rounds:
                    rounds[-1][2] = txn
        applied, fetches, acks, polls = {}, [], [], []
        for ev in parse_events(root / f"replica-{seed}.events"):
            if ev[0] == "A":
                applied[int(ev[1])] = (
                    float(ev[2]),
                    float(ev[3]),
                    float(ev[4]),
                    float(ev[5]),
                    float(ev[6]),
                    int(ev[7]),
                    int(ev[8]),
                    int(ev[9]) if len(ev) > 9 else 1,
                )
            elif ev[0] == "F":
                fetches.append((int(ev[4]), float(ev[1])))  # (last offset, time)
                polls.append((float(ev[1]), float(ev[5])))
            elif ev[0] == "K":
                acks.append(float(ev[2]) - float(ev[1]))
        fetches.sort()
        fetch_last = [f[0] for f in fetches]

        def fetched_at(offset: int) -> float:
            j = bisect_right(fetch_last, offset - 1)  # first poll whose last offset >= offset
            return fetches[j][1] if j < len(fetches) else float("nan")

        lock_times = [r[0] for r in rounds]
        comp = {
            k: []
            for k in (
                "lag",
                "capture wait",
                "agent build",
                "publish",
                "delivery",
                "  fetch",
                "  queued in replica",
                "replica apply",
                "  stage+verify",
                "  fsync (all)",
                "  replay+position",
            )
        }
        unmatched = 0
        for c in commits:
            i = bisect_right(lock_times, c)
            while i < len(rounds) and rounds[i][2] is None:
                i += 1
            if i >= len(rounds) or rounds[i][2] not in applied or rounds[i][2] not in publish:
                unmatched += 1
                continue
            t_locked, _, txn = rounds[i]
            p0, p1, _ = publish[txn]
            a0, a_staged, a1, _, fs, _, offset, _ = applied[txn]
            f = fetched_at(offset)
            comp["lag"].append(a1 - c)
            comp["capture wait"].append(t_locked - c)
            comp["agent build"].append(p0 - t_locked)
            comp["publish"].append(p1 - p0)
            comp["delivery"].append(a0 - p1)
            comp["  fetch"].append(f - p1)
            comp["  queued in replica"].append(a0 - f)
            comp["replica apply"].append(a1 - a0)
            comp["  stage+verify"].append(a_staged - a0)
            comp["  fsync (all)"].append(fs)
            comp["  replay+position"].append(a1 - a_staged)
        res["components"] = comp
        res["unmatched"] = unmatched
        txns = [t for t in applied if start_txn < t <= end_txn]
        res["txn_lag"] = [applied[t][2] - begins[t] / 1000 for t in txns if t in begins]
        res["records_per_txn"] = [publish[t][2] for t in txns if t in publish]
        res["fsyncs_per_txn"] = [applied[t][3] for t in txns]
        res["batch_sizes"] = [applied[t][7] for t in txns]
        res["commits_per_txn"] = len(comp["lag"]) / max(1, len(txns))
        res["acks"] = acks
        # Utilisation: a stage busy longer than the inter-arrival time queues, and lag grows without bound.
        span = (max(applied[t][2] for t in txns) - min(applied[t][0] for t in txns)) if txns else float("nan")
        res["replica_busy"] = sum(applied[t][2] - applied[t][0] for t in txns) / span if txns else float("nan")
        # Whole replica process: everything but waiting inside KafkaConsumer.poll (apply, decode, acks).
        t0 = min(applied[t][0] for t in txns) if txns else 0
        t1 = max(applied[t][2] for t in txns) if txns else 0
        idle = sum(w for t, w in polls if t0 < t <= t1)
        res["replica_loop_busy"] = 1 - idle / (t1 - t0) if t1 > t0 else float("nan")
        pts = [t for t in txns if t in publish]
        res["agent_busy"] = (sum(publish[t][1] - publish[t][0] for t in pts) / span) if pts else float("nan")
    else:
        seen = poller.seen if poller else {}
        txn_ids = sorted(t for t in begins if start_txn < t <= end_txn)
        src_ms = [begins[t] for t in txn_ids]
        seen_ids = sorted(t for t in seen if start_txn < t <= end_txn)

        def applied_at(txn: int) -> float:
            j = bisect_right(seen_ids, txn - 1)  # first seen id >= txn
            return seen[seen_ids[j]] / 1000 if j < len(seen_ids) else float("nan")

        lags, unmatched = [], 0
        for c in commits:
            j = bisect_right(src_ms, int(c * 1000) - 1)  # first txn with source_time_ms >= c (ms)
            if j >= len(txn_ids):
                unmatched += 1
                continue
            a = applied_at(txn_ids[j])
            if a != a:
                unmatched += 1
                continue
            lags.append(a - c)
        res["components"] = {"lag": lags}
        res["unmatched"] = unmatched
        res["txn_lag"] = [applied_at(t) - begins[t] / 1000 for t in txn_ids if applied_at(t) == applied_at(t)]
        res["missed_polls"] = len(txn_ids) - len(seen_ids)
        res["commits_per_txn"] = len(commits) / max(1, len(txn_ids))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=500, help="target PicoLisp commits per second")
    ap.add_argument("--duration", type=float, default=20, help="seconds of paced workload per mode")
    ap.add_argument("--mode", choices=("both", "probe", "plain"), default="both")
    ap.add_argument("--initial", type=int, default=2000, help="txns committed before the agent starts")
    ap.add_argument("--poll-interval", type=float, default=0.02, help="capture-agent --poll-interval")
    ap.add_argument("--no-blobs", action="store_true")
    ap.add_argument("--what-if-no-fsync", action="store_true", help="probe: replica skips fsync (UNSAFE)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    root = workdir("lag", keep=args.keep)
    log(f"workdir {root}")
    results = []
    with kafka(root) as cluster:
        bs = cluster.bootstrap_servers
        codec = Codec(load_schemas())
        app = new_app(root / "app")
        app.workload(args.initial, seed=1, blobs=not args.no_blobs)
        modes = ["probe", "plain"] if args.mode == "both" else [args.mode]
        for k, mode in enumerate(modes):
            results.append(run_phase(mode, app, bs, codec, root, args, seed=10 + k))
        verify = verify_replica(app)

    print()
    for res in results:
        comp = res["components"]
        what_if = " WHAT-IF: NO FSYNC" if res["mode"] == "probe" and args.what_if_no_fsync else ""
        title = (
            f"[{res['mode']}{what_if}] {res['commits']} PicoLisp commits at {res['rate']:.0f} txn/s achieved "
            f"(target {args.rate}), {res['txns']} capture txns ({res['commits_per_txn']:.1f} commits/txn), "
            f"poll interval {args.poll_interval * 1000:.0f} ms; unmatched commits {res['unmatched']}"
        )
        rows = [
            stats_row(name + (" (commit -> replica visible)" if name == "lag" else ""), v) for name, v in comp.items()
        ]
        rows.append(stats_row("per capture txn: applied - TxnBegin.source_time_ms", res["txn_lag"]))
        print(table(STAT_HEADERS, rows, title=title))
        if res["mode"] == "probe":
            rec = res["records_per_txn"]
            print(
                f"records per capture txn: mean {sum(rec) / max(1, len(rec)):.1f}, p99 {percentile(rec, 99):.0f}; "
                f"fsyncs per applied txn: p50 {percentile(res['fsyncs_per_txn'], 50):.1f}, mean "
                f"{sum(res['fsyncs_per_txn']) / max(1, len(res['fsyncs_per_txn'])):.1f}; txns per group commit: "
                f"mean {len(res['batch_sizes']) / max(1e-9, sum(1 / b for b in res['batch_sizes'])):.2f}, max "
                f"{max(res['batch_sizes'], default=0)}; busy share of the run: "
                f"replica apply {res['replica_busy']:.0%}, replica process (all but poll waits) "
                f"{res['replica_loop_busy']:.0%}, agent publish {res['agent_busy']:.0%} "
                "(near or above 100% = that stage queues and lag grows)"
            )
            print(
                f"replica group offset commit per txn (TopicSource.acknowledge): "
                f"p50 {percentile(res['acks'], 50) * 1000:.1f} ms, p99 {percentile(res['acks'], 99) * 1000:.1f} ms"
            )
        if res["mode"] == "plain":
            print(f"position.json polls missed {res['missed_polls']} txns (their lag uses the next txn's time)")
        lag = [v * 1000 for v in comp["lag"]]
        p50, p99 = percentile(lag, 50), percentile(lag, 99)
        print(
            f"goal p50 < 20 ms: {p50:.1f} ms {'MET' if p50 < 20 else 'MISSED'}; "
            f"p99 < 100 ms: {p99:.1f} ms {'MET' if p99 < 100 else 'MISSED'}\n"
        )
    print(f"verify after the run: {verify}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
