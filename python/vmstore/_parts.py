"""Chunk and part sizing shared by the network backends."""

from __future__ import annotations

from collections.abc import Iterable
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


class ChunkSet:
    """The chunk numbers (1-based) already on disk or stored.

    Kept as a contiguous prefix plus the few numbers beyond it, and saved as runs
    ``[[first, last], ...]``: chunks land roughly in order, so what a resume state file holds
    stays a handful of runs for a 200 GiB disk of 12,800 chunks, and rewriting it after every
    batch costs the same at chunk 10 as at chunk 10,000.
    """

    def __init__(self, numbers: Iterable[int] = ()) -> None:
        self._prefix = 0  # 1..prefix are all in the set
        self._beyond: set[int] = set()
        for number in numbers:
            self.add(number)

    def add(self, number: int) -> None:
        if number <= self._prefix:
            return
        self._beyond.add(number)
        while self._prefix + 1 in self._beyond:
            self._prefix += 1
            self._beyond.remove(self._prefix)

    def update(self, numbers: Iterable[int]) -> None:
        for number in numbers:
            self.add(number)

    def __contains__(self, number: object) -> bool:
        if not isinstance(number, int):
            return False
        return 1 <= number <= self._prefix or number in self._beyond

    def __len__(self) -> int:
        return self._prefix + len(self._beyond)

    def runs(self) -> list[list[int]]:
        """``[[first, last], ...]`` in ascending order, adjacent numbers merged."""
        runs: list[list[int]] = [[1, self._prefix]] if self._prefix else []
        for number in sorted(self._beyond):
            if runs and runs[-1][1] + 1 == number:
                runs[-1][1] = number
            else:
                runs.append([number, number])
        return runs

    @classmethod
    def from_runs(cls, runs: object, last: int) -> ChunkSet:
        """The set that ``runs()`` saved, keeping only well-formed runs within 1..``last``
        (a state file is input: anything else in it is ignored, not trusted)."""
        chunks = cls()
        if not isinstance(runs, list):
            return chunks
        for run in runs:
            if not (isinstance(run, list) and len(run) == 2):
                continue
            first, final = run
            if not (isinstance(first, int) and isinstance(final, int)):
                continue
            first, final = max(first, 1), min(final, last)
            if first > final:
                continue
            chunks.update(range(first, final + 1))
        return chunks
