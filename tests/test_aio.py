"""vmstore.aio: the asyncio API, against the real NFS backend (a temp dir) and a real S3 server
(rclone serve s3 on 127.0.0.1).

What a controller in an event loop relies on: the loop keeps running while bytes move, a
progress coroutine runs on the loop, and cancelling the task leaves what CancelToken.cancel()
leaves (a partial that the next call resumes) and raises asyncio.CancelledError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import vmstore.aio
from vmstore import (
    CancelledError,
    CancelToken,
    DownloadRequest,
    InvalidConfigError,
    NotFoundError,
    OperationFailedError,
    StorageConfig,
    UploadRequest,
)

from tests.faults import DroppingProxy
from tests.s3_servers import S3Server, running_s3_server, unique_prefix
from tests.support import MiB, random_bytes, sha256_bytes, write_file

pytestmark = pytest.mark.asyncio

CHUNK = 256 * 1024
PART = 5 * MiB  # the S3 minimum part size


def partials_under(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.vmstore-partial*"))


class HeldAtFirstReport:
    """A plain progress callback (worker thread) that stops the transfer at its first report
    past ``after`` bytes until the test releases it: the cancel then lands mid-transfer."""

    def __init__(self, after: int = 0) -> None:
        self.after = after
        self.reached = threading.Event()
        self.release = threading.Event()

    first_report: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        if done > self.after and not self.reached.is_set():
            self.first_report = (done, total)
            self.reached.set()
            assert self.release.wait(30), "the test never released the transfer"

    async def cancel_there(self, task: asyncio.Task[Any]) -> None:
        assert await asyncio.to_thread(self.reached.wait, 30), "no progress report came"
        task.cancel()
        # Let the task take the cancel (and cancel its token) before the worker moves on.
        await asyncio.sleep(0.2)
        self.release.set()


@pytest.fixture
def nfs_config(tmp_path: Path) -> StorageConfig:
    (tmp_path / "share").mkdir()
    return StorageConfig(type="nfs", endpoint=str(tmp_path / "share"), chunk_size=CHUNK)


# --- NFS ----------------------------------------------------------------------------------


async def test_round_trip_through_the_async_store_on_nfs(
    nfs_config: StorageConfig, tmp_path: Path
) -> None:
    data = random_bytes(2 * MiB + 7, seed=1)
    source = write_file(tmp_path / "disk.img", data)

    async with vmstore.aio.new_storage(nfs_config) as store:
        await store.validate_url("nfs://vm/disk.img")
        up = await store.upload(
            UploadRequest(str(source), "nfs://vm/disk.img", metadata={"vm-name": "vm-1"})
        )
        md = await store.get_metadata(up.url)
        down = await store.download(
            DownloadRequest(up.url, str(tmp_path / "back.img"), expected_checksum=up.checksum)
        )
        await store.delete(up.url)
        await store.delete(up.url)  # idempotent, as the sync delete
        with pytest.raises(NotFoundError):
            await store.get_metadata(up.url)
        with pytest.raises(InvalidConfigError):
            await store.validate_url("s3://bucket/key")

    assert up.checksum == md.checksum == down.checksum == sha256_bytes(data)
    assert md.size == len(data)
    assert md.custom_metadata == {"vm-name": "vm-1"}
    assert (tmp_path / "back.img").read_bytes() == data
    with pytest.raises(OperationFailedError):
        await store.get_metadata(up.url)  # closed by the async with


async def test_the_event_loop_keeps_running_while_a_transfer_is_under_way(
    nfs_config: StorageConfig, tmp_path: Path
) -> None:
    """The upload's (plain) progress callback waits for an event that only another task on
    the loop sets: if the upload blocked the loop, that task could never run."""
    source = write_file(tmp_path / "disk.img", random_bytes(2 * MiB, seed=2))
    other_task_ran = threading.Event()
    waited: list[bool] = []

    def progress(done: int, total: int) -> None:
        if not waited:
            waited.append(other_task_ran.wait(10))

    async def other_task() -> None:
        await asyncio.sleep(0.05)
        other_task_ran.set()

    async with vmstore.aio.new_storage(nfs_config) as store:
        _, up = await asyncio.gather(
            other_task(),
            store.upload(UploadRequest(str(source), "nfs://disk.img", progress_callback=progress)),
        )

    assert waited == [True]
    assert up.bytes_transferred == 2 * MiB


async def test_a_progress_coroutine_runs_on_the_loop_and_has_seen_the_total_on_return(
    nfs_config: StorageConfig, tmp_path: Path
) -> None:
    data = random_bytes(3 * MiB + 5, seed=3)
    source = write_file(tmp_path / "disk.img", data)
    loop_thread = threading.get_ident()
    reports: list[tuple[int, int, int]] = []

    async def progress(done: int, total: int) -> None:
        await asyncio.sleep(0)  # a real coroutine, which yields to the loop
        reports.append((done, total, threading.get_ident()))

    async with vmstore.aio.new_storage(nfs_config) as store:
        up = await store.upload(
            UploadRequest(str(source), "nfs://disk.img", progress_callback=progress)
        )
        assert reports[-1][:2] == (len(data), len(data))  # already there when upload returns
        uploads = list(reports)
        reports.clear()
        await store.download(
            DownloadRequest(up.url, str(tmp_path / "back.img"), progress_callback=progress)
        )

    for calls in (uploads, reports):
        assert calls[-1][:2] == (len(data), len(data))
        assert {thread for _, _, thread in calls} == {loop_thread}
        dones = [done for done, _, _ in calls]
        assert dones == sorted(dones)


async def test_a_plain_progress_callback_runs_on_a_worker_thread(
    nfs_config: StorageConfig, tmp_path: Path
) -> None:
    source = write_file(tmp_path / "disk.img", random_bytes(MiB, seed=4))
    threads: set[int] = set()

    async with vmstore.aio.new_storage(nfs_config) as store:
        await store.upload(
            UploadRequest(
                str(source),
                "nfs://disk.img",
                progress_callback=lambda done, total: threads.add(threading.get_ident()),
            )
        )

    assert threads and threading.get_ident() not in threads


async def test_an_exception_from_a_progress_coroutine_propagates_from_the_call(
    nfs_config: StorageConfig, tmp_path: Path
) -> None:
    source = write_file(tmp_path / "disk.img", random_bytes(MiB, seed=5))

    class Refused(Exception):
        pass

    async def progress(done: int, total: int) -> None:
        raise Refused(f"at {done}")

    async with vmstore.aio.new_storage(nfs_config) as store:
        with pytest.raises(Refused):
            await store.upload(
                UploadRequest(str(source), "nfs://disk.img", progress_callback=progress)
            )


async def test_cancelling_an_nfs_upload_task_stops_it_or_comes_too_late_never_half_stores(
    nfs_config: StorageConfig, tmp_path: Path
) -> None:
    """A local copy this small reports only once, at its end (the core reports at most every
    100 ms), so the cancel usually lands after the last chunk: too late, as for a
    CancelToken.cancel() at that point, and the upload is stored. On a slow machine it lands
    mid-copy and the partial is kept. Either way the task raises CancelledError, and the
    request's own token is the one cancelled."""
    data = random_bytes(4 * MiB + 9, seed=6)
    source = write_file(tmp_path / "disk.img", data)
    share = Path(nfs_config.endpoint)
    held = HeldAtFirstReport()
    token = CancelToken()
    request = UploadRequest(str(source), "nfs://disk.img", progress_callback=held, cancel=token)

    async with vmstore.aio.new_storage(nfs_config) as store:
        task = asyncio.create_task(store.upload(request))
        await held.cancel_there(task)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert token.is_cancelled
        assert request.cancel is token and request.progress_callback is held  # not changed
        if held.first_report == (len(data), len(data)):  # too late: stored, nothing left over
            assert (share / "disk.img").read_bytes() == data
            assert partials_under(share) == []
        else:
            assert not (share / "disk.img").exists()
            assert len(partials_under(share)) == 1

        up = await store.upload(UploadRequest(str(source), "nfs://disk.img"))

    assert up.checksum == sha256_bytes(data)
    assert (share / "disk.img").read_bytes() == data
    assert partials_under(share) == []


async def test_cancelling_a_task_whose_upload_waits_for_a_worker_never_starts_it(
    nfs_config: StorageConfig, tmp_path: Path
) -> None:
    first = write_file(tmp_path / "first.img", random_bytes(MiB, seed=11))
    second = write_file(tmp_path / "second.img", random_bytes(MiB, seed=12))
    share = Path(nfs_config.endpoint)
    held = HeldAtFirstReport()

    async with vmstore.aio.new_storage(nfs_config, max_workers=1) as store:
        running = asyncio.create_task(
            store.upload(UploadRequest(str(first), "nfs://first.img", progress_callback=held))
        )
        assert await asyncio.to_thread(held.reached.wait, 30)
        queued = asyncio.create_task(store.upload(UploadRequest(str(second), "nfs://second.img")))
        await asyncio.sleep(0.05)
        queued.cancel()
        held.release.set()
        with pytest.raises(asyncio.CancelledError):
            await queued
        await running

    assert (share / "first.img").exists()
    assert not (share / "second.img").exists()
    assert partials_under(share) == []


async def test_a_request_whose_token_was_cancelled_fails_at_once_when_sent_again(
    nfs_config: StorageConfig, tmp_path: Path
) -> None:
    source = write_file(tmp_path / "disk.img", random_bytes(MiB, seed=8))
    token = CancelToken()
    token.cancel()

    async with vmstore.aio.new_storage(nfs_config) as store:
        with pytest.raises(CancelledError):  # vmstore's, a StorageError: not a task cancel
            await store.upload(UploadRequest(str(source), "nfs://disk.img", cancel=token))


async def test_a_bad_config_fails_on_entering_and_a_non_config_at_once(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError):
        vmstore.aio.new_storage({"type": "nfs"})  # type: ignore[arg-type]
    store = vmstore.aio.new_storage(StorageConfig(type="nfs", endpoint=str(tmp_path / "none")))
    with pytest.raises(InvalidConfigError):
        async with store:
            pass


# --- the handler in docs/asyncio.md -------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "asyncio.md"


def handler_from_the_docs() -> Callable[..., Awaitable[dict[str, object]]]:
    """The kopf-style handler exactly as docs/asyncio.md shows it."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)
    code = next(block for block in blocks if "async def export_disk" in block)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    handler: Callable[..., Awaitable[dict[str, object]]] = namespace["export_disk"]
    return handler


async def test_the_kopf_style_handler_in_the_docs_exports_a_disk(
    nfs_config: StorageConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = random_bytes(2 * MiB, seed=14)
    disk = write_file(tmp_path / "disk.qcow2", data)
    spec = {
        "storageType": "nfs",
        "endpoint": nfs_config.endpoint,
        "disk": str(disk),
        "url": "nfs://vm-exports/vm-7/disk.qcow2",
        "vm": "vm-7",
    }
    patch: dict[str, dict[str, object]] = {}
    export_disk = handler_from_the_docs()

    with caplog.at_level(logging.INFO, logger="handler"):
        result = await export_disk(spec=spec, patch=patch, logger=logging.getLogger("handler"))

    assert result["checksum"] == sha256_bytes(data)
    assert patch["status"]["progress"] == "100%"
    assert (Path(nfs_config.endpoint) / "vm-exports/vm-7/disk.qcow2").read_bytes() == data
    assert "exported nfs://vm-exports/vm-7/disk.qcow2" in caplog.text


async def test_the_handler_in_the_docs_times_out_with_a_timeout_error(
    nfs_config: StorageConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk = write_file(tmp_path / "disk.qcow2", random_bytes(MiB, seed=15))
    spec = {
        "storageType": "nfs",
        "endpoint": nfs_config.endpoint,
        "disk": str(disk),
        "url": "nfs://vm-exports/vm-8/disk.qcow2",
        "vm": "vm-8",
        "timeoutSeconds": "0",
    }
    export_disk = handler_from_the_docs()

    with pytest.raises(TimeoutError):
        await export_disk(spec=spec, patch={}, logger=logging.getLogger("handler"))

    assert "export of vm-8 timed out" in caplog.text
    assert not (Path(nfs_config.endpoint) / "vm-exports/vm-8/disk.qcow2").exists()


# --- S3 (rclone serve s3) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    pytest.importorskip("boto3", reason="the S3 backend needs boto3")
    with running_s3_server("rclone", tmp_path_factory.mktemp("rclone-aio")) as server:
        yield server


@pytest.fixture
def s3_config(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> StorageConfig:
    # The resume state of multipart uploads goes to the test's own directory.
    monkeypatch.setenv("VMSTORE_STATE_DIR", str(tmp_path / "state"))
    return StorageConfig(
        type="s3",
        endpoint=s3_server.endpoint,
        bucket=s3_server.bucket,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region="us-east-1",
        chunk_size=PART,
        concurrency=1,  # parts in order: a report past one part means that part is stored
    )


def open_uploads(server: S3Server, prefix: str) -> list[dict[str, Any]]:
    client: Any = server.client()
    listed = client.list_multipart_uploads(Bucket=server.bucket, Prefix=prefix)
    return list(listed.get("Uploads", []))


async def test_round_trip_with_a_progress_coroutine_on_s3(
    s3_config: StorageConfig, s3_server: S3Server, tmp_path: Path
) -> None:
    data = random_bytes(PART + 3 * MiB, seed=9)  # two parts
    source = write_file(tmp_path / "disk.img", data)
    url = f"s3://{s3_server.bucket}/{unique_prefix()}/disk.img"
    loop_thread = threading.get_ident()
    reports: list[tuple[int, int, int]] = []

    async def progress(done: int, total: int) -> None:
        reports.append((done, total, threading.get_ident()))

    async with vmstore.aio.new_storage(s3_config) as store:
        up = await store.upload(
            UploadRequest(
                str(source), url, metadata={"vm-name": "vm-s3"}, progress_callback=progress
            )
        )
        md = await store.get_metadata(up.url)
        down = await store.download(
            DownloadRequest(up.url, str(tmp_path / "back.img"), expected_checksum=up.checksum)
        )
        await store.delete(up.url)
        with pytest.raises(NotFoundError):
            await store.get_metadata(up.url)

    assert up.checksum == md.checksum == down.checksum == sha256_bytes(data)
    assert md.custom_metadata.get("vm-name") == "vm-s3"
    assert (tmp_path / "back.img").read_bytes() == data
    assert reports[-1][:2] == (len(data), len(data))
    assert {thread for _, _, thread in reports} == {loop_thread}


def through(proxy: DroppingProxy, config: StorageConfig) -> StorageConfig:
    return dataclasses.replace(config, endpoint=f"http://127.0.0.1:{proxy.port}")


def server_port(server: S3Server) -> int:
    return int(server.endpoint.rsplit(":", 1)[1])


async def test_cancelling_an_s3_upload_task_keeps_the_multipart_upload_for_the_resume(
    s3_config: StorageConfig, s3_server: S3Server, tmp_path: Path
) -> None:
    data = random_bytes(3 * PART + 1000, seed=10)
    source = write_file(tmp_path / "disk.img", data)
    prefix = unique_prefix()
    url = f"s3://{s3_server.bucket}/{prefix}/disk.img"
    held = HeldAtFirstReport(after=PART)  # past the first part: that part is stored

    # A slow link (20 MiB/s), so that progress is reported while parts are still going up.
    with DroppingProxy(server_port(s3_server), rate=20 * MiB) as proxy:
        async with vmstore.aio.new_storage(through(proxy, s3_config)) as slow:
            task = asyncio.create_task(
                slow.upload(UploadRequest(str(source), url, progress_callback=held))
            )
            await held.cancel_there(task)
            with pytest.raises(asyncio.CancelledError):
                await task
    assert held.first_report is not None and held.first_report[0] < len(data)
    assert len(open_uploads(s3_server, prefix)) == 1  # kept for the resume, not aborted

    async with vmstore.aio.new_storage(s3_config) as store:
        with pytest.raises(NotFoundError):
            await store.get_metadata(url)  # nothing visible under the key
        up = await store.upload(UploadRequest(str(source), url))
        down = await store.download(DownloadRequest(up.url, str(tmp_path / "back.img")))

    assert up.resumed_from >= PART
    assert up.bytes_transferred == len(data) - up.resumed_from
    assert up.checksum == down.checksum == sha256_bytes(data)
    assert open_uploads(s3_server, prefix) == []


async def test_cancelling_an_s3_download_task_keeps_the_partial_and_the_next_download_resumes(
    s3_config: StorageConfig, s3_server: S3Server, tmp_path: Path
) -> None:
    data = random_bytes(6 * MiB, seed=13)
    source = write_file(tmp_path / "disk.img", data)
    url = f"s3://{s3_server.bucket}/{unique_prefix()}/disk.img"
    host = tmp_path / "host"
    host.mkdir()
    config = dataclasses.replace(s3_config, chunk_size=MiB)
    held = HeldAtFirstReport(after=MiB)
    async with vmstore.aio.new_storage(config) as store:
        up = await store.upload(UploadRequest(str(source), url))

    with DroppingProxy(server_port(s3_server), rate=8 * MiB, direction="download") as proxy:
        async with vmstore.aio.new_storage(through(proxy, config)) as slow:
            task = asyncio.create_task(
                slow.download(
                    DownloadRequest(up.url, str(host / "disk.img"), progress_callback=held)
                )
            )
            await held.cancel_there(task)
            with pytest.raises(asyncio.CancelledError):
                await task
    assert held.first_report is not None and held.first_report[0] < len(data)
    assert not (host / "disk.img").exists()
    assert (host / "disk.img.vmstore-partial").exists()  # and its state, for the resume

    async with vmstore.aio.new_storage(config) as store:
        down = await store.download(DownloadRequest(up.url, str(host / "disk.img")))

    assert down.resumed_from >= MiB
    assert down.bytes_transferred == len(data) - down.resumed_from
    assert down.checksum == sha256_bytes(data)
    assert (host / "disk.img").read_bytes() == data
    assert partials_under(host) == []
