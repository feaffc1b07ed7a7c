"""The upload pipeline shared by the network backends (S3, HTTP): one pass over the source.

The native :class:`vmstore._native.UploadSource` reads the source (a file or a stream) front
to back exactly once; each part is hashed in Rust as it is read, in order for the whole-object
SHA-256 and CRC-64/NVME and on its own for the part's checksum, so the bytes hashed are the
bytes sent. One part is read ahead while earlier parts are on the wire: by the source itself
when it reads O_DIRECT, else by a :class:`PartFeed` on a thread of its own;
:func:`send_parts` keeps at most ``concurrency`` parts in flight, so memory stays near
(concurrency + read-ahead) x part size whatever the source's size.

The whole-object SHA-256 exists only once the last byte has been read, so the backends record
it after the data (see each backend's notes on where).
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from vmstore import _native, images
from vmstore._codec import EncodedPart, Encoder, FramePart
from vmstore._localpath import check_source_file, direct_io_suits
from vmstore._parts import MIB, S3_MAX_PART, S3_MAX_PARTS, s3_part_size
from vmstore._pool import run_bounded
from vmstore._ratelimit import Pacer
from vmstore.errors import CancelledError, ChecksumMismatchError, InvalidConfigError
from vmstore.images import ImageInfo
from vmstore.models import S3_MAX_OBJECT_SIZE, UploadRequest
from vmstore.progress import ProgressReporter

log = logging.getLogger("vmstore.upload")

BODY_BLOCK = 1 * MIB
"""A part body is handed to the socket in views of this size."""

STREAM_TIER_PARTS = 1000
"""An unsized stream's part size doubles every this many parts (see :func:`stream_part_size`)."""

MIN_STREAM_PART = 6 * MIB
"""Smallest first part of an unsized stream for which ten doubling tiers reach 5 TiB."""


def crc64nvme_b64(value: int) -> str:
    """S3's wire form of a CRC-64/NVME: base64 of the 8 big-endian bytes."""
    return base64.b64encode(value.to_bytes(8, "big")).decode("ascii")


def sha256_b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def stream_part_size(number: int, first: int) -> int:
    """Size of part ``number`` (1-based) of a stream of unknown size.

    Parts grow as the stream goes: ``first`` for parts 1-1000, twice that for 1001-2000, and
    so on up to S3's 5 GiB. With ``first`` >= 6 MiB, 10,000 parts hold more than 5 TiB, S3's
    largest object, while a small stream still goes up in small, quickly reported parts.
    """
    first = max(first, MIN_STREAM_PART)
    return min(first << ((number - 1) // STREAM_TIER_PARTS), S3_MAX_PART)


@dataclass(frozen=True)
class SourcePlan:
    """How an upload's source will be read: opened once, sized up front where possible."""

    source: _native.UploadSource
    name: str
    size: int | None
    """Bytes the source holds: a file's size or a stream's size hint; None when unknown."""
    part_size: Callable[[int], int]
    """Size of part ``n`` (1-based)."""
    stat: os.stat_result | None
    """The file's stat when opened (None for a stream): a changed mtime means the source was
    written to during the upload."""
    image: ImageInfo | None = None
    """What the source's image header said (checked by vmstore.images before any byte was
    sent), recorded with the object; None when it could not be read."""

    @property
    def is_stream(self) -> bool:
        return self.stat is None

    def check_complete(self, size: int) -> None:
        """Before the commit: the source gave the ``size`` bytes it announced (a file's size, a
        stream's size hint) and was not written to meanwhile."""
        if self.size is not None and size != self.size:
            if self.is_stream:
                raise InvalidConfigError(
                    f"the stream held {'more than ' if size > self.size else ''}{size} bytes, "
                    f"not the {self.size} its size_hint announced; nothing was stored"
                )
            raise ChecksumMismatchError(
                f"{self.name} changed size during the upload; nothing was stored, upload it again"
            )
        self.check_unchanged()

    def read_whole(self, first: _native.SourcePart | None = None) -> memoryview:
        """A source that fits in one part, read now (so its SHA-256 is known before the body
        goes out); ``first`` is its part when already read."""
        if first is None and not self.source.exhausted:
            first = self.source.next_part(max(self.part_size(1), 1))
        data = part_view(first) if first is not None else memoryview(b"")
        self.check_complete(len(data))
        if self.source.next_part(1) is not None:
            if self.is_stream:
                raise InvalidConfigError(
                    f"the stream held more than the {len(data)} bytes its size_hint announced; "
                    "nothing was stored"
                )
            raise ChecksumMismatchError(
                f"{self.name} grew while being read; nothing was stored, upload it again"
            )
        return data

    def check_unchanged(self) -> None:
        """Refuse a file that was written to while it was read (a running VM's disk): the
        stored object would be a torn image, even though it matches its checksum."""
        if self.stat is None:
            return
        now = os.stat(self.name)
        if (now.st_mtime_ns, now.st_size, now.st_ino) != (
            self.stat.st_mtime_ns,
            self.stat.st_size,
            self.stat.st_ino,
        ):
            raise ChecksumMismatchError(
                f"{self.name} changed during the upload (it was written to while being read); "
                "nothing was stored: stop the VM or snapshot the disk, then upload again"
            )


def plan_source(
    request: UploadRequest, part_size_for: Callable[[int], int], *, direct: bool | None = None
) -> SourcePlan:
    """Open the request's source. ``part_size_for(size)`` gives the fixed part size for a
    source of known size; an unsized stream grows its parts (:func:`stream_part_size`).
    A file is read with O_DIRECT where that suits its filesystem (``direct=None``,
    :func:`vmstore._localpath.direct_io_suits`), or as ``direct`` says."""
    if request.source_stream is not None:
        hint = request.size_hint
        if hint is not None:
            fixed = part_size_for(hint)
        # The image policy's hook: the stream's head is inspected before any byte goes out.
        stream, image = images.check_upload_stream(
            request.source_stream, allow=request.allow_backing_file, size=hint
        )
        source = _native.UploadSource.stream(stream, name="<stream>")
        if hint is not None:
            return SourcePlan(source, "<stream>", hint, lambda _n: fixed, None, image)
        first = part_size_for(0)
        return SourcePlan(
            source, "<stream>", None, lambda n: stream_part_size(n, first), None, image
        )
    assert request.source_path is not None
    path = os.path.abspath(request.source_path)
    stat = check_source_file(path)
    if stat.st_size > S3_MAX_OBJECT_SIZE:
        raise InvalidConfigError(
            f"{path} holds {stat.st_size} bytes, more than the 5 TiB an object may hold"
        )
    image = images.check_upload_file(path, allow=request.allow_backing_file)
    if direct is None:
        direct = direct_io_suits(path)
    source = _native.UploadSource.file(path, direct=direct)
    fixed = part_size_for(source.size or 0)
    return SourcePlan(source, path, source.size, lambda _n: fixed, stat, image)


def s3_part_size_for(requested: int) -> Callable[[int], int]:
    """Part sizing for S3 (at least 5 MiB, at most 10,000 parts)."""

    def size_for(size: int) -> int:
        try:
            return s3_part_size(size, requested)
        except ValueError as exc:
            raise InvalidConfigError(
                f"an object of {size} bytes does not fit in {S3_MAX_PARTS} parts"
            ) from exc

    return size_for


_END = object()

P = TypeVar("P")
"""A part as it goes out: the source's (SourcePart) or its frame (EncodedPart)."""


class PartFeed:
    """The source's parts in order, read (and hashed) ahead on one thread.

    ``keep(number)`` says whether a part's bytes are needed (False for parts a resumed upload
    already stored: they are hashed, not kept). At most ``depth`` parts are read ahead of the
    consumer: the thread takes a slot before it reads a part, and the consumer gives it back
    when it takes the part, so no part is read only to wait for room (one part size less
    memory than a queue of ``depth`` plus the one in hand). ``depth=0`` reads each part in the
    consumer's thread when it asks for it, with no thread of its own: for a source that reads
    ahead by itself (an O_DIRECT file, :attr:`UploadSource.direct`), whose next part's bytes
    are already in memory when asked for, so only its hashing is left to wait for.
    ``first_number`` is the number of the next part when earlier ones were read already.
    """

    def __init__(
        self,
        plan: SourcePlan,
        *,
        keep: Callable[[int], bool] = lambda _n: True,
        depth: int = 1,
        cancel: _native.CancelToken | None = None,
        first_number: int = 1,
    ) -> None:
        self._plan = plan
        self._inline = depth == 0
        self._first_number = first_number
        self._keep = keep
        self._queue: queue.Queue[object] = queue.Queue()
        self._slots = threading.Semaphore(max(1, depth))
        self._stop = threading.Event()
        self._cancel = cancel
        self._thread = threading.Thread(target=self._run, name="vmstore-read", daemon=True)
        self._started = False

    def _take_slot(self) -> bool:
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.1):
                return True
        return False

    def _read(self, may_read: Callable[[], bool]) -> Iterator[_native.SourcePart]:
        """The parts in order, each read once ``may_read()`` allows it (False: stop)."""
        number = self._first_number
        while may_read():
            if self._cancel is not None and self._cancel.is_cancelled:
                raise CancelledError(f"upload of {self._plan.name} cancelled")
            size, keep = self._plan.part_size(number), self._keep(number)
            part = self._plan.source.next_part(size, keep=keep)
            if part is None:
                return
            yield part
            number += 1

    def _run(self) -> None:
        try:
            for part in self._read(self._take_slot):
                self._queue.put(part)
            self._queue.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._queue.put(exc)

    def __iter__(self) -> Iterator[_native.SourcePart]:
        if self._inline:
            yield from self._read(lambda: not self._stop.is_set())
            return
        if not self._started:
            self._started = True
            self._thread.start()
        while True:
            item = self._queue.get()
            self._slots.release()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, _native.SourcePart)
            yield item

    def close(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join()

    def __enter__(self) -> PartFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CallbackAbort(BaseException):
    """Carries an exception raised by the caller's progress callback out of an HTTP client's
    body read: a BaseException, so no client mistakes it for a network failure and retries or
    wraps it; the pipeline re-raises the original, unchanged."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def unwrap(exc: BaseException) -> BaseException:
    return exc.error if isinstance(exc, CallbackAbort) else exc


def pace_body(pacer: Pacer | None, count: int) -> None:
    """Wait for the store's bandwidth limit before ``count`` body bytes go to the socket. A
    cancellation is carried out of the HTTP client as a CallbackAbort: botocore would wrap a
    plain exception raised from a body read into a (retried) HTTPClientError."""
    if pacer is None:
        return
    try:
        pacer.take(count)
    except CancelledError as exc:
        raise CallbackAbort(exc) from None


class PartBody:
    """A part's bytes as a file-like HTTP body, handed out in 1 MiB views of the native buffer
    (no copy). boto3 takes bytes, bytearray or a file; a memoryview it refuses. With a
    ``pacer`` each view is taken from the store's bandwidth limit as the client reads it to
    send (and again when a retry sends it again)."""

    def __init__(self, data: memoryview, pacer: Pacer | None = None) -> None:
        self._data = data
        self._position = 0
        self._pacer = pacer

    def __len__(self) -> int:
        return len(self._data) - self._position

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: len(self._data)}[whence]
        self._position = min(max(0, base + offset), len(self._data))
        return self._position

    def read(self, size: int = -1) -> memoryview:
        # At least a MiB whatever the caller asks (http.client asks for 16 KiB): a call per
        # MiB rather than per 16 KiB keeps Python off the hot path.
        want = len(self._data) - self._position if size < 0 else max(size, BODY_BLOCK)
        if self._pacer is not None and size >= 0:
            # Within one burst per read: a larger block would leave faster than the limit.
            want = min(want, self._pacer.block)
        block = self._data[self._position : self._position + want]
        pace_body(self._pacer, len(block))
        self._position += len(block)
        return block


def part_view(part: _native.SourcePart | EncodedPart | FramePart) -> memoryview:
    """The bytes that go out for a part: its buffer, or its frame(s) when encoded."""
    if isinstance(part, FramePart):
        return memoryview(part.data)
    if isinstance(part, EncodedPart):
        if part.data is None:
            raise AssertionError(f"part {part.number} was stored already; it has no frame")
        return memoryview(part.data)
    if part.data is None:
        raise AssertionError(f"part {part.number} was read without its bytes")
    return memoryview(part.data).cast("B")


def send_parts(
    parts: Iterator[P],
    send: Callable[[P], None],
    *,
    concurrency: int,
    stop: threading.Event,
    on_landed: Callable[[list[P]], None],
    cancelled: Callable[[], bool],
    describe: str,
) -> None:
    """Send every part with ``send`` on ``concurrency`` threads, at most that many at once
    (the one bounded pool, ``_pool.run_bounded``): a part is read from the source only when a
    sender is free.

    ``on_landed`` sees each batch of finished parts (to journal them) on this thread. The first
    failure stops everything: ``stop`` is set for the senders and the failure is raised.
    """

    def run(part: P) -> P:
        send(part)
        return part

    def check() -> None:
        if cancelled():
            raise CancelledError(f"{describe} cancelled")

    run_bounded(
        parts,
        run,
        workers=concurrency,
        name="vmstore-put",
        stop=stop,
        landed=on_landed,
        check=check,
    )


def check_stored_size(
    url: str, held: int | None, sent: int, discard: Callable[[], bool] | None = None
) -> None:
    """The size the server reports holding after an upload's commit, against the bytes sent.

    A server that validates the checksum headers refuses a short body itself; one that does
    not keeps it under the final name, where its metadata or sidecar would claim the source's
    SHA-256. ``discard`` deletes such an object when the backend can tell it is this upload's
    (S3 by its ETag) and says whether it did; ``held`` is None when the server does not say.
    """
    if held is None or held == sent:
        return
    fate = (
        "so the object was deleted"
        if discard is not None and discard()
        else "and the object was left in place: check it, or delete it"
    )
    raise ChecksumMismatchError(
        f"{url} held {held} bytes after the upload, not the {sent} that were sent: the "
        f"server stored other bytes than vmstore sent, {fate}; upload again"
    )


def encoder_for(request: UploadRequest, key: bytes | None) -> Encoder | None:
    """The frame encoder of an upload that asks for compression or has a key; None otherwise
    (the parts go out as they are read)."""
    if request.compression is None and key is None:
        return None
    return Encoder(request.compression, key)


def progress_for(request: UploadRequest, total: int | None) -> ProgressReporter:
    """The request's progress, over the source's size (0 while a stream's size is unknown)."""
    return ProgressReporter(request.progress_callback, total or 0)


__all__ = [
    "BODY_BLOCK",
    "CallbackAbort",
    "PartBody",
    "PartFeed",
    "SourcePlan",
    "crc64nvme_b64",
    "encoder_for",
    "pace_body",
    "part_view",
    "plan_source",
    "s3_part_size_for",
    "send_parts",
    "sha256_b64",
    "stream_part_size",
    "unwrap",
]
