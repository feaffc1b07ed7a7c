"""The one bounded worker pool (vmstore._pool.run_bounded) on its own: the bound, the
admission gate, and what a failure does to the items around it."""

from __future__ import annotations

import threading
import time

import pytest
from vmstore._pool import run_bounded


class Gauge:
    """Counts the calls of ``work`` running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def work(self, item: int) -> int:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(0.005)
        with self.lock:
            self.now -= 1
        return item


def test_every_item_is_done_once_and_never_more_than_the_bound_at_once() -> None:
    gauge, landed, taken = Gauge(), [], []

    def items():
        for n in range(40):
            taken.append((n, gauge.now))
            yield n

    run_bounded(
        items(), gauge.work, workers=3, name="t", stop=threading.Event(),
        landed=landed.extend, check=lambda: None,
    )  # fmt: skip

    assert sorted(landed) == list(range(40))
    assert gauge.peak == 3
    # An item is taken from the iterator only when a worker is free for it.
    assert all(running < 3 for _, running in taken)


def test_admit_holds_items_back_until_it_lets_them_go() -> None:
    released = threading.Event()
    threading.Timer(0.1, released.set).start()
    started: list[float] = []
    begin = time.monotonic()

    def work(item: int) -> int:
        started.append(time.monotonic() - begin)
        return item

    run_bounded(
        range(4), work, workers=2, name="t", stop=threading.Event(), landed=lambda _r: None,
        check=lambda: None, admit=lambda submitted: submitted < 1 or released.is_set(),
    )  # fmt: skip

    assert len(started) == 4
    assert sorted(started)[1] >= 0.09  # only the first went before the gate opened


def test_the_first_failure_stops_the_pool_and_salvages_what_finished() -> None:
    stop = threading.Event()
    salvaged: list[int] = []
    landed: list[int] = []
    slow_started = threading.Event()

    def work(item: int) -> int:
        if item == 1:
            slow_started.set()
            time.sleep(0.1)  # still running when item 2 fails
            return item
        if item == 2:
            slow_started.wait(1)
            raise OSError("disk gone")
        return item

    with pytest.raises(OSError, match="disk gone"):
        run_bounded(
            range(100), work, workers=2, max_in_flight=2, name="t", stop=stop,
            landed=landed.extend, check=lambda: None, salvaged=salvaged.append,
        )  # fmt: skip

    assert stop.is_set()
    assert salvaged == [1]  # finished after the failure: kept, not lost
    assert max(landed + salvaged) < 10  # the rest were never started


def test_a_check_that_raises_cancels_the_pool() -> None:
    stop = threading.Event()
    done: list[int] = []

    class Cancelled(Exception):
        pass

    def check() -> None:
        if len(done) >= 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        run_bounded(
            range(1000), lambda n: (time.sleep(0.002), n)[1], workers=2, name="t", stop=stop,
            landed=done.extend, check=check,
        )  # fmt: skip
    assert stop.is_set() and len(done) < 20
