"""The store's bandwidth limit (``StorageConfig.max_bandwidth``) as the transfers use it.

Each backend builds one :class:`vmstore._native.RateLimiter` when the store is built
(:func:`limiter_for`): a token bucket in the native core, shared by every transfer and every
part of the store, whose waits release the GIL, so no number of Python threads can overrun
it. A transfer takes its bytes from it where they cross the wire, through a :class:`Pacer`:

* uploads to S3 and HTTP: the part bodies (:class:`vmstore._upload.PartBody`, the HTTP
  one-pass PUT body), as the HTTP client reads them to send; a retried part is sent, and
  counted, again;
* downloads from S3 and HTTP: the response bodies, block by block as the readers take them
  off the socket (TCP's flow control then slows the sender to the same pace);
* NFS: the native copy, per block, on the share's side (reads of a download, stored bytes of
  an upload: holes and skipped zero blocks are not traffic), and the stream paths here.

Small metadata requests (HEAD, sidecars of a few hundred bytes) are not counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vmstore import _native
from vmstore.config import StorageConfig

PACED_BLOCK = 1 << 20
"""Bytes taken off (or handed to) the socket per wait, at most."""

MIN_PACED_BLOCK = 16 << 10
"""Bytes per wait, at least (below that the per-call cost would show)."""


def limiter_for(config: StorageConfig) -> _native.RateLimiter | None:
    """The store's limiter, or None when ``max_bandwidth`` is None or 0 (unlimited)."""
    rate = config.max_bandwidth
    return _native.RateLimiter(rate) if rate else None


class Pacer:
    """One transfer's use of the store's limiter. A wait ends with ``CancelledError`` as soon
    as the transfer's own CancelToken is cancelled or the transfer is stopped (:meth:`stop`,
    e.g. because another of its parts failed): nothing sits out a long wait for bytes that
    will never be sent."""

    def __init__(self, limiter: _native.RateLimiter, cancel: _native.CancelToken | None) -> None:
        self.limiter = limiter
        self._stopped = _native.CancelToken()
        self._tokens = (cancel, self._stopped)
        self.block = max(MIN_PACED_BLOCK, min(PACED_BLOCK, limiter.burst, limiter.rate // 8))
        """How many bytes to move per wait: within one burst, so none goes out faster, and
        about an eighth of a second's worth at a low rate, so a connection is never idle for
        long between two blocks (servers drop a request body that stalls: S3 after ~20 s)."""

    def take(self, count: int) -> None:
        """Wait (GIL released) until ``count`` bytes may cross the wire."""
        if count > 0:
            self.limiter.acquire(count, self._tokens)

    def stop(self) -> None:
        self._stopped.cancel()

    def read(self, read: Callable[[int], bytes], length: int) -> bytes:
        """``length`` bytes (fewer if the body ends early) from ``read(n)``, taking each block
        from the limiter before it is read off the socket."""
        blocks: list[bytes] = []
        got = 0
        while got < length:
            want = min(self.block, length - got)
            self.take(want)
            data = read(want)
            if not data:
                break
            blocks.append(data)
            got += len(data)
        # One copy, as filling a preallocated buffer would cost; the result is immutable.
        return blocks[0] if len(blocks) == 1 else b"".join(blocks)


def pacer_for(
    limiter: _native.RateLimiter | None, cancel: _native.CancelToken | None
) -> Pacer | None:
    return None if limiter is None else Pacer(limiter, cancel)


class StopSignal(threading.Event):
    """A pipeline's stop event that also ends its pacer's waits when set."""

    def __init__(self, pacer: Pacer | None) -> None:
        super().__init__()
        self._pacer = pacer

    def set(self) -> None:
        super().set()
        if self._pacer is not None:
            self._pacer.stop()


__all__ = ["MIN_PACED_BLOCK", "PACED_BLOCK", "Pacer", "StopSignal", "limiter_for", "pacer_for"]
