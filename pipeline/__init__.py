"""The replication domain: transactions, positions, checksums, the Avro codec and the replicate loop (no I/O)."""

from pipeline.errors import PipelineError
from pipeline.model import BlobChunk, BlobDelete, BlockWrite, Change, FileLayout, Position, Transaction

__all__ = [
    "BlobDelete",
    "BlobChunk",
    "Change",
    "BlockWrite",
    "FileLayout",
    "PipelineError",
    "Position",
    "Transaction",
]
