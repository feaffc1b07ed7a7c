"""vmstore for asyncio: the same operations as coroutines, for code that runs in an event loop
(operator frameworks such as kopf, aiohttp services).

    import vmstore.aio
    from vmstore import StorageConfig, UploadRequest

    async with vmstore.aio.new_storage(StorageConfig(type="nfs", endpoint="/mnt/share")) as store:
        up = await store.upload(UploadRequest("disk.qcow2", "nfs://vm-exports/disk.qcow2"))

Every call runs the blocking one of the synchronous store in a worker thread of the store's
own thread pool, so the event loop never waits on a disk or a socket, and the loop's default
executor (which frameworks use for their own sync handlers) is not taken up by transfers that
last an hour.

**Cancellation.** Cancelling the task that awaits :meth:`AsyncStorage.upload` or
:meth:`AsyncStorage.download` cancels the request's :class:`vmstore.CancelToken` (one is made
when the request has none) and waits until the worker has stopped, so the task ends in the
state ``CancelToken.cancel()`` leaves: a file upload or download keeps its partial for the
next call to resume (unless ``resume=False``), and nothing half-written is visible under the
final name. The task then raises :class:`asyncio.CancelledError`, always, even when the cancel
came after the last chunk and the transfer completed (the object is then stored; an upload or
a delete can be repeated, see the docs). A token is one-shot: a request whose token was
cancelled fails at once with :class:`vmstore.CancelledError` if it is sent again, so build a new
request (or pass a new token) for the retry. ``get_metadata``, ``delete`` and ``validate_url``
are single short requests: a cancel returns at once and the request finishes in its thread.

**Progress.** ``progress_callback`` may be a coroutine function (``async def``): its reports
are scheduled on the event loop (``asyncio.run_coroutine_threadsafe``) and run there one at a
time, in order, without holding up the transfer; while one is still running, newer reports
replace each other, so a slow coroutine sees the latest count rather than a backlog. The
last report, ``(total, total)``, has run when the call returns. A plain function is called as
it is, on the worker thread, as the synchronous API calls it. An exception raised by a
progress coroutine stops the transfer at its next report (as a raising plain callback does)
and is raised by the call; if it was the last report, the transfer had completed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import vmstore
from vmstore.config import StorageConfig
from vmstore.errors import InvalidConfigError, OperationFailedError, StorageError
from vmstore.models import (
    DownloadRequest,
    DownloadResponse,
    FileMetadata,
    IncompleteTransfer,
    ProgressCallback,
    UploadRequest,
    UploadResponse,
)
from vmstore.storage import Storage
from vmstore.storage import new_storage as _new_sync_storage

__all__ = ["DEFAULT_MAX_WORKERS", "AsyncProgressCallback", "AsyncStorage", "new_storage", "wrap"]

T = TypeVar("T")
RequestT = TypeVar("RequestT", UploadRequest, DownloadRequest)

AsyncProgressCallback = Callable[[int, int], Awaitable[object]]
"""``async def progress(transferred, total)``: run on the event loop, as the sync callback's
contract says (at most every 100 ms, monotonic, last call ``(total, total)``)."""

DEFAULT_MAX_WORKERS = 16
"""Calls of one store that run at the same time; more wait in the pool's queue (threads are
started only when needed, so a large number costs nothing until it is used)."""


def new_storage(config: StorageConfig, *, max_workers: int = DEFAULT_MAX_WORKERS) -> AsyncStorage:
    """The asyncio counterpart of :func:`vmstore.new_storage`.

    Nothing blocking happens here: the backend is built in a worker thread on ``async with``
    (or on the first call), since building an S3 client may read files and ask the instance
    metadata service for credentials. Its errors (``InvalidConfigError``, ...) are raised there.
    """
    if not isinstance(config, StorageConfig):
        raise InvalidConfigError(
            f"new_storage() takes a StorageConfig, not {type(config).__name__}"
        )
    return AsyncStorage(lambda: _new_sync_storage(config), max_workers=max_workers)


def wrap(store: Storage, *, max_workers: int = DEFAULT_MAX_WORKERS) -> AsyncStorage:
    """An :class:`AsyncStorage` over an existing synchronous store; ``aclose()`` closes it."""
    return AsyncStorage(lambda: store, max_workers=max_workers)


class AsyncStorage:
    """A :class:`vmstore.Storage` whose operations are coroutines.

    Use it as ``async with`` (or call :meth:`aclose`); one instance may be shared by any number
    of tasks of one event loop, as the synchronous store may be shared by threads.
    """

    def __init__(
        self, open_storage: Callable[[], Storage], *, max_workers: int = DEFAULT_MAX_WORKERS
    ) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise InvalidConfigError(f"max_workers must be a positive number, not {max_workers!r}")
        self._open_storage = open_storage
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="vmstore-aio"
        )
        self._opening: asyncio.Future[Storage] | None = None
        self._closed = False
        self._running: set[vmstore.CancelToken] = set()
        """Tokens of the transfers under way: a cancelled aclose() stops them."""

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> Self:
        """Build the backend (once; later calls wait for the same build). ``async with`` and
        every operation call it, so calling it yourself is only needed to fail early."""
        if self._closed:
            raise OperationFailedError(
                "this async storage was closed; create a new one with vmstore.aio.new_storage()"
            )
        if self._opening is None:
            loop = asyncio.get_running_loop()
            self._opening = loop.run_in_executor(self._executor, self._open_storage)
        # Shielded: a task cancelled while waiting does not abandon a half-built store, which
        # stays for the next caller and for aclose().
        await asyncio.shield(self._opening)
        return self

    @property
    def storage(self) -> Storage:
        """The synchronous store underneath (after :meth:`open`), e.g. for code in a thread."""
        if self._opening is None or not self._opening.done() or self._opening.cancelled():
            raise OperationFailedError("the async storage is not open yet: await store.open()")
        return self._opening.result()

    async def aclose(self) -> None:
        """Wait for the calls still running, then close the backend; a second call does nothing.

        Cancelling the task in aclose() cancels the transfers still running (each keeps its
        partial, as a cancelled call does) and still waits for them to stop.
        """
        if self._closed:
            return
        self._closed = True
        # shutdown(wait=True) joins the pool's threads, so it runs in a thread of its own (and
        # not in the loop's default executor's, which the caller's code may be waiting on).
        stopped = asyncio.get_running_loop().create_future()
        _start_thread(lambda: self._executor.shutdown(wait=True), stopped)
        await _to_the_end(stopped, on_cancel=self._cancel_running)
        opening = self._opening
        if opening is None:
            return
        await asyncio.wait([opening])
        if opening.cancelled() or opening.exception() is not None:
            return  # never built: nothing to close
        closed = asyncio.get_running_loop().create_future()
        _start_thread(opening.result().close, closed)
        await _to_the_end(closed, on_cancel=_nothing)

    def _cancel_running(self) -> None:
        for token in list(self._running):
            token.cancel()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the operations ----------------------------------------------------------------------

    async def upload(self, request: UploadRequest) -> UploadResponse:
        """:meth:`vmstore.Storage.upload` in a worker thread; see the module for cancellation."""
        store = await self._store()
        return await self._transfer(store.upload, request)

    async def download(self, request: DownloadRequest) -> DownloadResponse:
        """:meth:`vmstore.Storage.download` in a worker thread; see the module for cancellation."""
        store = await self._store()
        return await self._transfer(store.download, request)

    async def get_metadata(self, url: str) -> FileMetadata:
        """Describe an object without transferring it (NotFoundError if it is missing)."""
        store = await self._store()
        return await self._call(store.get_metadata, url)

    async def delete(self, url: str) -> None:
        """Remove an object; a missing one is not an error, so cleanup can be repeated."""
        store = await self._store()
        await self._call(store.delete, url)

    async def validate_url(self, url: str) -> None:
        """Raise InvalidConfigError (or PermissionDeniedError) unless this backend can use url."""
        store = await self._store()
        await self._call(store.validate_url, url)

    async def list_incomplete(self, prefix: str = "") -> list[IncompleteTransfer]:
        """What interrupted transfers under ``prefix`` left (see Storage.list_incomplete)."""
        store = await self._store()
        return await self._call(store.list_incomplete, prefix)

    async def cleanup_incomplete(self, older_than: float | timedelta) -> list[IncompleteTransfer]:
        """Remove abandoned leftovers (see Storage.cleanup_incomplete); returns what went."""
        store = await self._store()
        return await self._submit(store.cleanup_incomplete, older_than)

    async def upload_many(
        self,
        items: Iterable[UploadRequest],
        *,
        raise_on_error: bool = False,
        progress_callback: ProgressCallback | AsyncProgressCallback | None = None,
        cancel: vmstore.CancelToken | None = None,
    ) -> list[UploadResponse | StorageError]:
        """:meth:`vmstore.Storage.upload_many` in a worker thread. Cancelling the task cancels
        every item (``cancel``, or a token made for the batch) and waits until all stopped;
        each callback, the batch's and the items', may be a coroutine function."""
        store = await self._store()
        return await self._many(
            store.upload_many, list(items), raise_on_error, progress_callback, cancel
        )

    async def download_many(
        self,
        items: Iterable[DownloadRequest],
        *,
        raise_on_error: bool = False,
        progress_callback: ProgressCallback | AsyncProgressCallback | None = None,
        cancel: vmstore.CancelToken | None = None,
    ) -> list[DownloadResponse | StorageError]:
        """:meth:`vmstore.Storage.download_many` in a worker thread; see :meth:`upload_many`."""
        store = await self._store()
        return await self._many(
            store.download_many, list(items), raise_on_error, progress_callback, cancel
        )

    async def presign(self, url: str, expires_in: int = 3600) -> str:
        """:meth:`vmstore.Storage.presign` (S3 only) in a worker thread."""
        store = await self._store()
        return await self._submit(lambda _: store.presign(url, expires_in), None)

    async def _many(
        self,
        function: Callable[..., list[T]],
        items: list[Any],
        raise_on_error: bool,
        progress_callback: Any,
        cancel: vmstore.CancelToken | None,
    ) -> list[T]:
        loop = asyncio.get_running_loop()
        token = cancel if cancel is not None else vmstore.CancelToken()
        bridges: list[_ProgressBridge] = []

        def bridged(callback: Any) -> _ProgressBridge | None:
            if callback is None:
                return None
            bridges.append(_ProgressBridge(callback, loop))
            return bridges[-1]

        # Copies: the caller's requests keep their own callbacks. Anything that is not a
        # request goes through unchanged, for the store to refuse.
        sent = [
            dataclasses.replace(item, progress_callback=bridged(item.progress_callback))
            if isinstance(item, UploadRequest | DownloadRequest)
            else item
            for item in items
        ]
        combined = bridged(progress_callback)
        worker = self._submit(
            lambda _: function(
                sent, raise_on_error=raise_on_error, progress_callback=combined, cancel=token
            ),
            None,
        )
        self._running.add(token)
        try:
            results = await _to_the_end(worker, on_cancel=token.cancel)
        finally:
            self._running.discard(token)
        for bridge in bridges:
            await bridge.drain()
        return results

    # --- how calls cross to the worker threads -----------------------------------------------

    async def _store(self) -> Storage:
        await self.open()
        return self.storage

    def _submit(self, function: Callable[[Any], T], argument: Any) -> asyncio.Future[T]:
        # No await between this check and the submit: an aclose() that began while the caller
        # was waiting in open() is seen here, rather than as the pool's RuntimeError.
        if self._closed:
            raise OperationFailedError(
                "this async storage was closed; create a new one with vmstore.aio.new_storage()"
            )
        return asyncio.get_running_loop().run_in_executor(self._executor, function, argument)

    async def _call(self, function: Callable[[str], T], url: str) -> T:
        return await self._submit(function, url)

    async def _transfer(self, function: Callable[[RequestT], T], request: RequestT) -> T:
        loop = asyncio.get_running_loop()
        token = request.cancel if request.cancel is not None else vmstore.CancelToken()
        callback = request.progress_callback
        bridge = _ProgressBridge(callback, loop) if callback is not None else None
        # A copy: the caller's request is not changed (its progress callback stays its own).
        sent = dataclasses.replace(request, cancel=token, progress_callback=bridge)
        worker = self._submit(function, sent)
        self._running.add(token)
        try:
            result = await _to_the_end(worker, on_cancel=token.cancel)
        finally:
            self._running.discard(token)
        if bridge is not None:
            await bridge.drain()
        return result


class _ProgressBridge:
    """The progress callback the worker thread calls, in front of the caller's callback.

    A coroutine function's reports run on the event loop one at a time, in order; while one
    runs, newer reports replace each other, so a slow coroutine (one that patches a Kubernetes
    status, say) sees the latest count instead of a growing backlog, and the transfer never
    waits for it. A plain function is called on the worker thread as the sync API calls it.
    """

    def __init__(self, callback: ProgressCallback, loop: asyncio.AbstractEventLoop) -> None:
        self._callback = callback
        self._loop = loop
        self._is_async = _is_coroutine_function(callback)
        # Reports may come from more than one thread of the sync store; the loop takes the
        # lock too, never across an await.
        self._lock = threading.Lock()
        self._latest: tuple[int, int] | None = None
        self._delivering: concurrent.futures.Future[None] | None = None
        self._error: BaseException | None = None
        self._stray: list[concurrent.futures.Future[object]] = []

    def __call__(self, transferred: int, total: int) -> None:
        with self._lock:
            if self._error is not None:
                # An earlier report raised: stop the transfer here, as a raising plain
                # callback would have.
                raise self._error
            if self._is_async:
                self._latest = (transferred, total)
                if self._delivering is None:
                    self._delivering = asyncio.run_coroutine_threadsafe(self._deliver(), self._loop)
                return
        result = self._callback(transferred, total)
        if inspect.isawaitable(result):  # a plain function that returned an awaitable
            with self._lock:
                self._stray.append(asyncio.run_coroutine_threadsafe(_await(result), self._loop))

    async def _deliver(self) -> None:
        while True:
            with self._lock:
                report, self._latest = self._latest, None
                if report is None:
                    self._delivering = None
                    return
            try:
                result = self._callback(*report)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                with self._lock:  # the loop is shutting down: a later report starts afresh
                    self._delivering = None
                raise
            except BaseException as exc:
                with self._lock:
                    self._error = exc
                    self._latest = None
                    self._delivering = None
                raise

    async def drain(self) -> None:
        """After the worker returned: wait for the reports still to run; raise one that failed."""
        while True:
            with self._lock:
                delivering = self._delivering
            if delivering is None:
                break
            with contextlib.suppress(BaseException):  # its exception is in self._error
                await asyncio.wrap_future(delivering)
        with self._lock:
            error, stray, self._stray = self._error, self._stray, []
        if error is not None:
            raise error
        await asyncio.gather(*(asyncio.wrap_future(report) for report in stray))


def _is_coroutine_function(callback: object) -> bool:
    """``async def`` functions, partials of them, and objects with an ``async def __call__``."""
    if inspect.iscoroutinefunction(callback):
        return True
    return not inspect.isroutine(callback) and inspect.iscoroutinefunction(type(callback).__call__)


async def _await(awaitable: Awaitable[T]) -> T:
    # run_coroutine_threadsafe takes a coroutine, and a callback may return any awaitable.
    return await awaitable


async def _to_the_end(future: asyncio.Future[T], on_cancel: Callable[[], object]) -> T:
    """Await ``future`` until it is done even if the task is cancelled meanwhile.

    The first cancel calls ``on_cancel`` (the worker's CancelToken.cancel) and is raised once
    the worker has stopped, whatever the worker's own outcome; later cancels only keep the
    task waiting, since leaving early would leave the worker writing behind the caller's back.
    """
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError as exc:
            if cancelled is None:
                cancelled = exc
                on_cancel()
    if cancelled is not None:
        if not future.cancelled():
            future.exception()  # retrieved, so asyncio does not log it: the cancel wins
        raise cancelled
    return future.result()


def _start_thread(function: Callable[[], Any], done: asyncio.Future[None]) -> None:
    """Run ``function`` in a new daemon thread and resolve ``done`` on the loop afterwards."""
    loop = done.get_loop()

    def settle(error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            function()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, not lost
            error = exc
        loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="vmstore-aio-close", daemon=True).start()


def _nothing() -> None:
    """Closing a backend cannot be called off half-way: a cancel only has to wait for it."""
