"""Payload encryption end to end: real Kafka, real SeaweedFS S3, real PicoLisp, the CLIs with --encryption-key."""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import pytest

from connectors.keys import load_keyring
from pipeline.archive import read_segment
from pipeline.codec import Codec
from pipeline.crypto import FILE_MAGIC, RECORD_MAGIC
from schemas import load_schemas
from tests.integration.test_archive import archive_args, assert_same, restore_args, s3_env, source_copy
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp
from tests.pipeline_helpers import BIN, Cli, ok, read_committed_records, replica_position, unique_name, wait_for

pytestmark = pytest.mark.integration

MARKER = "ZQX-PLAINTEXT-MARKER-7f3a9c"


def commit_markers(app: PicoApp, nr: int) -> None:
    """The app commits the marker as an indexed name, a swapped long text and a blob's content."""
    app.run(
        f"""
(openApp "db/app/" "fifo/app" "blob/app/")
(out "marker.tmp" (do 50 (prin "{MARKER} ")))
(let Obj (new! '(+Item) 'nr {nr} 'nm "{MARKER}-{nr}" 'txt (pack (need 40 "{MARKER} ")))
   (blob! Obj 'doc "marker.tmp") )
"""
    )


def tree_md5(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def cli(app: PicoApp, kafka: Any, s3: Any) -> Any:
    c = Cli(app.root, kafka.bootstrap_servers, unique_name("encryption"), extra_env=s3_env(s3))
    yield c
    c.stop_all()


def test_encrypted_capture_replica_archive_restore_and_nothing_readable_without_the_key(
    app: PicoApp, cli: Cli, s3: Any, s3_client: Any, tmp_path: Path
) -> None:
    marker = MARKER.encode()
    key_file, other_file = app.root / "keys" / "app.key", app.root / "keys" / "other.key"
    key_file.parent.mkdir()
    ok(cli.run([str(BIN / "pipeline"), "keygen", str(key_file)]), "pipeline keygen")
    ok(cli.run([str(BIN / "pipeline"), "keygen", str(other_file)]), "pipeline keygen other")
    assert (key_file.stat().st_mode & 0o777) == 0o600
    key_id = load_keyring(key_file).newest.id_hex

    app.workload(40, seed=1)
    commit_markers(app, 100_001)
    # The key through the environment: txn 1 is the bootstrap snapshot, sealed like every record.
    env_key = Cli(
        cli.root,
        cli.bootstrap_servers,
        cli.database,
        extra_env={**cli.extra_env, "POOL_PIPELINE_KEY_FILE": str(key_file)},
    )
    ok(env_key.agent_once(), "capture-agent --once (key from $POOL_PIPELINE_KEY_FILE)")
    app.workload(60, seed=2)
    commit_markers(app, 100_002)
    enc = ("--encryption-key", str(key_file))
    ok(cli.agent_once(*enc), "capture-agent --once --encryption-key")
    # Many small txns (a following agent), so that the archive has segments to compact.
    agent = cli.start_agent(*enc)
    wait_for(lambda: "topic is at" in agent.stdout(), 60, "the agent to start")
    wl = app.workload_proc(150, seed=5, sleep_ms=10)
    out, err = wl.communicate(timeout=180)
    assert wl.returncode == 0, f"workload failed: {out[-500:]} {err[-1500:]}"
    agent.stop()  # SIGTERM: exit 130, the agent stops between rounds
    ok(cli.agent_once(*enc), "capture-agent --once: the rest")
    source = source_copy(app, tmp_path / "source")
    assert marker in (source / "db" / "A").read_bytes() + (source / "db" / "C").read_bytes()  # the app wrote it

    # A replica with the key is md5-equal.
    ok(cli.replica_once("rpl/db/app/", "rpl/blob/app/", "replica", *enc), "replica --once with the key")
    ok(cli.verify(), "verify")

    # The raw topic: every value sealed, no marker in any value or key; change keys are opaque.
    records = read_committed_records(cli.bootstrap_servers, cli.database)
    assert len(records) > 10
    for rec in records:
        assert rec.value[:2] == RECORD_MAGIC and rec.value[2:10].hex() == key_id, rec.offset
        assert marker not in rec.value and marker not in (rec.key or b"")
        assert b".doc" not in (rec.key or b"")  # no blob paths in keys
    # Control, so the check can fail: the same pool published without a key shows the marker.
    plain_db = cli.database + "-plain"
    plain_agent = cli.agent_args("--once", "--state-dir", "fifo/plain.agent", database=plain_db)
    ok(cli.run(plain_agent), "capture-agent --once without a key")
    plain = read_committed_records(cli.bootstrap_servers, plain_db)
    assert any(marker in r.value for r in plain)
    # ... and a reader with a key refuses plaintext records (anyone could have written them).
    result = cli.replica_once("rpl-plain/db/", None, "replica", *enc, database=plain_db)
    assert result.returncode == 1 and "not encrypted, but a key is configured" in result.stderr, result.stderr

    # Archive with a base snapshot, then look at every object raw and inside the Avro containers.
    ok(
        cli.run(
            archive_args(
                cli, s3.bucket, "--once", "--segment-txns", "2", "--snapshot-every-txns", "1", *enc, prefix="enc"
            )
        ),
        "archive --once",
    )
    # Compaction frames the records it merges, so it needs the key as well.
    result = cli.run(archive_args(cli, s3.bucket, "--compact", "1,5", action="compact", prefix="enc"))
    assert result.returncode == 1 and key_id in result.stderr, result.stderr
    ok(cli.run(archive_args(cli, s3.bucket, "--compact", "1,5", *enc, action="compact", prefix="enc")), "compact")
    keys = [
        o["Key"]
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix="enc/")
        for o in page.get("Contents", [])
    ]
    segments = [k for k in keys if "/segments/" in k]
    # Merged segments (compacted by `archive compact` with the key) hold encrypted records too.
    assert any(re.search(r"_L[12](_snap)?\.avro$", k) for k in segments), segments
    snapshot_files = [k for k in keys if "/snapshots/" in k]
    assert segments and any(k.endswith("manifest.json") for k in snapshot_files), keys
    assert any("/blob/" in k for k in snapshot_files), snapshot_files
    assert not any(k.endswith(".doc") for k in keys), keys  # blob names are not in object keys
    for key in keys:
        body = s3_client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        assert marker not in body, key
        if key in snapshot_files:
            assert body.startswith(FILE_MAGIC), key  # files, blobs and the manifest are all sealed
        else:
            values = list(read_segment(io.BytesIO(body), cli.database, "t", key))
            assert values and all(r.value[:2] == RECORD_MAGIC and marker not in r.value for r in values), key

    # Restore needs the key: with it md5-equal (and PicoLisp sees the same objects), without it refused.
    target = tmp_path / "restored"
    ok(cli.run(restore_args(cli, s3.bucket, "--target", str(target), *enc, prefix="enc")), "restore with the key")
    assert_same(source, target, app)
    for extra, needed in (((), f"encrypted with key {key_id}"), (("--encryption-key", str(other_file)), key_id)):
        nokey = tmp_path / f"restored-{len(extra)}"
        result = cli.run(restore_args(cli, s3.bucket, "--target", str(nokey), *extra, prefix="enc"))
        assert result.returncode == 1 and needed in result.stderr, result.stderr
        assert not nokey.exists()
    # Restoring only from segments (no base snapshot to read first) needs the key too.
    result = cli.run(restore_args(cli, s3.bucket, "--target", str(tmp_path / "r-seg"), "--txn", "1", prefix="enc"))
    assert result.returncode == 1 and key_id in result.stderr, result.stderr

    # A replica without the key, or with the wrong one, stops with exit 1 at the first new txn and
    # applies nothing: its files and position stay as they were.
    app.workload(20, seed=3)
    ok(cli.agent_once(*enc), "capture-agent --once: more txns")
    rpl = app.root / "rpl"
    before, position = tree_md5(rpl), replica_position(app.root / "rpl/db/app")
    for extra in ((), ("--encryption-key", str(other_file))):
        result = cli.replica_once("rpl/db/app/", "rpl/blob/app/", "replica", *extra)
        assert result.returncode == 1, result.stdout + result.stderr
        assert key_id in result.stderr and cli.database in result.stderr and "offset=" in result.stderr, result.stderr
        assert tree_md5(rpl) == before and replica_position(app.root / "rpl/db/app") == position
    # A fresh replica without the key: nothing written either.
    result = cli.replica_once("rpl2/db/app/", "rpl2/blob/app/", "replica-2")
    assert result.returncode == 1 and key_id in result.stderr, result.stderr
    assert not [p for p in (app.root / "rpl2").rglob("*") if p.is_file() and ".pool-pipeline" not in str(p)]
    # A mode 0644 key file is refused before anything is read.
    loose = app.root / "keys" / "loose.key"
    loose.write_bytes(key_file.read_bytes())
    os.chmod(loose, 0o644)
    result = cli.replica_once("rpl/db/app/", "rpl/blob/app/", "replica", "--encryption-key", str(loose))
    assert result.returncode == 1 and "chmod 600" in result.stderr, result.stderr
    # The group replica (--pattern) and `pipeline status` read through the same codec.
    group = [str(BIN / "replica"), "--pattern", re.escape(cli.database), "--root", "rplg", "--group", "g", "--once"]
    ok(cli.run(group + list(enc)), "replica --pattern --once with the key")
    ok(cli.verify(f"rplg/{cli.database}/db/", f"rplg/{cli.database}/blob/"), "verify the group replica")
    status = [str(BIN / "pipeline"), "status", "--database", cli.database]
    result = cli.run(status)
    assert result.returncode == 1 and key_id in result.stderr, result.stderr
    sealed = Codec(load_schemas(), keyring=load_keyring(key_file))
    records = read_committed_records(cli.bootstrap_servers, cli.database)
    last_txn = [t.txn_id for t in sealed.read_transactions(records, cli.database)][-1]
    shown = ok(cli.run(status + list(enc)), "pipeline status with the key").stdout
    assert re.search(rf"^{re.escape(cli.database)}\s+{last_txn} \(last capture", shown, re.M), shown
    # With the key it carries on, md5-equal again.
    ok(cli.replica_once("rpl/db/app/", "rpl/blob/app/", "replica", *enc), "replica --once with the key again")
    ok(cli.verify(), "verify after the refused runs")

    # Rotation: a key added to the file encrypts from then on; the older records still read.
    ok(cli.run([str(BIN / "pipeline"), "keygen", "--add", str(key_file)]), "pipeline keygen --add")
    new_id = load_keyring(key_file).newest.id_hex
    app.workload(10, seed=4)
    ok(cli.agent_once(*enc), "capture-agent --once after rotation")
    last = read_committed_records(cli.bootstrap_servers, cli.database)[-1]
    assert last.value[2:10].hex() == new_id
    ok(cli.replica_once("rpl3/db/app/", "rpl3/blob/app/", "replica-3", *enc), "a new replica across both keys")
    ok(cli.verify("rpl3/db/app/", "rpl3/blob/app/"), "verify the new replica")

    # analytics with the key writes its statistics sealed too.
    ok(
        cli.run(
            [str(BIN / "analytics"), "--database", cli.database, "--group", "stats", "--once", "--window", "0.05", *enc]
        ),
        "analytics --once",
    )
    stats = read_committed_records(cli.bootstrap_servers, cli.database + ".stats")
    assert stats and all(r.value[:2] == RECORD_MAGIC for r in stats)
    rotated = Codec(load_schemas(), keyring=load_keyring(key_file))
    assert {rotated.decode(r.value, database=cli.database)[0] for r in stats} == {"pool.pipeline.WindowStats"}
