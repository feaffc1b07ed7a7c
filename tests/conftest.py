"""Fixtures shared by the whole suite: an NFS share stood in for by a local directory, the
host-side working directory, a tiny tmpfs for disk-full scenarios, the `vmstore` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmstore import Storage, StorageConfig, new_storage

from tests.s3_servers import S3_SERVERS, S3Server, running_s3_server
from tests.socket_guard import SocketGuard

NFS_CHUNK = 256 * 1024


@pytest.fixture(scope="module", params=S3_SERVERS)
def s3_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3Server]:
    """Each real S3 server of the suite in turn (rclone, moto, SeaweedFS), one per module.
    A module that needs one server only defines its own ``s3_server``."""
    with running_s3_server(request.param, tmp_path_factory.mktemp(request.param)) as server:
        yield server


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """vmstore's state directory (resume state, journals) for this test alone."""
    path = tmp_path / "state"
    monkeypatch.setenv("VMSTORE_STATE_DIR", str(path))
    return path


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """The directory the NFS backend is configured with as its mount point."""
    path = tmp_path / "share"
    path.mkdir()
    return path


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Where the host's disk images are made and downloads land."""
    path = tmp_path / "host"
    path.mkdir()
    return path


@pytest.fixture
def nfs_config(share: Path) -> StorageConfig:
    return StorageConfig(type="nfs", endpoint=str(share), chunk_size=NFS_CHUNK)


@pytest.fixture
def nfs_store(nfs_config: StorageConfig) -> Iterator[Storage]:
    with new_storage(nfs_config) as store:
        yield store


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs file systems (root only); each is unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "4m", options: str = "") -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        target = tmp_path / name
        target.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture(scope="session")
def vmstore_cmd() -> str:
    """The installed `vmstore` console script (the one beside this interpreter first)."""
    beside = Path(sys.executable).parent / "vmstore"
    found = str(beside) if beside.exists() else shutil.which("vmstore")
    if found is None:
        pytest.fail("the `vmstore` command is not installed (pip install -e .)")
    return found


@pytest.fixture(autouse=True)
def socket_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[SocketGuard]:
    """Every test may connect to loopback only (tests/socket_guard.py); anything else is
    refused before a packet leaves and fails the test."""
    guard = SocketGuard()
    guard.install(monkeypatch.setattr)
    yield guard
    if guard.violations:
        pytest.fail(f"the test connected outside loopback: {guard.violations}")
