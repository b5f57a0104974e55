"""Replica apply throughput versus a raw read_committed kafka-python consumer on the same topic.

    .venv/bin/python bench/replica_throughput.py [--initial 5000] [--txns 20000] [--profile] [--no-cli]

What runs (one run, one private broker on 127.0.0.1):
 1. A PicoLisp app commits --initial transactions; a capture-agent (follow mode, subprocess) publishes
    the bootstrap snapshot, then follows a --txns workload committed at full speed, so the topic
    holds one snapshot plus many capture transactions of realistic size. The agent is then stopped.
 2. The topic is read to its end by
      raw          a bare KafkaConsumer, read_committed, with the replica's own fetch settings
                   (connectors.kafka.committed_consumer), counting records and bytes;
      raw+decode   the same, plus Avro decoding and transaction framing (Codec.read_transactions,
                   every change materialised): what any consumer of this format must do;
      replica      ReplicaDir(group_commit=True) + TopicSource(once) + pipeline.replicate, in-process,
                   into an empty target, exactly as pool_pipeline.cli.replica._replica wires it (phases timed:
                   stage+verify, group commit (flush: fsync, replay), group offset commit);
      replica CLI  the real `replica --once` process into another empty target (wall time, incl.
                   interpreter start and imports), unless --no-cli.
      what-ifs     with --what-if: the in-process replica again (fresh targets) with proposed changes
                   emulated by patching: group offsets committed with commit_async; and that plus
                   os.fsync as a no-op (UNSAFE, only to attribute the fsync cost).
    raw runs before and after the replica; the median is the baseline.
 3. verify compares the in-process replica with the source pool.
Ratio = replica MB/s / raw MB/s (goal >= 0.8), for the whole topic and for the part after the
snapshot (incremental txns), and txn/s.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    agent_argv,
    env_with,
    kafka,
    log,
    median,
    mib,
    new_app,
    replica_argv,
    spawn,
    stop,
    table,
    time_method,
    verify_replica,
    wait_published,
    workdir,
)
from kafka.structs import TopicPartition  # noqa: E402

from connectors.kafka.client import committed_consumer
from connectors.kafka.reader import TopicSource
from connectors.kafka.topics import PARTITION, last_commit, topic_for  # noqa: E402
from connectors.picolisp.replica import ReplicaDir  # noqa: E402
from pipeline.codec import Codec, Record  # noqa: E402
from pipeline.replicate import replicate  # noqa: E402
from schemas import load_schemas  # noqa: E402

DB = "app"


def raw_read(bs: str, topic: str, split_offset: int, decode: Codec | None = None) -> dict:
    """Read the whole topic read_committed; time to pass split_offset (end of the snapshot) and to the end."""
    tp = TopicPartition(topic, PARTITION)
    c = committed_consumer(bs, None)
    try:
        c.assign([tp])
        end = c.end_offsets([tp])[tp]
        c.seek_to_beginning(tp)
        records = nbytes = 0
        t_split = None
        split_bytes = 0
        t0 = time.perf_counter()

        def stream() -> Iterator[Record]:
            while c.position(tp) < end:
                yield from c.poll(timeout_ms=200, max_records=2000).get(tp, [])

        it = stream()
        if decode is not None:
            txns = 0
            for txn in decode.read_transactions(it, DB):
                for _ in txn.changes:
                    pass
                txns += 1
                if t_split is None and txn.end_offset is not None and txn.end_offset >= split_offset:
                    t_split = time.perf_counter() - t0
            # bytes are counted by the plain run
            return {"t": time.perf_counter() - t0, "t_split": t_split, "txns": txns}
        for r in it:
            records += 1
            nbytes += len(r.key or b"") + len(r.value or b"")
            if t_split is None and r.offset >= split_offset:
                t_split = time.perf_counter() - t0
                split_bytes = nbytes
        return {
            "t": time.perf_counter() - t0,
            "t_split": t_split,
            "records": records,
            "bytes": nbytes,
            "split_bytes": split_bytes,
        }
    finally:
        c.close()


def instrument(sink: ReplicaDir, source: TopicSource, acc: dict) -> None:
    for name in ("apply", "_stage", "flush", "_replay"):
        time_method(sink, name, acc)
    time_method(source, "acknowledge", acc)
    real_fsync = os.fsync

    def fsync(fd):
        t = time.perf_counter()
        try:
            return real_fsync(fd)
        finally:
            acc["fsync"] += time.perf_counter() - t
            acc["fsyncs"] += 1

    os.fsync = fsync


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--initial", type=int, default=5000, help="txns in the pool before the snapshot")
    ap.add_argument("--txns", type=int, default=20000, help="txns committed while the agent follows")
    ap.add_argument("--no-blobs", action="store_true")
    ap.add_argument("--no-cli", action="store_true", help="skip the `replica --once` process run")
    ap.add_argument("--profile", action="store_true", help="cProfile the in-process replica")
    ap.add_argument(
        "--what-if",
        action="store_true",
        help="also run the in-process replica with async acks, and with async acks + no fsync",
    )
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    blobs = not args.no_blobs

    root = workdir("replica", keep=args.keep)
    log(f"workdir {root}")
    with kafka(root) as cluster:
        bs = cluster.bootstrap_servers
        env = env_with(bs)
        codec = Codec(load_schemas())
        topic = topic_for(DB)
        app = new_app(root / "app")
        app.workload(args.initial, seed=1, blobs=blobs)
        agent = spawn(agent_argv(app), cwd=app.root, env=env, log=root / "agent.log")
        deadline = time.monotonic() + 60
        while (last_commit(bs, DB, codec, timeout_s=10) if topic_exists(bs, topic) else None) is None:
            if time.monotonic() > deadline or agent.poll() is not None:
                raise SystemExit(f"the agent published no snapshot; see {root / 'agent.log'}")
            time.sleep(0.2)
        snap = last_commit(bs, DB, codec)
        t = time.monotonic()
        wl = app.workload_proc(args.txns, seed=2, blobs=blobs)
        wl.wait(timeout=600)
        if wl.returncode != 0:
            raise SystemExit(f"workload failed: {wl.stderr.read()[-2000:] if wl.stderr else ''}")
        log(f"workload {args.txns} txns in {time.monotonic() - t:.1f} s while the agent followed")
        last = wait_published(app, bs, DB, codec)  # the agent has drained the journal and published everything
        stop(agent)
        log(
            f"topic {topic}: snapshot = txn 1 (commit offset {snap.offset}); last txn {last.position.txn_id} "
            f"at offset {last.offset}"
        )

        raws = [raw_read(bs, topic, snap.offset)]
        log(f"raw read: {raws[0]['records']} records {mib(raws[0]['bytes']):.1f} MiB in {raws[0]['t']:.2f} s")

        # --- the replica, in-process --------------------------------------------------------------
        target = app.root / "rpl/db/app/"
        sink = ReplicaDir(str(target) + "/", DB, app.root / "rpl/blob/app/", topic=topic, group_commit=True)
        source = TopicSource(bs, DB, codec, "bench-replica", sink.next_offset, once=True)
        flushes = [0]
        real_flush = sink.flush

        def counting_flush():
            flushes[0] += int(sink.pending() > 0)
            real_flush()

        sink.flush = counting_flush
        acc: dict = defaultdict(float)
        real_fsync = os.fsync
        instrument(sink, source, acc)
        marks = {}

        def on_applied(txn):
            if txn.txn_id == 1:
                marks["split"] = time.perf_counter()
                marks.update({f"{k}@split": v for k, v in list(acc.items()) if "@" not in k})

        prof = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        final = replicate(source, sink, on_applied=on_applied)
        if prof:
            prof.disable()
        t_replica = time.perf_counter() - t0
        os.fsync = real_fsync
        acc = dict(acc)  # nothing later adds to these figures
        source.close()
        sink.close()
        log(f"replica in-process: at {final} in {t_replica:.2f} s")

        raws.append(raw_read(bs, topic, snap.offset))
        dec = raw_read(bs, topic, snap.offset, decode=codec)
        cli = None
        if not args.no_cli:
            t = time.perf_counter()
            r = subprocess.run(
                replica_argv("--once", "--group", "bench-cli", target="rpl2/db/app/", blob="rpl2/blob/app/"),
                cwd=app.root,
                env=env,
                capture_output=True,
                text=True,
            )
            cli = time.perf_counter() - t
            if r.returncode != 0:
                log(f"replica --once failed rc={r.returncode}: {r.stderr[-1500:]}")
        what_ifs = []
        if args.what_if:
            for label, async_ack, no_fsync in (
                ("WHAT-IF async acks", True, False),
                ("WHAT-IF async acks + NO FSYNC (unsafe)", True, True),
            ):
                t_all, t_split = what_if_replica(app, bs, codec, topic, f"wi{len(what_ifs)}", async_ack, no_fsync)
                what_ifs.append((label, t_all, t_split))
                log(f"{label}: {t_all:.2f} s")
        raws.append(raw_read(bs, topic, snap.offset))
        verify = verify_replica(app)

    # ---- report -------------------------------------------------------------------------------
    raw = raws[0]
    nbytes, records, split_bytes = raw["bytes"], raw["records"], raw["split_bytes"]
    txns = final.txn_id
    t_raw = median([r["t"] for r in raws])
    t_raw_split = median([r["t_split"] for r in raws])
    t_rep_split = marks["split"] - t0
    inc_bytes = nbytes - split_bytes
    rows = []

    def row(name, t, t_split):
        t_inc = t - t_split
        rows.append(
            [
                name,
                t,
                nbytes and mib(nbytes) / t,
                txns / t,
                mib(split_bytes) / t_split,
                mib(inc_bytes) / t_inc,
                (txns - 1) / t_inc,
                t_raw / t,
                (t_raw - t_raw_split) / t_inc,
            ]
        )

    for i, r in enumerate(raws):
        row(f"raw consumer #{i + 1}", r["t"], r["t_split"])
    row("raw + Avro decode", dec["t"], dec["t_split"])
    row("replica (in-process)", t_replica, t_rep_split)
    for label, t_all, t_split in what_ifs:
        row(label, t_all, t_split)
    print()
    print(
        table(
            [
                "reader",
                "s",
                "MiB/s",
                "txn/s",
                "snapshot MiB/s",
                "incr MiB/s",
                "incr txn/s",
                "ratio vs raw",
                "incr ratio",
            ],
            rows,
            title=f"Reading topic {topic}: {records:,} records, {mib(nbytes):.1f} MiB, {txns} txns "
            f"(snapshot {mib(split_bytes):.1f} MiB + {txns - 1} incremental txns "
            f"{mib(inc_bytes):.1f} MiB, {mib(inc_bytes) / max(1, txns - 1) * 1024:.0f} KiB/txn)",
        )
    )
    inc = {
        k: acc.get(k, 0) - marks.get(f"{k}@split", 0)
        for k in ("apply", "_stage", "flush", "_replay", "acknowledge", "fsync", "fsyncs")
    }
    n_inc = max(1, txns - 1)
    print()
    t_inc = t_replica - t_rep_split

    def phase(name: str, seconds: float) -> list[object]:
        return [name, seconds, seconds / n_inc * 1000, seconds / t_inc]

    print(
        table(
            ["replica phase (incremental txns)", "total s", "ms/txn", "share"],
            [
                phase("_stage: decode+redo write+checksum+verify", inc["_stage"]),
                phase(f"flush: group commit ({n_inc / max(1, flushes[0] - 1):.1f} txns per batch)", inc["flush"]),
                phase("  _replay: pwrite+fsync+position", inc["_replay"]),
                phase(f"  fsync, all ({inc['fsyncs'] / n_inc:.2f} per txn)", inc["fsync"]),
                phase("acknowledge (sync group offset commit)", inc["acknowledge"]),
                phase("everything (incremental part)", t_inc),
            ],
        )
    )
    ratio = t_raw / t_replica
    print(f"\nreplica / raw consumer (whole topic): {ratio:.2f}x  (goal >= 0.8: {'MET' if ratio >= 0.8 else 'MISSED'})")
    print(
        f"replica / raw consumer (incremental part): {(t_raw - t_raw_split) / (t_replica - t_rep_split):.2f}x; "
        f"snapshot part: {t_raw_split / t_rep_split:.2f}x"
    )
    if cli:
        print(
            f"replica --once process (wall, incl. startup): {cli:.2f} s = {mib(nbytes) / cli:.1f} MiB/s, "
            f"{txns / cli:.0f} txn/s -> ratio {t_raw / cli:.2f}x"
        )
    print(f"verify: {verify}")
    if prof:
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumulative").print_stats(r"/(pipeline|connectors|cli)/", 20)
        print("\ncProfile of the in-process replica (main thread):")
        print(out.getvalue())
    return 0


def what_if_replica(
    app, bs: str, codec: Codec, topic: str, name: str, async_ack: bool, no_fsync: bool
) -> tuple[float, float]:
    """The in-process replica into a fresh target, with proposed changes emulated by patching:
    async_ack = group offsets via commit_async (connectors.kafka.commit_applied); no_fsync = os.fsync
    does nothing (UNSAFE; attributes the fsync cost). Returns (total s, s until the snapshot applied)."""
    import json as _json

    from kafka.structs import OffsetAndMetadata

    import connectors.kafka.reader as kmod

    saved_commit, saved_fsync, saved_ack = getattr(kmod, "commit_applied", None), os.fsync, TopicSource.acknowledge

    def commit_async(consumer, tp, txn):
        meta = _json.dumps({"txn": txn.txn_id, "source_time_ms": txn.source_time_ms})
        consumer.commit_async({tp: OffsetAndMetadata(txn.end_offset + 1, meta, -1)})

    try:
        if async_ack:
            if saved_commit is not None:
                kmod.commit_applied = commit_async
            else:
                TopicSource.acknowledge = lambda self, txn: commit_async(self.consumer, self.tp, txn)
        if no_fsync:
            os.fsync = lambda fd: None
        sink = ReplicaDir(
            str(app.root / name / "db/app") + "/", DB, app.root / name / "blob/app", topic=topic, group_commit=True
        )
        source = TopicSource(bs, DB, codec, f"bench-{name}", sink.next_offset, once=True)
        split = {}
        t0 = time.perf_counter()
        replicate(
            source, sink, on_applied=lambda txn: split.setdefault("t", time.perf_counter()) if txn.txn_id == 1 else None
        )
        total = time.perf_counter() - t0
        source.close()
        sink.close()
        return total, split["t"] - t0
    finally:
        if saved_commit is not None:
            kmod.commit_applied = saved_commit
        TopicSource.acknowledge = saved_ack
        os.fsync = saved_fsync


def topic_exists(bs: str, topic: str) -> bool:
    c = committed_consumer(bs, None)
    try:
        return topic in c.topics()
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())
