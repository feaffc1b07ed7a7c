"""Chunk and part sizing shared by the network backends."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
S3_MIN_PART = 5 * MIB
S3_MAX_PART = 5 * 1024 * MIB
S3_MAX_PARTS = 10_000


def s3_part_size(size: int, requested: int) -> int:
    """The part size for an object of ``size`` bytes: ``requested`` (at least 5 MiB),
    doubled until the object fits in 10,000 parts, so a 200 GiB disk uploads with the
    default 10 MiB setting (as 40 MiB parts) instead of failing at part 10,001."""
    part = max(requested, S3_MIN_PART)
    while -(-size // part) > S3_MAX_PARTS:
        part *= 2
    if part > S3_MAX_PART:
        raise ValueError(f"an object of {size} bytes does not fit in {S3_MAX_PARTS} parts")
    return part


@dataclass(frozen=True)
class Chunk:
    """Bytes [offset, offset + length) of an object; ``number`` is 1-based (S3 part number)."""

    number: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def split(size: int, chunk_size: int) -> list[Chunk]:
    """Cut ``size`` bytes into chunks of ``chunk_size`` (the last may be shorter)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return [
        Chunk(number=index + 1, offset=offset, length=min(chunk_size, size - offset))
        for index, offset in enumerate(range(0, size, chunk_size))
    ]
