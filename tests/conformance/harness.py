"""What the conformance suite needs to know about a backend, and nothing more.

Every scenario in ``tests/conformance`` talks to vmstore through ``new_storage(harness.config)``
and looks at the store from the outside through the harness (``read_object``,
``stored_names``, ``tamper``), never through vmstore itself: a scenario that checked
vmstore's answers only against vmstore's other answers could not catch a store that lies
consistently.

Adding a backend (rclone fstests style) means adding one subclass here and one fixture in
``conftest.py`` that starts its server; the scenarios do not change:

* ``NfsHarness``: the share is a local directory; the outside view is the file system.
* ``S3Harness`` (``rclone serve s3`` and ``moto_server``): ``url`` gives
  ``s3://<bucket>/<prefix>/<key>``, the outside view is a plain boto3 client
  (``get_object``, ``list_objects_v2`` plus unfinished multipart uploads), ``tamper``
  re-puts different bytes of the same size with the original ``sha256`` metadata.
* ``HttpHarness`` (nginx with WebDAV PUT/DELETE): ``url`` gives ``http://127.0.0.1:<port>/
  <area>/<key>``; the outside view is nginx's document root on disk. A plain WebDAV server
  keeps no checksum, so the backend stores a ``.vmstore.json`` sidecar beside the object.
  The same over https (nginx's TLS listener, its self-signed certificate as ``ca_bundle``).
* ``PlainHttpHarness`` (``http-noranges``): a minimal server that ignores Range, so every
  download is one stream and none can be resumed; the outside view is its in-memory files.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import botocore.exceptions
import pytest
from vmstore import Storage, StorageConfig, new_storage

CHUNK = 256 * 1024
"""Chunk size every harness configures, so that MiB-sized files have many chunks."""

S3_MIN_PART = 5 * 1024 * 1024
"""S3 refuses parts smaller than this (but the last), so uploads move in units of at least it."""


class Capability:
    """Optional behaviours a scenario may need; a harness lists the ones its store has."""

    UPLOAD_RESUME = "upload-resume"
    """An interrupted upload can be continued (NFS partial file, S3 multipart + ListParts)."""

    DOWNLOAD_RESUME = "download-resume"
    """An interrupted download can be continued (the store serves byte ranges)."""

    TAMPER = "tamper"
    """The test can change stored bytes behind vmstore's back, keeping the stored checksum."""


@dataclass
class BackendHarness(abc.ABC):
    """One backend under test: its config plus an outside view of what it stores."""

    name: str
    config: StorageConfig
    capabilities: frozenset[str]
    upload_unit: int
    """Bytes an upload moves at a time (a resumed upload restarts at a multiple of it)."""
    download_unit: int
    """Bytes a download moves at a time (a resumed download restarts at a multiple of it)."""

    def open(self, **config_changes: Any) -> Storage:
        """A fresh Storage for this backend (optionally with some config fields changed)."""
        return new_storage(dataclasses.replace(self.config, **config_changes))

    def require(self, capability: str) -> None:
        if capability not in self.capabilities:
            pytest.skip(f"backend {self.name} has no {capability!r}")

    def config_json(self) -> str:
        """The config, for a child process that must talk to the same store."""
        return json.dumps(dataclasses.asdict(self.config))

    @abc.abstractmethod
    def url(self, key: str) -> str:
        """The URL a caller would pass to vmstore for the object ``key``."""

    @abc.abstractmethod
    def read_object(self, key: str) -> bytes | None:
        """The object's bytes as the store holds them under the final name, or None if absent."""

    @abc.abstractmethod
    def stored_names(self) -> set[str]:
        """Every name the store holds in this test's area (objects, sidecars, temp files)."""

    @abc.abstractmethod
    def companion_names(self, key: str) -> set[str]:
        """Names that legitimately accompany a committed object (e.g. an NFS sidecar)."""

    @abc.abstractmethod
    def tamper(self, key: str) -> bytes:
        """Change the stored bytes (same size, stored checksum kept); return the new bytes."""

    def upstream_port(self) -> int | None:
        """The server's port on 127.0.0.1 (None: no network between vmstore and the store)."""
        return None

    def via_proxy(self, port: int) -> BackendHarness:
        """This backend with vmstore's traffic sent through a TCP proxy on 127.0.0.1:``port``
        (tests/faults.py) that forwards to ``upstream_port()``; the outside view is direct."""
        raise NotImplementedError(f"{self.name} has no network to put a proxy in")


def _proxied(url: str, port: int) -> str:
    """``url`` with its host:port replaced by the proxy's."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"127.0.0.1:{port}"))


@dataclass
class NfsHarness(BackendHarness):
    """The NFS backend over a plain local directory standing in for the mounted share."""

    mount: Path = Path()

    def url(self, key: str) -> str:
        return f"nfs://{key}"

    def read_object(self, key: str) -> bytes | None:
        path = self.mount / key
        return path.read_bytes() if path.is_file() else None

    def stored_names(self) -> set[str]:
        return {
            p.relative_to(self.mount).as_posix() for p in self.mount.rglob("*") if not p.is_dir()
        }

    def companion_names(self, key: str) -> set[str]:
        return {f"{key}.vmstore.json"}

    def tamper(self, key: str) -> bytes:
        path = self.mount / key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        # In place, so size and sidecar stay as they were: only the bytes changed.
        with open(path, "r+b") as f:
            f.write(data)
        return bytes(data)


def nfs_harness(mount: Path) -> NfsHarness:
    mount.mkdir(parents=True, exist_ok=True)
    return NfsHarness(
        name="nfs",
        config=StorageConfig(type="nfs", endpoint=str(mount), chunk_size=CHUNK),
        capabilities=frozenset(
            {Capability.UPLOAD_RESUME, Capability.DOWNLOAD_RESUME, Capability.TAMPER}
        ),
        upload_unit=CHUNK,
        download_unit=CHUNK,
        mount=mount,
    )


@dataclass
class S3Harness(BackendHarness):
    """An S3 backend against a real server; each test works under its own key prefix."""

    client: Any = None
    bucket: str = ""
    prefix: str = ""

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def read_object(self, key: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        data = response["Body"].read()
        assert isinstance(data, bytes)
        return data

    def stored_names(self) -> set[str]:
        start = len(self.prefix) + 1
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/")
        names = {item["Key"][start:] for item in listed.get("Contents", [])}
        # An unfinished multipart upload holds stored bytes too, invisible to a listing.
        try:
            uploads = self.client.list_multipart_uploads(
                Bucket=self.bucket, Prefix=self.prefix + "/"
            ).get("Uploads", [])
        except self.client.exceptions.NoSuchUpload:
            uploads = []  # rclone's answer when there is none
        names |= {f"{u['Key'][start:]} (multipart upload)" for u in uploads}
        return names

    def abort_open_uploads(self) -> None:
        """Abort the multipart uploads a test left open under its prefix (a failed resumable
        upload keeps its upload for the resume): the bucket is shared by every test on this
        server, and what one leaves, a store-wide listing in another would see."""
        try:
            uploads = self.client.list_multipart_uploads(
                Bucket=self.bucket, Prefix=self.prefix + "/"
            ).get("Uploads", [])
        except self.client.exceptions.NoSuchUpload:
            uploads = []
        for upload in uploads:
            with contextlib.suppress(botocore.exceptions.ClientError):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )

    def companion_names(self, key: str) -> set[str]:
        # A multipart upload learns the SHA-256 after its last part, so it keeps it in a
        # companion object bound to the object by the upload token in its metadata; a single
        # PUT carries it in its own metadata and has no companion.
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except botocore.exceptions.ClientError:
            return set()
        metadata = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
        return {f"{key}.vmstore.json"} if "vmstore-upload" in metadata else set()

    def upstream_port(self) -> int | None:
        return urlsplit(self.config.endpoint).port

    def via_proxy(self, port: int) -> BackendHarness:
        config = dataclasses.replace(self.config, endpoint=_proxied(self.config.endpoint, port))
        return dataclasses.replace(self, config=config)

    def tamper(self, key: str) -> bytes:
        head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        data = bytearray(self.read_object(key) or b"")
        data[len(data) // 2] ^= 0xFF
        # Same size, same user metadata (the stored sha256 included): only the bytes change.
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=bytes(data), Metadata=head["Metadata"]
        )
        return bytes(data)


def s3_harness(name: str, endpoint: str, client: Any, bucket: str, prefix: str,
               access_key: str, secret_key: str) -> S3Harness:  # fmt: skip
    config = StorageConfig(
        type="s3",
        endpoint=endpoint,
        bucket=bucket,
        region="us-east-1",
        access_key=access_key,
        secret_key=secret_key,
        use_ssl=False,
        chunk_size=CHUNK,
        concurrency=2,
    )
    return S3Harness(
        name=name,
        config=config,
        capabilities=frozenset(
            {Capability.UPLOAD_RESUME, Capability.DOWNLOAD_RESUME, Capability.TAMPER}
        ),
        upload_unit=max(CHUNK, S3_MIN_PART),
        download_unit=CHUNK,
        client=client,
        bucket=bucket,
        prefix=prefix,
    )


@dataclass
class HttpHarness(BackendHarness):
    """The HTTP backend against nginx (WebDAV); the document root is the outside view."""

    base: str = ""
    served: Path = Path()
    """The directory nginx serves at ``base``."""

    def url(self, key: str) -> str:
        return f"{self.base}/{key}"

    def read_object(self, key: str) -> bytes | None:
        path = self.served / key
        return path.read_bytes() if path.is_file() else None

    def stored_names(self) -> set[str]:
        if not self.served.exists():
            return set()
        return {
            p.relative_to(self.served).as_posix() for p in self.served.rglob("*") if not p.is_dir()
        }

    def companion_names(self, key: str) -> set[str]:
        return {f"{key}.vmstore.json"}  # nginx keeps no checksum or metadata of its own

    def upstream_port(self) -> int | None:
        return urlsplit(self.base).port

    def via_proxy(self, port: int) -> BackendHarness:
        config = dataclasses.replace(self.config, endpoint=_proxied(self.config.endpoint, port))
        return dataclasses.replace(self, config=config, base=_proxied(self.base, port))

    def tamper(self, key: str) -> bytes:
        path = self.served / key
        before = path.stat()
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        with open(path, "r+b") as f:
            f.write(data)
        # nginx's ETag is mtime and size: restoring the mtime keeps the stored checksum
        # "valid", as silent corruption on the server's disk would.
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        return bytes(data)


def http_harness(
    http_base: str, document_root: Path, area: str, token: str, ca_bundle: str = ""
) -> HttpHarness:
    """nginx over http, or over https (``http_base`` https://, trusting ``ca_bundle``)."""
    https = http_base.startswith("https://")
    config = StorageConfig(
        type="https" if https else "http",
        endpoint=http_base,
        token=token,
        ca_bundle=ca_bundle,
        chunk_size=CHUNK,
        concurrency=2,
    )
    return HttpHarness(
        name="https" if https else "http",
        config=config,
        # One PUT per upload: nothing to resume, and the upload unit is the whole object.
        capabilities=frozenset({Capability.TAMPER, Capability.DOWNLOAD_RESUME}),
        upload_unit=CHUNK,
        download_unit=CHUNK,
        base=f"{http_base.rstrip('/')}/{area}",
        served=document_root / area,
    )


@dataclass
class PlainHttpHarness(BackendHarness):
    """The HTTP backend against a minimal server that ignores Range (tests/http_servers.py's
    PlainServer with ranges off): every download is one stream. The outside view is the
    server's in-memory files."""

    server: Any = None
    area: str = ""
    base: str = ""
    """Where vmstore reaches the server ("": the server's own address)."""

    def _path(self, key: str) -> str:
        return f"/{self.area}/{key}"

    def url(self, key: str) -> str:
        return f"{self.base or self.server.base}{self._path(key)}"

    def read_object(self, key: str) -> bytes | None:
        with self.server.lock:
            stored = self.server.files.get(self._path(key))
            return None if stored is None else bytes(stored.data)

    def stored_names(self) -> set[str]:
        prefix = f"/{self.area}/"
        with self.server.lock:
            return {path[len(prefix) :] for path in self.server.files if path.startswith(prefix)}

    def companion_names(self, key: str) -> set[str]:
        return {f"{key}.vmstore.json"}  # it keeps no checksum or metadata of its own

    def upstream_port(self) -> int | None:
        return urlsplit(str(self.server.base)).port

    def via_proxy(self, port: int) -> BackendHarness:
        base = _proxied(self.server.base, port)
        config = dataclasses.replace(self.config, endpoint=base)
        return dataclasses.replace(self, config=config, base=base)

    def tamper(self, key: str) -> bytes:
        return bytes(self.server.tamper(self._path(key)))


def plain_http_harness(server: Any, area: str) -> PlainHttpHarness:
    config = StorageConfig(type="http", endpoint=server.base, chunk_size=CHUNK, concurrency=2)
    return PlainHttpHarness(
        name="http-noranges",
        config=config,
        # Without ranges a download is one stream, which cannot be continued.
        capabilities=frozenset({Capability.TAMPER}),
        upload_unit=CHUNK,
        download_unit=CHUNK,
        server=server,
        area=area,
    )


STALL_HELPER = Path(__file__).with_name("stall_transfer.py")


def kill_mid_transfer(
    backend: BackendHarness,
    mode: str,
    source: str,
    destination: str,
    *,
    stall_after: int | None = None,
    encryption_key: bytes | None = None,
    compression: str | None = None,
) -> None:
    """Start the transfer in a child process (stall_transfer.py), wait until it is under way,
    SIGKILL it. It stalls after ``stall_after`` bytes (default: one upload unit, or two
    download units); ``encryption_key`` and ``compression`` make it an encoded transfer."""
    if stall_after is None:
        stall_after = backend.upload_unit if mode == "upload" else 2 * backend.download_unit
    config = dataclasses.asdict(backend.config)
    if encryption_key is not None:
        config["encryption_key"] = encryption_key.hex()
    args = [json.dumps(config), mode, source, destination, str(stall_after)]
    if compression is not None:
        args.append(compression)
    child = subprocess.Popen(
        [sys.executable, str(STALL_HELPER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 60)
        line = child.stdout.readline() if ready else ""
        if not line.startswith("STALLED"):
            child.kill()
            _out, err = child.communicate(timeout=30)
            pytest.fail(f"transfer child did not stall: stdout={line!r} stderr={err[-2000:]}")
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
