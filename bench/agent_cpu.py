"""The capture agent's CPU at a steady commit rate, against kafka-python's own floor for the same Kafka transactions.

    .venv/bin/python bench/agent_cpu.py [--rate 200] [--duration 20] [--min-intervals 0,0.1,0.25] [--no-blobs]
                                        [--encrypt]

A PicoLisp app commits at --rate (tests/lisp/app.l + workload.l's mix, paced by bench/lisp/paced.l)
while `capture-agent` follows it (the console script; one phase per `--min-interval` value). The
agent's CPU (user + system, all threads, from /proc/<pid>/stat; the main thread apart) is taken
over the paced window, and commit -> Kafka lag per PicoLisp commit: the producer timestamp of the
TxnCommit of the first capture txn that began after the commit, minus the commit's time.

The floor: bench/_replay.py replays the very Kafka transactions the agent published in that window
(its records, read back from the topic, already encoded) with a transactional kafka-python producer
configured as the agent's, at the same pace (each txn at its TxnBegin time offset), one Kafka
transaction each, and measures its own CPU. Nothing of pool-pipeline runs in it: it is what any
kafka-python program pays to publish these transactions. The agent's CPU minus the floor is what
the agent itself costs (journal, blobs, checksums, Avro encoding, state files). The floor is
measured with kafka-python's metrics on (the default, as in the agent) and off.

--encrypt runs every phase a second time with payload encryption (`capture-agent --encryption-key`,
a fresh key file), after all the plaintext phases: an agent without a key cannot read back an
encrypted topic, while one with a key reads back the plaintext it follows on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from bisect import bisect_left
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH,
    agent_argv,
    capture_pending,
    env_with,
    kafka,
    log,
    new_app,
    percentile,
    spawn,
    stop,
    table,
    workdir,
)
from lag import PacedWorkload  # noqa: E402

from connectors.kafka.client import committed_consumer  # noqa: E402
from connectors.kafka.topics import PARTITION, last_commit, topic_for  # noqa: E402
from connectors.keys import keygen, load_keyring  # noqa: E402
from pipeline.codec import Codec  # noqa: E402
from pipeline.framing import TXN_KEY  # noqa: E402
from schemas import load_schemas  # noqa: E402

DB = "app"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far per thread name (the main thread is named after the process)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        label = "main" if task.name == str(pid) else f"{name} {task.name}"  # Python does not name OS threads
        out[label] = out.get(label, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def wait_idle(app, bs: str, codec: Codec, timeout: float = 120) -> int:
    """Until the agent has published everything (nothing pending, the topic's last txn stable 1 s)."""
    deadline = time.monotonic() + timeout
    last_seen, since = None, None
    while time.monotonic() < deadline:
        last = last_commit(bs, DB, codec, timeout_s=10)
        txn = last.position.txn_id if last else None
        if not capture_pending(app) and txn is not None and txn == last_seen:
            if since and time.monotonic() - since >= 1.0:
                return txn
        else:
            since = time.monotonic()
        last_seen = txn
        time.sleep(0.2)
    raise SystemExit("the agent did not catch up")


def window_txns(bs: str, codec: Codec, first_txn: int, last_txn: int) -> list[dict]:
    """The committed transactions first..last as the topic holds them: begin time and raw records."""
    from kafka.structs import TopicPartition

    tp = TopicPartition(topic_for(DB), PARTITION)
    consumer = committed_consumer(bs, None)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end = consumer.end_offsets([tp])[tp]
    txns: list[dict] = []
    current: dict | None = None
    while consumer.position(tp) < end:
        for rec in consumer.poll(timeout_ms=1000, max_records=10_000).get(tp, []):
            if rec.key == TXN_KEY and current is None:
                _, value = codec.decode(rec.value, database=DB)
                if first_txn <= value["txn_id"] <= last_txn:
                    current = {"txn": value["txn_id"], "ms": value["source_time_ms"], "records": []}
            if current is not None:
                current["records"].append([rec.key.hex() if rec.key else None, rec.value.hex()])
                if rec.key == TXN_KEY and len(current["records"]) > 1:
                    current["sent_ms"] = rec.timestamp  # the producer's time of the TxnCommit send
                    txns.append(current)
                    current = None
    consumer.close()
    return txns


def replay(bs: str, root: Path, txns: list[dict], metrics: bool) -> dict:
    path = root / "window.json"
    path.write_text(json.dumps(txns))
    topic = f"pool.floor{int(time.time() * 1000) % 10_000_000}{'m' if metrics else ''}"
    r = subprocess.run(
        [sys.executable, str(BENCH / "_replay.py"), bs, topic, str(path), "1" if metrics else "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        raise SystemExit(f"replay failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def phase(
    app, bs: str, root: Path, codec: Codec, args, interval: float, seed: int, key_file: Path | None = None
) -> dict:
    extra = ["--min-interval", str(interval)] if interval else []
    extra += ["--encryption-key", str(key_file)] if key_file else []
    agent = spawn(agent_argv(app, *extra), cwd=app.root, env=env_with(bs), log=root / f"agent-{seed}.log")
    first = wait_idle(app, bs, codec)
    log(
        f"--min-interval {interval}: agent caught up at txn {first}; committing {args.rate} txn/s for {args.duration} s"
    )
    cpu0, t0, threads0 = cpu_seconds(agent.pid), time.monotonic(), thread_cpu(agent.pid)
    wl = PacedWorkload(app, int(args.rate * args.duration), args.rate, seed, not args.no_blobs)
    wl.wait(timeout=args.duration * 5 + 60)
    cpu1, t1, threads1 = cpu_seconds(agent.pid), time.monotonic(), thread_cpu(agent.pid)
    last = wait_idle(app, bs, codec)
    stop(agent)
    commits = wl.commit_times()
    txns = window_txns(bs, codec, first + 1, last)
    # commit -> in Kafka: each PicoLisp commit is in the first capture txn that began after it.
    begins = [t["ms"] for t in txns]
    lags = []
    for c in commits:
        i = bisect_left(begins, c * 1000)
        if i < len(txns):
            lags.append(txns[i]["sent_ms"] - c * 1000)
    log(f"{len(commits)} commits -> {len(txns)} capture txns; replaying them twice")
    window = t1 - t0
    return {
        "interval": interval,
        "encrypted": key_file is not None,
        "window": window,
        "commits": len(commits),
        "rate": (len(commits) - 1) / (commits[-1] - commits[0]) if len(commits) > 1 else float("nan"),
        "txns": txns,
        "agent_cpu_s": cpu1 - cpu0,
        "threads": {k: threads1.get(k, 0.0) - threads0.get(k, 0.0) for k in threads1},
        "lag_p50": percentile(lags, 50),
        "lag_p99": percentile(lags, 99),
        "floor": replay(bs, root, txns, metrics=True),
        "floor_nm": replay(bs, root, txns, metrics=False),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=200, help="PicoLisp commits per second")
    ap.add_argument("--duration", type=float, default=20, help="seconds of paced workload per phase")
    ap.add_argument("--initial", type=int, default=2000, help="txns committed before the agent starts")
    ap.add_argument(
        "--min-intervals",
        default="0,0.1,0.25",
        help="capture-agent --min-interval of each phase, comma separated (default 0,0.1,0.25)",
    )
    ap.add_argument("--no-blobs", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--encrypt", action="store_true", help="each phase again with --encryption-key")
    args = ap.parse_args()

    root = workdir("agent-cpu", keep=args.keep)
    key_file = root / "bench.key"
    keygen(key_file)
    # The bench reads the topic across both kinds of phases.
    codec = Codec(load_schemas(), keyring=load_keyring(key_file, allow_plaintext=True))
    intervals = [float(i) for i in args.min_intervals.split(",")]
    phases = [(i, None) for i in intervals] + ([(i, key_file) for i in intervals] if args.encrypt else [])
    with kafka(root) as cluster:
        bs = cluster.bootstrap_servers
        app = new_app(root / "app")
        app.workload(args.initial, seed=1, blobs=not args.no_blobs)
        results = [
            phase(app, bs, root, codec, args, interval, seed=7 + i % len(intervals), key_file=key)
            for i, (interval, key) in enumerate(phases)
        ]

    print()
    rows = []
    for r in results:
        w, n = r["window"], len(r["txns"])
        agent_pct = 100 * r["agent_cpu_s"] / w
        floor_pct = r["floor_nm"]["cpu_pct"]
        main_pct = 100 * r["threads"].get("main", 0.0) / w
        rows.append(
            [
                "yes" if r["encrypted"] else "no",
                f"{r['interval']:g}",
                f"{r['rate']:.0f}",
                f"{n / w:.1f}",
                f"{agent_pct:.1f}",
                f"{main_pct:.1f}",
                f"{agent_pct - main_pct:.1f}",
                f"{r['floor']['cpu_pct']:.1f} / {floor_pct:.1f}",
                f"{agent_pct / floor_pct:.1f}x",
                f"{1000 * (r['agent_cpu_s'] - r['floor_nm']['cpu_s']) / max(1, n):.2f}",
                f"{r['lag_p50']:.0f} / {r['lag_p99']:.0f}",
            ]
        )
    print(
        table(
            [
                "encrypted",
                "--min-interval s",
                "commits/s",
                "Kafka txns/s",
                "agent CPU %",
                "main thread %",
                "other threads %",
                "floor % (metrics on/off)",
                "agent / floor",
                "agent - floor, ms/txn",
                "commit->Kafka ms p50 / p99",
            ],
            rows,
            title=f"capture-agent at {args.rate} commits/s{' (no blobs)' if args.no_blobs else ''}; CPU: % of a core",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
