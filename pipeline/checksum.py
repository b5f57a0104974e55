"""The rolling pool checksum: XOR over all blocks of a 64-bit hash of (file, block index, bytes)."""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable
from hashlib import blake2b

_PREFIX = struct.Struct("<HQ")


def block_hash(file: int, index: int, data: bytes | memoryview) -> int:
    """64-bit hash of one block, bound to its place so that moved or swapped blocks change the sum."""
    h = blake2b(_PREFIX.pack(file, index), digest_size=8)
    h.update(data)
    return int.from_bytes(h.digest(), "little")


class RollingChecksum:
    """The checksum of a whole pool, updated per block write in O(1).

    It keeps one 8-byte hash per block in an array per file (compact: 2 MiB per GiB of
    4 KiB blocks) so that a new image can replace the old one's contribution without
    reading the old bytes back, which the capture side cannot do (the DB already changed).
    """

    def __init__(self) -> None:
        self.value = 0
        self._hashes: dict[int, array] = {}

    def set_block(self, file: int, index: int, data: bytes) -> None:
        self.set_hash(file, index, block_hash(file, index, data))

    def set_hash(self, file: int, index: int, new: int) -> None:
        """Replace one block's contribution by an already computed block_hash()."""
        hashes = self._hashes.get(file)
        if hashes is None:
            hashes = self._hashes[file] = array("Q")
        if index >= len(hashes):
            # A block that did not exist contributed nothing; zero is XOR's identity.
            hashes.extend(array("Q", [0]) * (index + 1 - len(hashes)))
        self.value ^= hashes[index] ^ new
        hashes[index] = new

    def hash_at(self, file: int, index: int) -> int:
        """The block's current hash; 0 for a block never set."""
        hashes = self._hashes.get(file)
        return hashes[index] if hashes is not None and index < len(hashes) else 0


def checksum_of(blocks: Iterable[tuple[int, int, bytes]]) -> int:
    """Checksum of a full image given as (file, index, bytes) for every block."""
    value = 0
    for file, index, data in blocks:
        value ^= block_hash(file, index, data)
    return value
