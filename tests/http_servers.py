"""Real HTTP servers for the tests, started on 127.0.0.1 by the tests themselves.

* nginx from Debian (its ``nginx`` package has the WebDAV module built in), run as a child
  process with a generated config: WebDAV PUT/DELETE, the bearer token checked in the config,
  a TLS listener with a self-signed certificate, a read-only ``/readonly/`` area,
  ``/nocreate/`` where PUT does not create missing directories (as Apache's mod_dav), a same-host
  redirect ``/same/`` and a redirect ``/elsewhere/`` to another host (127.0.0.2), whose
  server records every header it gets.
* :class:`PlainServer`: a small ``http.server`` that can do what no real server does on
  demand: ignore Range, keep checksum and metadata headers like an object-store gateway,
  cut a body short, stall, answer 503 once, change a file between two requests.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import email.utils
import hashlib
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

TOKEN = "vmstore-test-token-5f1d2c"

# --- helpers ------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"nginx exited with {process.returncode}: {text[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nginx did not listen on {port} within {timeout}s")


def make_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost: (certificate, key) PEM paths.

    It is its own CA (basicConstraints CA:TRUE), so giving it as ``ca_bundle`` trusts it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmstore test server")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "server.crt"
    key_path = directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --- PlainServer --------------------------------------------------------------------------


@dataclass
class StoredFile:
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    """Headers kept from the PUT (only when the server keeps metadata)."""
    version: int = 0
    mtime: float = field(default_factory=time.time)
    etag: str = ""
    """Fixed when stored, so bytes changed behind the server's back keep it (see tamper)."""

    def __post_init__(self) -> None:
        if not self.etag:
            self.etag = f'"{hashlib.md5(self.data).hexdigest()}-{self.version}"'


@dataclass
class Fault:
    """A one-shot misbehaviour for the next request of ``method`` to ``path`` (any if "").

    kinds: "none" (behave: lets the next fault skip a request), "status" (answer
    ``status`` with ``retry_after``), "truncate" (send the headers
    and ``after`` bytes of the body, then close), "stall" (send ``after`` bytes, then wait
    ``seconds`` before the rest), "reset" (for PUT: read ``after`` body bytes, then close),
    "replace" (serve this request, then replace the file with ``data``).
    """

    method: str
    kind: str
    path: str = ""
    status: int = 503
    retry_after: str | None = None
    after: int = 0
    seconds: float = 0.0
    data: bytes = b""


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class PlainServer:
    """A configurable HTTP/1.1 server over an in-memory dict of files."""

    host: str = "127.0.0.1"
    ranges: bool = True
    """Honour Range; when False a Range request gets the whole file with 200."""
    claims_ranges: bool = True
    """Send ``Accept-Ranges: bytes`` (also when it does not honour them: servers lie)."""
    conditional: bool = True
    """Honour If-Match / If-Range; when False they are ignored (ETag is still sent)."""
    send_etag: bool = True
    keeps_metadata: bool = False
    """Store X-Checksum-SHA256 / Repr-Digest / X-Metadata-* from a PUT and return them."""
    checksum_header: str = "X-Checksum-SHA256"
    """How a kept checksum is advertised: "X-Checksum-SHA256", "Repr-Digest" or "Digest"."""
    token: str = ""
    allowed: frozenset[str] = frozenset({"GET", "HEAD", "PUT", "DELETE"})
    redirects: dict[str, str] = field(default_factory=dict)
    """path prefix -> absolute URL prefix it is redirected to (302)."""
    slow_block: int = 0
    slow_delay: float = 0.0
    """Send bodies in blocks of slow_block bytes, slow_delay seconds apart (a slow link)."""
    files: dict[str, StoredFile] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    log: list[Recorded] = field(default_factory=list)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def put_file(self, path: str, data: bytes) -> StoredFile:
        with self.lock:
            stored = StoredFile(data, version=len(self.log))
            self.files["/" + path.lstrip("/")] = stored
            return stored

    def tamper(self, path: str) -> bytes:
        """Flip one byte of a stored file, keeping its size, ETag, date and kept headers, as
        silent corruption on the server's disk would."""
        with self.lock:
            stored = self.files["/" + path.lstrip("/")]
            data = bytearray(stored.data)
            data[len(data) // 2] ^= 0xFF
            stored.data = bytes(data)
            return stored.data

    def requests(self, method: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.log if method is None or r.method == method]

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and fault.path in ("", path.split("?", 1)[0]):
                    self.faults.remove(fault)
                    return fault
        return None

    def start(self) -> PlainServer:
        handler = type("Handler", (_PlainHandler,), {"server_state": self})
        server = ThreadingHTTPServer((self.host, self.port), handler)
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        self._server = server
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> PlainServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PlainHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: PlainServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle(self) -> None:
        # A client that hangs up mid-body (vmstore closing an unread probe, a test's kill)
        # is normal here, not a server error worth a traceback.
        with contextlib.suppress(ConnectionError, TimeoutError):
            super().handle()

    # -- plumbing -------------------------------------------------------------------------

    def _record(self, status: int) -> None:
        state = self.server_state
        with state.lock:
            state.log.append(
                Recorded(self.command, self.path, {k: v for k, v in self.headers.items()}, status)
            )

    def _reply(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self._record(status)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _pre(self) -> bool:
        """Auth, redirects, method checks; True when the request was answered."""
        state = self.server_state
        if self.command not in state.allowed:
            self._drain()
            self._reply(405)
            return True
        for prefix, target in state.redirects.items():
            if self.path.startswith(prefix):
                self._drain()
                self._reply(302, {"Location": target + self.path[len(prefix) :]})
                return True
        if state.token and self.headers.get("Authorization") != f"Bearer {state.token}":
            self._drain()
            self._reply(401, {"WWW-Authenticate": "Bearer"})
            return True
        fault = state.take_fault(self.command, self.path)
        if fault is not None and fault.kind == "status":
            self._drain()
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._reply(fault.status, headers)
            return True
        self._fault = fault
        return False

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            block = self.rfile.read(min(length, 1 << 20))
            if not block:
                break
            length -= len(block)

    def _file_headers(self, stored: StoredFile) -> dict[str, str]:
        state = self.server_state
        headers = {
            "Last-Modified": email.utils.formatdate(stored.mtime, usegmt=True),
            "Content-Type": "application/octet-stream",
        }
        if state.send_etag:
            headers["ETag"] = stored.etag
        if state.claims_ranges:
            headers["Accept-Ranges"] = "bytes"
        headers.update(stored.headers)
        return headers

    def _send_body(self, data: bytes, fault: Fault | None) -> None:
        state = self.server_state
        if fault is not None and fault.kind in ("truncate", "stall"):
            self.wfile.write(data[: fault.after])
            self.wfile.flush()
            if fault.kind == "truncate":
                # Cut mid-body: the client holds a Content-Length it will never see.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            time.sleep(fault.seconds)
            data = data[fault.after :]
        block = state.slow_block or len(data) or 1
        for start in range(0, len(data), block):
            self.wfile.write(data[start : start + block])
            if state.slow_delay:
                self.wfile.flush()
                time.sleep(state.slow_delay)

    # -- methods --------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if self._pre():
            return
        state = self.server_state
        fault = self._fault
        path = self.path.split("?", 1)[0]
        with state.lock:
            stored = state.files.get(path)
        if stored is None:
            self._reply(404)
            return
        headers = self._file_headers(stored)
        if state.conditional:
            if_match = self.headers.get("If-Match")
            if if_match and if_match != stored.etag:
                self._reply(412)
                return
        data = stored.data
        status = 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        range_applies = wanted and state.ranges
        if range_applies and if_range and state.conditional:
            range_applies = if_range in (stored.etag, headers["Last-Modified"])
        if range_applies:
            assert wanted is not None
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if match is None:
                self._reply(416)
                return
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            end = min(end, len(data) - 1)
            if start >= len(data):
                self._reply(416, {"Content-Range": f"bytes */{len(data)}"})
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start : end + 1]
            status = 206
        self._record(status)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            self._send_body(data, fault)
        if fault is not None and fault.kind == "replace":
            with state.lock:
                state.files[path] = StoredFile(fault.data, version=stored.version + 1)

    def do_PUT(self) -> None:
        if self._pre():
            return
        fault = self._fault
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            # HTTP/1.1 servers must take chunked bodies (a stream of unknown size is one).
            self._store_put(self._read_chunked())
            return
        length = int(self.headers.get("Content-Length") or 0)
        received = bytearray()
        limit = fault.after if fault is not None and fault.kind == "reset" else length
        while len(received) < min(length, limit):
            block = self.rfile.read(min(length, limit) - len(received))
            if not block:
                break
            received += block
        if len(received) < length:
            # Either a reset fault or the client gave up: store nothing, like a real server.
            self.close_connection = True
            self._record(0)
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._store_put(received)

    def _read_chunked(self) -> bytearray:
        body = bytearray()
        while True:
            size_line = self.rfile.readline(1024)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return body
            body += self.rfile.read(size)
            self.rfile.readline(1024)  # the CRLF after the chunk

    def _store_put(self, received: bytearray) -> None:
        state = self.server_state
        kept: dict[str, str] = {}
        if state.keeps_metadata:
            for name, value in self.headers.items():
                lowered = name.lower()
                if lowered.startswith("x-metadata-"):
                    kept[name] = value
            digest = self.headers.get("X-Checksum-SHA256", "")
            if digest:
                raw = bytes.fromhex(digest)
                b64 = base64.b64encode(raw).decode()
                kept[state.checksum_header] = {
                    "X-Checksum-SHA256": digest,
                    "Repr-Digest": f"sha-256=:{b64}:",
                    "Digest": f"SHA-256={b64}",
                }[state.checksum_header]
        path = self.path.split("?", 1)[0]
        with state.lock:
            existed = path in state.files
            state.files[path] = StoredFile(bytes(received), kept, version=len(state.log))
        self._reply(204 if existed else 201)

    def do_DELETE(self) -> None:
        if self._pre():
            return
        state = self.server_state
        path = self.path.split("?", 1)[0]
        with state.lock:
            existed = state.files.pop(path, None) is not None
        self._reply(204 if existed else 404)


# --- nginx --------------------------------------------------------------------------------


def nginx_binary() -> str:
    """The nginx executable, or a pytest skip that says how to get it."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip("nginx is not installed: apt-get install nginx (Debian's has WebDAV)")
    version = subprocess.run([found, "-V"], capture_output=True, text=True, check=False)
    if "http_dav_module" not in version.stderr + version.stdout:
        pytest.skip(f"{found} lacks the WebDAV module (ngx_http_dav_module)")
    return found


@dataclass(frozen=True)
class Nginx:
    """A running nginx: its listeners, document root, token and the CA to trust for TLS."""

    http_base: str
    https_base: str
    root: Path
    token: str
    ca_cert: Path
    recorder: PlainServer
    """The other host (127.0.0.2) that ``/elsewhere/`` redirects to."""

    def area(self) -> str:
        """A fresh directory name for one test, so tests never see each other's files."""
        return f"t-{uuid.uuid4().hex[:12]}"


_NGINX_CONF = """\
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format vmstore '$connection $request_method $uri $status $body_bytes_sent';
    access_log {prefix}/access.log vmstore;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 10000;
    client_max_body_size 0;

    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};

        if ($http_authorization != "Bearer {token}") {{
            return 401;
        }}

        location / {{
            dav_methods PUT DELETE MKCOL;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
        }}
        location /readonly/ {{
        }}
        location /nocreate/ {{
            dav_methods PUT DELETE MKCOL;
        }}
        location /same/ {{
            rewrite ^/same/(.*)$ /$1 redirect;
        }}
        location /elsewhere/ {{
            return 302 {recorder}$request_uri;
        }}
    }}
}}
"""


@contextlib.contextmanager
def running_nginx(base: Path, token: str = TOKEN) -> Iterator[Nginx]:
    binary = nginx_binary()
    prefix = base / "nginx"
    root = base / "www"
    for directory in (prefix, root, root / "readonly", root / "nocreate"):
        directory.mkdir(parents=True, exist_ok=True)
    cert, key = make_self_signed_certificate(prefix / "tls")
    recorder = PlainServer(host="127.0.0.2").start()
    http_port, https_port = free_port(), free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            # As root the workers would run as nobody and could not write the document root.
            user="user root;" if os.geteuid() == 0 else "",
            prefix=prefix,
            root=root,
            http_port=http_port,
            https_port=https_port,
            cert=cert,
            key=key,
            token=token,
            recorder=recorder.base,
        )
    )
    log = prefix / "error.log"
    process = subprocess.Popen(
        [binary, "-p", str(prefix), "-e", str(log), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(http_port, process, log)
        wait_for_port(https_port, process, log)
        yield Nginx(
            http_base=f"http://127.0.0.1:{http_port}",
            https_base=f"https://127.0.0.1:{https_port}",
            root=root,
            token=token,
            ca_cert=cert,
            recorder=recorder,
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        recorder.stop()
