"""The one bounded worker pool of the transfer pipelines: S3/HTTP parts going up
(``_upload.send_parts``) and ranged chunks coming down (``_download._fetch_ranges``).

Items are taken from an iterator only when there is room for them (``max_in_flight``, and the
caller's ``admit``, which the download uses for its reorder window), so a part is read from the
source only when a sender is free and memory stays near ``workers`` x item size. The caller's
thread collects results in batches (``landed``: journal them, report progress) and calls
``check`` (cancellation) at least every 100 ms. The first failure, or a ``check`` that
raises, stops the pool: ``stop`` is set for the workers to notice, queued items are cancelled,
and items already running finish first; those that finish well are handed to ``salvaged``
(a download keeps the chunks on disk for its resume) before the failure is raised.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POLL_SECONDS = 0.1
_IDLE_SECONDS = 0.02


def run_bounded(
    items: Iterable[T],
    work: Callable[[T], R],
    *,
    workers: int,
    name: str,
    stop: threading.Event,
    landed: Callable[[list[R]], None],
    check: Callable[[], None],
    max_in_flight: int | None = None,
    admit: Callable[[int], bool] | None = None,
    salvaged: Callable[[R], None] | None = None,
) -> None:
    """Run ``work`` over ``items`` on ``workers`` threads (see the module's docstring).

    ``max_in_flight`` bounds the items submitted and not yet collected (default ``workers``;
    more queue in the executor); ``admit(submitted)`` may hold the next item back (the pool
    then waits for a result, or polls while nothing is in flight)."""
    limit = workers if max_in_flight is None else max_in_flight
    source = iter(items)
    exhausted = False
    submitted = 0
    pending: set[cf.Future[R]] = set()
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        try:
            while True:
                while (
                    not exhausted
                    and len(pending) < limit
                    and (admit is None or admit(submitted))
                ):
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.add(pool.submit(work, item))
                    submitted += 1
                if exhausted and not pending:
                    return
                if pending:
                    finished, pending = cf.wait(
                        pending, timeout=_POLL_SECONDS, return_when=cf.FIRST_COMPLETED
                    )
                else:  # held back by admit with nothing in flight: only time can change it
                    finished = set()
                    stop.wait(_IDLE_SECONDS)
                results = [future.result() for future in finished]
                if results:
                    landed(results)
                # Let go of what finished (an upload part holds its buffer) before the next
                # item is taken: otherwise one more item's memory is alive at the peak.
                del results, finished
                check()
        except BaseException:
            stop.set()
            for future in pending:
                future.cancel()
            for future in cf.as_completed(pending):
                with contextlib.suppress(BaseException):
                    result = future.result()
                    if salvaged is not None:
                        salvaged(result)
            raise


__all__ = ["run_bounded"]
