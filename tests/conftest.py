"""Session fixtures: a real Kafka broker and S3 endpoint (from env, Docker, or local processes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest

KAFKA_IMAGE = "apache/kafka:4.1.1"
MINIO_IMAGE = "minio/minio:RELEASE.2025-04-22T22-12-26Z"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs a real Kafka broker, S3 endpoint or PicoLisp (started locally if absent)"
    )


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip locally, but fail in CI (CI=true): a missing service must never pass silently there."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class KafkaEndpoint:
    bootstrap_servers: str
    brokers: int = 1


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    bucket: str


@pytest.fixture(scope="session")
def docker_available() -> bool:
    """True if a Docker engine answers within a few seconds."""
    if shutil.which("docker"):
        try:
            return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - no engine, no socket, no package: all mean "no Docker"
        return False


def _kafka_container() -> tuple[Any, KafkaEndpoint]:
    """Single-node KRaft apache/kafka container with the host port advertised as-is."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    from pool_pipeline.devstack import free_port

    port = free_port()
    env = {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": f"PLAINTEXT://:{port},CONTROLLER://:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://127.0.0.1:{port}",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_NUM_PARTITIONS": "1",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",  # as the local brokers and production
    }
    container = DockerContainer(KAFKA_IMAGE).with_bind_ports(port, port)
    for k, v in env.items():
        container = container.with_env(k, v)
    container.start()
    wait_for_logs(container, "Kafka Server started", timeout=120)
    return container, KafkaEndpoint(f"127.0.0.1:{port}")


def _minio_container(bucket: str) -> tuple[Any, S3Endpoint]:
    from testcontainers.core.container import DockerContainer

    from pool_pipeline.devstack import _ensure_bucket, _s3_client

    key, secret = "pooladmin", "poolsecret"
    container = (
        DockerContainer(MINIO_IMAGE)
        .with_command("server /data")
        .with_env("MINIO_ROOT_USER", key)
        .with_env("MINIO_ROOT_PASSWORD", secret)
        .with_exposed_ports(9000)
    )
    container.start()
    endpoint = S3Endpoint(f"http://127.0.0.1:{container.get_exposed_port(9000)}", key, secret, "us-east-1", bucket)
    client = _s3_client(endpoint.endpoint_url, key, secret, endpoint.region)
    deadline = time.monotonic() + 60
    while True:
        try:
            _ensure_bucket(client, bucket)
            return container, endpoint
        except Exception:
            if time.monotonic() > deadline:
                container.stop()
                raise
            time.sleep(0.5)


@pytest.fixture(scope="session")
def kafka(docker_available: bool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Kafka cluster: $KAFKA_BOOTSTRAP_SERVERS, else a Docker container, else local broker processes."""
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if servers:
        yield KafkaEndpoint(servers, brokers=len(servers.split(",")))
        return
    if docker_available:
        try:
            container, endpoint = _kafka_container()
        except Exception as e:  # noqa: BLE001
            unavailable(f"Kafka via Docker ({KAFKA_IMAGE}) failed: {type(e).__name__}: {e}")
        try:
            yield endpoint
        finally:
            container.stop()
        return
    from pool_pipeline.devstack import StackError, start_kafka

    try:
        cluster = start_kafka(tmp_path_factory.mktemp("kafka"), brokers=1, detach=False)
    except StackError as e:
        unavailable(f"no KAFKA_BOOTSTRAP_SERVERS, no Docker, and a local Kafka broker could not start: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def s3(docker_available: bool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An S3 endpoint with a bucket: $AWS_ENDPOINT_URL_S3 + keys, else MinIO in Docker, else local SeaweedFS."""
    bucket = os.environ.get("POOL_PIPELINE_BUCKET", "").strip() or "pool-pipeline"
    url = os.environ.get("AWS_ENDPOINT_URL_S3", "").strip()
    key = os.environ.get("AWS_ACCESS_KEY_ID", "").strip()
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "").strip()
    if url and key and secret:
        from pool_pipeline.devstack import _ensure_bucket, _s3_client

        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        endpoint = S3Endpoint(url, key, secret, region, bucket)
        try:
            _ensure_bucket(_s3_client(url, key, secret, region), bucket)
        except Exception as e:  # noqa: BLE001
            unavailable(f"S3 endpoint {url} from AWS_ENDPOINT_URL_S3 is not usable: {type(e).__name__}: {e}")
        yield endpoint
        return
    if docker_available:
        try:
            container, endpoint = _minio_container(bucket)
        except Exception as e:  # noqa: BLE001
            unavailable(f"S3 via Docker ({MINIO_IMAGE}) failed: {type(e).__name__}: {e}")
        try:
            yield endpoint
        finally:
            container.stop()
        return
    from pool_pipeline.devstack import StackError, start_s3

    try:
        server = start_s3(tmp_path_factory.mktemp("s3"), bucket=bucket, detach=False)
    except StackError as e:
        unavailable(f"no AWS_ENDPOINT_URL_S3, no Docker, and local SeaweedFS could not start: {e}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_client(s3: Any) -> Any:
    """A boto3 S3 client for the `s3` fixture (path-style addressing)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name=s3.region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )
