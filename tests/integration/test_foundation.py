"""Foundation checks against a real Kafka broker, a real S3 endpoint, real PicoLisp and the local stack launcher."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kerr

from pool_pipeline import devstack
from tests.conftest import unavailable

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------------------
# Kafka helpers
# --------------------------------------------------------------------------------------


def _new_topic(bootstrap: str, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        # replication_factor -1: the broker's default.replication.factor (1 on one node, 3 on three)
        admin.create_topics({name: {"num_partitions": 1, "replication_factor": -1}}, wait_for_metadata=True)
    finally:
        admin.close()
    return name


def _producer(bootstrap: str, transactional_id: str) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id, acks="all")


def _read_all(bootstrap: str, topic: str, isolation_level: str, timeout: float = 30) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of partition 0 up to its end offset (the LSO under read_committed)."""
    tp = TopicPartition(topic, 0)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        isolation_level=isolation_level,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        while consumer.position(tp) < end:
            assert time.monotonic() < deadline, f"read only up to offset {consumer.position(tp)} of {end}"
            for records in consumer.poll(timeout_ms=500).values():
                out.extend((r.key, r.value) for r in records)
        return out
    finally:
        consumer.close()


# --------------------------------------------------------------------------------------
# Kafka: transactions
# --------------------------------------------------------------------------------------


def test_read_committed_sees_exactly_the_committed_records_in_order(kafka: Any) -> None:
    bs = kafka.bootstrap_servers
    topic = _new_topic(bs, "foundation-txn")
    producer = _producer(bs, f"foundation-txn-{uuid.uuid4().hex}")
    committed: list[tuple[bytes, bytes]] = []
    aborted: list[tuple[bytes, bytes]] = []
    try:
        producer.init_transactions()
        plan = [("commit", 3), ("abort", 2), ("commit", 4), ("abort", 3)]  # ends on an abort
        n = 0
        for outcome, count in plan:
            producer.begin_transaction()
            batch = []
            for _ in range(count):
                key = f"k{n}".encode()
                value = bytes([n % 256, 0, 255]) + f"{outcome}-{n}".encode()  # arbitrary binary payload
                producer.send(topic, key=key, value=value)
                batch.append((key, value))
                n += 1
            producer.flush()  # aborted records really reach the log before the abort marker
            if outcome == "commit":
                producer.commit_transaction()
                committed += batch
            else:
                producer.abort_transaction()
                aborted += batch
    finally:
        producer.close(timeout=10)

    seen = _read_all(bs, topic, "read_committed")
    assert seen == committed
    assert not set(seen) & set(aborted)

    # The aborted records are in the log; only the isolation level hides them.
    raw = _read_all(bs, topic, "read_uncommitted")
    assert sorted(raw) == sorted(committed + aborted)


def test_zombie_producer_is_fenced_by_a_newer_instance(kafka: Any) -> None:
    """kafka-python 3.0.12 against Kafka 4.1: which error a fenced producer gets depends on its next request."""
    bs = kafka.bootstrap_servers
    topic = _new_topic(bs, "foundation-fence")
    tid = f"foundation-fence-{uuid.uuid4().hex}"

    # 1. Fenced mid-transaction, keeps producing to a partition already in its transaction: the
    #    partition leader rejects the batch with InvalidProducerEpochError (error 47); commit fails.
    gen1 = _producer(bs, tid)
    gen1.init_transactions()
    gen1.begin_transaction()
    gen1.send(topic, key=b"1", value=b"gen1-a").get(timeout=30)
    gen2 = _producer(bs, tid)
    gen2.init_transactions()  # bumps the epoch and aborts gen1's open transaction
    with pytest.raises(kerr.InvalidProducerEpochError) as stale:
        gen1.send(topic, key=b"1", value=b"gen1-b").get(timeout=30)
    assert type(stale.value) is kerr.InvalidProducerEpochError
    with pytest.raises(kerr.KafkaError):  # ProducerFencedError or "invalid transition", timing-dependent
        gen1.commit_transaction()
    gen1.close(timeout=5)

    # 2. Fenced mid-transaction, then commits: EndTxn fails with ProducerFencedError (error 90).
    gen2.begin_transaction()
    gen2.send(topic, key=b"2", value=b"gen2-a").get(timeout=30)
    gen3 = _producer(bs, tid)
    gen3.init_transactions()
    with pytest.raises(kerr.ProducerFencedError) as fenced:
        gen2.commit_transaction()
    assert type(fenced.value) is kerr.ProducerFencedError
    gen2.close(timeout=5)

    # 3. Fenced while idle, starts a new transaction: adding the partition fails with ProducerFencedError.
    gen3.begin_transaction()
    gen3.send(topic, key=b"3", value=b"gen3-a").get(timeout=30)
    gen3.commit_transaction()
    gen4 = _producer(bs, tid)
    gen4.init_transactions()
    gen3.begin_transaction()
    with pytest.raises(kerr.ProducerFencedError) as fenced_idle:
        gen3.send(topic, key=b"3", value=b"gen3-b").get(timeout=30)
    assert type(fenced_idle.value) is kerr.ProducerFencedError
    gen3.close(timeout=5)

    gen4.begin_transaction()
    gen4.send(topic, key=b"4", value=b"gen4-a").get(timeout=30)
    gen4.commit_transaction()
    gen4.close(timeout=10)

    assert [v for _, v in _read_all(bs, topic, "read_committed")] == [b"gen3-a", b"gen4-a"]


# --------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------


def test_s3_put_get_list_and_conditional_put(s3: Any, s3_client: Any) -> None:
    prefix = f"foundation/{uuid.uuid4().hex}/"
    bodies = {f"{prefix}a.bin": b"\x00\x01binary\xff", f"{prefix}b/c.json": b'{"x": 1}'}
    for key, body in bodies.items():
        s3_client.put_object(Bucket=s3.bucket, Key=key, Body=body)
    for key, body in bodies.items():
        assert s3_client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == body
    listed = s3_client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    assert sorted(o["Key"] for o in listed.get("Contents", [])) == sorted(bodies)
    assert {o["Key"]: o["Size"] for o in listed["Contents"]} == {k: len(v) for k, v in bodies.items()}

    # Create-only put: the first wins, the second is rejected with 412 and changes nothing.
    marker = f"{prefix}commit.marker"
    s3_client.put_object(Bucket=s3.bucket, Key=marker, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as rejected:
        s3_client.put_object(Bucket=s3.bucket, Key=marker, Body=b"second", IfNoneMatch="*")
    assert rejected.value.response["Error"]["Code"] == "PreconditionFailed"
    assert rejected.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3_client.get_object(Bucket=s3.bucket, Key=marker)["Body"].read() == b"first"


def test_s3_rejects_wrong_credentials(s3: Any) -> None:
    import boto3
    from botocore.config import Config

    bad = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id="not-a-user",
        aws_secret_access_key="wrong",
        region_name=s3.region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    with pytest.raises(ClientError) as denied:
        bad.list_objects_v2(Bucket=s3.bucket)
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


# --------------------------------------------------------------------------------------
# PicoLisp database with a replication journal
# --------------------------------------------------------------------------------------

_PIL_MODEL = """\
(class +Item +Entity)
(rel nm (+Key +String))
(rel cnt (+Number))
(dbs
   (2 +Item)
   (3 (+Item nm)) )
(pool "db/" *Dbs "db/journal")
"""


def _pil(tmp: Path, name: str, body: str) -> str:
    pil = shutil.which("pil")
    if not pil:
        unavailable("PicoLisp `pil` not found on PATH (Debian: apt-get install -y picolisp)")
    prog = tmp / name
    prog.write_text(_PIL_MODEL + body)
    done = subprocess.run(
        [pil, str(prog), "-bye"], cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"pil {name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_picolisp_pool_commit_writes_db_files_and_journal(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    out = _pil(tmp_path, "create.l", '(for I 20 (new T \'(+Item) \'nm (pack "item" I) \'cnt I))\n(commit)\n'
               "(prinl (count (tree 'nm '+Item)))\n")  # fmt: skip
    assert out.split() == ["20"]
    journal = tmp_path / "db" / "journal"
    assert (tmp_path / "db" / "@").is_file()
    assert (tmp_path / "db" / "A").is_file()
    assert journal.is_file() and journal.stat().st_size > 0
    size1 = journal.stat().st_size

    out = _pil(tmp_path, "more.l", '(for I 5 (new T \'(+Item) \'nm (pack "more" I) \'cnt (* 100 I)))\n(commit)\n'
               "(prinl (count (tree 'nm '+Item)))\n")  # fmt: skip
    assert out.split() == ["25"]
    assert journal.stat().st_size > size1

    # A fresh process reads back what was committed.
    out = _pil(tmp_path, "read.l", "(prinl (; (db 'nm '+Item \"more3\") cnt))\n")
    assert out.split() == ["300"]


# --------------------------------------------------------------------------------------
# The dev stack launcher itself (connectors/devstack.py)
# --------------------------------------------------------------------------------------


def _port_pair(offset: int) -> int:
    """A free port p whose p + offset is free as well."""
    for _ in range(100):
        p = devstack.free_port()
        if p + offset < 65536 and devstack._port_free(p + offset):
            return p
    raise AssertionError("no free port pair found")


def test_dev_up_is_idempotent_and_dev_down_stops_everything(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    kafka_port, s3_port = _port_pair(1), _port_pair(10000)
    lines: list[str] = []
    try:
        info = devstack.dev_up(state, brokers=1, kafka_port=kafka_port, s3_port=s3_port, progress=lines.append)
    except devstack.StackError as e:
        unavailable(f"local dev stack could not start: {e}")
    try:
        assert info["bootstrap_servers"] == f"127.0.0.1:{kafka_port}"
        assert info["s3_endpoint"] == f"http://127.0.0.1:{s3_port}"
        assert (state / "stack.json").is_file()
        status = devstack.dev_status(state)
        assert status["running"] and all(p["alive"] and p["port_open"] for p in status["processes"])

        again = devstack.dev_up(state, brokers=1, kafka_port=kafka_port, s3_port=s3_port, progress=lines.append)
        assert again["pids"] == info["pids"]

        exports = devstack.env_exports(info)
        shown = subprocess.run(
            ["bash", "-c", 'eval "$1"; echo "$KAFKA_BOOTSTRAP_SERVERS|$AWS_ENDPOINT_URL_S3|$POOL_PIPELINE_BUCKET"',
             "_", exports],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        assert shown == f"{info['bootstrap_servers']}|{info['s3_endpoint']}|{info['bucket']}"

        # the dev brokers do not auto-create topics (production-like), so create it first
        topic = _new_topic(info["bootstrap_servers"], "dev-smoke")
        producer = KafkaProducer(bootstrap_servers=info["bootstrap_servers"])
        producer.send(topic, b"hello").get(timeout=30)
        producer.close()
    finally:
        devstack.dev_down(state, progress=lines.append)
    assert not (state / "stack.json").exists()
    assert not any(devstack._pid_alive(p) for p in info["pids"])
    assert not devstack._port_open(kafka_port) and not devstack._port_open(s3_port)
    assert devstack.dev_status(state)["running"] is False
    devstack.dev_down(state, progress=lines.append)  # idempotent


def test_dev_up_reports_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        with pytest.raises(devstack.StackError, match=rf"port {port} is in use.*--kafka-port"):
            devstack.dev_up(tmp_path / "stack", kafka_port=port, s3_port=_port_pair(10000), progress=lambda _m: None)
    assert not (tmp_path / "stack" / "stack.json").exists()
