"""Payload encryption: sealed records through the codec, key rotation, tampering, sealed files, key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from connectors.keys import keygen, load_keyring
from pipeline.archive import Framer
from pipeline.codec import BEGIN, SEALED_CHANGE_KEY, Codec, StreamRecord
from pipeline.crypto import (
    FILE_CHUNK,
    FILE_HEADER,
    RECORD_MAGIC,
    SEALED_CHUNK,
    KeyMismatch,
    Keyring,
    new_key,
    snapshot_context,
)
from pipeline.errors import PipelineError
from pipeline.model import BlobChunk, BlockWrite, FileLayout, Transaction
from pool_pipeline.cli.admin import main as pipeline_main
from schemas import load_schemas

MARKER = b"SECRET-MARKER-0123456789"
SCHEMAS = load_schemas()


def txn(txn_id: int = 1, database: str = "app") -> Transaction:
    data = MARKER + bytes(64 - len(MARKER))
    changes = [
        BlockWrite(0, 1, data),
        BlockWrite(0, 2, data),
        BlobChunk("docs/secret-name.txt", len(MARKER), "0" * 64, 0, 1, MARKER),
    ]
    return Transaction(
        database=database,
        txn_id=txn_id,
        checksum_before=txn_id - 1,  # contiguous: txn n continues from txn n-1's checksum
        checksum_after=txn_id,
        source_time_ms=1_700_000_000_000,
        files=[FileLayout(0, 64, 4)],
        change_count=len(changes),
        changes=changes,
    )


def ring(*keys, allow_plaintext: bool = False) -> Keyring:
    return Keyring(keys, "test.key", allow_plaintext=allow_plaintext)


def stream(codec: Codec, *txns: Transaction) -> list[StreamRecord]:
    pairs = [kv for t in txns for kv in codec.transaction_records(t)]
    return [StreamRecord("pool.app", 0, i, k, v) for i, (k, v) in enumerate(pairs)]


def read_all(codec: Codec, records: list[StreamRecord], database: str = "app") -> list[tuple[Transaction, list]]:
    return [(t, list(t.changes)) for t in codec.read_transactions(records, database)]


def test_sealed_round_trip_equals_plaintext_and_hides_the_payload() -> None:
    key = new_key()
    sealed, plain = Codec(SCHEMAS, keyring=ring(key)), Codec(SCHEMAS)
    records = stream(sealed, txn(1), txn(2))
    for rec in records:
        assert rec.value is not None and rec.value[:2] == RECORD_MAGIC
        assert MARKER not in rec.value and b"secret-name" not in rec.value
        assert rec.key is not None and b"secret-name" not in rec.key  # change keys are opaque
    assert {r.key for r in records} == {b"txn", SEALED_CHANGE_KEY}
    got = [(t.txn_id, t.checksum_after, changes) for t, changes in read_all(sealed, records)]
    want = [(t.txn_id, t.checksum_after, changes) for t, changes in read_all(plain, stream(plain, txn(1), txn(2)))]
    assert got == want
    # The archiver's framing (peek on sealed records) sees the same transactions.
    framer = Framer(sealed, "app", None)
    done = [t.txn_id for r in records if framer.begin(r) is None and (t := framer.record(r)) is not None]
    assert done == [1, 2]


def test_rotation_newest_key_encrypts_and_old_keys_still_decrypt() -> None:
    old, new = new_key(), new_key()
    before = stream(Codec(SCHEMAS, keyring=ring(old)), txn(1))
    rotated = Codec(SCHEMAS, keyring=ring(old, new))
    after = stream(rotated, txn(2))
    assert all(r.value is not None and r.value[2:10] == new.key_id for r in after)
    assert [t.txn_id for t, _ in read_all(rotated, before)] == [1]  # the old key still reads old records
    assert [t.txn_id for t, _ in read_all(rotated, after)] == [2]
    with pytest.raises(KeyMismatch, match=f"encrypted with key {new.id_hex}, which test.key does not hold") as exc:
        read_all(Codec(SCHEMAS, keyring=ring(old)), after)
    assert exc.value.offset == 0 and exc.value.database == "app"


def test_no_key_wrong_key_tamper_and_wrong_database_are_clear_permanent_errors() -> None:
    key = new_key()
    records = stream(Codec(SCHEMAS, keyring=ring(key)), txn(1))
    with pytest.raises(KeyMismatch, match=f"encrypted with key {key.id_hex}: give its key file") as exc:
        read_all(Codec(SCHEMAS), records)
    assert not exc.value.retriable and exc.value.offset == 0
    with pytest.raises(KeyMismatch, match=key.id_hex):
        read_all(Codec(SCHEMAS, keyring=ring(new_key())), records)
    # Same key id, other secret (a forged key file): authentication fails.
    impostor = type(key)(key.key_id, os.urandom(32))
    with pytest.raises(PipelineError, match="does not decrypt with key"):
        read_all(Codec(SCHEMAS, keyring=ring(impostor)), records)
    codec = Codec(SCHEMAS, keyring=ring(key))
    for pos in (2, 12, 30, -1):  # key id, nonce, ciphertext, tag
        value = bytearray(records[1].value or b"")
        value[pos] ^= 1
        bad = [records[0], StreamRecord("pool.app", 0, 1, records[1].key, bytes(value)), *records[2:]]
        with pytest.raises(PipelineError) as exc:
            read_all(codec, bad)
        assert exc.value.offset == 1 and not exc.value.retriable
    # A record sealed for database "app" does not open as another database's.
    with pytest.raises(PipelineError, match="not written for database 'other'"):
        codec.decode(records[0].value, topic="pool.other", offset=0, database="other")


def test_plaintext_is_refused_with_a_key_unless_allowed() -> None:
    key = new_key()
    records = stream(Codec(SCHEMAS), txn(1))
    with pytest.raises(KeyMismatch, match="not encrypted, but a key is configured") as exc:
        read_all(Codec(SCHEMAS, keyring=ring(key)), records)
    assert exc.value.offset == 0
    assert [t.txn_id for t, _ in read_all(Codec(SCHEMAS, keyring=ring(key, allow_plaintext=True)), records)] == [1]


def test_stats_records_are_sealed_too() -> None:
    codec = Codec(SCHEMAS, keyring=ring(new_key()))
    head = {"database": "app", "txn_id": 3, "checksum_before": 0, "source_time_ms": 1, "snapshot": False}
    value = codec.encode(BEGIN, head)
    assert value[:2] == RECORD_MAGIC
    assert codec.decode(value, database="app") == (BEGIN, head)
    with pytest.raises(PipelineError, match="without knowing its database"):
        codec.decode(value)


@pytest.mark.parametrize("size", [0, 1, FILE_CHUNK - 1, FILE_CHUNK, FILE_CHUNK + 1, 2 * FILE_CHUNK + 5])
def test_sealed_files_round_trip_at_every_chunk_boundary(size: int) -> None:
    keys = ring(new_key())
    data = os.urandom(size)
    ctx = snapshot_context("app", 7, "db/A")
    sealed = b"".join(keys.seal_chunks((data[i : i + 300_000] for i in range(0, size, 300_000)), ctx))
    assert len(sealed) == FILE_HEADER + size + 16 * (size // FILE_CHUNK + 1)
    assert keys.open_bytes(sealed, ctx, "f") == data


def test_sealed_files_refuse_truncation_reordering_and_another_place() -> None:
    keys = ring(new_key())
    data = MARKER * (2 * FILE_CHUNK // len(MARKER) + 10)
    ctx = snapshot_context("app", 7, "db/A")
    sealed = keys.seal_bytes(data, ctx)
    assert MARKER not in sealed
    head, body = sealed[:FILE_HEADER], sealed[FILE_HEADER:]
    chunks = [body[i : i + SEALED_CHUNK] for i in range(0, len(body), SEALED_CHUNK)]
    assert len(chunks) == 3
    with pytest.raises(PipelineError, match="truncated"):
        keys.open_bytes(head + chunks[0] + chunks[1], ctx, "f")  # dropped the last chunk at a boundary
    with pytest.raises(PipelineError, match="does not decrypt"):
        keys.open_bytes(head + chunks[1] + chunks[0] + chunks[2], ctx, "f")
    with pytest.raises(PipelineError, match="does not decrypt"):
        keys.open_bytes(sealed[:-1], ctx, "f")
    for other in (
        snapshot_context("app", 8, "db/A"),
        snapshot_context("app", 7, "db/B"),
        snapshot_context("x", 7, "db/A"),
    ):
        with pytest.raises(PipelineError, match="does not decrypt"):
            keys.open_bytes(sealed, other, "f")
    with pytest.raises(KeyMismatch, match="not encrypted"):
        keys.open_bytes(data[:100], ctx, "f")


def test_keygen_writes_mode_0600_refuses_to_overwrite_and_adds_keys(tmp_path: Path) -> None:
    path = tmp_path / "app.key"
    old_umask = os.umask(0)  # the file is 0600 whatever the umask
    try:
        first = keygen(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(PipelineError, match="exists: refusing to overwrite"):
        keygen(path)
    assert path.read_bytes() == before
    second = keygen(path, add=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = load_keyring(path)
    assert [k.key_id for k in keys.keys] == [first.key_id, second.key_id]
    assert keys.newest == second
    # No secret in the Keyring's or Key's repr, nor in an error about the file.
    assert first.secret.hex() not in repr(keys) + repr(first)
    path.chmod(0o640)
    with pytest.raises(PipelineError, match=r"accessible by group or others \(mode 0640\)") as exc:
        load_keyring(path)
    assert first.secret.hex() not in str(exc.value)
    path.chmod(0o600)
    path.write_text(path.read_text() + "garbage " + first.secret.hex() + "\n")
    with pytest.raises(PipelineError, match="line 5 is not a pool-pipeline key") as exc:
        load_keyring(path)
    assert first.secret.hex() not in str(exc.value)


def test_pipeline_keygen_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k"
    with pytest.raises(SystemExit) as done:
        pipeline_main(["keygen", str(path)])
    assert done.value.code == 0
    key = load_keyring(path).newest
    out = capsys.readouterr().out
    assert key.id_hex in out and key.secret.hex() not in out
    with pytest.raises(SystemExit) as done:
        pipeline_main(["keygen", str(path)])
    assert done.value.code == 1
    with pytest.raises(SystemExit) as done:
        pipeline_main(["keygen", "--add", str(path)])
    assert done.value.code == 0 and len(load_keyring(path).keys) == 2


# --- snapshot objects through a store (connectors/s3/sealed.py) ------------------------------------


def test_sealed_snapshot_objects_round_trip_and_refuse_swaps_and_missing_keys(tmp_path: Path) -> None:
    from connectors.s3.sealed import blob_key, get_file, open_bytes, put_bytes, put_file
    from tests.dir_store import DirStore

    store = DirStore(tmp_path / "s3", "app")
    keys = ring(new_key())
    a, b = tmp_path / "A", tmp_path / "B"
    a.write_bytes(MARKER * 100_000)  # 2.4 MB: three chunks
    b.write_bytes(MARKER[::-1] * 10)
    ctx = lambda name: snapshot_context("app", 9, name)  # noqa: E731
    for path in (a, b):
        put_file(store, f"{store.root}/snap/db/{path.name}", path, keys, ctx(f"db/{path.name}"))
    put_bytes(store, f"{store.root}/snap/manifest.json", b'{"x": 1}', keys, ctx("manifest.json"))
    assert not list(tmp_path.glob(".*sealed*"))  # the sealed temp file is gone
    for key, body in store.objects().items():
        assert MARKER not in body and MARKER[::-1] not in body, key
    assert blob_key("p/", 3, "A/1.doc", sealed=True) == "p/blob/3"

    out = tmp_path / "out"
    out.mkdir()
    get_file(store, f"{store.root}/snap/db/A", out / "A", keys, ctx("db/A"), sealed=True)
    assert (out / "A").read_bytes() == a.read_bytes()
    manifest = store.get(f"{store.root}/snap/manifest.json")
    assert open_bytes(manifest, keys, ctx("manifest.json"), "m") == (b'{"x": 1}', True)
    # File A's object under B's name (or another snapshot's) does not open, and leaves no file.
    with pytest.raises(PipelineError, match="does not decrypt"):
        get_file(store, f"{store.root}/snap/db/A", out / "B", keys, ctx("db/B"), sealed=True)
    with pytest.raises(PipelineError, match="does not decrypt"):
        get_file(store, f"{store.root}/snap/db/A", out / "B", keys, snapshot_context("app", 8, "db/A"), sealed=True)
    assert sorted(p.name for p in out.iterdir()) == ["A"]
    # No key, another key, or a key where the object is plaintext: refused with what is needed.
    with pytest.raises(KeyMismatch, match=f"encrypted with key {keys.newest.id_hex}"):
        open_bytes(manifest, None, ctx("manifest.json"), "m")
    with pytest.raises(KeyMismatch, match=keys.newest.id_hex):
        open_bytes(manifest, ring(new_key()), ctx("manifest.json"), "m")
    with pytest.raises(KeyMismatch, match="not encrypted"):
        open_bytes(b'{"x": 1}', keys, ctx("manifest.json"), "m")
    assert open_bytes(b"{}", ring(new_key(), allow_plaintext=True), "c", "m") == (b"{}", False)
    assert open_bytes(b"{}", None, "c", "m") == (b"{}", False)
