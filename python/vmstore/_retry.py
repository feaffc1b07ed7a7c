"""Retry policy shared by the network backends: exponential backoff with full jitter.

A request is retried when the failure is transient (a reset connection, an idle timeout, a
truncated body, a 5xx, throttling), up to ``max_retries`` times per request. The operation
is a function that redoes all of its work, so a retried upload re-reads its bytes from the
source and never re-sends a consumed stream.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from vmstore.errors import CancelledError

T = TypeVar("T")

log = logging.getLogger("vmstore.retry")


class RetryableError(Exception):
    """A transient failure a backend raises to ask for a retry, with an optional delay."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` retries after the first attempt; delays grow from ``base_delay``."""

    max_retries: int = 3
    base_delay: float = 0.25
    max_delay: float = 20.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, 5 * self.max_delay)
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)

    def call(
        self,
        operation: Callable[[], T],
        *,
        classify: Callable[[BaseException], RetryableError | None],
        describe: str,
        cancelled: threading.Event | None = None,
    ) -> T:
        """Run ``operation``, retrying failures that ``classify`` maps to a RetryableError.

        The last failure is re-raised as it was (its type says what went wrong).
        """
        attempt = 0
        while True:
            try:
                return operation()
            except Exception as exc:
                transient = exc if isinstance(exc, RetryableError) else classify(exc)
                if transient is None or attempt >= self.max_retries:
                    raise
                attempt += 1
                wait = self.delay(attempt, transient.retry_after)
                log.warning(
                    "%s failed (%s); retry %d of %d in %.1fs",
                    describe,
                    transient,
                    attempt,
                    self.max_retries,
                    wait,
                )
                if cancelled is None:
                    time.sleep(wait)
                elif cancelled.wait(wait):
                    raise CancelledError(f"{describe}: cancelled while waiting to retry") from exc
