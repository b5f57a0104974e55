"""Archive throughput vs raw boto3 put_object, and restore (and replica bootstrap) of a ~1 GiB pool vs raw download.

Starts a private Kafka and a private SeaweedFS. Publishes a synthetic change stream with the capture
agent's own producer (TopicSink): txn 1 is a snapshot of a `--pool-mib` pool (4 KiB blocks, about
half compressible like real pools), then `--txns` txns of `--blocks` changed blocks each, with real
rolling checksums. Then, timed in the same run:

- archive: the Archiver over a TopicSource (--once), exactly as `archive --once` wires it, with a
  base snapshot after the big txn; "archive" excludes the snapshot, which is timed on its own row;
- raw put: boto3 put_object of the same segment objects' bytes to the same server;
- restore: `restore` of the newest txn (base snapshot + segments, checksum verified per txn);
- replica bootstrap: `replica --archive` of an empty replica (the same restore, then adopted);
- raw download: boto3 download_file of the same objects (snapshot files + segments).

Ratios: archive / raw put throughput (goal >= 0.7x); restore time / raw download time (goal <= 2x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import kafka, log, mib, on_exit, table, workdir  # noqa: E402

from connectors.kafka.publisher import TopicSink
from connectors.kafka.reader import TopicSource
from connectors.kafka.topics import ensure_topic, topic_for  # noqa: E402
from connectors.s3.archiver import Archiver
from connectors.s3.restore import bootstrap, restore
from connectors.s3.store import ArchiveStore  # noqa: E402
from pipeline.archive import Rotation, SnapshotPolicy  # noqa: E402
from pipeline.codec import Codec  # noqa: E402
from pool_pipeline.devstack import _s3_client, free_port, start_s3  # noqa: E402
from schemas import load_schemas  # noqa: E402
from tests.pipeline_helpers import SYNTHETIC_BLOCK, synthetic_stream  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool-mib", type=int, default=1024, help="size of the snapshot txn / restored pool")
    ap.add_argument("--txns", type=int, default=400, help="update txns after the snapshot")
    ap.add_argument("--blocks", type=int, default=32, help="blocks per update txn")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    ap.add_argument("--profile", action="store_true", help="cProfile the archive run (main thread)")
    args = ap.parse_args()

    root = workdir("archive", keep=args.keep)
    codec = Codec(load_schemas())
    database = "bench"
    with kafka(root) as cluster:
        bs = cluster.bootstrap_servers
        port = free_port(with_grpc_offset=10000)
        s3 = start_s3(root / "s3", port=port, detach=False)
        on_exit(s3.stop)
        client = _s3_client(s3.endpoint_url, s3.access_key, s3.secret_key, s3.region)
        ensure_topic(bs, topic_for(database))

        t = time.monotonic()
        sink = TopicSink(bs, database, codec)
        for txn in synthetic_stream(
            database, args.pool_mib * 1024 * 1024 // SYNTHETIC_BLOCK, args.txns, args.blocks, 1
        ):
            sink.apply(txn)
        sink.close()
        log(f"published {mib(sink.bytes_sent):.0f} MiB in {time.monotonic() - t:.1f} s")

        store = ArchiveStore(client, s3.bucket, "bench", database)
        os.environ.update(
            AWS_ENDPOINT_URL_S3=s3.endpoint_url,
            AWS_ACCESS_KEY_ID=s3.access_key,
            AWS_SECRET_ACCESS_KEY=s3.secret_key,
            AWS_DEFAULT_REGION=s3.region,
        )
        # Segments of 64 MiB (the default); no automatic snapshot, so "archive" is the segment path alone.
        archiver = Archiver(
            store,
            codec,
            rotation=Rotation(),
            snapshots=SnapshotPolicy(0, 0),
            work_dir=root / "archive-work",
            topic=topic_for(database),
            log=lambda m: None,
        )
        start = archiver.resume()
        source = TopicSource(bs, database, codec, "archive", start, once=True)
        archiver.on_archived = lambda txn: (source.acknowledge(txn), source.offsets.flush())
        t = time.monotonic()
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(archiver.run, source.records())
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        else:
            archiver.run(source.records())
        archive_s = time.monotonic() - t
        source.close()
        seg_bytes = sum(s.size for s in archiver.archived)
        log(f"archived {len(archiver.archived)} segments, {mib(seg_bytes):.0f} MiB in {archive_s:.1f} s")

        # The ceiling on this side: a raw kafka-python consumer reading the same committed records.
        from kafka import TopicPartition

        from connectors.kafka.client import committed_consumer

        consumer = committed_consumer(bs, None)
        tp = TopicPartition(topic_for(database), 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        end = consumer.end_offsets([tp])[tp]
        t = time.monotonic()
        raw_bytes = 0
        while consumer.position(tp) < end:
            for rec in consumer.poll(timeout_ms=200, max_records=2000).get(tp, []):
                raw_bytes += len(rec.value) + len(rec.key or b"")
        raw_consume_s = time.monotonic() - t
        consumer.close()

        t = time.monotonic()
        archiver.write_snapshot(archiver.position.txn_id)  # type: ignore[union-attr]
        snapshot_s = time.monotonic() - t
        archiver.close()

        # Raw put of the same objects' bytes (read back first, so only the puts are timed).
        bodies = [(s.key(store.root), store.get(s.key(store.root))) for s in archiver.archived]
        t = time.monotonic()
        for key, body in bodies:
            client.put_object(Bucket=s3.bucket, Key="raw/" + key, Body=body)
        raw_put_s = time.monotonic() - t
        del bodies

        catalog = store.catalog()
        plan = catalog.plan()
        keys = [k for k, _ in store.list(plan.base.prefix(store.root))] if plan.base else []
        keys += [s.key(store.root) for s in plan.segments]
        down = Path(tempfile.mkdtemp(dir=root))
        t = time.monotonic()
        total = 0
        for i, key in enumerate(keys):
            client.download_file(Bucket=s3.bucket, Key=key, Filename=str(down / f"{i}"))
            total += (down / f"{i}").stat().st_size
        raw_down_s = time.monotonic() - t

        t = time.monotonic()
        position = restore(store, codec, root / "restored", topic=topic_for(database))
        restore_s = time.monotonic() - t
        log(f"restored {position} ({mib(total):.0f} MiB of objects)")

        # `replica --archive` on an empty replica: the same restore into its bootstrap dir, then adopted.
        from connectors.picolisp.replica import ReplicaDir

        replica = ReplicaDir(
            f"{root / 'replica' / 'db'}/", database, root / "replica" / "blob", topic=topic_for(database)
        )
        t = time.monotonic()
        bootstrapped = bootstrap(store, codec, replica, topic_for(database))
        bootstrap_s = time.monotonic() - t
        replica.close()
        assert bootstrapped == position, (bootstrapped, position)

    rows = [
        (
            "archive (Kafka -> Avro segments -> S3)",
            f"{mib(seg_bytes):.0f}",
            f"{archive_s:.2f}",
            f"{mib(seg_bytes) / archive_s:.1f}",
        ),
        (
            "raw boto3 put_object, same bytes",
            f"{mib(seg_bytes):.0f}",
            f"{raw_put_s:.2f}",
            f"{mib(seg_bytes) / raw_put_s:.1f}",
        ),
        (
            "raw kafka-python consumer, same records (uncompressed)",
            f"{mib(raw_bytes):.0f}",
            f"{raw_consume_s:.2f}",
            f"{mib(raw_bytes) / raw_consume_s:.1f}",
        ),
        (f"base snapshot ({args.pool_mib} MiB pool, materialise + upload)", "", f"{snapshot_s:.2f}", ""),
        (
            "restore newest (snapshot + segments, verified)",
            f"{mib(total):.0f}",
            f"{restore_s:.2f}",
            f"{mib(total) / restore_s:.1f}",
        ),
        (
            "replica --archive bootstrap (restore + adopt, verified)",
            f"{mib(total):.0f}",
            f"{bootstrap_s:.2f}",
            f"{mib(total) / bootstrap_s:.1f}",
        ),
        (
            "raw boto3 download_file, same objects",
            f"{mib(total):.0f}",
            f"{raw_down_s:.2f}",
            f"{mib(total) / raw_down_s:.1f}",
        ),
    ]
    print(table(("step", "MiB", "s", "MiB/s"), rows, title="archive and restore"))
    print(
        f"archive vs raw put: {raw_put_s / archive_s:.2f}x (goal >= 0.7x); "
        f"archive vs raw consume + raw put: {(raw_put_s + raw_consume_s) / archive_s:.2f}x"
    )
    print(f"restore vs raw download: {restore_s / raw_down_s:.2f}x the time (goal <= 2x)")
    print(f"replica bootstrap vs raw download: {bootstrap_s / raw_down_s:.2f}x the time (goal <= 2x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
