"""Failures are typed, and they leave the destination exactly as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmstore import (
    ChecksumMismatchError,
    DownloadRequest,
    ErrorType,
    NotFoundError,
    Storage,
    UploadRequest,
)

from tests.support import MiB, files_under, random_bytes, sha256_bytes, write_file

from .harness import BackendHarness, Capability


def test_download_of_a_missing_object_is_not_found_and_creates_nothing(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    dest = workdir / "back.img"

    with pytest.raises(NotFoundError) as caught:
        store.download(DownloadRequest(backend.url("no-such-disk.img"), str(dest)))

    assert caught.value.type is ErrorType.NOT_FOUND
    assert files_under(workdir) == set()


def test_upload_of_a_missing_source_file_is_not_found_and_stores_nothing(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    missing = workdir / "no-such-source.qcow2"

    with pytest.raises(NotFoundError) as caught:
        store.upload(UploadRequest(str(missing), backend.url("disk.qcow2")))

    assert str(missing) in str(caught.value), "the message should say which file is missing"
    assert backend.stored_names() == set()


def test_download_keeps_destination_when_checksum_differs(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(2 * MiB + 7, seed=41)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    previous = random_bytes(MiB // 2, seed=42)
    dest = write_file(workdir / "imported.img", previous)
    wrong = sha256_bytes(b"something else entirely")

    with pytest.raises(ChecksumMismatchError) as caught:
        store.download(DownloadRequest(up.url, str(dest), expected_checksum=wrong))

    assert caught.value.type is ErrorType.CHECKSUM_MISMATCH
    assert dest.read_bytes() == previous
    # No partial or state file survives a mismatch: those bytes are known bad.
    assert files_under(workdir) == {"disk.img", "imported.img"}


def test_download_with_wrong_expected_checksum_creates_no_destination(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(MiB, seed=43)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))

    with pytest.raises(ChecksumMismatchError):
        store.download(
            DownloadRequest(up.url, str(workdir / "new.img"), expected_checksum="f" * 64)
        )

    assert files_under(workdir) == {"disk.img"}


def test_download_detects_bytes_changed_in_the_store_after_upload(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.TAMPER)
    data = random_bytes(MiB + 100, seed=44)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    backend.tamper("d")
    previous = b"keep me"
    dest = write_file(workdir / "imported.img", previous)

    with pytest.raises(ChecksumMismatchError):
        store.download(DownloadRequest(up.url, str(dest), verify_checksum=True))

    assert dest.read_bytes() == previous
    assert files_under(workdir) == {"disk.img", "imported.img"}


def test_download_without_verification_of_changed_bytes_reports_their_checksum(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.TAMPER)
    data = random_bytes(MiB, seed=45)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    tampered = backend.tamper("d")

    down = store.download(DownloadRequest(up.url, str(workdir / "x.img"), verify_checksum=False))

    assert down.checksum == sha256_bytes(tampered) != sha256_bytes(data)
    assert (workdir / "x.img").read_bytes() == tampered
