"""The capture agent's wake-up: inotify on the journal and the blob directory (no polling while idle)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from connectors.picolisp.watch import ChangeWatch


def _later(seconds: float, fn) -> threading.Thread:  # type: ignore[no-untyped-def]
    t = threading.Thread(target=lambda: (time.sleep(seconds), fn()))
    t.start()
    return t


def test_a_journal_write_or_a_blob_marker_wakes_the_wait_and_silence_times_out(tmp_path: Path) -> None:
    journal = tmp_path / "fifo" / "app"
    journal.parent.mkdir()
    journal.write_bytes(b"")
    blob = tmp_path / "blob"
    blob.mkdir()
    watch = ChangeWatch(journal, blob)
    assert watch.active
    started = time.monotonic()
    assert watch.wait(0.3) is False and time.monotonic() - started >= 0.29  # nothing happened

    def append() -> None:
        with journal.open("ab") as f:
            f.write(b"x" * 10)

    t = _later(0.1, append)
    started = time.monotonic()
    assert watch.wait(5) is True and time.monotonic() - started < 2
    t.join()
    watch.wait(0.1)  # the close after the append

    t = _later(0.1, lambda: os.symlink("A/1.doc", blob / "=A1.doc"))
    assert watch.wait(5) is True
    t.join()

    # The agent's own state files beside the journal do not wake it.
    t = _later(0.05, lambda: (tmp_path / "fifo" / "app.agent").mkdir())
    assert watch.wait(0.3) is False
    t.join()
    watch.close()


def test_without_a_journal_directory_it_degrades_to_timed_rounds(tmp_path: Path) -> None:
    watch = ChangeWatch(tmp_path / "missing" / "app", None)
    assert not watch.active
    started = time.monotonic()
    assert watch.wait(0.1) is False and time.monotonic() - started >= 0.09
