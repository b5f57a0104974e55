"""Codec: single-object encoding, schema evolution, and transaction framing errors."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import fastavro
import pytest

from pipeline.codec import BATCH_BYTES, BEGIN, BLOCK, BLOCK_BATCH, COMMIT, Codec, StreamRecord
from pipeline.errors import PipelineError
from pipeline.model import BlobChunk, BlobDelete, BlockWrite, FileLayout, Transaction
from schemas import SCHEMA_DIR, load_schemas

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec(load_schemas())


def txn(txn_id: int = 1, changes: list | None = None, **kw) -> Transaction:
    changes = changes if changes is not None else [BlockWrite(0, 1, bytes(range(64)))]
    return Transaction(
        database=kw.pop("database", "app"),
        txn_id=txn_id,
        checksum_before=kw.pop("before", 0),
        checksum_after=kw.pop("after", 0xFFFFFFFFFFFFFFFF),
        source_time_ms=1_700_000_000_000,
        files=[FileLayout(0, 64, 4)],
        change_count=len(changes),
        changes=changes,
        **kw,
    )


def stream(codec: Codec, *txns: Transaction, topic: str = "pool.app") -> list[StreamRecord]:
    pairs = [kv for t in txns for kv in codec.transaction_records(t)]
    return [StreamRecord(topic, 0, i, k, v) for i, (k, v) in enumerate(pairs)]


def read_all(codec: Codec, records: list[StreamRecord], database: str = "app") -> list[tuple[Transaction, list]]:
    return [(t, list(t.changes)) for t in codec.read_transactions(records, database)]


def test_single_object_header_is_marker_plus_crc64_fingerprint(codec: Codec) -> None:
    value = codec.encode(
        BLOCK, {"database": "app", "txn_id": 1, "file": 0, "block_index": 0, "block_size": 1, "data": b"x"}
    )
    schema = json.loads((SCHEMA_DIR / "block_write.v1.avsc").read_text())
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    assert value[:2] == b"\xc3\x01"
    assert value[2:10] == bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


def test_round_trip_keeps_every_change_and_unsigned_checksums(codec: Codec) -> None:
    changes = [
        BlockWrite(0, 3, b"\x01" * 64),
        BlobChunk("A/1/234.doc", 5, "ab" * 32, 0, 1, b"hello"),
        BlobDelete("B/7.txt"),
    ]
    t = txn(7, changes, before=2**63 + 5, after=12345, snapshot=True)
    [(got, got_changes)] = read_all(codec, stream(codec, t))
    assert (got.txn_id, got.checksum_before, got.checksum_after, got.snapshot) == (7, 2**63 + 5, 12345, True)
    assert got_changes == changes
    assert got.files == [FileLayout(0, 64, 4)]
    assert got.offset == 0


def test_unread_changes_are_drained_before_next_transaction(codec: Codec) -> None:
    records = stream(codec, txn(1), txn(2), txn(3))
    ids = [t.txn_id for t in codec.read_transactions(records, "app")]  # never touches .changes
    assert ids == [1, 2, 3]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r[:1] + r[2:], "transaction has 0 change records, commit says 1"),  # lost block record
        (lambda r: r[1:], "outside a transaction"),  # begin lost
        (lambda r: r[:-1], "stream ended inside a transaction"),  # commit lost
        (lambda r: r[:2] + r[:1] + r[2:], "TxnBegin inside an open transaction"),
    ],
)
def test_broken_framing_is_reported_with_offset(codec: Codec, mutate, message: str) -> None:
    records = mutate(stream(codec, txn(1)))
    with pytest.raises(PipelineError, match=message) as exc:
        read_all(codec, records)
    assert exc.value.database == "app"


def test_foreign_database_names_topic_and_offset(codec: Codec) -> None:
    records = stream(codec, txn(1, database="other"))
    with pytest.raises(PipelineError, match="foreign database 'other'") as exc:
        read_all(codec, records)
    assert "topic=pool.app offset=0" in str(exc.value)


def test_garbage_and_unknown_fingerprint_are_clear_errors(codec: Codec) -> None:
    with pytest.raises(PipelineError, match=r"not an Avro single-object record.*topic=t offset=9"):
        codec.decode(b"hello world", topic="t", offset=9)
    with pytest.raises(PipelineError, match="unknown writer schema fingerprint"):
        codec.decode(b"\xc3\x01" + b"\x00" * 8 + b"\x02", topic="t", offset=1)
    good = codec.encode(
        BEGIN, {"database": "app", "txn_id": 1, "checksum_before": 0, "source_time_ms": 0, "snapshot": False}
    )
    with pytest.raises(PipelineError, match="cannot decode|trailing bytes"):
        codec.decode(good[:-3], topic="t", offset=2)
    with pytest.raises(PipelineError, match="trailing bytes"):
        codec.decode(good + b"\x00", topic="t", offset=3)
    with pytest.raises(PipelineError, match=r"missing C3 01 marker.*offset=4"):
        codec.decode(b"\xc3\x02" + good[2:], topic="t", offset=4)  # a known fingerprint does not excuse a bad marker
    with pytest.raises(PipelineError, match=r"missing C3 01 marker.*offset=5"):
        codec.decode(None, topic="t", offset=5)


def test_records_in_any_bytes_like_buffer_decode_alike(codec: Codec) -> None:
    value = codec.encode(
        BEGIN, {"database": "app", "txn_id": 7, "checksum_before": -1, "source_time_ms": 5, "snapshot": True}
    )
    decoded = codec.decode(value)
    assert decoded[1]["txn_id"] == 7
    assert codec.decode(memoryview(value)) == codec.decode(bytearray(value)) == decoded
    assert codec.peek(memoryview(value)) == codec.peek(value) == (BEGIN, "app", 7)


def test_decoding_equals_fastavros_public_reader_for_every_record_type(codec: Codec) -> None:
    """Codec.decode calls fastavro's compiled read_record directly; it must read what schemaless_reader reads."""
    t = txn(
        9,
        [
            BlockWrite(0, 1, bytes(64)),
            BlockWrite(0, 2, bytes(64)),
            BlobChunk("A/1.doc", 5, "ab" * 32, 0, 1, b"hello"),
            BlobDelete("B/2.txt"),
        ],
        snapshot=True,
    )
    values = [v for _, v in codec.transaction_records(t)]
    assert len(values) == 7  # begin, snapshot start, batch, chunk, delete, snapshot end, commit
    for value in values:
        name, writer, *_ = codec._readers[value[2:10]]
        buf = io.BytesIO(value)
        buf.seek(10)
        assert codec.decode(value) == (name, fastavro.schemaless_reader(buf, writer, None))
    with pytest.raises(PipelineError, match=r"cannot decode pool.pipeline.TxnCommit body.*offset=3"):
        codec.decode(values[-1][:-3], topic="pool.app", offset=3)


def test_block_size_field_must_match_data(codec: Codec) -> None:
    records = stream(codec, txn(1))
    bad = codec.encode(
        BLOCK, {"database": "app", "txn_id": 1, "file": 0, "block_index": 1, "block_size": 128, "data": b"x" * 64}
    )
    records[1] = StreamRecord("pool.app", 0, 1, b"k", bad)
    with pytest.raises(PipelineError, match="says 128 bytes but carries 64"):
        read_all(codec, records)


def test_block_writes_travel_in_batches_per_file_and_come_back_one_by_one(codec: Codec) -> None:
    per_batch = BATCH_BYTES // 4096
    changes = (
        [BlockWrite(0, i, bytes([i % 251]) * 64) for i in range(3)]
        + [BlockWrite(1, i, bytes([i % 251]) * 4096) for i in range(per_batch + 2)]
        + [BlobDelete("x/y")]
        + [BlockWrite(1, 900, b"\x07" * 4096)]
    )
    t = txn(5, changes)
    t.files = [FileLayout(0, 64, 4), FileLayout(1, 4096, 1000)]
    records = stream(codec, t)
    names = [codec.decode(r.value)[0] for r in records]
    # file 0's 3 blocks, file 1 split at BATCH_BYTES, the delete, then file 1's last block
    assert names == [BEGIN, BLOCK_BATCH, BLOCK_BATCH, BLOCK_BATCH, "pool.pipeline.BlobDelete", BLOCK_BATCH, COMMIT]
    assert codec.decode(records[-1].value)[1]["record_count"] == 5
    assert [len(codec.decode(r.value)[1]["block_indexes"]) for r in records[1:4]] == [3, per_batch, 2]
    assert max(len(r.value) for r in records) < BATCH_BYTES + 1024
    [(got, got_changes)] = read_all(codec, records)
    assert got_changes == changes
    assert got.change_count == len(changes)


def test_old_one_block_records_are_still_read(codec: Codec) -> None:
    """Topics written before BlockBatch hold one BlockWrite record per block."""
    head = {"database": "app", "txn_id": 1}
    records = stream(codec, txn(1, [BlockWrite(0, 1, b"\x01" * 64)]))
    records[1] = StreamRecord(
        "pool.app",
        0,
        1,
        b"b/0/1",
        codec.encode(BLOCK, {**head, "file": 0, "block_index": 1, "block_size": 64, "data": b"\x02" * 64}),
    )
    [(_, got)] = read_all(codec, records)
    assert got == [BlockWrite(0, 1, b"\x02" * 64)]


@pytest.mark.parametrize(
    "indexes, data, message",
    [
        ([1, 2], b"x" * 64, "says 2 blocks of 64 bytes but carries 64"),
        ([], b"", "says 0 blocks"),
    ],
)
def test_a_batch_whose_data_does_not_fit_its_indexes_is_refused(codec: Codec, indexes, data, message) -> None:
    records = stream(codec, txn(1))
    bad = codec.encode(
        BLOCK_BATCH,
        {"database": "app", "txn_id": 1, "file": 0, "block_size": 64, "block_indexes": indexes, "data": data},
    )
    records[1] = StreamRecord("pool.app", 0, 1, b"k", bad)
    with pytest.raises(PipelineError, match=message) as exc:
        read_all(codec, records)
    assert (exc.value.txn_id, exc.value.offset) == (1, 1)


def _committed_schema_versions() -> list[tuple[str, str, dict]]:
    """Every .avsc ever committed under schemas/, from git history (commit, path, schema)."""
    try:
        log = subprocess.run(
            ["git", "-C", str(ROOT), "log", "--format=%H", "--", "schemas"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return []
    found = []
    for commit in log:
        names = subprocess.run(
            ["git", "-C", str(ROOT), "ls-tree", "--name-only", commit, "schemas/"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        for path in names:
            if path.endswith(".avsc"):
                text = subprocess.run(
                    ["git", "-C", str(ROOT), "show", f"{commit}:{path}"], capture_output=True, text=True, check=True
                ).stdout
                found.append((commit, path, json.loads(text)))
    return found


def test_every_committed_schema_version_is_still_shipped_unchanged_and_readable(codec: Codec) -> None:
    shipped = {p.name: json.loads(p.read_text()) for p in SCHEMA_DIR.glob("*.avsc")}
    history = _committed_schema_versions()
    for commit, path, schema in history:
        name = Path(path).name
        assert name in shipped, f"{path} (committed in {commit[:8]}) was removed: old records could not be read"
        assert shipped[name] == schema, f"{path} was edited after commit {commit[:8]}: add a new version instead"
    # Any record written with any version decodes with the current reader schema.
    for name, schema in shipped.items():
        parsed = fastavro.parse_schema(schema)
        sample = _sample(parsed)
        import io

        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, sample)
        canonical = fastavro.schema.to_parsing_canonical_form(schema)
        value = b"\xc3\x01" + bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO")) + buf.getvalue()
        rec_name, record = codec.decode(value, topic="t", offset=0)
        assert rec_name == parsed["name"]
        for field in schema["fields"]:
            assert field["name"] in record, f"{name}: field {field['name']} lost on read"


def _sample(schema: dict | str | list):
    """A minimal valid record for a parsed schema."""
    if isinstance(schema, list):
        return _sample(schema[0])
    if isinstance(schema, str):
        return {"string": "x", "long": 1, "int": 1, "boolean": True, "bytes": b"x", "null": None}[schema]
    kind = schema["type"]
    if kind == "record":
        return {f["name"]: _sample(f["type"]) for f in schema["fields"]}
    if kind == "array":
        return [_sample(schema["items"])]
    if kind == "enum":
        return schema["symbols"][0]
    return _sample(kind)
