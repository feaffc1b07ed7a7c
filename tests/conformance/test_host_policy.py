"""The host policy is the same on every network backend: a server that ``allowed_hosts``
does not list is refused with PermissionDeniedError (when the store is built or on its first
call), nothing is sent to it and nothing is stored; listed by a CIDR it is reachable. NFS
has no hosts: the policy does not apply to it.

Every server here listens on 127.0.0.1; tests/test_hostpolicy.py has the scenarios that need
names (a stubbed resolver) and the link-local refusals.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vmstore import DownloadRequest, ErrorType, PermissionDeniedError, UploadRequest

from tests.socket_guard import SocketGuard
from tests.support import KiB, random_bytes, write_file

from .harness import BackendHarness


def test_a_server_not_in_allowed_hosts_is_refused_and_nothing_is_stored(
    backend: BackendHarness, workdir: Path, socket_guard: SocketGuard
) -> None:
    data = random_bytes(64 * KiB, seed=5)
    source = write_file(workdir / "disk.img", data)
    url = backend.url("refused.img")

    def upload() -> None:
        with backend.open(allowed_hosts=["not-this-server.test"]) as store:
            store.upload(UploadRequest(source_path=str(source), destination_url=url))

    before = len(socket_guard.connects)
    if backend.name == "nfs":
        upload()
        assert backend.read_object("refused.img") == data
        return
    with pytest.raises(PermissionDeniedError) as info:
        upload()
    assert info.value.type is ErrorType.PERMISSION_DENIED
    assert "127.0.0.1" in info.value.message and "allowed_hosts" in info.value.message
    assert socket_guard.connects[before:] == []
    assert backend.read_object("refused.img") is None


def test_a_server_listed_by_cidr_is_reachable(
    backend: BackendHarness, workdir: Path, socket_guard: SocketGuard
) -> None:
    data = random_bytes(64 * KiB, seed=6)
    source = write_file(workdir / "disk.img", data)
    with backend.open(allowed_hosts=["127.0.0.0/8"]) as store:
        up = store.upload(
            UploadRequest(source_path=str(source), destination_url=backend.url("listed.img"))
        )
        dest = workdir / "back.img"
        store.download(DownloadRequest(source_url=up.url, destination_path=str(dest)))
    assert dest.read_bytes() == data
    assert {host for host, _ in socket_guard.connects} <= {"127.0.0.1"}
