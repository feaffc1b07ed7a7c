"""A real TCP proxy that breaks or slows connections on purpose.

No server drops a connection in the middle of a request on demand, so this proxy does it:
it forwards bytes between vmstore and a real server on 127.0.0.1 and, for the first
``drops`` connections whose traffic in one direction passes ``after_bytes``, closes both
sockets at that point (with ``reset``, with a TCP RST and without forwarding the bytes that
crossed it; with ``stall``, it goes silent instead; with ``flip``, it flips one bit there and
goes on). With ``rate``
it also limits the counted direction to that many bytes per second, like a slow link, so a
test can kill a transfer while it is under way. Everything else is the real server's
behaviour.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class DroppingProxy:
    upstream_port: int
    after_bytes: int = 1 << 62
    drops: int = 0
    rate: float | None = None
    send_buffer: int | None = None
    """SO_SNDBUF of the proxy's sockets (None: the kernel's autotuned one, up to MiBs). Bytes
    are counted when the proxy reads them, so this bounds how far the count runs ahead of
    what the receiver read: a fault at ``after_bytes`` then strikes bytes the peer asked for,
    not a body it had closed unread (e.g. a range probe answered with the whole file)."""
    stall: bool = False
    """At ``after_bytes``, stop forwarding (the peer sees a silent connection) instead of
    cutting it; ``drops`` still counts how many connections this happens to. What the sender
    still sends is swallowed, and once it hangs up (given up after its timeout) both
    connections are closed: the far end learns it, as from its own idle timeout, rather than
    holding a half-received request (and e.g. a lock on the part) until the proxy stops."""
    flip: bool = False
    """At ``after_bytes``, flip one bit of the byte there and forward everything (a corrupting
    NIC or middlebox) instead of cutting; ``drops`` counts the connections it happens to."""
    reset: bool = False
    """At ``after_bytes``, abort both connections with a TCP RST (SO_LINGER 0) without
    forwarding the bytes that crossed it, instead of delivering half of them and closing."""
    direction: str = "upload"  # "upload": client->server bytes count; "download": server->client
    port: int = 0
    dropped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> DroppingProxy:
        listener = socket.socket()
        if self.rate:
            # A slow link holds little in flight; loopback holds seconds of it at this rate.
            # Its 64 KiB segments make the client's send buffer autotune to MiBs, and the
            # receive buffer grows towards tcp_rmem's max, so the client would finish
            # "sending" long before the bytes cross the throttle and then wait that long for
            # an answer: an idle wait no real link has. An Ethernet-sized MSS and a small
            # receive buffer (both inherited by accepted sockets) keep the buffering small.
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        listener.bind(("127.0.0.1", 0))
        listener.listen(32)
        listener.settimeout(0.2)
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> DroppingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take_drop(self) -> bool:
        with self._lock:
            if self.dropped < self.drops:
                self.dropped += 1
                return True
            return False

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            if self.send_buffer:
                for sock in (client, server):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
            counted = [0]
            broken = threading.Event()

            def close_both(
                a: socket.socket = client, b: socket.socket = server, rst: bool = False
            ) -> None:
                for sock in (a, b):
                    if rst:
                        with contextlib.suppress(OSError):  # close() then sends RST
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                        # The other pipe's thread may be blocked in recv() on this socket,
                        # and the kernel closes it (and sends the RST) only once that call
                        # returns: SHUT_RD wakes it, without sending anything itself.
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RD)
                        sock.close()
                        continue
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()

            def pipe(
                src: socket.socket,
                dst: socket.socket,
                counts: bool,
                counted: list[int] = counted,
                broken: threading.Event = broken,
                close_both: object = close_both,
            ) -> None:
                try:
                    while not broken.is_set():
                        data = src.recv(65536)
                        if not data:
                            break
                        if counts and self.rate:
                            time.sleep(len(data) / self.rate)
                        if counts and self.flip:
                            start = counted[0]
                            counted[0] += len(data)
                            if start <= self.after_bytes < counted[0] and self._take_drop():
                                flipped = bytearray(data)
                                flipped[self.after_bytes - start] ^= 0x01
                                data = bytes(flipped)
                        elif counts:
                            counted[0] += len(data)
                            if counted[0] > self.after_bytes and self._take_drop():
                                if self.stall:
                                    # Silence: forward nothing, until the sender hangs up.
                                    while not self._stop.is_set() and not broken.is_set():
                                        readable = select.select([src], [], [], 0.2)[0]
                                        if readable and not src.recv(65536):
                                            break
                                    close_both()  # type: ignore[operator]
                                    return
                                broken.set()
                                if self.reset:
                                    close_both(rst=True)  # type: ignore[operator]
                                    return
                                # Deliver part of the bytes, then cut: a truncated request
                                # or body, exactly as a dying connection leaves it.
                                dst.sendall(data[: len(data) // 2])
                                close_both()  # type: ignore[operator]
                                return
                        dst.sendall(data)
                except OSError:
                    pass
                finally:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)

            upload = self.direction == "upload"
            threading.Thread(target=pipe, args=(client, server, upload), daemon=True).start()
            threading.Thread(target=pipe, args=(server, client, not upload), daemon=True).start()
