"""A guard on every socket connect() made in the test process: the suite talks to 127.0.0.0/8
and ::1 only. A connect() to any other address (or to a name, which the C library would
resolve out of sight) is refused before a packet leaves, recorded, and fails the test.

tests/conftest.py installs it for every test (``socket_guard`` fixture, autouse); a test
may read ``socket_guard.connects`` to see where its connections went.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@dataclass
class SocketGuard:
    connects: list[tuple[str, int]] = field(default_factory=list)
    """(address, port) of every TCP/UDP connect() in this test, in order."""
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, sock: socket.socket, address: Any) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        host, port = str(address[0]), int(address[1])
        with self.lock:
            self.connects.append((host, port))
            if is_loopback(host):
                return
            self.violations.append(f"connect() to {address!r}")
        raise PermissionError(f"socket guard: the tests may only connect to loopback, not {host}")

    def connects_to(self, port: int) -> list[str]:
        with self.lock:
            return [host for host, p in self.connects if p == port]

    def install(self, setattr_: Callable[[Any, str, Any], None]) -> None:
        original_connect = socket.socket.connect
        original_connect_ex = socket.socket.connect_ex
        guard = self

        def connect(sock: socket.socket, address: Any) -> None:
            guard.check(sock, address)
            original_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            guard.check(sock, address)
            return original_connect_ex(sock, address)

        setattr_(socket.socket, "connect", connect)
        setattr_(socket.socket, "connect_ex", connect_ex)
