"""--max-delay and a clean stop, against a directory store: segments close on time at whole txns, exactly once."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.s3.archiver import Archiver
from connectors.s3.restore import restore
from pipeline.archive import Rotation, SnapshotPolicy
from pipeline.codec import StreamRecord
from pool_pipeline.cli.common import GracefulStop
from tests.dir_store import DirStore
from tests.unit.test_archiver_dir_store import CODEC, DB, TOPIC, archived_txn_ids, records_of
from tests.unit.test_replica_crash_points import make_stream

DELAY = 0.05


def archiver(store: DirStore, work: Path, max_delay: float | None = DELAY) -> Archiver:
    return Archiver(
        store,
        CODEC,
        rotation=Rotation(),  # 10 000 txns, 64 MiB, an hour of source time: never reached here
        snapshots=SnapshotPolicy(0, 0),
        work_dir=work,
        topic=TOPIC,
        log=lambda line: None,
        max_delay=max_delay,
    )


def txn_bounds(records: list[StreamRecord]) -> list[int]:
    """The index after each txn's commit record."""
    bounds, inside = [], False
    for i, r in enumerate(records):
        if r.key == b"txn":
            inside = not inside
            if not inside:
                bounds.append(i + 1)
    return bounds


def segments(store: DirStore) -> list[tuple[int, int]]:
    return [(s.first_txn, s.last_txn) for s in store.catalog().segments]


def test_a_quiet_stream_is_archived_within_max_delay_and_a_txn_being_read_is_left_open(tmp_path: Path) -> None:
    txns = make_stream(6, seed=7, database=DB)
    records = records_of(txns)
    ends = txn_bounds(records)
    mid3 = ends[1] + 2  # inside txn 3 (its begin and a change record)
    assert mid3 < ends[2]
    store = DirStore(tmp_path / "store", DB)
    seen: list[list[tuple[int, int]]] = []

    def feed() -> Iterator[StreamRecord | None]:
        yield from records[: ends[1]]  # txns 1-2, then quiet
        yield None  # too early: nothing closes
        seen.append(segments(store))
        time.sleep(DELAY * 2)
        yield None
        deadline = time.monotonic() + 5
        while not store.catalog().segments and time.monotonic() < deadline:  # the upload thread
            yield None
        seen.append(segments(store))
        yield from records[ends[1] : mid3]  # txn 3 starts, then quiet again
        time.sleep(DELAY * 2)
        yield None
        yield from records[mid3 : ends[3]]  # the rest of txn 3, and txn 4: closed max-delay after txn 3
        deadline = time.monotonic() + 5
        while len(store.catalog().segments) < 2 and time.monotonic() < deadline:
            yield None
        seen.append(segments(store))
        yield from records[ends[3] :]  # the tail: --once end

    a = archiver(store, tmp_path / "work")
    try:
        a.resume()
        a.run(feed())
    finally:
        a.close()
    assert seen == [[], [(1, 2)], [(1, 2), (3, 4)]]
    assert segments(store) == [(1, 2), (3, 4), (5, 6)]
    assert archived_txn_ids(store) == list(range(1, 7))
    position = restore(store, CODEC, tmp_path / "restored", topic=TOPIC)
    assert position.txn_id == 6

    # The segment cut mid-txn holds the same bytes as one written from its first record.
    clean = DirStore(tmp_path / "clean", DB)
    b = archiver(clean, tmp_path / "clean-work", max_delay=None)
    try:
        b.run(records[ends[1] : ends[3]])
    finally:
        b.close()
    assert {k: v for k, v in store.objects().items() if "_txn000000000003-" in k} == clean.objects()


def test_a_stop_flushes_whole_txns_leaves_the_open_one_for_the_next_run_and_nothing_twice(tmp_path: Path) -> None:
    txns = make_stream(6, seed=8, database=DB)
    records = records_of(txns)
    ends = txn_bounds(records)
    store = DirStore(tmp_path / "store", DB)
    stop = threading.Event()

    def feed() -> Iterator[StreamRecord | None]:
        yield from records[: ends[2] + 2]  # txns 1-3 and the start of txn 4
        stop.set()  # SIGTERM
        yield None
        raise AssertionError("read on after the stop")

    a = archiver(store, tmp_path / "work", max_delay=3600.0)
    try:
        a.resume()
        a.run(feed(), stop)
    finally:
        a.close()
    assert segments(store) == [(1, 3)]  # uploaded before run() returned
    assert a.position is not None and a.position.txn_id == 3

    b = archiver(store, tmp_path / "work", max_delay=3600.0)
    try:
        offset = b.resume()
        assert offset == ends[2]
        b.run(records[offset:])
    finally:
        b.close()
    assert segments(store) == [(1, 3), (4, 6)]
    assert archived_txn_ids(store) == list(range(1, 7))
    assert restore(store, CODEC, tmp_path / "restored", topic=TOPIC).txn_id == 6


def test_the_first_signal_while_flushing_only_asks_to_stop_a_second_one_interrupts() -> None:
    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stop = GracefulStop().install()
        stop.flushing = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.event.is_set() and stop.signals == 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        idle = GracefulStop().install()  # not flushing (starting, waiting for the topic): stops at once
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
        assert idle.signals == 1
    finally:
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGINT, saved[1])
