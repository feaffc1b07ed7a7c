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

from typing import Any, Protocol

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
    """Up to ``length`` bytes of the body (fewer only if it ends early) in a pooled buffer;
    with a pacer, each block is taken from the limiter before it is read off the socket.

    Once http.client has the whole body, the connection goes back to urllib3's pool
    (``release_conn``): urllib3 did not see these reads, so it would otherwise close it."""
    view = memoryview(buffers.take(length))
    got = 0
    while got < length:
        want = length - got if pacer is None else min(pacer.block, length - got)
        if pacer is not None:
            pacer.take(want)
        n = fp.readinto(view[got : got + want])
        if not n:
            break
        got += n
    if fp.isclosed():
        release = getattr(raw, "release_conn", None)
        if release is not None:
            release()
    return view[:got]


__all__ = ["http_client_response", "read_into_buffer"]
