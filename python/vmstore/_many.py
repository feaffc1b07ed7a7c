"""Many transfers as one: ``upload_many`` / ``download_many`` on every backend.

One budget. The store's ``concurrency`` bounds the requests in flight for the whole batch,
not per item. Items start in input order while some of the budget is free; each takes a share
of the free slots, ``ceil(free / min(waiting, free))``, as its own part/chunk concurrency,
and gives it back when it ends. The shares of the running items therefore never sum above
``concurrency``: with 4 and three items they run side by side with 2, 1 and 1 parts in flight;
with 4 and ten items, four run with one each and the next starts when one ends. Outside its
parts an item sends one request at a time (HEAD, Create/Complete, a sidecar), so its share
bounds it entirely. A share is fixed for the item's life (a part pool does not grow under a
running transfer): when the last item runs alone, the slots finished items gave back stay
idle. The bandwidth limit belongs to the store, so the whole batch shares it too.

A result per item, in input order: its response, or the :class:`StorageError` it raised.
With ``raise_on_error`` the first failure cancels the items still running (each stops at its
next chunk and keeps its partial for a resume, as a cancel does), skips those not started,
and is raised. An exception that is not a StorageError (a progress callback's own, a bug) is
raised that way whatever ``raise_on_error`` says: it is the caller's, not an item's outcome.

One progress view: ``progress_callback(done, total)`` sums the items, at most every 100 ms,
``done`` never going down; ``total`` grows as items learn their sizes (an item counts 0 until
it starts; a download learns its size from its first request), an item that fails counts what
it moved, and the last call is ``(total, total)``. Each request's own callback is still called
with its own numbers. One ``cancel`` token stops every item; each request's own token still
stops just its item.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextvars
import dataclasses
import os
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Self, TypeVar, cast

from vmstore import _native
from vmstore._native import CancelToken
from vmstore.errors import CancelledError, InvalidConfigError, StorageError
from vmstore.models import (
    DownloadRequest,
    DownloadResponse,
    ProgressCallback,
    UploadRequest,
    UploadResponse,
)
from vmstore.progress import ProgressReporter
from vmstore.urls import redact_url

if TYPE_CHECKING:
    from types import TracebackType

    from vmstore.config import StorageConfig

RequestT = TypeVar("RequestT", UploadRequest, DownloadRequest)
_Response = UploadResponse | DownloadResponse

_POLL_SECONDS = 0.05
"""How often the batch looks at the cancel tokens while its items run."""

_ITEM_CONCURRENCY: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "vmstore_item_concurrency", default=None
)


def concurrency_for(configured: int) -> int:
    """The parts/chunks a transfer may have in flight: ``configured`` (the store's
    ``concurrency``), or the item's share when it runs as part of a batch."""
    share = _ITEM_CONCURRENCY.get()
    return configured if share is None else max(1, min(configured, share))


def upload_many(
    requests: Iterable[UploadRequest],
    upload: Callable[[UploadRequest], UploadResponse],
    locate: Callable[[str], Hashable],
    *,
    concurrency: int,
    raise_on_error: bool,
    progress_callback: ProgressCallback | None,
    cancel: _native.CancelToken | None,
) -> list[UploadResponse | StorageError]:
    """The body of every backend's ``upload_many``: ``upload`` is the backend's own upload,
    ``locate(url)`` the canonical name of a destination (equal for two URLs naming one
    object), so two items cannot write one object."""
    items = _checked(requests, UploadRequest, "upload_many")
    keys: dict[int, Hashable] = {}
    early: dict[int, StorageError] = {}
    for index, request in enumerate(items):
        try:
            keys[index] = locate(request.destination_url)
        except StorageError as exc:
            early[index] = exc  # this item's result; the others go on
    _refuse_duplicates(keys, [r.destination_url for r in items], "destination", redact=True)
    results = _Batch(
        items,
        upload,
        concurrency=concurrency,
        raise_on_error=raise_on_error,
        progress_callback=progress_callback,
        cancel=cancel,
        early=early,
    ).run()
    return cast("list[UploadResponse | StorageError]", results)


def download_many(
    requests: Iterable[DownloadRequest],
    download: Callable[[DownloadRequest], DownloadResponse],
    *,
    concurrency: int,
    raise_on_error: bool,
    progress_callback: ProgressCallback | None,
    cancel: _native.CancelToken | None,
) -> list[DownloadResponse | StorageError]:
    """The body of every backend's ``download_many``; two items may not write one file (or
    one stream)."""
    items = _checked(requests, DownloadRequest, "download_many")
    keys: dict[int, Hashable] = {}
    names: list[str] = []
    for index, request in enumerate(items):
        if request.destination_path is not None:
            # The real path: "a/../b" and a symlinked directory name the file they reach.
            keys[index] = os.path.realpath(os.path.abspath(request.destination_path))
            names.append(request.destination_path)
        else:
            keys[index] = ("stream", id(request.destination_stream))
            names.append(f"<stream {type(request.destination_stream).__name__}>")
    _refuse_duplicates(keys, names, "destination", redact=False)
    results = _Batch(
        items,
        download,
        concurrency=concurrency,
        raise_on_error=raise_on_error,
        progress_callback=progress_callback,
        cancel=cancel,
        early={},
    ).run()
    return cast("list[DownloadResponse | StorageError]", results)


def _checked(requests: Iterable[RequestT], kind: type[RequestT], call: str) -> list[RequestT]:
    if isinstance(requests, str | bytes) or not isinstance(requests, Iterable):
        raise InvalidConfigError(f"{call}() takes a list of {kind.__name__}s")
    items = list(requests)
    for position, request in enumerate(items):
        if not isinstance(request, kind):
            raise InvalidConfigError(
                f"{call}() item {position} is a {type(request).__name__}, not a {kind.__name__}"
            )
    return items


def _refuse_duplicates(
    keys: dict[int, Hashable], names: Sequence[str], what: str, *, redact: bool
) -> None:
    seen: dict[Hashable, int] = {}
    for index, key in keys.items():
        first = seen.setdefault(key, index)
        if first != index:
            shown = redact_url(names[index]) if redact else names[index]
            raise InvalidConfigError(
                f"items {first} and {index} have the same {what} {shown!r}: one would "
                "overwrite the other; nothing was started"
            )


def _check_options(
    raise_on_error: object, progress_callback: object, cancel: object
) -> None:
    if not isinstance(raise_on_error, bool):
        raise InvalidConfigError("raise_on_error must be True or False")
    if progress_callback is not None and not callable(progress_callback):
        raise InvalidConfigError("progress_callback must be callable (done, total) or None")
    if cancel is not None and not isinstance(cancel, _native.CancelToken):
        raise InvalidConfigError(
            f"cancel must be a vmstore.CancelToken, not {type(cancel).__name__}"
        )


@dataclass
class _Item:
    index: int
    request: UploadRequest | DownloadRequest
    token: _native.CancelToken
    """The item's own token for this batch: cancelled by the batch's, by the request's, and
    by a failure under ``raise_on_error``; the caller's tokens are never cancelled by us."""
    share: int = 0

    @property
    def describe(self) -> str:
        if isinstance(self.request, UploadRequest):
            return (
                f"upload of {self.request.source_name} to "
                f"{redact_url(self.request.destination_url)}"
            )
        return f"download of {redact_url(self.request.source_url)}"


class _Progress:
    """The one view over all items: sums what each item reports."""

    def __init__(self, callback: ProgressCallback | None, sizes: list[int]) -> None:
        self._lock = threading.Lock()
        self._done = [0] * len(sizes)
        self._total = list(sizes)
        self._open = len(sizes)
        self._deliver_lock = threading.Lock()
        self._delivered = -1
        self._callback = callback
        self._reporter = ProgressReporter(self._deliver if callback is not None else None)

    def _deliver(self, done: int, total: int) -> None:
        # Items report from their own threads: one call at a time, and a report overtaken by
        # a newer one on its way is dropped, so the caller sees ``done`` only grow.
        assert self._callback is not None
        with self._deliver_lock:
            if done < self._delivered:
                return
            self._delivered = done
            self._callback(done, total)

    def _sums(self) -> tuple[int, int]:
        return sum(self._done), sum(self._total)

    def item_callback(self, index: int, own: ProgressCallback | None) -> ProgressCallback:
        def report(done: int, total: int) -> None:
            if own is not None:
                own(done, total)
            with self._lock:
                self._done[index] = max(self._done[index], done)
                # A stream's total is 0 until it ends: what it moved is what it is so far.
                self._total[index] = max(total, self._done[index])
                sums = self._sums()
                if sums[0] >= sums[1] and self._open:
                    # Everything known so far is done, but items are still to come: not a
                    # (total, total) that reads as the end.
                    return
            self._reporter.report(*sums)

        return report

    def settle(self, index: int, size: int | None) -> None:
        """An item ended: its total is its size (success) or what it moved (failure)."""
        with self._lock:
            self._open -= 1
            if size is not None:
                self._done[index] = self._total[index] = size
            else:
                self._total[index] = self._done[index]

    def finish(self) -> None:
        with self._lock:
            total = self._sums()[1]
        self._reporter.finish(total)


def _known_size(request: UploadRequest | DownloadRequest) -> int:
    """What an item will move, when known before it starts (a file to upload): the combined
    total is right from the first report instead of growing as items start."""
    if isinstance(request, UploadRequest) and request.source_path is not None:
        try:
            return os.stat(request.source_path).st_size
        except OSError:
            return 0  # the item itself reports why
    return 0


class _Batch:
    def __init__(
        self,
        requests: Sequence[UploadRequest | DownloadRequest],
        run_one: Callable[[Any], _Response],
        *,
        concurrency: int,
        raise_on_error: bool,
        progress_callback: ProgressCallback | None,
        cancel: _native.CancelToken | None,
        early: dict[int, StorageError],
    ) -> None:
        _check_options(raise_on_error, progress_callback, cancel)
        self._requests = requests
        self._run_one = run_one
        self._budget = concurrency
        self._raise_on_error = raise_on_error
        self._cancel = cancel
        self._progress = _Progress(progress_callback, [_known_size(r) for r in requests])
        self._results: list[_Response | StorageError | None] = [None] * len(requests)
        for index, error in early.items():
            self._results[index] = error
            self._progress.settle(index, None)
        self._first_failure: StorageError | None = next(iter(early.values()), None)
        self._fatal: BaseException | None = None

    def _stopping(self) -> bool:
        return (
            self._fatal is not None
            or (self._raise_on_error and self._first_failure is not None)
            or (self._cancel is not None and self._cancel.is_cancelled)
        )

    def _start(self, pool: cf.ThreadPoolExecutor, item: _Item, share: int) -> cf.Future[_Response]:
        item.share = share
        request = item.request
        if request.cancel is not None and request.cancel.is_cancelled:
            item.token.cancel()
        sent = dataclasses.replace(
            request,
            cancel=item.token,
            progress_callback=self._progress.item_callback(item.index, request.progress_callback),
        )
        context = contextvars.copy_context()
        context.run(_ITEM_CONCURRENCY.set, share)
        return pool.submit(context.run, self._run_one, sent)

    def run(self) -> list[_Response | StorageError]:
        waiting = collections.deque(
            _Item(index, request, _native.CancelToken())
            for index, request in enumerate(self._requests)
            if self._results[index] is None
        )
        if self._raise_on_error and self._first_failure is not None:
            raise self._first_failure
        running: dict[cf.Future[_Response], _Item] = {}
        free = self._budget
        workers = max(1, min(len(waiting), self._budget))
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="vmstore-many") as pool:
            try:
                while waiting or running:
                    stopping = self._stopping()
                    if stopping:
                        for item in running.values():
                            item.token.cancel()
                        for item in waiting:
                            self._results[item.index] = CancelledError(
                                f"{item.describe} cancelled before it started"
                            )
                            self._progress.settle(item.index, None)
                        waiting.clear()
                    while waiting and free > 0:
                        share = -(-free // min(len(waiting), free))
                        free -= share
                        item = waiting.popleft()
                        running[self._start(pool, item, share)] = item
                    if not running:
                        break
                    finished, _ = cf.wait(
                        running, timeout=_POLL_SECONDS, return_when=cf.FIRST_COMPLETED
                    )
                    for future in finished:
                        item = running.pop(future)
                        free += item.share
                        self._settle(item, future)
                    for item in running.values():
                        own = item.request.cancel
                        if own is not None and own.is_cancelled:
                            item.token.cancel()
            except BaseException:
                # Ctrl-C in the caller's thread: every item stops at its next chunk, keeping
                # its partial; the pool's exit waits for them.
                for item in running.values():
                    item.token.cancel()
                raise
        if self._fatal is not None:
            raise self._fatal
        if self._raise_on_error and self._first_failure is not None:
            raise self._first_failure
        self._progress.finish()
        results: list[_Response | StorageError] = []
        for result in self._results:
            assert result is not None
            results.append(result)
        return results

    def _settle(self, item: _Item, future: cf.Future[_Response]) -> None:
        try:
            response = future.result()
        except StorageError as exc:
            self._results[item.index] = exc
            self._progress.settle(item.index, None)
            if self._first_failure is None:
                self._first_failure = exc
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() once all stopped
            self._progress.settle(item.index, None)
            if self._fatal is None:
                self._fatal = exc
        else:
            self._results[item.index] = response
            size = (
                response.size
                if isinstance(response, UploadResponse)
                else response.content_length
            )
            self._progress.settle(item.index, size)


class BatchTransfers:
    """``upload_many`` / ``download_many`` and the context manager for a backend class,
    written once: the backend gives its own ``upload``, ``download``, ``close``, ``_config``
    and ``_batch_destination(url)`` (the canonical name of an upload's destination, equal for
    two URLs naming one object). ``with`` a store closes it on the way out."""

    _config: StorageConfig

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def upload(self, request: UploadRequest) -> UploadResponse:
        raise NotImplementedError

    def download(self, request: DownloadRequest) -> DownloadResponse:
        raise NotImplementedError

    def _batch_destination(self, url: str) -> Hashable:
        raise NotImplementedError

    def upload_many(
        self,
        items: Iterable[UploadRequest],
        *,
        raise_on_error: bool = False,
        progress_callback: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> list[UploadResponse | StorageError]:
        """Upload every item under one concurrency budget; see :mod:`vmstore._many`."""
        return upload_many(
            items,
            self.upload,
            self._batch_destination,
            concurrency=self._config.concurrency,
            raise_on_error=raise_on_error,
            progress_callback=progress_callback,
            cancel=cancel,
        )

    def download_many(
        self,
        items: Iterable[DownloadRequest],
        *,
        raise_on_error: bool = False,
        progress_callback: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> list[DownloadResponse | StorageError]:
        """Download every item under one concurrency budget; see :mod:`vmstore._many`."""
        return download_many(
            items,
            self.download,
            concurrency=self._config.concurrency,
            raise_on_error=raise_on_error,
            progress_callback=progress_callback,
            cancel=cancel,
        )


def refuse_presign(backend: str) -> NoReturn:
    """``presign`` on a backend other than S3."""
    raise InvalidConfigError(
        f"presign is an S3 feature: the {backend} backend has no presigned URLs (give the "
        "URL itself, with StorageConfig.token for HTTP)"
    )


__all__ = [
    "BatchTransfers",
    "CancelToken",
    "ProgressCallback",
    "concurrency_for",
    "download_many",
    "refuse_presign",
    "upload_many",
]
