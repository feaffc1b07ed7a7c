"""Request and response bodies: ranged reads pinned to one version (_ObjectReader) and the PUT
body fed by the one upload pass (_PipelineBody)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import requests

from vmstore import _native
from vmstore._bodyread import http_client_response, read_into_buffer
from vmstore._codec import EncodedPart
from vmstore._ratelimit import Pacer
from vmstore._retry import RetryableError
from vmstore._upload import (
    BODY_BLOCK,
    CallbackAbort,
    PartFeed,
    SourcePlan,
    pace_body,
    part_view,
)
from vmstore.backends.http._errors import _check, _ResourceChangedError
from vmstore.backends.http._headers import _Validator
from vmstore.backends.http._transport import _Transport
from vmstore.errors import (
    CancelledError,
    OperationFailedError,
)
from vmstore.urls import redact_url

# Largest block a single-stream download hands to the writer at once.
STREAM_BLOCK = 4 << 20


def _is_range_answer(response: requests.Response, start: int, last: int) -> bool:
    """Whether a success carries exactly bytes ``start``-``last``: a 206, or a 200 with that
    Content-Range (rclone's answer)."""
    content_range = response.headers.get("Content-Range", "")
    return response.status_code in (200, 206) and content_range.startswith(f"bytes {start}-{last}/")


def _close_probe(response: requests.Response) -> None:
    """Finish a one-byte ``Range: bytes=0-0`` probe. A 206 carries that byte: reading it
    returns the connection to the pool for the ranged GETs that follow. Any other answer is
    closed unread, dropping the connection: a server ignoring Range sends the whole file."""
    if _is_range_answer(response, 0, 0):
        # .content, not raw.read: requests pools the connection only once it saw the body.
        with contextlib.suppress(requests.RequestException, OSError):
            _ = response.content
    response.close()


def _read_exactly(response: requests.Response, length: int, pacer: Pacer | None = None) -> bytes:
    # raw.read(n) loops in C until n bytes or the end: one call per chunk, not per 10 KiB
    # as iter_content would do (with a bandwidth limit: one call per paced block).
    data: bytes
    if pacer is not None:
        data = pacer.read(lambda n: response.raw.read(n, decode_content=False), length)
    else:
        data = response.raw.read(length, decode_content=False)
    if len(data) != length:
        raise RetryableError(f"the response body ended after {len(data)} of {length} bytes")
    return data


class _ObjectReader:
    """The ObjectReader of the shared pipeline: GETs pinned to one version of the resource."""

    def __init__(
        self,
        transport: _Transport,
        url: str,
        size: int,
        validator: _Validator,
        pacer: Pacer | None = None,
    ):
        self._transport = transport
        self._url = url
        self._size = size
        self._validator = validator
        self._pacer = pacer
        self._buffers = _native.ChunkBuffers()  # this download's chunk memory, reused

    def _get(self, headers: dict[str, str]) -> requests.Response:
        response = self._transport.send(
            "GET", self._url, headers={**headers, **self._validator.request_headers()}, stream=True
        )
        if response.status_code in (412, 416):
            response.close()
            raise _ResourceChangedError(f"{redact_url(self._url)} changed during the download")
        _check(response, "GET")
        if self._validator.changed(response.headers):
            response.close()
            raise _ResourceChangedError(f"{redact_url(self._url)} changed during the download")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            response.close()
            raise OperationFailedError(
                f"{redact_url(self._url)} was sent {encoding}-encoded although identity was "
                "asked for; its bytes cannot be ranges of the file"
            )
        return response

    def read_range(self, start: int, end: int) -> bytes | memoryview:
        response = self._get({"Range": f"bytes={start}-{end - 1}"})
        with contextlib.closing(response):
            # A 200 with a Content-Range is a range too (rclone answers so).
            if response.status_code == 206 or response.headers.get("Content-Range"):
                expected = f"bytes {start}-{end - 1}/"
                content_range = response.headers.get("Content-Range", "")
                total = content_range.rpartition("/")[2]
                if not content_range.startswith(expected):
                    raise RetryableError(f"asked for {expected}*, got {content_range!r}")
                if total not in ("*", str(self._size)):
                    raise _ResourceChangedError(
                        f"{redact_url(self._url)} is now {total} bytes, not {self._size}"
                    )
            elif not (start == 0 and end == self._size):
                # The whole object for a part of it: fine only when the part is the whole.
                raise RetryableError(f"the server ignored Range bytes={start}-{end - 1}")
            fp = http_client_response(response.raw)
            if fp is None:
                return _read_exactly(response, end - start, self._pacer)
            # Straight off the socket into this download's pooled buffer (_bodyread).
            return read_into_buffer(response.raw, fp, end - start, self._buffers, self._pacer)

    def read_stream(self) -> Iterable[bytes]:
        response = self._get({})
        block_size = STREAM_BLOCK if self._pacer is None else self._pacer.block
        with contextlib.closing(response):
            while True:
                if self._pacer is not None:
                    self._pacer.take(block_size)
                block: bytes = response.raw.read(block_size, decode_content=False)
                if not block:
                    return
                yield block


class _PipelineBody:
    """One PUT body: the source's parts as the one pass reads and hashes them
    (:class:`vmstore._upload.PartFeed`), handed to the socket in 1 MiB views of the native
    buffers.

    ``len()`` gives requests the Content-Length when the size is known (a file, a stream's size
    hint; 0 makes requests send it chunked). Progress is reported before a block goes out, and
    the last block is held back until the source is known to be complete, of the announced
    size and unchanged: otherwise the body stays incomplete and the server stores nothing.
    Iterating again (a retried or redirected PUT) reads a file again from its start; a stream
    cannot be read twice.
    """

    def __init__(
        self,
        open_plan: Callable[[], SourcePlan],
        size: int | None,
        report: Callable[[int], None],
        cancelled: Callable[[], bool],
        pacer: Pacer | None = None,
        encode: Callable[[Iterator[_native.SourcePart]], Iterator[EncodedPart]] | None = None,
    ) -> None:
        self._open_plan = open_plan
        self._size = size
        self._report = report
        self._cancelled = cancelled
        self._pacer = pacer
        self._block = BODY_BLOCK if pacer is None else pacer.block
        self._encode = encode
        """The frame stage of an encoded upload (a fresh encoder per attempt)."""
        self.plan: SourcePlan | None = None
        self.sent = 0

    def __len__(self) -> int:
        return self._size or 0

    def __bool__(self) -> bool:
        # requests replaces a falsy body with an empty one (`data or {}`): an unsized stream
        # (len 0) is still a body.
        return True

    def _blocks(self, feed: PartFeed) -> Iterator[tuple[memoryview, int]]:
        """Body blocks, each with the image bytes done once it is sent (what progress counts:
        an encoded part's frame is credited in proportion)."""
        parts: Iterator[_native.SourcePart | EncodedPart]
        parts = self._encode(iter(feed)) if self._encode is not None else iter(feed)
        for part in parts:
            view = part_view(part)
            for start in range(0, len(view), self._block):
                block = view[start : start + self._block]
                done = part.offset + part.length * (start + len(block)) // len(view)
                yield block, done

    def __iter__(self) -> Iterator[memoryview]:
        plan = self._open_plan()
        self.plan, self.sent = plan, 0
        with PartFeed(plan, cancel=None) as feed:
            blocks = self._blocks(feed)
            held, done = next(blocks, (None, 0))
            while held is not None:
                if self._cancelled():
                    raise CancelledError(f"upload of {plan.name} cancelled; nothing was stored")
                following, following_done = next(blocks, (None, 0))
                if following is None:
                    # The last block: only a complete, unchanged source gets it sent.
                    plan.check_complete(plan.source.position)
                self.sent += len(held)
                try:
                    self._report(done)
                except Exception as exc:  # noqa: BLE001 - the caller's own exception, carried out
                    raise CallbackAbort(exc) from None
                # Within the store's bandwidth limit, as the block goes to the socket.
                pace_body(self._pacer, len(held))
                yield held
                held, done = following, following_done


class _StreamSpent(Exception):
    """A stream body was asked for a second time (a retried PUT)."""
