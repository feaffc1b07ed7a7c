"""Progress reporting with the guarantees the API promises, whoever counts the bytes.

A caller's ``progress_callback(transferred, total)`` is called at most every 100 ms, with
``transferred`` never going down, and the last call is always ``(total, total)``. The native
core already throttles its own calls; this wrapper keeps the promise for Python-side loops
(S3 parts, HTTP streams) and when several sources of progress feed one callback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

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
            report = (min(self._transferred, self._total), self._total)
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
