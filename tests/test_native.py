"""The native core as Python sees it (vmstore._native): hashing, extents, the writer, copy_file.

The Rust unit tests check the pieces from inside; these check the boundary: GIL-free calls
that return the right digests, raise vmstore's own errors and leave the files as promised.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import os
import random
import threading
import zlib
from pathlib import Path

import pytest
import vmstore._native as native
from vmstore import (
    CancelledError,
    CancelToken,
    InvalidConfigError,
    NotFoundError,
    OperationFailedError,
    StorageError,
)

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


def read_all_parts(source: native.UploadSource, part: int) -> list[native.SourcePart]:
    parts = []
    while (piece := source.next_part(part)) is not None:
        parts.append(piece)
    return parts


@pytest.mark.parametrize("size", [0, 1, 3 * MiB, 3 * MiB + 1])
def test_upload_source_hashes_each_part_and_the_whole_from_the_bytes_it_hands_out(
    tmp_path: Path, size: int
) -> None:
    data = random_bytes(size, seed=84)
    path = write_file(tmp_path / "f", data)

    source = native.UploadSource.file(str(path), part_sha256=True)
    parts = read_all_parts(source, MiB)

    assert [p.number for p in parts] == list(range(1, len(parts) + 1))
    assert b"".join(bytes(memoryview(p.data)) for p in parts if p.data is not None) == data
    for p in parts:
        assert p.sha256 == sha256_bytes(data[p.offset : p.end])
    assert source.sha256() == sha256_bytes(data)
    assert source.position == size and source.exhausted


def test_upload_source_reads_holes_as_zeros_and_the_file_only_once(sparse_file: Path) -> None:
    data = sparse_file.read_bytes()
    before = _read_chars()
    source = native.UploadSource.file(str(sparse_file))
    parts = read_all_parts(source, 3 * MiB)
    read = _read_chars() - before

    assert b"".join(bytes(memoryview(p.data)) for p in parts if p.data is not None) == data
    assert source.sha256() == sha256_bytes(data)
    # One pass, and holes are not read at all: far less than the file's 16 MiB.
    assert read <= 1.05 * len(data)
    assert read < 4 * MiB


def test_upload_source_part_without_its_bytes_still_counts_in_the_whole(tmp_path: Path) -> None:
    data = random_bytes(3 * MiB, seed=86)
    path = write_file(tmp_path / "f", data)
    kept = native.UploadSource.file(str(path))
    hashed_only = native.UploadSource.file(str(path))

    full = read_all_parts(kept, MiB)
    first = hashed_only.next_part(MiB, keep=False)
    rest = read_all_parts(hashed_only, MiB)

    assert first is not None and first.data is None
    assert first.crc64nvme == full[0].crc64nvme
    assert [p.crc64nvme for p in rest] == [p.crc64nvme for p in full[1:]]
    assert hashed_only.sha256() == kept.sha256() == sha256_bytes(data)
    assert hashed_only.crc64nvme() == kept.crc64nvme()


def test_upload_source_reads_a_pipe_and_an_object_without_readinto_alike(tmp_path: Path) -> None:
    data = random_bytes(2 * MiB + 5, seed=87)
    read_fd, write_fd = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_fd, data), os.close(write_fd)))
    writer.start()

    class ReadOnly:
        def __init__(self, payload: bytes) -> None:
            self._stream = io.BytesIO(payload)

        def read(self, size: int = -1) -> bytes:
            return self._stream.read(min(size, 70_000))  # short reads, as a socket gives

    with open(read_fd, "rb") as pipe:
        from_pipe = native.UploadSource.stream(pipe)
        pipe_parts = read_all_parts(from_pipe, MiB)
    writer.join()
    from_reader = native.UploadSource.stream(ReadOnly(data))
    reader_parts = read_all_parts(from_reader, MiB)

    for parts in (pipe_parts, reader_parts):
        assert [p.length for p in parts] == [MiB, MiB, 5]
        assert b"".join(bytes(p.data) for p in parts if p.data is not None) == data
    assert from_pipe.sha256() == from_reader.sha256() == sha256_bytes(data)
    assert from_pipe.size is None


def test_upload_source_of_a_file_that_shrinks_while_read_is_an_error(tmp_path: Path) -> None:
    path = write_file(tmp_path / "f", random_bytes(2 * MiB, seed=88))
    source = native.UploadSource.file(str(path))
    assert source.next_part(MiB) is not None
    os.truncate(path, MiB + 10)
    with pytest.raises(StorageError, match="shrank"):
        source.next_part(MiB)


def _read_chars() -> int:
    with open("/proc/self/io") as handle:
        fields = dict(line.split(": ") for line in handle.read().splitlines())
    return int(fields["rchar"])


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


def test_chunk_writer_hashes_early_chunks_from_memory_not_from_the_file(tmp_path: Path) -> None:
    # Chunks 2 and 1 land before chunk 0. Their bytes on disk are then garbled behind the
    # writer's back: the digest is still that of what was written, so nothing was read back.
    data = random_bytes(3 * MiB, seed=87)
    temp = tmp_path / "disk.img.partial"
    with native.ChunkWriter(str(tmp_path / "disk.img"), str(temp), hash=True) as writer:
        writer.write_at(2 * MiB, data[2 * MiB :])  # bytes: held by reference
        mutable = bytearray(data[MiB : 2 * MiB])
        writer.write_at(MiB, mutable)  # held as a copy: the caller may change it
        mutable[:] = bytes(MiB)
        assert (writer.hashed_length, writer.held_bytes) == (0, 2 * MiB)
        with open(temp, "r+b") as behind_its_back:
            behind_its_back.seek(MiB)
            behind_its_back.write(bytes(2 * MiB))

        writer.write_at(0, memoryview(data)[:MiB])

        assert writer.hashed_length == 3 * MiB
        assert (writer.held_bytes, writer.held_bytes_peak) == (0, 2 * MiB)
        assert writer.hexdigest(3 * MiB) == sha256_bytes(data)


def test_a_given_up_buffer_is_held_by_reference_and_cannot_be_resized(tmp_path: Path) -> None:
    data = random_bytes(2 * MiB, seed=94)
    early = bytearray(data[MiB:])
    with native.ChunkWriter(str(tmp_path / "d"), str(tmp_path / "p"), hash=True) as writer:
        writer.write_at(MiB, early, owned=True)
        with pytest.raises(BufferError):  # exported to the writer until hashed
            early.extend(b"x")
        writer.write_at(0, bytearray(data[:MiB]), owned=True)

        assert writer.hexdigest(2 * MiB) == sha256_bytes(data)
    early.extend(b"x")  # released once hashed


def test_chunk_writer_hashes_in_order_while_threads_write_in_any_order(tmp_path: Path) -> None:
    chunk = 256 * KiB
    data = random_bytes(40 * chunk + 1000, seed=88)
    offsets = list(range(0, len(data), chunk))
    random.Random(89).shuffle(offsets)
    writer = native.ChunkWriter(
        str(tmp_path / "d"), str(tmp_path / "d.partial"), hash=True, crc=["CRC32"]
    )

    def write(mine: list[int]) -> None:
        for offset in mine:
            writer.write_at(offset, data[offset : offset + chunk])

    threads = [threading.Thread(target=write, args=(offsets[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert writer.hexdigest(len(data)) == sha256_bytes(data)
    assert writer.crc_values(len(data)) == {"CRC32": zlib.crc32(data)}
    writer.commit()
    assert (tmp_path / "d").read_bytes() == data


def test_chunk_writer_computes_the_s3_full_object_crcs_on_request(tmp_path: Path) -> None:
    # The catalogue's check values for b"123456789" (CRC-64/NVME, CRC-32C, CRC-32).
    with native.ChunkWriter(
        str(tmp_path / "d"), str(tmp_path / "p"), crc=("CRC64NVME", "crc32c", "CRC32")
    ) as writer:
        writer.write_at(4, b"56789")
        writer.write_at(0, b"1234")
        crcs = writer.crc_values(9)

    assert crcs == {"CRC64NVME": 0xAE8B14860A799888, "CRC32C": 0xE3069283, "CRC32": 0xCBF43926}
    assert base64.b64encode(crcs["CRC32"].to_bytes(4, "big")).decode() == "y/Q5Jg=="
    with pytest.raises(InvalidConfigError, match="CRC64NVME"):
        native.ChunkWriter(str(tmp_path / "d"), str(tmp_path / "p"), crc=["SHA1"])


def test_chunk_writer_rehashes_a_resumed_prefix_from_disk_among_fresh_chunks(
    tmp_path: Path,
) -> None:
    data = random_bytes(6 * MiB, seed=90)
    temp = write_file(tmp_path / "d.partial", data[: 4 * MiB])  # chunks 0, 1, 3 landed before
    writer = native.ChunkWriter(str(tmp_path / "d"), str(temp), resume=True, hash=True)
    writer.write_at(5 * MiB, data[5 * MiB :])
    writer.mark_done(0, 2 * MiB)
    writer.mark_done(3 * MiB, MiB)
    writer.write_at(4 * MiB, data[4 * MiB : 5 * MiB])
    writer.write_at(2 * MiB, data[2 * MiB : 3 * MiB])

    assert writer.hexdigest(6 * MiB) == sha256_bytes(data)
    writer.commit()
    assert (tmp_path / "d").read_bytes() == data


def test_a_read_back_failure_is_an_io_error_not_a_config_error(tmp_path: Path) -> None:
    # A FIFO as the "partial": it opens and locks like a file, but reading it back at an
    # offset fails (ESPIPE), a real I/O error of the read-back path.
    temp = tmp_path / "d.partial"
    os.mkfifo(temp)
    writer = native.ChunkWriter(str(tmp_path / "d"), str(temp), resume=True, hash=True)
    writer.mark_done(0, 4096)

    with pytest.raises(OperationFailedError, match="reading back") as raised:
        writer.hexdigest(4096)

    assert not isinstance(raised.value, InvalidConfigError)
    with pytest.raises(OperationFailedError):
        writer.write_at(4096, b"later writes stop too")
    writer.abort()


def test_a_stream_writer_hands_bytes_to_its_sink_in_order(tmp_path: Path) -> None:
    received: list[bytes] = []
    data = random_bytes(3 * MiB, seed=91)
    writer = native.ChunkWriter.for_stream(lambda piece: received.append(bytes(piece)))

    writer.write_at(2 * MiB, data[2 * MiB :])
    writer.write_at(MiB, data[MiB : 2 * MiB])
    assert received == [], "nothing may go out before byte 0 has"
    writer.write_at(0, data[:MiB])

    assert b"".join(received) == data
    assert [len(piece) for piece in received] == [MiB] * 3
    assert writer.hexdigest(3 * MiB) == sha256_bytes(data)
    assert writer.is_stream and writer.final_path == ""
    writer.commit()
    assert os.listdir(tmp_path) == []


def test_an_aborted_writer_lets_go_of_its_lock_while_still_referenced(tmp_path: Path) -> None:
    # A failed download's traceback keeps its writer alive; a retry in the except block must
    # be able to take the partial over at once, not after the garbage collector runs.
    final, temp = str(tmp_path / "disk.img"), str(tmp_path / "disk.img.partial")
    writer = native.ChunkWriter(final, temp, hash=True)  # as the download pipeline opens it
    writer.write_at(0, random_bytes(MiB, seed=94))
    writer.abort(keep=True)

    retry = native.ChunkWriter(final, temp, resume=True)  # BlockingIOError while it leaked
    assert retry.existing_length == MiB
    retry.abort()
    assert writer is not None


def test_a_stream_writer_stops_when_its_sink_raises() -> None:
    def consumer_gone(piece: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    writer = native.ChunkWriter.for_stream(consumer_gone)
    writer.write_at(MiB, random_bytes(MiB, seed=92))

    with pytest.raises(BrokenPipeError):  # the sink's own exception, from the write that met it
        writer.write_at(0, random_bytes(MiB, seed=93))

    assert writer.held_bytes == 0, "held chunks are let go"
    # Every later call, from whichever thread, raises that same exception: which worker
    # met the failure first must not change what the caller sees (it did, under load).
    with pytest.raises(BrokenPipeError) as later:
        writer.write_at(2 * MiB, b"more")
    assert later.value.errno == 32
    with pytest.raises(BrokenPipeError):
        writer.hexdigest(3 * MiB)


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
