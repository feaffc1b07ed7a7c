"""Helpers shared by the test modules: test data, digests, progress recorders, file listings.

Nothing here fakes vmstore: these are the tools a test uses to make real files and to look at
what a transfer left behind.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def random_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes: no all-zero chunk, so nothing is taken for a hole."""
    return random.Random(seed).randbytes(size)


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def files_under(root: Path) -> set[str]:
    """Every file and symlink under root (directories themselves not), relative, POSIX style."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        # os.walk does not descend into symlinked directories but lists them as directories.
        links = [name for name in dirnames if Path(dirpath, name).is_symlink()]
        for name in [*filenames, *links]:
            found.add(Path(dirpath, name).relative_to(root).as_posix())
    return found


def allocated_bytes(path: Path) -> int:
    """Bytes of disk the file really occupies (st_blocks counts 512-byte units)."""
    return os.stat(path).st_blocks * 512


EXTENT_METADATA_SLACK = 64 * KiB
"""What a file system may add for bookkeeping alone: ext4 counts an extent-tree block in
st_blocks once a file has more than four extents, which chunks written by parallel threads
can produce. A copy that filled a hole would exceed this by at least a chunk."""


def stays_as_sparse_as(copy: Path, source: Path) -> bool:
    """The copy occupies no more disk than the source, give or take file-system bookkeeping."""
    return allocated_bytes(copy) <= allocated_bytes(source) + EXTENT_METADATA_SLACK


class Interrupted(Exception):
    """Raised by a progress callback to break a transfer off the way a caller would."""


@dataclass
class ProgressRecorder:
    """A progress callback that remembers every call, when and on which thread it came."""

    calls: list[tuple[int, int]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)

    def __call__(self, transferred: int, total: int) -> None:
        self.calls.append((transferred, total))
        self.times.append(time.monotonic())
        self.threads.add(threading.get_ident())


@dataclass
class InterruptAt:
    """A progress callback that raises Interrupted once at least ``after`` bytes are done.

    The core reports progress at most every 100 ms, so on a fast local copy the first call
    may well be the final ``(total, total)`` one; raising there must still prevent the commit.
    """

    after: int
    seen: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, transferred: int, total: int) -> None:
        self.seen.append((transferred, total))
        if transferred >= min(self.after, total):
            raise Interrupted(f"interrupted by the test at {transferred} of {total} bytes")


def is_non_decreasing(values: Iterable[int]) -> bool:
    items = list(values)
    return all(a <= b for a, b in itertools.pairwise(items))
