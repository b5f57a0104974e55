"""pool-pipeline against PicoLisp's own replication (bin/ssl -> httpGate -> @lib/replica.l).

    .venv/bin/python bench/vs_ssl.py [--duration 10] [--idle 10] [--backlog 160] [--ssl-sec 1]
                                     [--workloads steady200-blobs,steady200,steady1000,idle,backlog]
                                     [--systems ssl,pool-pipeline] [--backlog-kib 1024] [--initial 2000]

Runs as root. The script re-executes itself inside a private network namespace (`unshare -n`, then
`ip link set lo up`): httpGate and PicoLisp's (port) bind the wildcard address, so the whole run,
the private Kafka broker included, only ever sees that namespace's loopback. The namespace goes away
with the last process in it.

Both systems replicate the same app (tests/lisp/app.l) on the same workload, one after the other
(ssl first, then pool-pipeline, for each workload), each on a fresh byte copy of one base pool:

  ssl            the real /usr/lib/picolisp/bin/ssl (run with the trailing "+" so that it stays in the
                 foreground) ships fifo/app and the blob/app/=* markers every --ssl-sec seconds over TLS
                 to httpGate (self-signed certificate made with the openssl CLI in the temp dir; ssl is
                 given the port as "-PORT", its "don't verify" form), which forwards /PORT/!replica to
                 `pil @lib/replica.l PORT key "" rpl/db/app/ rpl/blob/app/ 1 2 4 6 0`. The replica pool
                 starts as a byte copy of the source pool.
  pool-pipeline  capture-agent + replica console scripts of the venv, follow mode, against a private
                 single-node broker (pool_pipeline.devstack.start_kafka); one topic per run.

Workloads (bench/lisp/paced.l committing the tests/lisp/workload.l mix):
  steady200-blobs  200 commits/s with blobs for --duration s
  steady200        200 commits/s without blobs
  steady1000       1000 commits/s without blobs
  idle             nothing committed for --idle s (what replication costs when nothing happens)
  backlog          --backlog commits of --backlog-kib KiB each (bench/lisp/backlog.l) while the shipper
                   (ssl / capture-agent) is stopped; the receiving side runs. The shipper is then started
                   and the time until the replica's files have the source's md5 is the drain time.

Measured per system and workload:
  lag      commit -> visible on the replica, per commit (paced.l stamps each commit).
           pool-pipeline: as bench/lag.py's plain mode (commit -> first capture txn whose
           TxnBegin.source_time_ms >= the commit; its visibility is position.json's applied_at_ms,
           polled every ms).
           ssl: a 1 ms sampler records the source journal's size and the newest mtime of the replica's
           pool files. Each drop of the journal size is one transfer acknowledged by replica.l (ssl
           truncates after the 'T'). The bytes left after the drop were appended after ssl's lock, so
           the transfer holds the commits made before the journal last had (size before - size
           after) bytes: that sample time is the transfer's cutoff (for a drop to 0, the journal's last
           growth). replica.l writes the pool only when it replays a whole transfer, and that replay
           ends before ssl's next lock, so a transfer is visible at the newest replica pool-file
           mtime between its cutoff and the next transfer's. Resolution: the 1 ms sampling and the kernel's
            coarse mtime clock (a few ms),
           small against ssl's whole-second polling. Blobs ship after the journal in the same ssl
           round; their arrival is not part of this lag.
  cpu      per role, children included: each role runs in its own cgroup (v2 cpu.stat usage_usec, or
           v1 cpuacct.usage) created under /sys/fs/cgroup by this script; the broker JVM is moved
           into one after it starts. httpGate forks a child per connection and daemonizes; the
           cgroup keeps all of them. Reported as CPU seconds over the window (workload start ->
           replica equal) and as % of one core.
  rss      peak over the window of the summed VmRSS of the role's processes, sampled every 0.1 s.
  MiB/s    backlog: journal bytes / drain time.
  equal    md5 of every pool file (source vs replica) and every source blob's bytes at the end of
           each run. ssl does not remove blobs deleted on the source (workload.l deletes items
           with their blobs): those extra replica blobs are counted, not treated as a difference.

Prints a Markdown table on stdout (progress on stderr). Exits non-zero only when setting something
up fails (with the failing process and its log tail).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from bisect import bisect_right
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lag as lagmod  # noqa: E402
from _common import (  # noqa: E402
    BENCH,
    bin_path,
    env_with,
    kafka,
    log,
    mib,
    new_app,
    on_exit,
    percentile,
    spawn,
    stop,
    workdir,
)

from connectors.kafka.topics import last_commit  # noqa: E402
from pipeline.codec import Codec  # noqa: E402
from schemas import load_schemas  # noqa: E402

PIL_LIB = Path("/usr/lib/picolisp")
SSL_BIN = PIL_LIB / "bin/ssl"
GATE_BIN = PIL_LIB / "bin/httpGate"
DBS = ("1", "2", "4", "6", "0")  # tests/lisp/app.l's (dbs ...) block shifts, files @ A B C D
REPLICA_PORT, GATE_PORT, GATE_DFLT = 4040, 4443, 4041
NETNS_ENV = "VS_SSL_IN_NETNS"
WORKLOADS = ("steady200-blobs", "steady200", "steady1000", "idle", "backlog")


class SetupError(Exception):
    pass


# --- cgroups: one per role ------------------------------------------------------------------------


class Role:
    """A cgroup for one role. Processes spawned into it (and their children, daemons included) stay in it."""

    base: Path | None = None
    v2 = False

    @classmethod
    def init(cls) -> None:
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():
            cls.v2, root = True, Path("/sys/fs/cgroup")
        elif Path("/sys/fs/cgroup/cpuacct/cgroup.procs").exists():
            root = Path("/sys/fs/cgroup/cpuacct")
        else:
            raise SetupError("no cgroup v2 and no cgroup v1 cpuacct hierarchy under /sys/fs/cgroup")
        cls.base = root / f"vs-ssl-{os.getpid()}"
        try:
            cls.base.mkdir()
        except OSError as e:
            raise SetupError(f"cannot create cgroup {cls.base}: {e} (run as root)") from e
        on_exit(cls.remove_all)

    def __init__(self, name: str) -> None:
        assert self.base is not None
        self.name = name
        self.path = self.base / name
        self.path.mkdir(exist_ok=True)
        self.peak_rss = 0

    def usage(self) -> float:
        """CPU seconds used so far by every process that was ever in the cgroup."""
        if self.v2:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
            return 0.0
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def preexec(self):
        procs = str(self.path / "cgroup.procs")

        def fn() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return fn

    def rss(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def kill_all(self, timeout: float = 5) -> None:
        """SIGTERM every process in the cgroup (all started by us), SIGKILL what is left after timeout."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)

    @classmethod
    def remove_all(cls) -> None:
        if cls.base is None or not cls.base.exists():
            return
        for sub in cls.base.iterdir():
            if sub.is_dir():
                r = Role.__new__(Role)
                r.path = sub
                r.kill_all(3)
                with contextlib.suppress(OSError):
                    sub.rmdir()
        with contextlib.suppress(OSError):
            cls.base.rmdir()


class RssSampler:
    def __init__(self, roles: list[Role], every: float = 0.1) -> None:
        self.roles, self.every, self.running = roles, every, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            for r in self.roles:
                r.peak_rss = max(r.peak_rss, r.rss())
            time.sleep(self.every)

    def stop(self) -> None:
        self.running = False
        self.thread.join(2)


# --- helpers ------------------------------------------------------------------------------------


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return "(no log)"


def wait_port(port: int, what: str, proc_log: Path, timeout: float = 20, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if proc is not None and proc.poll() is not None:
            hint = (
                " (replica.l exits silently when its key file is missing or its pool is locked)"
                if what == "replica.l"
                else ""
            )
            raise SetupError(
                f"{what}{hint} (pid {proc.pid}, {' '.join(map(str, proc.args))}) exited with code "
                f"{proc.returncode} before listening on 127.0.0.1:{port}; log {proc_log}:\n"
                f"{tail(proc_log) or '(empty)'}"
            )
        time.sleep(0.1)
    raise SetupError(
        f"{what} is not listening on 127.0.0.1:{port} after {timeout} s; log {proc_log}:\n{tail(proc_log) or '(empty)'}"
    )


def md5s(prefix: Path) -> dict[str, str]:
    out = {}
    for p in sorted(prefix.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            h = hashlib.md5()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[p.name] = h.hexdigest()
    return out


def sizes(prefix: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in prefix.iterdir() if p.is_file() and not p.name.startswith(".")}


def blob_files(d: Path) -> dict[str, Path]:
    out = {}
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        for f in files:
            if not f.startswith("=") and not f.startswith("."):
                p = Path(root) / f
                if not p.is_symlink():
                    out[str(p.relative_to(d))] = p
    return out


def compare(app) -> dict:
    src, rpl = md5s(app.db_dir), md5s(app.root / "rpl/db/app")
    db_equal = src == rpl
    sb, rb = blob_files(app.blob_dir), blob_files(app.root / "rpl/blob/app")
    missing = [k for k in sb if k not in rb]
    differ = [k for k in sb if k in rb and sb[k].read_bytes() != rb[k].read_bytes()]
    extra = [k for k in rb if k not in sb]
    return {
        "db_equal": db_equal,
        "blobs": len(sb),
        "blob_missing": len(missing),
        "blob_differ": len(differ),
        "blob_extra": len(extra),
    }


def pending_markers(app) -> int:
    return sum(1 for n in os.listdir(app.blob_dir) if n.startswith("="))


def wait_equal(app, timeout: float, pending=lambda: False) -> float | None:
    """Poll until the replica's pool files have the source's md5 (the source is quiet); the time, or None."""
    src_sizes = sizes(app.db_dir)
    src = None
    deadline = time.monotonic() + timeout
    rpl_dir = app.root / "rpl/db/app"
    while time.monotonic() < deadline:
        j = app.journal.stat().st_size if app.journal.exists() else 0
        if j == 0 and not pending() and sizes(rpl_dir) == src_sizes:
            if src is None:
                src = md5s(app.db_dir)
            t = time.time()
            if md5s(rpl_dir) == src:
                return t
        time.sleep(0.02)
    return None


# --- the two systems ------------------------------------------------------------------------------


class SslChain:
    """bin/ssl -> httpGate -> @lib/replica.l for one app, every process in its role's cgroup."""

    def __init__(self, app, root: Path, roles: dict[str, Role], sec: int, pem: Path, key: Path) -> None:
        self.app, self.root, self.roles, self.sec, self.pem, self.key = app, root, roles, sec, pem, key
        self.logs = {n: root / f"{n}.log" for n in ("ssl", "httpGate", "replica.l")}

    def start_receiver(self) -> None:
        app = self.app
        rpl_db, rpl_blob = app.root / "rpl/db", app.root / "rpl/blob"
        rpl_db.mkdir(parents=True, exist_ok=True)
        rpl_blob.mkdir(parents=True, exist_ok=True)
        shutil.copytree(app.db_dir, rpl_db / "app")  # the replica starts as a byte copy
        shutil.copytree(app.blob_dir, rpl_blob / "app", symlinks=True)
        argv = [
            "picolisp",
            str(PIL_LIB / "lib.l"),
            "@lib/replica.l",
            str(REPLICA_PORT),
            str(self.key),
            "",
            "rpl/db/app/",
            "rpl/blob/app/",
            *DBS,
        ]
        self.replica = spawn(
            argv, cwd=app.root, log=self.logs["replica.l"], preexec_fn=self.roles["replica.l"].preexec()
        )
        wait_port(REPLICA_PORT, "replica.l", self.logs["replica.l"], proc=self.replica)
        self.gate = spawn(
            [str(GATE_BIN), str(GATE_PORT), str(GATE_DFLT), str(self.pem)],
            cwd=self.root,
            log=self.logs["httpGate"],
            preexec_fn=self.roles["httpGate"].preexec(),
        )
        wait_port(GATE_PORT, "httpGate", self.logs["httpGate"])

    def start_shipper(self) -> None:
        argv = [
            str(SSL_BIN),
            "127.0.0.1",
            f"-{GATE_PORT}",
            f"{REPLICA_PORT}/!replica",
            str(self.key),
            "fifo/app",
            "blob/app/",
            str(self.sec),
            "+",
        ]
        self.ssl = spawn(argv, cwd=self.app.root, log=self.logs["ssl"], preexec_fn=self.roles["ssl"].preexec())
        time.sleep(0.2)
        if self.ssl.poll() is not None:
            raise SetupError(
                f"ssl exited {self.ssl.returncode} at start; log {self.logs['ssl']}:\n{tail(self.logs['ssl'])}"
            )

    def check_alive(self) -> None:
        for name, proc in (("ssl", getattr(self, "ssl", None)), ("replica.l", self.replica)):
            if proc is not None and proc.poll() is not None:
                raise SetupError(f"{name} exited {proc.returncode}; log {self.logs[name]}:\n{tail(self.logs[name])}")
        if not self.roles["httpGate"].pids():
            raise SetupError(f"httpGate is gone; log {self.logs['httpGate']}:\n{tail(self.logs['httpGate'])}")

    def pending(self) -> bool:
        return pending_markers(self.app) > 0

    def stop_shipper(self) -> None:
        if getattr(self, "ssl", None) is not None:
            stop(self.ssl)
            self.roles["ssl"].kill_all()
            self.ssl = None

    def stop(self) -> None:
        for n in ("ssl", "httpGate", "replica.l"):
            self.roles[n].kill_all()


class Pipeline:
    def __init__(
        self, app, root: Path, roles: dict[str, Role], bs: str, database: str, codec: Codec, poll_interval: float
    ) -> None:
        self.app, self.root, self.roles, self.bs, self.db, self.codec = app, root, roles, bs, database, codec
        self.env = env_with(bs)
        self.poll = poll_interval
        self.logs = {"capture-agent": root / "agent.log", "replica": root / "replica.log"}
        self.agent = None

    def start_receiver(self) -> None:
        argv = [bin_path("replica"), "--database", self.db, "--target", "rpl/db/app/", "--blob", "rpl/blob/app/"]
        self.replica = spawn(
            argv, cwd=self.app.root, env=self.env, log=self.logs["replica"], preexec_fn=self.roles["replica"].preexec()
        )

    def start_shipper(self) -> None:
        argv = [
            bin_path("capture-agent"),
            "--pool",
            "db/app/",
            "--journal",
            "fifo/app",
            "--blob",
            "blob/app/",
            "--database",
            self.db,
            "--poll-interval",
            str(self.poll),
        ]
        self.agent = spawn(
            argv,
            cwd=self.app.root,
            env=self.env,
            log=self.logs["capture-agent"],
            preexec_fn=self.roles["capture-agent"].preexec(),
        )

    def stop_shipper(self) -> None:
        if self.agent is not None:
            stop(self.agent)
            self.roles["capture-agent"].kill_all()

    def check_alive(self) -> None:
        for name, proc in (("capture-agent", self.agent), ("replica", self.replica)):
            if proc is not None and proc.poll() is not None:
                raise SetupError(f"{name} exited {proc.returncode}; log {self.logs[name]}:\n{tail(self.logs[name])}")

    def pending(self) -> bool:
        from _common import capture_pending

        return bool(capture_pending(self.app))

    def wait_caught_up(self, timeout: float = 120) -> int:
        """Until the agent is idle and the replica is at the topic's last txn (the bootstrap snapshot)."""
        deadline = time.monotonic() + timeout
        pos_path = self.app.root / lagmod.POSITION
        while time.monotonic() < deadline:
            self.check_alive()
            last = last_commit(self.bs, self.db, self.codec, timeout_s=10) if not self.pending() else None
            try:
                pos = json.loads(pos_path.read_text())
            except (OSError, ValueError):
                pos = None
            if last is not None and pos is not None and pos["txn_id"] == last.position.txn_id:
                return pos["txn_id"]
            time.sleep(0.2)
        raise SetupError(
            f"pool-pipeline did not catch up within {timeout} s; agent log:\n"
            f"{tail(self.logs['capture-agent'])}\nreplica log:\n{tail(self.logs['replica'])}"
        )

    def stop(self) -> None:
        self.stop_shipper()
        stop(self.replica)
        self.roles["replica"].kill_all()


# --- ssl visibility sampler -----------------------------------------------------------------------


class SslSampler:
    """Every `every` s: (time, source journal size, newest mtime of the replica's pool files)."""

    def __init__(self, app, every: float = 0.001) -> None:
        self.jpath = str(app.journal)
        self.rfiles = [str(app.root / "rpl/db/app" / n) for n in ("@", "A", "B", "C", "D")]
        self.every, self.running = every, True
        self.samples: list[tuple[float, int, float]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            t = time.time()
            try:
                j = os.stat(self.jpath).st_size
                m = max(os.stat(p).st_mtime_ns for p in self.rfiles) / 1e9
            except OSError:
                time.sleep(self.every)
                continue
            self.samples.append((t, j, m))
            time.sleep(self.every)

    def stop(self) -> None:
        self.running = False
        self.thread.join(2)

    def transfers(self) -> list[tuple[float, float]]:
        """(cutoff, visible) per transfer: commits before cutoff became visible at `visible`."""
        s = self.samples
        drops = []  # (index of the first sample after the drop, cutoff)
        seg_start = 0
        for i in range(1, len(s)):
            before, after = s[i - 1][1], s[i][1]
            if after < before:
                if after == 0:
                    # nothing was appended after the lock: it came after the journal's last growth
                    k = i - 1
                    while k > seg_start and s[k - 1][1] == before:
                        k -= 1
                    cutoff = s[k][0]
                else:
                    limit = before - after  # the journal's size at ssl's lock
                    cutoff = s[i][0]
                    for k in range(i - 1, seg_start - 1, -1):
                        if s[k][1] <= limit:
                            cutoff = (s[k][0] + s[k + 1][0]) / 2
                            break
                drops.append((i, cutoff))
                seg_start = i
        # replica.l writes the pool only when it replays a transfer, after ssl has sent all of it: the
        # replay of transfer j ends before ssl locks the journal for transfer j+1 (ssl sleeps its
        # period in between), and the replay of j+1 starts after that lock. So transfer j became
        # visible at the newest pool-file mtime between its cutoff and the next one's. (The drop
        # itself can come later than the replay: ssl truncates under the journal lock, which it
        # may have to wait for while the app commits.)
        mtimes = sorted({m for _, _, m in s})
        cuts = [c for _, c in drops] + [float("inf")]
        out = []
        for n in range(len(drops)):
            lo, hi = bisect_right(mtimes, cuts[n]), bisect_right(mtimes, cuts[n + 1])
            visible = mtimes[hi - 1] if hi > lo else float("nan")
            out.append((cuts[n], visible))
        return out


def ssl_lags(commits: list[float], sampler: SslSampler) -> tuple[list[float], int]:
    tr = sampler.transfers()
    cut = [c for c, _ in tr]
    lags, unmatched = [], 0
    for c in commits:
        j = bisect_right(cut, c)  # first transfer whose cutoff > c
        if j >= len(tr):
            unmatched += 1
            continue
        if tr[j][1] != tr[j][1]:  # no replica write seen for that transfer
            unmatched += 1
            continue
        lags.append(tr[j][1] - c)
    return lags, unmatched


def pipeline_lags(
    commits: list[float], poller, bs: str, database: str, codec: Codec, start_txn: int
) -> tuple[list[float], int]:
    lagmod.DB = database  # topic_begins reads the module's database name
    begins = lagmod.topic_begins(bs, codec)
    seen = poller.seen
    txn_ids = sorted(t for t in begins if t > start_txn)
    src_ms = [begins[t] for t in txn_ids]
    seen_ids = sorted(t for t in seen if t > start_txn)
    lags, unmatched = [], 0
    for c in commits:
        j = bisect_right(src_ms, int(c * 1000) - 1)
        if j >= len(txn_ids):
            unmatched += 1
            continue
        k = bisect_right(seen_ids, txn_ids[j] - 1)
        if k >= len(seen_ids):
            unmatched += 1
            continue
        lags.append(seen[seen_ids[k]] / 1000 - c)
    return lags, unmatched


# --- one run --------------------------------------------------------------------------------------

SHIP = {"ssl": ["ssl"], "pool-pipeline": ["capture-agent"]}
RECV = {"ssl": ["httpGate", "replica.l"], "pool-pipeline": ["replica"]}


def run_one(
    system: str, workload: str, k: int, base: Path, root: Path, roles: dict[str, Role], args, bs: str, codec: Codec
) -> dict:
    from tests.picolisp_fixtures import PicoApp

    run_root = root / f"{k:02d}-{workload}-{system}"
    shutil.copytree(base, run_root / "app", symlinks=True)
    app = PicoApp(run_root / "app")
    if system == "ssl":
        sysobj = SslChain(app, run_root, roles, args.ssl_sec, root / "gate.pem", root / "key")
    else:
        sysobj = Pipeline(app, run_root, roles, bs, f"vs{k:02d}", codec, args.poll_interval)
    res = {"system": system, "workload": workload, "lags": [], "unmatched": 0, "commits": 0, "rate": float("nan")}
    start_txn = 0
    try:
        sysobj.start_receiver()
        sysobj.start_shipper()
        if system == "pool-pipeline":
            sysobj.wait_caught_up()  # the agent's bootstrap snapshot, not measured
        # One probe commit must reach the replica before anything is measured: a chain that runs but
        # does not replicate (TLS, httpGate, key) is a setup failure. Both systems get it.
        app.run("workload.l", 1, 99, 0, 0, 0)
        if wait_equal(app, 20 + 2 * args.ssl_sec, sysobj.pending) is None:
            sysobj.check_alive()
            raise SetupError(
                f"{system}: a probe commit did not reach the replica within {20 + 2 * args.ssl_sec} s;"
                + "".join(f"\nlog {lp}:\n{tail(lp) or '(empty)'}" for lp in sysobj.logs.values())
            )
        if system == "pool-pipeline":
            start_txn = sysobj.wait_caught_up()
        if workload == "backlog":
            sysobj.stop_shipper()  # the backlog builds up while the shipper is down
        watched = [roles[n] for n in SHIP[system] + RECV[system]] + [roles["kafka"]]
        for r in watched:
            r.peak_rss = 0
        cpu0 = {n: r.usage() for n, r in roles.items()}
        sampler = RssSampler(watched)
        t0 = time.time()
        vis = None
        if workload == "idle":
            time.sleep(args.idle)
            sysobj.check_alive()
            t_end = time.time()
        elif workload == "backlog":
            r = app.run(BENCH / "lisp/backlog.l", args.backlog, args.backlog_kib, timeout=600)
            jbytes = app.journal.stat().st_size
            res["journal_bytes"] = jbytes
            log(f"{system}: backlog of {mib(jbytes):.0f} MiB journal ({r.stdout.strip()}); starting the shipper")
            for n, rr in roles.items():
                cpu0[n] = rr.usage()
            for rr in watched:
                rr.peak_rss = 0
            t0 = time.time()
            sysobj.start_shipper()
            t_end = wait_equal(app, args.timeout, sysobj.pending)
            res["drain_s"] = (t_end - t0) if t_end else float("nan")
            t_end = t_end or time.time()
        else:
            rate = {"steady200-blobs": 200, "steady200": 200, "steady1000": 1000}[workload]
            blobs = workload.endswith("blobs")
            vis = SslSampler(app) if system == "ssl" else lagmod.PositionPoller(app)
            # the same seed for both systems: the same transaction mix
            wl = lagmod.PacedWorkload(app, int(rate * args.duration), rate, 20 + WORKLOADS.index(workload), blobs)
            wl.wait(timeout=args.duration * 5 + 60)
            t_end = wait_equal(app, args.timeout, sysobj.pending)
            vis.stop()
            if t_end is None:
                log(f"{system}/{workload}: the replica did not equal the source within {args.timeout} s")
            t_end = t_end or time.time()
            commits = wl.commit_times()
            res["commits"] = len(commits)
            res["rate"] = (len(commits) - 1) / (commits[-1] - commits[0]) if len(commits) > 1 else float("nan")
            if system == "ssl":
                res["lags"], res["unmatched"] = ssl_lags(commits, vis)
                if args.keep:  # the raw material of the ssl lag, for a look afterwards
                    (run_root / "ssl-lag.json").write_text(
                        json.dumps({"commits": commits, "transfers": vis.transfers(), "samples": vis.samples})
                    )
            else:
                res["lags"], res["unmatched"] = pipeline_lags(commits, vis, bs, sysobj.db, codec, start_txn)
        sampler.stop()
        wall = t_end - t0
        res["wall"] = wall
        res["cpu"] = {n: roles[n].usage() - cpu0[n] for n in SHIP[system] + RECV[system] + ["kafka"]}
        res["rss"] = {n: roles[n].peak_rss for n in SHIP[system] + RECV[system] + ["kafka"]}
        sysobj.check_alive()
        if system == "pool-pipeline":
            # The agent scans for deleted blobs once a second (not a pending marker): let one scan pass
            # before the blob comparison. Outside the measured window.
            time.sleep(1.5)
    finally:
        sysobj.stop()
    res["equal"] = compare(app)
    if not args.keep:
        shutil.rmtree(run_root, ignore_errors=True)
    return res


# --- report -------------------------------------------------------------------------------------


def ms(v: float) -> str:
    return "-" if v != v else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def report(results: list[dict], args, load: str) -> str:
    lines = [
        f"Machine load while running: {load}",
        "",
        "| workload | system | lag p50 ms | lag p99 ms | shipping CPU s (% core) | receiving CPU s (% core) "
        "| Kafka broker CPU s | peak RSS ship / recv MiB | MiB/s | replica equal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, w = r["system"], r["workload"]
        wall = r.get("wall", float("nan"))
        ship = sum(r["cpu"][n] for n in SHIP[s]) if "cpu" in r else float("nan")
        recv = sum(r["cpu"][n] for n in RECV[s]) if "cpu" in r else float("nan")
        ship_names, recv_names = "+".join(SHIP[s]), "+".join(RECV[s])
        kafka_cpu = r["cpu"]["kafka"] if "cpu" in r else float("nan")
        rs = sum(r["rss"][n] for n in SHIP[s]) if "rss" in r else 0
        rr = sum(r["rss"][n] for n in RECV[s]) if "rss" in r else 0
        lag = [v * 1000 for v in r["lags"]]
        p50, p99 = (percentile(lag, 50), percentile(lag, 99)) if lag else (float("nan"), float("nan"))
        rate = ""
        if w == "backlog":
            d = r.get("drain_s", float("nan"))
            rate = f"{mib(r.get('journal_bytes', 0)) / d:.1f} ({d:.1f} s)" if d == d else "did not drain"
        eq = r.get("equal", {})
        eqs = (
            (
                "md5 "
                + ("equal" if eq.get("db_equal") else "DIFFER")
                + f"; blobs {eq.get('blobs', 0) - eq.get('blob_missing', 0) - eq.get('blob_differ', 0)}"
                f"/{eq.get('blobs', 0)}" + (f" (+{eq['blob_extra']} deleted on source)" if eq.get("blob_extra") else "")
            )
            if eq
            else "-"
        )
        wl = w if w not in ("idle",) else f"idle {args.idle:.0f} s"
        if w.startswith("steady"):
            wl += f" ({r['commits']} commits at {r['rate']:.0f}/s" + (
                f", {r['unmatched']} unmatched)" if r["unmatched"] else ")"
            )
        lines.append(
            f"| {wl} | {s} | {ms(p50)} | {ms(p99)} | {ship:.2f} ({ship / wall:.0%}) {ship_names} | "
            f"{recv:.2f} ({recv / wall:.0%}) {recv_names} | "
            f"{kafka_cpu:.2f}{'' if s == 'pool-pipeline' else ' (idle broker)'} | "
            f"{mib(rs):.0f} / {mib(rr):.0f} | {rate or '-'} | {eqs} |"
        )
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------


def reexec_in_netns() -> int:
    if os.geteuid() != 0:
        raise SystemExit("vs_ssl.py needs root: unshare -n (private network namespace) and cgroups")
    if not shutil.which("unshare") or not shutil.which("ip"):
        raise SystemExit("vs_ssl.py needs unshare(1) and ip(8)")
    cmd = [
        "unshare",
        "-n",
        "sh",
        "-c",
        'ip link set lo up && exec "$@"',
        "sh",
        sys.executable,
        str(Path(__file__).resolve()),
        *sys.argv[1:],
    ]
    env = dict(os.environ, **{NETNS_ENV: "1"})
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()


def make_cert(root: Path) -> Path:
    key, crt, pem = root / "gate.key", root / "gate.crt", root / "gate.pem"
    r = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SetupError(f"openssl req failed: {r.stderr[-1000:]}")
    pem.write_bytes(key.read_bytes() + crt.read_bytes())
    return pem


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument(
        "--systems", default="ssl,pool-pipeline", help="comma list of the systems to run (ssl, pool-pipeline)"
    )
    ap.add_argument("--duration", type=float, default=10, help="seconds of each steady workload")
    ap.add_argument("--idle", type=float, default=10, help="seconds of the idle workload")
    ap.add_argument("--backlog", type=int, default=160, help="commits of the backlog workload")
    ap.add_argument("--backlog-kib", type=int, default=1024, help="KiB of +Swap text per backlog commit")
    ap.add_argument("--initial", type=int, default=2000, help="txns in the base pool both systems start from")
    ap.add_argument("--ssl-sec", type=int, default=1, help="ssl's poll period in whole seconds (its own unit)")
    ap.add_argument("--poll-interval", type=float, default=0.02, help="capture-agent --poll-interval")
    ap.add_argument("--timeout", type=float, default=180, help="seconds a replica may take to equal its source")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = ap.parse_args()
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w}")
    if os.environ.get(NETNS_ENV) != "1":
        return reexec_in_netns()

    try:
        return run(args, workloads)
    except SetupError as e:
        print(f"vs_ssl.py: setup failed: {e}", file=sys.stderr)
        return 2


def run(args, workloads: list[str]) -> int:
    for p in (SSL_BIN, GATE_BIN, PIL_LIB / "lib/replica.l"):
        if not p.exists():
            raise SetupError(f"{p} is missing (apt-get install picolisp)")
    if not shutil.which("openssl"):
        raise SetupError("the openssl CLI is missing")
    Role.init()
    roles = {n: Role(n) for n in ("ssl", "httpGate", "replica.l", "capture-agent", "replica", "kafka")}
    root = workdir("vs-ssl", keep=args.keep)
    log(f"workdir {root}; cgroups under {Role.base}")
    make_cert(root)
    (root / "key").write_text(f"vs-ssl-{os.getpid()}-{time.time_ns()}\n")
    load0 = os.getloadavg()
    results = []
    with kafka(root) as cluster:
        for pid in cluster.pids:
            roles["kafka"].add(pid)
        bs = cluster.bootstrap_servers
        codec = Codec(load_schemas())
        app = new_app(root / "base" / "app")
        app.workload(args.initial, seed=1, blobs=True)
        # The state both systems start from: the journal is empty, no blob waits to be shipped.
        app.journal.write_bytes(b"")
        for n in os.listdir(app.blob_dir):
            if n.startswith("="):
                os.unlink(app.blob_dir / n)
        shutil.rmtree(app.initial_dir, ignore_errors=True)
        k = 0
        for w in workloads:
            for system in args.systems.split(","):
                k += 1
                log(f"run {k}: {w} with {system}")
                res = run_one(system, w, k, app.root, root, roles, args, bs, codec)
                lag = [v * 1000 for v in res["lags"]]
                log(
                    f"run {k}: {w}/{system}: lag p50 {percentile(lag, 50):.1f} ms p99 {percentile(lag, 99):.1f} ms, "
                    f"cpu {json.dumps({n: round(v, 2) for n, v in res['cpu'].items()})}, equal {res['equal']}"
                )
                results.append(res)
    load1 = os.getloadavg()
    load = (
        f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end ({os.cpu_count()} cores, shared "
        "with other users' jobs)"
    )
    print(report(results, args, load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
