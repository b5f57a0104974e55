"""A replica whose target fills up or turns read-only mid-run: one clear error, no temp files, a clean resume."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp
from tests.pipeline_helpers import (
    Cli,
    check_caught_up,
    committed_transactions,
    ok,
    replica_at_boundary,
    replica_txn,
    wait_for,
)

pytestmark = pytest.mark.integration

RPL = "rpl/db/app/"
RPL_BLOB = "rpl/blob/app/"
# What a replica's state dir may hold between applies: anything else is a temp file keeping the disk full.
AT_REST = {"position.json", "replica.lock"}


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def small_rpl(app: PicoApp) -> Iterator[Path]:
    """`rpl/` under the app root is a 16 MiB tmpfs (the replica's pool, blobs and state), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = app.root / "rpl"
    mnt.mkdir()
    mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # a process still holds it: detach


def fill(mnt: Path, leave: int) -> Path:
    """A ballast file leaving about `leave` bytes free on `mnt`."""
    st = os.statvfs(mnt)
    ballast = mnt / "ballast"
    with open(ballast, "wb") as f:
        f.write(bytes(max(0, st.f_bavail * st.f_frsize - leave)))
    return ballast


def one_error_line(stderr: str) -> str:
    """The replica's whole stderr must be one `error:` line, no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def assert_no_temp_files(cli: Cli) -> None:
    state = cli.root / RPL / ".pool-pipeline"
    left = {p.name for p in state.iterdir()} - AT_REST
    assert left == set(), f"temp files left in {state}: {sorted(left)}"
    assert replica_at_boundary(cli.root / RPL) is None


def test_a_replica_whose_disk_fills_up_mid_run_stops_clearly_and_catches_up_once_space_is_back(
    app: PicoApp, cli: Cli, small_rpl: Path
) -> None:
    app.workload(40, seed=901)
    ok(cli.agent_once(), "capture-agent --once")
    replica = cli.start_replica()
    first = committed_transactions(cli.bootstrap_servers, cli.database)[-1].txn_id
    wait_for(lambda: replica_txn(cli.root / RPL) >= first, 60, f"the replica to reach txn {first}")
    fill(small_rpl, 64 << 10)  # the disk is (almost) full while the replica follows
    app.workload(150, seed=902)
    ok(cli.agent_once(), "capture-agent --once")
    code = replica.wait(timeout=90)
    line = one_error_line(replica.stderr())
    print(line)
    assert code == 1, replica.output()
    assert f"replica {cli.database}:" in line and "no space left on device" in line, line
    assert f"free on {small_rpl}" in line and f"at txn {first}" in line, line
    assert "sink reports" not in line, line
    assert replica_txn(cli.root / RPL) == first
    assert_no_temp_files(cli)
    mount("-o", "remount,size=64m", str(small_rpl))  # space is back; the ballast stays
    check_caught_up(cli, app, RPL, RPL_BLOB)  # replica --once applies everything, verify: identical
    assert_no_temp_files(cli)


def test_a_read_only_replica_target_stops_clearly_and_catches_up_once_writable(
    app: PicoApp, cli: Cli, small_rpl: Path
) -> None:
    app.workload(30, seed=911)
    ok(cli.agent_once(), "capture-agent --once")
    ok(cli.replica_once(), "replica --once")
    at = replica_txn(cli.root / RPL)
    app.workload(30, seed=912)
    ok(cli.agent_once(), "capture-agent --once")
    mount("-o", "remount,ro", str(small_rpl))
    try:
        r = cli.replica_once()
        line = one_error_line(r.stderr)
        print(line)
        assert r.returncode == 1, r.stderr
        assert f"replica {cli.database}:" in line and "read-only file system" in line and f"at txn {at}" in line, line
        fresh = cli.replica_once("rpl/db/fresh/", "rpl/blob/fresh/", "fresh")  # a new replica on it: the same
        assert fresh.returncode == 1 and "read-only file system" in one_error_line(fresh.stderr), fresh.stderr
    finally:
        mount("-o", "remount,rw", str(small_rpl))
    assert replica_txn(cli.root / RPL) == at
    assert_no_temp_files(cli)
    check_caught_up(cli, app, RPL, RPL_BLOB)
