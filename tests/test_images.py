"""Real VM disk images made by qemu-img survive an export/import through the NFS backend.

`qemu-img compare` judges guest-visible contents, `qemu-img check` the qcow2 structure: a
transfer that is byte-identical passes both, and these are the checks a migration
controller's operator would run by hand.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from vmstore import DownloadRequest, Storage, UploadRequest

from tests.support import MiB, allocated_bytes, sha256_path, stays_as_sparse_as

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img not installed (Debian package qemu-utils)"
)


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=120, check=False
    )


def checked(*command: str | Path) -> str:
    result = run(*command)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def compare(fmt_a: str, a: Path, fmt_b: str, b: Path) -> int:
    """`qemu-img compare` exit status: 0 same guest contents, 1 different, 2+ an error."""
    return run("qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b).returncode


def image_info(path: Path) -> dict[str, object]:
    info = json.loads(checked("qemu-img", "info", "--output=json", path))
    assert isinstance(info, dict)
    return info


def write_pattern(image: Path, fmt: str, writes: list[tuple[int, int, int]]) -> None:
    """Write (pattern byte, offset, length) into the guest view of the image."""
    if shutil.which("qemu-io") is not None:
        commands: list[str] = []
        for pattern, offset, length in writes:
            commands += ["-c", f"write -P {pattern:#x} {offset} {length}"]
        checked("qemu-io", "-f", fmt, *commands, image)
        return
    # Without qemu-io: write into a raw file and convert, which gives the same guest view.
    raw = image.with_suffix(".pattern.raw")
    virtual = int(str(image_info(image)["virtual-size"]))
    with open(raw, "wb") as f:
        f.truncate(virtual)
        for pattern, offset, length in writes:
            f.seek(offset)
            f.write(bytes([pattern]) * length)
    checked("qemu-img", "convert", "-f", "raw", "-O", fmt, raw, image)
    raw.unlink()


@pytest.fixture
def qcow2_image(host: Path) -> Path:
    image = host / "disk.qcow2"
    checked("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
    write_pattern(
        image, "qcow2", [(0xAB, 0, MiB), (0xCD, 32 * MiB, 2 * MiB), (0xEF, 63 * MiB, 4096)]
    )
    return image


def round_trip(store: Storage, image: Path, url: str, dest: Path) -> None:
    up = store.upload(UploadRequest(str(image), url, metadata={"vm-name": "test-vm-01"}))
    down = store.download(DownloadRequest(up.url, str(dest), expected_checksum=up.checksum))
    assert up.checksum == down.checksum == sha256_path(image) == sha256_path(dest)


def test_qcow2_image_round_trips_and_passes_qemu_img_check(
    nfs_store: Storage, share: Path, host: Path, qcow2_image: Path
) -> None:
    dest = host / "imported.qcow2"

    round_trip(nfs_store, qcow2_image, "nfs://vm-exports/test-vm-01/disk.qcow2", dest)

    assert compare("qcow2", qcow2_image, "qcow2", dest) == 0
    assert run("qemu-img", "check", "-f", "qcow2", dest).returncode == 0
    exported = share / "vm-exports" / "test-vm-01" / "disk.qcow2"
    assert run("qemu-img", "check", "-f", "qcow2", exported).returncode == 0
    info = image_info(dest)
    assert (info["format"], info["virtual-size"]) == ("qcow2", 64 * MiB)


def test_qemu_img_compare_notices_a_different_image(
    nfs_store: Storage, host: Path, qcow2_image: Path
) -> None:
    """Guards the check itself: compare must fail when one guest byte differs."""
    dest = host / "imported.qcow2"
    round_trip(nfs_store, qcow2_image, "nfs://disk.qcow2", dest)

    write_pattern(dest, "qcow2", [(0x11, 32 * MiB, 512)])

    assert compare("qcow2", qcow2_image, "qcow2", dest) == 1


def test_sparse_raw_image_round_trips_and_stays_sparse(
    nfs_store: Storage, share: Path, host: Path
) -> None:
    image = host / "disk.raw"
    checked("qemu-img", "create", "-q", "-f", "raw", image, "64M")
    write_pattern(image, "raw", [(0x5A, 0, 2 * MiB), (0xA5, 40 * MiB, MiB)])
    dest = host / "imported.raw"

    round_trip(nfs_store, image, "nfs://disk.raw", dest)

    assert compare("raw", image, "raw", dest) == 0
    assert stays_as_sparse_as(share / "disk.raw", image)
    assert stays_as_sparse_as(dest, image)
    assert allocated_bytes(dest) < 8 * MiB  # 64 MiB virtual, 3 MiB of data


def test_vmdk_image_round_trips(nfs_store: Storage, host: Path, qcow2_image: Path) -> None:
    image = host / "disk.vmdk"
    checked("qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", qcow2_image, image)
    dest = host / "imported.vmdk"

    round_trip(nfs_store, image, "nfs://disk.vmdk", dest)

    assert compare("vmdk", image, "vmdk", dest) == 0
    assert compare("qcow2", qcow2_image, "vmdk", dest) == 0
    assert image_info(dest)["format"] == "vmdk"
