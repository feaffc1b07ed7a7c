"""The download pipeline shared by the network backends (S3, HTTP).

HEAD has told the backend the object's size and validator (ETag); this module fetches the
object as concurrent ranged reads, writes each chunk at its offset through the native
ChunkWriter (into ``<dest>.vmstore-partial``), lets the writer's hashing thread hash the
file in order as the contiguous prefix grows, verifies the digest, and only then renames the
file into place. A mismatch, or any failure, leaves the destination as it was.

An interrupted download leaves the partial plus a state file naming the source, its ETag,
size, chunk size and the chunks already written; the next download of the same source to
the same destination continues from there if the ETag still matches. The resumed chunks are
re-hashed from disk, not trusted: the final digest covers every byte in the file.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from vmstore import _native
from vmstore._oserrors import storage_error_from_oserror
from vmstore._parts import Chunk, ChunkSet, split
from vmstore._retry import RetryableError, RetryPolicy
from vmstore.errors import (
    CancelledError,
    ChecksumMismatchError,
    NetworkError,
    NotFoundError,
    OperationFailedError,
    StorageError,
)
from vmstore.models import DownloadRequest, DownloadResponse, parse_sha256_hex
from vmstore.progress import ProgressReporter

log = logging.getLogger("vmstore.download")

PARTIAL_SUFFIX = ".vmstore-partial"
STATE_SUFFIX = ".vmstore-partial.state"
STATE_VERSION = 2  # 2: "done" holds runs [[first, last], ...] of chunk numbers


@dataclass(frozen=True)
class RemoteObject:
    """What HEAD said about the object being downloaded."""

    url: str
    size: int
    etag: str
    """Validator pinned on every ranged read ("" when the server gives none)."""
    checksum: str | None
    """SHA-256 the store holds for the object, if any."""
    supports_ranges: bool = True


class ObjectReader(Protocol):
    """How a backend reads the object's bytes. Both methods raise StorageError on failure,
    or RetryableError / a backend exception that ``classify`` maps to one for a retry."""

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes [start, end) exactly, pinned to the object's ETag."""
        ...

    def read_stream(self) -> Iterable[bytes]:
        """The whole object as one stream, for servers without range support; pinned like
        read_range (it raises if the object changed), so a restarted stream carries the
        same bytes as the one it replaces."""
        ...


@dataclass(frozen=True)
class DownloadSettings:
    chunk_size: int
    concurrency: int
    retry: RetryPolicy
    classify: Callable[[BaseException], RetryableError | None]


def _load_state(path: str) -> dict[str, object] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _save_state(path: str, state: dict[str, object]) -> None:
    temp = f"{path}.tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    os.replace(temp, path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _keeps_partial(exc: BaseException) -> bool:
    """Interruptions keep the partial for a resume; bad data and a full disk do not."""
    return not isinstance(exc, ChecksumMismatchError | NotFoundError | OperationFailedError)


class _ResumedBytesDiffer(Exception):
    """The digest failed after resuming: some reused chunk on disk was not what was sent."""


def download_object(
    obj: RemoteObject,
    reader: ObjectReader,
    request: DownloadRequest,
    settings: DownloadSettings,
) -> DownloadResponse:
    """Fetch ``obj`` into ``request.destination_path``, verified, atomically.

    A resumed download whose digest does not match may have reused damaged chunks (a crash
    can lose or garble what the page cache held): it starts over once from zero before a
    mismatch is reported, so only the source's own bytes can fail verification.
    """
    try:
        return _download(obj, reader, request, settings, reuse_partial=request.resume)
    except _ResumedBytesDiffer:
        log.warning("resumed download of %s failed verification; starting over", obj.url)
        return _download(obj, reader, request, settings, reuse_partial=False)


def _download(
    obj: RemoteObject,
    reader: ObjectReader,
    request: DownloadRequest,
    settings: DownloadSettings,
    *,
    reuse_partial: bool,
) -> DownloadResponse:
    expected: str | None = None
    if request.expected_checksum:
        expected = parse_sha256_hex(request.expected_checksum)
    elif request.verify_checksum and obj.checksum:
        expected = obj.checksum
    elif request.verify_checksum:
        # Stored by another tool: nothing to compare with. The digest is still computed
        # and returned, so the caller can check it against a checksum of their own.
        log.warning(
            "%s has no stored SHA-256 and no expected_checksum was given: downloading it "
            "unverified",
            obj.url,
        )

    destination = os.path.abspath(request.destination_path)
    if os.path.isdir(destination):
        raise OperationFailedError(
            f"destination {destination} is a directory; give the path of the file to write"
        )
    directory = os.path.dirname(destination)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise storage_error_from_oserror(exc, "create directory", directory) from exc

    partial = destination + PARTIAL_SUFFIX
    state_path = destination + STATE_SUFFIX
    try:
        writer = _native.ChunkWriter(destination, partial, resume=reuse_partial, hash=True)
    except BlockingIOError as exc:
        raise OperationFailedError(
            f"another download to {destination} is in progress (its partial file is locked); "
            "wait for it or choose another destination"
        ) from exc

    chunk_size = settings.chunk_size if obj.supports_ranges else max(obj.size, 1)
    chunks = split(obj.size, chunk_size)
    done = ChunkSet()
    state: dict[str, object] = {
        "version": STATE_VERSION,
        "url": obj.url,
        "etag": obj.etag,
        "size": obj.size,
        "chunk_size": chunk_size,
        "done": [],
    }
    if reuse_partial and obj.etag and obj.supports_ranges:
        previous = _load_state(state_path)
        same = previous is not None and all(
            previous.get(key) == state[key]
            for key in ("version", "url", "etag", "size", "chunk_size")
        )
        if previous is not None and same:
            # A chunk past the partial's end was lost (e.g. truncated by a crash).
            on_disk = writer.existing_length
            whole = sum(1 for chunk in chunks if chunk.end <= on_disk)
            done = ChunkSet.from_runs(previous.get("done"), whole)
        elif previous is not None:
            log.info("partial download of %s is from another version; starting over", obj.url)
    resumed_bytes = 0
    try:
        if not done:
            writer.set_len(0)
        writer.set_len(obj.size)
        for chunk in chunks:
            if chunk.number in done:
                # Already on disk: the hashing thread re-reads it rather than trusting it.
                writer.mark_done(chunk.offset, chunk.length)
                resumed_bytes += chunk.length
        if resumed_bytes:
            log.info("resuming %s at %d of %d bytes", obj.url, resumed_bytes, obj.size)
        state["done"] = done.runs()
        _save_state(state_path, state)

        reporter = ProgressReporter(request.progress_callback, obj.size)
        reporter(resumed_bytes, obj.size)
        todo = [chunk for chunk in chunks if chunk.number not in done]
        if obj.supports_ranges:
            _fetch_ranges(
                todo, reader, writer, settings, request, reporter, state, done, state_path
            )
        else:
            _fetch_stream(obj, reader, writer, request, reporter, settings)

        digest = writer.hexdigest(obj.size)
        if expected is not None and digest != expected:
            if resumed_bytes:
                raise _ResumedBytesDiffer()
            raise ChecksumMismatchError(
                f"{obj.url} downloaded with SHA-256 {digest}, expected {expected}; "
                f"{destination} was left as it was"
            )
        # The final (total, total) report comes before the commit, as for every backend:
        # a callback that raises there still stops the file from appearing.
        reporter.finish(obj.size)
        writer.commit()
        _remove(state_path)
    except BaseException as exc:
        keep = (
            request.resume
            and obj.supports_ranges
            and _keeps_partial(exc)
            and not isinstance(exc, _ResumedBytesDiffer)
        )
        with contextlib.suppress(Exception):
            writer.abort(keep=keep)
        if keep:
            with contextlib.suppress(OSError):
                _save_state(state_path, {**state, "done": done.runs()})
            log.info("kept %s for a later resume", partial)
        else:
            _remove(state_path)
        raise
    return DownloadResponse(
        checksum=digest,
        content_length=obj.size,
        bytes_transferred=obj.size - resumed_bytes,
        destination_path=destination,
        resumed_from=resumed_bytes,
    )


def _check_cancel(request: DownloadRequest) -> None:
    if request.cancel is not None and request.cancel.is_cancelled:
        raise CancelledError(f"download of {request.source_url} cancelled")


def _fetch_ranges(
    todo: list[Chunk],
    reader: ObjectReader,
    writer: _native.ChunkWriter,
    settings: DownloadSettings,
    request: DownloadRequest,
    reporter: ProgressReporter,
    state: dict[str, object],
    done: ChunkSet,
    state_path: str,
) -> None:
    stop = threading.Event()
    done_lock = threading.Lock()

    def fetch(chunk: Chunk) -> Chunk:
        def attempt() -> bytes:
            if stop.is_set():
                raise CancelledError("download stopped")
            data = reader.read_range(chunk.offset, chunk.end)
            if len(data) != chunk.length:
                raise RetryableError(
                    f"range {chunk.offset}-{chunk.end - 1} returned {len(data)} bytes"
                )
            return data

        data = settings.retry.call(
            attempt,
            classify=settings.classify,
            describe=f"reading bytes {chunk.offset}-{chunk.end - 1} of {request.source_url}",
            cancelled=stop,
        )
        writer.write_at(chunk.offset, data)
        return chunk

    # Bounded submission: at most 2 x concurrency chunks exist at once, so memory stays
    # near concurrency x chunk_size whatever the object's size.
    pending: set[cf.Future[Chunk]] = set()
    queue = list(reversed(todo))
    with cf.ThreadPoolExecutor(
        max_workers=settings.concurrency, thread_name_prefix="vmstore-get"
    ) as pool:
        try:
            while queue or pending:
                while queue and len(pending) < 2 * settings.concurrency:
                    pending.add(pool.submit(fetch, queue.pop()))
                finished, pending = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_COMPLETED)
                landed = [future.result() for future in finished]
                with done_lock:
                    done.update(chunk.number for chunk in landed)
                # Record landed chunks before telling anyone: a process killed from its
                # progress callback must still find them on resume.
                if landed:
                    state["done"] = done.runs()
                    with contextlib.suppress(OSError):
                        _save_state(state_path, state)
                for chunk in landed:
                    reporter.advance(chunk.length)
                _check_cancel(request)
        except BaseException:
            stop.set()
            for future in pending:
                future.cancel()
            # Chunks that finish while we shut down are on disk: keep them for the resume.
            for future in cf.as_completed(pending):
                with contextlib.suppress(BaseException):
                    done.add(future.result().number)
            raise


def _fetch_stream(
    obj: RemoteObject,
    reader: ObjectReader,
    writer: _native.ChunkWriter,
    request: DownloadRequest,
    reporter: ProgressReporter,
    settings: DownloadSettings,
) -> None:
    """One stream for a server without ranges. A stream that breaks off is requested again
    from its start (there is no other way) and the bytes already written are skipped, not
    rewritten: the in-order hasher has seen them, and the pinned stream resends the same."""
    written = 0

    def attempt() -> None:
        nonlocal written
        position = 0
        for block in reader.read_stream():
            _check_cancel(request)
            end = position + len(block)
            if end > obj.size:
                raise NetworkError(
                    f"{obj.url} sent more than the {obj.size} bytes it announced; "
                    "retry the download"
                )
            if end > written:
                fresh = memoryview(block)[max(0, written - position) :]
                writer.write_at(end - len(fresh), fresh)
                written = end
                reporter.advance(len(fresh))
            position = end
        if position != obj.size:
            raise RetryableError(f"{obj.url} ended after {position} of {obj.size} bytes")

    settings.retry.call(
        attempt, classify=settings.classify, describe=f"reading {request.source_url}"
    )


__all__ = [
    "DownloadSettings",
    "ObjectReader",
    "RemoteObject",
    "StorageError",
    "download_object",
]
