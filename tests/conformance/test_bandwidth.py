"""The bandwidth limit (``StorageConfig.max_bandwidth``): every backend, both directions.

The contract: the bytes of a store's transfers together never cross the wire faster than
``max_bandwidth`` bytes/s, after a burst of at most ``max(1 MiB, rate / 8)``. So a transfer of
``size`` bytes takes at least ``(size - burst) / rate`` seconds, however it moves (parts,
chunks, streams, several transfers at once). Only lower bounds are asserted: a busy machine
makes everything slower, never faster. Rates are MiB/s and data a few MiB, so the suite
stays quick.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from vmstore import CancelledError, CancelToken, DownloadRequest, Storage, UploadRequest

from tests.support import MiB, random_bytes, sha256_bytes, write_file

from .harness import BackendHarness

RATE = 8 * MiB
SIZE = 6 * MiB + 1
"""More than one S3 part (5 MiB) and many chunks of every harness."""


def min_seconds(size: int, rate: int) -> float:
    """The least time the contract allows for ``size`` bytes at ``rate`` bytes/s."""
    return max(0, size - max(MiB, rate // 8)) / rate


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def test_a_limited_upload_and_download_take_at_least_size_over_rate(
    backend: BackendHarness, workdir: Path
) -> None:
    data = random_bytes(SIZE, seed=91)
    source = write_file(workdir / "disk.img", data)
    with backend.open(max_bandwidth=RATE) as store:
        url = backend.url("disk.img")
        up_seconds = timed(lambda: store.upload(UploadRequest(str(source), url)))
        back = workdir / "back.img"
        down_seconds = timed(lambda: store.download(DownloadRequest(url, str(back))))

    assert backend.read_object("disk.img") == data
    assert back.read_bytes() == data
    least = min_seconds(SIZE, RATE)
    assert up_seconds >= least, f"upload of {SIZE} bytes took {up_seconds:.3f} s < {least:.3f} s"
    assert down_seconds >= least, f"download took {down_seconds:.3f} s < {least:.3f} s"


def test_concurrent_transfers_share_one_limit(backend: BackendHarness, workdir: Path) -> None:
    """Two uploads at once on one store: together, not each, within the limit."""
    each = 3 * MiB
    sources = [
        write_file(workdir / f"disk{i}.img", random_bytes(each, seed=92 + i)) for i in (0, 1)
    ]
    errors: list[BaseException] = []
    with backend.open(max_bandwidth=RATE) as store:

        def upload(index: int) -> None:
            try:
                store.upload(UploadRequest(str(sources[index]), backend.url(f"disk{index}.img")))
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)

        threads = [threading.Thread(target=upload, args=(i,)) for i in (0, 1)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - started

    assert not errors, errors
    for i in (0, 1):
        assert backend.read_object(f"disk{i}.img") == sources[i].read_bytes()
    least = min_seconds(2 * each, RATE)
    assert seconds >= least, f"two uploads of {each} bytes took {seconds:.3f} s < {least:.3f} s"


def test_limited_streams_take_at_least_size_over_rate(
    backend: BackendHarness, workdir: Path
) -> None:
    size = 3 * MiB
    data = random_bytes(size, seed=94)
    url = backend.url("piped.img")
    with backend.open(max_bandwidth=RATE) as store:
        up_seconds = timed(
            lambda: store.upload(UploadRequest(source_stream=io.BytesIO(data), destination_url=url))
        )
        sink = io.BytesIO()
        down_seconds = timed(
            lambda: store.download(DownloadRequest(source_url=url, destination_stream=sink))
        )

    assert backend.read_object("piped.img") == data
    assert sha256_bytes(sink.getvalue()) == sha256_bytes(data)
    least = min_seconds(size, RATE)
    assert up_seconds >= least, f"stream upload took {up_seconds:.3f} s < {least:.3f} s"
    assert down_seconds >= least, f"stream download took {down_seconds:.3f} s < {least:.3f} s"


@pytest.mark.parametrize("unlimited", [None, 0], ids=["None", "zero"])
def test_an_unlimited_store_is_not_slowed(
    backend: BackendHarness, workdir: Path, unlimited: int | None
) -> None:
    data = random_bytes(SIZE, seed=95)
    source = write_file(workdir / "disk.img", data)
    with backend.open(max_bandwidth=unlimited) as store:
        url = backend.url("disk.img")
        seconds = timed(lambda: store.upload(UploadRequest(str(source), url)))
        seconds += timed(lambda: store.download(DownloadRequest(url, str(workdir / "back.img"))))

    assert (workdir / "back.img").read_bytes() == data
    # Not a speed test: only far faster than even a generous limit (2 MiB/s) would allow.
    assert seconds < 2 * min_seconds(SIZE, 2 * MiB), f"took {seconds:.3f} s"


def _cancel_soon(token: CancelToken, after: float = 0.3) -> threading.Timer:
    timer = threading.Timer(after, token.cancel)
    timer.start()
    return timer


SLOW = 256 * 1024
"""A limit at which the 4 MiB below would take more than 14 s."""


def test_a_cancelled_upload_does_not_sit_out_the_limit(
    backend: BackendHarness, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(4 * MiB, seed=96))
    token = CancelToken()
    with backend.open(max_bandwidth=SLOW) as store:
        timer = _cancel_soon(token)
        started = time.monotonic()
        with pytest.raises(CancelledError):
            store.upload(UploadRequest(str(source), backend.url("disk.img"), cancel=token))
        seconds = time.monotonic() - started
        timer.join()

    assert backend.read_object("disk.img") is None
    assert seconds < min_seconds(4 * MiB, SLOW) / 2, f"cancelled after {seconds:.1f} s"


def test_a_cancelled_download_does_not_sit_out_the_limit(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(4 * MiB, seed=97)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    token = CancelToken()
    back = workdir / "back.img"
    with backend.open(max_bandwidth=SLOW) as limited:
        timer = _cancel_soon(token)
        started = time.monotonic()
        with pytest.raises(CancelledError):
            limited.download(DownloadRequest(up.url, str(back), cancel=token))
        seconds = time.monotonic() - started
        timer.join()

    assert not back.exists()
    assert seconds < min_seconds(4 * MiB, SLOW) / 2, f"cancelled after {seconds:.1f} s"
