"""capture-agent and replica against a real broker's SASL_PLAINTEXT (SCRAM-SHA-512) listener, with the
client settings in a --kafka-config / $KAFKA_CLIENT_CONFIG file; a wrong password is refused fast."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp
from tests.pipeline_helpers import BIN, Cli, ok, unique_name

pytestmark = pytest.mark.integration

PASSWORD = "agent-Secret-4711"


def _ports() -> tuple[int, int]:
    """A client port whose +1 (the controller port) is free too, and a port for the SASL listener."""
    from pool_pipeline.devstack import _free_ports, _port_free

    for _ in range(50):
        client, sasl = _free_ports(2)
        if _port_free(client + 1) and sasl not in (client, client + 1):
            return client, sasl
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One broker: PLAINTEXT (for the readiness check) and SASL_PLAINTEXT with a SCRAM user `agent`."""
    from pool_pipeline.devstack import StackError, start_kafka

    client, sasl = _ports()
    overrides = {
        "listeners": f"PLAINTEXT://127.0.0.1:{client},CONTROLLER://127.0.0.1:{client + 1},"
        f"SASL_PLAINTEXT://127.0.0.1:{sasl}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{client},SASL_PLAINTEXT://127.0.0.1:{sasl}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
    }
    try:
        cluster = start_kafka(
            tmp_path_factory.mktemp("kafka-sasl"),
            ports=[client],
            detach=False,
            overrides=overrides,
            scram_users={"agent": PASSWORD},
        )
    except StackError as e:
        pytest.skip(f"a local Kafka broker with a SASL listener could not start: {e}")
    try:
        yield f"127.0.0.1:{sasl}"
    finally:
        cluster.stop()


def config(root: Path, name: str, password: str, servers: str) -> Path:
    path = root / name
    path.write_text(
        f"# SCRAM over the SASL_PLAINTEXT listener\nbootstrap.servers={servers}\nsecurity.protocol=SASL_PLAINTEXT\n"
        f"sasl.mechanism=SCRAM-SHA-512\nsasl.username=agent\nsasl.password={password}\n"
    )
    return path


@pytest.fixture
def sasl_cli(app: PicoApp, sasl_kafka: str) -> Iterator[Cli]:
    c = Cli(app.root, sasl_kafka, unique_name("sasl"))
    yield c
    c.stop_all()


def test_capture_and_replica_over_scram_and_a_wrong_password_is_refused_fast(
    app: PicoApp, sasl_cli: Cli, sasl_kafka: str
) -> None:
    good = config(app.root, "good.properties", PASSWORD, sasl_kafka)
    app.workload(20, seed=3)
    # The file by flag (bootstrap servers from the file) ...
    sasl_cli.bootstrap_servers = ""
    ok(sasl_cli.agent_once("--kafka-config", str(good)), "capture-agent --once --kafka-config")
    # ... and by $KAFKA_CLIENT_CONFIG.
    sasl_cli.extra_env["KAFKA_CLIENT_CONFIG"] = str(good)
    ok(sasl_cli.replica_once(), "replica --once with $KAFKA_CLIENT_CONFIG")
    assert not sasl_cli.differences(), sasl_cli.differences()
    status = ok(sasl_cli.run([str(BIN / "pipeline"), "status", "--kafka-config", str(good)]), "pipeline status")
    assert sasl_cli.database in status.stdout and PASSWORD not in status.stdout + status.stderr

    bad = config(app.root, "bad.properties", "not-the-" + PASSWORD, sasl_kafka)
    for what, args in (
        ("capture-agent", sasl_cli.agent_args("--once", "--kafka-config", str(bad))),
        (
            "replica",
            sasl_cli.replica_args("rpl2/db/app/", "rpl2/blob/app/", "replica2", "--once", "--kafka-config", str(bad)),
        ),
    ):
        started = time.monotonic()
        result = sasl_cli.run(args, timeout=60)
        took = time.monotonic() - started
        output = result.stdout + result.stderr
        assert result.returncode == 1, f"{what} exited {result.returncode}:\n{output[-3000:]}"
        assert took < 30, f"{what} took {took:.0f} s to give up:\n{output[-3000:]}"
        assert "SASL user name and password" in output, output[-3000:]
        assert PASSWORD not in output

    # No security settings at all against the SASL listener: refused too, pointing at the config file.
    del sasl_cli.extra_env["KAFKA_CLIENT_CONFIG"]
    started = time.monotonic()
    result = sasl_cli.run([str(BIN / "pipeline"), "status", "--bootstrap-servers", sasl_kafka], timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and time.monotonic() - started < 30, output[-3000:]
    assert "--kafka-config" in output and "needs other security settings" in output, output[-3000:]
