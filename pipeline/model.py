"""Transactions, positions and the block/blob changes they carry, plus the validation every side shares."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pipeline.errors import PipelineError

# One Kafka record must stay well under the broker's default message.max.bytes (1 MiB).
MAX_BLOB_CHUNK = 512 * 1024
MAX_BLOCK_SIZE = 512 * 1024
DATABASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


@dataclass(frozen=True, order=True)
class Position:
    """Where a replica stands: the last applied txn id and the pool checksum after it (LiteFS-style)."""

    txn_id: int
    checksum: int

    def __str__(self) -> str:
        return f"txn {self.txn_id} (checksum {self.checksum:016x})"


# The change classes and FileLayout are not frozen: a reader builds one per record, and a frozen
# dataclass takes three times as long to construct (it sets each field through object.__setattr__).
@dataclass(slots=True)
class BlockWrite:
    """The final image of one block after a transaction."""

    file: int
    index: int
    data: bytes

    @property
    def block_size(self) -> int:
        return len(self.data)


@dataclass(slots=True)
class BlockBatch:
    """Final images of several blocks of one file, as they travel in one record.

    Readers that only count or copy blocks take these whole (`batches=True` on the read side),
    because a Python object per small block costs more than the block itself.
    """

    file: int
    block_size: int
    indexes: list[int]
    data: bytes

    def blocks(self) -> Iterator[BlockWrite]:
        size, file = self.block_size, self.file
        for k, index in enumerate(self.indexes):
            yield BlockWrite(file, index, self.data[k * size : (k + 1) * size])


@dataclass(slots=True)
class BlobChunk:
    """One piece (<= MAX_BLOB_CHUNK) of a blob's new content; `size` and `sha256` describe the whole blob."""

    path: str
    size: int
    sha256: str
    index: int
    count: int
    data: bytes


@dataclass(slots=True)
class BlobDelete:
    """A blob that no longer exists at the source."""

    path: str


Change = BlockWrite | BlobChunk | BlobDelete


@dataclass
class FileLayout:
    """One DB file's shape after a transaction: its block size and number of blocks."""

    file: int
    block_size: int
    blocks: int


@dataclass
class Transaction:
    """One committed unit of change of one database: a header, its changes, and a trailer.

    `changes` is iterated once: on both sides it streams (from the pool, or from the
    broker) so that a multi-GiB bootstrap never has to fit in memory. A source raises
    PipelineError from inside that iteration if the stream turns out broken, so a sink
    must stage everything and apply only after the iteration ended cleanly.
    The trailer (`change_count`, `checksum_after`, `files`, `end_offset`, `publish_time_ms`) is
    filled in by the time `changes` is exhausted: a streamed snapshot only knows it at its end.
    `snapshot` marks a full image of the pool: every block of every file and every blob.
    """

    database: str
    txn_id: int
    checksum_before: int
    source_time_ms: int
    changes: Iterable[Change | BlockBatch] = ()  # BlockBatch only from a reader asked for batches
    snapshot: bool = False
    checksum_after: int = 0
    files: list[FileLayout] = field(default_factory=list)
    change_count: int = 0
    offset: int | None = None
    end_offset: int | None = None
    publish_time_ms: int = 0  # broker timestamp of the TxnCommit record, once read from a topic

    @property
    def before(self) -> Position:
        return Position(self.txn_id - 1, self.checksum_before)

    @property
    def after(self) -> Position:
        return Position(self.txn_id, self.checksum_after)

    def error(self, message: str, *, retriable: bool = False) -> PipelineError:
        return PipelineError(
            message, retriable=retriable, database=self.database, txn_id=self.txn_id, offset=self.offset
        )

    def validate_trailer(self) -> dict[int, FileLayout]:
        """Reject a trailer that contradicts itself; returns the layout by file number."""
        check_database_name(self.database)
        if self.txn_id < 1:
            raise self.error(f"txn id must be >= 1, got {self.txn_id}")
        if self.change_count < 0:
            raise self.error(f"negative change count {self.change_count}")
        layout = {f.file: f for f in self.files}
        if not self.files or sorted(layout) != list(range(len(self.files))):
            raise self.error(f"pool layout must number files 0..n-1, got {[f.file for f in self.files]}")
        for f in self.files:
            if f.block_size < 64 or f.block_size > MAX_BLOCK_SIZE or f.block_size & (f.block_size - 1):
                raise self.error(f"file {f.file}: bad block size {f.block_size}")
            if f.blocks < 1:
                raise self.error(f"file {f.file}: a pool file has at least one block, got {f.blocks}")
        return layout


def check_database_name(name: str) -> str:
    if not DATABASE_NAME.match(name or ""):
        raise PipelineError(
            f"invalid database name {name!r}: use letters, digits, '.', '_' or '-' (it becomes a topic name)"
        )
    return name


def safe_blob_path(path: str) -> str:
    """Return `path` if it stays inside the blob directory, else raise: no absolute paths, no '..'."""
    if not path or "\x00" in path or "\\" in path:
        raise PipelineError(f"invalid blob path {path!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a name on disk that is not UTF-8 (surrogate escapes): no Avro string holds it
        raise PipelineError(f"blob path {path!r} is not valid UTF-8") from None
    if path.startswith("/"):
        raise PipelineError(f"blob path {path!r} is absolute; blob paths must be relative to the blob directory")
    norm = posixpath.normpath(path)
    parts = path.split("/")
    if ".." in parts or norm.startswith("..") or norm != path or "." in parts:
        raise PipelineError(f"blob path {path!r} escapes or is not normalised within the blob directory")
    return path
