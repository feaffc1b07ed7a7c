"""The native token bucket behind ``StorageConfig.max_bandwidth``, as Python threads see it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from vmstore import CancelledError, CancelToken, InvalidConfigError, StorageConfig, _native
from vmstore._ratelimit import Pacer, StopSignal, limiter_for

from tests.support import MiB, random_bytes, write_file


def test_the_burst_is_at_most_the_contracts_max_of_a_mib_and_an_eighth() -> None:
    for rate in (1, 4096, MiB, 8 * MiB, 100 * MiB, 10 << 30):
        limiter = _native.RateLimiter(rate)
        assert limiter.rate == rate
        assert 0 < limiter.burst <= max(MiB, rate // 8)


def test_a_zero_rate_is_refused() -> None:
    with pytest.raises(InvalidConfigError):
        _native.RateLimiter(0)


def test_python_threads_cannot_overrun_the_shared_bucket() -> None:
    limiter = _native.RateLimiter(8 * MiB)
    started = time.monotonic()
    threads = [
        threading.Thread(target=lambda: [limiter.acquire(256 << 10) for _ in range(4)])
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started

    assert limiter.granted == 4 * MiB
    assert seconds >= (4 * MiB - MiB) / (8 * MiB), seconds


def test_a_wait_releases_the_gil() -> None:
    limiter = _native.RateLimiter(MiB)
    limiter.acquire(limiter.burst)  # empty the bucket
    counted = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            counted[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    limiter.acquire(256 << 10)  # about 0.25 s of waiting
    before = counted[0]
    stop.set()
    counter.join()

    assert before > 1000, "Python code did not run while acquire() waited"


def test_a_request_larger_than_the_burst_is_served_in_pieces() -> None:
    limiter = _native.RateLimiter(4 * MiB)
    started = time.monotonic()
    limiter.acquire(3 * MiB)

    assert time.monotonic() - started >= (3 * MiB - MiB) / (4 * MiB)
    assert limiter.granted == 3 * MiB


@pytest.mark.parametrize("form", ["token", "tuple", "list-with-none"])
def test_a_cancelled_token_ends_a_long_wait(form: str) -> None:
    limiter = _native.RateLimiter(64 << 10)
    limiter.acquire(limiter.burst)
    token = CancelToken()
    cancel: object = {
        "token": token,
        "tuple": (CancelToken(), token),
        "list-with-none": [None, token],
    }[form]
    threading.Timer(0.2, token.cancel).start()
    started = time.monotonic()

    with pytest.raises(CancelledError):
        limiter.acquire(10 * MiB, cancel)  # type: ignore[arg-type]

    # 10 MiB at 64 KiB/s would be 160 s.
    assert time.monotonic() - started < 10


def test_cancel_must_be_tokens() -> None:
    with pytest.raises(TypeError):
        _native.RateLimiter(MiB).acquire(1, 5)  # type: ignore[arg-type]


def test_limiter_for_builds_one_only_for_a_positive_rate() -> None:
    assert limiter_for(StorageConfig(type="nfs")) is None
    assert limiter_for(StorageConfig(type="nfs", max_bandwidth=0)) is None
    built = limiter_for(StorageConfig(type="nfs", max_bandwidth=5 << 20))
    assert built is not None and built.rate == 5 << 20


def test_a_stop_signal_ends_its_pacers_waits() -> None:
    limiter = _native.RateLimiter(64 << 10)
    pacer = Pacer(limiter, None)
    pacer.take(limiter.burst)
    stop = StopSignal(pacer)
    threading.Timer(0.2, stop.set).start()

    with pytest.raises(CancelledError):
        pacer.take(10 * MiB)
    assert stop.is_set()


def test_a_pacer_reads_a_body_in_paced_blocks() -> None:
    limiter = _native.RateLimiter(64 << 20)
    pacer = Pacer(limiter, None)
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB
    position = [0]
    asked: list[int] = []

    def read(n: int) -> bytes:
        asked.append(n)
        data = body[position[0] : position[0] + n]
        position[0] += len(data)
        return data

    assert pacer.read(read, len(body)) == body
    assert max(asked) <= pacer.block <= limiter.burst
    assert limiter.granted == len(body)


def test_copy_file_counts_what_it_reads_or_what_it_stores(tmp_path: Path) -> None:
    """The NFS copy's two sides: a download is paced by what it reads off the share, an upload
    by what it stores onto it (an all-zero MiB read from the source is not written)."""
    data = bytearray(random_bytes(3 * MiB, seed=3))
    data[MiB : 2 * MiB] = bytes(MiB)
    source = write_file(tmp_path / "src", bytes(data))
    for limit_writes, expected in ((False, 3 * MiB), (True, 2 * MiB)):
        limiter = _native.RateLimiter(1 << 30)
        destination = tmp_path / f"dst-{limit_writes}"
        writer = _native.ChunkWriter(str(destination), str(tmp_path / f"tmp-{limit_writes}"))
        _native.copy_file(
            str(source), writer, chunk_size=MiB, limiter=limiter, limit_writes=limit_writes
        )
        writer.commit()
        assert destination.read_bytes() == data
        assert limiter.granted == expected, limit_writes


def test_copy_file_takes_at_least_size_over_rate(tmp_path: Path) -> None:
    source = write_file(tmp_path / "src", random_bytes(3 * MiB, seed=4))
    writer = _native.ChunkWriter(str(tmp_path / "dst"), str(tmp_path / "tmp"))
    started = time.monotonic()
    _native.copy_file(str(source), writer, chunk_size=MiB, limiter=_native.RateLimiter(4 * MiB))

    assert time.monotonic() - started >= (3 * MiB - MiB) / (4 * MiB)
    writer.abort()


@pytest.mark.parametrize(
    ("rate", "block"),
    [(50 << 20, 1 << 20), (4 << 20, 512 << 10), (1 << 20, 128 << 10), (10 << 10, 16 << 10)],
)
def test_a_pacer_moves_blocks_of_an_eighth_of_a_second_at_most_a_mib(rate: int, block: int) -> None:
    """A slow limit must not leave a connection idle for long between two blocks: servers drop
    a request body that stalls (S3 after about 20 s)."""
    assert Pacer(_native.RateLimiter(rate), None).block == block
