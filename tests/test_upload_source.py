"""How the upload pipeline opens a file source (O_DIRECT where the filesystem suits it) and
feeds its parts to the senders (PartFeed: on a thread of its own, or inline)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from vmstore import _native
from vmstore._localpath import direct_io_suits
from vmstore._upload import PartFeed, check_stored_size, part_view, plan_source
from vmstore.errors import CancelledError, ChecksumMismatchError, ErrorType
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


def _feed_parts(path: Path, depth: int, keep: set[int] | None = None) -> list[tuple[int, bytes]]:
    request = UploadRequest(source_path=str(path), destination_url="/x")
    plan = plan_source(request, lambda _size: 4096)
    parts = []
    with PartFeed(plan, depth=depth, keep=lambda n: keep is None or n in keep) as feed:
        for part in feed:
            if depth == 0:
                # Inline: no read-ahead thread of the feed's own.
                assert "vmstore-read" not in {t.name for t in threading.enumerate()}
            parts.append((part.number, bytes(part_view(part)) if part.data is not None else b""))
    return parts


@pytest.mark.parametrize("depth", [0, 1])
def test_the_feed_gives_every_part_in_order_inline_or_on_its_thread(
    tmp_path: Path, depth: int
) -> None:
    data = os.urandom(5 * 4096 + 77)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    parts = _feed_parts(path, depth)
    assert [n for n, _ in parts] == [1, 2, 3, 4, 5, 6]
    assert b"".join(b for _, b in parts) == data
    # Parts a resumed upload already stored are hashed, not kept.
    kept = _feed_parts(path, depth, keep={2, 6})
    assert [(n, len(b)) for n, b in kept] == [(1, 0), (2, 4096), (3, 0), (4, 0), (5, 0), (6, 77)]


def test_an_inline_feed_stops_at_a_cancel(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(4 * 4096))
    plan = plan_source(UploadRequest(source_path=str(path), destination_url="/x"), lambda _s: 4096)
    cancel = _native.CancelToken()
    seen = []
    with PartFeed(plan, depth=0, cancel=cancel) as feed, pytest.raises(CancelledError):
        for part in feed:
            seen.append(part.number)
            cancel.cancel()
    assert seen == [1]


def test_the_size_check_after_a_commit_says_whether_the_object_was_removed() -> None:
    """The one check S3's single PUT and HTTP's PUT share (the servers' own faults are in
    test_s3's short-body test; nginx cannot be made to store a short body)."""
    check_stored_size("http://h/d.img", 10, 10)  # as sent
    check_stored_size("http://h/d.img", None, 10)  # the server does not say
    removed: list[bool] = []

    def discard() -> bool:
        removed.append(True)
        return True

    with pytest.raises(ChecksumMismatchError) as kept:
        check_stored_size("http://h/d.img", 9, 10)
    assert kept.value.type is ErrorType.CHECKSUM_MISMATCH
    assert "held 9 bytes" in str(kept.value) and "left in place" in str(kept.value)
    with pytest.raises(ChecksumMismatchError) as deleted:
        check_stored_size("s3://b/d.img", 9, 10, discard)
    assert removed == [True] and "was deleted" in str(deleted.value)
    with pytest.raises(ChecksumMismatchError) as undeletable:
        check_stored_size("s3://b/d.img", 9, 10, lambda: False)
    assert "left in place" in str(undeletable.value)
