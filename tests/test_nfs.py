"""The NFS backend's own rules: containment in the mount, URL forms, mount checks, the sidecar,
errno mapping, a full disk, sparse files and concurrent writers.

The share is a local directory (or a small tmpfs where a scenario needs a file system with
particular properties); the backend treats both exactly like a mounted NFS export.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from vmstore import (
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
