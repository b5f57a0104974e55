"""`pipeline dev up --secure` for real: capture → replica → archive → restore over SASL_SSL (SCRAM-SHA-512,
one principal per role, ACLs) and S3 over https with SSE; ACLs, passwords and CAs that do not fit are
refused fast and clearly."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.picolisp.blobs import compare_blob_trees
from connectors.picolisp.format import compare_pools
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp, copy_pool
from tests.pipeline_helpers import BIN, Cli, ok, unique_name

pytestmark = pytest.mark.integration

ROLES = ("agent", "replica", "archive", "analytics", "admin")
STATS_DB = "statsdb"


def _ports() -> tuple[int, int]:
    """A Kafka client port whose +1 (the controller) is free too, and an S3 port whose +10000 is free."""
    from pool_pipeline.devstack import _free_ports, _port_free

    for _ in range(50):
        (kafka,) = _free_ports(1)
        (s3,) = _free_ports(1, with_grpc_offset=True, exclude=(kafka, kafka + 1))
        if _port_free(kafka + 1):
            return kafka, s3
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One secured dev stack for the module, started and stopped through the real `pipeline dev` CLI."""
    import subprocess

    state = tmp_path_factory.mktemp("secure-stack")
    kafka_port, s3_port = _ports()
    up = subprocess.run(
        [str(BIN / "pipeline"), "dev", "up", "--secure", "--database", STATS_DB, "--state-dir", str(state),
         "--kafka-port", str(kafka_port), "--s3-port", str(s3_port)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if up.returncode != 0:
        subprocess.run([str(BIN / "pipeline"), "dev", "down", "--state-dir", str(state)], timeout=120)
        pytest.fail(f"pipeline dev up --secure failed:\n{up.stdout}\n{up.stderr}")
    try:
        info = json.loads((state / "stack.json").read_text())
        envs = {}
        for role in ROLES:
            out = subprocess.run(
                [str(BIN / "pipeline"), "dev", "env", "--state-dir", str(state), "--role", role],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout  # fmt: skip
            envs[role] = {
                k.removeprefix("export "): v.strip("'") for k, _, v in (line.partition("=") for line in out.split())
            }
        yield {"state": state, "info": info, "env": envs, "dev_up_output": up.stdout + up.stderr}
    finally:
        subprocess.run([str(BIN / "pipeline"), "dev", "down", "--state-dir", str(state)], timeout=120)


def role_cli(app: PicoApp, stack: dict[str, Any], role: str, database: str) -> Cli:
    env = dict(stack["env"][role])
    return Cli(app.root, env.pop("KAFKA_BOOTSTRAP_SERVERS"), database, extra_env=env)


def passwords(stack: dict[str, Any]) -> dict[str, str]:
    return json.loads((stack["state"] / "secure" / "passwords.json").read_text())


def test_dev_up_secure_exports_a_client_config_per_role_and_the_ca(stack: dict[str, Any]) -> None:
    info, envs = stack["info"], stack["env"]
    assert info["secure"] and info["s3_endpoint"].startswith("https://127.0.0.1:")
    for role in ROLES:
        env = envs[role]
        config = Path(env["KAFKA_CLIENT_CONFIG"])
        assert config.name == f"{role}.properties" and stat.S_IMODE(config.stat().st_mode) == 0o600
        text = config.read_text()
        assert "security.protocol=SASL_SSL" in text and f"sasl.username={role}" in text
        assert "sasl.mechanism=SCRAM-SHA-512" in text and "ssl.endpoint.identification.algorithm=https" in text
        assert env["AWS_CA_BUNDLE"] == info["ca_bundle"] and env["AWS_ENDPOINT_URL_S3"] == info["s3_endpoint"]
    assert envs["admin"]["KAFKA_CLIENT_CONFIG"].endswith("admin.properties")
    # The broker has no listener but SASL_SSL for clients, and no password is in any argv or log line.
    props = (stack["state"] / "kafka" / "node-1" / "server.properties").read_text()
    assert f"advertised.listeners=SASL_SSL://{info['bootstrap_servers']}" in props
    assert stat.S_IMODE((stack["state"] / "kafka" / "node-1" / "server.properties").stat().st_mode) == 0o600
    argvs = [Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") for pid in info["pids"]]
    logs = "".join(Path(p).read_text(errors="replace") for p in [*info["kafka_logs"], info["s3_log"]])
    for secret in passwords(stack).values():
        assert all(secret not in argv for argv in argvs)
        assert secret not in logs and secret not in stack["dev_up_output"]
    assert not list((stack["state"] / "kafka").rglob("format.args")), "the storage tool's argument file was kept"


def test_capture_replica_archive_restore_over_sasl_ssl_and_https_with_sse_and_payload_encryption(
    app: PicoApp, stack: dict[str, Any], tmp_path: Path
) -> None:
    import boto3

    database = unique_name("sec")
    agent, replica, archive = (role_cli(app, stack, r, database) for r in ("agent", "replica", "archive"))
    # Payload encryption on top: every command of every role reads the key from $POOL_PIPELINE_KEY_FILE.
    key_file = tmp_path / "pool.key"
    ok(agent.run([str(BIN / "pipeline"), "keygen", str(key_file)]), "pipeline keygen")
    for c in (agent, replica, archive):
        c.extra_env["POOL_PIPELINE_KEY_FILE"] = str(key_file)
    try:
        app.workload(40, seed=11)
        outputs = [ok(agent.agent_once(), "capture-agent --once as agent")]
        app.workload(30, seed=12)
        outputs.append(ok(agent.agent_once(), "capture-agent --once as agent (2)"))
        outputs.append(ok(replica.replica_once(), "replica --once as replica"))
        assert not replica.differences(), replica.differences()
        expected = tmp_path / "expected"
        copy_pool(app.prefix, expected / "db")
        shutil.copytree(app.blob_dir, expected / "blob", ignore=shutil.ignore_patterns(".*"))

        bucket = stack["info"]["bucket"]
        base = [str(BIN / "archive"), "--database", database, "--bucket", f"s3://{bucket}/sec", "--work-dir", "aw"]
        outputs.append(ok(archive.run([*base, "--once", "--sse", "AES256"]), "archive --once --sse AES256"))
        outputs.append(ok(archive.run([base[0], "snapshot", *base[1:], "--sse", "AES256"]), "archive snapshot"))
        text = "".join(r.stdout + r.stderr for r in outputs)
        assert "txn" in text and not any(secret in text for secret in passwords(stack).values())
        target = tmp_path / "restored"
        ok(
            archive.run(
                [
                    str(BIN / "restore"),
                    "--database",
                    database,
                    "--bucket",
                    f"s3://{bucket}/sec",
                    "--target",
                    str(target),
                ]
            ),
            "restore over https",
        )
        diffs = compare_pools(f"{expected / 'db'}/", f"{target / 'db'}/") + compare_blob_trees(
            expected / "blob", target / "blob"
        )
        assert diffs == [], diffs
        assert app.query(target / "db", target / "blob") == app.query(expected / "db", expected / "blob")
        # The records were sealed: a restore without the key is refused, naming the key it lacks.
        archive.extra_env.pop("POOL_PIPELINE_KEY_FILE")
        refused = archive.run(
            [
                str(BIN / "restore"),
                "--database",
                database,
                "--bucket",
                f"s3://{bucket}/sec",
                "--target",
                str(tmp_path / "nokey"),
            ]
        )
        assert refused.returncode == 1 and "key" in (refused.stdout + refused.stderr), refused.stderr[-2000:]
        assert not (tmp_path / "nokey").exists()

        # Every object the archiver wrote (segments, snapshot files, manifest) is stored with SSE-S3.
        env = stack["env"]["admin"]
        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL_S3"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
            verify=env["AWS_CA_BUNDLE"],
        )
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"sec/{database}/").get("Contents", [])]
        assert any("/segments/" in k for k in keys) and any("/snapshots/" in k and k.endswith("/db/@") for k in keys)
        assert any(k.endswith("manifest.json") for k in keys), keys
        unencrypted = [k for k in keys if s3.head_object(Bucket=bucket, Key=k).get("ServerSideEncryption") != "AES256"]
        assert unencrypted == [], unencrypted

        # The multipart path (a big txn uploaded while read) asks for the same encryption.
        from connectors.s3.store import open_store, sse_args

        os.environ["AWS_CA_BUNDLE"] = env["AWS_CA_BUNDLE"]
        try:
            store = open_store(f"s3://{bucket}/mp", database, env["AWS_ENDPOINT_URL_S3"], sse_args("AES256"))
            store.client = s3
            key = f"{store.root}/big"
            upload = store.start_upload(key)
            etag = store.upload_part(key, upload, 1, b"x" * 1024)
            import io

            store.complete_new(key, upload, [etag], io.BytesIO(b"x" * 1024))
        finally:
            os.environ.pop("AWS_CA_BUNDLE", None)
        assert s3.head_object(Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"

        # At rest: SeaweedFS's data files hold an object written without SSE in the clear, and one written
        # with SSE-S3 not (random bytes, so no compression hides the clear copy).
        clear, sealed = os.urandom(96 * 1024), os.urandom(96 * 1024)
        s3.put_object(Bucket=bucket, Key=f"{store.root}/clear", Body=clear)
        store.put_new(f"{store.root}/sealed", sealed)
        assert s3.get_object(Bucket=bucket, Key=f"{store.root}/sealed")["Body"].read() == sealed
        time.sleep(1)
        stored = b"".join(p.read_bytes() for p in (stack["state"] / "s3" / "data").rglob("*") if p.is_file())
        assert clear[4096:4160] in stored, "the clear control object is not found in SeaweedFS's files"
        assert sealed[4096:4160] not in stored, "an SSE-S3 object is stored in the clear"
    finally:
        for c in (agent, replica, archive):
            c.stop_all()


def test_only_analytics_writes_the_stats_topic(app: PicoApp, stack: dict[str, Any]) -> None:
    from connectors.kafka.client import KafkaSettings

    agent = role_cli(app, stack, "agent", STATS_DB)
    analytics = role_cli(app, stack, "analytics", STATS_DB)
    for seed in (5, 6, 7):  # three capture rounds a second apart: windows of 0.2 s close
        app.workload(5, seed=seed)
        ok(agent.agent_once(), "capture-agent --once as agent")
        time.sleep(1)
    ok(
        analytics.run([str(BIN / "analytics"), "--database", STATS_DB, "--window", "0.2", "--once"]),
        "analytics --once as analytics",
    )
    stats_topic = f"pool.{STATS_DB}.stats"
    admin = KafkaSettings.from_properties(stack["env"]["admin"]["KAFKA_CLIENT_CONFIG"])
    consumer = admin.consumer(group_id=None, isolation_level="read_committed", auto_offset_reset="earliest")
    try:
        from kafka.structs import TopicPartition

        tp = TopicPartition(stats_topic, 0)
        assert consumer.end_offsets([tp])[tp] > 0, f"analytics wrote nothing to {stats_topic}"
    finally:
        consumer.close()

    # The agent's prefixed grant on pool. does not reach the stats topic (a DENY on it); replica and
    # analytics may not write the database topic, nor replica the stats topic.
    for role, topic in (("agent", stats_topic), ("replica", stats_topic), ("replica", f"pool.{STATS_DB}"),
                        ("analytics", f"pool.{STATS_DB}")):  # fmt: skip
        settings = KafkaSettings.from_properties(stack["env"][role]["KAFKA_CLIENT_CONFIG"])
        producer = settings.producer(
            acks="all", enable_idempotence=False, max_block_ms=10_000, request_timeout_ms=10_000
        )
        try:
            with pytest.raises(Exception) as refused:
                producer.send(topic, b"not a pool record").get(timeout=20)
            assert "TopicAuthorizationFailed" in type(refused.value).__name__, (role, topic, repr(refused.value))
        finally:
            producer.close(timeout=5)


def _refused(cli: Cli, args: list[str], what: str, *needles: str, secret: str | None = None) -> str:
    started = time.monotonic()
    result = cli.run(args, timeout=90)
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"{what} exited {result.returncode} after {took:.0f} s:\n{output[-3000:]}"
    assert took < 30, f"{what} took {took:.0f} s to give up:\n{output[-3000:]}"
    for needle in needles:
        assert needle in output, f"{what}: {needle!r} not in:\n{output[-3000:]}"
    if secret is not None:
        assert secret not in output
    print(f"--- {what} (exit 1 after {took:.1f} s):\n{output[-1500:]}")  # shown with -rP
    return output


def test_a_role_without_the_acl_is_refused_naming_principal_and_resource(app: PicoApp, stack: dict[str, Any]) -> None:
    database = unique_name("acl")
    agent = role_cli(app, stack, "agent", database)
    app.workload(5, seed=3)
    ok(agent.agent_once(), "capture-agent --once as agent")
    topic = f"pool.{database}"

    # replica may read pool.* but not write it, nor use the agent's transactional id
    replica = role_cli(app, stack, "replica", database)
    app.workload(3, seed=4)
    out = _refused(replica, replica.agent_args("--once"), "capture-agent as replica", "User:replica")
    assert "Authorization" in out or "authoriz" in out.lower(), out[-3000:]
    assert topic in out or f"pool-pipeline.capture.{database}" in out, out[-3000:]

    # archive may only use its own groups (archive*)
    archive = role_cli(app, stack, "archive", database)
    bucket = stack["info"]["bucket"]
    out = _refused(
        archive,
        [str(BIN / "archive"), "--database", database, "--bucket", f"s3://{bucket}/acl", "--work-dir", "aw2",
         "--group", "replica-1", "--once"],
        "archive with the group replica-1",
        "User:archive",
        "replica-1",
    )  # fmt: skip
    assert "GroupAuthorizationFailed" in out, out[-3000:]

    # the agent cannot read a consumer group's offsets (replica with the agent's principal)
    out = _refused(
        agent, agent.replica_args("rpl-x/db/app/", "rpl-x/blob/app/", "replica", "--once"), "replica as agent"
    )
    assert "User:agent" in out and "GroupAuthorizationFailed" in out, out[-3000:]


def test_a_wrong_password_or_no_security_settings_are_refused_fast_without_the_password(
    app: PicoApp, stack: dict[str, Any], tmp_path: Path
) -> None:
    database = unique_name("pw")
    replica = role_cli(app, stack, "replica", database)
    good = Path(replica.extra_env["KAFKA_CLIENT_CONFIG"]).read_text()
    real = passwords(stack)["replica"]
    wrong = "x" + real[::-1]
    bad = tmp_path / "bad.properties"
    bad.write_text(good.replace(f"sasl.password={real}", f"sasl.password={wrong}"))
    bad.chmod(0o600)
    replica.extra_env["KAFKA_CLIENT_CONFIG"] = str(bad)
    _refused(
        replica,
        replica.replica_args("rpl/db/app/", "rpl/blob/app/", "replica", "--once"),
        "replica with a wrong password",
        "SASL",
        secret=wrong,
    )
    _refused(replica, [str(BIN / "pipeline"), "status"], "pipeline status with a wrong password", "SASL", secret=wrong)
    del replica.extra_env["KAFKA_CLIENT_CONFIG"]
    _refused(replica, [str(BIN / "pipeline"), "status"], "pipeline status without security settings", "--kafka-config")

    # A client that trusts another CA than the one that signed the broker's certificate.
    from pool_pipeline.devcerts import make_certs

    other = make_certs(tmp_path / "other-ca")
    untrusting = tmp_path / "untrusting.properties"
    untrusting.write_text(good.replace(str(stack["info"]["ca_bundle"]), str(other.ca)))
    untrusting.chmod(0o600)
    replica.extra_env["KAFKA_CLIENT_CONFIG"] = str(untrusting)
    _refused(
        replica,
        replica.replica_args("rpl/db/app/", "rpl/blob/app/", "replica", "--once"),
        "replica trusting another CA",
        "certificate verify failed",
        "ssl.ca.location",
        secret=real,
    )


def test_s3_with_a_ca_bundle_that_did_not_sign_the_server_is_refused_clearly(
    app: PicoApp, stack: dict[str, Any], tmp_path: Path
) -> None:
    from pool_pipeline.devcerts import make_certs

    other = make_certs(tmp_path / "other-ca")
    archive = role_cli(app, stack, "archive", unique_name("ca"))
    bucket = stack["info"]["bucket"]
    ls = [str(BIN / "archive"), "ls", "--database", archive.database, "--bucket", f"s3://{bucket}/ca"]
    archive.extra_env["AWS_CA_BUNDLE"] = str(other.ca)
    _refused(archive, ls, "archive ls trusting another CA", "AWS_CA_BUNDLE", "certificate verify failed")
    run = [str(BIN / "archive"), "--database", archive.database, "--bucket", f"s3://{bucket}/ca", "--once"]
    _refused(archive, run, "archive --once trusting another CA", "AWS_CA_BUNDLE", "certificate verify failed")
    restore = [str(BIN / "restore"), "--database", archive.database, "--bucket", f"s3://{bucket}/ca", "--list"]
    _refused(archive, restore, "restore --list trusting another CA", "AWS_CA_BUNDLE")
    archive.extra_env["AWS_CA_BUNDLE"] = str(tmp_path / "missing.pem")
    _refused(archive, ls, "archive ls with a missing CA bundle", "AWS_CA_BUNDLE", "no such file")
