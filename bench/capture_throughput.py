"""Capture throughput: PoolSource + TopicSink versus a raw kafka-python producer, same bytes, same broker.

    .venv/bin/python bench/capture_throughput.py [--initial 20000] [--backlog 10000] [--rounds 3]
                                                 [--no-blobs] [--profile] [--no-cli] [--encrypt]

What runs (all in one run, against one private broker on 127.0.0.1):
 1. A PicoLisp app commits --initial transactions (no consumer), then the capture side (driven
    in-process as pool_pipeline.cli.capture_agent wires it: PoolSource -> pipeline.replicate -> TopicSink) publishes
    the bootstrap snapshot. Timed and reported separately ("snapshot").
 2. --rounds times: the app commits --backlog transactions (the journal holds MBs), then one
    capture round publishes the backlog as one Kafka transaction. The round is timed in parts:
      restart scan : re-reading the whole pool to rebuild the rolling checksum (PoolSource._resume);
                     only an agent that (re)starts pays it, a following agent never does;
      journal+read : journal lock/parse/pread of touched blocks/spool/truncate + blob spooling;
      publish      : TopicSink.apply = Avro encoding + producer.send + commit_transaction.
      (journal = PoolSource._take_journal, blobs = PoolSource._blob_changes: copying changed blobs
       to the agent's spool; for the snapshot most reading happens lazily inside publish.)
    "capture" = journal+read + publish (what a following agent spends per round).
 3. The records each capture wrote are read back (read_committed) and the very same (key, value)
    list is sent by raw KafkaProducers to a topic with the same config:
      raw txn   : transactional (implies idempotent), acks=all, linger 5 ms, batch 1 MiB -- the
                  same producer settings as TopicSink, one Kafka transaction (the fair baseline);
      raw plain : acks=all, not idempotent, not transactional, same batching, then flush().
 4. Unless --no-cli, one more backlog is published by the real `capture-agent --once` process
    (wall time including interpreter start, imports, init_transactions, last_commit, restart scan).

Ratio = capture MB/s / raw-txn MB/s (goal >= 0.8). Medians over the rounds.

--encrypt runs the capture (and the CLI round) with payload encryption (`--encryption-key`, a fresh
key file). Every run also times "raw txn+encode+seal": the raw+encode baseline with a sealing codec,
the same records, so the cost of AES-256-GCM shows in one run whatever --encrypt says. "capture CPU s"
is this process's CPU time (all threads) over a round; the CLI round reports the agent process's.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import resource
import subprocess
import sys
import time
from collections import defaultdict
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
    table,
    time_method,
    workdir,
)
from kafka import KafkaProducer  # noqa: E402
from kafka.structs import TopicPartition  # noqa: E402

from connectors.kafka.client import committed_consumer
from connectors.kafka.publisher import TopicSink
from connectors.kafka.topics import PARTITION, ensure_topic, topic_for  # noqa: E402
from connectors.keys import keygen, load_keyring  # noqa: E402
from connectors.picolisp.source import AgentLock, PoolSource  # noqa: E402
from pipeline.codec import Codec, StreamRecord  # noqa: E402
from pipeline.model import Position  # noqa: E402
from pipeline.replicate import replicate  # noqa: E402
from schemas import load_schemas  # noqa: E402

DB = "app"


def end_offset(bootstrap: str, topic: str) -> int:
    c = committed_consumer(bootstrap, None)
    try:
        tp = TopicPartition(topic, PARTITION)
        return c.end_offsets([tp])[tp]
    finally:
        c.close()


def read_range(bootstrap: str, topic: str, start: int, end: int) -> list[StreamRecord]:
    """The committed records in [start, end) (control records are skipped)."""
    c = committed_consumer(bootstrap, None)
    tp = TopicPartition(topic, PARTITION)
    out = []
    try:
        c.assign([tp])
        c.seek(tp, start)
        deadline = time.monotonic() + 60
        while c.position(tp) < end and time.monotonic() < deadline:
            for rec in c.poll(timeout_ms=200).get(tp, []):
                if rec.offset < end:
                    out.append(StreamRecord(topic, PARTITION, rec.offset, rec.key, rec.value))
        return out
    finally:
        c.close()


def producer_settings() -> dict:
    # Same batching as connectors.kafka.TopicSink so that only the work around the producer differs.
    return dict(acks="all", linger_ms=5, batch_size=1024 * 1024, max_request_size=4 * 1024 * 1024)


class RawProducers:
    def __init__(self, bootstrap: str) -> None:
        self.topic_txn = "pool.rawbench-txn"
        self.topic_plain = "pool.rawbench-plain"
        for t in (self.topic_txn, self.topic_plain):
            ensure_topic(bootstrap, t)
        self.txn = KafkaProducer(
            bootstrap_servers=bootstrap,
            client_id="bench-raw-txn",
            transactional_id="bench-raw-txn",
            enable_idempotence=True,
            **producer_settings(),
        )
        self.txn.init_transactions()
        self.plain = KafkaProducer(
            bootstrap_servers=bootstrap, client_id="bench-raw-plain", enable_idempotence=False, **producer_settings()
        )

    def send_txn(self, records: list[tuple[bytes, bytes]]) -> float:
        p, topic = self.txn, self.topic_txn
        t = time.perf_counter()
        p.begin_transaction()
        for key, value in records:
            p.send(topic, value=value, key=key, partition=PARTITION)
        p.commit_transaction()
        return time.perf_counter() - t

    def send_encoding(self, codec: Codec, txns: list) -> float:
        """Transactional like send_txn, but Avro-encoding each record just before send, as TopicSink does
        (the changes are preloaded in memory: no pool, journal or blob I/O)."""
        p, topic = self.txn, self.topic_txn
        t = time.perf_counter()
        p.begin_transaction()
        for txn in txns:
            txn.changes = iter(txn.changes_list)
            for key, value in codec.transaction_records(txn):
                p.send(topic, value=value, key=key, partition=PARTITION)
        p.commit_transaction()
        return time.perf_counter() - t

    def send_plain(self, records: list[tuple[bytes, bytes]]) -> float:
        p, topic = self.plain, self.topic_plain
        t = time.perf_counter()
        for key, value in records:
            p.send(topic, value=value, key=key, partition=PARTITION)
        p.flush()
        return time.perf_counter() - t

    def close(self) -> None:
        self.txn.close(timeout=10)
        self.plain.close(timeout=10)


def print_profile(prof: cProfile.Profile, what: str) -> None:
    """Top functions by own time, then the project's own functions by cumulative time (main thread only:
    kafka-python's sender thread is not profiled)."""
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    st.sort_stats("tottime").print_stats(25)
    st.sort_stats("cumulative").print_stats(r"/(pipeline|connectors|cli)/", 25)
    print(f"\ncProfile of {what}:")
    print(out.getvalue())


def instrument(source: PoolSource, sink: TopicSink, acc: dict) -> None:
    """Wrap the phases of one capture round with timers (instance attributes shadow the methods)."""

    for name in ("_resume", "_take_journal", "_blob_changes", "_transaction"):
        time_method(source, name, acc)
    time_method(sink, "apply", acc)

    scan = getattr(source, "_scan", None)
    if scan is None:
        return

    def timed_scan(*a, **k):
        it = scan(*a, **k)
        while True:
            t = time.perf_counter()
            try:
                block = next(it)
            except StopIteration:
                acc["_scan"] += time.perf_counter() - t
                return
            acc["_scan"] += time.perf_counter() - t
            yield block

    source._scan = timed_scan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--initial", type=int, default=20000, help="txns committed before the snapshot")
    ap.add_argument("--backlog", type=int, default=10000, help="txns committed per measured round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-blobs", action="store_true", help="workload without blob writes")
    ap.add_argument("--no-cli", action="store_true", help="skip the capture-agent --once round")
    ap.add_argument("--profile", action="store_true", help="cProfile the in-process capture rounds")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    ap.add_argument("--encrypt", action="store_true", help="capture with payload encryption (--encryption-key)")
    args = ap.parse_args()
    blobs = not args.no_blobs

    root = workdir("capture", keep=args.keep)
    log(f"workdir {root}")
    with kafka(root) as cluster:
        bs = cluster.bootstrap_servers
        topic = topic_for(DB)
        app = new_app(root / "app")
        key_file = root / "bench.key"
        keygen(key_file)
        keyring = load_keyring(key_file)
        plain_codec, sealed_codec = Codec(load_schemas()), Codec(load_schemas(), keyring=keyring)
        codec = sealed_codec if args.encrypt else plain_codec
        ensure_topic(bs, topic)
        raw = RawProducers(bs)

        t = time.monotonic()
        app.workload(args.initial, seed=1, blobs=blobs)
        log(
            f"initial workload {args.initial} txns in {time.monotonic() - t:.1f} s; "
            f"journal {mib(app.journal.stat().st_size):.1f} MiB"
        )

        sink = TopicSink(bs, DB, codec)
        lock = AgentLock(
            root / "agent-state", DB
        )  # as pool_pipeline.cli.capture_agent._capture (it also creates the state dir)
        source = PoolSource(
            app.prefix, app.journal, app.blob_dir, DB, root / "agent-state", once=True, log=lambda m: log(m)
        )
        acc: dict = defaultdict(float)
        instrument(source, sink, acc)
        prof = cProfile.Profile() if args.profile else None

        results = []  # dicts per measured publication

        def measure(label: str, run) -> None:
            start = end_offset(bs, topic)
            acc.clear()
            t0, cpu0 = time.perf_counter(), time.process_time()
            run()
            total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            end = end_offset(bs, topic)
            stream = read_range(bs, topic, start, end)
            recs = [(r.key, r.value) for r in stream]
            nbytes = sum(len(k) + len(v) for k, v in recs)
            # The same transactions decoded back into memory, for the encode-while-sending baseline.
            txns = []
            for txn in codec.read_transactions(iter(stream), DB):
                txn.changes_list = list(txn.changes)
                txns.append(txn)
            # Raw producers with the very same records.
            t_txn = raw.send_txn(recs)
            # AES-256-GCM alone (CPU, no Kafka): sealing these records' plaintext values.
            plain_values = []
            for txn in txns:
                txn.changes = iter(txn.changes_list)
                plain_values += [value for _, value in plain_codec.transaction_records(txn)]
            c0 = time.process_time()
            for value in plain_values:
                keyring.seal_record(value, DB)
            seal_cpu = time.process_time() - c0
            # Alternate which goes first: the second of two sends in a row met a busier broker here.
            if len(results) % 2:
                t_seal = raw.send_encoding(sealed_codec, txns)
                t_enc = raw.send_encoding(plain_codec, txns)
            else:
                t_enc = raw.send_encoding(plain_codec, txns)
                t_seal = raw.send_encoding(sealed_codec, txns)
            t_plain = raw.send_plain(recs)
            r = dict(
                label=label,
                records=len(recs),
                bytes=nbytes,
                total=total,
                t_txn=t_txn,
                t_plain=t_plain,
                t_enc=t_enc,
                t_seal=t_seal,
                cpu=cpu,
                seal_cpu=seal_cpu,
                **{k: v for k, v in acc.items()},
            )
            results.append(r)
            log(
                f"{label}: {len(recs)} records {mib(nbytes):.1f} MiB, total {total:.2f} s, "
                f"publish {acc.get('apply', 0):.2f} s, raw txn {t_txn:.2f} s, raw txn+encode {t_enc:.2f} s, "
                f"raw txn+encode+seal {t_seal:.2f} s, raw plain {t_plain:.2f} s, capture CPU {cpu:.2f} s, "
                f"sealing alone {seal_cpu:.3f} s CPU"
            )

        position = [Position(0, 0)]

        def run_once() -> None:
            position[0] = replicate(source, sink)

        measure("snapshot", run_once)

        for i in range(args.rounds):
            t = time.monotonic()
            app.workload(args.backlog, seed=100 + i, blobs=blobs)
            log(
                f"round {i + 1}: workload {args.backlog} txns in {time.monotonic() - t:.1f} s, journal "
                f"{mib(app.journal.stat().st_size):.1f} MiB"
            )

            def run_profiled() -> None:
                if prof:
                    prof.enable()
                try:
                    run_once()
                finally:
                    if prof:
                        prof.disable()

            measure(f"backlog {i + 1}", run_profiled)
        source.close()
        sink.close()
        lock.release()

        cli = None
        if not args.no_cli:
            app.workload(args.backlog, seed=999, blobs=blobs)
            start = end_offset(bs, topic)
            t0 = time.perf_counter()
            children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            encrypt = ["--encryption-key", str(key_file)] if args.encrypt else []
            r = subprocess.run(
                agent_argv(app, "--once", "--state-dir", str(root / "agent-state"), *encrypt),
                cwd=app.root,
                env=env_with(bs),
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            agent_cpu = (children.ru_utime - children0.ru_utime) + (children.ru_stime - children0.ru_stime)
            if r.returncode != 0:
                log(f"capture-agent --once failed rc={r.returncode}: {r.stderr[-2000:]}")
            end = end_offset(bs, topic)
            recs = [(r.key, r.value) for r in read_range(bs, topic, start, end)]
            nbytes = sum(len(k) + len(v) for k, v in recs)
            t_txn = raw.send_txn(recs)
            cli = dict(records=len(recs), bytes=nbytes, wall=wall, t_txn=t_txn, cpu=agent_cpu)
        raw.close()

    # ---- report -------------------------------------------------------------------------------
    for r in results:
        restart = r.get("_resume", 0) - r.get("_take_journal", 0) - r.get("_blob_changes", 0) - r.get("_transaction", 0)
        r["restart"] = max(0.0, restart) if r["label"] != "snapshot" else 0.0
        r["capture"] = r["total"] - r["restart"]
        r["read"] = r["capture"] - r.get("apply", 0)
    print()
    print(
        table(
            [
                "publication",
                "records",
                "MiB",
                "restart scan s",
                "journal s",
                "blobs s",
                "journal+read s",
                "publish s",
                "capture s",
                "raw txn s",
                "raw txn+encode s",
                "raw txn+encode+seal s",
                "raw plain s",
                "capture CPU s",
                "seal CPU s",
            ],
            [
                [
                    r["label"],
                    r["records"],
                    mib(r["bytes"]),
                    r["restart"],
                    r.get("_take_journal", 0),
                    r.get("_blob_changes", 0),
                    r["read"],
                    r.get("apply", 0),
                    r["capture"],
                    r["t_txn"],
                    r["t_enc"],
                    r["t_seal"],
                    r["t_plain"],
                    r["cpu"],
                    r["seal_cpu"],
                ]
                for r in results
            ],
            title="Times (capture = journal+read + publish; the restart scan is excluded, see docstring)",
        )
    )
    print()
    print(
        table(
            [
                "publication",
                "capture MiB/s",
                "capture rec/s",
                "raw txn MiB/s",
                "raw txn+enc MiB/s",
                "raw plain MiB/s",
                "capture/raw txn",
                "capture/raw plain",
                "publish/raw txn",
            ],
            [
                [
                    r["label"],
                    mib(r["bytes"]) / r["capture"],
                    r["records"] / r["capture"],
                    mib(r["bytes"]) / r["t_txn"],
                    mib(r["bytes"]) / r["t_enc"],
                    mib(r["bytes"]) / r["t_plain"],
                    r["t_txn"] / r["capture"],
                    r["t_plain"] / r["capture"],
                    r["t_txn"] / r.get("apply", 1),
                ]
                for r in results
            ],
            title="Throughput and ratios (ratio = raw time / capture time = capture MiB/s / raw MiB/s)",
        )
    )
    backlog = [r for r in results if r["label"] != "snapshot"]
    if backlog:
        ratio_txn = median([r["t_txn"] / r["capture"] for r in backlog])
        print()
        print(
            table(
                ["summary (median of the backlog rounds)", "value"],
                [
                    ["capture / raw txn producer (goal >= 0.8)", f"{ratio_txn:.2f}x"],
                    ["capture / raw plain producer", f"{median([r['t_plain'] / r['capture'] for r in backlog]):.2f}x"],
                    [
                        "capture incl. restart scan / raw txn",
                        f"{median([r['t_txn'] / r['total'] for r in backlog]):.2f}x",
                    ],
                    [
                        "publish only (TopicSink.apply) / raw txn",
                        f"{median([r['t_txn'] / r['apply'] for r in backlog]):.2f}x",
                    ],
                    [
                        "raw txn+encode / raw txn (Avro encoding cost)",
                        f"{median([r['t_txn'] / r['t_enc'] for r in backlog]):.2f}x",
                    ],
                    [
                        "raw txn+encode+seal / raw txn+encode (AES-256-GCM cost)",
                        f"{median([r['t_enc'] / r['t_seal'] for r in backlog]):.2f}x",
                    ],
                    [
                        "AES-256-GCM sealing alone, MiB/s of CPU",
                        f"{median([mib(r['bytes']) / max(r['seal_cpu'], 1e-9) for r in backlog]):.0f}",
                    ],
                    [
                        "sealing alone / capture CPU",
                        f"{median([r['seal_cpu'] / r['cpu'] for r in backlog]):.1%}",
                    ],
                    [
                        "capture CPU s per MiB" + (" (encrypted)" if args.encrypt else ""),
                        f"{median([r['cpu'] / mib(r['bytes']) for r in backlog]):.4f}",
                    ],
                    [
                        "share of capture time in journal+read",
                        f"{median([r['read'] / r['capture'] for r in backlog]):.0%}",
                    ],
                    ["goal", "MET" if ratio_txn >= 0.8 else "MISSED"],
                ],
            )
        )
    if cli:
        print(
            f"\ncapture-agent --once (process wall time, incl. startup + restart scan): {cli['records']} records "
            f"{mib(cli['bytes']):.1f} MiB in {cli['wall']:.2f} s = {mib(cli['bytes']) / cli['wall']:.1f} MiB/s; "
            f"raw txn {mib(cli['bytes']) / cli['t_txn']:.1f} MiB/s -> ratio {cli['t_txn'] / cli['wall']:.2f}x; "
            f"agent CPU {cli['cpu']:.2f} s" + (" (encrypted)" if args.encrypt else "")
        )
    if prof:
        print_profile(prof, "the backlog rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
