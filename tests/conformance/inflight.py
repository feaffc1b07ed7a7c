"""An HTTP/1.1 proxy that counts the requests in flight between vmstore and a real server.

A request is in flight from the moment its whole head has arrived until just before the last
bytes of its response are passed back (for a response with an empty body, such as S3's
UploadPart, those are the head's own), or until the client hangs up on it: what the server
sees as concurrent work, whichever client-side pool sent it. Counting down only after the last
bytes went out would count a request the client already saw finish beside the next one it
sends, on a fresh connection handled by another proxy thread (moto closes every connection).

The proxy reads each message's framing (Content-Length, chunked, or read to close) to know
where one exchange ends and the next on the same keep-alive connection begins, and answers
``Expect: 100-continue`` itself (botocore's parts wait for it), so the server sees plain
requests. Everything else is forwarded unchanged, so the server's behaviour is its own. Plain
http only (it must read the bytes); everything on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

_BLOCK = 1 << 16


class _Closed(Exception):
    """A peer closed its side between or inside messages."""


def _nothing() -> None:
    pass


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed or reset ``sock`` (readable, and nothing or an error to peek)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


def _send(to: socket.socket, data: bytes | bytearray) -> None:
    """sendall, unless the peer hung up: a client that closes a response it stopped reading
    (a server ignoring Range sends the whole file) is done with that exchange at that moment,
    not when a later send finally fails."""
    if _hung_up(to):
        raise _Closed()
    to.sendall(data)


@dataclass(eq=False)
class _Exchange:
    """One request in flight, with the client connection that sent it."""

    client: socket.socket


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def _fill(self) -> bool:
        data = self._sock.recv(_BLOCK)
        if not data:
            return False
        self._buffer += data
        return True

    def head(self) -> bytes | None:
        """The next message head (through the blank line); None at a clean end."""
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill():
                if self._buffer:
                    raise _Closed()
                return None
        end = self._buffer.index(b"\r\n\r\n") + 4
        head = bytes(self._buffer[:end])
        del self._buffer[:end]
        return head

    def line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            if not self._fill():
                raise _Closed()
        end = self._buffer.index(b"\r\n") + 2
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        return line

    def relay(self, count: int, to: socket.socket, last: Callable[[], None] = _nothing) -> None:
        """Relay ``count`` bytes; ``last()`` runs just before the final ones are sent."""
        if not count:
            last()
        while count:
            if not self._buffer and not self._fill():
                raise _Closed()
            take = min(count, len(self._buffer))
            if take == count:
                last()
            _send(to, self._buffer[:take])
            del self._buffer[:take]
            count -= take

    def relay_chunked(self, to: socket.socket, last: Callable[[], None] = _nothing) -> None:
        while True:
            size_line = self.line()
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                tail = size_line
                while True:  # trailers, then the blank line
                    trailer = self.line()
                    tail += trailer
                    if trailer == b"\r\n":
                        last()
                        _send(to, tail)
                        return
            _send(to, size_line)
            self.relay(size + 2, to)  # the chunk and its CRLF

    def relay_to_end(self, to: socket.socket) -> None:
        if self._buffer:
            _send(to, self._buffer)
            self._buffer.clear()
        while self._fill():
            _send(to, self._buffer)
            self._buffer.clear()


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    found: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            found[name.strip().lower()] = value.strip()
    return found


def _relay_body(
    reader: _Reader, headers: dict[str, str], to: socket.socket, last: Callable[[], None]
) -> bool:
    """Relay one message body; False when its end is the connection's end."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        reader.relay_chunked(to, last)
        return True
    if "content-length" in headers:
        reader.relay(int(headers["content-length"]), to, last)
        return True
    return False


def _empty_body(headers: dict[str, str]) -> bool:
    """A response framed with an empty body: whoever has its head has all of it."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return False
    return headers.get("content-length", "").strip() == "0"


@dataclass
class CountingProxy:
    upstream_port: int
    port: int = 0
    peak: int = 0
    requests: int = 0
    _current: int = 0
    _active: set[_Exchange] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> CountingProxy:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(0.2)
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.peak = self._current
            self.requests = 0

    def _enter(self, exchange: _Exchange) -> None:
        with self._lock:
            # An exchange whose client has hung up is over for the client, whose next
            # request this may be: counted down now, not when its relay thread notices (a
            # thread that may not run again before this one counts).
            for other in [e for e in self._active if _hung_up(e.client)]:
                self._close_locked(other)
            self._active.add(exchange)
            self._current += 1
            self.requests += 1
            self.peak = max(self.peak, self._current)

    def _close_locked(self, exchange: _Exchange) -> None:
        if exchange in self._active:
            self._active.remove(exchange)
            self._current -= 1

    def _leave(self, exchange: _Exchange) -> None:
        with self._lock:
            self._close_locked(exchange)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(client)
            try:
                server = stack.enter_context(
                    socket.create_connection(("127.0.0.1", self.upstream_port))
                )
            except OSError:
                return
            from_client, from_server = _Reader(client), _Reader(server)
            with contextlib.suppress(_Closed, OSError, ValueError):
                while self._exchange(client, server, from_client, from_server):
                    pass

    def _exchange(
        self, client: socket.socket, server: socket.socket, from_client: _Reader,
        from_server: _Reader,
    ) -> bool:  # fmt: skip
        """Relay one request and its response; False when the connection ends."""
        head = from_client.head()
        if head is None:
            return False
        exchange = _Exchange(client)
        self._enter(exchange)

        def leave() -> None:
            # Just before the response's last bytes go out: the client cannot send its next
            # request before it has them, so an exchange never overlaps the one it enables.
            self._leave(exchange)

        try:
            method = head.split(b" ", 1)[0].upper()
            headers = _headers(head)
            if headers.get("expect", "").lower() == "100-continue":
                lines = [
                    line
                    for line in head.split(b"\r\n")
                    if not line.lower().startswith(b"expect:")
                ]
                head = b"\r\n".join(lines)
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            server.sendall(head)
            if not _relay_body(from_client, headers, server, _nothing) and method in (
                b"PUT",
                b"POST",
            ):
                return False  # a body without framing: cannot tell where it ends
            while True:
                response = from_server.head()
                if response is None:
                    raise _Closed()
                status = int(response.split(b" ", 2)[1])
                if not 100 <= status < 200:
                    break
                client.sendall(response)
            response_headers = _headers(response)
            if method == b"HEAD" or status in (204, 304) or _empty_body(response_headers):
                # The head is the whole response (S3's UploadPart and PutObject answer
                # 200 with Content-Length: 0): its last bytes are the head's own.
                leave()
                client.sendall(response)
                return True
            client.sendall(response)
            if not _relay_body(from_server, response_headers, client, leave):
                from_server.relay_to_end(client)
                leave()
                return False
            return True
        finally:
            leave()
