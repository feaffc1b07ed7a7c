"""Faults between vmstore and the store, and a destination that runs out of space.

The network faults go through tests/faults.py's proxy on 127.0.0.1, between vmstore and the
real server: a connection reset (TCP RST), a connection cut mid-transfer after half a segment
(a truncated request or body), a connection that goes silent for longer than ``timeout``, and
one bit flipped in transit, each once, uploading and downloading. A reset, a cut or a stall
costs a retry, never the transfer. A flipped bit must never end as wrong bytes believed: see
``FLIP_UP`` / ``FLIP_DOWN`` for what each server does with it. NFS has no wire to put a proxy
in; its faults are the disk's (the full-disk scenarios below run on every backend).

The full disk is a small tmpfs (root only; skipped otherwise): a download that fills it, or
finds it full from the start, fails with OperationFailedError and leaves nothing on it (no
partial, no state file); likewise an NFS upload into a full share.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmstore import DownloadRequest, Storage, UploadRequest
from vmstore.errors import (
    ChecksumMismatchError,
    ErrorType,
    NetworkError,
    OperationFailedError,
)

from tests.faults import DroppingProxy
from tests.support import KiB, MiB, files_under, random_bytes, sha256_bytes, write_file

from .harness import CHUNK, BackendHarness, Capability, nfs_harness


def fault_at(backend: BackendHarness, direction: str) -> int:
    """Where in a connection's counted bytes the fault strikes: inside a body, past its
    headers, and in bytes vmstore reads. Uploading, 1 MiB into the PUT (the whole object over
    HTTP, a 5 MiB part over S3). Downloading with ranges, inside the first ranged GET's body:
    some servers (moto) close every connection after one response, so no connection carries
    more than one chunk. Without ranges, 2 MiB into the one stream: the range probe before it
    (``Range: bytes=0-0``, answered with the whole object, closed after its head) is forwarded
    only as far as the socket buffers take it, and a fault there would strike bytes that
    vmstore never reads (SEND_BUFFER keeps that short)."""
    if direction == "upload":
        return MiB + 77
    if Capability.DOWNLOAD_RESUME in backend.capabilities:
        return CHUNK // 2 + 77
    return 2 * MiB + 77


SEND_BUFFER = 64 * KiB
"""The proxy's SO_SNDBUF: with the kernel's (autotuned to MiBs) it read more than 2 MiB of a
range probe's discarded body before vmstore hung up, and the flip meant for the download
struck those bytes (seen once under load, caught by assert_retried)."""

STALL_TIMEOUT = 1.0
"""The idle timeout of the stall scenarios: a stalled connection costs this, then a retry."""

FLIP_UP: dict[str, str] = {
    # "resent": the server checks what arrived against the checksum vmstore sent with it,
    # refuses it, and vmstore sends it again: the object is right.
    # "refused-on-download": the server stores the flipped bytes; the SHA-256 vmstore
    # recorded (S3 metadata / companion, the HTTP sidecar) is the source's, so every download
    # of the object fails with ChecksumMismatchError and commits nothing.
    "s3-rclone": "refused-on-download",
    "s3-moto": "refused-on-download",
    "s3-seaweedfs": "resent",
    "http": "refused-on-download",
    "https": "resent",  # TLS: the record's MAC fails, the connection dies, the PUT is retried
    "http-noranges": "refused-on-download",
}
"""What a bit flipped on the way to the server becomes, per server."""

FLIP_DOWN: dict[str, str] = {
    # "mismatch": the whole-object check fails, the download ends with ChecksumMismatchError
    # and commits nothing; the next attempt gets the right bytes.
    "s3-rclone": "mismatch",
    "s3-moto": "mismatch",
    "s3-seaweedfs": "mismatch",
    "http": "mismatch",
    "https": "retried",  # TLS refuses the record; the range is fetched again
    "http-noranges": "mismatch",
}
"""What a bit flipped on the way from the server becomes, per server."""


def data_size(backend: BackendHarness) -> int:
    """A few MiB: more than one S3 part, many download chunks, the last one short."""
    return max(3 * MiB, backend.upload_unit + MiB) + 123


@pytest.fixture
def network_backend(backend: BackendHarness) -> BackendHarness:
    if backend.upstream_port() is None:
        pytest.skip(f"{backend.name}: no network between vmstore and the store to break")
    return backend


@contextlib.contextmanager
def through_proxy(
    backend: BackendHarness, fault: str, direction: str, drops: int = 1
) -> Iterator[tuple[DroppingProxy, BackendHarness]]:
    port = backend.upstream_port()
    assert port is not None
    proxy = DroppingProxy(
        port,
        after_bytes=fault_at(backend, direction),
        drops=drops,
        reset=fault == "reset",
        stall=fault == "stall",
        flip=fault == "flip",
        direction=direction,
        send_buffer=SEND_BUFFER,
    )
    with proxy:
        yield proxy, backend.via_proxy(proxy.port)


def proxied_store(via: BackendHarness, fault: str) -> Storage:
    if fault == "stall":
        return via.open(timeout=STALL_TIMEOUT)
    return via.open()


def assert_retried(caplog: pytest.LogCaptureFixture) -> None:
    """The fault cost a retry: it struck bytes vmstore used, not a connection it had let go."""
    retries = [r.getMessage() for r in caplog.records if r.name == "vmstore.retry"]
    assert retries, "no request was retried: the fault struck bytes vmstore never read"


def assert_stored_and_readable(backend: BackendHarness, key: str, data: bytes, tmp: Path) -> None:
    assert backend.read_object(key) == data
    with backend.open() as store:
        assert store.get_metadata(backend.url(key)).checksum == sha256_bytes(data)
        down = store.download(DownloadRequest(backend.url(key), str(tmp / "check.img")))
    assert down.checksum == sha256_bytes(data)
    assert (tmp / "check.img").read_bytes() == data
    (tmp / "check.img").unlink()


# --- connection faults: retried, never fatal -------------------------------------------------


@pytest.mark.parametrize("fault", ["reset", "truncate", "stall"])
def test_an_upload_survives_a_connection_fault(
    network_backend: BackendHarness, workdir: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = network_backend
    data = random_bytes(data_size(backend), seed=301)
    source = write_file(workdir / "disk.img", data)

    with through_proxy(backend, fault, "upload") as (proxy, via):
        with proxied_store(via, fault) as store:
            up = store.upload(UploadRequest(str(source), via.url("disk.img")))
        assert proxy.dropped == 1, "the fault never struck"
    assert_retried(caplog)

    assert up.checksum == sha256_bytes(data)
    assert_stored_and_readable(backend, "disk.img", data, workdir)
    assert backend.stored_names() == {"disk.img"} | backend.companion_names("disk.img")


@pytest.mark.parametrize("fault", ["reset", "truncate", "stall"])
def test_a_download_survives_a_connection_fault(
    network_backend: BackendHarness,
    store: Storage,
    workdir: Path,
    fault: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = network_backend
    data = random_bytes(data_size(backend), seed=302)
    store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    dest = workdir / "imported.img"

    with through_proxy(backend, fault, "download") as (proxy, via):
        with proxied_store(via, fault) as flaky:
            down = flaky.download(DownloadRequest(via.url("d"), str(dest)))
        assert proxy.dropped == 1, "the fault never struck"
    assert_retried(caplog)

    assert down.checksum == sha256_bytes(data)
    assert dest.read_bytes() == data
    assert files_under(workdir) == {"disk.img", "imported.img"}


# --- the same fault on every connection: a NetworkError everywhere, nothing committed ------

EVERY_TIME = 1000
"""``drops`` for a fault that strikes every connection: no retry can get through."""


@pytest.mark.parametrize("fault", ["reset", "truncate", "stall"])
def test_an_upload_that_always_breaks_is_a_network_error_and_commits_nothing(
    network_backend: BackendHarness, workdir: Path, fault: str
) -> None:
    backend = network_backend
    data = random_bytes(data_size(backend), seed=310)
    source = write_file(workdir / "disk.img", data)

    with through_proxy(backend, fault, "upload", drops=EVERY_TIME) as (proxy, via):
        with proxied_store(via, fault) as store, pytest.raises(NetworkError) as caught:
            store.upload(UploadRequest(str(source), via.url("disk.img")))
        assert proxy.dropped > 1, "the retries never met the fault"

    assert caught.value.type is ErrorType.NETWORK_ERROR
    assert backend.read_object("disk.img") is None
    # An unfinished S3 multipart upload may stay, to be resumed: it is no object.
    assert not {"disk.img", "disk.img.vmstore.json"} & backend.stored_names()


@pytest.mark.parametrize("fault", ["reset", "truncate", "stall"])
def test_a_download_that_always_breaks_is_a_network_error_and_commits_nothing(
    network_backend: BackendHarness, store: Storage, workdir: Path, fault: str
) -> None:
    backend = network_backend
    data = random_bytes(data_size(backend), seed=311)
    store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    previous = random_bytes(10 * KiB, seed=312)
    dest = write_file(workdir / "imported.img", previous)

    with through_proxy(backend, fault, "download", drops=EVERY_TIME) as (proxy, via):
        with proxied_store(via, fault) as flaky, pytest.raises(NetworkError) as caught:
            flaky.download(DownloadRequest(via.url("d"), str(dest)))
        assert proxy.dropped > 1, "the retries never met the fault"

    assert caught.value.type is ErrorType.NETWORK_ERROR
    assert dest.read_bytes() == previous, "the destination was replaced"
    # A partial (and its state) may stay for a resume, never under the final name.
    assert files_under(workdir) - {"disk.img", "imported.img"} <= {
        "imported.img.vmstore-partial",
        "imported.img.vmstore-partial.state",
    }


# --- one flipped bit: never wrong bytes believed ---------------------------------------------


def test_a_bit_flipped_on_the_way_up_is_resent_or_refused_by_every_download(
    network_backend: BackendHarness, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = network_backend
    data = random_bytes(data_size(backend), seed=303)
    source = write_file(workdir / "disk.img", data)

    with through_proxy(backend, "flip", "upload") as (proxy, via):
        with via.open() as store:
            up = store.upload(UploadRequest(str(source), via.url("disk.img")))
        assert proxy.dropped == 1, "the bit was never flipped"
    # What vmstore reports and records is the source's checksum, whatever the server kept.
    assert up.checksum == sha256_bytes(data)

    stored = backend.read_object("disk.img")
    outcome = "resent" if stored == data else "refused-on-download"
    assert outcome == FLIP_UP[backend.name], f"{backend.name}: {outcome}"
    if outcome == "resent":
        assert_retried(caplog)
        assert_stored_and_readable(backend, "disk.img", data, workdir)
        return
    assert stored is not None and len(stored) == len(data)
    assert sum(bin(a ^ b).count("1") for a, b in zip(stored, data, strict=True)) == 1
    dest = workdir / "imported.img"
    with backend.open() as store:
        assert store.get_metadata(backend.url("disk.img")).checksum == sha256_bytes(data)
        for resume in (True, False):
            with pytest.raises(ChecksumMismatchError):
                store.download(DownloadRequest(backend.url("disk.img"), str(dest), resume=resume))
            assert files_under(workdir) == {"disk.img"}, "nothing of the bad object is kept"


def test_a_bit_flipped_on_the_way_down_is_never_committed(
    network_backend: BackendHarness,
    store: Storage,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = network_backend
    data = random_bytes(data_size(backend), seed=304)
    store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    previous = random_bytes(10 * KiB, seed=305)
    dest = write_file(workdir / "imported.img", previous)

    with through_proxy(backend, "flip", "download") as (proxy, via), via.open() as flaky:
        try:
            down = flaky.download(DownloadRequest(via.url("d"), str(dest)))
        except ChecksumMismatchError:
            outcome = "mismatch"
            assert dest.read_bytes() == previous, "the destination was replaced"
            assert files_under(workdir) == {"disk.img", "imported.img"}, "a partial was kept"
            # The flip was a one-off: the same call now gets the right bytes.
            down = flaky.download(DownloadRequest(via.url("d"), str(dest)))
        else:
            outcome = "retried"
            assert_retried(caplog)
        assert proxy.dropped == 1, "the bit was never flipped"

    assert outcome == FLIP_DOWN[backend.name], f"{backend.name}: {outcome}"
    assert down.checksum == sha256_bytes(data)
    assert dest.read_bytes() == data
    assert files_under(workdir) == {"disk.img", "imported.img"}


# --- a destination that fills up --------------------------------------------------------------


def fill_completely(path: Path) -> None:
    """Write until the file system has not one byte left (unbuffered: nothing pending)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (MiB, 4 * KiB, 1):
            block = random_bytes(size, seed=306)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
    finally:
        os.close(fd)


def assert_out_of_space(caught: pytest.ExceptionInfo[OperationFailedError]) -> None:
    assert type(caught.value) is OperationFailedError, type(caught.value)
    assert caught.value.type is ErrorType.OPERATION_FAILED
    assert "space" in str(caught.value).lower(), str(caught.value)


def assert_nothing_listed_under(store: Storage, directory: Path) -> None:
    left = [t for t in store.list_incomplete() if t.location.startswith(str(directory))]
    assert left == []


@pytest.mark.parametrize("resume", [True, False], ids=["resumable", "not-resumable"])
def test_a_download_that_fills_the_disk_leaves_nothing_on_it(
    backend: BackendHarness,
    store: Storage,
    workdir: Path,
    mount_tmpfs: Callable[..., Path],
    resume: bool,
) -> None:
    small = mount_tmpfs("small-host", size="4m")
    data = random_bytes(6 * MiB + 123, seed=307)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))

    with pytest.raises(OperationFailedError) as caught:
        store.download(DownloadRequest(up.url, str(small / "imported.img"), resume=resume))

    assert_out_of_space(caught)
    assert files_under(small) == set(), "a partial or state file was left on the full disk"
    assert_nothing_listed_under(store, small)
    assert os.statvfs(small).f_bavail * os.statvfs(small).f_frsize > 3 * MiB


def test_a_download_onto_a_disk_full_from_the_start_leaves_nothing_on_it(
    backend: BackendHarness, store: Storage, workdir: Path, mount_tmpfs: Callable[..., Path]
) -> None:
    small = mount_tmpfs("full-host", size="4m")
    data = random_bytes(MiB + 5, seed=308)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    fill_completely(small / "filler")

    with pytest.raises(OperationFailedError) as caught:
        store.download(DownloadRequest(up.url, str(small / "vm" / "imported.img")))

    assert_out_of_space(caught)
    assert files_under(small) == {"filler"}
    assert_nothing_listed_under(store, small)


@pytest.mark.parametrize("full_from_the_start", [False, True], ids=["fills-up", "full"])
def test_an_nfs_upload_into_a_full_share_leaves_nothing_in_it(
    workdir: Path, mount_tmpfs: Callable[..., Path], full_from_the_start: bool
) -> None:
    share = mount_tmpfs("small-share", size="4m")
    backend = nfs_harness(share)
    data = random_bytes((MiB if full_from_the_start else 6 * MiB) + 123, seed=309)
    source = write_file(workdir / "disk.img", data)
    if full_from_the_start:
        fill_completely(share / "filler")

    with backend.open() as store:
        for resume in (True, False):
            with pytest.raises(OperationFailedError) as caught:
                store.upload(UploadRequest(str(source), backend.url("vm/disk.img"), resume=resume))
            assert_out_of_space(caught)
            assert files_under(share) == ({"filler"} if full_from_the_start else set())
            assert store.list_incomplete() == []
    assert backend.read_object("vm/disk.img") is None
