"""The native core as Python sees it (vmstore._native): hashing, extents, the writer, copy_file.

The Rust unit tests check the pieces from inside; these check the boundary: GIL-free calls
that return the right digests, raise vmstore's own errors and leave the files as promised.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import pytest
import vmstore._native as native
from vmstore import CancelledError, CancelToken, NotFoundError

from tests.support import (
    InterruptAt,
    Interrupted,
    KiB,
    MiB,
    ProgressRecorder,
    allocated_bytes,
    random_bytes,
    sha256_bytes,
    stays_as_sparse_as,
    write_file,
)


@pytest.fixture
def sparse_file(tmp_path: Path) -> Path:
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(random_bytes(MiB, seed=81))
        f.seek(10 * MiB)
        f.write(random_bytes(512 * KiB, seed=82))
    return path


def test_streaming_hasher_matches_hashlib_across_updates() -> None:
    pieces = [b"", b"a", random_bytes(100_000, seed=83), memoryview(b"tail")]
    hasher = native.Sha256()
    for piece in pieces:
        hasher.update(piece)

    assert hasher.hexdigest() == hashlib.sha256(b"".join(bytes(p) for p in pieces)).hexdigest()
    assert hasher.bytes_hashed == sum(len(p) for p in pieces)
    hasher.update(b"more")  # still usable after a digest
    assert (
        hasher.hexdigest()
        == hashlib.sha256(b"".join(bytes(p) for p in pieces) + b"more").hexdigest()
    )


def test_sha256_file_hashes_holes_as_zeros(sparse_file: Path) -> None:
    recorder = ProgressRecorder()

    digest = native.sha256_file(str(sparse_file), progress=recorder)

    assert digest == sha256_bytes(sparse_file.read_bytes())
    assert recorder.calls[-1] == (16 * MiB, 16 * MiB)


def test_sha256_file_of_a_cancelled_token_raises_cancelled(sparse_file: Path) -> None:
    token = CancelToken()
    token.cancel()

    with pytest.raises(CancelledError):
        native.sha256_file(str(sparse_file), cancel=token)


@pytest.mark.parametrize("size", [0, 1, 3 * MiB, 3 * MiB + 1])
def test_hash_parts_gives_the_whole_digest_and_one_digest_per_part(
    tmp_path: Path, size: int
) -> None:
    data = random_bytes(size, seed=84)
    path = write_file(tmp_path / "f", data)
    part = MiB

    whole, parts = native.hash_parts(str(path), part, threads=2)

    expected_parts = [sha256_bytes(data[i : i + part]) for i in range(0, size, part)] or [
        sha256_bytes(b"")
    ]
    assert whole == sha256_bytes(data)
    assert parts == expected_parts


def test_chunk_reader_reports_data_extents_and_reads_at_offsets(sparse_file: Path) -> None:
    data = sparse_file.read_bytes()
    with native.ChunkReader(str(sparse_file)) as reader:
        extents = reader.data_extents()
        assert reader.size == 16 * MiB
        assert reader.read(MiB - 10, 20) == data[MiB - 10 : MiB + 10]
        assert reader.read(16 * MiB - 5, 100) == data[-5:]  # clipped at end of file

    covered = bytearray(len(data))
    for offset, length in extents:
        covered[offset : offset + length] = data[offset : offset + length]
    assert bytes(covered) == data, "a data region lies outside the reported extents"
    assert sum(length for _o, length in extents) < 4 * MiB, "holes were reported as data"


def test_chunk_writer_commits_atomically_and_skips_zero_chunks(tmp_path: Path) -> None:
    final = write_file(tmp_path / "disk.img", b"old content")
    temp = tmp_path / "disk.img.tmp"
    chunk = random_bytes(MiB, seed=85)

    with native.ChunkWriter(str(final), str(temp)) as writer:
        writer.set_len(4 * MiB)
        writer.write_at(3 * MiB, chunk)  # out of order on purpose
        writer.write_at(0, chunk)
        writer.write_at(MiB, bytes(MiB))
        assert final.read_bytes() == b"old content"
        writer.commit()

    assert final.read_bytes() == chunk + bytes(2 * MiB) + chunk
    assert not temp.exists()
    assert allocated_bytes(final) <= 2 * MiB + 64 * KiB


def test_chunk_writer_without_commit_removes_its_temp_and_keeps_the_final(tmp_path: Path) -> None:
    final = write_file(tmp_path / "disk.img", b"old content")
    temp = tmp_path / "disk.img.tmp"

    with native.ChunkWriter(str(final), str(temp)) as writer:
        writer.write_at(0, b"new bytes that never land")

    assert final.read_bytes() == b"old content"
    assert not temp.exists()


def test_chunk_writer_refuses_a_temp_file_locked_by_another_writer(tmp_path: Path) -> None:
    temp = write_file(tmp_path / "disk.img.partial", b"theirs")

    with open(temp, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            native.ChunkWriter(str(tmp_path / "disk.img"), str(temp), resume=True)

    assert temp.read_bytes() == b"theirs"


def test_copy_file_copies_hashes_and_keeps_holes(sparse_file: Path, tmp_path: Path) -> None:
    final = tmp_path / "copy.raw"
    writer = native.ChunkWriter(str(final), str(tmp_path / "copy.raw.partial"))

    result = native.copy_file(str(sparse_file), writer, chunk_size=256 * KiB)
    writer.commit()

    assert result.sha256 == sha256_bytes(sparse_file.read_bytes())
    assert result.size == 16 * MiB
    assert result.resumed_from == 0
    assert result.holes_skipped >= 16 * MiB - 2 * MiB
    assert final.read_bytes() == sparse_file.read_bytes()
    assert stays_as_sparse_as(final, sparse_file)


def test_copy_file_resumes_from_a_kept_temp_file(tmp_path: Path) -> None:
    data = random_bytes(4 * MiB + 3, seed=86)
    source = write_file(tmp_path / "src", data)
    final, temp = tmp_path / "dst", tmp_path / "dst.partial"
    chunk = 256 * KiB

    first = native.ChunkWriter(str(final), str(temp), resume=True)
    with pytest.raises(Interrupted):
        native.copy_file(
            str(source), first, chunk_size=chunk, resume=True, progress=InterruptAt(2 * chunk)
        )
    first.abort(keep=True)
    assert temp.exists() and not final.exists()

    second = native.ChunkWriter(str(final), str(temp), resume=True)
    result = native.copy_file(str(source), second, chunk_size=chunk, resume=True)
    second.commit()

    assert 0 < result.resumed_from <= len(data)
    assert result.resumed_from % chunk == 0
    assert result.bytes_copied == len(data) - result.resumed_from
    assert result.sha256 == sha256_bytes(data)
    assert final.read_bytes() == data


def test_copy_file_of_a_missing_source_raises_not_found(tmp_path: Path) -> None:
    writer = native.ChunkWriter(str(tmp_path / "dst"), str(tmp_path / "dst.partial"))

    with pytest.raises(NotFoundError):
        native.copy_file(str(tmp_path / "missing"), writer)
    writer.abort()

    assert os.listdir(tmp_path) == []


def test_is_network_filesystem_says_no_for_a_local_directory(tmp_path: Path) -> None:
    is_nfs, fs_name = native.is_network_filesystem(str(tmp_path))

    assert is_nfs is False
    assert isinstance(fs_name, str) and fs_name
