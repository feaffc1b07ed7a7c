"""Bytes that leave come back identical, whatever the size relative to the chunk size."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from vmstore import DownloadRequest, DownloadResponse, Storage, UploadRequest, UploadResponse

from tests.support import MiB, random_bytes, sha256_bytes, sha256_path, write_file

from .harness import CHUNK, BackendHarness

HEX64 = re.compile(r"^[0-9a-f]{64}$")

SHAPES = {
    # name: size as a function of the backend's upload unit (NFS chunk, S3 part)
    "empty": lambda unit: 0,
    "one-byte": lambda unit: 1,
    "unit-plus-one": lambda unit: unit + 1,
    "exactly-two-units": lambda unit: 2 * unit,
    "several-units-unaligned": lambda unit: max(3 * MiB, 3 * unit) + 17,
}


@pytest.mark.parametrize("shape", SHAPES)
def test_upload_then_download_returns_identical_bytes(
    backend: BackendHarness, store: Storage, workdir: Path, shape: str
) -> None:
    size = SHAPES[shape](backend.upload_unit)
    data = random_bytes(size, seed=size)
    source = write_file(workdir / "disk.img", data)
    expected = sha256_bytes(data)

    up = store.upload(
        UploadRequest(source_path=str(source), destination_url=backend.url("disk.img"))
    )

    assert isinstance(up, UploadResponse)
    assert up.checksum == expected
    assert up.size == size
    assert up.bytes_transferred == size
    assert up.resumed_from == 0
    assert backend.read_object("disk.img") == data

    dest = workdir / "imported.img"
    down = store.download(DownloadRequest(source_url=up.url, destination_path=str(dest)))

    assert isinstance(down, DownloadResponse)
    assert dest.read_bytes() == data
    assert down.checksum == expected
    assert down.content_length == size
    assert down.bytes_transferred == size
    assert down.resumed_from == 0
    assert Path(down.destination_path) == dest


def test_checksums_are_sha256_of_the_bytes_as_64_lowercase_hex(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(2 * MiB + 5, seed=7)
    source = write_file(workdir / "disk.img", data)

    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))
    down = store.download(DownloadRequest(up.url, str(workdir / "back.img")))
    md = store.get_metadata(up.url)

    assert HEX64.match(up.checksum)
    assert up.checksum == down.checksum == md.checksum == sha256_path(source)


def test_upload_into_nested_key_round_trips(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(CHUNK * 2 + 3, seed=11)
    source = write_file(workdir / "disk.qcow2", data)
    key = "vm-exports/test-vm-01/disk.qcow2"

    up = store.upload(UploadRequest(str(source), backend.url(key)))
    down = store.download(DownloadRequest(up.url, str(workdir / "imported.qcow2")))

    assert backend.read_object(key) == data
    assert (workdir / "imported.qcow2").read_bytes() == data
    assert down.checksum == sha256_bytes(data)


def test_download_with_the_right_expected_checksum_succeeds(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(MiB + 1, seed=3)
    source = write_file(workdir / "disk.img", data)
    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))

    down = store.download(
        DownloadRequest(up.url, str(workdir / "back.img"), expected_checksum=sha256_bytes(data))
    )

    assert down.checksum == sha256_bytes(data)
    assert (workdir / "back.img").read_bytes() == data


def test_download_replaces_an_existing_destination_file(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(MiB, seed=4)
    source = write_file(workdir / "disk.img", data)
    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))
    dest = write_file(workdir / "imported.img", b"an older, longer import that must vanish" * 9999)

    store.download(DownloadRequest(up.url, str(dest)))

    assert dest.read_bytes() == data


def test_reupload_of_the_same_key_replaces_the_object(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    first = random_bytes(MiB + 9, seed=5)
    second = random_bytes(CHUNK - 1, seed=6)
    url = backend.url("disk.img")

    store.upload(UploadRequest(str(write_file(workdir / "v1.img", first)), url))
    up = store.upload(UploadRequest(str(write_file(workdir / "v2.img", second)), url))

    assert backend.read_object("disk.img") == second
    assert store.get_metadata(up.url).checksum == sha256_bytes(second)
    assert store.get_metadata(up.url).size == len(second)


def test_download_with_verification_off_reports_the_checksum_of_what_arrived(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(MiB, seed=8)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))

    down = store.download(DownloadRequest(up.url, str(workdir / "back.img"), verify_checksum=False))

    assert down.checksum == sha256_bytes(data)
    assert (workdir / "back.img").read_bytes() == data
