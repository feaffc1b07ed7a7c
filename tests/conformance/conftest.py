"""The ``backend`` fixture: every conformance scenario runs once per backend listed here.

To add a backend, write a ``<name>_backend`` fixture below (depending on a session-scoped
fixture that starts its server on 127.0.0.1, see ``servers.py``) that returns a
:class:`~tests.conformance.harness.BackendHarness`, and add ``<name>`` (dashes for
underscores) to ``BACKENDS``. No scenario changes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vmstore import Storage

from .harness import (
    BackendHarness,
    http_harness,
    nfs_harness,
    plain_http_harness,
    s3_harness,
)
from .servers import ACCESS_KEY, BUCKET, SECRET_KEY, S3Endpoint, run_s3_server

BACKENDS = ["nfs", "s3-rclone", "s3-moto", "s3-seaweedfs", "http", "https", "http-noranges"]


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Resume state of network transfers goes to the test's own directory, not ~/.local."""
    path = tmp_path / "vmstore-state"
    monkeypatch.setenv("VMSTORE_STATE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def rclone_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    yield from run_s3_server("rclone", tmp_path_factory.mktemp("rclone-s3"))


@pytest.fixture(scope="session")
def moto_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    yield from run_s3_server("moto", tmp_path_factory.mktemp("moto-s3"))


@pytest.fixture(scope="session")
def seaweedfs_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    yield from run_s3_server("seaweedfs", tmp_path_factory.mktemp("seaweedfs-s3"))


@pytest.fixture(scope="session")
def nginx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """nginx with WebDAV on 127.0.0.1 (tests/http_servers.py starts and configures it)."""
    http_servers = pytest.importorskip("tests.http_servers")
    with http_servers.running_nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture
def nfs_backend(tmp_path: Path) -> BackendHarness:
    return nfs_harness(tmp_path / "share")


def _s3_backend(server: S3Endpoint) -> Iterator[BackendHarness]:
    pytest.importorskip("vmstore.backends.s3", reason="the S3 backend is not available")
    harness = s3_harness(
        f"s3-{server.name}",
        server.endpoint,
        server.client(),
        BUCKET,
        f"t-{uuid.uuid4().hex[:12]}",  # a test sees only its own objects
        ACCESS_KEY,
        SECRET_KEY,
    )
    yield harness
    harness.abort_open_uploads()


@pytest.fixture
def s3_rclone_backend(rclone_s3_server: S3Endpoint) -> Iterator[BackendHarness]:
    yield from _s3_backend(rclone_s3_server)


@pytest.fixture
def s3_moto_backend(moto_s3_server: S3Endpoint) -> Iterator[BackendHarness]:
    yield from _s3_backend(moto_s3_server)


@pytest.fixture
def s3_seaweedfs_backend(seaweedfs_s3_server: S3Endpoint) -> Iterator[BackendHarness]:
    yield from _s3_backend(seaweedfs_s3_server)


@pytest.fixture
def http_backend(nginx_server: Any) -> BackendHarness:
    pytest.importorskip("vmstore.backends.http", reason="the HTTP backend is not available")
    return http_harness(nginx_server.http_base, nginx_server.root, nginx_server.area(),
                        nginx_server.token)  # fmt: skip


@pytest.fixture
def https_backend(nginx_server: Any) -> BackendHarness:
    pytest.importorskip("vmstore.backends.http", reason="the HTTP backend is not available")
    return http_harness(nginx_server.https_base, nginx_server.root, nginx_server.area(),
                        nginx_server.token, ca_bundle=str(nginx_server.ca_cert))  # fmt: skip


@pytest.fixture(scope="session")
def plain_http_server() -> Iterator[Any]:
    """A server without Range support (tests/http_servers.py), with PUT and DELETE."""
    http_servers = pytest.importorskip("tests.http_servers")
    with http_servers.PlainServer(ranges=False, claims_ranges=False) as server:
        yield server


@pytest.fixture
def http_noranges_backend(plain_http_server: Any) -> BackendHarness:
    pytest.importorskip("vmstore.backends.http", reason="the HTTP backend is not available")
    return plain_http_harness(plain_http_server, f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> BackendHarness:
    harness = request.getfixturevalue(f"{request.param.replace('-', '_')}_backend")
    assert isinstance(harness, BackendHarness)
    return harness


@pytest.fixture
def store(backend: BackendHarness) -> Iterator[Storage]:
    with backend.open() as opened:
        yield opened


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The host side of a transfer: sources are made here, downloads land here."""
    path = tmp_path / "host"
    path.mkdir()
    return path
