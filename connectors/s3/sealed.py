"""Snapshot objects in S3 encrypted with the payload key: files sealed on upload, opened on download."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from connectors.s3.store import Store
from pipeline.crypto import (
    FILE_CHUNK,
    FILE_HEADER,
    FILE_MAGIC,
    KEY_ID_BYTES,
    SEALED_CHUNK,
    KeyMismatch,
    Keyring,
    is_sealed_file,
)


def blob_key(prefix: str, index: int, rel: str, sealed: bool) -> str:
    """A snapshot blob's object key: its path, or when sealed its place in the manifest (the manifest,
    sealed too, maps it back), so that blob names do not show in a bucket listing."""
    return f"{prefix}blob/{index}" if sealed else f"{prefix}blob/{rel}"


def put_file(store: Store, key: str, path: Path, keyring: Keyring | None, context: str) -> None:
    """Upload `path` to `key`; with a keyring, sealed (through a temp file beside it, in constant memory)."""
    if keyring is None:
        store.upload_file(key, path)
        return
    tmp = path.with_name(f".{path.name}.sealed-{os.getpid()}")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            for piece in keyring.seal_chunks(iter(lambda: src.read(FILE_CHUNK), b""), context):
                dst.write(piece)
        store.upload_file(key, tmp)
    finally:
        tmp.unlink(missing_ok=True)


def put_bytes(store: Store, key: str, data: bytes, keyring: Keyring | None, context: str) -> None:
    store.put_new(key, data if keyring is None else keyring.seal_bytes(data, context))


def open_bytes(data: bytes, keyring: Keyring | None, context: str, what: str) -> tuple[bytes, bool]:
    """(the plaintext of a small object, whether it was sealed); refuses what the keyring cannot read."""
    if is_sealed_file(data):
        if keyring is None:
            raise KeyMismatch(f"{what} is encrypted with key {_key_hex(data)}: {_GIVE_KEY}")
        return keyring.open_bytes(data, context, what), True
    if keyring is not None and not keyring.allow_plaintext:
        raise KeyMismatch(f"{what} is not encrypted, but a key is configured ({keyring.source}): {_PLAIN}")
    return data, False


def get_file(
    store: Store,
    key: str,
    path: Path,
    keyring: Keyring | None,
    context: str,
    sealed: bool,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Download `key` to `path`, opening it when `sealed` (the manifest says so); the plaintext appears
    at `path` only once every chunk authenticated."""
    if not sealed:
        store.download(key, path, on_bytes)
        return
    if keyring is None:  # open_bytes refused the manifest already; kept for other callers
        raise KeyMismatch(f"{key} is encrypted: {_GIVE_KEY}")
    tmp = path.with_name(f".{path.name}.sealed-{os.getpid()}")
    out = path.with_name(f".{path.name}.open-{os.getpid()}")
    try:
        store.download(key, tmp, on_bytes)
        with open(tmp, "rb") as src, open(out, "wb") as dst:
            opener = keyring.file_opener(src.read(FILE_HEADER), context, f"snapshot object {key}")
            while piece := src.read(SEALED_CHUNK):
                dst.write(opener.open(piece))
            opener.finish()
        os.replace(out, path)
    finally:
        tmp.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def _key_hex(data: bytes) -> str:
    return data[len(FILE_MAGIC) : len(FILE_MAGIC) + KEY_ID_BYTES].hex()


_GIVE_KEY = "give its key file with --encryption-key FILE or $POOL_PIPELINE_KEY_FILE"
_PLAIN = "refused (written before encryption was turned on? read it with --allow-plaintext)"
