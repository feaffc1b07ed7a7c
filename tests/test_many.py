"""upload_many / download_many details on the NFS backend (fast, no server), the asyncio
wrappers, and the log filter that keeps presigned signatures out of library logs."""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
from pathlib import Path

import pytest
import vmstore.aio
from vmstore import (
    CancelledError,
    CancelToken,
    DownloadRequest,
    DownloadResponse,
    InvalidConfigError,
    NotFoundError,
    Storage,
    StorageConfig,
    UploadRequest,
    UploadResponse,
)
from vmstore._many import concurrency_for

from tests.support import random_bytes, write_file


def _sources(host: Path, count: int = 3, size: int = 300_000) -> list[Path]:
    return [write_file(host / f"d{n}.img", random_bytes(size, seed=n)) for n in range(count)]


def test_a_request_token_cancels_only_its_own_item(nfs_store: Storage, host: Path) -> None:
    paths = _sources(host)
    own = CancelToken()
    own.cancel()
    requests = [UploadRequest(source_path=str(p), destination_url=f"vm/{p.name}") for p in paths]
    requests[1].cancel = own
    results = nfs_store.upload_many(requests)
    assert isinstance(results[0], UploadResponse)
    assert isinstance(results[1], CancelledError)
    assert isinstance(results[2], UploadResponse)


class _SlowStream:
    """A producer that never ends by itself within a test: 64 KiB every 10 ms."""

    def __init__(self) -> None:
        self.reads = 0
        self.reading = threading.Event()

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        self.reading.set()
        time.sleep(0.01)
        return b"\x01" * (64 << 10)


class _VanishingStream:
    """A producer whose data is gone (ENOENT) once ``other`` is being read: so the batch is
    known to have a running item when this one fails, however loaded the machine is."""

    def __init__(self, other: _SlowStream) -> None:
        self._other = other

    def read(self, size: int = -1) -> bytes:
        self._other.reading.wait(10)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/gone.img")


def test_raise_on_error_cancels_the_items_still_running(
    nfs_store: Storage, host: Path, share: Path
) -> None:
    slow = _SlowStream()
    started = time.monotonic()
    with pytest.raises(NotFoundError):
        nfs_store.upload_many(
            [
                UploadRequest(source_stream=slow, destination_url="vm/endless.img"),
                UploadRequest(source_stream=_VanishingStream(slow), destination_url="vm/a.img"),
            ],
            raise_on_error=True,
        )
    assert time.monotonic() - started < 10
    assert slow.reads > 0  # it was running when the other item failed
    assert not (share / "vm" / "endless.img").exists()


def test_a_progress_callback_that_raises_stops_the_batch_with_its_own_exception(
    nfs_store: Storage, host: Path
) -> None:
    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        raise Stop()

    paths = _sources(host)
    with pytest.raises(Stop):
        nfs_store.upload_many(
            [UploadRequest(source_path=str(p), destination_url=f"vm/{p.name}") for p in paths],
            progress_callback=stop,
        )


def test_combined_progress_reads_as_the_end_only_at_the_end(
    tmp_path: Path, share: Path, host: Path
) -> None:
    calls: list[tuple[int, int]] = []
    paths = _sources(host, count=6, size=2 << 20)
    config = StorageConfig(type="nfs", endpoint=str(share), chunk_size=64 << 10, concurrency=2)
    with vmstore.new_storage(config) as store:
        store.upload_many(
            [UploadRequest(source_path=str(p), destination_url=f"vm/{p.name}") for p in paths],
            progress_callback=lambda done, total: calls.append((done, total)),
        )
    total = 6 * (2 << 20)
    assert calls[-1] == (total, total)
    # File sizes are known up front, so the total is right from the first report.
    assert {t for _d, t in calls} == {total}
    assert [c for c in calls if c[0] == c[1]] == [(total, total)]


def test_items_of_the_wrong_type_are_refused(nfs_store: Storage) -> None:
    with pytest.raises(InvalidConfigError, match="item 0 is a DownloadRequest"):
        nfs_store.upload_many([DownloadRequest("vm/x", destination_path="x")])  # type: ignore[list-item]
    with pytest.raises(InvalidConfigError, match="raise_on_error"):
        nfs_store.download_many([], raise_on_error="yes")  # type: ignore[arg-type]
    assert nfs_store.upload_many([]) == []


def test_an_item_share_never_exceeds_the_configured_concurrency() -> None:
    assert concurrency_for(4) == 4  # outside a batch: the store's own


def test_aio_upload_many_and_download_many(share: Path, host: Path) -> None:
    paths = _sources(host)
    seen: list[tuple[int, int]] = []

    async def progress(done: int, total: int) -> None:
        seen.append((done, total))

    async def main() -> tuple[list[object], list[object]]:
        config = StorageConfig(type="nfs", endpoint=str(share))
        async with vmstore.aio.new_storage(config) as store:
            ups = await store.upload_many(
                [UploadRequest(source_path=str(p), destination_url=f"vm/{p.name}") for p in paths],
                progress_callback=progress,
            )
            downs = await store.download_many(
                [DownloadRequest(f"vm/{p.name}", destination_path=str(p) + ".back") for p in paths]
            )
            with pytest.raises(InvalidConfigError, match="presign is an S3 feature"):
                await store.presign("vm/d0.img")
            return list(ups), list(downs)

    ups, downs = asyncio.run(main())
    assert all(isinstance(r, UploadResponse) for r in ups)
    assert all(isinstance(r, DownloadResponse) for r in downs)
    for path in paths:
        assert Path(str(path) + ".back").read_bytes() == path.read_bytes()
    assert seen[-1] == (3 * 300_000, 3 * 300_000)


def test_library_debug_logs_never_show_a_signature(caplog: pytest.LogCaptureFixture) -> None:
    from vmstore import _logredact

    _logredact.install()
    caplog.set_level(logging.DEBUG)
    signature = "ab8535f61c52a2aa143286733d0045c06ae12795f5ae33c73497d43e27513499"
    logging.getLogger("urllib3.connectionpool").debug(
        '%s://%s:%s "%s %s %s" %s %s', "http", "127.0.0.1", 9000, "GET",
        f"/b/k?X-Amz-Credential=key%2F2026&X-Amz-Signature={signature}", "HTTP/1.1", 206, 1,
    )  # fmt: skip
    logging.getLogger("botocore.auth").debug("Signature:\n%s", signature)
    assert signature not in caplog.text
    assert "key%2F2026" not in caplog.text
    assert "X-Amz-Signature=REDACTED" in caplog.text


@pytest.mark.parametrize(
    ("concurrency", "items", "shares"),
    # (items beyond the budget start as slots come back, with what is free then: not pinned)
    [(4, 3, [2, 1, 1]), (4, 10, [1] * 4), (8, 2, [4, 4]), (1, 3, [1]), (64, 3, [22, 21, 21])],
)
def test_items_share_the_budget_in_input_order(
    host: Path, concurrency: int, items: int, shares: list[int]
) -> None:
    from vmstore import _many

    seen: dict[str, int] = {}
    running = 0
    peak = 0
    lock = threading.Lock()

    def upload(request: UploadRequest) -> UploadResponse:
        nonlocal running, peak
        share = concurrency_for(concurrency)
        with lock:
            seen[request.destination_url] = share
            running += share
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= share
        return UploadResponse(request.destination_url, "0" * 64, 0, "", 0)

    source = write_file(host / "s.img", b"x")
    results = _many.upload_many(
        [UploadRequest(source_path=str(source), destination_url=f"u{n}") for n in range(items)],
        upload,
        lambda url: url,
        concurrency=concurrency,
        raise_on_error=False,
        progress_callback=None,
        cancel=None,
    )
    urls = [f"u{n}" for n in range(items)]
    assert [r.url for r in results if isinstance(r, UploadResponse)] == urls
    assert [seen[url] for url in urls[: len(shares)]] == shares
    assert peak <= concurrency
