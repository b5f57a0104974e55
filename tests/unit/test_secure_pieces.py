"""The secured stack's rules without processes: ACL table, client configs, env exports, SSE arguments, error texts."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import kafka.errors as ke
import pytest
from botocore.exceptions import SSLError

from connectors import faults
from connectors.faults import as_pipeline_error, classify
from connectors.kafka.client import KafkaSettings, is_fenced, load_client_config
from connectors.s3.store import sse_args
from pipeline.errors import PipelineError
from pool_pipeline import devsecure, devstack
from pool_pipeline.devcerts import make_certs


def test_every_role_gets_only_its_grants_and_only_analytics_writes_stats() -> None:
    rows = devsecure.acl_bindings(["app"])
    allowed = {(p, r, pat, n, op) for p, perm, r, pat, n, op in rows if perm == "ALLOW"}
    denied = {(p, r, pat, n, op) for p, perm, r, pat, n, op in rows if perm == "DENY"}
    assert ("User:agent", "TOPIC", "PREFIXED", "pool.", "WRITE") in allowed
    assert ("User:agent", "TOPIC", "PREFIXED", "pool.", "CREATE") in allowed
    assert ("User:agent", "TRANSACTIONAL_ID", "PREFIXED", "pool-pipeline.capture.", "WRITE") in allowed
    for role in ("replica", "archive", "analytics"):
        assert ("User:" + role, "TOPIC", "PREFIXED", "pool.", "READ") in allowed
        assert ("User:" + role, "GROUP", "PREFIXED", role, "READ") in allowed
        assert not any(p == "User:" + role and op == "WRITE" and r == "TOPIC" and pat == "PREFIXED"
                       for p, r, pat, _, op in allowed)  # fmt: skip
    assert not any(p == "User:agent" and r == "GROUP" for p, r, *_ in allowed)  # no group offsets for the agent
    writers = {p for p, r, _, n, op in allowed if r == "TOPIC" and n == "pool.app.stats" and op == "WRITE"}
    assert writers == {"User:analytics"}
    assert ("User:agent", "TOPIC", "LITERAL", "pool.app.stats", "WRITE") in denied
    assert not any(p == "User:admin" for p, *_ in allowed)  # admin is a super user instead


def test_client_configs_are_private_and_load_as_sasl_ssl(tmp_path: Path) -> None:
    security = devsecure.prepare(tmp_path / "secure")
    again = devsecure.prepare(tmp_path / "secure")
    assert again.passwords == security.passwords  # kept: Kafka's storage holds them from its format on
    assert stat.S_IMODE((tmp_path / "secure" / "passwords.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(security.certs.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(security.certs.bundle.stat().st_mode) == 0o600
    paths = devsecure.write_client_configs(security, tmp_path / "secure", "127.0.0.1:9093")
    assert set(paths) == set(devsecure.ROLES)
    for role, path in paths.items():
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
        servers, options = load_client_config(path)
        assert servers == "127.0.0.1:9093" and options["security_protocol"] == "SASL_SSL"
        assert options["sasl_plain_username"] == role and options["ssl_check_hostname"] is True
        assert options["sasl_plain_password"] == security.passwords[role]
    assert security.passwords["admin"] not in repr(security)
    props = devsecure.broker_properties(security, 9093, 9094)
    assert props["advertised.listeners"] == "SASL_SSL://127.0.0.1:9093" and props["super.users"] == "User:admin"
    assert "PLAINTEXT" not in props["listener.security.protocol.map"]


def test_the_server_certificate_is_valid_for_127_0_0_1_and_localhost(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "tls")
    context = ssl.create_default_context(cafile=str(certs.ca))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(certs.cert), str(certs.key))
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED


def test_dev_env_exports_the_role_config_and_the_ca_only_for_a_secured_stack() -> None:
    info = {
        "bootstrap_servers": "127.0.0.1:9092", "s3_endpoint": "https://127.0.0.1:8333", "access_key": "a",
        "secret_key": "b", "region": "us-east-1", "bucket": "pool-pipeline", "secure": True,
        "kafka_client_configs": {r: f"/s/{r}.properties" for r in devsecure.ROLES}, "ca_bundle": "/s/tls/ca.pem",
    }  # fmt: skip
    text = devstack.env_exports(info)
    assert "export KAFKA_CLIENT_CONFIG=/s/admin.properties" in text and "export AWS_CA_BUNDLE=/s/tls/ca.pem" in text
    assert "export KAFKA_CLIENT_CONFIG=/s/replica.properties" in devstack.env_exports(info, "replica")
    plain = {**info, "secure": False, "kafka_client_configs": {}, "ca_bundle": None}
    assert "KAFKA_CLIENT_CONFIG" not in devstack.env_exports(plain) and "AWS_CA_BUNDLE" not in devstack.env_exports(
        plain
    )
    with pytest.raises(devstack.StackError, match="--secure"):
        devstack.env_exports(plain, "agent")


def test_sse_arguments() -> None:
    assert sse_args(None) == {}
    assert sse_args("AES256") == {"ServerSideEncryption": "AES256"}
    assert sse_args("aws:kms") == {"ServerSideEncryption": "aws:kms"}
    assert sse_args("aws:kms", "key-1") == {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "key-1"}
    for bad in (("AES256", "key-1"), (None, "key-1"), ("aes", None)):
        with pytest.raises(PipelineError):
            sse_args(*bad)


def test_an_authorization_error_names_the_principal_and_is_not_fencing() -> None:
    KafkaSettings(
        "127.0.0.1:1",
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "replica",
         "sasl_plain_password": "pw-1234567"},
    )  # fmt: skip
    try:
        exc = ke.TransactionalIdAuthorizationFailedError()
        assert not is_fenced(exc)
        error = as_pipeline_error("cannot start the transactional producer (transactional.id t)", exc)
        assert not error.retriable and "principal User:replica" in str(error) and "transactional id" in str(error)
        other = as_pipeline_error("cannot read", ke.NotLeaderForPartitionError())
        assert "User:replica" not in str(other)
        assert is_fenced(ke.ProducerFencedError())
    finally:
        faults._PRINCIPAL.clear()


def test_an_untrusted_s3_certificate_is_permanent_and_names_aws_ca_bundle() -> None:
    exc = SSLError(
        endpoint_url="https://127.0.0.1:8333/",
        error="[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate",
    )
    retriable, fix = classify(exc)
    assert retriable is False and "AWS_CA_BUNDLE" in fix


class _Recorder:
    """Stands in for boto3's client in a unit test: records the parameters of every write call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def put_object(self, **kw: object) -> dict:
        self.calls.append(("put_object", kw))
        return {}

    def create_multipart_upload(self, **kw: object) -> dict:
        self.calls.append(("create_multipart_upload", kw))
        return {"UploadId": "u1"}

    def upload_file(self, **kw: object) -> None:
        self.calls.append(("upload_file", kw))


@pytest.mark.parametrize(
    "mode, key_id", [("AES256", None), ("aws:kms", None), ("aws:kms", "arn:aws:kms:us-east-1:1:key/k")]
)
def test_every_archive_write_asks_for_the_encryption(mode: str, key_id: str | None, tmp_path: Path) -> None:
    from connectors.s3.store import ArchiveStore

    client = _Recorder()
    store = ArchiveStore(client, "b", "p", "app", sse_args(mode, key_id))
    store.put_new("p/app/segments/x.avro", b"data")
    store.start_upload("p/app/segments/y.avro")
    (tmp_path / "f").write_bytes(b"pool file")
    store.upload_file("p/app/snapshots/s/db/@", tmp_path / "f")
    expected = sse_args(mode, key_id)
    put, create, upload = (kw for _, kw in client.calls)
    assert {k: put[k] for k in expected} == expected and put["IfNoneMatch"] == "*"
    assert {k: create[k] for k in expected} == expected
    assert upload["ExtraArgs"] == expected
    plain = ArchiveStore(_Recorder(), "b", "p", "app")
    plain.put_new("k", b"d")
    plain.upload_file("k2", tmp_path / "f")
    assert "ServerSideEncryption" not in plain.client.calls[0][1] and plain.client.calls[1][1]["ExtraArgs"] is None
