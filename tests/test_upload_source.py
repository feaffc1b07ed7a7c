"""How the upload pipeline opens a file source: O_DIRECT where the filesystem suits it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from vmstore import _native
from vmstore._localpath import direct_io_suits
from vmstore._upload import plan_source
from vmstore.models import UploadRequest


def _takes_o_direct(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def test_a_local_disk_file_is_read_with_o_direct_by_default_and_hashes_the_same(
    tmp_path: Path,
) -> None:
    data = os.urandom(3 * 4096 + 1234)  # an unaligned tail: the last block is partial
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    if not _takes_o_direct(path) or not direct_io_suits(str(path)):
        pytest.skip(f"{tmp_path} is not a local filesystem that takes O_DIRECT")
    request = UploadRequest(source_path=str(path), destination_url="/x")
    direct = plan_source(request, lambda _size: 4096)
    cached = plan_source(request, lambda _size: 4096, direct=False)
    assert direct.source.direct and not cached.source.direct
    for plan in (direct, cached):
        got = b""
        while (part := plan.source.next_part(4096)) is not None:
            got += bytes(memoryview(part.data).cast("B"))
        assert got == data
    assert direct.source.sha256() == cached.source.sha256()
    assert direct.source.crc64nvme() == cached.source.crc64nvme() == _native.crc64nvme(data)


def test_a_filesystem_without_o_direct_is_read_cached(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    path = shm / f"vmstore-test-{os.getpid()}.raw"
    path.write_bytes(b"x" * 10_000)
    try:
        if _takes_o_direct(path):
            pytest.skip("/dev/shm takes O_DIRECT here")
        request = UploadRequest(source_path=str(path), destination_url="/x")
        plan = plan_source(request, lambda _size: 1 << 20)
        assert not plan.source.direct
        part = plan.source.next_part(1 << 20)
        assert part is not None and part.length == 10_000
    finally:
        path.unlink()
