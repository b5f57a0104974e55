"""Run a console script (capture-agent or replica) with timing probes, for bench/lag.py.

    python bench/_probe.py <agent|replica> <events.log> -- <the CLI's own arguments>

The real CLI entry point runs unchanged; a few methods are wrapped (instance-independent class
attribute wrappers) to append one line per event to <events.log>, with wall-clock time.time():

  agent:   L <t_locked>               journal lock acquired by JournalConsumer (PoolSource._take_journal)
           J <t_start> <t_end> <n>    PoolSource._take_journal returned n block images
           P <txn> <t_start> <t_end> <records> <source_time_ms>
                                      TopicSink.apply = encode + send + commit_transaction
  replica: A <txn> <t_start> <t_staged> <t_applied> <fsyncs> <fsync_s> <changes> <begin offset> <batch>
                                      ReplicaDir.apply: start (the TxnBegin was fetched), redo staged
                                      and verified; ReplicaDir.flush: position.json written (the txn is
                                      visible, with the <batch> txns group-committed with it; fsyncs
                                      and fsync_s are the batch's, divided by <batch>)
           F <t> <n> <first offset> <last offset> <wait_s>
                                      KafkaConsumer.poll returned n > 0 records; wait_s = time spent
                                      inside poll() since the previous F (idle time of the replica)
           K <t_start> <t_end>        TopicSource.acknowledge (records the group offset; committed
                                      asynchronously at most every 0.2 s by OffsetCommitter)

Overhead: a formatted write per event (a few microseconds), line-buffered.

What-if switch (environment variable; it emulates a proposed change, to measure it):
  BENCH_NO_FSYNC=1                      replica: os.fsync becomes a no-op (UNSAFE; only to attribute
                                        how much of the apply time the fsyncs are)
"""

from __future__ import annotations

import os
import sys
import time


def _require(cls, *names: str) -> None:
    missing = [n for n in names if not hasattr(cls, n)]
    if missing:
        raise SystemExit(
            f"bench/_probe.py: {cls.__name__} has no {', '.join(missing)} any more; "
            "update the probe (or run bench/lag.py --mode plain)"
        )


def main() -> None:
    role, path = sys.argv[1], sys.argv[2]
    argv = sys.argv[sys.argv.index("--") + 1 :]
    out = open(path, "a", buffering=1)
    now = time.time

    if role == "agent":
        from connectors.kafka import publisher as kmod
        from connectors.picolisp import journal as picolisp
        from connectors.picolisp import source as pool_source

        _require(picolisp.JournalConsumer, "_lock")
        _require(pool_source.PoolSource, "_take_journal")
        _require(kmod.TopicSink, "apply")

        orig_lock = picolisp.JournalConsumer._lock

        def _lock(self, fd):
            orig_lock(self, fd)
            out.write(f"L {now():.6f}\n")

        picolisp.JournalConsumer._lock = _lock

        orig_take = pool_source.PoolSource._take_journal

        def _take_journal(self, *a, **k):
            t = now()
            images, layout = orig_take(self, *a, **k)
            out.write(f"J {t:.6f} {now():.6f} {len(images)}\n")
            return images, layout

        pool_source.PoolSource._take_journal = _take_journal

        orig_apply = kmod.TopicSink.apply

        def apply(self, txn):
            t = now()
            orig_apply(self, txn)
            out.write(f"P {txn.txn_id} {t:.6f} {now():.6f} {txn.change_count} {txn.source_time_ms}\n")

        kmod.TopicSink.apply = apply

        from pool_pipeline.cli.capture_agent import main as entry
    elif role == "replica":
        from connectors.kafka import reader as kmod
        from connectors.picolisp import replica as replica_dir

        _require(replica_dir.ReplicaDir, "_stage", "apply", "flush")
        _require(kmod.TopicSource, "acknowledge")
        stats = {"n": 0, "s": 0.0}
        orig_fsync = os.fsync

        no_fsync = bool(os.environ.get("BENCH_NO_FSYNC"))

        def fsync(fd):
            t = time.perf_counter()
            try:
                return None if no_fsync else orig_fsync(fd)
            finally:
                stats["n"] += 1
                stats["s"] += time.perf_counter() - t

        os.fsync = fsync

        # Group commit: apply() stages and verifies a txn; flush() (called by the loop when nothing more is
        # fetched, or by apply() at a batch cap) makes every staged txn visible. One A line per txn is
        # written at the flush that made it visible; the batch's fsyncs are shared out over its txns.
        orig_stage = replica_dir.ReplicaDir._stage
        started = {"t": 0.0}
        pending: list = []  # (txn, t_start, t_staged) staged since the last flush

        def _stage(self, txn, *a, **k):
            res = orig_stage(self, txn, *a, **k)
            pending.append((txn, started["t"], now()))
            return res

        replica_dir.ReplicaDir._stage = _stage

        orig_apply = replica_dir.ReplicaDir.apply

        def apply(self, txn):
            started["t"] = now()
            orig_apply(self, txn)

        replica_dir.ReplicaDir.apply = apply

        orig_flush = replica_dir.ReplicaDir.flush

        def flush(self):
            orig_flush(self)
            if not pending:
                return
            t = now()
            n = len(pending)
            for txn, t0, t_staged in pending:
                out.write(
                    f"A {txn.txn_id} {t0:.6f} {t_staged:.6f} {t:.6f} {stats['n'] / n:.3f} "
                    f"{stats['s'] / n:.6f} {txn.change_count} {txn.offset} {n}\n"
                )
            pending.clear()
            stats["n"], stats["s"] = 0, 0.0

        replica_dir.ReplicaDir.flush = flush

        from kafka import KafkaConsumer

        orig_poll = KafkaConsumer.poll

        waited = {"s": 0.0}

        def poll(self, *a, **k):
            t = time.perf_counter()
            res = orig_poll(self, *a, **k)
            waited["s"] += time.perf_counter() - t
            recs = [r for batch in res.values() for r in batch]
            if recs:
                out.write(f"F {now():.6f} {len(recs)} {recs[0].offset} {recs[-1].offset} {waited['s']:.6f}\n")
                waited["s"] = 0.0
            return res

        KafkaConsumer.poll = poll

        orig_ack = kmod.TopicSource.acknowledge

        def acknowledge(self, txn):
            t = now()
            orig_ack(self, txn)
            out.write(f"K {t:.6f} {now():.6f}\n")

        kmod.TopicSource.acknowledge = acknowledge

        from pool_pipeline.cli.replica import main as entry
    else:
        raise SystemExit(f"unknown role {role!r}")
    sys.argv = [role, *argv]
    entry(argv)


if __name__ == "__main__":
    main()
