"""The ``backend`` fixture: every conformance scenario runs once per backend listed here.

To add a backend, write a ``<name>_backend`` fixture below (depending on a session-scoped
fixture that starts its server, e.g. ``rclone serve s3`` on 127.0.0.1 or ``moto_server``)
that yields a :class:`~tests.conformance.harness.BackendHarness`, and add ``<name>`` to
``BACKENDS``. No scenario changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vmstore import Storage

from .harness import BackendHarness, nfs_harness

BACKENDS = ["nfs"]


@pytest.fixture
def nfs_backend(tmp_path: Path) -> BackendHarness:
    return nfs_harness(tmp_path / "share")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> BackendHarness:
    harness = request.getfixturevalue(f"{request.param}_backend")
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
