"""Progress reporting with the guarantees the API promises, whoever counts the bytes.

A caller's ``progress_callback(transferred, total)`` is called at most every 100 ms, with
``transferred`` never going down, and the last call is always ``(total, total)``. The native
core already throttles its own calls; this wrapper keeps the promise for Python-side loops
(S3 parts, HTTP streams) and when several sources of progress feed one callback.

The second half turns those calls into what a person or a log collector reads: sizes, a
transfer rate and an ETA (:class:`RateMeter`, :func:`format_bytes`, :func:`format_duration`).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmstore.models import ProgressCallback

PROGRESS_INTERVAL_SECONDS = 0.1


class ProgressReporter:
    """Throttled, monotonic forwarding to an optional progress callback.

    Use it as the callback itself (``reporter(done, total)``, e.g. handed to the native
    core), or count with :meth:`advance`; end with :meth:`finish`, which makes the final
    ``(total, total)`` call unless it was already made. An exception raised by the wrapped
    callback propagates unchanged.
    """

    def __init__(
        self,
        callback: ProgressCallback | None,
        total: int = 0,
        *,
        interval: float = PROGRESS_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._callback = callback
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._total = total
        self._transferred = 0
        self._last_reported: tuple[int, int] | None = None
        self._last_report_time = float("-inf")

    @property
    def transferred(self) -> int:
        return self._transferred

    def __call__(self, transferred: int, total: int) -> None:
        with self._lock:
            self._total = total
            self._transferred = max(self._transferred, transferred)
        self._maybe_report(final=transferred >= total)

    def report(self, transferred: int, total: int) -> None:
        """Like calling the reporter, but never its final report: for a sum over several
        transfers, which reaches ``(total, total)`` between items while more are to come."""
        with self._lock:
            self._total = total
            self._transferred = max(self._transferred, transferred)
        self._maybe_report(final=False)

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more (thread-safe); reports when the interval has passed."""
        with self._lock:
            self._transferred += nbytes
        self._maybe_report(final=False)

    def finish(self, total: int | None = None) -> None:
        """Make the final ``(total, total)`` call, once."""
        with self._lock:
            if total is not None:
                self._total = total
            self._transferred = self._total
        self._maybe_report(final=True)

    def _maybe_report(self, *, final: bool) -> None:
        if self._callback is None:
            return
        with self._lock:
            now = self._clock()
            # A total of 0 with bytes moving is a stream of unknown size: report what has
            # moved, (n, 0), until finish() knows the total.
            done = min(self._transferred, self._total) if self._total else self._transferred
            report = (done, self._total)
            if report == self._last_reported:
                return
            if not final and now - self._last_report_time < self._interval:
                return
            if self._last_reported is not None and report[0] < self._last_reported[0]:
                return
            self._last_reported = report
            self._last_report_time = now
        # Called outside the lock: the callback may be slow, or raise to stop the transfer.
        self._callback(*report)


# --- rendering helpers: what a progress display shows ----------------------------------

RATE_WINDOW_SECONDS = 10.0
"""The rate is measured over this much recent time, so the ETA follows a transfer that
speeds up or slows down instead of averaging over its whole life."""


def format_bytes(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, one decimal (whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"`` (rounded to the second)."""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True)
class ProgressSample:
    """One progress report with what is derived from it.

    ``total`` is ``None`` while the size is unknown (a stream without a size hint);
    ``rate`` (bytes/s) and ``eta`` (seconds) are ``None`` until they can be estimated.
    """

    transferred: int
    total: int | None
    rate: float | None
    eta: float | None
    elapsed: float

    @property
    def percent(self) -> float | None:
        if self.total is None:
            return None
        return 100.0 * self.transferred / self.total if self.total else 100.0

    @property
    def done(self) -> bool:
        return self.total is not None and self.transferred >= self.total


class RateMeter:
    """Turns ``(transferred, total)`` reports into :class:`ProgressSample` s.

    The rate counts only bytes moved since the first report: a resumed transfer's first
    report already holds the resumed prefix, which was verified, not transferred, at the rate
    of this run. A ``total`` of 0 with bytes already moved, or below ``transferred``, means
    the size is not known yet.
    """

    def __init__(
        self,
        *,
        window: float = RATE_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = window
        self._clock = clock
        self._started = clock()
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def sample(self, transferred: int, total: int | None) -> ProgressSample:
        now = self._clock()
        known = total is not None and total >= transferred and (total > 0 or transferred == 0)
        known_total = total if known else None
        self._samples.append((now, transferred))
        # Keep one sample older than the window so the rate spans the whole window.
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        oldest_time, oldest_bytes = self._samples[0]
        span = now - oldest_time
        moved = transferred - oldest_bytes
        rate = moved / span if span > 0 and moved > 0 else None
        eta: float | None = None
        if known_total is not None:
            if transferred >= known_total:
                eta = 0.0
            elif rate:
                eta = (known_total - transferred) / rate
        return ProgressSample(
            transferred=transferred,
            total=known_total,
            rate=rate,
            eta=eta,
            elapsed=now - self._started,
        )
