"""A failure costs only the unfinished part: interrupted transfers resume, never truncate.

Sizes and offsets are in the backend's own transfer units (a 256 KiB chunk on NFS, a 5 MiB
part for an S3 upload), so every backend sees an object of several units.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from vmstore import DownloadRequest, Storage, UploadRequest

from tests.support import (
    InterruptAt,
    Interrupted,
    MiB,
    files_under,
    random_bytes,
    sha256_bytes,
    write_file,
)

from .harness import BackendHarness, Capability, kill_mid_transfer


def upload_size(backend: BackendHarness) -> int:
    """Several upload units, the last one short."""
    return max(4 * MiB, 3 * backend.upload_unit) + 123


def download_size(backend: BackendHarness) -> int:
    return max(4 * MiB, 3 * backend.download_unit) + 123


def interrupt_upload(
    backend: BackendHarness, store: Storage, source: Path, url: str, *, resume: bool = True
) -> None:
    with pytest.raises(Interrupted):
        store.upload(
            UploadRequest(
                str(source),
                url,
                progress_callback=InterruptAt(backend.upload_unit),
                resume=resume,
            )
        )


def interrupt_download(
    backend: BackendHarness, store: Storage, url: str, dest: Path, *, resume: bool = True
) -> None:
    with pytest.raises(Interrupted):
        store.download(
            DownloadRequest(
                url,
                str(dest),
                progress_callback=InterruptAt(2 * backend.download_unit),
                resume=resume,
            )
        )


def reuses_whole_units(resumed_from: int, unit: int, size: int) -> bool:
    """Whole units are reused, never a torn one: a prefix (NFS, downloads) or any set of
    finished S3 parts, the last of which may be short."""
    return resumed_from % unit in {0, size % unit}


def assert_resumed_upload(
    backend: BackendHarness, store: Storage, source: Path, key: str, data: bytes
) -> None:
    up = store.upload(UploadRequest(str(source), backend.url(key)))

    assert 0 < up.resumed_from <= len(data)
    assert reuses_whole_units(up.resumed_from, backend.upload_unit, len(data))
    assert up.bytes_transferred == len(data) - up.resumed_from
    assert up.checksum == sha256_bytes(data)
    assert backend.read_object(key) == data
    assert store.get_metadata(up.url).checksum == sha256_bytes(data)
    assert backend.stored_names() == {key} | backend.companion_names(key)


def assert_resumed_download(
    backend: BackendHarness, store: Storage, url: str, dest: Path, data: bytes
) -> None:
    down = store.download(DownloadRequest(url, str(dest)))

    assert 0 < down.resumed_from <= len(data)
    assert reuses_whole_units(down.resumed_from, backend.download_unit, len(data))
    assert down.bytes_transferred == len(data) - down.resumed_from
    assert down.checksum == sha256_bytes(data)
    assert dest.read_bytes() == data
    # The partial and its state file are gone once the file is in place.
    assert files_under(dest.parent) == {"disk.img", dest.name}


def test_upload_resumes_after_an_interrupted_attempt(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.UPLOAD_RESUME)
    data = random_bytes(upload_size(backend), seed=51)
    source = write_file(workdir / "disk.img", data)

    interrupt_upload(backend, store, source, backend.url("disk.img"))
    assert backend.read_object("disk.img") is None

    assert_resumed_upload(backend, store, source, "disk.img", data)


def test_download_resumes_after_an_interrupted_attempt(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.DOWNLOAD_RESUME)
    data = random_bytes(download_size(backend), seed=52)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    dest = workdir / "imported.img"

    interrupt_download(backend, store, up.url, dest)
    assert not dest.exists()
    assert (workdir / "imported.img.vmstore-partial").exists()

    assert_resumed_download(backend, store, up.url, dest, data)


def test_upload_resumes_after_the_uploading_process_is_killed(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.UPLOAD_RESUME)
    data = random_bytes(upload_size(backend), seed=53)
    source = write_file(workdir / "disk.img", data)

    kill_mid_transfer(backend, "upload", str(source), backend.url("disk.img"))
    assert backend.read_object("disk.img") is None

    assert_resumed_upload(backend, store, source, "disk.img", data)


def test_download_resumes_after_the_downloading_process_is_killed(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.DOWNLOAD_RESUME)
    data = random_bytes(download_size(backend), seed=54)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    dest = workdir / "imported.img"

    kill_mid_transfer(backend, "download", up.url, str(dest))
    assert not dest.exists()

    assert_resumed_download(backend, store, up.url, dest, data)


def test_resumed_upload_starts_over_when_the_source_changed_meanwhile(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.UPLOAD_RESUME)
    source = write_file(workdir / "disk.img", random_bytes(upload_size(backend), seed=55))
    interrupt_upload(backend, store, source, backend.url("disk.img"))
    changed = bytearray(source.read_bytes())
    changed[0] ^= 0x01  # same size, first unit differs: nothing stored so far is reusable
    source.write_bytes(changed)

    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))

    assert up.resumed_from == 0
    assert up.checksum == sha256_bytes(bytes(changed))
    assert backend.read_object("disk.img") == changed


def test_resumed_download_gets_the_new_object_when_it_was_replaced_meanwhile(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    old = random_bytes(download_size(backend), seed=56)
    new = bytearray(old)
    new[0] ^= 0x01
    new[-1] ^= 0x01
    source = write_file(workdir / "disk.img", old)
    up = store.upload(UploadRequest(str(source), backend.url("d")))
    dest = workdir / "imported.img"
    interrupt_download(backend, store, up.url, dest)
    source.write_bytes(new)
    store.upload(UploadRequest(str(source), backend.url("d")))

    down = store.download(DownloadRequest(up.url, str(dest)))

    assert dest.read_bytes() == new
    assert down.checksum == sha256_bytes(bytes(new))


def test_interrupted_upload_without_resume_leaves_nothing_behind(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(upload_size(backend), seed=57))

    interrupt_upload(backend, store, source, backend.url("disk.img"), resume=False)

    assert backend.stored_names() == set()


def test_interrupted_download_without_resume_leaves_nothing_behind(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(download_size(backend), seed=58)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))

    interrupt_download(backend, store, up.url, workdir / "imported.img", resume=False)

    assert files_under(workdir) == {"disk.img"}


def test_upload_without_resume_ignores_an_earlier_partial(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.UPLOAD_RESUME)
    data = random_bytes(upload_size(backend), seed=59)
    source = write_file(workdir / "disk.img", data)
    interrupt_upload(backend, store, source, backend.url("disk.img"))

    up = store.upload(UploadRequest(str(source), backend.url("disk.img"), resume=False))

    assert up.resumed_from == 0
    assert up.bytes_transferred == len(data)
    assert backend.read_object("disk.img") == data
    assert backend.stored_names() == {"disk.img"} | backend.companion_names("disk.img")


def damage_download_partial(partial: Path, how: str, at: int) -> None:
    """Damage an interrupted download's partial the way a crash or a bad disk would."""
    if how == "truncate":  # the tail never reached the disk (lost with the page cache)
        os.truncate(partial, at)
    elif how == "zero-tail":  # units never written into a pre-sized file read as zeros
        size = partial.stat().st_size
        with open(partial, "r+b") as f:
            f.seek(at)
            f.write(bytes(max(0, size - at)))
    else:  # "flip": one byte changed on disk inside the prefix
        with open(partial, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))


def interrupted_download_partial(
    backend: BackendHarness, store: Storage, workdir: Path, data: bytes
) -> tuple[str, Path, Path]:
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    dest = workdir / "imported.img"
    interrupt_download(backend, store, up.url, dest)
    partial = dest.with_name(dest.name + ".vmstore-partial")
    assert partial.exists()
    return up.url, dest, partial


def test_download_resume_after_a_lost_tail_reuses_the_prefix_that_survived(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.DOWNLOAD_RESUME)
    data = random_bytes(download_size(backend), seed=60)
    url, dest, partial = interrupted_download_partial(backend, store, workdir, data)
    survived = 2 * backend.download_unit + 1000
    damage_download_partial(partial, "truncate", survived)

    down = store.download(DownloadRequest(url, str(dest)))

    assert 0 < down.resumed_from <= survived
    assert down.bytes_transferred == len(data) - down.resumed_from
    assert dest.read_bytes() == data


@pytest.mark.parametrize("how", ["zero-tail", "flip"], ids=["unwritten-units", "corrupted-unit"])
def test_download_resume_never_reuses_bytes_that_differ_from_the_source(
    backend: BackendHarness, store: Storage, workdir: Path, how: str
) -> None:
    backend.require(Capability.DOWNLOAD_RESUME)
    data = random_bytes(download_size(backend), seed=61)
    url, dest, partial = interrupted_download_partial(backend, store, workdir, data)
    unit = backend.download_unit
    # Bytes from `at` on differ from the source; whole units before it may be reused.
    at = 2 * unit + 1000 if how == "zero-tail" else unit + 5
    damage_download_partial(partial, how, at)

    down = store.download(DownloadRequest(url, str(dest)))

    assert down.resumed_from <= at // unit * unit
    assert down.checksum == sha256_bytes(data)
    assert dest.read_bytes() == data
