"""Presigned URLs: ``S3Storage.presign`` against every S3 server of the suite, fetched by the
HTTP backend (ranged, resumable, verified) and by curl, with the signature kept out of logs,
messages, reprs and vmstore's state."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
from vmstore import (
    DownloadRequest,
    InvalidConfigError,
    NetworkError,
    NotFoundError,
    PermissionDeniedError,
    StorageConfig,
    UploadRequest,
    new_storage,
)
from vmstore.urls import redact_url

from tests.s3_servers import S3Server, unique_prefix

CHUNK = 256 << 10


@pytest.fixture
def s3_config(s3_server: S3Server, state_dir: Path) -> StorageConfig:
    return StorageConfig(
        type="s3",
        endpoint=s3_server.endpoint,
        bucket=s3_server.bucket,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        use_ssl=False,
        chunk_size=5 << 20,
    )


def _stored(config: StorageConfig, tmp_path: Path, data: bytes) -> tuple[str, str]:
    source = tmp_path / "disk.raw"
    source.write_bytes(data)
    url = f"s3://{config.bucket}/{unique_prefix()}/disk.raw"
    with new_storage(config) as store:
        up = store.upload(UploadRequest(source_path=str(source), destination_url=url))
    return url, up.checksum


def _secrets(presigned: str) -> list[str]:
    """What must never be seen outside the URL itself: the query and its signed values."""
    query = urlsplit(presigned).query
    values = [v for k, v in parse_qsl(query) if k.lower() in ("x-amz-signature", "signature")]
    assert values, f"no signature in the presigned URL's query ({sorted(dict(parse_qsl(query)))})"
    return [query, *values]


def _everything_under(path: Path) -> str:
    text = []
    for file in path.rglob("*"):
        if file.is_file():
            text.append(file.name)
            text.append(file.read_bytes().decode("utf-8", "replace"))
    return "\n".join(text)


def test_presigned_url_downloads_through_the_http_backend_in_ranges_and_never_shows_its_signature(
    s3_config: StorageConfig, tmp_path: Path, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(3 * (1 << 20) + 12345)  # many 256 KiB chunks: ranged, concurrent GETs
    url, checksum = _stored(s3_config, tmp_path, data)
    caplog.set_level(logging.DEBUG)
    with new_storage(s3_config) as store:
        presigned = store.presign(url, expires_in=600)
    assert urlsplit(presigned).path.endswith("/disk.raw")
    secrets = _secrets(presigned)
    destination = tmp_path / "imported.raw"
    reports: list[tuple[int, int]] = []
    request = DownloadRequest(
        source_url=presigned,
        destination_path=str(destination),
        expected_checksum=checksum,
        progress_callback=lambda done, total: reports.append((done, total)),
    )
    with new_storage(StorageConfig(type="http", chunk_size=CHUNK, concurrency=4)) as http:
        metadata = http.get_metadata(presigned)
        response = http.download(request)
        shown = [repr(request), repr(metadata), repr(response), repr(http)]
    assert destination.read_bytes() == data
    assert response.checksum == checksum == hashlib.sha256(data).hexdigest()
    assert metadata.size == len(data)
    assert reports[-1] == (len(data), len(data))
    seen = caplog.text + "\n".join(shown) + _everything_under(state_dir)
    seen += _everything_under(tmp_path / "state") if (tmp_path / "state").exists() else ""
    for secret in secrets:
        assert secret not in seen


def test_presigned_download_that_was_interrupted_resumes_with_a_new_presigned_url(
    s3_config: StorageConfig, tmp_path: Path, state_dir: Path
) -> None:
    data = os.urandom(2 << 20)
    url, checksum = _stored(s3_config, tmp_path, data)
    with new_storage(s3_config) as store:
        first, second = store.presign(url, expires_in=600), store.presign(url, expires_in=900)
    assert first != second
    destination = tmp_path / "imported.raw"
    from vmstore.backends.http import _bodies as http_backend

    original = http_backend._ObjectReader.read_range
    reads = 0

    def cut_after_four_chunks(self: object, start: int, end: int) -> bytes:
        nonlocal reads
        reads += 1
        if reads > 4:  # the link goes down after a third of the object
            raise requests.exceptions.ConnectionError("connection reset by peer")
        return original(self, start, end)  # type: ignore[arg-type]

    config = StorageConfig(type="http", chunk_size=CHUNK, concurrency=2, max_retries=0)
    with new_storage(config) as http:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(http_backend._ObjectReader, "read_range", cut_after_four_chunks)
            with pytest.raises(NetworkError):
                http.download(DownloadRequest(source_url=first, destination_path=str(destination)))
        kept = _everything_under(state_dir) + _everything_under(tmp_path)
        assert "imported.raw.vmstore-partial" in kept
        for secret in _secrets(first):
            assert secret not in kept
        resumed = http.download(
            DownloadRequest(
                source_url=second, destination_path=str(destination), expected_checksum=checksum
            )
        )
    assert resumed.resumed_from > 0
    assert destination.read_bytes() == data


def test_presigned_url_sends_no_head_and_asks_for_no_sidecar(
    s3_config: StorageConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1 << 20)
    url, checksum = _stored(s3_config, tmp_path, data)
    with new_storage(s3_config) as store:
        presigned = store.presign(url)
    sent: list[tuple[str, str]] = []
    original = requests.Session.request

    def recording(self: requests.Session, method: str, target: str, **kwargs: object) -> object:
        sent.append((method, target))
        return original(self, method, target, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(requests.Session, "request", recording)
    with new_storage(StorageConfig(type="http", chunk_size=CHUNK)) as http:
        http.download(
            DownloadRequest(
                presigned, destination_path=str(tmp_path / "out"), expected_checksum=checksum
            )
        )
    # The one-byte probe, then the chunks as parallel ranged GETs of the same URL.
    assert len(sent) >= 1 + (1 << 20) // CHUNK
    assert {method for method, _ in sent} == {"GET"}
    assert {target for _, target in sent} == {presigned}  # only itself, never a derived URL


def test_expired_presigned_url_is_permission_denied_without_the_signature_in_the_message(
    s3_server: S3Server, s3_config: StorageConfig, tmp_path: Path
) -> None:
    if s3_server.name == "moto":
        pytest.skip("moto's server checks neither signatures nor expiry of presigned URLs")
    url, _checksum = _stored(s3_config, tmp_path, os.urandom(4096))
    with new_storage(s3_config) as store:
        presigned = store.presign(url, expires_in=1)
    time.sleep(2.1)
    http = new_storage(StorageConfig(type="http"))
    with http, pytest.raises(PermissionDeniedError) as caught:
        http.download(DownloadRequest(presigned, destination_path=str(tmp_path / "out")))
    for secret in _secrets(presigned):
        assert secret not in str(caught.value)
    assert redact_url(presigned) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_curl_fetches_the_same_bytes_from_a_presigned_url(
    s3_config: StorageConfig, tmp_path: Path
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    data = os.urandom(700_001)
    url, _checksum = _stored(s3_config, tmp_path, data)
    with new_storage(s3_config) as store:
        presigned = store.presign(url, expires_in=120)
    out = tmp_path / "curl.out"
    subprocess.run(
        [curl, "--silent", "--show-error", "--fail", "--output", str(out), presigned],
        check=True,
        timeout=60,
    )
    assert out.read_bytes() == data


def test_presign_of_a_missing_object_is_not_found(s3_config: StorageConfig) -> None:
    with new_storage(s3_config) as store, pytest.raises(NotFoundError):
        store.presign(f"s3://{s3_config.bucket}/{unique_prefix()}/absent.raw")


@pytest.mark.parametrize("expires_in", [0, -1, 604801, 1.5, True, "60"])
def test_presign_refuses_an_expiry_outside_one_second_to_seven_days(
    s3_config: StorageConfig, expires_in: object
) -> None:
    with new_storage(s3_config) as store, pytest.raises(InvalidConfigError, match="expires_in"):
        store.presign(f"s3://{s3_config.bucket}/any", expires_in=expires_in)  # type: ignore[arg-type]


def test_presign_is_an_s3_feature(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    stores = [
        new_storage(StorageConfig(type="nfs", endpoint=str(share))),
        new_storage(StorageConfig(type="http", endpoint="http://127.0.0.1:9")),
    ]
    for store in stores:
        with store, pytest.raises(InvalidConfigError, match="presign is an S3 feature"):
            store.presign("disk.raw")


def test_http_backend_refuses_to_upload_or_delete_through_a_query_url(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    source.write_bytes(b"x" * 10)
    signed = "http://127.0.0.1:9/b/disk.raw?X-Amz-Signature=0123456789abcdef"
    with new_storage(StorageConfig(type="http")) as http:
        with pytest.raises(InvalidConfigError, match="query string") as caught:
            http.upload(UploadRequest(source_path=str(source), destination_url=signed))
        assert "0123456789abcdef" not in str(caught.value)
        with pytest.raises(InvalidConfigError, match="query string"):
            http.delete(signed)
