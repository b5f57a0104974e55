"""The replica's CPU and lag at a steady commit rate, against a bare kafka-python consumer of the same transactions.

    .venv/bin/python bench/replica_cpu.py [--rate 200] [--duration 20] [--no-blobs]
                                          [--variants 'ARGS|ARGS|...'] [--agent-args ARGS]

A PicoLisp app commits at --rate (tests/lisp/app.l + workload.l's mix, paced by bench/lisp/paced.l)
while `capture-agent` and `replica` (the console scripts) follow it. Beside the replica, bench/_consume.py
follows the same topic from the same offset: a read_committed kafka-python consumer configured and
polling as the replica's, committing its group offset as the replica does, and doing nothing else.
It is the floor: what any kafka-python program pays to receive these transactions (its fetches paced
as the replica's when the variant gives `--min-interval`).

Per phase (one per --variants entry: extra `replica` arguments, '' for the defaults), over the paced
window: CPU (user + system, all threads, /proc/<pid>/stat) of the replica, its main thread and its
kafka-python I/O thread, of the floor consumer and of the agent; the replica's system time (mostly
its fsyncs); the replica's fsyncs per second (/proc/<pid>/io syscw is not it: counted with strace
would distort, so the figure is the group commits per second, from position.json's batch record);
and per PicoLisp commit the lag to the replica making it visible (position.json polled every 2 ms)
and to the floor consumer receiving its capture txn's TxnCommit.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from bisect import bisect_left
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH,
    agent_argv,
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
from agent_cpu import TICK, thread_cpu, window_txns  # noqa: E402
from lag import PacedWorkload, PositionPoller, wait_caught_up  # noqa: E402

from connectors.kafka.client import committed_consumer  # noqa: E402
from connectors.kafka.topics import PARTITION, offset_range, topic_for  # noqa: E402
from pipeline.codec import Codec  # noqa: E402
from pipeline.framing import BEGIN, TXN_KEY  # noqa: E402
from schemas import load_schemas  # noqa: E402

DB = "app"


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def topic_txns(bs: str, codec: Codec, start: int) -> list[tuple[int, int, int]]:
    """(txn id, TxnBegin.source_time_ms, offset of its TxnCommit) of every committed txn from offset `start`."""
    from kafka.structs import TopicPartition

    tp = TopicPartition(topic_for(DB), PARTITION)
    consumer = committed_consumer(bs, None)
    consumer.assign([tp])
    consumer.seek(tp, start)
    end = consumer.end_offsets([tp])[tp]
    out: list[tuple[int, int, int]] = []
    begin: tuple[int, int] | None = None
    deadline = time.monotonic() + 120
    while consumer.position(tp) < end and time.monotonic() < deadline:
        for rec in consumer.poll(timeout_ms=500, max_records=20_000).get(tp, []):
            if rec.key != TXN_KEY:
                continue
            name, value = codec.decode(rec.value, database=DB)
            if name == BEGIN:
                begin = (value["txn_id"], value["source_time_ms"])
            elif begin is not None:
                out.append((begin[0], begin[1], rec.offset))
                begin = None
    consumer.close()
    return out


def phase(app, bs: str, root: Path, codec: Codec, args, variant: str, k: int) -> dict:
    env = env_with(bs)
    agent = spawn(agent_argv(app, *shlex.split(args.agent_args)), cwd=app.root, env=env, log=root / f"agent-{k}.log")
    replica = spawn(replica_argv(*shlex.split(variant)), cwd=app.root, env=env, log=root / f"replica-{k}.log")
    first_txn = wait_caught_up(app, bs, codec, timeout=180)
    _, start = offset_range(bs, DB)
    receipts = root / f"floor-{k}.json"
    argv = shlex.split(variant)
    paced = argv[argv.index("--min-interval") + 1] if "--min-interval" in argv else "0"
    floor = spawn(
        [
            sys.executable,
            str(BENCH / "_consume.py"),
            *(bs, topic_for(DB), f"bench-floor-{k}", str(start), str(receipts), paced),
        ],
        log=root / f"floor-{k}.log",
    )
    time.sleep(3)  # the floor consumer connects and reaches the end
    log(f"[{variant or 'defaults'}] caught up at txn {first_txn}; committing {args.rate} txn/s for {args.duration} s")
    poller = PositionPoller(app, every=0.002)
    pids = {"replica": replica.pid, "floor": floor.pid, "agent": agent.pid}
    cpu0, threads0, t0 = {n: cpu_split(p) for n, p in pids.items()}, thread_cpu(replica.pid), time.monotonic()
    wl = PacedWorkload(app, int(args.rate * args.duration), args.rate, 11 + k, not args.no_blobs)
    wl.wait(timeout=args.duration * 5 + 60)
    cpu1, threads1, t1 = {n: cpu_split(p) for n, p in pids.items()}, thread_cpu(replica.pid), time.monotonic()
    last_txn = wait_caught_up(app, bs, codec, timeout=180)
    poller.stop()
    stop(floor)
    for p in (replica, agent):
        stop(p)
    commits = wl.commit_times()
    txns = [t for t in topic_txns(bs, codec, start) if first_txn < t[0] <= last_txn]
    got = sorted(tuple(r) for r in json.loads(receipts.read_text()))
    got_offsets = [o for o, _ in got]
    seen = poller.seen
    seen_ids = sorted(seen)
    begins = [t[1] for t in txns]
    lag_replica, lag_floor = [], []
    for c in commits:
        i = bisect_left(begins, c * 1000)  # the first capture txn that began after the commit holds it
        if i >= len(txns):
            continue
        txn_id, _, commit_offset = txns[i]
        j = bisect_left(seen_ids, txn_id)  # position.json polls may skip a txn: the next one's time bounds it
        if j < len(seen_ids):
            lag_replica.append(seen[seen_ids[j]] / 1000 - c)
        j = bisect_left(got_offsets, commit_offset)
        if j < len(got):
            lag_floor.append(got[j][1] - c)
    window = t1 - t0
    cpu = {n: sum(cpu1[n]) - sum(cpu0[n]) for n in pids}
    threads = {name: threads1.get(name, 0.0) - threads0.get(name, 0.0) for name in threads1}
    return {
        "variant": variant or "(defaults)",
        "window": window,
        "commits": len(commits),
        "txns": len(txns),
        "cpu": cpu,
        "replica_sys": cpu1["replica"][1] - cpu0["replica"][1],
        "main": threads.get("main", 0.0),
        "lag_replica": lag_replica,
        "lag_floor": lag_floor,
        "flushes": len([t for t in seen_ids if first_txn < t <= last_txn]),
        "first_txn": first_txn,
        "last_txn": last_txn,
        # per capture txn, from TxnBegin.source_time_ms (stamped as the agent starts publishing it)
        "txn_floor": [got[j][1] - ms / 1000 for _, ms, o in txns if (j := bisect_left(got_offsets, o)) < len(got)],
        "txn_replica": [
            seen[seen_ids[j]] / 1000 - ms / 1000 for t, ms, _ in txns if (j := bisect_left(seen_ids, t)) < len(seen_ids)
        ],
    }


def chain_floor(app, bs: str, root: Path, codec: Codec, args, first_txn: int, last_txn: int) -> list[float]:
    """kafka-python alone, end to end: the capture txns first..last replayed at their pace by a bare
    transactional producer (bench/_replay.py) into a new topic that a bare consumer (bench/_consume.py)
    follows; per txn, begin_transaction -> the consumer received its last record. The app commits at
    the same rate meanwhile (no agent follows it), so the machine is as busy with PicoLisp as before."""
    from kafka.admin import KafkaAdminClient, NewTopic

    txns = window_txns(bs, codec, first_txn, last_txn)
    topic = f"pool.chainfloor{int(time.time()) % 100_000}"
    admin = KafkaAdminClient(bootstrap_servers=bs)
    admin.create_topics([NewTopic(topic, 1, 1)])
    admin.close()
    receipts, times, window = root / "chain-receipts.json", root / "chain-times.json", root / "chain-window.json"
    consumer = spawn(
        [sys.executable, str(BENCH / "_consume.py"), bs, topic, "bench-chain", "0", str(receipts)],
        log=root / "chain-consume.log",
    )
    time.sleep(3)
    window.write_text(json.dumps(txns))
    log(f"chain floor: replaying capture txns {first_txn}..{last_txn} ({len(txns)}) to {topic}")
    wl = PacedWorkload(app, int(args.rate * args.duration), args.rate, 99, not args.no_blobs)
    r = subprocess.run(
        [sys.executable, str(BENCH / "_replay.py"), bs, topic, str(window), "1", str(times)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wl.wait(timeout=args.duration * 5 + 60)
    if r.returncode != 0:
        raise SystemExit(f"replay failed: {r.stderr[-2000:]}")
    time.sleep(1)
    stop(consumer)
    got = sorted(tuple(x) for x in json.loads(receipts.read_text()))
    offsets = [o for o, _ in got]
    return [
        got[j][1] - began
        for began, _, last in json.loads(times.read_text())
        if (j := bisect_left(offsets, last)) < len(got)
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=200, help="PicoLisp commits per second")
    ap.add_argument("--duration", type=float, default=20, help="seconds of paced workload per phase")
    ap.add_argument("--initial", type=int, default=2000, help="txns committed before the agent starts")
    ap.add_argument("--variants", default="", help="'|'-separated extra replica arguments, one phase each")
    ap.add_argument("--agent-args", default="", help="extra capture-agent arguments (all phases)")
    ap.add_argument("--no-blobs", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    root = workdir("replica-cpu", keep=args.keep)
    codec = Codec(load_schemas())
    with kafka(root) as cluster:
        bs = cluster.bootstrap_servers
        app = new_app(root / "app")
        app.workload(args.initial, seed=1, blobs=not args.no_blobs)
        results = [phase(app, bs, root, codec, args, v.strip(), k) for k, v in enumerate(args.variants.split("|"))]
        verify = verify_replica(app)
        chain = chain_floor(app, bs, root, codec, args, results[0]["first_txn"] + 1, results[0]["last_txn"])

    print()
    rows = []
    for r in results:
        w = r["window"]
        pct = {n: 100 * s / w for n, s in r["cpu"].items()}
        rows.append(
            [
                r["variant"],
                f"{r['txns'] / w:.1f}",
                f"{r['flushes'] / w:.1f}",
                f"{pct['replica']:.1f}",
                f"{100 * r['main'] / w:.1f}",
                f"{100 * r['replica_sys'] / w:.1f}",
                f"{pct['floor']:.1f}",
                f"{pct['replica'] / pct['floor']:.1f}x" if pct["floor"] else "-",
                f"{1000 * (r['cpu']['replica'] - r['cpu']['floor']) / max(1, r['txns']):.2f}",
                f"{pct['agent']:.1f}",
                f"{percentile(r['lag_replica'], 50) * 1000:.0f} / {percentile(r['lag_replica'], 99) * 1000:.0f}",
                f"{percentile(r['lag_floor'], 50) * 1000:.0f} / {percentile(r['lag_floor'], 99) * 1000:.0f}",
            ]
        )
    print(
        table(
            [
                "replica arguments",
                "Kafka txns/s",
                "txns visible/s",
                "replica CPU %",
                "main thread %",
                "system %",
                "floor consumer %",
                "replica / floor",
                "replica - floor, ms/txn",
                "agent %",
                "commit->replica ms p50 / p99",
                "commit->floor ms p50 / p99",
            ],
            rows,
            title=f"replica at {args.rate} commits/s{' (no blobs)' if args.no_blobs else ''}; CPU: % of a core",
        )
    )
    print()
    ms = lambda v, p: f"{percentile(v, p) * 1000:.1f}"  # noqa: E731
    r0 = results[0]
    print(
        table(
            ["per Kafka transaction", "p50 ms", "p90 ms", "p99 ms"],
            [
                [
                    "kafka-python alone: begin_transaction -> a bare consumer has it",
                    *(ms(chain, p) for p in (50, 90, 99)),
                ],
                ["capture-agent: TxnBegin -> a bare consumer has it", *(ms(r0["txn_floor"], p) for p in (50, 90, 99))],
                [
                    "capture-agent + replica: TxnBegin -> visible in the replica",
                    *(ms(r0["txn_replica"], p) for p in (50, 90, 99)),
                ],
            ],
            title=f"the capture txns of the first phase ({r0['variant']}), replayed at their pace, the app committing",
        )
    )
    print(f"verify after the run: {verify}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
