"""Avro single-object encoding of change records, and (re)assembly of transactions from a record stream."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import fastavro

try:  # fastavro's compiled record reader: schemaless_reader re-parses the schema on every call, a fifth of decoding
    from fastavro._read import CYTHON_MODULE as _COMPILED  # type: ignore[attr-defined]  # private: not in _read.pyi
    from fastavro._read import read_record as _read_record  # type: ignore[attr-defined]  # private: not in _read.pyi
except ImportError:  # the pure-Python build takes a decoder, not a file: use the public API
    _COMPILED, _read_record = 0, None

from pipeline.crypto import KeyMismatch, Keyring, is_sealed_record, record_key_id
from pipeline.errors import PipelineError
from pipeline.framing import BEGIN, COMMIT, SNAPSHOT, TXN_KEY, Record, TxnFramer
from pipeline.model import (
    BlobChunk,
    BlobDelete,
    BlockBatch,
    BlockWrite,
    Change,
    FileLayout,
    Transaction,
)

MAGIC = b"\xc3\x01"
BLOCK = "pool.pipeline.BlockWrite"  # one block per record: still read, no longer written
BLOCK_BATCH = "pool.pipeline.BlockBatch"
BLOB_CHUNK = "pool.pipeline.BlobChunk"
BLOB_DELETE = "pool.pipeline.BlobDelete"

# The Kafka key of every change record when values are encrypted: the usual keys name blob paths
# and block numbers, which the ciphertext is meant to hide. Readers never rely on these keys.
SEALED_CHANGE_KEY = b"c"

# Block images of one file travel together up to this many bytes per record: kafka-python and
# fastavro cost ~15-35 us per record whatever its size, which dominated streams of small blocks.
BATCH_BYTES = 256 * 1024

# What fastavro.schemaless_reader passes its reader by default.
_READ_OPTIONS = {
    "return_record_name": False,
    "return_record_name_override": False,
    "handle_unicode_errors": "strict",
    "return_named_type": False,
    "return_named_type_override": False,
}


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _unsigned(value: int) -> int:
    return value & 0xFFFFFFFFFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """An Avro zigzag varint at `pos`: (value, position after it)."""
    shift = result = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise IndexError("varint longer than 64 bits")


@dataclass(frozen=True)
class StreamRecord:
    """A Record not straight from a broker (read back from an archive segment, or built by a test)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 0  # ms, named as in kafka-python's ConsumerRecord


class Codec:
    """Encodes with the current version of each record schema; decodes any version it knows by fingerprint.

    With a `keyring`, every value it encodes is sealed (AES-256-GCM with the newest key, bound to the
    record's database) and every sealed value it decodes is opened first: this is the one place where
    the agent, replica, archive, restore, analytics and the change stream encrypt and decrypt.
    Decoding a sealed value needs `database=` (what it must have been sealed for). Without a keyring
    a sealed value is refused; with one, a plaintext value is refused unless the keyring allows it.
    """

    def __init__(self, schemas: Iterable[dict], *, keyring: Keyring | None = None) -> None:
        self.keyring = keyring
        self._plain_ok = keyring is None or keyring.allow_plaintext
        self.schemas = list(schemas)
        self._writers: dict[bytes, tuple[str, dict]] = {}
        self._current: dict[str, tuple[bytes, dict]] = {}
        for schema in self.schemas:
            parsed = fastavro.parse_schema(schema)
            assert isinstance(parsed, dict), "each record schema parses to a dict"
            name = parsed["name"]
            canonical = fastavro.schema.to_parsing_canonical_form(schema)
            fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
            self._writers[fingerprint] = (name, parsed)
            self._current[name] = (MAGIC + fingerprint, parsed)  # later versions win
        # fingerprint -> (name, writer schema, reader schema or None when it is the writer's, and the
        # writer's named types when _read_record can read it: compiled fastavro, no schema resolution)
        self._readers: dict[bytes, tuple[str, dict, dict | None, dict | None]] = {}
        for fingerprint, (name, parsed) in self._writers.items():
            reader = self._current[name][1]
            named: dict | None = None
            if reader is parsed and _COMPILED:
                named = {"writer": {}, "reader": {}}
                fastavro.parse_schema(parsed, named["writer"])
            self._readers[fingerprint] = (name, parsed, None if reader is parsed else reader, named)

    def encode(self, name: str, record: dict) -> bytes:
        header, parsed = self._current[name]
        buf = io.BytesIO()
        buf.write(header)
        fastavro.schemaless_writer(buf, parsed, record)
        if self.keyring is not None:
            return self.keyring.seal_record(buf.getvalue(), record["database"])
        return buf.getvalue()

    def decode(
        self,
        value: bytes | None,
        *,
        topic: str | None = None,
        offset: int | None = None,
        database: str | None = None,
    ) -> tuple[str, dict]:
        """Return (record name, record) or raise PipelineError naming topic and offset."""
        # The hot path of every reader: one lookup, then fastavro.
        if (
            isinstance(value, bytes)
            and value[:2] == MAGIC
            and self._plain_ok
            and (known := self._readers.get(value[2:10])) is not None
        ):
            data = value
        else:
            known, data = self._schema_of(value, topic, offset, database)
        name, writer, reader, named = known
        buf = io.BytesIO(data)
        buf.seek(10)
        try:
            if named is not None:
                record = _read_record(buf, writer, named, None, _READ_OPTIONS)
            else:
                record = fastavro.schemaless_reader(buf, writer, reader)
        except Exception as exc:  # fastavro raises many types on a bad body
            raise PipelineError(f"cannot decode {name} body: {exc}", topic=topic, offset=offset) from exc
        if buf.tell() != len(data):
            raise PipelineError(
                f"{name} record has {len(data) - buf.tell()} trailing bytes", topic=topic, offset=offset
            )
        return name, record

    def _schema_of(
        self,
        value: bytes | bytearray | memoryview | None,
        topic: str | None,
        offset: int | None,
        database: str | None = None,
    ) -> tuple[tuple[str, dict, dict | None, dict | None], bytes]:
        """(its _readers entry, the record as bytes), or the PipelineError that says why it has no schema."""
        if is_sealed_record(value):
            assert value is not None
            value = self._open(value, topic, offset, database)
        elif not self._plain_ok and value is not None and value[:2] == MAGIC:
            assert self.keyring is not None
            raise KeyMismatch(
                f"record is not encrypted, but a key is configured ({self.keyring.source}): refused, since "
                "anyone who can write to the topic could have put it there (written before encryption was "
                "turned on? read it with --allow-plaintext)",
                database=database,
                topic=topic,
                offset=offset,
            )
        if value is None or len(value) < 10 or value[:2] != MAGIC:
            raise PipelineError("not an Avro single-object record (missing C3 01 marker)", topic=topic, offset=offset)
        fingerprint = bytes(value[2:10])
        known = self._readers.get(fingerprint)
        if known is None:
            raise PipelineError(
                f"unknown writer schema fingerprint {fingerprint[::-1].hex()}: "
                "record written by a newer or foreign producer",
                topic=topic,
                offset=offset,
            )
        return known, bytes(value)

    def _open(
        self, value: bytes | bytearray | memoryview, topic: str | None, offset: int | None, database: str | None
    ) -> bytes:
        """The plaintext of a sealed record value."""
        if self.keyring is None:
            raise KeyMismatch(
                f"record is encrypted with key {record_key_id(value)}: give its key file with --encryption-key "
                "FILE or $POOL_PIPELINE_KEY_FILE",
                database=database,
                topic=topic,
                offset=offset,
            )
        if database is None:
            raise PipelineError(
                "cannot decrypt a record without knowing its database (Codec.decode(..., database=))",
                topic=topic,
                offset=offset,
            )
        try:
            return self.keyring.open_record(value, database)
        except PipelineError as exc:
            raise exc.with_context(database=database, topic=topic, offset=offset) from None

    def peek(
        self,
        value: bytes | None,
        *,
        topic: str | None = None,
        offset: int | None = None,
        database: str | None = None,
    ) -> tuple[str, str, int]:
        """(record name, database, txn id) without decoding the body: every record starts with them.

        Lets a consumer that only frames transactions (the archiver) skip parsing block images (a
        sealed record is still decrypted whole: GCM authenticates all of it or nothing).
        """
        (name, *_), data = self._schema_of(
            value if value is None or len(value) >= 12 else None, topic, offset, database
        )
        try:
            length, pos = _varint(data, 10)
            database = data[pos : pos + length].decode()
            txn_id, _ = _varint(data, pos + length)
        except (IndexError, UnicodeDecodeError) as exc:
            raise PipelineError(f"cannot decode {name} header: {exc}", topic=topic, offset=offset) from exc
        return name, database, txn_id

    # --- transactions <-> records -------------------------------------------------------------

    def transaction_records(self, txn: Transaction) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs for one transaction: begin, [snapshot start], changes, [snapshot end], commit.

        Consecutive block writes of one file go in one BlockBatch record (up to BATCH_BYTES).
        The commit is encoded after `txn.changes` is exhausted, when the trailer is known; its
        record_count counts change records, so framing can be checked without decoding bodies.
        """
        head = {"database": txn.database, "txn_id": txn.txn_id}
        yield (
            TXN_KEY,
            self.encode(
                BEGIN,
                {
                    **head,
                    "checksum_before": _signed(txn.checksum_before),
                    "source_time_ms": txn.source_time_ms,
                    "snapshot": txn.snapshot,
                },
            ),
        )
        if txn.snapshot:
            yield b"snapshot", self.encode(SNAPSHOT, {**head, "phase": "START", "files": [], "reason": ""})
        records = changes = 0
        for unit in _batched(txn.changes):
            records += 1
            if isinstance(unit, list):
                changes += len(unit)
                yield self._batch_record(head, unit)
            elif isinstance(unit, BlockBatch):  # already a record's worth (the capture agent's images)
                changes += len(unit.indexes)
                yield self._batch_of(head, unit.file, unit.block_size, unit.indexes, unit.data)
            else:
                changes += 1
                yield change_key(unit) if self.keyring is None else SEALED_CHANGE_KEY, self.encode_change(head, unit)
        if changes != txn.change_count:
            raise txn.error(f"transaction announced {txn.change_count} changes but produced {changes}")
        files = [{"file": f.file, "block_size": f.block_size, "blocks": f.blocks} for f in txn.files]
        if txn.snapshot:
            yield b"snapshot", self.encode(SNAPSHOT, {**head, "phase": "END", "files": files, "reason": ""})
        yield (
            TXN_KEY,
            self.encode(
                COMMIT,
                {
                    **head,
                    "record_count": records,
                    "checksum_before": _signed(txn.checksum_before),
                    "checksum_after": _signed(txn.checksum_after),
                    "source_time_ms": txn.source_time_ms,
                    "files": files,
                },
            ),
        )

    def _batch_record(self, head: dict, blocks: list[BlockWrite]) -> tuple[bytes, bytes]:
        first = blocks[0]
        return self._batch_of(
            head, first.file, len(first.data), [b.index for b in blocks], b"".join(b.data for b in blocks)
        )

    def _batch_of(self, head: dict, file: int, size: int, indexes: list[int], data: bytes) -> tuple[bytes, bytes]:
        key = b"b/%d/%d+%d" % (file, indexes[0], len(indexes)) if self.keyring is None else SEALED_CHANGE_KEY
        return key, self.encode(
            BLOCK_BATCH,
            {**head, "file": file, "block_size": size, "block_indexes": indexes, "data": data},
        )

    def encode_change(self, head: dict, change: BlobChunk | BlobDelete) -> bytes:
        if isinstance(change, BlobChunk):
            return self.encode(
                BLOB_CHUNK,
                {
                    **head,
                    "path": change.path,
                    "size": change.size,
                    "sha256": change.sha256,
                    "chunk_index": change.index,
                    "chunk_count": change.count,
                    "data": change.data,
                },
            )
        return self.encode(BLOB_DELETE, {**head, "path": change.path})

    def read_transactions(
        self,
        records: Iterable[Record],
        database: str,
        *,
        batches: bool = False,
        kind: Callable[..., Transaction] = Transaction,
    ) -> Iterator[Transaction]:
        """Group a committed record stream into transactions, checking framing as it goes.

        Each yielded transaction's `changes` pull lazily from `records`; anything left
        unread is drained before the next transaction starts. A broken stream (record
        outside a transaction, foreign database, wrong txn id, count mismatch, missing
        commit) raises PipelineError from inside the `changes` iteration.
        With `batches`, a BlockBatch record comes out as one BlockBatch change instead of a
        BlockWrite per block. `kind` builds the transactions (a Transaction subclass).
        """
        it = iter(records)
        framer = TxnFramer(database)
        for rec in it:
            try:
                name, value = self.decode(rec.value, topic=rec.topic, offset=rec.offset, database=database)
            except PipelineError as exc:
                raise exc.with_context(database=database) from None
            if name != BEGIN:
                framer.record(name, value.get("database"), value.get("txn_id"), rec)  # raises: outside a txn
            framer.begin(value, rec)
            txn = kind(
                database=database,
                txn_id=value["txn_id"],
                checksum_before=_unsigned(value["checksum_before"]),
                source_time_ms=value["source_time_ms"],
                snapshot=value["snapshot"],
                offset=rec.offset,
            )
            txn.changes = self._changes(it, txn, framer, batches)
            yield txn
            if framer.open is not None:
                for _ in txn.changes:
                    pass

    def _changes(
        self, it: Iterator[Record], txn: Transaction, framer: TxnFramer, batches: bool
    ) -> Iterator[Change | BlockBatch]:
        changes = 0
        decode, record, txn_id = self.decode, framer.record, txn.txn_id  # locals: this loop runs per record
        database = txn.database
        for rec in it:
            try:
                name, value = decode(rec.value, database=database)
            except PipelineError as exc:
                raise exc.with_context(
                    database=txn.database, txn_id=txn_id, topic=rec.topic, offset=rec.offset
                ) from None
            record(name, value["database"], value["txn_id"], rec)
            if name == BLOCK_BATCH:  # the most frequent record first
                size, indexes, data = value["block_size"], value["block_indexes"], value["data"]
                if not indexes or size < 1 or size * len(indexes) != len(data):
                    raise framer.error(
                        f"block batch of file {value['file']} says {len(indexes)} blocks of {size} "
                        f"bytes but carries {len(data)}",
                        rec,
                        txn_id,
                    )
                changes += len(indexes)
                if batches:
                    yield BlockBatch(value["file"], size, indexes, data)
                else:
                    yield from BlockBatch(value["file"], size, indexes, data).blocks()
            elif name == COMMIT:
                framer.commit(value, rec)
                txn.change_count = changes
                txn.checksum_after = _unsigned(value["checksum_after"])
                txn.files = [FileLayout(f["file"], f["block_size"], f["blocks"]) for f in value["files"]]
                txn.end_offset = rec.offset
                txn.publish_time_ms = rec.timestamp
                return
            elif name == SNAPSHOT:
                framer.marker(value["phase"], rec)
            elif name == BLOCK:
                if value["block_size"] != len(value["data"]):
                    raise framer.error(
                        f"block {value['file']}:{value['block_index']} says {value['block_size']} "
                        f"bytes but carries {len(value['data'])}",
                        rec,
                        txn_id,
                    )
                changes += 1
                yield BlockWrite(value["file"], value["block_index"], value["data"])
            elif name == BLOB_CHUNK:
                changes += 1
                yield BlobChunk(
                    value["path"],
                    value["size"],
                    value["sha256"],
                    value["chunk_index"],
                    value["chunk_count"],
                    value["data"],
                )
            elif name == BLOB_DELETE:
                changes += 1
                yield BlobDelete(value["path"])
            else:
                raise framer.error(f"unexpected {name} record inside a transaction", rec, txn_id)
        framer.end()


def _batched(
    changes: Iterable[Change | BlockBatch],
) -> Iterator[list[BlockWrite] | BlockBatch | BlobChunk | BlobDelete]:
    """One unit per record: runs of block writes of one file (up to BATCH_BYTES), a BlockBatch as it
    comes (its maker keeps it within BATCH_BYTES), or a blob change."""
    batch: list[BlockWrite] = []
    size = 0
    for change in changes:
        if not isinstance(change, BlockWrite):
            if batch:
                yield batch
                batch, size = [], 0
            yield change
            continue
        if batch and (
            change.file != batch[0].file
            or len(change.data) != len(batch[0].data)
            or size + len(change.data) > BATCH_BYTES
        ):
            yield batch
            batch, size = [], 0
        batch.append(change)
        size += len(change.data)
    if batch:
        yield batch


def change_key(change: Change) -> bytes:
    """Kafka key: the block's or blob's identity, so a compacted topic keeps each one's latest image."""
    if isinstance(change, BlockWrite):
        return b"b/%d/%d" % (change.file, change.index)
    if isinstance(change, BlobChunk):
        return b"blob/%s/%d" % (change.path.encode(), change.index)
    return b"blob/%s/0" % change.path.encode()
