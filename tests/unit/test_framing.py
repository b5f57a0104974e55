"""The one transaction framer (pipeline/framing.py), the group readers' topic regex and offset metadata."""

from __future__ import annotations

import re

import pytest

from connectors.kafka.reader import offset_metadata, read_offset_metadata, topic_regex
from pipeline.codec import Codec, StreamRecord
from pipeline.errors import PipelineError
from pipeline.framing import TXN_KEY, TxnFramer
from pipeline.model import BlockWrite, FileLayout, Transaction
from schemas import load_schemas

CODEC = Codec(load_schemas())


def records(*txn_ids: int, database: str = "app", snapshot: bool = False) -> list[StreamRecord]:
    pairs = [
        kv
        for t in txn_ids
        for kv in CODEC.transaction_records(
            Transaction(
                database,
                t,
                0,
                1_700_000_000_000 + t,
                checksum_after=t,
                snapshot=snapshot,
                files=[FileLayout(0, 64, 4)],
                change_count=2,
                changes=[BlockWrite(0, 1, bytes(64)), BlockWrite(1, 0, bytes(64))],
            )
        )
    ]
    return [StreamRecord("pool.app", 0, 10 + i, k, v) for i, (k, v) in enumerate(pairs)]


def frame(recs: list[StreamRecord], database: str = "app") -> list[tuple[int, int, int, int]]:
    """(txn id, first offset, commit offset, change records) per framed transaction."""
    framer, done = TxnFramer(database), []
    for rec in recs:
        name, value = CODEC.decode(rec.value)
        if rec.key == TXN_KEY and framer.open is None:
            framer.begin(value, rec)
            continue
        framer.record(name, value["database"], value["txn_id"], rec)
        if name.endswith("SnapshotMarker"):
            framer.marker(value["phase"], rec)
        elif name.endswith("TxnCommit"):
            f = framer.commit(value, rec)
            done.append((f.txn_id, f.offset, rec.offset, f.records))
    framer.end()
    return done


def test_good_framing_of_consecutive_and_snapshot_transactions() -> None:
    assert frame(records(1, 2)) == [(1, 10, 13, 2), (2, 14, 17, 2)]  # begin, two batches, commit
    assert frame(records(5, snapshot=True)) == [(5, 10, 15, 2)]  # markers are not change records


def test_commit_with_a_wrong_count() -> None:
    recs = records(1)
    with pytest.raises(PipelineError, match="transaction has 1 change records, commit says 2") as exc:
        frame(recs[:1] + recs[2:])
    assert (exc.value.database, exc.value.txn_id, exc.value.topic, exc.value.offset) == ("app", 1, "pool.app", 13)


def test_begin_inside_a_transaction() -> None:
    recs = records(1, 2)
    with pytest.raises(PipelineError, match="TxnBegin inside an open transaction") as exc:
        frame(recs[:2] + recs[4:])  # txn 1 lost its commit and a batch
    assert (exc.value.txn_id, exc.value.offset) == (1, 14)
    framer = TxnFramer("app")
    name, value = CODEC.decode(recs[0].value)
    framer.begin(value, recs[0])
    with pytest.raises(PipelineError, match="TxnBegin inside an open transaction"):
        framer.begin(value, recs[0])


def test_record_outside_a_transaction() -> None:
    with pytest.raises(PipelineError, match="BlockBatch record outside a transaction") as exc:
        frame(records(1)[1:])
    assert (exc.value.database, exc.value.txn_id, exc.value.topic, exc.value.offset) == ("app", 1, "pool.app", 11)


def test_foreign_database() -> None:
    with pytest.raises(PipelineError, match="record of foreign database 'other' in the stream of 'app'") as exc:
        frame(records(1, database="other"))
    assert (exc.value.txn_id, exc.value.topic, exc.value.offset) == (1, "pool.app", 10)
    recs = records(1)
    framer = TxnFramer("app")
    framer.begin(CODEC.decode(recs[0].value)[1], recs[0])
    with pytest.raises(PipelineError, match="foreign database 'other'"):
        framer.record("pool.pipeline.BlockBatch", "other", 1, recs[1])


def test_stream_ending_inside_a_transaction_is_retriable() -> None:
    with pytest.raises(PipelineError, match="stream ended inside a transaction") as exc:
        frame(records(1)[:-1])
    assert exc.value.retriable and exc.value.offset == 10


def test_topic_regex_escapes_the_prefix_dot_and_never_matches_stats_topics() -> None:
    regex = re.compile(topic_regex(".*"))
    assert regex.match("pool.x") and regex.match("pool.app-2")
    assert not regex.match("poolXx")
    assert not regex.match("pool.x.stats")
    assert re.compile(topic_regex("app.*")).match("pool.app1") and not re.compile(topic_regex("app.*")).match("pool.b")


def test_offset_metadata_round_trip_and_what_is_already_stored() -> None:
    assert read_offset_metadata(offset_metadata(7, 1_700_000_000_000)) == (7, 1_700_000_000_000)
    assert read_offset_metadata(offset_metadata(7, None)) == (7, None)
    assert read_offset_metadata('{"txn": 3, "source_time_ms": 0}') == (3, 0)  # as Checkpoint.metadata() wrote it
    assert read_offset_metadata("") == read_offset_metadata(None) == read_offset_metadata("garbage") == (None, None)
    assert read_offset_metadata("5") == (None, None)
