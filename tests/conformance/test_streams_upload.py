"""Uploads from a stream: what ``qemu-img convert ... /dev/stdout | vmstore upload - URL`` does.

A stream is read once, front to back, and can be neither rewound nor measured: the source here
is a real pipe fed by a thread (``os.pipe``), so a backend that tried to seek, stat or re-read
it would fail. Same scenarios, same assertions on every backend.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import pytest
from vmstore import InvalidConfigError, Storage, StorageError, UploadRequest

from tests.support import MiB, random_bytes, sha256_bytes

from .harness import BackendHarness


@contextmanager
def pipe_of(data: bytes) -> Iterator[BinaryIO]:
    """The read end of a pipe that a thread fills with ``data`` in uneven writes."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        view = memoryview(data)
        step = 100_003  # not a divisor of any part size: parts straddle the writes
        try:
            with open(write_fd, "wb", buffering=0) as writer:
                for start in range(0, len(view), step):
                    writer.write(view[start : start + step])
        except BrokenPipeError:
            pass  # the reader stopped early (a refused upload): nothing more to send

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    with open(read_fd, "rb") as reader:
        yield reader
    thread.join(timeout=30)


def stream_size(backend: BackendHarness) -> int:
    """Several of the backend's units, and not a multiple of any of them."""
    return 3 * backend.upload_unit + 12_345


def test_upload_from_a_pipe_of_unknown_size_round_trips(
    backend: BackendHarness, store: Storage
) -> None:
    data = random_bytes(stream_size(backend), seed=301)
    seen: list[tuple[int, int]] = []
    with pipe_of(data) as pipe:
        up = store.upload(
            UploadRequest(
                source_stream=pipe,
                destination_url=backend.url("streamed.img"),
                progress_callback=lambda done, total: seen.append((done, total)),
            )
        )
    assert up.checksum == sha256_bytes(data)
    assert up.size == up.bytes_transferred == len(data)
    assert backend.read_object("streamed.img") == data
    assert store.get_metadata(up.url).checksum == sha256_bytes(data)
    assert seen and seen[-1] == (len(data), len(data))
    assert backend.stored_names() == {"streamed.img"} | backend.companion_names("streamed.img")


def test_upload_from_a_stream_with_a_size_hint_round_trips(
    backend: BackendHarness, store: Storage
) -> None:
    data = random_bytes(stream_size(backend), seed=302)
    with pipe_of(data) as pipe:
        up = store.upload(
            UploadRequest(
                source_stream=pipe, size_hint=len(data), destination_url=backend.url("hinted.img")
            )
        )
    assert up.checksum == sha256_bytes(data)
    assert backend.read_object("hinted.img") == data


def test_upload_from_a_file_object_without_a_descriptor(
    backend: BackendHarness, store: Storage
) -> None:
    data = random_bytes(2 * backend.upload_unit + 7, seed=303)
    up = store.upload(
        UploadRequest(source_stream=io.BytesIO(data), destination_url=backend.url("bytesio.img"))
    )
    assert up.checksum == sha256_bytes(data)
    assert backend.read_object("bytesio.img") == data


def test_empty_stream_uploads_an_empty_object(backend: BackendHarness, store: Storage) -> None:
    up = store.upload(
        UploadRequest(source_stream=io.BytesIO(b""), destination_url=backend.url("empty.img"))
    )
    assert up.checksum == sha256_bytes(b"")
    assert backend.read_object("empty.img") == b""


@pytest.mark.parametrize("announced", ["short", "long"])
def test_stream_that_differs_from_its_size_hint_stores_nothing(
    backend: BackendHarness, store: Storage, announced: str
) -> None:
    data = random_bytes(stream_size(backend), seed=304)
    hint = len(data) - 1000 if announced == "short" else len(data) + 1000
    with pipe_of(data) as pipe, pytest.raises(StorageError) as raised:
        store.upload(
            UploadRequest(
                source_stream=pipe, size_hint=hint, destination_url=backend.url("liar.img")
            )
        )
    assert "size_hint" in str(raised.value) or "bytes" in str(raised.value)
    assert backend.read_object("liar.img") is None
    assert backend.stored_names() == set()


def test_size_hint_above_the_largest_object_is_refused_before_the_stream_is_read(
    backend: BackendHarness,
) -> None:
    untouched = io.BytesIO(b"x" * MiB)
    with pytest.raises(InvalidConfigError):
        UploadRequest(
            source_stream=untouched,
            size_hint=(5 << 40) + 1,
            destination_url=backend.url("huge.img"),
        )
    assert untouched.tell() == 0
