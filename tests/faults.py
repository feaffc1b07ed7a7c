"""A real TCP proxy that breaks or slows connections on purpose.

No server drops a connection in the middle of a request on demand, so this proxy does it:
it forwards bytes between vmstore and a real server on 127.0.0.1 and, for the first
``drops`` connections whose traffic in one direction passes ``after_bytes``, closes both
sockets at that point (or, with ``flip``, flips one bit there and goes on). With ``rate``
it also limits the counted direction to that many bytes per second, like a slow link, so a
test can kill a transfer while it is under way. Everything else is the real server's
behaviour.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class DroppingProxy:
    upstream_port: int
    after_bytes: int = 1 << 62
    drops: int = 0
    rate: float | None = None
    stall: bool = False
    """At ``after_bytes``, stop forwarding (the peer sees a silent connection) instead of
    cutting it; ``drops`` still counts how many connections this happens to."""
    flip: bool = False
    """At ``after_bytes``, flip one bit of the byte there and forward everything (a corrupting
    NIC or middlebox) instead of cutting; ``drops`` counts the connections it happens to."""
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
            counted = [0]
            broken = threading.Event()

            def close_both(a: socket.socket = client, b: socket.socket = server) -> None:
                for sock in (a, b):
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
                                    # Silence: hold the connection open, forward nothing.
                                    while not self._stop.wait(0.2) and not broken.is_set():
                                        pass
                                    close_both()  # type: ignore[operator]
                                    return
                                broken.set()
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
