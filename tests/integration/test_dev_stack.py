"""`pipeline dev` broker fault controls against a real 3-broker dev stack, driven through the console script."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pool_pipeline import devstack
from tests.conftest import unavailable
from tests.pipeline_helpers import BIN

pytestmark = pytest.mark.integration

BROKERS = 3


def _kafka_base_port(brokers: int) -> int:
    """A port p with p .. p + 2*brokers - 1 all free (dev up puts client/controller pairs side by side)."""
    for _ in range(200):
        p = devstack.free_port()
        if p + 2 * brokers < 65536 and all(devstack._port_free(p + i) for i in range(2 * brokers)):
            return p
    raise AssertionError("no run of free ports found for the Kafka brokers")


def _s3_port(exclude: range) -> int:
    """A free port p (outside `exclude`) whose gRPC twin p + 10000 is free too."""
    for _ in range(200):
        p = devstack.free_port(with_grpc_offset=True)
        if p not in exclude and p + 10000 not in exclude:
            return p
    raise AssertionError("no free S3 port pair found")


def _pipeline(state: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "pipeline"), "dev", *args, "--state-dir", str(state)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip


def _ok(r: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"{what} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _status(state: Path) -> dict[str, Any]:
    return json.loads(_ok(_pipeline(state, "status", "--json", timeout=60), "dev status --json").stdout)


def _broker_states(status: dict[str, Any]) -> dict[int, str]:
    return {b["node_id"]: b["state"] for b in status["brokers"]}


def test_kill_and_restart_a_broker_of_a_three_broker_dev_stack(tmp_path: Path) -> None:
    t0 = time.monotonic()
    state = tmp_path / "stack"
    kafka_port = _kafka_base_port(BROKERS)
    s3_port = _s3_port(range(kafka_port, kafka_port + 2 * BROKERS))
    up = _pipeline(state, "up", "--brokers", str(BROKERS), "--kafka-port", str(kafka_port),
                   "--s3-port", str(s3_port), timeout=180)  # fmt: skip
    if up.returncode != 0:
        _pipeline(state, "down", timeout=60)
        unavailable(f"a 3-broker dev stack could not start:\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}")
    recorded = json.loads((state / "stack.json").read_text())
    all_pids = set(recorded["pids"])
    try:
        status = _status(state)
        assert status["healthy"] and _broker_states(status) == {1: "running", 2: "running", 3: "running"}
        assert status["s3"]["state"] == "running"

        # SeaweedFS keeps its log files and its HTTP unix sockets under the state dir, not /tmp.
        assert any((state / "s3" / "logs").iterdir()), "weed wrote no log files into the state dir"
        assert {p.name for p in (state / "s3" / "sock").glob("*.sock")} == {"filer.sock", "s3.sock"}

        old_pid = next(b["pid"] for b in status["brokers"] if b["node_id"] == 2)
        _ok(_pipeline(state, "broker", "kill", "2", timeout=60), "dev broker kill 2")
        assert not devstack._pid_alive(old_pid)
        status = _status(state)
        assert _broker_states(status) == {1: "running", 2: "stopped", 3: "running"}
        assert status["running"] and not status["healthy"]
        human = _ok(_pipeline(state, "status", timeout=60), "dev status").stdout
        assert any(line.split()[:2] == ["broker", "2"] and line.endswith("stopped") for line in human.splitlines()), (
            human
        )

        env = _ok(_pipeline(state, "env", timeout=60), "dev env with broker 2 down")
        assert f"export KAFKA_BOOTSTRAP_SERVERS={recorded['bootstrap_servers']}" in env.stdout
        assert "kafka-2" in env.stderr  # the warning names the broker that is down

        again = _pipeline(state, "broker", "kill", "4", timeout=60)
        assert again.returncode == 2 and "numbered 1..3" in again.stderr

        _ok(_pipeline(state, "broker", "start", "2", "--timeout", "60", timeout=90), "dev broker start 2")
        status = _status(state)
        assert _broker_states(status) == {1: "running", 2: "running", 3: "running"} and status["healthy"]
        new_pid = next(b["pid"] for b in status["brokers"] if b["node_id"] == 2)
        assert new_pid != old_pid
        after = json.loads((state / "stack.json").read_text())
        assert after["kafka_pids"][1] == new_pid and new_pid in after["pids"]
        all_pids.add(new_pid)

        twice = _pipeline(state, "broker", "start", "2", timeout=60)
        assert twice.returncode == 1 and "already running" in twice.stderr
    finally:
        down = _pipeline(state, "down", timeout=90)
    _ok(down, "dev down")
    assert not any(devstack._pid_alive(p) for p in all_pids), "dev down left processes behind"
    assert not (state / "stack.json").exists()
    assert not list((state / "s3" / "sock").glob("*.sock"))
    assert time.monotonic() - t0 < 90, f"took {time.monotonic() - t0:.0f} s"
