"""A download into a stream (``DownloadRequest(destination_stream=...)``): the consumer gets the
bytes in order as they arrive, nothing is written beside it, and the bytes are verified at the
end, so a mismatch says that the consumer already has them.

Runs on every backend: S3 and HTTP through the shared download pipeline, NFS through its
own copy.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from pathlib import Path

import pytest
from vmstore import (
    ChecksumMismatchError,
    DownloadRequest,
    OperationFailedError,
    Storage,
    UploadRequest,
)

from tests.support import MiB, ProgressRecorder, files_under, random_bytes, sha256_bytes, write_file

from .harness import CHUNK, BackendHarness, Capability


def _upload(store: Storage, backend: BackendHarness, workdir: Path, data: bytes) -> str:
    source = write_file(workdir / "source" / "disk.img", data)
    up = store.upload(UploadRequest(source_path=str(source), destination_url=backend.url("d")))
    source.unlink()
    return up.url


def _state_files(state_dir: Path) -> set[str]:
    return files_under(state_dir) if state_dir.exists() else set()


@pytest.mark.parametrize("size", [0, 3 * MiB + 17], ids=["empty", "several-chunks"])
def test_a_download_into_a_stream_delivers_the_object_in_order_and_leaves_no_file(
    backend: BackendHarness,
    store: Storage,
    workdir: Path,
    private_state_dir: Path,
    size: int,
) -> None:
    data = random_bytes(size, seed=size + 70)
    url = _upload(store, backend, workdir, data)
    before = (files_under(workdir), _state_files(private_state_dir))
    sink = io.BytesIO()
    progress = ProgressRecorder()

    down = store.download(
        DownloadRequest(source_url=url, destination_stream=sink, progress_callback=progress)
    )

    assert sink.getvalue() == data
    assert down.destination_path is None
    assert down.checksum == sha256_bytes(data)
    assert (down.content_length, down.bytes_transferred, down.resumed_from) == (size, size, 0)
    assert progress.calls[-1] == (size, size)
    after = (files_under(workdir), _state_files(private_state_dir))
    assert after == before, "a stream download writes no partial and no resume state"


def test_a_stream_whose_bytes_differ_from_the_stored_checksum_is_reported_after_delivery(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.TAMPER)
    url = _upload(store, backend, workdir, random_bytes(2 * MiB + 5, seed=71))
    tampered = backend.tamper("d")
    sink = io.BytesIO()

    with pytest.raises(ChecksumMismatchError) as raised:
        store.download(DownloadRequest(source_url=url, destination_stream=sink))

    assert "already received" in raised.value.message
    assert sink.getvalue() == tampered, "the consumer was given the bytes as they came"


def test_a_consumer_that_goes_away_stops_the_download_with_an_error_naming_the_stream(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    # A real pipe: its reader takes one chunk and closes, as `head -c` or a dying
    # `qemu-img convert` would; the next write() fails with EPIPE.
    data = random_bytes(64 * CHUNK, seed=72)
    url = _upload(store, backend, workdir, data)
    read_fd, write_fd = os.pipe()

    def consumer() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            pipe.read(CHUNK)

    reader = threading.Thread(target=consumer)
    reader.start()
    pipe = os.fdopen(write_fd, "wb")
    try:
        with pytest.raises(OperationFailedError) as raised:
            store.download(DownloadRequest(source_url=url, destination_stream=pipe))
    finally:
        with contextlib.suppress(BrokenPipeError):
            pipe.close()
        reader.join()

    assert f"<stream fd {write_fd}>" in raised.value.message
    assert backend.read_object("d") == data, "the stored object is untouched"
