"""The Kafka client config file (--kafka-config / $KAFKA_CLIENT_CONFIG): parsing, mapping, errors, redaction."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import kafka.errors as ke
import pytest

from connectors.faults import as_pipeline_error, redact, retry
from connectors.kafka.client import KafkaSettings, load_client_config
from pipeline.errors import PipelineError
from pool_pipeline.cli.common import add_kafka, parse, with_retries

SECRET = "s3cr3t-Pa55word"


def write(tmp_path: Path, text: str, name: str = "client.properties") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def pem_files(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    return files


def test_sasl_ssl_with_mutual_tls_maps_to_kafka_python_options(tmp_path: Path) -> None:
    files = pem_files(tmp_path)
    path = write(
        tmp_path,
        f"""# a comment
! another comment

bootstrap.servers = broker1:9093,broker2:9093
security.protocol=sasl_ssl
sasl.mechanism=SCRAM-SHA-512
sasl.username=agent
sasl.password={SECRET}
ssl.ca.location={files["ca"]}
ssl.certificate.location: cert.pem
ssl.key.location=key.pem
ssl.key.password=keypass
ssl.endpoint.identification.algorithm=https
""",
    )
    bootstrap, options = load_client_config(path)
    assert bootstrap == "broker1:9093,broker2:9093"
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "agent",
        "sasl_plain_password": SECRET,
        "ssl_cafile": str(files["ca"]),
        "ssl_certfile": str(files["cert"]),  # relative paths: next to the properties file
        "ssl_keyfile": str(files["key"]),
        "ssl_password": "keypass",
        "ssl_check_hostname": True,
    }


@pytest.mark.parametrize("value, check", [("https", True), ("none", False), ("", False), ("NONE", False)])
def test_endpoint_identification_turns_the_hostname_check_on_or_off(tmp_path: Path, value: str, check: bool) -> None:
    path = write(tmp_path, f"security.protocol=SSL\nssl.endpoint.identification.algorithm={value}\n")
    assert load_client_config(path)[1]["ssl_check_hostname"] is check


def test_an_empty_file_is_plaintext_and_librdkafka_spelling_of_mechanism_works(tmp_path: Path) -> None:
    assert load_client_config(write(tmp_path, "\n# nothing\n")) == (None, {"security_protocol": "PLAINTEXT"})
    path = write(
        tmp_path, "security.protocol=SASL_PLAINTEXT\nsasl.mechanisms=PLAIN\nsasl.username=u\nsasl.password=p\n"
    )
    assert load_client_config(path)[1]["sasl_mechanism"] == "PLAIN"


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("security.protocol=SSL\nfoo.bar=1\n", 2, ["unknown key 'foo.bar'"]),
        ("ssl.keystore.location=/x/k.jks\n", 1, ["ssl.keystore.location", "Java keystore", "PEM"]),
        ("ssl.truststore.type=PKCS12\n", 1, ["ssl.truststore.type", "Java keystore"]),
        ("security.protocol=SSL\nssl.ca.location=/etc/ca.jks\n", 2, ["ssl.ca.location", "Java keystore"]),
        (f"sasl.jaas.config=x password={SECRET}\n", 1, ["sasl.jaas.config", "sasl.username"]),
        ("security.protocol=TLS\n", 1, ["security.protocol", "'TLS'", "SASL_SSL"]),
        ("security.protocol=SASL_SSL\nsasl.mechanism=GSSAPI\n", 2, ["sasl.mechanism", "SCRAM-SHA-512"]),
        ("security.protocol=SSL\nssl.ca.location=missing-ca.pem\n", 2, ["ssl.ca.location", "missing-ca.pem", "exist"]),
        ("security.protocol=SSL\nssl.endpoint.identification.algorithm=dns\n", 2, ["https or none"]),
        (f"sasl.username=u\nsasl.password={SECRET}\n", 1, ["sasl.username", "PLAINTEXT", "SASL_SSL"]),
        ("security.protocol=SASL_PLAINTEXT\nssl.key.password=x\n", 2, ["ssl.key.password", "SSL or SASL_SSL"]),
        ("security.protocol=SSL\nsecurity.protocol=SSL\n", 2, ["set twice", "line 1"]),
        ("justakey\n", 1, ["expected key=value"]),
    ],
)
def test_bad_settings_name_the_file_line_and_key(tmp_path: Path, text: str, line: int, words: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PipelineError) as err:
        load_client_config(path)
    message = str(err.value)
    assert f"{path}, line {line}" in message
    for word in words:
        assert word in message
    assert SECRET not in message
    assert err.value.retriable is False


def test_sasl_needs_mechanism_user_and_password(tmp_path: Path) -> None:
    path = write(tmp_path, "security.protocol=SASL_SSL\nsasl.mechanism=PLAIN\nsasl.username=u\n")
    with pytest.raises(PipelineError, match="SASL_SSL needs sasl.password"):
        load_client_config(path)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="cannot read Kafka client config .*nope.properties"):
        load_client_config(tmp_path / "nope.properties")


def test_bootstrap_servers_flags_and_environment_win_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "bootstrap.servers=file:9093\nsecurity.protocol=SSL\n")
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("KAFKA_CLIENT_CONFIG", raising=False)
    assert KafkaSettings.from_properties(path).bootstrap_servers == "file:9093"
    assert KafkaSettings.from_properties(path, "flag:1").bootstrap_servers == "flag:1"
    assert KafkaSettings.from_env(None, path).bootstrap_servers == "file:9093"
    assert KafkaSettings.from_env().options == {}
    monkeypatch.setenv("KAFKA_CLIENT_CONFIG", str(path))
    settings = KafkaSettings.from_env()
    assert (settings.bootstrap_servers, settings.options["security_protocol"]) == ("file:9093", "SSL")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "env:2")
    assert KafkaSettings.from_env().bootstrap_servers == "env:2"
    assert KafkaSettings.from_env("flag:1").bootstrap_servers == "flag:1"


def test_the_cli_builds_settings_from_the_file_and_refuses_a_bad_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("KAFKA_CLIENT_CONFIG", raising=False)
    parser = argparse.ArgumentParser()
    add_kafka(parser)
    good = write(
        tmp_path, f"security.protocol=SASL_PLAINTEXT\nsasl.mechanism=PLAIN\nsasl.username=u\nsasl.password={SECRET}\n"
    )
    args = parse(parser, ["--kafka-config", str(good)])
    assert args.kafka.options["sasl_plain_password"] == SECRET
    assert args.bootstrap_servers == args.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert parse(parser, []).kafka == KafkaSettings("127.0.0.1:9092")
    bad = write(tmp_path, f"security.protocol=SASL_PLAINTEXT\nsasl.password={SECRET}\nsasl.mechanism=OOPS\n", "bad")
    with pytest.raises(SystemExit) as exit_:
        parse(parser, ["--kafka-config", str(bad)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "sasl.mechanism" in err and f"{bad}, line 3" in err and SECRET not in err


def test_repr_str_and_error_messages_never_show_passwords() -> None:
    settings = KafkaSettings(
        "127.0.0.1:1", {"security_protocol": "SASL_SSL", "sasl_plain_password": SECRET, "ssl_password": "keypass1"}
    )
    for text in (repr(settings), str(settings), f"{settings}", repr([settings])):
        assert SECRET not in text and "keypass1" not in text
        assert "***" in text and "SASL_SSL" in text
    # A library error that happened to carry the password: scrubbed from the message and the retry log.
    err = as_pipeline_error("capture-agent db", ke.KafkaConfigurationError(f"bad sasl_plain_password={SECRET}"))
    assert SECRET not in str(err) and "***" in str(err)
    assert redact(f"x {SECRET} keypass1 y") == "x *** *** y"
    lines: list[str] = []
    calls = iter([PipelineError(f"down {SECRET}", retriable=True)])

    def attempt() -> int:
        for exc in calls:
            raise exc
        return 7

    assert retry("step", attempt, lines.append, backoff=None) == 7
    assert lines and SECRET not in lines[0]


def test_sasl_failures_are_permanent_with_a_hint() -> None:
    err = as_pipeline_error("replica db", ke.SaslAuthenticationFailedError("Authentication failed"))
    assert not err.retriable and "check the SASL user name and password" in str(err)


@pytest.fixture
def tls_server(tmp_path: Path):
    """A loopback TLS server with a self-signed certificate no client trusts."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],  # fmt: skip
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}", cert
    stop.set()
    thread.join(2)
    listener.close()


def test_an_untrusted_broker_certificate_is_refused_at_once(tls_server: tuple[str, Path]) -> None:
    address, cert = tls_server
    settings = KafkaSettings(address, {"security_protocol": "SSL"})
    problem = settings.tls_problem()
    assert problem and "certificate verify failed" in problem and "ssl.ca.location" in problem, problem

    # kafka-python reports it as a connection error (retriable): with_retries looks and stops for good.
    def attempt() -> int:
        raise PipelineError("NoBrokersAvailable", retriable=True)

    with pytest.raises(PipelineError) as err:
        with_retries("replica db", attempt, kafka=settings)
    assert not err.value.retriable and "certificate verify failed" in str(err.value)

    trusted = KafkaSettings(address, {"security_protocol": "SSL", "ssl_cafile": str(cert), "ssl_check_hostname": False})
    assert trusted.tls_problem() is None
    wrong_host = KafkaSettings(address, {"security_protocol": "SSL", "ssl_cafile": str(cert)})
    assert "ssl.endpoint.identification.algorithm" in (wrong_host.tls_problem() or "")


def test_no_tls_problem_for_plaintext_or_a_broker_that_is_down() -> None:
    assert KafkaSettings("127.0.0.1:1").tls_problem() is None
    assert KafkaSettings("127.0.0.1:1", {"security_protocol": "SSL"}).tls_problem() is None
