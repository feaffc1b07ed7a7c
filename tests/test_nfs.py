"""The NFS backend's own rules: containment in the mount, URL forms, mount checks, the sidecar,
errno mapping, a full disk, sparse files and concurrent writers.

The share is a local directory (or a small tmpfs where a scenario needs a file system with
particular properties); the backend treats both exactly like a mounted NFS export.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from vmstore import (
    ChecksumMismatchError,
    DownloadRequest,
    ErrorType,
    InvalidConfigError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    Storage,
    StorageConfig,
    UploadRequest,
    new_storage,
)

from tests.support import (
    InterruptAt,
    Interrupted,
    KiB,
    MiB,
    allocated_bytes,
    files_under,
    random_bytes,
    sha256_bytes,
    sha256_path,
    stays_as_sparse_as,
    write_file,
)

CHUNK = 256 * KiB
SIDECAR_KEYS = {"sha256", "size", "mtime_ns", "content_type", "metadata", "uploaded_at"}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the share that no NFS URL may reach."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


def nfs(endpoint: Path | str, **fields: Any) -> StorageConfig:
    return StorageConfig(type="nfs", endpoint=str(endpoint), chunk_size=CHUNK, **fields)


def partial_name(final: str) -> str:
    return f"{final}.vmstore-partial-{socket.gethostname()}"


# --- containment -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "nfs://../outside/escaped.img",
        "../outside/escaped.img",
        "nfs://sub/../../outside/escaped.img",
        "vm-exports/../../outside/escaped.img",
    ],
)
def test_upload_with_dotdot_escaping_the_mount_is_refused_and_writes_nothing(
    nfs_store: Storage, share: Path, outside: Path, host: Path, url: str
) -> None:
    source = write_file(host / "disk.img", random_bytes(10 * KiB, seed=1))

    with pytest.raises(PermissionDeniedError) as caught:
        nfs_store.upload(UploadRequest(str(source), url))

    assert caught.value.type is ErrorType.PERMISSION_DENIED
    assert files_under(outside) == set()
    assert files_under(share) == set()


def test_upload_through_a_symlinked_directory_pointing_outside_is_refused(
    nfs_store: Storage, share: Path, outside: Path, host: Path
) -> None:
    (share / "exports").symlink_to(outside, target_is_directory=True)
    source = write_file(host / "disk.img", random_bytes(10 * KiB, seed=2))

    with pytest.raises(PermissionDeniedError):
        nfs_store.upload(UploadRequest(str(source), "nfs://exports/disk.img"))

    assert files_under(outside) == set()
    assert files_under(share) == {"exports"}  # only the symlink itself


def test_upload_over_a_symlinked_file_pointing_outside_leaves_the_target_untouched(
    nfs_store: Storage, share: Path, outside: Path, host: Path
) -> None:
    target = write_file(outside / "precious.img", b"not yours to overwrite")
    (share / "disk.img").symlink_to(target)
    source = write_file(host / "disk.img", random_bytes(10 * KiB, seed=3))

    with pytest.raises(PermissionDeniedError):
        nfs_store.upload(UploadRequest(str(source), "nfs://disk.img"))

    assert target.read_bytes() == b"not yours to overwrite"
    assert files_under(outside) == {"precious.img"}
    assert files_under(share) == {"disk.img"}
    assert (share / "disk.img").is_symlink()


def test_download_through_a_symlink_pointing_outside_is_refused(
    nfs_store: Storage, share: Path, outside: Path, host: Path
) -> None:
    write_file(outside / "secret.img", b"host secrets")
    (share / "leak").symlink_to(outside, target_is_directory=True)
    dest = host / "stolen.img"

    with pytest.raises(PermissionDeniedError):
        nfs_store.download(DownloadRequest("nfs://leak/secret.img", str(dest)))

    assert files_under(host) == set()


def test_get_metadata_through_a_symlink_pointing_outside_is_refused(
    nfs_store: Storage, share: Path, outside: Path
) -> None:
    write_file(outside / "secret.img", b"host secrets")
    (share / "leak").symlink_to(outside, target_is_directory=True)

    with pytest.raises(PermissionDeniedError):
        nfs_store.get_metadata("nfs://leak/secret.img")


def test_delete_through_a_symlink_pointing_outside_is_refused_and_deletes_nothing(
    nfs_store: Storage, share: Path, outside: Path
) -> None:
    victim = write_file(outside / "victim.img", b"still here")
    (share / "leak").symlink_to(outside, target_is_directory=True)

    with pytest.raises(PermissionDeniedError):
        nfs_store.delete("nfs://leak/victim.img")

    assert victim.read_bytes() == b"still here"


def test_absolute_path_outside_the_mount_is_refused_for_upload(
    nfs_store: Storage, share: Path, outside: Path, host: Path
) -> None:
    source = write_file(host / "disk.img", random_bytes(10 * KiB, seed=4))

    with pytest.raises(PermissionDeniedError):
        nfs_store.upload(UploadRequest(str(source), str(outside / "disk.img")))

    assert files_under(outside) == set()
    assert files_under(share) == set()


def test_absolute_path_outside_the_mount_is_refused_for_download(
    nfs_store: Storage, host: Path
) -> None:
    with pytest.raises(PermissionDeniedError):
        nfs_store.download(DownloadRequest("/etc/passwd", str(host / "passwd")))

    assert files_under(host) == set()


def test_sibling_directory_sharing_the_mount_name_as_prefix_is_outside(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    """`/x/share-evil` starts with the string `/x/share` but is not inside it."""
    sibling = share.with_name(share.name + "-evil")
    sibling.mkdir()
    source = write_file(host / "disk.img", random_bytes(10 * KiB, seed=5))

    with pytest.raises(PermissionDeniedError):
        nfs_store.upload(UploadRequest(str(source), str(sibling / "disk.img")))

    assert files_under(sibling) == set()


def test_symlink_inside_the_mount_pointing_inside_is_followed(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    (share / "v1").mkdir()
    (share / "current").symlink_to(share / "v1", target_is_directory=True)
    data = random_bytes(10 * KiB, seed=6)

    nfs_store.upload(UploadRequest(str(write_file(host / "d.img", data)), "nfs://current/d.img"))

    assert (share / "v1" / "d.img").read_bytes() == data


# --- URL forms and validate_url ----------------------------------------------------------


@pytest.mark.parametrize("form", ["nfs-scheme", "absolute-inside", "relative"])
def test_each_url_form_uploads_to_the_same_place_in_the_share(
    nfs_store: Storage, share: Path, host: Path, form: str
) -> None:
    url = {
        "nfs-scheme": "nfs://vm-exports/disk.img",
        "absolute-inside": str(share / "vm-exports" / "disk.img"),
        "relative": "vm-exports/disk.img",
    }[form]
    data = random_bytes(CHUNK + 5, seed=7)

    up = nfs_store.upload(UploadRequest(str(write_file(host / "disk.img", data)), url))

    assert (share / "vm-exports" / "disk.img").read_bytes() == data
    assert nfs_store.get_metadata(up.url).checksum == sha256_bytes(data)


def test_all_url_forms_name_the_same_object(nfs_store: Storage, share: Path, host: Path) -> None:
    data = random_bytes(CHUNK * 3, seed=8)
    nfs_store.upload(UploadRequest(str(write_file(host / "disk.img", data)), "nfs://a/disk.img"))

    for url in ("nfs://a/disk.img", "a/disk.img", str(share / "a" / "disk.img")):
        md = nfs_store.get_metadata(url)
        assert (md.size, md.checksum) == (len(data), sha256_bytes(data)), url
        dest = host / "back.img"
        nfs_store.download(DownloadRequest(url, str(dest)))
        assert dest.read_bytes() == data, url


def test_endpoint_given_through_a_symlink_accepts_paths_under_either_name(
    tmp_path: Path, share: Path, host: Path
) -> None:
    link = tmp_path / "mnt-link"
    link.symlink_to(share, target_is_directory=True)
    data = random_bytes(1000, seed=9)
    source = write_file(host / "d.img", data)

    with new_storage(nfs(link)) as store:
        store.upload(UploadRequest(str(source), str(link / "via-link.img")))
        store.upload(UploadRequest(str(source), str(share / "via-real.img")))

    assert (share / "via-link.img").read_bytes() == data
    assert (share / "via-real.img").read_bytes() == data


@pytest.mark.parametrize("url", ["nfs://vm/disk.img", "vm/disk.img", "disk.img"])
def test_validate_url_accepts_every_form_and_touches_nothing(
    nfs_store: Storage, share: Path, url: str
) -> None:
    assert nfs_store.validate_url(url) is None
    nfs_store.validate_url(str(share / "vm" / "disk.img"))

    assert list(share.iterdir()) == []


@pytest.mark.parametrize(
    "url", ["", "nfs://", "vm-exports/", "nfs://vm-exports/", "s3://bucket/key", "https://h/x"]
)
def test_validate_url_rejects_malformed_urls_as_invalid_config(
    nfs_store: Storage, share: Path, url: str
) -> None:
    with pytest.raises(InvalidConfigError) as caught:
        nfs_store.validate_url(url)

    assert caught.value.type is ErrorType.INVALID_CONFIG
    assert list(share.iterdir()) == []


@pytest.mark.parametrize("url", ["../escape.img", "nfs://a/../../escape.img", "/etc/passwd"])
def test_validate_url_refuses_paths_outside_the_mount(
    nfs_store: Storage, share: Path, url: str
) -> None:
    with pytest.raises(PermissionDeniedError):
        nfs_store.validate_url(url)

    assert list(share.iterdir()) == []


def test_upload_to_a_directory_url_is_invalid_config(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    source = write_file(host / "disk.img", b"data")

    with pytest.raises(InvalidConfigError):
        nfs_store.upload(UploadRequest(str(source), "nfs://vm-exports/"))

    assert files_under(share) == set()


def test_upload_creates_missing_parent_directories(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(5000, seed=10)

    nfs_store.upload(UploadRequest(str(write_file(host / "d.img", data)), "nfs://a/b/c/d.img"))

    assert (share / "a" / "b" / "c" / "d.img").read_bytes() == data


# --- mount verification ------------------------------------------------------------------


def test_missing_mount_point_is_invalid_config_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"

    with pytest.raises(InvalidConfigError) as caught:
        new_storage(nfs(missing))

    assert str(missing) in str(caught.value)


def test_mount_point_that_is_a_file_is_invalid_config(tmp_path: Path) -> None:
    not_a_dir = write_file(tmp_path / "share", b"")

    with pytest.raises(InvalidConfigError):
        new_storage(nfs(not_a_dir))


def test_empty_endpoint_is_invalid_config() -> None:
    with pytest.raises(InvalidConfigError):
        new_storage(StorageConfig(type="nfs", endpoint=""))


def test_read_only_mounted_share_is_permission_denied(mount_tmpfs: Any) -> None:
    read_only = mount_tmpfs("ro-share", size="1m", options="ro")

    with pytest.raises(PermissionDeniedError):
        new_storage(nfs(read_only))


def test_immutable_share_directory_is_permission_denied(tmp_path: Path) -> None:
    """chattr +i: a directory even root cannot write into."""
    locked = tmp_path / "immutable"
    locked.mkdir()
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    result = subprocess.run(["chattr", "+i", str(locked)], capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"this file system has no immutable flag: {result.stderr!r}")
    try:
        try:
            (locked / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("the immutable flag does not stop this process from writing")

        with pytest.raises(PermissionDeniedError):
            new_storage(nfs(locked))
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=False)


# --- errno mapping, with the kernel's own EACCES -----------------------------------------

PROBE = textwrap.dedent(
    """
    import sys
    from vmstore import *
    args = sys.argv[1:]
    try:
        {body}
    except StorageError as e:
        print(type(e).__name__, e.type.value)
    except BaseException as e:
        print("unexpected", type(e).__name__, e)
    else:
        print("ok")
    """
)


def run_unprivileged(body: str, *args: str | Path) -> str:
    """Run ``body`` in a child that gets EACCES like any user would.

    The suite runs as root, which file modes do not stop, so the child keeps uid 0 but loses
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv): permission checks then apply to it for
    real, and the errors come from the kernel, not from a mock.
    """
    code = PROBE.format(body=textwrap.indent(textwrap.dedent(body), "    ").strip())
    command = [sys.executable, "-c", code, *map(str, args)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv(1): cannot produce EACCES")
        drop = "-dac_override,-dac_read_search"
        command = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_unreadable_object_download_is_permission_denied(share: Path, host: Path) -> None:
    locked = write_file(share / "locked.img", random_bytes(4096, seed=11))
    locked.chmod(0)
    dest = host / "out.img"

    outcome = run_unprivileged(
        """
        with new_storage(StorageConfig(type="nfs", endpoint=args[0])) as s:
            s.download(DownloadRequest("nfs://locked.img", args[1]))
        """,
        share,
        dest,
    )

    assert outcome == "PermissionDeniedError PermissionDenied"
    assert files_under(host) == set()


def test_upload_into_a_read_only_directory_is_permission_denied(share: Path, host: Path) -> None:
    (share / "frozen").mkdir()
    (share / "frozen").chmod(0o555)
    source = write_file(host / "disk.img", random_bytes(4096, seed=12))

    outcome = run_unprivileged(
        """
        with new_storage(StorageConfig(type="nfs", endpoint=args[0])) as s:
            s.upload(UploadRequest(args[1], "nfs://frozen/disk.img"))
        """,
        share,
        source,
    )

    assert outcome == "PermissionDeniedError PermissionDenied"
    assert files_under(share) == set()


def test_unreadable_source_upload_is_permission_denied(share: Path, host: Path) -> None:
    source = write_file(host / "disk.img", random_bytes(4096, seed=13))
    source.chmod(0)

    outcome = run_unprivileged(
        """
        with new_storage(StorageConfig(type="nfs", endpoint=args[0])) as s:
            s.upload(UploadRequest(args[1], "nfs://disk.img"))
        """,
        share,
        source,
    )

    assert outcome == "PermissionDeniedError PermissionDenied"
    assert files_under(share) == set()


def test_share_without_write_permission_is_permission_denied(tmp_path: Path) -> None:
    read_only = tmp_path / "ro-share"
    read_only.mkdir()
    read_only.chmod(0o555)

    outcome = run_unprivileged(
        """
        new_storage(StorageConfig(type="nfs", endpoint=args[0]))
        """,
        read_only,
    )

    assert outcome == "PermissionDeniedError PermissionDenied"


# --- the sidecar -------------------------------------------------------------------------


def test_upload_writes_a_sidecar_describing_the_object(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(MiB + 1, seed=14)
    source = write_file(host / "disk.qcow2", data)

    nfs_store.upload(
        UploadRequest(
            str(source),
            "nfs://vm/disk.qcow2",
            metadata={"vm-name": "test-vm-01"},
            content_type="application/x-qemu-disk",
        )
    )

    sidecar = json.loads((share / "vm" / "disk.qcow2.vmstore.json").read_text())
    assert set(sidecar) >= SIDECAR_KEYS
    assert sidecar["sha256"] == sha256_bytes(data)
    assert sidecar["size"] == len(data)
    assert sidecar["mtime_ns"] == os.stat(share / "vm" / "disk.qcow2").st_mtime_ns
    assert sidecar["content_type"] == "application/x-qemu-disk"
    assert sidecar["metadata"] == {"vm-name": "test-vm-01"}
    assert files_under(share) == {"vm/disk.qcow2", "vm/disk.qcow2.vmstore.json"}


def test_delete_removes_the_file_its_sidecar_and_this_hosts_partial(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    v1 = random_bytes(MiB, seed=15)
    nfs_store.upload(UploadRequest(str(write_file(host / "v1.img", v1)), "nfs://disk.img"))
    v2 = write_file(host / "v2.img", random_bytes(2 * MiB, seed=16))
    with pytest.raises(Interrupted):
        nfs_store.upload(
            UploadRequest(str(v2), "nfs://disk.img", progress_callback=InterruptAt(2 * CHUNK))
        )
    assert (share / partial_name("disk.img")).exists()

    nfs_store.delete("nfs://disk.img")

    assert files_under(share) == set()


def test_metadata_distrusts_the_sidecar_checksum_once_the_file_size_changed(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(MiB, seed=17)
    nfs_store.upload(UploadRequest(str(write_file(host / "d.img", data)), "nfs://d.img"))
    with open(share / "d.img", "ab") as f:
        f.write(b"appended by someone else")

    md = nfs_store.get_metadata("nfs://d.img")

    assert md.size == len(data) + len(b"appended by someone else")
    assert md.checksum is None


def test_file_placed_in_the_share_without_vmstore_has_metadata_without_checksum(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(3000, seed=18)
    write_file(share / "foreign.img", data)

    md = nfs_store.get_metadata("nfs://foreign.img")
    down = nfs_store.download(
        DownloadRequest(
            "nfs://foreign.img", str(host / "f.img"), expected_checksum=sha256_bytes(data)
        )
    )

    assert (md.size, md.checksum, md.custom_metadata) == (len(data), None, {})
    assert md.last_modified.tzinfo is not None
    assert down.checksum == sha256_bytes(data)
    assert (host / "f.img").read_bytes() == data


def test_interrupted_upload_keeps_a_partial_named_for_this_host(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    source = write_file(host / "disk.img", random_bytes(2 * MiB, seed=19))

    with pytest.raises(Interrupted):
        nfs_store.upload(
            UploadRequest(str(source), "nfs://disk.img", progress_callback=InterruptAt(2 * CHUNK))
        )

    assert files_under(share) == {partial_name("disk.img")}


# --- a full disk -------------------------------------------------------------------------


def test_upload_onto_a_full_share_fails_cleanly_and_keeps_the_previous_object(
    mount_tmpfs: Any, host: Path
) -> None:
    small_share = mount_tmpfs("small-share", size="4m")
    v1 = random_bytes(MiB, seed=20)
    big = write_file(host / "big.img", random_bytes(6 * MiB, seed=21))

    with new_storage(nfs(small_share)) as store:
        store.upload(UploadRequest(str(write_file(host / "v1.img", v1)), "nfs://disk.img"))
        with pytest.raises(OperationFailedError) as caught:
            store.upload(UploadRequest(str(big), "nfs://disk.img"))
        md = store.get_metadata("nfs://disk.img")

    assert caught.value.type is ErrorType.OPERATION_FAILED
    assert (small_share / "disk.img").read_bytes() == v1
    assert (md.size, md.checksum) == (len(v1), sha256_bytes(v1))
    # The partial is dropped after ENOSPC: keeping it would keep the disk full.
    assert files_under(small_share) == {"disk.img", "disk.img.vmstore.json"}


def test_download_onto_a_full_disk_fails_cleanly_and_keeps_the_destination(
    nfs_store: Storage, mount_tmpfs: Any, host: Path
) -> None:
    small_host = mount_tmpfs("small-host", size="4m")
    big = write_file(host / "big.img", random_bytes(6 * MiB, seed=22))
    up = nfs_store.upload(UploadRequest(str(big), "nfs://big.img"))
    previous = random_bytes(MiB, seed=23)
    dest = write_file(small_host / "imported.img", previous)

    with pytest.raises(OperationFailedError):
        nfs_store.download(DownloadRequest(up.url, str(dest)))

    assert dest.read_bytes() == previous
    assert files_under(small_host) == {"imported.img"}


# --- copies bypass the page cache on a local disk -------------------------------------------


def _cached_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux fincore, mincore(2) underneath)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_a_copy_onto_a_local_disk_leaves_its_bytes_out_of_the_page_cache(
    tmp_path: Path, share: Path, host: Path
) -> None:
    """Downloads (and uploads to a share on a local disk) write O_DIRECT, as the network
    backends' partials do: a 200 GB import neither evicts the host's cache nor pays the
    first touch of fresh cache pages. A cached copy of the same bytes is the control."""
    from vmstore._localpath import direct_io_suits

    if not direct_io_suits(str(host)):
        pytest.skip(f"{host} is not on a filesystem that takes O_DIRECT")
    data = random_bytes(8 * MiB + 1000, seed=31)  # an unaligned tail goes through the cache
    source = write_file(host / "disk.img", data)
    control = host / "control.img"
    shutil.copyfile(source, control)
    os.sync()
    assert _cached_bytes(control) >= 8 * MiB  # fincore sees a cached copy
    # Left in the cache: at most the unaligned tail and the image header read before commit.
    # (The copy's source is read through the cache: the share's file once it is downloaded.)
    with new_storage(nfs(share)) as store:
        store.upload(UploadRequest(str(source), "nfs://disk.img"))
        assert _cached_bytes(share / "disk.img") <= 1 * MiB
        store.download(DownloadRequest("nfs://disk.img", str(host / "back.img")))
    assert _cached_bytes(host / "back.img") <= 1 * MiB
    assert (host / "back.img").read_bytes() == data


# --- sparse files ------------------------------------------------------------------------


def make_sparse_image(path: Path, virtual: int, extents: list[tuple[int, int]]) -> Path:
    """A file of ``virtual`` bytes that holds random data only at ``extents``; holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(virtual)
        for index, (offset, length) in enumerate(extents):
            f.seek(offset)
            f.write(random_bytes(length, seed=100 + index))
    return path


def test_sparse_file_stays_sparse_through_upload_and_download(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    source = make_sparse_image(
        host / "sparse.raw", 64 * MiB, [(0, MiB), (20 * MiB, 2 * MiB), (63 * MiB, MiB)]
    )
    assert allocated_bytes(source) < 8 * MiB, "the test file system does not keep holes"

    up = nfs_store.upload(UploadRequest(str(source), "nfs://sparse.raw"))
    dest = host / "back.raw"
    nfs_store.download(DownloadRequest(up.url, str(dest)))

    assert up.checksum == sha256_path(source) == sha256_path(dest)
    assert os.path.getsize(share / "sparse.raw") == os.path.getsize(dest) == 64 * MiB
    assert stays_as_sparse_as(share / "sparse.raw", source)
    assert stays_as_sparse_as(dest, source)


def test_extents_that_straddle_chunk_boundaries_stay_as_sparse_as_the_source(
    share: Path, host: Path
) -> None:
    # Data in real images is aligned to 4 KiB or 1 MiB, not to vmstore's chunk: every chunk
    # holding an extent's edge is part data, part hole, and only the data may be written.
    chunk = 4 * MiB
    source = make_sparse_image(
        host / "straddle.raw",
        64 * MiB,
        [(5 * MiB + 4 * KiB, 6 * MiB), (31 * MiB, 2 * MiB), (60 * MiB + 12 * KiB, 8 * KiB)],
    )
    config = StorageConfig(type="nfs", endpoint=str(share), chunk_size=chunk)
    with new_storage(config) as store:
        up = store.upload(UploadRequest(str(source), "nfs://straddle.raw"))
        dest = host / "straddle-back.raw"
        store.download(DownloadRequest(up.url, str(dest)))
    assert up.checksum == sha256_path(source) == sha256_path(dest)
    assert stays_as_sparse_as(share / "straddle.raw", source)
    assert stays_as_sparse_as(dest, source)


def test_zeros_written_in_the_source_become_holes_in_the_copy(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(MiB, seed=24) + bytes(4 * MiB) + random_bytes(MiB, seed=25)
    source = write_file(host / "zeros.raw", data)
    assert allocated_bytes(source) >= len(data)

    up = nfs_store.upload(UploadRequest(str(source), "nfs://zeros.raw"))

    assert up.checksum == sha256_bytes(data)
    assert (share / "zeros.raw").read_bytes() == data
    # Only the 2 MiB of random data needs disk, give or take a chunk of rounding.
    assert allocated_bytes(share / "zeros.raw") <= 2 * MiB + 2 * CHUNK


# --- concurrent writers ------------------------------------------------------------------


def test_upload_uses_its_own_temp_file_when_another_writer_holds_the_partial(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    partial = write_file(share / partial_name("disk.img"), b"another writer's bytes")
    data = random_bytes(MiB + 5, seed=26)
    source = write_file(host / "disk.img", data)

    with open(partial, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the other writer holds
        up = nfs_store.upload(UploadRequest(str(source), "nfs://disk.img"))

        assert up.resumed_from == 0
        assert (share / "disk.img").read_bytes() == data
        assert partial.read_bytes() == b"another writer's bytes"
        assert files_under(share) == {"disk.img", "disk.img.vmstore.json", partial.name}


def test_two_concurrent_uploads_to_one_name_leave_one_whole_object(
    nfs_config: StorageConfig, share: Path, host: Path
) -> None:
    first = random_bytes(3 * MiB, seed=27)
    second = random_bytes(2 * MiB + 1, seed=28)
    sources = [write_file(host / "a.img", first), write_file(host / "b.img", second)]

    def upload(source: Path) -> str:
        with new_storage(nfs_config) as store:
            return store.upload(UploadRequest(str(source), "nfs://disk.img")).checksum

    with ThreadPoolExecutor(max_workers=2) as pool:
        checksums = list(pool.map(upload, sources))

    assert checksums == [sha256_bytes(first), sha256_bytes(second)]
    final = (share / "disk.img").read_bytes()
    assert final in (first, second)
    with new_storage(nfs_config) as store:
        assert store.get_metadata("nfs://disk.img").checksum in (None, sha256_bytes(final))
    assert files_under(share) == {"disk.img", "disk.img.vmstore.json"}


def test_download_of_a_missing_file_in_an_existing_directory_is_not_found(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    (share / "vm").mkdir()

    with pytest.raises(NotFoundError) as caught:
        nfs_store.download(DownloadRequest("nfs://vm/missing.img", str(host / "x.img")))

    assert "missing.img" in str(caught.value)


# --- resume from a damaged partial (upload side; the download side is in conformance) ------


def interrupted_upload_partial(store: Storage, share: Path, source: Path) -> Path:
    with pytest.raises(Interrupted):
        store.upload(
            UploadRequest(str(source), "nfs://disk.img", progress_callback=InterruptAt(2 * CHUNK))
        )
    partial = share / partial_name("disk.img")
    assert partial.exists()
    return partial


def test_upload_resume_after_a_lost_tail_reuses_the_prefix_that_survived(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(4 * MiB + 9, seed=30)
    source = write_file(host / "disk.img", data)
    partial = interrupted_upload_partial(nfs_store, share, source)
    survived = 2 * MiB + 1000
    os.truncate(partial, survived)  # the tail was lost with the page cache

    up = nfs_store.upload(UploadRequest(str(source), "nfs://disk.img"))

    assert 0 < up.resumed_from <= survived
    assert up.bytes_transferred == len(data) - up.resumed_from
    assert (share / "disk.img").read_bytes() == data
    assert files_under(share) == {"disk.img", "disk.img.vmstore.json"}


def test_upload_resume_never_reuses_a_corrupted_chunk(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(4 * MiB + 9, seed=31)
    source = write_file(host / "disk.img", data)
    partial = interrupted_upload_partial(nfs_store, share, source)
    with open(partial, "r+b") as f:
        f.seek(CHUNK + 5)
        f.write(b"\x00\x00\x00")

    up = nfs_store.upload(UploadRequest(str(source), "nfs://disk.img"))

    assert up.resumed_from <= CHUNK
    assert up.checksum == sha256_bytes(data)
    assert (share / "disk.img").read_bytes() == data


# --- a sidecar is believed only for the data it was written for ---------------------------


def sidecar_path(share: Path, name: str) -> Path:
    return share / f"{name}.vmstore.json"


def test_sidecar_of_another_upload_of_the_same_size_is_not_believed(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    # What two racing writers can leave: the data of the second, the sidecar of the first.
    first = random_bytes(MiB, seed=40)
    second = random_bytes(MiB, seed=41)
    nfs_store.upload(UploadRequest(str(write_file(host / "a.img", first)), "nfs://disk.img"))
    first_sidecar = sidecar_path(share, "disk.img").read_bytes()
    nfs_store.upload(UploadRequest(str(write_file(host / "b.img", second)), "nfs://disk.img"))
    sidecar_path(share, "disk.img").write_bytes(first_sidecar)

    md = nfs_store.get_metadata("nfs://disk.img")
    down = nfs_store.download(DownloadRequest("nfs://disk.img", str(host / "back.img")))

    assert md.checksum is None  # unknown, not the first upload's checksum
    assert md.custom_metadata == {}
    assert down.checksum == sha256_bytes(second)
    assert (host / "back.img").read_bytes() == second


def test_racing_uploads_of_one_name_never_leave_a_checksum_that_lies(
    nfs_config: StorageConfig, share: Path, host: Path
) -> None:
    # Same sizes, so only the data's identity can tell the two sidecars apart.
    contents = [random_bytes(512 * KiB, seed=42), random_bytes(512 * KiB, seed=43)]
    sources = [write_file(host / f"w{i}.img", data) for i, data in enumerate(contents)]
    stores = [new_storage(nfs_config) for _ in sources]
    try:
        for _round in range(10):
            with ThreadPoolExecutor(max_workers=2) as pool:
                list(
                    pool.map(
                        lambda pair: pair[0].upload(UploadRequest(str(pair[1]), "nfs://race.img")),
                        zip(stores, sources, strict=True),
                    )
                )
            final = sha256_path(share / "race.img")
            assert stores[0].get_metadata("nfs://race.img").checksum in (None, final)
    finally:
        for store in stores:
            store.close()
    assert files_under(share) == {"race.img", "race.img.vmstore.json"}


def test_sidecar_is_bound_to_the_committed_files_identity(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(100 * KiB, seed=44)
    nfs_store.upload(UploadRequest(str(write_file(host / "d.img", data)), "nfs://d.img"))
    st = os.stat(share / "d.img")

    sidecar = json.loads(sidecar_path(share, "d.img").read_text())

    assert sidecar["version"] == 2
    assert sidecar["etag"] == f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"
    assert sidecar["etag"] == nfs_store.get_metadata("nfs://d.img").etag


def test_file_rewritten_in_place_with_the_same_size_loses_its_checksum(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(64 * KiB, seed=45)
    nfs_store.upload(UploadRequest(str(write_file(host / "d.img", data)), "nfs://d.img"))
    time.sleep(0.01)  # a later mtime, even on a coarse clock
    with open(share / "d.img", "r+b") as f:
        f.write(b"edited by another tool")

    assert nfs_store.get_metadata("nfs://d.img").checksum is None


def write_release_1_sidecar(share: Path, name: str, data: bytes, mtime_ns: int) -> None:
    """A sidecar exactly as vmstore 0.1 wrote it (no version, no etag)."""
    sidecar_path(share, name).write_text(
        json.dumps(
            {
                "content_type": "application/x-qemu-disk",
                "metadata": {"vm-name": "old-vm"},
                "mtime_ns": mtime_ns,
                "sha256": sha256_bytes(data),
                "size": len(data),
                "uploaded_at": "2026-01-05T10:00:00+00:00",
            },
            indent=2,
            sort_keys=True,
        )
    )


def test_sidecar_written_by_release_1_is_still_believed_for_its_file(
    nfs_store: Storage, share: Path
) -> None:
    data = random_bytes(70 * KiB, seed=46)
    write_file(share / "old.img", data)
    write_release_1_sidecar(share, "old.img", data, os.stat(share / "old.img").st_mtime_ns)

    md = nfs_store.get_metadata("nfs://old.img")

    assert md.checksum == sha256_bytes(data)
    assert md.content_type == "application/x-qemu-disk"
    assert md.custom_metadata == {"vm-name": "old-vm"}


def test_sidecar_written_by_release_1_for_another_mtime_is_ignored(
    nfs_store: Storage, share: Path
) -> None:
    data = random_bytes(70 * KiB, seed=47)
    write_file(share / "old.img", data)
    write_release_1_sidecar(share, "old.img", data, os.stat(share / "old.img").st_mtime_ns - 1)

    assert nfs_store.get_metadata("nfs://old.img").checksum is None


# --- FIFOs, sockets, directories: refused before anything blocks ---------------------------


def run_with_deadline(call: Any, fifo: Path, seconds: float = 10.0) -> BaseException | None:
    """Run call() in a thread; if it is still blocked after ``seconds`` (in open() of the
    FIFO, waiting for a writer), release it by opening the FIFO's other end and fail."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which asserts on it
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, flags))
        thread.join(seconds)
        pytest.fail(f"the call blocked on the FIFO {fifo} for {seconds}s")
    return outcome[0]


def test_download_of_a_fifo_placed_in_the_share_is_refused_without_blocking(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    fifo = share / "pipe.img"
    os.mkfifo(fifo)

    error = run_with_deadline(
        lambda: nfs_store.download(DownloadRequest("nfs://pipe.img", str(host / "out.img"))),
        fifo,
    )

    assert isinstance(error, InvalidConfigError), error
    assert "FIFO" in str(error)
    assert files_under(host) == set()


def test_stream_download_of_a_fifo_placed_in_the_share_is_refused_without_blocking(
    nfs_store: Storage, share: Path
) -> None:
    fifo = share / "pipe.img"
    os.mkfifo(fifo)
    sink = io.BytesIO()

    error = run_with_deadline(
        lambda: nfs_store.download(DownloadRequest("nfs://pipe.img", destination_stream=sink)),
        fifo,
    )

    assert isinstance(error, InvalidConfigError), error
    assert sink.getvalue() == b""


def test_metadata_of_a_fifo_in_the_share_is_invalid_config(nfs_store: Storage, share: Path) -> None:
    os.mkfifo(share / "pipe.img")

    with pytest.raises(InvalidConfigError):
        nfs_store.get_metadata("nfs://pipe.img")


def test_upload_of_a_fifo_source_is_refused_without_blocking(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    fifo = host / "source.fifo"
    os.mkfifo(fifo)

    error = run_with_deadline(
        lambda: nfs_store.upload(UploadRequest(str(fifo), "nfs://disk.img")), fifo
    )

    assert isinstance(error, InvalidConfigError), error
    assert files_under(share) == set()


def test_upload_of_a_unix_socket_source_is_invalid_config(
    nfs_store: Storage, share: Path, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"  # short: AF_UNIX paths are limited to 108 bytes
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))

        with pytest.raises(InvalidConfigError) as caught:
            nfs_store.upload(UploadRequest(str(path), "nfs://disk.img"))

    assert "socket" in str(caught.value)
    assert files_under(share) == set()


def test_upload_of_a_character_device_is_invalid_config(nfs_store: Storage, share: Path) -> None:
    # /dev/zero would "upload" as an empty file (st_size 0), or forever if read to its end.
    with pytest.raises(InvalidConfigError) as caught:
        nfs_store.upload(UploadRequest("/dev/zero", "nfs://disk.img"))

    assert "device" in str(caught.value)
    assert files_under(share) == set()


def test_download_to_an_existing_fifo_is_invalid_config(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    write_file(share / "d.img", random_bytes(4 * KiB, seed=48))
    fifo = host / "out.fifo"
    os.mkfifo(fifo)

    with pytest.raises(InvalidConfigError):
        nfs_store.download(DownloadRequest("nfs://d.img", str(fifo)))

    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert files_under(host) == {"out.fifo"}


# --- a full destination disk leaves nothing on it ------------------------------------------


def test_download_onto_a_disk_that_is_full_from_the_start_leaves_nothing(
    nfs_store: Storage, mount_tmpfs: Any, host: Path
) -> None:
    small = mount_tmpfs("full-host", size="16m")
    up = nfs_store.upload(
        UploadRequest(str(write_file(host / "d.img", random_bytes(2 * MiB, seed=49))), "nfs://d")
    )
    fill_completely(small / "filler")

    with pytest.raises(OperationFailedError) as caught:
        nfs_store.download(DownloadRequest(up.url, str(small / "vm" / "imported.img")))

    assert "space" in str(caught.value).lower()
    assert files_under(small) == {"filler"}


def test_download_that_fills_the_disk_midway_leaves_nothing_even_when_resumable(
    nfs_store: Storage, mount_tmpfs: Any, host: Path
) -> None:
    small = mount_tmpfs("filling-host", size="16m")
    data = random_bytes(20 * MiB, seed=50)
    up = nfs_store.upload(UploadRequest(str(write_file(host / "big.img", data)), "nfs://big"))
    dest = small / "imported.img"
    # What a first attempt interrupted early leaves: a valid prefix, resumable ...
    write_file(small / "imported.img.vmstore-partial", data[: 4 * MiB])

    # ... and the retry that runs out of space removes it: keeping it keeps the disk full.
    with pytest.raises(OperationFailedError):
        nfs_store.download(DownloadRequest(up.url, str(dest), resume=True))

    assert files_under(small) == set()
    assert os.statvfs(small).f_bfree * os.statvfs(small).f_frsize > 15 * MiB


def fill_completely(path: Path) -> None:
    """Write until the file system has not one byte left (unbuffered: nothing pending)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (MiB, 4 * KiB, 1):
            block = random_bytes(size, seed=51)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
    finally:
        os.close(fd)


# --- streams --------------------------------------------------------------------------------


class ReadOnlyStream:
    """A source with read() only (no readinto), handing out at most 10,000 bytes per call,
    as a pipe does."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.reads = 0

    def read(self, size: int = -1, /) -> bytes:
        self.reads += 1
        return self._data.read(min(size, 10_000))


def test_upload_from_a_stream_stores_the_bytes_and_their_checksum(
    nfs_store: Storage, share: Path
) -> None:
    data = random_bytes(3 * CHUNK + 17, seed=52)

    up = nfs_store.upload(
        UploadRequest(source_stream=ReadOnlyStream(data), destination_url="nfs://s.img")
    )

    assert (share / "s.img").read_bytes() == data
    assert (up.checksum, up.size, up.bytes_transferred) == (
        sha256_bytes(data),
        len(data),
        len(data),
    )
    assert up.resumed_from == 0
    assert nfs_store.get_metadata("nfs://s.img").checksum == sha256_bytes(data)
    assert files_under(share) == {"s.img", "s.img.vmstore.json"}


def test_upload_from_a_pipe_reads_it_once_and_keeps_trailing_zeros(
    nfs_store: Storage, share: Path
) -> None:
    data = random_bytes(CHUNK, seed=53) + bytes(2 * CHUNK + 5)  # ends in zero chunks
    read_end, write_end = os.pipe()

    def produce() -> None:
        with open(write_end, "wb") as pipe:
            pipe.write(data)

    producer = threading.Thread(target=produce)
    producer.start()
    with open(read_end, "rb") as pipe:
        up = nfs_store.upload(
            UploadRequest(source_stream=pipe, destination_url="nfs://p.img", size_hint=len(data))
        )
    producer.join()

    assert (share / "p.img").read_bytes() == data
    assert up.checksum == sha256_bytes(data)
    assert allocated_bytes(share / "p.img") <= CHUNK + 64 * KiB  # the zeros stayed holes


@pytest.mark.parametrize("size_hint", [0, 100, 5 * CHUNK])
def test_stream_upload_whose_size_hint_is_wrong_commits_nothing(
    nfs_store: Storage, share: Path, size_hint: int
) -> None:
    data = random_bytes(2 * CHUNK, seed=54)
    write_file(share / "s.img", b"previous version")

    with pytest.raises(InvalidConfigError) as caught:
        nfs_store.upload(
            UploadRequest(
                source_stream=io.BytesIO(data), destination_url="nfs://s.img", size_hint=size_hint
            )
        )

    assert "size_hint" in str(caught.value)
    assert (share / "s.img").read_bytes() == b"previous version"
    assert files_under(share) == {"s.img"}


def test_interrupted_stream_upload_leaves_nothing_to_resume(
    nfs_store: Storage, share: Path
) -> None:
    data = random_bytes(4 * CHUNK, seed=55)

    with pytest.raises(Interrupted):
        nfs_store.upload(
            UploadRequest(
                source_stream=io.BytesIO(data),
                destination_url="nfs://s.img",
                size_hint=len(data),
                progress_callback=InterruptAt(CHUNK),
            )
        )

    assert files_under(share) == set()


def test_stream_upload_failing_read_is_a_storage_error_and_commits_nothing(
    nfs_store: Storage, share: Path
) -> None:
    class BrokenStream:
        def read(self, size: int = -1, /) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OperationFailedError):
        nfs_store.upload(UploadRequest(source_stream=BrokenStream(), destination_url="nfs://x"))

    assert files_under(share) == set()


def test_download_to_a_stream_delivers_the_bytes_in_order(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(5 * CHUNK + 3, seed=56)
    up = nfs_store.upload(UploadRequest(str(write_file(host / "d.img", data)), "nfs://d.img"))
    sink = io.BytesIO()

    down = nfs_store.download(DownloadRequest(up.url, destination_stream=sink))

    assert sink.getvalue() == data
    assert (down.checksum, down.content_length, down.bytes_transferred) == (
        sha256_bytes(data),
        len(data),
        len(data),
    )
    assert down.destination_path is None


def test_stream_download_with_a_wrong_checksum_says_the_consumer_has_the_bytes(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(2 * CHUNK, seed=57)
    up = nfs_store.upload(UploadRequest(str(write_file(host / "d.img", data)), "nfs://d.img"))
    sink = io.BytesIO()

    with pytest.raises(ChecksumMismatchError) as caught:
        nfs_store.download(
            DownloadRequest(up.url, destination_stream=sink, expected_checksum="0" * 64)
        )

    assert "already received" in str(caught.value).lower()
    assert sink.getvalue() == data


def test_stream_download_verifies_against_the_stored_checksum(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    data = random_bytes(2 * CHUNK, seed=58)
    up = nfs_store.upload(UploadRequest(str(write_file(host / "d.img", data)), "nfs://d.img"))
    with open(share / "d.img", "r+b") as f:  # a bit flipped in place: same inode and size
        f.seek(1000)
        f.write(bytes([data[1000] ^ 1]))
    # Keep the mtime so that the sidecar still describes the file: only the bytes differ.
    st = os.stat(share / "d.img")
    os.utime(
        share / "d.img",
        ns=(st.st_atime_ns, json.loads(sidecar_path(share, "d.img").read_text())["mtime_ns"]),
    )

    with pytest.raises(ChecksumMismatchError):
        nfs_store.download(DownloadRequest(up.url, destination_stream=io.BytesIO()))


# --- the "not NFS" notice ---------------------------------------------------------------------


def test_a_local_directory_is_warned_about_once_per_process(
    share: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmstore.nfs")

    for _ in range(3):
        new_storage(nfs(share)).close()

    warnings = [
        r for r in caplog.records if r.levelno >= logging.WARNING and "not NFS" in r.message
    ]
    assert len(warnings) == 1
    assert "local filesystem" in warnings[0].message


def test_a_shared_filesystem_that_is_not_nfs_is_named_not_warned_about(
    share: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mock of statfs's answer: no CephFS can be mounted here (the magic-number table and
    # the FUSE subtype lookup are tested in rust/src/fsinfo.rs).
    from vmstore.backends import nfs as nfs_backend

    monkeypatch.setattr(nfs_backend._native, "is_network_filesystem", lambda path: (True, "cephfs"))
    caplog.set_level(logging.INFO, logger="vmstore.nfs")

    new_storage(nfs(share)).close()

    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("cephfs" in r.message and "not NFS" in r.message for r in caplog.records)


# --- delete cleans up after every transfer to the URL -----------------------------------------


def test_delete_removes_partials_of_every_host_and_leftover_temp_files(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    nfs_store.upload(
        UploadRequest(str(write_file(host / "d.img", random_bytes(KiB))), "nfs://vm/d.img")
    )
    for leftover in (
        "d.img.vmstore-partial-other-host",
        "d.img.vmstore-tmp-other-host-123-abcd1234",
        "d.img.vmstore.json.vmstore-tmp-other-host-123-ef567890",
    ):
        write_file(share / "vm" / leftover, b"left by a crashed transfer")
    write_file(share / "vm" / "d.img2", b"another object")
    write_file(share / "vm" / "d.img2.vmstore-partial-other-host", b"another object's partial")

    nfs_store.delete("nfs://vm/d.img")

    assert files_under(share) == {"vm/d.img2", "vm/d.img2.vmstore-partial-other-host"}


def test_delete_keeps_a_partial_that_a_running_transfer_holds(
    nfs_store: Storage, share: Path
) -> None:
    write_file(share / "d.img", b"data")
    partial = write_file(share / "d.img.vmstore-partial-other-host", b"being written")

    with open(partial, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the writing transfer holds
        nfs_store.delete("nfs://d.img")

    assert files_under(share) == {partial.name}


# --- absurd chunk sizes are refused before any allocation -------------------------------------


def test_a_terabyte_chunk_size_is_invalid_config_not_a_process_abort(share: Path) -> None:
    with pytest.raises(InvalidConfigError) as caught:
        new_storage(StorageConfig(type="nfs", endpoint=str(share), chunk_size=1 << 40))

    assert "chunk_size" in str(caught.value)


def test_upload_whose_commit_fails_leaves_the_previous_object_and_its_checksum(
    nfs_store: Storage, share: Path, host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mock: on NFS a full server is often reported only by the fsync of the commit, after
    # the sidecar was written; no local file system fails an fsync on demand.
    from vmstore.backends import nfs as nfs_backend

    v1 = random_bytes(MiB, seed=59)
    nfs_store.upload(UploadRequest(str(write_file(host / "v1.img", v1)), "nfs://disk.img"))
    real_writer = nfs_backend._native.ChunkWriter

    class FsyncFailsWriter:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._writer = real_writer(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._writer, name)

        def commit(self) -> None:
            self._writer.abort()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nfs_backend._native, "ChunkWriter", FsyncFailsWriter)
    v2 = io.BytesIO(random_bytes(MiB, seed=60))  # same size as v1; a stream, whose writer
    # is driven from Python (copy_file takes only the native writer)

    with pytest.raises(OperationFailedError):
        nfs_store.upload(UploadRequest(source_stream=v2, destination_url="nfs://disk.img"))

    md = nfs_store.get_metadata("nfs://disk.img")
    assert (share / "disk.img").read_bytes() == v1
    assert md.checksum == sha256_bytes(v1)
    assert files_under(share) == {"disk.img", "disk.img.vmstore.json"}


def test_stream_upload_of_unknown_size_reports_progress_with_a_total_of_0_until_the_end(
    nfs_store: Storage,
) -> None:
    data = random_bytes(6 * CHUNK, seed=64)
    calls: list[tuple[int, int]] = []

    nfs_store.upload(
        UploadRequest(
            source_stream=ReadOnlyStream(data),
            destination_url="nfs://s.img",
            progress_callback=lambda done, total: calls.append((done, total)),
        )
    )

    assert calls[-1] == (len(data), len(data))
    assert all(total == 0 for _done, total in calls[:-1])
    assert [done for done, _total in calls] == sorted(done for done, _total in calls)
