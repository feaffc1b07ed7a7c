"""Many disks at once: ``upload_many`` / ``download_many`` on every backend.

A result per item in input order, a failure that stays with its item, one progress view,
one cancel, and one concurrency budget for the whole batch, counted where it matters: at the
server (through a proxy that counts requests in flight), or for NFS at the sources being read.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from vmstore import (
    CancelledError,
    CancelToken,
    DownloadRequest,
    DownloadResponse,
    InvalidConfigError,
    NotFoundError,
    Storage,
    StorageError,
    UploadRequest,
    UploadResponse,
    _many,
)

from tests.support import is_non_decreasing, random_bytes, sha256_bytes, write_file

from .harness import CHUNK, BackendHarness, Capability, S3Harness
from .inflight import CountingProxy

SIZES = [3 * CHUNK + 11, 1, 5 * CHUNK]


def _three_sources(workdir: Path) -> list[tuple[Path, bytes]]:
    made = []
    for number, size in enumerate(SIZES):
        data = random_bytes(size, seed=100 + number)
        made.append((write_file(workdir / f"disk-{number}.img", data), data))
    return made


class Recorder:
    """A progress callback that keeps every call (from whichever thread)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            self.calls.append((done, total))


def test_three_files_go_up_and_come_back_in_input_order_with_one_progress_view(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    sources = _three_sources(workdir)
    combined, own = Recorder(), [Recorder() for _ in sources]
    uploads = store.upload_many(
        [
            UploadRequest(
                source_path=str(path),
                destination_url=backend.url(f"vm-01/{path.name}"),
                progress_callback=own[number],
            )
            for number, (path, _data) in enumerate(sources)
        ],
        progress_callback=combined,
    )
    assert [type(result) for result in uploads] == [UploadResponse] * 3
    for (path, data), result in zip(sources, uploads, strict=True):
        assert isinstance(result, UploadResponse)
        assert result.url == backend.url(f"vm-01/{path.name}")
        assert result.checksum == sha256_bytes(data)
        assert backend.read_object(f"vm-01/{path.name}") == data
    everything = sum(SIZES)
    assert combined.calls[-1] == (everything, everything)
    assert is_non_decreasing(done for done, _total in combined.calls)
    assert all(done <= total for done, total in combined.calls)
    for recorder, size in zip(own, SIZES, strict=True):
        assert recorder.calls[-1] == (size, size)

    combined = Recorder()
    downloads = store.download_many(
        [
            DownloadRequest(
                source_url=result.url,
                destination_path=str(workdir / f"back-{number}.img"),
                expected_checksum=result.checksum,
            )
            for number, result in enumerate(uploads)
            if isinstance(result, UploadResponse)
        ],
        progress_callback=combined,
    )
    for number, ((_path, data), result) in enumerate(zip(sources, downloads, strict=True)):
        assert isinstance(result, DownloadResponse)
        assert result.destination_path == str(workdir / f"back-{number}.img")
        assert (workdir / f"back-{number}.img").read_bytes() == data
    assert combined.calls[-1] == (everything, everything)
    assert is_non_decreasing(done for done, _total in combined.calls)


def test_a_missing_source_fails_its_item_and_the_others_complete(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    sources = _three_sources(workdir)
    requests = [
        UploadRequest(source_path=str(path), destination_url=backend.url(path.name))
        for path, _data in sources
    ]
    requests.insert(1, UploadRequest(source_path=str(workdir / "absent.img"),
                                     destination_url=backend.url("absent.img")))  # fmt: skip
    results = store.upload_many(requests)
    assert isinstance(results[1], NotFoundError)
    assert [isinstance(r, UploadResponse) for r in results] == [True, False, True, True]
    for path, data in sources:
        assert backend.read_object(path.name) == data
    assert backend.read_object("absent.img") is None

    downloads = store.download_many(
        [
            DownloadRequest(backend.url("disk-0.img"), destination_path=str(workdir / "a")),
            DownloadRequest(backend.url("never-stored.img"), destination_path=str(workdir / "b")),
            DownloadRequest(backend.url("disk-2.img"), destination_path=str(workdir / "c")),
        ]
    )
    assert isinstance(downloads[0], DownloadResponse)
    assert isinstance(downloads[1], NotFoundError)
    assert isinstance(downloads[2], DownloadResponse)
    assert (workdir / "a").read_bytes() == sources[0][1]
    assert (workdir / "c").read_bytes() == sources[2][1]
    assert not (workdir / "b").exists()


def test_raise_on_error_raises_the_first_failure_and_starts_nothing_more(
    backend: BackendHarness, workdir: Path
) -> None:
    sources = _three_sources(workdir)
    requests = [UploadRequest(source_path=str(workdir / "absent.img"),
                              destination_url=backend.url("absent.img"))]  # fmt: skip
    requests += [
        UploadRequest(source_path=str(path), destination_url=backend.url(path.name))
        for path, _data in sources
    ]
    # One at a time: the failure comes first, so nothing after it may be sent.
    with backend.open(concurrency=1) as store, pytest.raises(NotFoundError):
        store.upload_many(requests, raise_on_error=True)
    assert backend.read_object("disk-0.img") is None
    assert backend.read_object("disk-2.img") is None


def test_two_items_with_one_destination_are_refused_before_anything_starts(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    (first, _), (second, _), _third = _three_sources(workdir)
    with pytest.raises(InvalidConfigError, match="same destination"):
        store.upload_many(
            [
                UploadRequest(source_path=str(first), destination_url=backend.url("same.img")),
                UploadRequest(source_path=str(second), destination_url=backend.url("same.img")),
            ]
        )
    assert backend.stored_names() == set()
    with pytest.raises(InvalidConfigError, match="same destination"):
        store.download_many(
            [
                DownloadRequest(backend.url("x.img"), destination_path=str(workdir / "d.img")),
                DownloadRequest(backend.url("y.img"), destination_path=str(workdir / "e/../d.img")),
            ]
        )


def test_one_cancel_token_cancels_every_item(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    sources = _three_sources(workdir)
    token = CancelToken()
    token.cancel()
    results = store.upload_many(
        [
            UploadRequest(source_path=str(path), destination_url=backend.url(path.name))
            for path, _data in sources
        ],
        cancel=token,
    )
    assert all(isinstance(result, CancelledError) for result in results)
    for path, _data in sources:
        assert backend.read_object(path.name) is None


def test_a_cancel_during_the_batch_stops_the_items_still_running(
    backend: BackendHarness, workdir: Path
) -> None:
    data = random_bytes(6 * CHUNK, seed=7)
    paths = [write_file(workdir / f"slow-{n}.img", data) for n in range(3)]
    token = CancelToken()

    def cancel_once_moving(done: int, total: int) -> None:
        if done:
            token.cancel()

    with backend.open(concurrency=1) as store:
        results = store.upload_many(
            [UploadRequest(source_path=str(p), destination_url=backend.url(p.name)) for p in paths],
            progress_callback=cancel_once_moving,
            cancel=token,
        )
    # One at a time: the first item may finish, the last one cannot even have started.
    assert isinstance(results[-1], CancelledError)
    assert "before it started" in str(results[-1])
    assert backend.read_object(paths[-1].name) is None


# --- the budget: never more in flight than ``concurrency`` -------------------------------


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


@pytest.fixture
def counted(backend: BackendHarness) -> Iterator[tuple[BackendHarness, CountingProxy]]:
    """The backend with every request going through a CountingProxy."""
    if backend.name == "nfs":
        pytest.skip("NFS sends no requests: see the wrapped-reader test below")
    if backend.config.type == "https":
        pytest.skip("the counting proxy reads the requests, so it needs plain http")
    if isinstance(backend, S3Harness):
        upstream = _port(backend.config.endpoint)
    else:
        upstream = _port(backend.url("x"))
    with CountingProxy(upstream) as proxy:
        old, new = f"127.0.0.1:{upstream}", f"127.0.0.1:{proxy.port}"
        config = dataclasses.replace(
            backend.config, endpoint=backend.config.endpoint.replace(old, new), concurrency=3
        )
        harness = dataclasses.replace(backend, config=config)
        original_url = type(backend).url

        def url(self: BackendHarness, key: str) -> str:
            return original_url(self, key).replace(old, new)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(harness), "url", url)
            yield harness, proxy


def test_the_batch_never_has_more_requests_in_flight_than_concurrency(
    counted: tuple[BackendHarness, CountingProxy], workdir: Path
) -> None:
    backend, proxy = counted
    # Multi-part on every backend (S3 parts are 5 MiB), four items for a budget of three.
    size = 11 << 20
    paths = [write_file(workdir / f"big-{n}.img", random_bytes(size, seed=n)) for n in range(4)]
    with backend.open() as store:
        uploads = store.upload_many(
            [UploadRequest(source_path=str(p), destination_url=backend.url(p.name)) for p in paths]
        )
        assert all(isinstance(result, UploadResponse) for result in uploads), uploads
        upload_peak, upload_requests = proxy.peak, proxy.requests
        proxy.reset()
        downloads = store.download_many(
            [
                DownloadRequest(backend.url(p.name), destination_path=str(workdir / f"{n}.back"))
                for n, p in enumerate(paths)
            ]
        )
        assert all(isinstance(result, DownloadResponse) for result in downloads), downloads
        download_peak, download_requests = proxy.peak, proxy.requests
    assert 2 <= upload_peak <= 3, (upload_peak, upload_requests)
    if Capability.DOWNLOAD_RESUME in backend.capabilities:  # ranges: one GET per chunk
        # 4 x 44 chunks of 256 KiB: plenty of work for every slot of the budget, never more.
        assert download_requests >= 4 * (size // CHUNK)
    assert 2 <= download_peak <= 3, (download_peak, download_requests)


class _CountingStream:
    """A source stream that counts the streams being read at once (from first read to EOF)."""

    active = 0
    peak = 0
    lock = threading.Lock()

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0
        self._started = False

    def read(self, size: int = -1) -> bytes:
        cls = type(self)
        if not self._started:
            self._started = True
            with cls.lock:
                cls.active += 1
                cls.peak = max(cls.peak, cls.active)
        time.sleep(0.005)  # a slow producer, so the items overlap in time
        size = len(self._data) if size < 0 else size
        block = self._data[self._position : self._position + size]
        self._position += len(block)
        if not block:
            with cls.lock:
                cls.active -= 1
        return block


def test_nfs_batch_reads_no_more_sources_at_once_than_concurrency(
    backend: BackendHarness, workdir: Path
) -> None:
    if backend.name != "nfs":
        pytest.skip("the network backends are counted at the server (test above)")
    _CountingStream.active = _CountingStream.peak = 0
    data = random_bytes(4 * CHUNK, seed=3)
    with backend.open(concurrency=2) as store:
        results: list[UploadResponse | StorageError] = store.upload_many(
            [
                UploadRequest(
                    source_stream=_CountingStream(data), destination_url=backend.url(f"s-{n}.img")
                )
                for n in range(5)
            ]
        )
    assert all(isinstance(result, UploadResponse) for result in results), results
    assert _CountingStream.peak == 2


def test_the_counting_proxy_sees_an_overshoot_when_the_budget_is_not_split(
    counted: tuple[BackendHarness, CountingProxy], workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: with every item given the whole budget (the split
    switched off), the proxy counts more than ``concurrency`` in flight (S3: parts going up;
    HTTP: ranged GETs coming down; a server without ranges gets one request per item)."""
    backend, proxy = counted
    if Capability.DOWNLOAD_RESUME not in backend.capabilities:
        pytest.skip("one request per item in both directions: nothing to overshoot with")
    monkeypatch.setattr(_many, "concurrency_for", lambda concurrency: concurrency)
    size = 11 << 20
    paths = [write_file(workdir / f"big-{n}.img", random_bytes(size, seed=n)) for n in range(4)]
    with backend.open() as store:
        uploads = store.upload_many(
            [UploadRequest(source_path=str(p), destination_url=backend.url(p.name)) for p in paths]
        )
        upload_peak = proxy.peak
        proxy.reset()
        downloads = store.download_many(
            [
                DownloadRequest(backend.url(p.name), destination_path=str(workdir / f"{n}.back"))
                for n, p in enumerate(paths)
            ]
        )
    assert all(isinstance(result, UploadResponse) for result in uploads), uploads
    assert all(isinstance(result, DownloadResponse) for result in downloads), downloads
    assert max(upload_peak, proxy.peak) > 3, (upload_peak, proxy.peak)
