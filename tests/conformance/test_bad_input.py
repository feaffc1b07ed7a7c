"""Bad local paths and bad metadata get the same error type on every backend (and so the same
CLI exit status): a directory or FIFO as the source, a directory or FIFO as the destination,
control characters in metadata. Nothing blocks, nothing is stored, nothing is created.

The checks live once, in ``vmstore/_localpath.py`` and ``normalize_custom_metadata``; a
backend passes these scenarios by calling them before it opens anything.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from vmstore import DownloadRequest, InvalidConfigError, Storage, UploadRequest

from tests.support import KiB, files_under, random_bytes, write_file

from .harness import BackendHarness


def outcome_within(call: Callable[[], object], fifo: Path | None, seconds: float = 15.0) -> object:
    """call()'s exception (or None), failing the test if it blocks for ``seconds``; a call
    blocked in open() of ``fifo`` is released by opening the FIFO's other end."""
    result: list[object] = []

    def run() -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - handed to the test, which asserts on it
            result.append(exc)
        else:
            result.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, flags))
        thread.join(seconds)
        pytest.fail(f"blocked for {seconds}s")
    return result[0]


def test_upload_of_a_directory_is_invalid_config(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    (workdir / "disk-dir").mkdir()

    with pytest.raises(InvalidConfigError) as caught:
        store.upload(UploadRequest(str(workdir / "disk-dir"), backend.url("disk.img")))

    assert "directory" in str(caught.value)
    assert backend.stored_names() == set()


def test_upload_of_a_fifo_is_invalid_config_without_blocking(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    fifo = workdir / "disk.fifo"
    os.mkfifo(fifo)

    error = outcome_within(
        lambda: store.upload(UploadRequest(str(fifo), backend.url("disk.img"))), fifo
    )

    assert isinstance(error, InvalidConfigError), repr(error)
    assert backend.stored_names() == set()


def test_download_to_a_directory_is_invalid_config_and_leaves_it_alone(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(64 * KiB, seed=61))
    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))
    target = workdir / "existing-dir"
    target.mkdir()

    with pytest.raises(InvalidConfigError):
        store.download(DownloadRequest(up.url, str(target)))

    assert target.is_dir()
    assert files_under(workdir) == {"disk.img"}


def test_download_to_an_existing_fifo_is_invalid_config_without_blocking(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(64 * KiB, seed=62))
    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))
    fifo = workdir / "out.fifo"
    os.mkfifo(fifo)

    error = outcome_within(lambda: store.download(DownloadRequest(up.url, str(fifo))), fifo)

    assert isinstance(error, InvalidConfigError), repr(error)
    assert files_under(workdir) == {"disk.img", "out.fifo"}


@pytest.mark.parametrize(
    "metadata", [{"vm-name": "x\r\nx-amz-acl: public-read"}, {"bad\nkey": "v"}]
)
def test_control_characters_in_metadata_are_invalid_config_and_store_nothing(
    backend: BackendHarness, store: Storage, workdir: Path, metadata: dict[str, str]
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(4 * KiB, seed=63))

    error = outcome_within(
        lambda: store.upload(
            UploadRequest(str(source), backend.url("disk.img"), metadata=metadata)
        ),
        None,
    )

    assert isinstance(error, InvalidConfigError), repr(error)
    assert backend.stored_names() == set()
