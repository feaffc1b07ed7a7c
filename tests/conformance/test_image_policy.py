"""The image policy on every backend: an image whose header names a backing file is refused on
upload before any byte is stored, and never committed by a download, unless the request says
``allow_backing_file=True``; the format and virtual size read from the header at upload come
back from ``get_metadata``.

The images are made by qemu-img, as an exporter would make them.
"""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
from pathlib import Path

import pytest
from vmstore import (
    DownloadRequest,
    ErrorType,
    InvalidConfigError,
    Storage,
    UploadRequest,
)

from tests.support import MiB, files_under, random_bytes, sha256_bytes, write_file

from .harness import BackendHarness

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img not installed (Debian package qemu-utils)"
)


def qemu_img(*args: str | Path) -> None:
    result = subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """base.raw, child.qcow2 (backing file base.raw), plain.qcow2, big.qcow2 (6 MiB of data:
    a multipart upload on S3, a streamed body on HTTP)."""
    where = tmp_path / "images"
    where.mkdir()
    qemu_img("create", "-q", "-f", "raw", where / "base.raw", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", where / "child.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", where / "plain.qcow2", "64M")
    write_file(where / "data.raw", random_bytes(6 * MiB, seed=91))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", where / "data.raw", where / "big.qcow2")
    return where


def test_an_upload_of_an_image_naming_a_backing_file_is_refused_before_anything_is_stored(
    backend: BackendHarness, store: Storage, images: Path
) -> None:
    child = images / "child.qcow2"
    with pytest.raises(InvalidConfigError) as from_file:
        store.upload(UploadRequest(str(child), backend.url("child.qcow2")))
    with child.open("rb") as stream, pytest.raises(InvalidConfigError) as from_stream:
        store.upload(UploadRequest(source_stream=stream, destination_url=backend.url("s.qcow2")))

    for refused in (from_file.value, from_stream.value):
        assert refused.type is ErrorType.INVALID_CONFIG
        assert "base.raw" in refused.message
        assert "allow_backing_file=True" in refused.message
        assert "qemu-img convert" in refused.message
    assert backend.stored_names() == set()


def test_a_download_never_commits_an_image_naming_a_backing_file_unless_allowed(
    backend: BackendHarness, store: Storage, images: Path, workdir: Path
) -> None:
    child = images / "child.qcow2"
    up = store.upload(
        UploadRequest(str(child), backend.url("child.qcow2"), allow_backing_file=True)
    )
    assert backend.read_object("child.qcow2") == child.read_bytes()
    destination = workdir / "dl" / "child.qcow2"

    with pytest.raises(InvalidConfigError) as refused:
        store.download(DownloadRequest(up.url, str(destination)))
    sink = io.BytesIO()
    with pytest.raises(InvalidConfigError) as refused_stream:
        store.download(DownloadRequest(up.url, destination_stream=sink))

    assert "base.raw" in refused.value.message
    assert "base.raw" in refused_stream.value.message
    assert not destination.exists()
    # The verified partial was removed too: a refusal is final, not something to resume.
    assert files_under(workdir) == set()
    assert sink.getvalue() == b""

    allowed = store.download(DownloadRequest(up.url, str(destination), allow_backing_file=True))
    assert allowed.checksum == sha256_bytes(child.read_bytes())
    assert destination.read_bytes() == child.read_bytes()
    streamed = io.BytesIO()
    store.download(DownloadRequest(up.url, destination_stream=streamed, allow_backing_file=True))
    assert streamed.getvalue() == child.read_bytes()


@pytest.mark.parametrize("name", ["plain.qcow2", "big.qcow2", "data.raw"])
@pytest.mark.parametrize("source", ["file", "stream"])
def test_get_metadata_reports_the_format_and_virtual_size_recorded_at_upload(
    backend: BackendHarness, store: Storage, images: Path, workdir: Path, name: str, source: str
) -> None:
    path = images / name
    expected = {"plain.qcow2": ("qcow2", 64 * MiB), "big.qcow2": ("qcow2", 6 * MiB),
                "data.raw": ("raw", 6 * MiB)}[name]  # fmt: skip
    if source == "file":
        up = store.upload(UploadRequest(str(path), backend.url(name), metadata={"k": "v"}))
    else:
        with path.open("rb") as stream:
            up = store.upload(
                UploadRequest(source_stream=stream, destination_url=backend.url(name),
                              metadata={"k": "v"})
            )  # fmt: skip

    md = store.get_metadata(up.url)

    assert (md.image_format, md.virtual_size) == expected
    assert md.custom_metadata == {"k": "v"}  # the record's keys are not the caller's metadata
    assert md.checksum == sha256_bytes(path.read_bytes())
    # And the record does not get in a download's way.
    down = store.download(DownloadRequest(up.url, str(workdir / name)))
    assert down.checksum == md.checksum


def test_a_compressed_copy_records_its_wrapper_as_the_format(
    backend: BackendHarness, store: Storage, images: Path
) -> None:
    gz = write_file(images / "plain.qcow2.gz", gzip.compress((images / "plain.qcow2").read_bytes()))
    up = store.upload(UploadRequest(str(gz), backend.url("plain.qcow2.gz")))
    md = store.get_metadata(up.url)
    assert (md.image_format, md.virtual_size) == ("gzip", 64 * MiB)
    # The policy looks inside the wrapper too.
    child_gz = write_file(
        images / "child.qcow2.gz", gzip.compress((images / "child.qcow2").read_bytes())
    )
    with pytest.raises(InvalidConfigError, match="gzip wrapper"):
        store.upload(UploadRequest(str(child_gz), backend.url("child.qcow2.gz")))


def test_the_image_record_keys_are_reserved_in_metadata(
    backend: BackendHarness, store: Storage, images: Path
) -> None:
    for key in ("vmstore-image-format", "VMSTORE-VIRTUAL-SIZE"):
        with pytest.raises(InvalidConfigError, match="reserved"):
            store.upload(
                UploadRequest(str(images / "plain.qcow2"), backend.url("x"), metadata={key: "1"})
            )
    assert backend.stored_names() == set()
