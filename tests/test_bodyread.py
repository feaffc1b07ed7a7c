"""Bodies read straight into pooled buffers (vmstore._bodyread, _native.ChunkBuffers), against
a real HTTP server on 127.0.0.1 through requests/urllib3 as the backends use them."""

from __future__ import annotations

import ctypes
import http.server
import threading
from collections.abc import Iterator

import pytest
import requests
import urllib3.exceptions
from vmstore import _native
from vmstore._bodyread import http_client_response, read_into_buffer

from tests.support import random_bytes

DATA = random_bytes(3 << 20, seed=11)


PEERS: list[tuple[str, int]] = []
"""The client address of every request served: one per connection reused."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        PEERS.append(self.client_address)
        body = DATA[: len(DATA) // 2] if self.path == "/short" else DATA
        self.send_response(200)
        # /short announces the whole length and sends half, then closes: a broken body.
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        self.wfile.write(body)
        if self.path == "/short":
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_a_body_lands_whole_in_a_pooled_buffer_and_the_connection_is_kept(server: str) -> None:
    buffers = _native.ChunkBuffers()
    with requests.Session() as session:
        response = session.get(f"{server}/whole", stream=True)
        fp = http_client_response(response.raw)
        assert fp is not None
        data = read_into_buffer(response.raw, fp, len(DATA), buffers)
        assert bytes(data) == DATA
        response.close()
        # Handed back to urllib3's pool, not closed: the next GET reuses the connection.
        again = session.get(f"{server}/whole", stream=True)
        again.close()
    assert PEERS[-1] == PEERS[-2]


def test_a_buffer_given_back_is_reused_by_the_next_take() -> None:
    buffers = _native.ChunkBuffers()
    first = memoryview(buffers.take(1 << 20))
    where = address(first)
    first[:5] = b"hello"
    del first  # the last reference: the allocation returns to the pool
    second = memoryview(buffers.take(1 << 20))
    assert address(second) == where
    held = memoryview(buffers.take(1 << 20))  # the first is still out: another allocation
    assert address(held) != address(second)


def test_a_body_that_ends_early_is_urllib3s_protocol_error(server: str) -> None:
    buffers = _native.ChunkBuffers()
    response = requests.get(f"{server}/short", stream=True)
    fp = http_client_response(response.raw)
    assert fp is not None
    # What urllib3's own read raises for it, so the backends retry and map it as before.
    with pytest.raises(urllib3.exceptions.ProtocolError, match="ended after"):
        read_into_buffer(response.raw, fp, len(DATA), buffers)
    response.close()


def test_something_that_is_not_a_urllib3_response_is_not_taken() -> None:
    assert http_client_response(object()) is None
    assert http_client_response(None) is None
