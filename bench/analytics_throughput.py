"""Analytics consumer throughput versus a raw kafka-python consumer reading the same topic, in the same run.

    .venv/bin/python bench/analytics_throughput.py [--initial 3000] [--txns 15000] [--window 1] [--runs 7] [--profile]

What runs (one run, one private broker on 127.0.0.1):
 1. A PicoLisp app commits --initial transactions; a capture-agent (follow mode, subprocess) publishes
    the bootstrap snapshot, then follows a --txns workload committed at full speed, so the topic
    holds one snapshot plus many capture transactions of realistic size. The agent is then stopped.
 2. The topic is read to its end by
      raw        a bare KafkaConsumer in a fresh consumer group (subscribe, read_committed, the same
                 fetch settings as connectors.kafka.committed_consumer), counting records and bytes;
      raw+decode the same plus Codec.read_transactions with every change materialised: the cost of
                 the wire format itself, which any consumer of it pays (context only);
      analytics  pool_pipeline.analytics.Analytics over a ChangeStream(once=True) in a fresh group,
                 in-process, exactly as `analytics --once` wires it: Avro decoding, transaction
                 framing, per-window statistics, and the exactly-once output: closed windows go
                 out every 0.5 s and when idle, in one Kafka transaction (stats records + group
                 offset); its time is split into kafka-python's poll, the output's transactions
                 and the rest (decoding, framing, statistics);
      CLI        the real `analytics --once` process (wall time incl. interpreter start), for reference.
    raw and analytics runs alternate (--runs each); medians are compared. Both timings start at the
    first record received (group join and stats topic creation excluded; join is reported apart).
Ratio = analytics MB/s / raw MB/s (goal >= 0.7).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    agent_argv,
    bin_path,
    env_with,
    kafka,
    log,
    median,
    mib,
    new_app,
    spawn,
    stop,
    table,
    time_method,
    wait_published,
    workdir,
)

from connectors.kafka.client import committed_consumer
from connectors.kafka.topics import last_commit, topic_for  # noqa: E402
from pipeline.codec import Codec, Record  # noqa: E402
from pool_pipeline.analytics import Analytics  # noqa: E402
from pool_pipeline.changes import ChangeStream  # noqa: E402
from schemas import load_schemas  # noqa: E402

DB = "app"


def raw_read(bs: str, topic: str, end: int, decode: Codec | None = None) -> dict:
    """A fresh group subscribes to the topic and reads it to `end`: records, bytes, join and read time.

    With `decode`: also Avro decoding and transaction framing (Codec.read_transactions, every change
    materialised), which any consumer of this format must do; for context, not the goal's baseline.
    """
    c = committed_consumer(bs, f"bench-raw-{uuid.uuid4().hex[:8]}")
    try:
        t0 = time.perf_counter()
        c.subscribe(topics=[topic])
        marks: dict[str, float] = {}
        counts = {"records": 0, "bytes": 0, "last": -1}

        def stream() -> Iterator[Record]:
            while counts["last"] < end - 1:
                for recs in c.poll(timeout_ms=200, max_records=2000).values():
                    marks.setdefault("first", time.perf_counter())
                    for r in recs:
                        counts["records"] += 1
                        counts["bytes"] += len(r.key or b"") + len(r.value or b"")
                        counts["last"] = r.offset
                        yield r

        if decode is None:
            for _ in stream():
                pass
        else:
            for txn in decode.read_transactions(stream(), DB):
                for _ in txn.changes:
                    pass
        t_end = time.perf_counter()
        return {
            "t": t_end - marks["first"],
            "join": marks["first"] - t0,
            "records": counts["records"],
            "bytes": counts["bytes"],
        }
    finally:
        c.close()


def analytics_read(bs: str, codec: Codec, window_ms: int, profile: bool) -> dict:
    stream = ChangeStream(
        bs, f"bench-analytics-{uuid.uuid4().hex[:8]}", databases=[DB], codec=codec, once=True, batches=True
    )  # as pool_pipeline.cli.analytics wires it
    marks: dict[str, float] = {}
    phases: dict[str, float] = {"poll": 0.0, "flush": 0.0, "txns": 0}
    time_method(stream.consumer, "poll", phases)  # inside kafka-python: fetch waits and record parsing
    real_poll = stream._poll

    def poll(timeout_ms: int) -> None:  # time the first records received, as for raw
        real_poll(timeout_ms)
        if "first" not in marks and any(stream._buffers.values()):
            marks["first"] = time.perf_counter()
            phases["poll"] = 0.0  # the group join is not counted

    stream._poll = poll  # type: ignore[method-assign]
    consumer = Analytics(
        stream,
        window_ms=window_ms,
        stats_topic_template="{topic}." + uuid.uuid4().hex[:6] + ".stats",
        log=lambda line: None,
    )
    time_method(consumer.kafka, "send", phases, "flush")  # the exactly-once output: Kafka transactions
    real_send = consumer.kafka.send

    def send(*a, **k) -> bool:
        phases["txns"] += 1
        return real_send(*a, **k)

    consumer.kafka.send = send  # type: ignore[method-assign]
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    try:
        if prof:
            prof.enable()
        windows = consumer.run()
        if prof:
            prof.disable()
        t_end = time.perf_counter()
    finally:
        consumer.close()
        stream.close()
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue(), file=sys.stderr)
    t = t_end - marks["first"]
    return {
        "t": t,
        "join": marks["first"] - t0,
        "windows": windows,
        "txns": consumer.txns,
        "poll": phases["poll"],
        "flush": phases["flush"],
        "ktxns": phases["txns"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--initial", type=int, default=3000, help="txns in the pool before the snapshot")
    ap.add_argument("--txns", type=int, default=15000, help="txns committed while the agent follows")
    ap.add_argument("--window", type=float, default=1.0, help="analytics window in seconds")
    ap.add_argument("--profile", action="store_true", help="cProfile the in-process analytics run")
    ap.add_argument("--no-cli", action="store_true", help="skip the `analytics --once` process run")
    ap.add_argument("--runs", type=int, default=7, help="interleaved raw/analytics runs (medians are reported)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    root = workdir("analytics", keep=args.keep)
    log(f"workdir {root}")
    with kafka(root) as cluster:
        bs = cluster.bootstrap_servers
        env = env_with(bs)
        codec = Codec(load_schemas())
        topic = topic_for(DB)
        app = new_app(root / "app")
        app.workload(args.initial, seed=1)
        agent = spawn(agent_argv(app), cwd=app.root, env=env, log=root / "agent.log")
        deadline = time.monotonic() + 60
        while True:
            try:
                if last_commit(bs, DB, codec, timeout_s=10) is not None:
                    break
            except Exception:  # noqa: BLE001 - the topic may not exist yet
                pass
            if time.monotonic() > deadline or agent.poll() is not None:
                raise SystemExit(f"the agent published no snapshot; see {root / 'agent.log'}")
            time.sleep(0.2)
        t = time.monotonic()
        wl = app.workload_proc(args.txns, seed=2)
        wl.wait(timeout=600)
        if wl.returncode != 0:
            raise SystemExit("workload failed")
        log(f"workload {args.txns} txns in {time.monotonic() - t:.1f} s while the agent followed")
        last = wait_published(app, bs, DB, codec)  # the agent has drained the journal and published everything
        stop(agent)
        end = last.offset + 1
        log(f"topic {topic}: {last.position.txn_id} txns, last commit at offset {last.offset}")

        # Interleaved runs, so that load from other processes on the shared machine hits both alike.
        raws, anas, decs = [], [], []
        for i in range(args.runs):
            decs.append(raw_read(bs, topic, end, decode=codec))
            raws.append(raw_read(bs, topic, end))
            log(f"raw: {raws[-1]['records']} records, {mib(raws[-1]['bytes']):.1f} MiB in {raws[-1]['t']:.2f} s")
            anas.append(analytics_read(bs, codec, max(1, round(args.window * 1000)), args.profile and i == 0))
            a = anas[-1]
            log(
                f"analytics: {a['txns']} txns, {a['windows']} windows in {a['t']:.2f} s (in poll {a['poll']:.2f} s, "
                f"in the output's {a['ktxns']} Kafka transactions {a['flush']:.3f} s)"
            )
        ana = dict(anas[0], **{k: median([a[k] for a in anas]) for k in ("t", "join", "poll", "flush")})
        cli = None
        if not args.no_cli:
            t = time.perf_counter()
            r = subprocess.run(
                [
                    bin_path("analytics"),
                    "--database",
                    DB,
                    "--group",
                    "bench-cli",
                    "--once",
                    "--window",
                    str(args.window),
                    "--stats-topic",
                    "{topic}.cli.stats",
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            cli = time.perf_counter() - t
            if r.returncode != 0:
                log(f"analytics --once failed rc={r.returncode}: {r.stderr[-1500:]}")

    nbytes = raws[0]["bytes"]
    raw_t = median([r["t"] for r in raws])
    dec_t = median([d["t"] for d in decs])
    rows = [
        (
            "raw kafka-python consumer",
            raw_t,
            mib(nbytes) / raw_t,
            raws[0]["records"] / raw_t,
            median([r["join"] for r in raws]),
            1.0,
        ),
        (
            "raw + Avro decode + framing",
            dec_t,
            mib(nbytes) / dec_t,
            raws[0]["records"] / dec_t,
            median([d["join"] for d in decs]),
            raw_t / dec_t,
        ),
        (
            "analytics (in-process)",
            ana["t"],
            mib(nbytes) / ana["t"],
            raws[0]["records"] / ana["t"],
            ana["join"],
            raw_t / ana["t"],
        ),
    ]
    if cli is not None:
        rows.append(
            (
                "analytics --once (process, wall)",
                cli,
                mib(nbytes) / cli,
                raws[0]["records"] / cli,
                float("nan"),
                raw_t / cli,
            )
        )
    print(
        table(
            ["reader", "seconds", "MiB/s", "records/s", "join s", "ratio"],
            rows,
            title=f"topic {topic}: {raws[0]['records']:,} records, {mib(nbytes):.1f} MiB, {ana['txns']:,} txns, "
            f"{ana['windows']} windows of {args.window:g} s (medians of {len(raws)} runs each)",
        )
    )
    print(
        f"\nanalytics time (medians): {ana['poll']:.2f} s in kafka-python's poll (the raw reader's whole time: "
        f"{raw_t:.2f} s), {ana['flush']:.3f} s in {ana['ktxns']:.0f} Kafka transaction(s), "
        f"{ana['t'] - ana['poll'] - ana['flush']:.2f} s decoding, framing and statistics"
    )
    ratio = raw_t / ana["t"]
    print(
        f"\nanalytics / raw throughput ratio: {ratio:.2f}x (goal >= 0.7x): {'met' if ratio >= 0.7 else 'MISSED'}; "
        f"analytics / (raw + decode): {dec_t / ana['t']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
