"""The HTTP/HTTPS backend against real servers on 127.0.0.1: nginx (WebDAV, bearer token, TLS,
redirects, a rate-limited view) and a small server that misbehaves on demand (no Range
support, cut bodies, stalls, 503s, files that change mid-download, metadata-keeping)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from vmstore import (
    ChecksumMismatchError,
    DownloadRequest,
    ErrorType,
    InvalidConfigError,
    NetworkError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    Storage,
    StorageConfig,
    UploadRequest,
    new_storage,
)
from vmstore.backends.http import HttpStatusError, advertised_sha256, classify_retry

from tests.faults import DroppingProxy
from tests.http_servers import (
    Fault,
    Nginx,
    PlainServer,
    running_nginx,
)
from tests.support import MiB, files_under, random_bytes, sha256_bytes, write_file

CHUNK = 256 * 1024


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with running_nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture
def area(nginx: Nginx) -> str:
    return nginx.area()


@pytest.fixture
def plain() -> Iterator[PlainServer]:
    with PlainServer() as server:
        yield server


def nginx_config(nginx: Nginx, **changes: object) -> StorageConfig:
    values: dict[str, object] = {
        "type": "http",
        "endpoint": nginx.http_base,
        "token": nginx.token,
        "chunk_size": CHUNK,
    }
    values.update(changes)
    return StorageConfig(**values)  # type: ignore[arg-type]


def plain_config(server: PlainServer, **changes: object) -> StorageConfig:
    values: dict[str, object] = {"type": "http", "endpoint": server.base, "chunk_size": CHUNK}
    values.update(changes)
    return StorageConfig(**values)  # type: ignore[arg-type]


def served_files(nginx: Nginx, area: str) -> set[str]:
    return files_under(nginx.root / area) if (nginx.root / area).exists() else set()


def access_log(nginx: Nginx) -> list[list[str]]:
    """nginx's access log as (connection, method, uri, status, bytes) rows."""
    return [
        line.split()
        for line in (nginx.root.parent / "nginx" / "access.log").read_text().splitlines()
    ]


# --- nginx: round trip, sidecar, ranges -----------------------------------------------------


def test_round_trip_on_nginx_uses_ranges_and_keeps_checksum_in_a_sidecar(
    nginx: Nginx, area: str, tmp_path: Path
) -> None:
    data = random_bytes(3 * MiB + 17, seed=1)
    source = write_file(tmp_path / "disk.qcow2", data)
    with new_storage(nginx_config(nginx)) as store:
        up = store.upload(
            UploadRequest(str(source), f"/{area}/disk.qcow2", metadata={"VM-Name": "vm 01"})
        )
        down = store.download(DownloadRequest(up.url, str(tmp_path / "back.qcow2")))

    assert up.url == f"{nginx.http_base}/{area}/disk.qcow2"
    assert up.checksum == down.checksum == sha256_bytes(data)
    assert (nginx.root / area / "disk.qcow2").read_bytes() == data
    assert (tmp_path / "back.qcow2").read_bytes() == data
    assert served_files(nginx, area) == {"disk.qcow2", "disk.qcow2.vmstore.json"}
    sidecar = json.loads((nginx.root / area / "disk.qcow2.vmstore.json").read_text())
    assert sidecar["sha256"] == up.checksum
    assert sidecar["size"] == len(data)
    assert sidecar["metadata"] == {"vm-name": "vm 01"}
    ranged = [row for row in access_log(nginx) if row[2].endswith(f"{area}/disk.qcow2")]
    # One 206 per chunk, plus the one-byte probe that asked whether ranges work.
    assert sum(row[1] == "GET" and row[3] == "206" for row in ranged) == -(-len(data) // CHUNK) + 1


def test_stale_sidecar_is_ignored_when_the_file_was_replaced_by_another_tool(
    nginx: Nginx, area: str, tmp_path: Path
) -> None:
    source = write_file(tmp_path / "disk.img", random_bytes(MiB, seed=2))
    other = random_bytes(MiB + 5, seed=3)
    with new_storage(nginx_config(nginx)) as store:
        up = store.upload(UploadRequest(str(source), f"/{area}/disk.img"))
        (nginx.root / area / "disk.img").write_bytes(other)

        md = store.get_metadata(up.url)
        down = store.download(DownloadRequest(up.url, str(tmp_path / "back.img")))

    assert md.size == len(other)
    assert md.checksum is None  # "unknown", never the old file's checksum
    assert down.checksum == sha256_bytes(other)


def test_relative_urls_are_joined_onto_the_endpoint_path(
    nginx: Nginx, area: str, tmp_path: Path
) -> None:
    source = write_file(tmp_path / "disk.img", random_bytes(1000, seed=4))
    config = nginx_config(nginx, endpoint=f"{nginx.http_base}/{area}/exports/")
    with new_storage(config) as store:
        up = store.upload(UploadRequest(str(source), "vm-01/disk.img"))
        again = store.get_metadata("/vm-01/disk.img")

        assert up.url == f"{nginx.http_base}/{area}/exports/vm-01/disk.img"
        assert again.url == up.url
        assert (nginx.root / area / "exports" / "vm-01" / "disk.img").exists()
        for bad in (
            "../escape.img",
            "vm/../../x.img",
            "s3://bucket/key",
            "dir/",
            "x.img.vmstore.json",
        ):
            with pytest.raises(InvalidConfigError):
                store.validate_url(bad)


def test_scheme_less_endpoint_takes_the_scheme_of_the_type(nginx: Nginx, area: str) -> None:
    host = nginx.http_base.removeprefix("http://")
    config = StorageConfig(type="http", endpoint=host, token=nginx.token)
    with new_storage(config) as store, pytest.raises(NotFoundError):
        store.get_metadata(f"/{area}/missing.img")


# --- upload details -----------------------------------------------------------------------


def test_upload_of_a_large_file_is_one_pass_with_content_length_and_a_sidecar_after(
    plain: PlainServer, tmp_path: Path
) -> None:
    """The SHA-256 is known only when the last byte has been read, after the headers went
    out: the body is sent as it is hashed, and the checksum follows in the sidecar."""
    data = random_bytes(MiB + 3, seed=5)
    source = write_file(tmp_path / "disk.img", data)
    with new_storage(plain_config(plain)) as store:
        up = store.upload(
            UploadRequest(
                str(source),
                "/disk.img",
                metadata={"VM-Name": "vm-01", "note": "caf\u00e9 100%"},
                content_type="application/x-qemu-disk",
            )
        )
        assert store.get_metadata(up.url).checksum == sha256_bytes(data)

    put = plain.requests("PUT")[0]
    assert put.headers["Content-Length"] == str(len(data))
    assert "Transfer-Encoding" not in put.headers
    assert "X-Checksum-SHA256" not in put.headers
    assert put.headers["X-Metadata-vm-name"] == "vm-01"
    assert put.headers["X-Metadata-note"] == "caf%C3%A9 100%25"
    assert put.headers["Content-Type"] == "application/x-qemu-disk"
    assert plain.files["/disk.img"].data == data
    sidecar = json.loads(plain.files["/disk.img.vmstore.json"].data)
    assert sidecar["sha256"] == up.checksum == sha256_bytes(data)


def test_upload_of_a_file_within_one_chunk_sends_its_checksum_headers(
    plain: PlainServer, tmp_path: Path
) -> None:
    data = random_bytes(CHUNK - 5, seed=55)
    source = write_file(tmp_path / "small.img", data)
    with new_storage(plain_config(plain)) as store:
        store.upload(UploadRequest(str(source), "/small.img"))
    put = plain.requests("PUT")[0]
    digest = sha256_bytes(data)
    assert put.headers["Content-Length"] == str(len(data))
    assert put.headers["X-Checksum-SHA256"] == digest
    assert (
        put.headers["Repr-Digest"]
        == f"sha-256=:{base64.b64encode(bytes.fromhex(digest)).decode()}:"
    )
    assert plain.files["/small.img"].data == data


def test_upload_of_a_stream_of_unknown_size_is_sent_chunked(
    plain: PlainServer, tmp_path: Path
) -> None:
    data = random_bytes(3 * CHUNK + 11, seed=56)
    with new_storage(plain_config(plain)) as store:
        up = store.upload(UploadRequest(source_stream=io.BytesIO(data), destination_url="/s.img"))
    put = plain.requests("PUT")[0]
    assert put.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in put.headers
    assert plain.files["/s.img"].data == data
    assert up.checksum == sha256_bytes(data)


@pytest.mark.parametrize("style", ["X-Checksum-SHA256", "Repr-Digest", "Digest"])
def test_server_that_keeps_checksum_and_metadata_needs_no_sidecar(
    tmp_path: Path, style: str
) -> None:
    # Within one chunk: read before the PUT, so its checksum can go in the headers (a larger
    # body's checksum is known only after its headers went out, and takes a sidecar).
    data = random_bytes(CHUNK - 1, seed=6)
    source = write_file(tmp_path / "disk.img", data)
    with PlainServer(keeps_metadata=True, checksum_header=style) as server:
        with new_storage(plain_config(server)) as store:
            up = store.upload(UploadRequest(str(source), "/disk.img", metadata={"Owner": "team a"}))
            md = store.get_metadata(up.url)
            down = store.download(DownloadRequest(up.url, str(tmp_path / "back.img")))

        assert set(server.files) == {"/disk.img"}  # no sidecar
        assert not [r for r in server.log if r.path.endswith(".vmstore.json")]
    assert md.checksum == sha256_bytes(data)
    assert md.custom_metadata == {"owner": "team a"}
    assert down.checksum == md.checksum


def test_source_that_changes_during_the_upload_stores_nothing(
    nginx: Nginx, area: str, tmp_path: Path
) -> None:
    data = random_bytes(2 * MiB, seed=7)
    source = write_file(tmp_path / "disk.img", data)

    def scribble(done: int, total: int) -> None:
        if 0 < done < total:
            with open(source, "r+b") as f:
                f.seek(total - 10)
                f.write(b"X" * 10)

    with new_storage(nginx_config(nginx)) as store, pytest.raises(ChecksumMismatchError):
        store.upload(UploadRequest(str(source), f"/{area}/disk.img", progress_callback=scribble))

    assert served_files(nginx, area) == set()


def test_upload_holds_one_block_in_memory_not_the_file(
    nginx: Nginx, area: str, tmp_path: Path
) -> None:
    size = 16 * MiB
    source = write_file(tmp_path / "disk.img", random_bytes(size, seed=8))
    with new_storage(nginx_config(nginx)) as store:
        tracemalloc.start()
        try:
            store.upload(UploadRequest(str(source), f"/{area}/disk.img"))
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    assert peak < 8 * CHUNK, f"upload peaked at {peak} bytes of Python memory"


def test_upload_retry_after_a_dropped_connection_resends_the_source(
    plain: PlainServer, tmp_path: Path
) -> None:
    data = random_bytes(MiB + 7, seed=9)
    source = write_file(tmp_path / "disk.img", data)
    plain.faults.append(Fault("PUT", "reset", after=100_000))

    with new_storage(plain_config(plain)) as store:
        up = store.upload(UploadRequest(str(source), "/disk.img"))

    puts = [r for r in plain.requests("PUT") if r.path == "/disk.img"]
    assert len(puts) == 2
    assert plain.files["/disk.img"].data == data
    assert up.checksum == sha256_bytes(data)


def test_upload_retries_a_503_and_honours_retry_after(plain: PlainServer, tmp_path: Path) -> None:
    source = write_file(tmp_path / "disk.img", random_bytes(CHUNK, seed=10))
    plain.faults.append(Fault("PUT", "status", status=503, retry_after="1"))

    started = time.monotonic()
    with new_storage(plain_config(plain)) as store:
        store.upload(UploadRequest(str(source), "/disk.img"))

    assert time.monotonic() - started >= 0.9
    assert [r.status for r in plain.requests("PUT") if r.path == "/disk.img"] == [503, 201]


def test_server_refusing_put_and_delete_is_operation_failed(nginx: Nginx, tmp_path: Path) -> None:
    source = write_file(tmp_path / "disk.img", random_bytes(1000, seed=11))
    with new_storage(nginx_config(nginx)) as store:
        with pytest.raises(OperationFailedError) as put:
            store.upload(UploadRequest(str(source), "/readonly/disk.img"))
        with pytest.raises(OperationFailedError) as delete:
            store.delete("/readonly/disk.img")

    assert "refuses PUT" in str(put.value) and "405" in str(put.value)
    assert "refuses DELETE" in str(delete.value)


def test_missing_parent_directories_are_created_with_mkcol(
    nginx: Nginx, area: str, tmp_path: Path
) -> None:
    data = random_bytes(CHUNK + 1, seed=25)
    source = write_file(tmp_path / "disk.img", data)
    with new_storage(nginx_config(nginx)) as store:
        up = store.upload(UploadRequest(str(source), f"/nocreate/{area}/vm-01/disk.img"))
        md = store.get_metadata(up.url)

    assert (nginx.root / "nocreate" / area / "vm-01" / "disk.img").read_bytes() == data
    assert md.checksum == sha256_bytes(data)
    mkcols = [row for row in access_log(nginx) if row[1] == "MKCOL" and area in row[2]]
    assert [row[3] for row in mkcols] == ["201", "201"]


# --- auth, TLS, redirects -----------------------------------------------------------------


def test_wrong_token_is_permission_denied_and_the_message_hides_it(
    nginx: Nginx, area: str, tmp_path: Path
) -> None:
    secret = "not-the-right-token-0123456789"
    source = write_file(tmp_path / "disk.img", random_bytes(MiB, seed=12))
    before = len(access_log(nginx))
    with new_storage(nginx_config(nginx, token=secret)) as store:
        failures = []
        for action in (
            lambda: store.get_metadata(f"/{area}/disk.img"),
            lambda: store.download(DownloadRequest(f"/{area}/disk.img", str(tmp_path / "x"))),
            lambda: store.upload(UploadRequest(str(source), f"/{area}/disk.img")),
            lambda: store.delete(f"/{area}/disk.img"),
        ):
            with pytest.raises(PermissionDeniedError) as caught:
                action()
            failures.append(caught.value)

    for error in failures:
        assert error.type is ErrorType.PERMISSION_DENIED
        assert secret not in str(error) and secret not in repr(error)
        assert "401" in str(error) and "token" in str(error)
    # The upload was refused before its body was sent (and before the file was hashed).
    assert not [row for row in access_log(nginx)[before:] if row[1] == "PUT"]
    assert not (tmp_path / "x").exists()


def test_https_with_a_self_signed_certificate_fails_clearly_by_default(
    nginx: Nginx, area: str
) -> None:
    config = nginx_config(nginx, type="https", endpoint=nginx.https_base)
    with new_storage(config) as store, pytest.raises(NetworkError) as caught:
        store.get_metadata(f"/{area}/disk.img")

    message = str(caught.value)
    assert "certificate verify failed" in message
    assert "ca_bundle" in message and "insecure_skip_verify" in message
    assert nginx.token not in message


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
@pytest.mark.parametrize("trust", ["ca_bundle", "insecure_skip_verify"])
def test_https_works_with_the_ca_bundle_or_with_verification_off(
    nginx: Nginx, area: str, tmp_path: Path, trust: str
) -> None:
    data = random_bytes(MiB + 1, seed=13)
    source = write_file(tmp_path / "disk.img", data)
    extra = (
        {"ca_bundle": str(nginx.ca_cert)}
        if trust == "ca_bundle"
        else {"insecure_skip_verify": True}
    )
    config = nginx_config(nginx, type="https", endpoint=nginx.https_base, **extra)
    with new_storage(config) as store:
        up = store.upload(UploadRequest(str(source), f"/{area}/disk.img"))
        down = store.download(DownloadRequest(up.url, str(tmp_path / "back.img")))

    assert up.url.startswith("https://")
    assert down.checksum == sha256_bytes(data)
    assert (tmp_path / "back.img").read_bytes() == data


def test_missing_ca_bundle_file_is_invalid_config(nginx: Nginx, tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError):
        new_storage(nginx_config(nginx, ca_bundle=str(tmp_path / "nope.pem")))


def test_redirect_to_another_host_does_not_carry_the_token(
    nginx: Nginx, area: str, tmp_path: Path
) -> None:
    data = random_bytes(3 * CHUNK + 5, seed=14)
    nginx.recorder.put_file(f"/elsewhere/{area}/disk.img", data)
    url = f"{nginx.http_base}/elsewhere/{area}/disk.img"
    with new_storage(nginx_config(nginx)) as store:
        md = store.get_metadata(url)
        down = store.download(DownloadRequest(url, str(tmp_path / "back.img")))

    assert md.size == len(data)
    assert down.checksum == sha256_bytes(data)
    seen = [r for r in nginx.recorder.requests() if area in r.path]
    assert seen, "the redirect was not followed to the other host"
    assert all("Authorization" not in r.headers for r in seen)
    assert all(nginx.token not in str(r.headers) for r in seen)


def test_redirect_on_the_same_host_keeps_the_token(nginx: Nginx, area: str, tmp_path: Path) -> None:
    data = random_bytes(2 * CHUNK, seed=15)
    source = write_file(tmp_path / "disk.img", data)
    with new_storage(nginx_config(nginx)) as store:
        store.upload(UploadRequest(str(source), f"/{area}/disk.img"))
        # nginx checks the token on every request: the redirected one passes only with it.
        md = store.get_metadata(f"/same/{area}/disk.img")
        down = store.download(DownloadRequest(f"/same/{area}/disk.img", str(tmp_path / "b")))

    assert md.checksum == sha256_bytes(data)
    assert down.checksum == md.checksum


def test_requests_itself_strips_authorization_on_a_cross_host_redirect(nginx: Nginx) -> None:
    """The library default vmstore's own redirect handling is consistent with."""
    nginx.recorder.put_file("/elsewhere/probe", b"x")
    response = requests.get(
        f"{nginx.http_base}/elsewhere/probe",
        headers={"Authorization": f"Bearer {nginx.token}"},
        timeout=10,
    )

    assert response.status_code == 200
    assert "Authorization" not in nginx.recorder.requests("GET")[-1].headers


# --- resume -------------------------------------------------------------------------------

KILL_CHILD = r"""
import json, os, signal, sys
from vmstore import DownloadRequest, StorageConfig, new_storage

config = StorageConfig(**json.loads(sys.argv[1]))
after = int(sys.argv[4])

def progress(done, total):
    if done >= after:
        print(f"KILLED {done} {total}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

with new_storage(config) as store:
    store.download(DownloadRequest(sys.argv[2], sys.argv[3], progress_callback=progress))
print("FINISHED", flush=True)
"""


def test_download_resumes_after_the_process_is_killed_mid_transfer(
    nginx: Nginx, area: str, tmp_path: Path
) -> None:
    data = random_bytes(4 * MiB + 99, seed=16)
    source = write_file(tmp_path / "disk.img", data)
    config = nginx_config(nginx, concurrency=2)
    with new_storage(config) as store:
        store.upload(UploadRequest(str(source), f"/{area}/disk.img"))
    dest = tmp_path / "imported.img"
    config_json = json.dumps(dataclasses.asdict(config))
    nginx_port = int(nginx.http_base.rpartition(":")[2])

    # Through a proxy slowing each connection to 2 MiB/s, so the kill lands mid-transfer.
    with DroppingProxy(nginx_port, rate=2 * MiB, direction="download") as proxy:
        url = f"http://127.0.0.1:{proxy.port}/{area}/disk.img"
        child = subprocess.run(
            [sys.executable, "-c", KILL_CHILD, config_json, url, str(dest), str(MiB)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
        assert child.stdout.startswith("KILLED")
        assert not dest.exists()
        assert (tmp_path / "imported.img.vmstore-partial").exists()

        with new_storage(config) as store:
            down = store.download(DownloadRequest(url, str(dest)))

    assert MiB <= down.resumed_from < len(data)
    assert down.resumed_from % CHUNK == 0
    assert down.bytes_transferred == len(data) - down.resumed_from
    assert down.checksum == sha256_bytes(data)
    assert dest.read_bytes() == data
    assert files_under(tmp_path) == {"disk.img", "imported.img"}


@pytest.mark.parametrize("conditional", [True, False], ids=["412-from-server", "etag-compared"])
def test_resource_changed_mid_download_restarts_from_zero_instead_of_splicing(
    tmp_path: Path, conditional: bool
) -> None:
    old = random_bytes(2 * MiB, seed=17)
    new = random_bytes(2 * MiB, seed=18)
    with PlainServer(conditional=conditional) as server:
        server.put_file("/disk.img", old)
        # The first ranged GET after the probe gets the old version, then the file is replaced.
        server.faults.append(Fault("GET", "none", path="/disk.img"))
        server.faults.append(Fault("GET", "replace", path="/disk.img", data=new))
        with new_storage(plain_config(server, concurrency=1)) as store:
            down = store.download(DownloadRequest("/disk.img", str(tmp_path / "back.img")))

        heads = server.requests("HEAD")
    assert (tmp_path / "back.img").read_bytes() == new
    assert down.checksum == sha256_bytes(new)
    assert len(heads) == 2, "the download should have started over with a fresh HEAD"


# --- servers without ranges, retries, timeouts ---------------------------------------------


@pytest.mark.parametrize("claims_ranges", [False, True], ids=["honest", "claims-ranges"])
def test_server_without_range_support_gets_one_stream(tmp_path: Path, claims_ranges: bool) -> None:
    data = random_bytes(3 * MiB + 1, seed=19)
    with PlainServer(ranges=False, claims_ranges=claims_ranges) as server:
        server.put_file("/disk.img", data)
        with new_storage(plain_config(server)) as store:
            down = store.download(
                DownloadRequest(
                    "/disk.img", str(tmp_path / "back.img"), expected_checksum=sha256_bytes(data)
                )
            )
        gets = [r for r in server.requests("GET") if r.path == "/disk.img"]

    assert (tmp_path / "back.img").read_bytes() == data
    assert down.checksum == sha256_bytes(data)
    assert all(r.status == 200 for r in gets)
    assert len(gets) == 2  # the Range probe (answered 200, not read) and the stream


def test_truncated_ranged_body_is_retried(plain: PlainServer, tmp_path: Path) -> None:
    data = random_bytes(2 * MiB, seed=20)
    plain.put_file("/disk.img", data)
    plain.faults.append(
        Fault("GET", "none", path="/disk.img")
    )  # the Range probe is closed unread: spare it
    plain.faults.append(Fault("GET", "truncate", path="/disk.img", after=100_000))

    with new_storage(plain_config(plain)) as store:
        down = store.download(DownloadRequest("/disk.img", str(tmp_path / "back.img")))

    assert (tmp_path / "back.img").read_bytes() == data
    assert down.checksum == sha256_bytes(data)
    gets = [r for r in plain.requests("GET") if r.path == "/disk.img"]
    assert len(gets) == 1 + 8 + 1  # probe, 8 chunks, one of them again


def test_truncated_single_stream_is_requested_again_and_completes(
    tmp_path: Path,
) -> None:
    data = random_bytes(2 * MiB + 3, seed=21)
    with PlainServer(ranges=False, claims_ranges=False) as server:
        server.put_file("/disk.img", data)
        server.faults.append(Fault("GET", "none", path="/disk.img"))  # the Range probe
        server.faults.append(Fault("GET", "truncate", path="/disk.img", after=MiB + 1))
        with new_storage(plain_config(server)) as store:
            down = store.download(DownloadRequest("/disk.img", str(tmp_path / "back.img")))
        gets = [r for r in server.requests("GET") if r.path == "/disk.img"]

    assert (tmp_path / "back.img").read_bytes() == data
    assert down.checksum == sha256_bytes(data)
    assert down.bytes_transferred == len(data)
    assert len(gets) == 3  # probe, the cut stream, the restarted stream


def test_idle_timeout_is_not_a_cap_on_a_long_transfer(tmp_path: Path) -> None:
    data = random_bytes(MiB, seed=22)
    # 16 blocks, 0.1 s apart: 1.6 s in all, never 0.5 s without a byte.
    with PlainServer(ranges=False, slow_block=64 * 1024, slow_delay=0.1) as server:
        server.put_file("/disk.img", data)
        with new_storage(plain_config(server, timeout=0.5, max_retries=0)) as store:
            started = time.monotonic()
            down = store.download(DownloadRequest("/disk.img", str(tmp_path / "back.img")))

    assert time.monotonic() - started > 1.0
    assert down.checksum == sha256_bytes(data)


def test_stalled_response_times_out_and_the_chunk_is_fetched_again(
    plain: PlainServer, tmp_path: Path
) -> None:
    data = random_bytes(MiB, seed=23)
    plain.put_file("/disk.img", data)
    plain.faults.append(Fault("GET", "none", path="/disk.img"))  # the probe
    plain.faults.append(Fault("GET", "stall", path="/disk.img", after=1000, seconds=3))

    with new_storage(plain_config(plain, timeout=0.5)) as store:
        down = store.download(DownloadRequest("/disk.img", str(tmp_path / "back.img")))

    assert down.checksum == sha256_bytes(data)


def test_503_with_retry_after_on_head_is_waited_for(plain: PlainServer) -> None:
    plain.put_file("/disk.img", b"abc")
    plain.faults.append(Fault("HEAD", "status", status=503, retry_after="1"))

    started = time.monotonic()
    with new_storage(plain_config(plain)) as store:
        md = store.get_metadata("/disk.img")

    assert md.size == 3
    assert time.monotonic() - started >= 0.9


def test_persistent_5xx_is_network_error_after_max_retries(plain: PlainServer) -> None:
    plain.put_file("/disk.img", b"abc")
    plain.faults.extend(Fault("HEAD", "status", status=502) for _ in range(5))

    with (
        new_storage(plain_config(plain, max_retries=2)) as store,
        pytest.raises(NetworkError) as caught,
    ):
        store.get_metadata("/disk.img")

    assert "502" in str(caught.value)
    assert len(plain.requests("HEAD")) == 3


@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "no-ranges"])
def test_server_without_head_is_described_by_a_one_byte_get(tmp_path: Path, ranges: bool) -> None:
    data = random_bytes(MiB + 1, seed=26)
    with PlainServer(allowed=frozenset({"GET"}), ranges=ranges) as server:
        server.put_file("/disk.img", data)
        with new_storage(plain_config(server)) as store:
            md = store.get_metadata("/disk.img")
            down = store.download(DownloadRequest("/disk.img", str(tmp_path / "back.img")))

    assert md.size == len(data)
    assert md.etag
    assert down.checksum == sha256_bytes(data)
    assert (tmp_path / "back.img").read_bytes() == data


def test_unreachable_server_is_network_error(tmp_path: Path) -> None:
    from tests.http_servers import free_port

    config = StorageConfig(type="http", endpoint=f"http://127.0.0.1:{free_port()}", max_retries=0)
    with new_storage(config) as store, pytest.raises(NetworkError) as caught:
        store.get_metadata("/disk.img")

    assert "refused" in str(caught.value)


def test_advertised_checksum_that_does_not_match_fails_the_download(
    tmp_path: Path,
) -> None:
    data = random_bytes(MiB, seed=24)
    with PlainServer() as server:
        stored = server.put_file("/disk.img", data)
        stored.headers["X-Checksum-SHA256"] = sha256_bytes(b"other bytes")
        dest = write_file(tmp_path / "back.img", b"previous")
        with new_storage(plain_config(server)) as store, pytest.raises(ChecksumMismatchError):
            store.download(DownloadRequest("/disk.img", str(dest)))

    assert dest.read_bytes() == b"previous"
    assert files_under(tmp_path) == {"back.img"}


# --- pure parts ---------------------------------------------------------------------------

DIGEST = sha256_bytes(b"vmstore")
B64 = base64.b64encode(bytes.fromhex(DIGEST)).decode()


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Checksum-SHA256": DIGEST.upper()},
        {"X-Checksum-SHA256": B64},
        {"Repr-Digest": f"sha-512=:{'A' * 88}:, sha-256=:{B64}:"},
        {"Digest": f"md5=xyz, SHA-256={B64}"},
    ],
    ids=["hex", "base64", "repr-digest", "digest"],
)
def test_advertised_checksum_forms(headers: dict[str, str]) -> None:
    assert advertised_sha256(requests.structures.CaseInsensitiveDict(headers)) == DIGEST


def test_no_or_malformed_advertised_checksum_is_none() -> None:
    assert advertised_sha256({}) is None
    assert advertised_sha256({"Repr-Digest": "sha-256=:bm90IDMyIGJ5dGVz:"}) is None
    assert advertised_sha256({"X-Checksum-SHA256": "xyz"}) is None


@pytest.mark.parametrize(
    ("status", "retried"),
    [
        (500, True),
        (502, True),
        (503, True),
        (429, True),
        (408, True),
        (501, False),
        (507, False),
        (404, False),
        (401, False),
        (412, False),
    ],
)
def test_which_statuses_are_retried(status: int, retried: bool) -> None:
    assert (classify_retry(HttpStatusError("GET", status, "")) is not None) is retried


def test_config_repr_and_storage_repr_hide_the_token(nginx: Nginx) -> None:
    config = nginx_config(nginx)
    store: Storage = new_storage(config)
    try:
        assert nginx.token not in repr(config)
        assert nginx.token not in repr(store)
    finally:
        store.close()


def test_a_presigned_style_query_never_appears_in_errors_or_logs(
    nginx: Nginx, area: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A presigned URL carries its signature in the query: a credential for that file.
    data = random_bytes(2 * MiB, seed=41)
    (nginx.root / area).mkdir()
    (nginx.root / area / "disk.raw").write_bytes(data)
    signature = "X-Amz-Signature=0123456789abcdef-secret-part"
    url = f"{nginx.http_base}/{area}/disk.raw?{signature}"
    destination = tmp_path / "disk.raw"
    caplog.set_level("DEBUG", logger="vmstore")
    with new_storage(nginx_config(nginx)) as store, pytest.raises(ChecksumMismatchError) as err:
        store.download(DownloadRequest(url, str(destination), expected_checksum="0" * 64))
    assert "secret-part" not in str(err.value)
    assert f"/{area}/disk.raw" in str(err.value)
    assert "secret-part" not in caplog.text
    assert not destination.exists()
    # A download with nothing to check against says so instead of passing silently.
    with new_storage(nginx_config(nginx)) as store:
        down = store.download(DownloadRequest(url, str(destination)))
    assert down.checksum == sha256_bytes(data)
    assert "unverified" in caplog.text and "secret-part" not in caplog.text
