"""Small pytest-benchmark suite for the HTTP backend against nginx on MiB-sized files.

Not part of the test run (pyproject's testpaths is ``tests``); run it explicitly:

    pip install pytest-benchmark
    pytest benches/test_bench_http.py --benchmark-columns=min,median,max,rounds

It tracks regressions of the per-call cost (HEADs, the sidecar, the range probe, thread
start-up, fsyncs) that the GiB-sized figures of ``benches/bench_http.py`` hide, with a
requests + hashlib download of the same file beside it. Each test checks the digest too,
so a fast but wrong transfer cannot pass.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

import requests
import vmstore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.http_servers import Nginx, running_nginx

MiB = 1 << 20
SIZES = [1 * MiB, 16 * MiB, 64 * MiB]


def _ids(size: int) -> str:
    return f"{size // MiB}MiB"


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with running_nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture(scope="module")
def sources(nginx: Nginx, tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, str]]:
    """Random files, each also served by nginx as /src-<size> (a hard link)."""
    root = tmp_path_factory.mktemp("src")
    out: dict[int, tuple[Path, str]] = {}
    for size in SIZES:
        path = root / f"src-{size}"
        path.write_bytes(os.urandom(size))
        os.link(path, nginx.root / path.name)
        out[size] = (path, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.fixture
def store(nginx: Nginx) -> Iterator[vmstore.Storage]:
    config = vmstore.StorageConfig(type="http", endpoint=nginx.http_base, token=nginx.token)
    with vmstore.new_storage(config) as s:
        yield s


def _requests_download(session: requests.Session, url: str, token: str, dst: Path) -> str:
    tmp = dst.with_name(dst.name + ".tmp")
    h = hashlib.sha256()
    headers = {"Authorization": f"Bearer {token}"}
    with session.get(url, headers=headers, stream=True, timeout=60) as r, open(tmp, "wb") as f:
        r.raise_for_status()
        for block in r.iter_content(chunk_size=MiB):
            h.update(block)
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, dst)
    return h.hexdigest()


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_upload(benchmark, store, nginx, sources, size: int) -> None:  # type: ignore[no-untyped-def]
    src, digest = sources[size]
    benchmark.group = f"http {_ids(size)}"
    url = f"{nginx.http_base}/up-{size}"

    def run() -> str:
        up = store.upload(vmstore.UploadRequest(source_path=str(src), destination_url=url))
        return up.checksum

    assert benchmark(run) == digest


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_download(benchmark, store, nginx, sources, tmp_path: Path, size: int) -> None:  # type: ignore[no-untyped-def]
    src, digest = sources[size]
    benchmark.group = f"http {_ids(size)}"
    dst = tmp_path / "dl"

    def run() -> str:
        down = store.download(
            vmstore.DownloadRequest(
                source_url=f"{nginx.http_base}/{src.name}",
                destination_path=str(dst),
                expected_checksum=digest,
            )
        )
        return down.checksum

    assert benchmark(run) == digest


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_requests_baseline_download(benchmark, nginx, sources, tmp_path: Path, size: int) -> None:  # type: ignore[no-untyped-def]
    src, digest = sources[size]
    benchmark.group = f"http {_ids(size)}"
    with requests.Session() as session:
        url = f"{nginx.http_base}/{src.name}"
        got = benchmark(_requests_download, session, url, nginx.token, tmp_path / "py")
    assert got == digest
