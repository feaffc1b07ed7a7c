"""Small pytest-benchmark suite for the S3 backend on MiB-sized objects (rclone serve s3).

Not part of the test run (pyproject's testpaths is ``tests``); run it explicitly:

    pip install pytest-benchmark
    pytest benches/test_bench_s3.py --benchmark-columns=min,median,max,rounds

It tracks regressions of the per-call cost (client set-up is outside, but HEADs, multipart
create/complete, thread start-up and the hash pass are in) that the GiB-sized figures of
``benches/bench_s3.py`` hide, next to boto3 doing the equal work (transfer + hashlib SHA-256)
with the same client settings. Each test checks the digest, and the upload tests the stored
bytes too, so a fast but wrong transfer cannot pass.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pytest_benchmark")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vmstore

from tests.s3_servers import S3Server, running_s3_server

MiB = 1 << 20
SIZES = [1 * MiB, 16 * MiB, 64 * MiB]


def _ids(size: int) -> str:
    return f"{size // MiB}MiB"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server("rclone", tmp_path_factory.mktemp("rclone")) as srv:
        yield srv


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("src")
    out: dict[int, tuple[Path, str]] = {}
    for size in SIZES:
        path = root / f"src-{size}"
        path.write_bytes(os.urandom(size))
        out[size] = (path, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def store(server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[vmstore.Storage]:
    # upload resume state goes to a temporary directory, not ~/.local/state
    mp = pytest.MonkeyPatch()
    mp.setenv("VMSTORE_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    config = vmstore.StorageConfig(
        type="s3",
        endpoint=server.endpoint,
        bucket=server.bucket,
        access_key=server.access_key,
        secret_key=server.secret_key,
        region="us-east-1",
        use_ssl=False,
    )
    with vmstore.new_storage(config) as s:
        yield s
    mp.undo()


@pytest.fixture(scope="module")
def client(server: S3Server) -> Any:
    """boto3 as vmstore configures it: path style, checksums when required, unsigned body."""
    import boto3
    import botocore.config

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=botocore.config.Config(
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


@pytest.fixture(scope="module")
def transfer() -> Any:
    from boto3.s3.transfer import TransferConfig

    chunk = 10 * MiB  # vmstore's S3 default part size and concurrency
    return TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=4)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


def _stored_sha256(client: Any, server: S3Server, key: str) -> str:
    h = hashlib.sha256()
    for block in client.get_object(Bucket=server.bucket, Key=key)["Body"].iter_chunks(MiB):
        h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_upload(benchmark, store, client, server, sources, size: int) -> None:  # type: ignore[no-untyped-def]
    src, digest = sources[size]
    benchmark.group = f"s3 {_ids(size)}"
    key = f"up-{size}"

    def run() -> str:
        up = store.upload(vmstore.UploadRequest(source_path=str(src), destination_url=f"/{key}"))
        return up.checksum

    assert benchmark(run) == digest
    assert _stored_sha256(client, server, key) == digest


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_download(benchmark, store, sources, tmp_path: Path, size: int) -> None:  # type: ignore[no-untyped-def]
    src, digest = sources[size]
    benchmark.group = f"s3 {_ids(size)}"
    key = f"dl-{size}"
    store.upload(vmstore.UploadRequest(source_path=str(src), destination_url=f"/{key}"))
    dst = tmp_path / "dl"

    def run() -> str:
        down = store.download(
            vmstore.DownloadRequest(source_url=f"/{key}", destination_path=str(dst))
        )
        return down.checksum

    assert benchmark(run) == digest


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_boto3_upload_hashlib(benchmark, client, transfer, server, sources, size: int) -> None:  # type: ignore[no-untyped-def]
    src, digest = sources[size]
    benchmark.group = f"s3 {_ids(size)}"
    key = f"b3up-{size}"

    def run() -> str:
        sha = _sha256_file(src)
        client.upload_file(
            str(src), server.bucket, key, ExtraArgs={"Metadata": {"sha256": sha}}, Config=transfer
        )
        return sha

    assert benchmark(run) == digest
    assert _stored_sha256(client, server, key) == digest


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_boto3_download_hashlib(  # type: ignore[no-untyped-def]
    benchmark, client, transfer, server, store, sources, tmp_path: Path, size: int
) -> None:
    src, digest = sources[size]
    benchmark.group = f"s3 {_ids(size)}"
    key = f"b3dl-{size}"
    store.upload(vmstore.UploadRequest(source_path=str(src), destination_url=f"/{key}"))
    dst = tmp_path / "b3dl"

    def run() -> str:
        client.download_file(server.bucket, key, str(dst), Config=transfer)
        return _sha256_file(dst)

    assert benchmark(run) == digest
