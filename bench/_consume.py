"""A bare read_committed kafka-python consumer that follows one topic, as the floor of the replica's CPU and lag.

    _consume.py BOOTSTRAP TOPIC GROUP START_OFFSET RECEIPTS.json [MIN_INTERVAL]

Used by bench/replica_cpu.py. It is built by the replica's consumer factory (connectors/kafka/client.py
committed_consumer: read_committed, no auto commit, 8 MiB partition fetches), polls as TopicSource
does (100 ms, up to 20,000 records), and commits its group offset asynchronously at most every
0.2 s, as OffsetCommitter does; with MIN_INTERVAL its fetches are paced as `replica --min-interval`
paces them. It decodes and writes nothing: what any kafka-python program pays to
receive these transactions. On SIGTERM it writes, per poll that returned records, [last offset,
wall-clock receive time] to RECEIPTS.json and exits.
"""

from __future__ import annotations

import json
import signal
import sys
import time

from kafka.structs import OffsetAndMetadata, TopicPartition

# The replica's own consumer factory, so the settings are the replica's: it returns a plain
# KafkaConsumer, and nothing of pool-pipeline runs after that.
from connectors.kafka.client import committed_consumer, paced_fetches


def main() -> int:
    bs, topic, group, start, path = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    min_interval = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    consumer = committed_consumer(bs, group, **paced_fetches(min_interval))
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, start)
    receipts: list[tuple[int, float]] = []
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    last_commit = 0.0
    while running[0]:
        recs = consumer.poll(timeout_ms=100, max_records=20_000).get(tp, [])
        if recs:
            receipts.append((recs[-1].offset, time.time()))
            if time.monotonic() - last_commit >= 0.2:
                consumer.commit_async({tp: OffsetAndMetadata(recs[-1].offset + 1, "", -1)})
                last_commit = time.monotonic()
    with open(path, "w") as fh:
        json.dump(receipts, fh)
    consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
