"""Pytest fixtures and helpers that build real, journaled PicoLisp pools (tests/lisp/*.l) for integration tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from connectors.picolisp.format import block_size_of, pool_files
from connectors.picolisp.journal import JournalEntry, parse_journal

__all__ = [
    "APP_DBS",
    "APP_BLOCK_SIZES",
    "LISP_DIR",
    "PicoApp",
    "copy_pool",
    "find_pil",
    "pil_app",
    "picolisp",
    "replay_journal",
]

LISP_DIR = Path(__file__).resolve().parent / "lisp"
# Must match (dbs ...) in tests/lisp/app.l: files @ A B C D.
APP_DBS = (1, 2, 4, 6, 0)
APP_BLOCK_SIZES = tuple(64 << s for s in APP_DBS)  # 128, 256, 1024, 4096, 64


def find_pil() -> str | None:
    return shutil.which("pil") or (os.path.exists("/usr/bin/pil") and "/usr/bin/pil") or None


@pytest.fixture(scope="session")
def picolisp() -> str:
    """Path of `pil`; skips the test where PicoLisp is missing, but fails it in CI (CI=true)."""
    pil = find_pil()
    if pil is None:
        message = "PicoLisp (pil) is not installed; apt-get install picolisp"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return pil


class PicoApp:
    """A PicoLisp app directory laid out like a production one: db/app/ (pool), fifo/app (journal), blob/app/.

    `create()` makes the empty pool (and journal) and keeps a byte copy of it in `initial/`:
    that is the state the journal's very first entry applies to. All Lisp runs with cwd = root.
    """

    def __init__(self, root: Path, pil: str = "pil") -> None:
        self.root = Path(root)
        self.pil = pil
        self.db_dir = self.root / "db" / "app"
        self.prefix = f"{self.db_dir}/"
        self.journal = self.root / "fifo" / "app"
        self.blob_dir = self.root / "blob" / "app"
        self.blob_prefix = f"{self.blob_dir}/"  # *Blob wants the trailing slash
        self.initial_dir = self.root / "initial"
        self.initial_prefix = f"{self.initial_dir}/"
        for d in (self.db_dir, self.journal.parent, self.blob_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._scripts = 0

    # --- running Lisp -------------------------------------------------------------------------
    def _script_path(self, script: str | Path) -> Path:
        if isinstance(script, Path):
            return script
        if "\n" not in script and "(" not in script:
            path = LISP_DIR / script
            if path.exists():
                return path
            raise FileNotFoundError(f"no Lisp script {script!r} in {LISP_DIR}")
        # Inline program text: write it to a file next to the app (pil loads files, not strings).
        self._scripts += 1
        path = self.root / f"script-{self._scripts}.l"
        path.write_text(script)
        return path

    def command(self, script: str | Path, *args: object) -> list[str]:
        # app.l first (classes, *Dbs, openApp), then the script, which must consume its args with (opt).
        return [self.pil, str(LISP_DIR / "app.l"), str(self._script_path(script)), *map(str, args), "-bye"]

    def run(
        self, script: str | Path, *args: object, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run a program (a file name in tests/lisp/, a Path, or inline Lisp text) with app.l loaded.

        Inline text can open the app's pool with `(openApp "db/app/" "fifo/app" "blob/app/")`.
        """
        proc = subprocess.run(
            self.command(script, *args),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"pil {script if len(str(script)) < 80 else '<inline>'} exited {proc.returncode}\n"
                f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
            )
        return proc

    # --- pool life cycle ----------------------------------------------------------------------
    def create(self) -> None:
        """Create the empty pool with its journal (no commit), and keep a copy of it in initial/."""
        self.run("create.l", self.relative(self.prefix), self.relative(self.journal))
        if not self.initial_dir.exists():
            copy_pool(self.prefix, self.initial_dir)

    def create_empty(self, prefix: str | Path) -> str:
        """A fresh empty pool with the app's *Dbs at `prefix` (a directory), without a journal (§1.8)."""
        prefix = f"{Path(prefix)}/"
        Path(prefix).mkdir(parents=True, exist_ok=True)
        self.run("create.l", prefix, "")
        return prefix

    def relative(self, path: str | Path) -> str:
        text = os.fspath(path)
        rel = os.path.relpath(text, self.root)
        return rel + "/" if text.endswith("/") else rel

    def files(self) -> list[Path]:
        return pool_files(self.prefix)

    def block_sizes(self) -> list[int]:
        return [block_size_of(p) for p in self.files()]

    # --- workloads ----------------------------------------------------------------------------
    def _workload_args(self, txns: int, seed: int, blobs: bool, sleep_ms: int, check: bool) -> list[object]:
        return [int(txns), int(seed), int(bool(blobs)), int(sleep_ms), int(bool(check))]

    def workload(
        self, txns: int, seed: int, blobs: bool = True, sleep_ms: int = 0, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """Commit `txns` deterministic transactions (one pil process); checks that each grew the journal.

        The check needs an unconsumed journal; use workload_proc() while consuming concurrently.
        """
        if not self.files():
            self.create()
        return self.run("workload.l", *self._workload_args(txns, seed, blobs, sleep_ms, True), timeout=timeout)

    def workload_proc(self, txns: int, seed: int, blobs: bool = True, sleep_ms: int = 0) -> subprocess.Popen:
        """The same workload in the background (no journal-growth check); wait() on it and check returncode."""
        if not self.files():
            self.create()
        return subprocess.Popen(
            self.command("workload.l", *self._workload_args(txns, seed, blobs, sleep_ms, False)),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def query(self, prefix: str | Path | None = None, blob_dir: str | Path | None = None) -> str:
        """Deterministic text dump of a pool (default: the app's own); with blob_dir, blob sizes/first bytes too.

        Only reads: the pool is opened without a journal and nothing is committed. The pool must
        already have all of the app's files (PicoLisp would create missing ones).
        """
        prefix = self.prefix if prefix is None else os.fspath(prefix)
        if not prefix.endswith("/") and os.path.isdir(prefix):
            prefix += "/"
        found = len(pool_files(prefix))
        if found != len(APP_DBS):
            raise AssertionError(f"query: {prefix} has {found} pool files, the app has {len(APP_DBS)}")
        blob = "" if blob_dir is None else f"{Path(blob_dir)}/"
        return self.run("query.l", os.path.abspath(prefix) + "/", os.path.abspath(blob) + "/" if blob else "").stdout


def copy_pool(prefix: str | Path, dest_dir: str | Path) -> str:
    """Byte copy of a pool's files into dest_dir (created); returns the new prefix 'dest_dir/'."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for path in pool_files(prefix):
        shutil.copyfile(path, dest / path.name)
    return f"{dest}/"


def replay_journal(prefix: str | Path, data: bytes, block_sizes: Sequence[int] | None = None) -> list[JournalEntry]:
    """Apply journal bytes to a pool like PicoLisp's `journal`: pwrite each payload at address << shift."""
    files = pool_files(prefix)
    sizes = list(block_sizes) if block_sizes is not None else [block_size_of(p) for p in files]
    entries = parse_journal(data, sizes)
    fds = [os.open(p, os.O_RDWR) for p in files]
    try:
        for e in entries:
            os.pwrite(fds[e.file], e.payload, e.position(sizes[e.file]))  # pwrite past EOF extends the file
    finally:
        for fd in fds:
            os.close(fd)
    return entries


@pytest.fixture
def pil_app(tmp_path: Path, picolisp: str) -> PicoApp:
    """A PicoApp in tmp_path/app with its empty pool created and copied to initial/."""
    app = PicoApp(tmp_path / "app", picolisp)
    app.create()
    return app
