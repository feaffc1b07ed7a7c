"""The download pipeline shared by the network backends (S3, HTTP).

HEAD has told the backend the object's size and validator (ETag); this module fetches the
object as concurrent ranged reads and hands each chunk to the native ChunkWriter, which
writes it at its offset (into ``<dest>.vmstore-partial``) and hashes the object in order from
memory as the frontier advances: the chunk at the frontier is hashed at once, a chunk that
arrives early is held until the frontier reaches it, nothing just written is read back. At
most ``concurrency + 2`` chunks are fetched ahead of the frontier (in flight or held), so
memory stays near that many chunks whatever the object's size. The digest is verified and
only then is the file renamed into place. A mismatch, or any failure, leaves the destination
as it was.

An interrupted download leaves the partial plus a state file naming the source, its ETag,
size, chunk size and the chunks already written; the next download of the same source to
the same destination continues from there if the ETag still matches. The resumed chunks are
re-hashed from disk, not trusted: the final digest covers every byte in the file.

A stream destination (``DownloadRequest.destination_stream``) gets the bytes strictly in
order, from the same in-order pass (no partial file, no state file, so no resume), and is
verified at the end: by then the consumer has the bytes, which a mismatch error says.

An encoded object (compressed and/or encrypted, ``RemoteObject.encoding``: docs/FORMAT.md) is
fetched the same way with frames for chunks: each frame's stored range is read, decoded by the
native FrameCodec (GIL released) and written at its plain offset, so sizes, progress, the
digest and the resume state are all the image's; a resume continues frame by frame. The key
is checked against the record before anything is opened; a frame that does not decode is a
ChecksumMismatchError and nothing is committed.

What is verified: ``expected_checksum``, else the SHA-256 the store keeps, else an S3
full-object checksum another tool's upload left (CRC64NVME, CRC32C, CRC32 from the same
pass; SHA256 from the SHA-256), else nothing (logged).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, cast

from vmstore import _native, images
from vmstore._codec import Encoding, Frame, decoder_for, looks_encoded, missing_record
from vmstore._failure import keeps_partial
from vmstore._incomplete import forget_download, record_download
from vmstore._localpath import check_destination_file, direct_io_suits, stream_label
from vmstore._oserrors import storage_error_from_oserror
from vmstore._parts import Chunk, ChunkSet, split
from vmstore._pool import run_bounded
from vmstore._ratelimit import Pacer, StopSignal
from vmstore._retry import RetryableError, RetryPolicy
from vmstore.errors import (
    CancelledError,
    ChecksumMismatchError,
    NetworkError,
    OperationFailedError,
    StorageError,
)
from vmstore.models import DownloadRequest, DownloadResponse, WritableStream, parse_sha256_hex
from vmstore.progress import ProgressReporter
from vmstore.urls import redact_url

log = logging.getLogger("vmstore.download")

PARTIAL_SUFFIX = ".vmstore-partial"
STATE_SUFFIX = ".vmstore-partial.state"
STATE_VERSION = 2  # 2: "done" holds runs [[first, last], ...] of chunk numbers

WINDOW_EXTRA = 2
"""Chunks fetched ahead of the hash frontier beyond ``concurrency``: enough that a worker
finishing a chunk finds the next one queued, few enough to bound memory."""

CRC_WIDTHS = {"CRC64NVME": 8, "CRC32C": 4, "CRC32": 4}
"""The S3 full-object CRCs the writer computes, with their width in bytes on the wire."""

S3_CHECKSUM_ALGORITHMS = (*CRC_WIDTHS, "SHA256")


@dataclass(frozen=True)
class S3Checksum:
    """A full-object checksum S3 keeps for an object (``x-amz-checksum-<algorithm>`` of a HEAD
    with ``ChecksumMode=ENABLED`` and ``x-amz-checksum-type: FULL_OBJECT``), e.g. left by
    another tool's upload. ``algorithm`` as S3 names it (CRC64NVME, CRC32C, CRC32, SHA256),
    ``value`` base64 as the header carries it. A composite checksum (a checksum of the parts'
    checksums, shown as ``<base64>-<parts>``) cannot be checked against the object's bytes
    and is reported as unverifiable."""

    algorithm: str
    value: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "algorithm", self.algorithm.upper())

    @property
    def verifiable(self) -> bool:
        return self.algorithm in S3_CHECKSUM_ALGORITHMS and "-" not in self.value


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
    s3_checksum: S3Checksum | None = None
    """The S3 full-object checksum, checked when no SHA-256 is known."""
    encoding: Encoding | None = None
    """The frame record of a compressed or encrypted object: ``size`` is then the image's
    (plain) size, and the reader is asked for the frames' stored ranges."""


class ObjectReader(Protocol):
    """How a backend reads the object's bytes. Both methods raise StorageError on failure,
    or RetryableError / a backend exception that ``classify`` maps to one for a retry."""

    def read_range(self, start: int, end: int) -> bytes | memoryview:
        """Bytes [start, end) exactly, pinned to the object's ETag: any contiguous bytes-like
        object that nobody changes afterwards (the writer may hold it, uncopied, until the
        hash frontier reaches it)."""
        ...

    def read_stream(self) -> Iterable[bytes]:
        """The whole object as one stream, for servers without range support; pinned like
        read_range (it raises if the object changed), so a restarted stream carries the
        same bytes as the one it replaces. Each block is a fresh object, as for read_range."""
        ...


@dataclass(frozen=True)
class DownloadSettings:
    chunk_size: int
    concurrency: int
    retry: RetryPolicy
    classify: Callable[[BaseException], RetryableError | None]
    encryption_key: bytes | None = None
    """The store's key, for encrypted objects (never logged, never in the resume state)."""
    pacer: Pacer | None = None
    """The bandwidth limit the reader takes its bytes from; stopped when the download fails,
    so readers waiting on it give up at once."""


@dataclass(frozen=True)
class _Check:
    """What the digests are compared with at the end (nothing when both are None)."""

    sha256: str | None = None
    s3: S3Checksum | None = None

    @property
    def crc(self) -> tuple[str, ...]:
        """The CRC the writer must compute for this check."""
        return (self.s3.algorithm,) if self.s3 and self.s3.algorithm in CRC_WIDTHS else ()

    def mismatch(self, url: str, digest: str, crcs: dict[str, int]) -> str | None:
        """None when the bytes match; otherwise what differs, for the error message."""
        if self.sha256 is not None:
            if digest == self.sha256:
                return None
            return f"{url} downloaded with SHA-256 {digest}, expected {self.sha256}"
        if self.s3 is None:
            return None
        if self.s3.algorithm == "SHA256":
            actual = base64.b64encode(binascii.unhexlify(digest)).decode()
        else:
            width = CRC_WIDTHS[self.s3.algorithm]
            actual = base64.b64encode(crcs[self.s3.algorithm].to_bytes(width, "big")).decode()
        if actual == self.s3.value:
            return None
        return (
            f"{url} downloaded with {self.s3.algorithm} {actual}, but S3 recorded "
            f"{self.s3.value} for the object"
        )


def _choose_check(obj: RemoteObject, request: DownloadRequest) -> _Check:
    if request.expected_checksum:
        return _Check(sha256=parse_sha256_hex(request.expected_checksum))
    if not request.verify_checksum:
        return _Check()
    if obj.checksum:
        return _Check(sha256=obj.checksum)
    if obj.s3_checksum is not None and obj.s3_checksum.verifiable:
        return _Check(s3=obj.s3_checksum)
    if obj.s3_checksum is not None:
        log.warning(
            "%s carries only a %s checksum %s, which cannot be checked against the object's "
            "bytes (a checksum of its parts' checksums, or an algorithm vmstore does not "
            "compute): downloading it unverified",
            obj.url,
            obj.s3_checksum.algorithm,
            obj.s3_checksum.value,
        )
        return _Check()
    # Stored by another tool: nothing to compare with. The digest is still computed and
    # returned, so the caller can check it against a checksum of their own.
    log.warning(
        "%s has no stored SHA-256 and no expected_checksum was given: downloading it unverified",
        obj.url,
    )
    return _Check()


def _load_state(path: str) -> dict[str, object] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError, RecursionError):  # deeply nested JSON: not our state
        return None
    return state if isinstance(state, dict) else None


def _save_state(path: str, state: dict[str, object]) -> None:
    temp = f"{path}.tmp"
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(state, handle)
        os.replace(temp, path)
    except BaseException:
        # A full disk fails the write (or the close): no half-written temp is left on it.
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class _ResumedBytesDiffer(Exception):
    """The digest failed after resuming: some reused chunk on disk was not what was sent."""


def download_object(
    obj: RemoteObject,
    reader: ObjectReader,
    request: DownloadRequest,
    settings: DownloadSettings,
) -> DownloadResponse:
    """Fetch ``obj`` into ``request.destination_path`` (verified, atomically) or into
    ``request.destination_stream`` (in order, verified at the end).

    A resumed download whose digest does not match may have reused damaged chunks (a crash
    can lose or garble what the page cache held): it starts over once from zero before a
    mismatch is reported, so only the source's own bytes can fail verification.
    """
    frames: _Frames | None = None
    if obj.encoding is not None:
        # Refused now, before the destination is touched: no key, the wrong key.
        frames = _Frames(obj.encoding, decoder_for(obj.encoding, settings.encryption_key, obj.url))
        if obj.size != obj.encoding.plain_size:
            raise AssertionError("an encoded RemoteObject's size is its plain size")
        # S3's own checksums and ETag describe the stored frames, not the image.
        obj = dataclasses.replace(obj, s3_checksum=None)
    check = _choose_check(obj, request)
    if request.destination_stream is not None:
        return _download_to_stream(obj, reader, request, settings, check, frames)
    try:
        return _download(
            obj, reader, request, settings, check, frames, reuse_partial=request.resume
        )
    except _ResumedBytesDiffer:
        log.warning("resumed download of %s failed verification; starting over", obj.url)
        return _download(obj, reader, request, settings, check, frames, reuse_partial=False)


class _Frames:
    """An encoded object's frames and the decoder for them: the chunks of its download."""

    def __init__(self, encoding: Encoding, decoder: _native.FrameCodec) -> None:
        self.encoding = encoding
        self.decoder = decoder
        self.by_number: dict[int, Frame] = {f.number: f for f in encoding.frame_list()}

    def chunks(self) -> list[Chunk]:
        return [Chunk(f.number, f.plain_offset, f.plain_length) for f in self.by_number.values()]

    def decode(self, frame: Frame, data: object) -> bytes:
        return self.decoder.decode(
            data, frame.index, frame.plain_offset, frame.plain_length, frame.last
        )


def _chunks_for(obj: RemoteObject, chunk_size: int, frames: _Frames | None) -> list[Chunk]:
    return frames.chunks() if frames is not None else split(obj.size, chunk_size)


def _done_runs(chunks: list[Chunk], done: ChunkSet) -> list[tuple[int, int]]:
    """(offset, length) of each run of consecutive chunks already on disk."""
    runs: list[tuple[int, int]] = []
    for chunk in chunks:
        if chunk.number not in done:
            continue
        if runs and sum(runs[-1]) == chunk.offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + chunk.length)
        else:
            runs.append((chunk.offset, chunk.length))
    return runs


def _download(
    obj: RemoteObject,
    reader: ObjectReader,
    request: DownloadRequest,
    settings: DownloadSettings,
    check: _Check,
    frames: _Frames | None,
    *,
    reuse_partial: bool,
) -> DownloadResponse:
    # A directory, or an existing FIFO or device, cannot become the file: refused before
    # anything is opened (opening a FIFO would wait for a reader).
    destination = check_destination_file(request.destination_path)
    directory = os.path.dirname(destination)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise storage_error_from_oserror(exc, "create directory", directory) from exc

    partial = destination + PARTIAL_SUFFIX
    state_path = destination + STATE_SUFFIX
    try:
        writer = _native.ChunkWriter(
            destination,
            partial,
            resume=reuse_partial,
            hash=True,
            crc=check.crc,
            direct=direct_io_suits(directory),
        )
    except BlockingIOError as exc:
        raise OperationFailedError(
            f"another download to {destination} is in progress (its partial file is locked); "
            "wait for it or choose another destination"
        ) from exc
    # Recorded before any byte is written: a killed download's partial is still found by gc.
    record_download(obj.url, partial, state_path)

    chunk_size = settings.chunk_size if obj.supports_ranges else max(obj.size, 1)
    chunks = _chunks_for(obj, chunk_size, frames)
    done = ChunkSet()
    state: dict[str, object] = {
        "version": STATE_VERSION,
        "url": obj.url,
        "etag": obj.etag,
        "size": obj.size,
        "chunk_size": chunk_size,
        "done": [],
    }
    if frames is not None:
        # Chunks are frames: the same record means the same frames (the record is public).
        state["encoding"] = frames.encoding.identity()
    if reuse_partial and obj.etag and obj.supports_ranges:
        previous = _load_state(state_path)
        same = previous is not None and all(
            previous.get(key) == state.get(key)
            for key in ("version", "url", "etag", "size", "chunk_size", "encoding")
        )
        if previous is not None and same:
            # A chunk past the partial's end was lost (e.g. truncated by a crash).
            on_disk = writer.existing_length
            whole = sum(1 for chunk in chunks if chunk.end <= on_disk)
            done = ChunkSet.from_runs(previous.get("done"), whole)
        elif previous is not None:
            log.info("partial download of %s is from another version; starting over", obj.url)
    done_lock = threading.Lock()
    resumed_bytes = 0
    try:
        if not done:
            writer.set_len(0)
        writer.set_len(obj.size)
        for offset, length in _done_runs(chunks, done):
            # Already on disk: the writer re-reads and hashes it rather than trusting it,
            # on a thread of its own while the rest is fetched.
            writer.mark_done(offset, length)
            resumed_bytes += length
        if resumed_bytes:
            log.info("resuming %s at %d of %d bytes", obj.url, resumed_bytes, obj.size)
        state["done"] = done.runs()
        try:
            _save_state(state_path, state)
        except OSError as exc:
            # A StorageError here, so that a full disk is final: nothing is kept on it.
            raise storage_error_from_oserror(exc, "write the resume state", state_path) from exc

        def landed(numbers: Iterable[int], save: bool) -> None:
            with done_lock:
                done.update(numbers)
                if save:
                    state["done"] = done.runs()
                    with contextlib.suppress(OSError):
                        _save_state(state_path, state)

        reporter = ProgressReporter(request.progress_callback, obj.size)
        reporter(resumed_bytes, obj.size)
        todo = [chunk for chunk in chunks if chunk.number not in done]
        if obj.supports_ranges:
            _fetch_ranges(todo, reader, writer, settings, request, reporter, landed, frames)
        elif frames is not None:
            _fetch_stream_frames(obj, reader, writer, request, reporter, settings, frames)
        else:
            _fetch_stream(obj, reader, writer, request, reporter, settings)

        digest = writer.hexdigest(obj.size)
        crcs = writer.crc_values(obj.size) if check.crc else {}
        log.debug(
            "%s: at most %d bytes were held for the in-order hash", obj.url, writer.held_bytes_peak
        )
        problem = check.mismatch(obj.url, digest, crcs)
        if problem is not None:
            if resumed_bytes:
                raise _ResumedBytesDiffer()
            raise ChecksumMismatchError(f"{problem}; {destination} was left as it was")
        if not request.allow_backing_file:
            # The image policy's hook: the verified partial's header, before the commit.
            images.check_download_file(partial, obj.url, destination, allow=False)
        # The final (total, total) report comes before the commit, as for every backend:
        # a callback that raises there still stops the file from appearing.
        reporter.finish(obj.size)
        writer.commit()
        _remove(state_path)
        forget_download(partial)
    except BaseException as exc:
        keep = (
            request.resume
            and obj.supports_ranges
            and keeps_partial(exc)
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
            forget_download(partial)
        raise
    return DownloadResponse(
        checksum=digest,
        content_length=obj.size,
        bytes_transferred=obj.size - resumed_bytes,
        destination_path=destination,
        resumed_from=resumed_bytes,
    )


class _StreamSink:
    """``stream.write`` as the writer's sink: short writes are completed, and whatever the
    consumer raises (BrokenPipeError when it went away) becomes an OperationFailedError
    naming the stream, which stops the transfer."""

    def __init__(self, stream: WritableStream, name: str, url: str) -> None:
        self._stream = stream
        self.name = name
        self._url = url
        self.delivered = 0

    def __call__(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        # Binary streams take any buffer; WritableStream names bytes only for brevity.
        write = cast(Callable[[memoryview], object], self._stream.write)
        try:
            while view.nbytes:
                written = write(view)
                # A buffered stream takes everything (returns the length or None); a raw one
                # may take a part, and the rest goes in the next call.
                count = written if isinstance(written, int) else view.nbytes
                if count <= 0:
                    raise OSError(f"write() accepted {count} bytes")
                view = view[count:]
                self.delivered += count
        except Exception as exc:  # the consumer's failure, whatever its type: stop here
            raise OperationFailedError(
                f"writing {self._url} to {self.name} failed after {self.delivered} bytes: "
                f"{exc}; the download was stopped",
                cause=exc,
            ) from exc

    def flush(self) -> None:
        flush = getattr(self._stream, "flush", None)
        if not callable(flush):
            return
        try:
            flush()
        except Exception as exc:  # the consumer's failure, whatever its type
            raise OperationFailedError(
                f"flushing {self._url} to {self.name} failed: {exc}", cause=exc
            ) from exc


def _download_to_stream(
    obj: RemoteObject,
    reader: ObjectReader,
    request: DownloadRequest,
    settings: DownloadSettings,
    check: _Check,
    frames: _Frames | None = None,
) -> DownloadResponse:
    assert request.destination_stream is not None
    sink = _StreamSink(
        request.destination_stream, stream_label(request.destination_stream), obj.url
    )
    log.info(
        "downloading %s (%d bytes) to %s in order; a stream destination keeps no partial "
        "file, so an interrupted download cannot be resumed, and it is verified at the end",
        obj.url,
        obj.size,
        sink.name,
    )
    # The image policy's hook: the head is held back until its header was checked.
    gate = None if request.allow_backing_file else images.StreamGate(sink, obj.url, obj.size)
    writer = _native.ChunkWriter.for_stream(gate or sink, crc=check.crc)
    try:
        reporter = ProgressReporter(request.progress_callback, obj.size)
        reporter(0, obj.size)
        if obj.supports_ranges:
            todo = _chunks_for(obj, settings.chunk_size, frames)
            _fetch_ranges(todo, reader, writer, settings, request, reporter, None, frames)
        elif frames is not None:
            _fetch_stream_frames(obj, reader, writer, request, reporter, settings, frames)
        else:
            _fetch_stream(obj, reader, writer, request, reporter, settings)
        digest = writer.hexdigest(obj.size)
        crcs = writer.crc_values(obj.size) if check.crc else {}
        if gate is not None:
            gate.close()
        sink.flush()
        problem = check.mismatch(obj.url, digest, crcs)
        if problem is not None:
            raise ChecksumMismatchError(
                f"{problem}; {sink.name} has already received all {sink.delivered} bytes: "
                "discard what it wrote"
            )
        reporter.finish(obj.size)
    except StorageError as exc:
        # A backend may restart a download from zero on some of its own (private) errors;
        # bytes already given to a stream cannot be taken back, so they end here as the
        # public error of the same type.
        if sink.delivered and type(exc).__module__ != StorageError.__module__:
            raise StorageError(
                exc.type,
                f"{exc.message}; {sink.name} has already received {sink.delivered} bytes, so "
                "the download cannot start over",
                cause=exc,
            ) from exc
        raise
    finally:
        with contextlib.suppress(Exception):
            writer.abort()
    return DownloadResponse(
        checksum=digest,
        content_length=obj.size,
        bytes_transferred=obj.size,
        destination_path=None,
        resumed_from=0,
    )


def _check_cancel(request: DownloadRequest) -> None:
    if request.cancel is not None and request.cancel.is_cancelled:
        raise CancelledError(f"download of {redact_url(request.source_url)} cancelled")


def _fetch_ranges(
    todo: list[Chunk],
    reader: ObjectReader,
    writer: _native.ChunkWriter,
    settings: DownloadSettings,
    request: DownloadRequest,
    reporter: ProgressReporter,
    landed: Callable[[Iterable[int], bool], None] | None,
    frames: _Frames | None = None,
) -> None:
    """Fetch ``todo`` (in offset order) concurrently, never more than ``window`` chunks past
    the first one not yet hashed: the chunks in flight or held for the hash are the memory
    a download uses. ``landed(numbers, save)`` records chunks now on disk (file only).
    With ``frames`` a chunk is a frame: its stored range is read and decoded."""
    stop = StopSignal(settings.pacer)  # a failure also ends the pacer's waits
    window = settings.concurrency + WINDOW_EXTRA
    shown_url = redact_url(request.source_url)

    def fetch(chunk: Chunk) -> Chunk:
        frame = frames.by_number[chunk.number] if frames is not None else None
        start, end = (frame.stored_offset, frame.stored_end) if frame else (chunk.offset, chunk.end)

        def attempt() -> bytes | memoryview:
            if stop.is_set():
                raise CancelledError("download stopped")
            data = reader.read_range(start, end)
            if len(data) != end - start:
                raise RetryableError(f"range {start}-{end - 1} returned {len(data)} bytes")
            return data

        data = settings.retry.call(
            attempt,
            classify=settings.classify,
            describe=f"reading bytes {start}-{end - 1} of {shown_url}",
            cancelled=stop,
        )
        if frames is not None and frame is not None:
            data = frames.decode(frame, data)  # a fresh bytes; the pooled buffer is free again
        elif chunk.offset == 0 and looks_encoded(data):
            raise missing_record(request.source_url)
        # The reader's buffer is ours alone: held by reference if it lands early.
        writer.write_at(chunk.offset, data, owned=True)
        return chunk

    hashed = 0  # todo[:hashed] are wholly behind the hash frontier

    def admit(submitted: int) -> bool:
        # The reorder window: no chunk more than ``window`` past the first one not hashed.
        nonlocal hashed
        frontier = writer.hashed_length
        while hashed < submitted and todo[hashed].end <= frontier:
            hashed += 1
        return submitted < hashed + window

    def land(chunks: list[Chunk]) -> None:
        # Recorded before telling anyone: a process killed from its progress callback must
        # still find them on resume.
        if landed is not None:
            landed((chunk.number for chunk in chunks), True)
        for chunk in chunks:
            reporter.advance(chunk.length)

    def keep(chunk: Chunk) -> None:
        # A chunk that finished while the download stopped is on disk: kept for the resume.
        if landed is not None:
            landed((chunk.number,), False)

    run_bounded(
        todo,
        fetch,
        workers=settings.concurrency,
        name="vmstore-get",
        stop=stop,
        landed=land,
        check=lambda: _check_cancel(request),
        max_in_flight=window,
        admit=admit,
        salvaged=keep,
    )


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
            if position == 0 and looks_encoded(block):
                raise missing_record(request.source_url)
            if end > written:
                # The whole block when it is all new: a bytes object goes on uncopied.
                fresh = block if written <= position else memoryview(block)[written - position :]
                writer.write_at(end - len(fresh), fresh, owned=True)
                written = end
                reporter.advance(len(fresh))
            position = end
        if position != obj.size:
            raise RetryableError(f"{obj.url} ended after {position} of {obj.size} bytes")

    settings.retry.call(
        attempt, classify=settings.classify, describe=f"reading {obj.url}"
    )


def _fetch_stream_frames(
    obj: RemoteObject,
    reader: ObjectReader,
    writer: _native.ChunkWriter,
    request: DownloadRequest,
    reporter: ProgressReporter,
    settings: DownloadSettings,
    frames: _Frames,
) -> None:
    """An encoded object from a server without ranges: the stored stream is cut into its
    frames (each one self-delimiting, its length also in the record) and each is decoded and
    written as it completes. A stream that breaks off is requested again from its start and
    the frames already written are skipped."""
    order = list(frames.by_number.values())
    stored_size = frames.encoding.stored_size
    written = 0  # frames already decoded and written

    def attempt() -> None:
        nonlocal written
        position, index = 0, 0
        pending = bytearray()
        for block in reader.read_stream():
            _check_cancel(request)
            position += len(block)
            if position > stored_size:
                raise NetworkError(
                    f"{obj.url} sent more than the {stored_size} bytes it holds; retry"
                )
            pending += block
            while index < len(order) and len(pending) >= order[index].stored_length:
                frame = order[index]
                data = bytes(pending[: frame.stored_length])
                del pending[: frame.stored_length]
                if index >= written:
                    writer.write_at(frame.plain_offset, frames.decode(frame, data), owned=True)
                    written = index + 1
                    reporter.advance(frame.plain_length)
                index += 1
        if position != stored_size:
            raise RetryableError(f"{obj.url} ended after {position} of {stored_size} bytes")

    settings.retry.call(
        attempt, classify=settings.classify, describe=f"reading {request.source_url}"
    )


__all__ = [
    "DownloadSettings",
    "ObjectReader",
    "RemoteObject",
    "S3Checksum",
    "StorageError",
    "download_object",
]
