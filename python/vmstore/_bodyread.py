"""Response bodies read straight into pooled native buffers (the S3 and HTTP ranged readers).

``requests``/``botocore`` hand a body out as fresh ``bytes`` per read: a new 10-16 MiB
allocation per chunk, page-faulted in on first touch and, once glibc's dynamic mmap threshold
has risen, kept in malloc's arenas after it is freed (a download's RSS then sits far above the
chunks in flight). Here the http.client response under urllib3 fills a buffer from the
download's own :class:`vmstore._native.ChunkBuffers` with ``readinto``: one copy, socket to
buffer, into memory that the next chunk reuses once the writer has hashed this one.

When the response is not the usual urllib3-over-http.client one (another client, a test
double), :func:`http_client_response` says so and the reader keeps its plain ``read``.
"""

from __future__ import annotations

import http.client
import ssl
from typing import Any, Protocol

import urllib3.exceptions

from vmstore import _native
from vmstore._ratelimit import Pacer


class _ReadInto(Protocol):
    def readinto(self, buffer: memoryview) -> int: ...
    def isclosed(self) -> bool: ...


def http_client_response(raw: object) -> _ReadInto | None:
    """The ``http.client.HTTPResponse`` under a urllib3 response (its ``_fp``), or None."""
    fp = getattr(raw, "_fp", None)
    if fp is None or not hasattr(fp, "readinto") or not hasattr(fp, "isclosed"):
        return None
    return fp  # type: ignore[no-any-return]


def read_into_buffer(
    raw: Any,
    fp: _ReadInto,
    length: int,
    buffers: _native.ChunkBuffers,
    pacer: Pacer | None = None,
) -> memoryview:
    """``length`` bytes of the body in a pooled buffer (a body that ends before them is
    urllib3's ProtocolError, as from ``read``); with a pacer, each block is taken from the
    limiter before it is read off the socket.

    Once http.client has the whole body, the connection goes back to urllib3's pool
    (``release_conn``): urllib3 did not see these reads, so it would otherwise close it."""
    view = memoryview(buffers.take(length))
    got = 0
    while got < length:
        want = length - got if pacer is None else min(pacer.block, length - got)
        if pacer is not None:
            pacer.take(want)
        n = _readinto(fp, view[got : got + want])
        if not n:
            # urllib3 (enforce_content_length) raises this for a body cut short: the same
            # failure, classified and retried the same way, whichever path read it.
            missing = http.client.IncompleteRead(b"", length - got)
            raise urllib3.exceptions.ProtocolError(
                f"Connection broken: the body ended after {got} of {length} bytes", missing
            )
        got += n
    if fp.isclosed():
        release = getattr(raw, "release_conn", None)
        if release is not None:
            release()
    return view


def _readinto(fp: _ReadInto, view: memoryview) -> int:
    """``fp.readinto`` with its failures raised as urllib3 raises them from a body read
    (``_error_catcher``), so the backends classify them as they always did."""
    try:
        return fp.readinto(view)
    except TimeoutError as exc:  # socket.timeout
        raise urllib3.exceptions.ReadTimeoutError(None, "", "Read timed out.") from exc  # type: ignore[arg-type]
    except ssl.SSLError as exc:
        if "read operation timed out" in str(exc):
            raise urllib3.exceptions.ReadTimeoutError(None, "", "Read timed out.") from exc  # type: ignore[arg-type]
        raise urllib3.exceptions.SSLError(exc) from exc
    except (http.client.HTTPException, OSError) as exc:
        raise urllib3.exceptions.ProtocolError(f"Connection broken: {exc!r}", exc) from exc


__all__ = ["http_client_response", "read_into_buffer"]
