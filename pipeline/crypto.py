"""Payload encryption: AES-256-GCM key rings, sealed record values and sealed files (no I/O here)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.errors import PipelineError

# A sealed record value: RECORD_MAGIC, key id, nonce, then AES-GCM ciphertext and tag of the whole
# single-object-encoded record. C3 01 starts a plaintext Avro record, so the two never collide.
RECORD_MAGIC = b"\xc3\xe1"
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
RECORD_HEADER = len(RECORD_MAGIC) + KEY_ID_BYTES + NONCE_BYTES
RECORD_OVERHEAD = RECORD_HEADER + TAG_BYTES

# A sealed file (snapshot files in S3): FILE_MAGIC, key id, a 7-byte nonce prefix, then chunks of
# FILE_CHUNK plaintext bytes, each sealed on its own (the STREAM construction): nonce = prefix,
# 4-byte chunk number, 1 byte "last chunk". So a file streams through in constant memory, and
# reordered, dropped or truncated chunks fail authentication. The last chunk is the only one
# shorter than FILE_CHUNK (empty if the length is a multiple of it).
FILE_MAGIC = b"PPSEALED\x01"
FILE_CHUNK = 1 << 20
_PREFIX_BYTES = 7
FILE_HEADER = len(FILE_MAGIC) + KEY_ID_BYTES + _PREFIX_BYTES
SEALED_CHUNK = FILE_CHUNK + TAG_BYTES

KEY_LINE = "pool-pipeline-key-v1"
_LINE = re.compile(
    rf"^{KEY_LINE} (?P<id>[0-9a-f]{{{2 * KEY_ID_BYTES}}}) (?P<key>[0-9a-f]{{64}})(?: (?P<created>\S+))?$"
)


class KeyMismatch(PipelineError):
    """Data and reader disagree about keys: it is encrypted with a key the reader lacks (or the reader
    has none), or it is plaintext where the reader requires encryption. Never skipped as a foreign
    record: the reader must be given the right key."""


@dataclass(frozen=True)
class Key:
    """One AES-256 key and its id (random, public: it travels in every record it seals)."""

    key_id: bytes
    secret: bytes = field(repr=False)  # never in a repr, log or error
    created: str = ""

    @property
    def id_hex(self) -> str:
        return self.key_id.hex()

    def line(self) -> str:
        return f"{KEY_LINE} {self.id_hex} {self.secret.hex()}" + (f" {self.created}" if self.created else "")


def new_key(created: str = "") -> Key:
    return Key(os.urandom(KEY_ID_BYTES), AESGCM.generate_key(bit_length=256), created)


class Keyring:
    """The keys of one key file: the newest (last) seals, any of them opens.

    `source` names the file in error messages; the secrets are never part of any message.
    `allow_plaintext`: whether a reader with keys also accepts records written without encryption
    (off by default: anyone who can write to the topic could inject unauthenticated records).
    """

    def __init__(self, keys: Iterable[Key], source: str = "the key file", *, allow_plaintext: bool = False) -> None:
        self.keys = list(keys)
        if not self.keys:
            raise PipelineError(f"{source} holds no key: create one with `pipeline keygen {source}`")
        self.source = source
        self.allow_plaintext = allow_plaintext
        self._by_id = {k.key_id: (k, AESGCM(k.secret)) for k in self.keys}
        if len(self._by_id) != len(self.keys):
            raise PipelineError(f"{source} holds the same key id twice")
        self.newest = self.keys[-1]
        self._sealer = self._by_id[self.newest.key_id][1]

    def __repr__(self) -> str:
        return f"Keyring({self.source!r}, ids={[k.id_hex for k in self.keys]})"

    @classmethod
    def parse(cls, text: str, source: str, *, allow_plaintext: bool = False) -> Keyring:
        """Read a key file's text: one `pool-pipeline-key-v1 <id> <key> [<created>]` line per key, oldest
        first; blank lines and `#` comments are ignored. Errors name the line, never its content."""
        keys = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _LINE.match(line)
            if m is None:
                raise PipelineError(
                    f"{source} line {number} is not a pool-pipeline key (expected `{KEY_LINE} <16 hex id> "
                    "<64 hex key>`; write key files with `pipeline keygen`)"
                )
            keys.append(Key(bytes.fromhex(m["id"]), bytes.fromhex(m["key"]), m["created"] or ""))
        return cls(keys, source, allow_plaintext=allow_plaintext)

    def ids(self) -> str:
        return ", ".join(k.id_hex for k in self.keys)

    def _opener(self, key_id: bytes, what: str) -> AESGCM:
        found = self._by_id.get(key_id)
        if found is None:
            raise KeyMismatch(
                f"{what} is encrypted with key {key_id.hex()}, which {self.source} does not hold "
                f"(it holds {self.ids()}): give the key file that has key {key_id.hex()}"
            )
        return found[1]

    # --- record values ------------------------------------------------------------------------

    def seal_record(self, plaintext: bytes, database: str) -> bytes:
        header = RECORD_MAGIC + self.newest.key_id + os.urandom(NONCE_BYTES)
        return header + self._sealer.encrypt(header[-NONCE_BYTES:], plaintext, record_aad(header, database))

    def open_record(self, value: bytes | bytearray | memoryview, database: str) -> bytes:
        """The plaintext of a sealed record value, or a PipelineError saying which key it needs or
        that it is not authentic (altered, or sealed for another database)."""
        if len(value) < RECORD_OVERHEAD:
            raise PipelineError(f"encrypted record is truncated ({len(value)} bytes)")
        header = bytes(value[:RECORD_HEADER])
        key_id = header[2 : 2 + KEY_ID_BYTES]
        aead = self._opener(key_id, "record")
        try:
            return aead.decrypt(header[-NONCE_BYTES:], bytes(value[RECORD_HEADER:]), record_aad(header, database))
        except InvalidTag:
            raise PipelineError(
                f"record does not decrypt with key {key_id.hex()}: it was altered, or not written for "
                f"database {database!r}"
            ) from None

    # --- files --------------------------------------------------------------------------------

    def seal_chunks(self, chunks: Iterable[bytes], context: str) -> Iterator[bytes]:
        """A sealed file, piece by piece, from the plaintext in `chunks` (any sizes)."""
        header = FILE_MAGIC + self.newest.key_id + os.urandom(_PREFIX_BYTES)
        yield header
        aad = file_aad(header, context)
        pending = b""
        number = 0
        for chunk in chunks:
            pending += chunk
            while len(pending) > FILE_CHUNK:  # strictly more: the final chunk is never a full one
                yield self._sealer.encrypt(_chunk_nonce(header, number, False), pending[:FILE_CHUNK], aad)
                pending = pending[FILE_CHUNK:]
                number += 1
        if len(pending) == FILE_CHUNK:
            yield self._sealer.encrypt(_chunk_nonce(header, number, False), pending, aad)
            pending, number = b"", number + 1
        yield self._sealer.encrypt(_chunk_nonce(header, number, True), pending, aad)

    def seal_bytes(self, data: bytes, context: str) -> bytes:
        return b"".join(self.seal_chunks([data], context))

    def open_bytes(self, sealed: bytes, context: str, what: str) -> bytes:
        """A whole small sealed file (a snapshot manifest) at once."""
        opener = self.file_opener(sealed[:FILE_HEADER], context, what)
        body = memoryview(sealed)[FILE_HEADER:]
        plain = [opener.open(bytes(body[i : i + SEALED_CHUNK])) for i in range(0, len(body), SEALED_CHUNK)]
        opener.finish()  # a missing final chunk (truncation) fails here
        return b"".join(plain)

    def file_opener(self, header: bytes, context: str, what: str) -> FileOpener:
        """Opens a sealed file chunk by chunk, from its first FILE_HEADER bytes."""
        if len(header) < FILE_HEADER or not header.startswith(FILE_MAGIC):
            raise KeyMismatch(f"{what} is not encrypted, but a key is configured ({self.source})")
        header = bytes(header[:FILE_HEADER])
        key_id = header[len(FILE_MAGIC) : len(FILE_MAGIC) + KEY_ID_BYTES]
        return FileOpener(self._opener(key_id, what), header, file_aad(header, context), what, key_id.hex())


class FileOpener:
    """Decrypts a sealed file's chunks in order (each SEALED_CHUNK bytes, the last one shorter)."""

    def __init__(self, aead: AESGCM, header: bytes, aad: bytes, what: str, key_hex: str) -> None:
        self.aead, self.header, self.aad, self.what, self.key_hex = aead, header, aad, what, key_hex
        self.number = 0
        self.done = False

    def open(self, sealed: bytes) -> bytes:
        """The plaintext of the next sealed chunk; a chunk shorter than SEALED_CHUNK is the last."""
        if self.done:
            raise PipelineError(f"{self.what} has data after its last encrypted chunk")
        last = len(sealed) < SEALED_CHUNK
        try:
            plain = self.aead.decrypt(_chunk_nonce(self.header, self.number, last), sealed, self.aad)
        except InvalidTag:
            raise PipelineError(
                f"{self.what} does not decrypt with key {self.key_hex} (chunk {self.number}): it was altered, "
                "truncated, or belongs elsewhere"
            ) from None
        self.number += 1
        self.done = last
        return plain

    def finish(self) -> None:
        if not self.done:
            raise PipelineError(f"{self.what} is truncated: its last encrypted chunk is missing")


def record_aad(header: bytes, database: str) -> bytes:
    """What a sealed record is bound to besides its plaintext: its header and its database."""
    return header + b"\0pool-pipeline record\0" + database.encode()


def file_aad(header: bytes, context: str) -> bytes:
    """What a sealed file is bound to: its header and where it belongs (database, snapshot, name)."""
    return header + b"\0pool-pipeline file\0" + context.encode()


def snapshot_context(database: str, txn: int, name: str) -> str:
    """A snapshot file's AAD context: a file cannot pass for another database's, snapshot's or name's."""
    return f"{database}\0snapshot {txn}\0{name}"


def _chunk_nonce(header: bytes, number: int, last: bool) -> bytes:
    if number >= 1 << 32:
        raise PipelineError("file too large to seal (over 4 PiB)")
    return header[-_PREFIX_BYTES:] + number.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def is_sealed_record(value: bytes | bytearray | memoryview | None) -> bool:
    return value is not None and value[:2] == RECORD_MAGIC


def is_sealed_file(head: bytes) -> bool:
    return head[: len(FILE_MAGIC)] == FILE_MAGIC


def record_key_id(value: bytes | bytearray | memoryview) -> str:
    return bytes(value[2 : 2 + KEY_ID_BYTES]).hex()
