"""Replays recorded Kafka transactions at their original pace with a plain transactional kafka-python producer.

    _replay.py BOOTSTRAP TOPIC WINDOW.json METRICS(0|1) [TIMES.json]

Used by bench/agent_cpu.py as the floor: the producer is configured as the capture agent's TopicSink
(idempotent, acks=all, linger 5 ms, 1 MiB batches, retry backoff 10 ms), each recorded transaction is
one Kafka transaction sent at its original offset from the first, and the process's own CPU (all
threads) over the replay is printed as JSON. With TIMES.json, per transaction [wall-clock time of
begin_transaction, of commit_transaction's return, offset of its last record] is written there
(bench/replica_cpu.py matches it with a consumer's receipts: the transport floor of the lag).
"""

from __future__ import annotations

import json
import os
import sys
import time

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError


def main() -> int:
    bs, topic, path, metrics = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    times_path = sys.argv[5] if len(sys.argv) > 5 else None
    txns = json.loads(open(path).read())
    admin = KafkaAdminClient(bootstrap_servers=bs)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)])
    except TopicAlreadyExistsError:
        pass  # made by the caller, so that its consumer follows from the start
    admin.close()
    producer = KafkaProducer(
        bootstrap_servers=bs,
        transactional_id=f"bench-replay-{topic}",
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        batch_size=1024 * 1024,
        max_request_size=4 * 1024 * 1024,
        retry_backoff_ms=10,
        metrics_enabled=metrics,
    )
    producer.init_transactions()
    # Warm up (metadata, coordinator) outside the measured window.
    producer.begin_transaction()
    producer.send(topic, b"warm", partition=0)
    producer.commit_transaction()
    records = [[(bytes.fromhex(k) if k else None, bytes.fromhex(v)) for k, v in t["records"]] for t in txns]
    t0_ms = txns[0]["ms"] if txns else 0
    times: list[tuple[float, float, int]] = []
    cpu0, start = os.times(), time.monotonic()
    for t, recs in zip(txns, records):
        delay = start + (t["ms"] - t0_ms) / 1000 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        began = time.time()
        producer.begin_transaction()
        futures = [producer.send(topic, value, key=key, partition=0) for key, value in recs]
        producer.flush()
        producer.commit_transaction()
        times.append((began, time.time(), futures[-1].get().offset))
    wall = time.monotonic() - start
    cpu1 = os.times()
    producer.close()
    if times_path:
        with open(times_path, "w") as fh:
            json.dump(times, fh)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "cpu_pct": 100 * cpu / wall if wall else 0.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
