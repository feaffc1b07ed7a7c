"""Nothing half-written is ever visible under the final name."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from vmstore import Storage, StorageError, UploadRequest

from tests.support import (
    InterruptAt,
    Interrupted,
    MiB,
    random_bytes,
    sha256_bytes,
    write_file,
)

from .harness import CHUNK, BackendHarness


def test_successful_upload_leaves_only_the_object_and_its_companions(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(3 * MiB, seed=61))

    store.upload(UploadRequest(str(source), backend.url("disk.img")))

    assert backend.stored_names() == {"disk.img"} | backend.companion_names("disk.img")


def test_interrupted_upload_leaves_nothing_under_the_final_name(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(3 * MiB, seed=62))

    with pytest.raises(Interrupted):
        store.upload(
            UploadRequest(
                str(source), backend.url("disk.img"), progress_callback=InterruptAt(CHUNK)
            )
        )

    assert backend.read_object("disk.img") is None
    assert "disk.img" not in backend.stored_names()
    assert not backend.companion_names("disk.img") & backend.stored_names()


def test_interrupted_overwrite_keeps_the_previous_object_intact(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    v1 = random_bytes(MiB + 1, seed=63)
    v2 = random_bytes(2 * MiB + 2, seed=64)
    url = backend.url("disk.img")
    store.upload(UploadRequest(str(write_file(workdir / "v1.img", v1)), url))

    with pytest.raises(Interrupted):
        store.upload(
            UploadRequest(
                str(write_file(workdir / "v2.img", v2)), url, progress_callback=InterruptAt(CHUNK)
            )
        )

    assert backend.read_object("disk.img") == v1
    md = store.get_metadata(url)
    assert (md.size, md.checksum) == (len(v1), sha256_bytes(v1))


def test_overwrite_is_atomic_for_a_concurrent_reader(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    """While v2 replaces v1, every read of the final name sees all of v1 or all of v2."""
    v1 = random_bytes(2 * MiB, seed=65)
    v2 = random_bytes(2 * MiB + CHUNK // 2, seed=66)
    allowed = {sha256_bytes(v1), sha256_bytes(v2)}
    url = backend.url("disk.img")
    store.upload(UploadRequest(str(write_file(workdir / "v1.img", v1)), url))
    source2 = write_file(workdir / "v2.img", v2)

    seen: list[str] = []
    done = threading.Event()

    def reader() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(seen) < 400:
            data = backend.read_object("disk.img")
            seen.append("missing" if data is None else sha256_bytes(data))
            if done.is_set():
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        store.upload(UploadRequest(str(source2), url))
    finally:
        done.set()
        thread.join()

    assert seen, "the reader never ran"
    assert set(seen) <= allowed, "a reader saw a missing or half-written object"
    assert backend.read_object("disk.img") == v2


def test_source_changed_during_upload_never_stores_bytes_that_disagree_with_the_checksum(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    """The source's tail is rewritten at the first progress report, while the upload runs.

    Whether the backend notices (a StorageError, nothing stored) or had already read those
    bytes (success), the stored object must hash to the checksum stored with it.
    """
    size = max(4 * MiB, 3 * backend.upload_unit) + 123
    source = write_file(workdir / "disk.img", random_bytes(size, seed=67))
    scribbled: list[int] = []

    def rewrite_tail(done: int, _total: int) -> None:
        if not scribbled:
            scribbled.append(done)
            with open(source, "r+b") as f:
                f.seek(size - 100)
                f.write(b"\xee" * 100)

    try:
        up = store.upload(
            UploadRequest(str(source), backend.url("disk.img"), progress_callback=rewrite_tail)
        )
    except StorageError:
        assert backend.read_object("disk.img") is None
        return
    stored = backend.read_object("disk.img")
    assert stored is not None
    assert sha256_bytes(stored) == up.checksum == store.get_metadata(up.url).checksum
