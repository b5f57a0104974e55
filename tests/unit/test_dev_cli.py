"""`pipeline dev` argument and state errors, checked against a hand-written stack.json (no real processes)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pool_pipeline import devstack
from pool_pipeline.cli.admin import _dev, pipeline_parser


def _parse(*argv: str) -> Any:
    return pipeline_parser().parse_args(list(argv))


def _dead_pid() -> int:
    """The pid of a process that has exited (its marker below keeps a reused pid from matching)."""
    p = subprocess.Popen(["true"])
    p.wait(timeout=10)
    return p.pid


def _own_marker() -> str:
    """A string in this test process's own command line, so stack.json can name it as a live broker."""
    return Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()


def _write_stack(state: Path, brokers: int, live: frozenset[int] | set[int] = frozenset()) -> dict[str, Any]:
    """A stack.json as dev_up writes it; brokers in `live` are this test process, the rest are gone."""
    procs = []
    for n in range(1, brokers + 1):
        alive = n in live
        procs.append({
            "name": f"kafka-{n}", "node_id": n, "port": 40000 + 2 * n, "controller_port": 40001 + 2 * n,
            "pid": os.getpid() if alive else _dead_pid(),
            "marker": _own_marker() if alive else f"/no/such/node-{n}/server.properties",
            "log": str(state / f"kafka-{n}.log"), "argv": ["/bin/false"], "cwd": str(state),
        })  # fmt: skip
    procs.append({"name": "s3", "port": 48333, "pid": _dead_pid(), "marker": "-dir=/no/such/s3", "log": None})
    info = {
        "bootstrap_servers": ",".join(f"127.0.0.1:{40000 + 2 * n}" for n in range(1, brokers + 1)),
        "s3_endpoint": "http://127.0.0.1:48333", "access_key": "k", "secret_key": "s", "region": "us-east-1",
        "bucket": "b", "brokers": brokers, "processes": procs, "pids": [p["pid"] for p in procs],
        "kafka_pids": [p["pid"] for p in procs[:-1]],
    }  # fmt: skip
    state.mkdir(parents=True, exist_ok=True)
    (state / devstack.STATE_FILE).write_text(json.dumps(info))
    return info


@pytest.mark.parametrize(
    "argv, message",
    [
        (["dev", "broker", "kill"], "the following arguments are required: N"),
        (["dev", "broker", "start", "0"], "broker numbers start at 1"),
        (["dev", "broker", "stop", "two"], "must be an integer"),
        (["dev", "broker", "restart", "1"], "invalid choice: 'restart'"),
        (["dev", "broker", "start", "1", "--timeout", "0"], "timeout must be > 0"),
        (["dev", "broker", "kill", "1", "--timeout", "5"], "unrecognized arguments: --timeout"),
        (["dev", "broker"], "the following arguments are required"),
    ],
)
def test_broker_argument_errors_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse(*argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_broker_options_parse(tmp_path: Path) -> None:
    args = _parse("dev", "broker", "start", "3", "--timeout", "45", "--state-dir", str(tmp_path))
    assert (args.action, args.broker_action, args.node, args.timeout, args.state_dir) == (
        "broker",
        "start",
        3,
        45.0,
        tmp_path,
    )
    assert _parse("dev", "broker", "stop", "1").timeout == 20.0


@pytest.mark.parametrize("action", ["kill", "stop", "start"])
def test_a_broker_number_beyond_the_stack_is_a_usage_error(
    tmp_path: Path, action: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_stack(tmp_path, brokers=3)
    with pytest.raises(SystemExit) as exc:
        _dev(_parse("dev", "broker", action, "4", "--state-dir", str(tmp_path)))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "broker 4 does not exist" in err and "numbered 1..3" in err


def test_starting_a_running_broker_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = _write_stack(tmp_path, brokers=3, live={2})
    with pytest.raises(SystemExit) as exc:
        _dev(_parse("dev", "broker", "start", "2", "--state-dir", str(tmp_path)))
    assert exc.value.code == 1
    assert "broker 2 is already running" in capsys.readouterr().err
    assert json.loads((tmp_path / devstack.STATE_FILE).read_text()) == info  # nothing recorded


def test_commands_without_a_stack_say_how_to_start_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["broker", "kill", "1"], ["broker", "start", "1"], ["env"]):
        with pytest.raises(SystemExit) as exc:
            _dev(_parse("dev", *argv, "--state-dir", str(tmp_path)))
        assert exc.value.code == 1
        assert "pipeline dev up" in capsys.readouterr().err


def test_status_and_env_with_brokers_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = _write_stack(tmp_path, brokers=3, live={1, 3})
    status = devstack.dev_status(tmp_path)
    assert {b["node_id"]: b["state"] for b in status["brokers"]} == {1: "starting", 2: "stopped", 3: "starting"}
    assert status["s3"]["state"] == "stopped"
    assert status["running"] and status["partial"] and not status["healthy"]
    text = devstack.format_status(status)
    assert any(line.split()[:2] == ["broker", "2"] and line.endswith("stopped") for line in text.splitlines()), text

    assert _dev(_parse("dev", "env", "--state-dir", str(tmp_path))) == 0
    out = capsys.readouterr()
    assert f"export KAFKA_BOOTSTRAP_SERVERS={info['bootstrap_servers']}" in out.out
    assert "kafka-2" in out.err and "kafka-1" not in out.err


def test_stopping_a_stopped_broker_is_a_no_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_stack(tmp_path, brokers=1)
    assert _dev(_parse("dev", "broker", "stop", "1", "--state-dir", str(tmp_path))) == 0
    assert "not running" in capsys.readouterr().out
