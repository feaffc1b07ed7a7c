"""Small pytest-benchmark suite for the NFS backend on MiB-sized files.

Not part of the test run (pyproject's testpaths is ``tests``); run it explicitly:

    pip install pytest-benchmark
    pytest benches/test_bench_nfs.py --benchmark-columns=min,median,max,rounds

It tracks regressions of the per-call cost (set-up, sidecar, fsyncs, thread start-up) that
the GiB-sized figures of ``benches/bench_nfs.py`` hide. Each test checks the digest too, so
a fast but wrong copy cannot pass.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

import vmstore
from vmstore import _native

MiB = 1 << 20
SIZES = [1 * MiB, 16 * MiB, 64 * MiB]


def _ids(size: int) -> str:
    return f"{size // MiB}MiB"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("src")
    out: dict[int, tuple[Path, str]] = {}
    for size in [*SIZES, -1]:
        path = root / f"src-{size}"
        if size == -1:  # 64 MiB sparse: 4 MiB of data in two unaligned extents
            with open(path, "wb") as f:
                f.truncate(64 * MiB)
                for off in (3 * MiB, 40 * MiB + 4096):
                    f.seek(off)
                    f.write(os.urandom(2 * MiB))
        else:
            path.write_bytes(os.urandom(size))
        out[size] = (path, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[vmstore.Storage]:
    share = tmp_path / "share"
    share.mkdir()
    with vmstore.new_storage(vmstore.StorageConfig(type="nfs", endpoint=str(share))) as s:
        yield s


def _python_copy(src: Path, dst: Path) -> str:
    tmp = dst.with_name(dst.name + ".tmp")
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while chunk := fin.read(32 * MiB):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.rename(tmp, dst)
    return h.hexdigest()


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_upload(benchmark, store, sources, size: int) -> None:  # type: ignore[no-untyped-def]
    src, digest = sources[size]
    benchmark.group = f"nfs {_ids(size)}"

    def run() -> str:
        up = store.upload(vmstore.UploadRequest(source_path=str(src), destination_url="nfs://x"))
        return up.checksum

    assert benchmark(run) == digest


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_download(benchmark, store, sources, tmp_path: Path, size: int) -> None:  # type: ignore[no-untyped-def]
    src, digest = sources[size]
    benchmark.group = f"nfs {_ids(size)}"
    store.upload(vmstore.UploadRequest(source_path=str(src), destination_url="nfs://x"))
    dst = tmp_path / "dl"

    def run() -> str:
        down = store.download(
            vmstore.DownloadRequest(source_url="nfs://x", destination_path=str(dst))
        )
        return down.checksum

    assert benchmark(run) == digest


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_python_baseline(benchmark, sources, tmp_path: Path, size: int) -> None:  # type: ignore[no-untyped-def]
    src, digest = sources[size]
    benchmark.group = f"nfs {_ids(size)}"
    assert benchmark(_python_copy, src, tmp_path / "py") == digest


@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_sha256_file(benchmark, sources, size: int) -> None:  # type: ignore[no-untyped-def]
    src, digest = sources[size]
    benchmark.group = f"nfs {_ids(size)}"
    assert benchmark(_native.sha256_file, str(src)) == digest


def test_sparse_upload_stays_sparse(benchmark, store, sources, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, digest = sources[-1]
    benchmark.group = "nfs sparse 64MiB (4 MiB data)"

    def run() -> str:
        up = store.upload(vmstore.UploadRequest(source_path=str(src), destination_url="nfs://sp"))
        return up.checksum

    assert benchmark(run) == digest
    stored = Path(store._mount_point) / "sp"  # type: ignore[attr-defined]
    # Report, do not fail: the allocation is a figure of BENCHMARKS.md, not a test here.
    benchmark.extra_info["st_blocks_source"] = src.stat().st_blocks
    benchmark.extra_info["st_blocks_copy"] = stored.stat().st_blocks
