"""The shared download pipeline (vmstore._download) under orderings and faults a real server
does not produce on demand.

The object is served from memory by ``MemoryObject``, a stand-in for a server: it can hold
back the first chunk (so every other chunk lands early and must wait for the hash frontier),
break a stream off half-way, or carry an S3 full-object checksum as another tool's upload
would. The end-to-end stream scenarios against rclone and nginx are in
tests/conformance/test_streams_download.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import re
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmstore import ChecksumMismatchError, DownloadRequest, OperationFailedError
from vmstore._download import (
    DownloadSettings,
    RemoteObject,
    S3Checksum,
    download_object,
)
from vmstore._retry import RetryableError, RetryPolicy

from tests.support import KiB, MiB, ProgressRecorder, random_bytes, sha256_bytes

URL = "s3://bucket/disk.img"


class MemoryObject:
    """An ObjectReader over bytes in memory that records which ranges were asked for."""

    def __init__(self, data: bytes, *, stall_first: float = 0.0, break_stream_at: int = 0):
        self.data = data
        self.stall_first = stall_first
        self.break_stream_at = break_stream_at
        self.lock = threading.Lock()
        self.requested: list[int] = []
        self.requested_during_stall: set[int] = set()
        self.stalling = False
        self.streams = 0

    def read_range(self, start: int, end: int) -> bytes:
        with self.lock:
            self.requested.append(start)
            if self.stalling:
                self.requested_during_stall.add(start)
        if start == 0 and self.stall_first:
            with self.lock:
                self.stalling = True
                self.requested_during_stall.add(0)
            threading.Event().wait(self.stall_first)
            with self.lock:
                self.stalling = False
        return self.data[start:end]

    def read_stream(self) -> Iterator[bytes]:
        self.streams += 1
        block = 64 * KiB
        for offset in range(0, len(self.data), block):
            if self.break_stream_at and self.streams == 1 and offset >= self.break_stream_at:
                raise RetryableError("connection reset by peer")
            yield self.data[offset : offset + block]


def settings(chunk_size: int = 256 * KiB, concurrency: int = 4) -> DownloadSettings:
    return DownloadSettings(
        chunk_size=chunk_size,
        concurrency=concurrency,
        retry=RetryPolicy(max_retries=2, base_delay=0.01),
        classify=lambda exc: None,
    )


def remote(data: bytes, **changes: object) -> RemoteObject:
    fields: dict[str, object] = {
        "url": URL,
        "size": len(data),
        "etag": '"v1"',
        "checksum": sha256_bytes(data),
    }
    fields.update(changes)
    return RemoteObject(**fields)  # type: ignore[arg-type]


def held_peak(caplog: pytest.LogCaptureFixture) -> int:
    for record in caplog.records:
        found = re.search(r"at most (\d+) bytes were held", record.getMessage())
        if found:
            return int(found.group(1))
    raise AssertionError("the pipeline did not log how much it held")


def test_chunks_behind_a_slow_first_chunk_wait_within_the_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 64 chunks; the first takes 0.5 s. Without a window the other workers would fetch all
    # 63 others meanwhile and hold them for the hash: 63 MiB for a 64 MiB object.
    data = random_bytes(64 * MiB, seed=1)
    source = MemoryObject(data, stall_first=0.5)
    caplog.set_level(logging.DEBUG, logger="vmstore.download")
    dest = tmp_path / "disk.img"

    response = download_object(
        remote(data),
        source,
        DownloadRequest(source_url=URL, destination_path=str(dest)),
        settings(chunk_size=MiB, concurrency=4),
    )

    window = 4 + 2
    assert response.checksum == sha256_bytes(data)
    assert dest.read_bytes() == data
    assert len(source.requested_during_stall) <= window, sorted(source.requested_during_stall)
    assert 0 < held_peak(caplog) <= (window - 1) * MiB
    assert sorted(source.requested) == list(range(0, len(data), MiB)), "each chunk once"


def test_a_stream_destination_gets_the_bytes_in_order_and_no_file_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = random_bytes(8 * MiB + 123, seed=2)
    sink = io.BytesIO()
    progress = ProgressRecorder()

    response = download_object(
        remote(data),
        MemoryObject(data, stall_first=0.2),
        DownloadRequest(source_url=URL, destination_stream=sink, progress_callback=progress),
        settings(),
    )

    assert sink.getvalue() == data
    assert response.destination_path is None
    assert (response.checksum, response.content_length) == (sha256_bytes(data), len(data))
    assert response.bytes_transferred == len(data) and response.resumed_from == 0
    assert progress.calls[-1] == (len(data), len(data))
    assert os.listdir(tmp_path) == [], "a stream download leaves no partial or state file"


def test_a_stream_from_a_server_without_ranges_restarts_without_repeating_bytes() -> None:
    data = random_bytes(3 * MiB, seed=3)
    source = MemoryObject(data, break_stream_at=MiB)
    sink = io.BytesIO()

    download_object(
        remote(data, supports_ranges=False),
        source,
        DownloadRequest(source_url=URL, destination_stream=sink),
        settings(),
    )

    assert source.streams == 2
    assert sink.getvalue() == data, "the restarted stream's first MiB must not be written twice"


def test_a_consumer_that_goes_away_stops_the_download() -> None:
    # A real pipe whose reader closes after 1 MiB: the next write() fails with EPIPE.
    data = random_bytes(16 * MiB, seed=4)
    source = MemoryObject(data)
    read_fd, write_fd = os.pipe()

    def consumer() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            pipe.read(MiB)

    reader = threading.Thread(target=consumer)
    reader.start()
    pipe = os.fdopen(write_fd, "wb")
    try:
        with pytest.raises(OperationFailedError) as raised:
            download_object(
                remote(data),
                source,
                DownloadRequest(source_url=URL, destination_stream=pipe),
                settings(),
            )
    finally:
        with contextlib.suppress(BrokenPipeError):  # whatever was still buffered
            pipe.close()
        reader.join()

    assert isinstance(raised.value.__cause__, BrokenPipeError)
    assert f"<stream fd {write_fd}>" in raised.value.message
    assert "stopped" in raised.value.message
    assert len(source.requested) < 64, "the transfer went on after the consumer left"


def test_a_stream_that_fails_verification_says_the_consumer_has_the_bytes() -> None:
    data = random_bytes(2 * MiB, seed=5)
    sink = io.BytesIO()

    with pytest.raises(ChecksumMismatchError, match="already received"):
        download_object(
            remote(data, checksum=sha256_bytes(b"something else")),
            MemoryObject(data),
            DownloadRequest(source_url=URL, destination_stream=sink),
            settings(),
        )

    assert sink.getvalue() == data


def test_a_backend_restart_error_after_bytes_went_out_becomes_the_public_error() -> None:
    # A backend restarts a download from zero on a private error of its own (the HTTP
    # backend's "changed on the server"); a stream that already got bytes cannot restart.
    class ChangedOnServer(OperationFailedError):
        pass

    data = random_bytes(4 * MiB, seed=6)

    class ChangesLater(MemoryObject):
        def read_range(self, start: int, end: int) -> bytes:
            if start >= 2 * MiB:
                threading.Event().wait(0.2)  # let the first chunks reach the consumer
                raise ChangedOnServer(f"{URL} changed during the download")
            return super().read_range(start, end)

    with pytest.raises(OperationFailedError, match="cannot start over") as raised:
        download_object(
            remote(data),
            ChangesLater(data),
            DownloadRequest(source_url=URL, destination_stream=io.BytesIO()),
            settings(concurrency=2),
        )

    assert type(raised.value) is OperationFailedError
    assert isinstance(raised.value.__cause__, ChangedOnServer)


def _crc64nvme(data: bytes) -> int:
    # Bitwise reference (reflected polynomial 0x9a6c9329ac4bc9b5, init and xorout all ones),
    # independent of the crate under test.
    crc = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x9A6C9329AC4BC9B5 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFFFFFFFFFF


def s3_value(algorithm: str, data: bytes) -> str:
    """The checksum as another tool's upload would leave it in x-amz-checksum-*."""
    if algorithm == "SHA256":
        raw = hashlib.sha256(data).digest()
    elif algorithm == "CRC32":
        raw = zlib.crc32(data).to_bytes(4, "big")
    elif algorithm == "CRC64NVME":
        raw = _crc64nvme(data).to_bytes(8, "big")
    else:
        raise AssertionError(algorithm)
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("algorithm", ["CRC64NVME", "CRC32", "SHA256"])
def test_an_object_without_a_sha256_is_verified_against_its_s3_checksum(
    tmp_path: Path, algorithm: str
) -> None:
    data = random_bytes(600 * KiB, seed=7)  # the bitwise CRC-64 reference is slow: keep small
    dest = tmp_path / "disk.img"

    response = download_object(
        remote(data, checksum=None, s3_checksum=S3Checksum(algorithm, s3_value(algorithm, data))),
        MemoryObject(data, stall_first=0.1),
        DownloadRequest(source_url=URL, destination_path=str(dest)),
        settings(chunk_size=64 * KiB),
    )

    assert dest.read_bytes() == data
    assert response.checksum == sha256_bytes(data)


@pytest.mark.parametrize("algorithm", ["CRC64NVME", "CRC32", "SHA256"])
def test_bytes_that_differ_from_the_s3_checksum_are_not_committed(
    tmp_path: Path, algorithm: str
) -> None:
    stored = random_bytes(300 * KiB, seed=8)
    in_transit = bytearray(stored)
    in_transit[150 * KiB] ^= 0x01  # one bit flipped on the way
    dest = tmp_path / "disk.img"
    dest.write_bytes(b"previous image")

    with pytest.raises(ChecksumMismatchError, match=algorithm):
        download_object(
            remote(
                stored,
                checksum=None,
                s3_checksum=S3Checksum(algorithm, s3_value(algorithm, stored)),
            ),
            MemoryObject(bytes(in_transit)),
            DownloadRequest(source_url=URL, destination_path=str(dest)),
            settings(chunk_size=64 * KiB),
        )

    assert dest.read_bytes() == b"previous image"
    assert os.listdir(tmp_path) == ["disk.img"], "no partial or state file is left"


def test_a_composite_s3_checksum_is_reported_as_unverifiable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = random_bytes(256 * KiB, seed=9)
    caplog.set_level(logging.WARNING, logger="vmstore.download")

    download_object(
        remote(data, checksum=None, s3_checksum=S3Checksum("CRC32C", "AAAAAA==-3")),
        MemoryObject(data),
        DownloadRequest(source_url=URL, destination_path=str(tmp_path / "d")),
        settings(),
    )

    assert "unverified" in caplog.text and "CRC32C" in caplog.text
