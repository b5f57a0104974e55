"""Shared helpers for the benchmarks: a private Kafka broker, PicoLisp apps, child processes, tables.

Every benchmark starts its own single-node Kafka (pool_pipeline.devstack.start_kafka) in a temp
directory on 127.0.0.1 and stops it at exit, together with every child process it started.
Figures that matter are RATIOS measured in the same run against the same broker: the machine is
shared, so absolute numbers are noisy.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.picolisp_fixtures is not an installed package

VENV_BIN = Path(sys.executable).parent
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"

_children: list[subprocess.Popen] = []
_cleanups: list = []


def bin_path(name: str) -> str:
    """A console script of the venv (capture-agent, replica, ...)."""
    path = VENV_BIN / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: run from the project's venv (.venv/bin/python bench/...)")
    return str(path)


def spawn(argv: Sequence[str], *, log: Path | None = None, **kw) -> subprocess.Popen:
    """Start a child that is killed (SIGTERM, then SIGKILL) when the benchmark exits."""
    if log is not None:
        fh = open(log, "ab")
        kw.setdefault("stdout", fh)
        kw.setdefault("stderr", subprocess.STDOUT)
    kw.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.Popen(list(argv), **kw)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 10) -> int | None:
    """SIGTERM one child we started, SIGKILL it after `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _cleanup() -> None:
    for proc in reversed(_children):
        with contextlib.suppress(Exception):
            stop(proc, 5)
    while _cleanups:
        fn = _cleanups.pop()
        with contextlib.suppress(Exception):
            fn()


atexit.register(_cleanup)
# Ctrl-C / SIGTERM: run the atexit cleanup (kill children, stop Kafka, remove temp data).
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def on_exit(fn) -> None:
    _cleanups.append(fn)


def workdir(prefix: str, base: str | None = None, keep: bool = False) -> Path:
    """A fresh temp directory, removed at exit unless keep."""
    path = Path(tempfile.mkdtemp(prefix=f"pool-bench-{prefix}-", dir=base))
    if not keep:
        on_exit(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


@contextlib.contextmanager
def kafka(root: Path) -> Iterator[object]:
    """A private single-broker Kafka on 127.0.0.1 (free ports), stopped on exit."""
    from pool_pipeline.devstack import start_kafka

    t = time.monotonic()
    cluster = start_kafka(root / "kafka", brokers=1)
    on_exit(cluster.stop)
    log(f"kafka up at {cluster.bootstrap_servers} in {time.monotonic() - t:.1f} s (pid {cluster.pids[0]})")
    try:
        yield cluster
    finally:
        cluster.stop()


def new_app(root: Path):
    from tests.picolisp_fixtures import PicoApp

    app = PicoApp(root)
    app.create()
    return app


def env_with(bootstrap: str) -> dict[str, str]:
    return dict(os.environ, **{BOOTSTRAP_ENV: bootstrap})


def agent_argv(app, *extra: str) -> list[str]:
    return [bin_path("capture-agent"), "--pool", "db/app/", "--journal", "fifo/app", "--blob", "blob/app/", *extra]


def replica_argv(
    *extra: str, target: str = "rpl/db/app/", blob: str = "rpl/blob/app/", database: str = "app"
) -> list[str]:
    return [bin_path("replica"), "--database", database, "--target", target, "--blob", blob, *extra]


def verify_replica(app, target: str = "rpl/db/app/", blob: str = "rpl/blob/app/") -> str:
    """`verify` of the replica at `target` against the app's pool: its last line (or the error's end)."""
    r = subprocess.run(
        [bin_path("verify"), "--pool", "db/app/", "--replica", target, "--blob", "blob/app/", "--replica-blob", blob],
        cwd=app.root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return (r.stdout.strip().splitlines() or [r.stderr.strip()[-300:]])[-1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def proc_status(pid: int, field: str = "VmHWM") -> int | None:
    """A /proc/<pid>/status field in bytes (VmHWM = peak RSS, VmRSS = current), None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], title: str | None = None) -> str:
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        if abs(c) >= 100:
            return f"{c:,.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.2f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


def mib(n: float) -> float:
    return n / (1 << 20)


def capture_pending(app, state_dir: Path | None = None) -> list[str]:
    """What the capture side still has to publish: a non-empty journal, an unacknowledged spool (a
    round taken from the journal but not yet committed in Kafka), pending blob markers. Empty = idle."""
    pending = []
    if app.journal.exists() and app.journal.stat().st_size:
        pending.append(f"journal {app.journal.stat().st_size} bytes")
    spool = (state_dir or Path(f"{app.journal}.agent")) / "journal.spool"
    if spool.exists():
        pending.append(f"spool {spool.stat().st_size} bytes")
    if app.blob_dir.is_dir():
        markers = [n for n in os.listdir(app.blob_dir) if n.startswith("=")]
        if markers:
            pending.append(f"{len(markers)} blob markers")
        inflight = app.blob_dir / ".pool-pipeline-inflight"
        if inflight.is_dir() and os.listdir(inflight):
            pending.append("in-flight blob markers")
    return pending


def wait_published(app, bs: str, database: str, codec):
    """Wait until the following agent has drained the journal and published it all; the last commit."""
    from connectors.kafka.topics import last_commit

    prev = None
    while True:
        time.sleep(0.5)
        lc = last_commit(bs, database, codec)
        if not capture_pending(app) and lc == prev:
            return lc
        prev = lc


def time_method(obj, name: str, acc: dict, key: str | None = None) -> None:
    """Accumulate the time spent in obj.name into acc[key or name] (an instance attribute shadows the method)."""
    fn = getattr(obj, name, None)
    if fn is None:  # the code changed under the benchmark: report the phase as 0, keep measuring
        log(f"note: {type(obj).__name__}.{name} does not exist any more; its phase is not timed")
        return

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[key or name] += time.perf_counter() - t

    setattr(obj, name, wrapper)
