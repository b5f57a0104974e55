"""compose.yaml cannot run here (no Docker engine); check that it matches the real CLIs instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pool_pipeline.cli.parsers import PARSERS

ROOT = Path(__file__).resolve().parents[2]
CLI_ENV = {
    "KAFKA_BOOTSTRAP_SERVERS",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
}


def services() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def pipeline_services() -> list[str]:
    return [name for name, svc in services().items() if "build" in svc]


def test_compose_has_kafka_s3_and_the_pipeline_services() -> None:
    svcs = services()
    assert svcs["kafka"]["image"].startswith("apache/kafka:")
    assert svcs["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert svcs["minio"]["image"].startswith("minio/")
    assert {"capture-agent", "replica", "archive"} <= set(pipeline_services())
    assert (ROOT / "Dockerfile").exists()


@pytest.mark.parametrize("name", pipeline_services())
def test_service_command_parses_with_the_real_cli(name: str) -> None:
    svc = services()[name]
    program, *argv = svc["command"]
    assert program in PARSERS, f"{name}: {program} is not a console script of pool-pipeline"
    PARSERS[program]().parse_args(argv)  # argparse exits on an unknown or missing option


@pytest.mark.parametrize("name", pipeline_services())
def test_service_env_is_what_the_clis_read(name: str) -> None:
    env = services()[name]["environment"]
    assert CLI_ENV <= set(env), f"{name} misses {CLI_ENV - set(env)}"
    assert env["KAFKA_BOOTSTRAP_SERVERS"].split(":")[0] in services()
    assert env["AWS_ENDPOINT_URL_S3"].split("//")[1].split(":")[0] in services()


def test_the_documented_secured_settings_are_what_the_clis_read() -> None:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for service in ("capture-agent", "replica", "archive"):
        env = doc[f"x-secured-{service}-env"]
        assert CLI_ENV | {"KAFKA_CLIENT_CONFIG", "AWS_CA_BUNDLE"} <= set(env), service
        assert env["AWS_ENDPOINT_URL_S3"].startswith("https://")
    assert len({doc[f"x-secured-{s}-env"]["KAFKA_CLIENT_CONFIG"] for s in ("capture-agent", "replica", "archive")}) == 3
    program, *argv = doc["x-secured-archive-command"]
    args = PARSERS[program]().parse_args(argv)
    assert args.sse == "AES256"
