"""archive and restore end to end: real Kafka, real SeaweedFS S3, real journaled PicoLisp pools, the CLIs."""

from __future__ import annotations

import io
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.picolisp.blobs import compare_blob_trees
from connectors.picolisp.format import compare_pools
from connectors.s3.store import ArchiveStore
from pipeline.archive import SegmentWriter, read_segment
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp, copy_pool
from tests.pipeline_helpers import BIN, Cli, codec, committed_transactions, ok, unique_name, wait_for

pytestmark = pytest.mark.integration


def s3_env(s3: Any) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL_S3": s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_DEFAULT_REGION": s3.region,
    }


@pytest.fixture
def cli(app: PicoApp, kafka: Any, s3: Any, request: pytest.FixtureRequest) -> Any:
    name = request.node.originalname.removeprefix("test_").replace("_", "-")[:40]
    c = Cli(app.root, kafka.bootstrap_servers, unique_name(name), extra_env=s3_env(s3))
    yield c
    c.stop_all()


def archive_args(
    cli: Cli, bucket: str, *extra: str, action: str = "run", prefix: str = "arch", work: str = "archive-work"
) -> list[str]:
    return [
        str(BIN / "archive"),
        action,
        "--database",
        cli.database,
        "--bucket",
        f"s3://{bucket}/{prefix}",
        "--work-dir",
        work,
        *extra,
    ]


def restore_args(cli: Cli, bucket: str, *extra: str, prefix: str = "arch") -> list[str]:
    return [str(BIN / "restore"), "--database", cli.database, "--bucket", f"s3://{bucket}/{prefix}", *extra]


def source_copy(app: PicoApp, dest: Path) -> Path:
    """The source pool and blobs as they are now (call with no agent or workload running)."""
    copy_pool(app.prefix, dest / "db")
    shutil.copytree(app.blob_dir, dest / "blob", ignore=shutil.ignore_patterns(".*"))
    return dest


def assert_same(expected: Path, restored: Path, app: PicoApp) -> None:
    diffs = compare_pools(f"{expected / 'db'}/", f"{restored / 'db'}/") + compare_blob_trees(
        expected / "blob", restored / "blob"
    )
    assert diffs == [], diffs
    # PicoLisp opens the restored pool and sees the same objects and blobs.
    assert app.query(restored / "db", restored / "blob") == app.query(expected / "db", expected / "blob")


def run_stage(cli: Cli, app: PicoApp, txns: int, seed: int, sleep_ms: int = 5) -> int:
    """Commit `txns` PicoLisp txns while the agent follows, then drain the journal; the last txn id."""
    agent = cli.start_agent()
    wait_for(lambda: "topic is at" in agent.stdout(), 60, "the agent to start")
    wl = app.workload_proc(txns, seed=seed, sleep_ms=sleep_ms)
    out, err = wl.communicate(timeout=180)
    assert wl.returncode == 0, f"workload failed: {out[-500:]} {err[-1500:]}"
    agent.stop()
    ok(cli.agent_once(), "capture-agent --once")
    return committed_transactions(cli.bootstrap_servers, cli.database)[-1].txn_id


def store_for(s3_client: Any, bucket: str, prefix: str, database: str) -> ArchiveStore:
    return ArchiveStore(s3_client, bucket, prefix, database)


def archived_txn_ids(store: ArchiveStore) -> list[int]:
    """Every txn id held in the archive's segments, in object order (duplicates kept, to be caught)."""
    c = codec()
    ids = []
    for seg in store.catalog().segments:
        key = seg.key(store.root)
        for txn in c.read_transactions(
            read_segment(io.BytesIO(store.get(key)), store.database, "t", key), store.database
        ):
            for _ in txn.changes:
                pass
            ids.append(txn.txn_id)
    return ids


def objects(store: ArchiveStore, under: str) -> dict[str, bytes]:
    return {key[len(store.root) :]: store.get(key) for key, _ in store.list(f"{store.root}/{under}")}


# --- point-in-time restore, listing, retention ---------------------------------------------------


def test_point_in_time_restore_is_byte_identical_at_first_middle_latest_and_by_time(
    app: PicoApp, cli: Cli, s3: Any, s3_client: Any, tmp_path: Path
) -> None:
    states = tmp_path / "states"
    app.workload(25, seed=1)
    ok(cli.agent_once(), "capture-agent --once")  # txn 1: the bootstrap snapshot
    assert committed_transactions(cli.bootstrap_servers, cli.database)[-1].txn_id == 1
    first = source_copy(app, states / "t1")
    t2 = run_stage(cli, app, 120, seed=2)
    middle = source_copy(app, states / "t2")
    t3 = run_stage(cli, app, 120, seed=3)
    latest = source_copy(app, states / "t3")
    assert 1 < t2 < t3, (t2, t3)

    # How many txns the agent cut the workload into depends on timing: aim for about 3 snapshots.
    every = str(max(20, t3 // 3))
    ok(
        cli.run(
            archive_args(
                cli,
                s3.bucket,
                "--once",
                "--segment-txns",
                "10",
                "--snapshot-every-txns",
                every,
                "--snapshot-every-bytes",
                "0",
            )
        ),
        "archive --once",
    )
    store = store_for(s3_client, s3.bucket, "arch", cli.database)
    catalog = store.catalog()
    assert len(catalog.segments) >= 5 and len(catalog.snapshots) >= 2, (catalog.segments, catalog.snapshots)
    # Every committed txn archived exactly once, whole, in keys that carry their txn range.
    assert archived_txn_ids(store) == list(range(1, t3 + 1))
    for seg in catalog.segments:
        assert f"_txn{seg.first_txn:012d}-{seg.last_txn:012d}_" in seg.key(store.root)
    # Running again adds nothing: the archive (S3) is the truth.
    before = objects(store, "segments/")
    ok(cli.run(archive_args(cli, s3.bucket, "--once", "--segment-txns", "10")), "archive --once again")
    assert objects(store, "segments/") == before

    listing = ok(cli.run(archive_args(cli, s3.bucket, action="ls")), "archive ls").stdout
    assert f"txns 1-{t3}" in listing and "base snapshots: " in listing, listing
    assert ok(cli.run(restore_args(cli, s3.bucket, "--list")), "restore --list").stdout == listing

    for txn, expected in ((1, first), (t2, middle), (None, latest)):
        target = tmp_path / f"restored-{txn}"
        extra = ["--txn", str(txn)] if txn else []
        result = ok(cli.run(restore_args(cli, s3.bucket, "--target", str(target), *extra)), f"restore {txn}")
        assert f"txn {txn or t3} " in result.stdout, result.stdout
        assert "MiB" in result.stderr and "txns applied" in result.stderr, result.stderr  # progress
        assert_same(expected, target, app)

    # By time: the source time of txn t2 restores exactly t2.
    t2_time = next(t for t in committed_transactions(cli.bootstrap_servers, cli.database) if t.txn_id == t2)
    when = t2_time.source_time_ms
    assert (
        next(
            t for t in committed_transactions(cli.bootstrap_servers, cli.database) if t.txn_id == t2 + 1
        ).source_time_ms
        > when
    )
    target = tmp_path / "restored-by-time"
    result = ok(cli.run(restore_args(cli, s3.bucket, "--target", str(target), "--time", str(when))), "restore --time")
    assert f"txn {t2} " in result.stdout, result.stdout
    assert_same(middle, target, app)

    # A txn that is not archived: a clear error saying what is, and no target.
    target = tmp_path / "restored-missing"
    result = cli.run(restore_args(cli, s3.bucket, "--target", str(target), "--txn", str(t3 + 50)))
    assert result.returncode == 1
    assert f"txn {t3 + 50}" in result.stderr and f"restorable: txns 1-{t3}" in result.stderr, result.stderr
    assert not target.exists()

    # Retention: keep the newest snapshot. A dry run deletes nothing; the real run keeps what the
    # retained restore points need, and the latest still restores byte-identical.
    newest = catalog.snapshots[-1]
    # The files of a snapshot an archiver was killed while writing (no manifest) are garbage too.
    orphan = f"{store.root}/snapshots/{newest.txn - 1:012d}_ms{newest.time_ms:013d}/db/@"
    s3_client.put_object(Bucket=s3.bucket, Key=orphan, Body=b"partial")
    dry = ok(cli.run(archive_args(cli, s3.bucket, "--keep-snapshots", "1", "--dry-run", action="retain")), "dry run")
    assert "would delete" in dry.stdout and f"txn {newest.txn}" in dry.stdout, dry.stdout
    assert store.catalog().segments == catalog.segments
    ok(cli.run(archive_args(cli, s3.bucket, "--keep-snapshots", "1", action="retain")), "retain")
    kept = store.catalog()
    assert kept.snapshots == [newest]
    assert kept.segments == [s for s in catalog.segments if s.last_txn > newest.txn]
    assert orphan in dry.stdout and not list(store.list(orphan))
    result = cli.run(restore_args(cli, s3.bucket, "--target", str(tmp_path / "gone"), "--txn", "1"))
    # (When the newest snapshot was taken at the last txn, that snapshot alone is left.)
    points = f"txn {t3}" if newest.txn == t3 else f"txns {newest.txn}-{t3}"
    assert result.returncode == 1 and f"restorable: {points}" in result.stderr, result.stderr
    target = tmp_path / "restored-after-retention"
    ok(cli.run(restore_args(cli, s3.bucket, "--target", str(target))), "restore after retention")
    assert_same(latest, target, app)


# --- crash-kill --------------------------------------------------------------------------------


def test_archiver_killed_at_random_points_archives_every_txn_exactly_once_with_the_same_objects(
    app: PicoApp, cli: Cli, s3: Any, s3_client: Any, tmp_path: Path
) -> None:
    rng = random.Random(20261121)
    # Segments closed by record contents only (no --max-delay), so that a clean run can compare bytes.
    flags = ["--segment-txns", "6", "--snapshot-every-txns", "40", "--snapshot-every-bytes", "0", "--max-delay", "3600"]
    agent = cli.start_agent()
    wl = app.workload_proc(450, seed=11, sleep_ms=4)
    archiver = cli.start("archiver", archive_args(cli, s3.bucket, *flags))
    kills = 0
    for _ in range(12):
        time.sleep(rng.uniform(0.2, 1.6))
        archiver.kill9()
        kills += 1
        archiver = cli.start("archiver", archive_args(cli, s3.bucket, *flags))
    out, err = wl.communicate(timeout=240)
    assert wl.returncode == 0, err[-1500:]
    assert agent.alive(), agent.output()
    agent.stop()
    ok(cli.agent_once(), "capture-agent --once")
    time.sleep(rng.uniform(0.5, 1.5))
    archiver.kill9()
    ok(cli.run(archive_args(cli, s3.bucket, "--once", *flags)), "final archive --once")
    assert kills >= 10

    source_ids = [t.txn_id for t in committed_transactions(cli.bootstrap_servers, cli.database)]
    store = store_for(s3_client, s3.bucket, "arch", cli.database)
    assert archived_txn_ids(store) == source_ids == list(range(1, len(source_ids) + 1))

    # A clean run over the same topic cuts the very same segments, key for key and byte for byte.
    ok(cli.run(archive_args(cli, s3.bucket, "--once", *flags, prefix="clean", work="clean-work")), "clean archive")
    clean = store_for(s3_client, s3.bucket, "clean", cli.database)
    assert objects(store, "segments/") == objects(clean, "segments/")

    expected = source_copy(app, tmp_path / "source")
    target = tmp_path / "restored"
    ok(cli.run(restore_args(cli, s3.bucket, "--target", str(target))), "restore")
    assert_same(expected, target, app)


# --- S3 outage ---------------------------------------------------------------------------------


def test_archiver_rides_out_an_s3_outage_and_loses_nothing(app: PicoApp, kafka: Any, tmp_path: Path) -> None:
    from pool_pipeline.devstack import free_port, start_s3
    from tests.conftest import S3Endpoint

    port = free_port(with_grpc_offset=10000)
    server = start_s3(tmp_path / "s3", port=port, detach=False)
    endpoint = S3Endpoint(server.endpoint_url, server.access_key, server.secret_key, server.region, server.bucket)
    cli = Cli(app.root, kafka.bootstrap_servers, unique_name("s3-outage"), extra_env=s3_env(endpoint))
    try:
        agent = cli.start_agent()
        wait_for(lambda: "topic is at" in agent.stdout(), 60, "the agent to start")
        archiver = cli.start("archiver", archive_args(cli, server.bucket, "--segment-txns", "5"))
        wl = app.workload_proc(60, seed=21, sleep_ms=10)
        assert wl.wait(timeout=120) == 0
        try:
            wait_for(lambda: "_txn" in archiver.stdout(), 60, "the archiver's first segment")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{archiver.output()}\n{agent.output()}") from None
        server.stop()
        down_at = time.monotonic()
        before = committed_transactions(cli.bootstrap_servers, cli.database)[-1].txn_id
        wl = app.workload_proc(150, seed=22, sleep_ms=20)
        assert wl.wait(timeout=180) == 0
        during = committed_transactions(cli.bootstrap_servers, cli.database)[-1].txn_id
        assert during > before + 5, "the capture side stalled while S3 was down"
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        assert archiver.alive(), archiver.output()
        assert "retrying" in archiver.stderr() or "retrying" in archiver.stdout(), archiver.output()
        server = start_s3(tmp_path / "s3", port=port, detach=False)
        wl = app.workload_proc(30, seed=23, sleep_ms=2)
        assert wl.wait(timeout=120) == 0
        agent.stop()
        ok(cli.agent_once(), "capture-agent --once")
        source_ids = [t.txn_id for t in committed_transactions(cli.bootstrap_servers, cli.database)]
        from pool_pipeline.devstack import _s3_client

        store = store_for(
            _s3_client(server.endpoint_url, server.access_key, server.secret_key, server.region),
            server.bucket,
            "arch",
            cli.database,
        )
        # Follow mode only closes full segments; --once archives the tail after the follower stops.
        wait_for(
            lambda: (store.catalog().last.last_txn if store.catalog().last else 0) >= source_ids[-1] - 5,
            120,
            "the archiver to catch up after the outage",
            interval=0.5,
        )
        archiver.popen.send_signal(signal.SIGTERM)
        archiver.wait(30)
        ok(cli.run(archive_args(cli, server.bucket, "--once", "--segment-txns", "5")), "archive --once")
        assert archived_txn_ids(store) == source_ids
    finally:
        cli.stop_all()
        server.stop()


# --- bad archives ------------------------------------------------------------------------------


def test_restore_refuses_damaged_foreign_or_gapped_archives_and_leaves_the_target_untouched(
    app: PicoApp, cli: Cli, s3: Any, s3_client: Any, tmp_path: Path
) -> None:
    app.workload(10, seed=31)
    run_stage(cli, app, 60, seed=32)
    ok(
        cli.run(
            archive_args(
                cli,
                s3.bucket,
                "--once",
                "--segment-txns",
                "4",
                "--snapshot-every-txns",
                "0",
                "--snapshot-every-bytes",
                "0",
            )
        ),
        "archive --once",
    )
    good = store_for(s3_client, s3.bucket, "arch", cli.database)
    segments = good.catalog().segments
    assert len(segments) >= 4
    middle = segments[len(segments) // 2]

    def copy_archive(prefix: str) -> ArchiveStore:
        bad = store_for(s3_client, s3.bucket, prefix, cli.database)
        for seg in segments:
            s3_client.copy_object(
                Bucket=s3.bucket, Key=seg.key(bad.root), CopySource={"Bucket": s3.bucket, "Key": seg.key(good.root)}
            )
        return bad

    corrupt = copy_archive("corrupt")
    data = bytearray(good.get(middle.key(good.root)))
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    s3_client.put_object(Bucket=s3.bucket, Key=middle.key(corrupt.root), Body=bytes(data))

    foreign = copy_archive("foreign")
    out = io.BytesIO()
    records = list(read_segment(io.BytesIO(good.get(middle.key(good.root))), cli.database, "t", "k"))
    writer = SegmentWriter(out, codec(), "other-db", 0, records[0].offset)
    for rec in records:
        writer.write(rec)
    writer.close()
    s3_client.put_object(Bucket=s3.bucket, Key=middle.key(foreign.root), Body=out.getvalue())

    gap = copy_archive("gap")
    s3_client.delete_object(Bucket=s3.bucket, Key=middle.key(gap.root))

    # Damage is caught by the container (sync markers, codec) or, where garbage still decodes, by
    # the per-txn checks behind it (record framing, blob sha256, rolling checksum).
    damaged = ("not a readable Avro segment", "sha256", "checksum", "cannot decode", "not an Avro")
    for prefix, expected in (
        ("corrupt", damaged),
        ("foreign", ("belongs to database 'other-db'",)),
        ("gap", (f"txns {middle.first_txn}-{middle.last_txn} are missing",)),
    ):
        target = tmp_path / f"target-{prefix}"
        target.mkdir()
        listing = cli.run(restore_args(cli, s3.bucket, "--list", prefix=prefix)).stdout
        result = cli.run(restore_args(cli, s3.bucket, "--target", str(target), prefix=prefix))
        assert result.returncode == 1, f"{prefix}: {result.stdout} {result.stderr}"
        message = result.stderr + (listing if prefix == "gap" else "")
        assert any(e in message for e in expected), f"{prefix}: {message}"
        assert cli.database in result.stderr
        assert list(target.iterdir()) == [], f"{prefix}: restore wrote into the target"
        assert [p.name for p in tmp_path.iterdir() if ".restore-" in p.name] == []


# --- big transactions: uploaded in parts while read ---------------------------------------------


def test_a_big_txn_uploads_in_parts_while_read_and_kills_leave_no_unfinished_upload(
    kafka: Any, s3: Any, s3_client: Any, tmp_path: Path
) -> None:
    from connectors.kafka.publisher import TopicSink
    from connectors.kafka.topics import topic_for
    from tests.pipeline_helpers import SYNTHETIC_BLOCK, create_topic, synthetic_stream

    database = unique_name("parts")
    pool_blocks = 48 * 1024 * 1024 // SYNTHETIC_BLOCK  # a 48 MiB snapshot txn: ~24 MiB compressed, 4+ parts
    create_topic(kafka.bootstrap_servers, topic_for(database))  # TopicSink does not create it; capture-agent does
    sink = TopicSink(kafka.bootstrap_servers, database, codec())
    for txn in synthetic_stream(database, pool_blocks, 30, 4, seed=5):
        sink.apply(txn)
    sink.close()
    cli = Cli(tmp_path, kafka.bootstrap_servers, database, extra_env=s3_env(s3))
    flags = [
        "--segment-bytes",
        str(1 << 20),
        "--part-bytes",
        str(5 << 20),
        "--segment-txns",
        "10",
        "--snapshot-every-txns",
        "0",
        "--snapshot-every-bytes",
        "0",
    ]
    store = store_for(s3_client, s3.bucket, "arch", database)

    def unfinished() -> list:
        return s3_client.list_multipart_uploads(Bucket=s3.bucket, Prefix=f"{store.root}/").get("Uploads", [])

    try:
        outputs = []
        for _ in range(3):  # killed while the big segment's parts go up: the upload is left unfinished
            archiver = cli.start("archiver", archive_args(cli, s3.bucket, *flags))
            wait_for(unfinished, 60, "a multipart upload to start", interval=0.02)
            archiver.kill9()
            outputs.append(archiver.output())
            assert store.catalog().segments == [], "the big segment cannot be complete yet"
        final = ok(cli.run(archive_args(cli, s3.bucket, "--once", *flags)), "archive --once")
    finally:
        cli.stop_all()
    assert "in parts while it is read" in outputs[0], outputs[0]
    assert "aborting the unfinished upload" in final.stdout, final.stdout
    assert unfinished() == []
    assert archived_txn_ids(store) == list(range(1, 32))
    first = store.catalog().segments[0]
    assert (first.first_txn, first.last_txn, first.starts_with_snapshot) == (1, 1, True)

    # Uploaded in parts or in one put, the objects are the same, key for key and byte for byte.
    ok(
        cli.run(
            archive_args(
                cli,
                s3.bucket,
                "--once",
                *flags[:2],
                "--part-bytes",
                str(1 << 30),
                *flags[4:],
                prefix="whole",
                work="whole-work",
            )
        ),
        "archive --once, no parts",
    )
    assert objects(store, "segments/") == objects(store_for(s3_client, s3.bucket, "whole", database), "segments/")

    expected = bytearray(pool_blocks * SYNTHETIC_BLOCK)
    for txn in synthetic_stream(database, pool_blocks, 30, 4, seed=5):
        for change in txn.changes:
            expected[change.index * SYNTHETIC_BLOCK : (change.index + 1) * SYNTHETIC_BLOCK] = change.data
    target = tmp_path / "restored"
    ok(cli.run(restore_args(cli, s3.bucket, "--target", str(target))), "restore")
    assert (target / "db" / "@").read_bytes() == expected
