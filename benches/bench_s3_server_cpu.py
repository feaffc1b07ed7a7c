#!/usr/bin/env python3
"""The S3 server's own CPU per upload, vmstore against boto3 (issue 7): on these 2-core VMs
the server shares the cores with the client, so a server that spends more CPU than the link
needs sets the upload's wall time whatever the client does.

One server on 127.0.0.1 (tests/s3_servers.py; ``--server seaweedfs`` by default), one file
(``--size``, random, made once), then per repetition each client in its own child process,
page cache dropped before each (root): vmstore's upload (its defaults: CRC-64/NVME per part,
the FULL_OBJECT checksum at Complete, the checksum record after it) and boto3's
``upload_file`` (no checksum, ``request_checksum_calculation="when_required"``). Measured:
the child's wall time and the server's CPU-seconds during it (utime + stime from
/proc/PID/stat of every process of the server's program).

    python benches/bench_s3_server_cpu.py [--server seaweedfs] [--size 1G] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_nfs as nfs  # noqa: E402 - sizes, make_random
import s3_servers  # noqa: E402

PROGRAMS = {"seaweedfs": b"weed", "rclone": b"rclone", "moto": b"moto_server"}

VMSTORE = r"""
import sys, time
from vmstore import StorageConfig, UploadRequest, new_storage
endpoint, access, secret, bucket, src = sys.argv[1:6]
config = StorageConfig(type="s3", endpoint=endpoint, access_key=access, secret_key=secret,
                       bucket=bucket)
with new_storage(config) as store:
    store.upload(UploadRequest(source_path=src,
                               destination_url=f"s3://{bucket}/cpu/vmstore-{time.time_ns()}"))
"""

BOTO3 = r"""
import sys, time, boto3, botocore.config
endpoint, access, secret, bucket, src = sys.argv[1:6]
client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access,
                      aws_secret_access_key=secret, region_name="us-east-1",
                      config=botocore.config.Config(s3={"addressing_style": "path"},
                                                    request_checksum_calculation="when_required"))
client.upload_file(src, bucket, f"cpu/boto3-{time.time_ns()}")
"""


def server_cpu(program: bytes) -> float:
    """CPU-seconds so far of every process whose executable's name ends with ``program``."""
    ticks = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0]
            if not argv0.endswith(program):
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def drop_caches() -> None:
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--server", choices=sorted(PROGRAMS), default="seaweedfs")
    parser.add_argument("--size", type=nfs.parse_size, default=nfs.parse_size("1G"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", default="/var/tmp/vmstore-bench-server-cpu")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"rand-{nfs.fmt_size(args.size)}.img"
    if not src.exists() or src.stat().st_size != args.size:
        nfs.make_random(str(src), args.size)
    figures: dict[str, list[tuple[float, float]]] = {"vmstore upload": [], "boto3 upload_file": []}
    with (
        tempfile.TemporaryDirectory(dir=work) as root,
        s3_servers.running_s3_server(args.server, Path(root)) as server,
    ):
        argv = [server.endpoint, server.access_key, server.secret_key, server.bucket, str(src)]
        for rep in range(args.reps):
            for name, code in (("vmstore upload", VMSTORE), ("boto3 upload_file", BOTO3)):
                drop_caches()
                cpu0, start = server_cpu(PROGRAMS[args.server]), time.perf_counter()
                subprocess.run([sys.executable, "-c", code, *argv], check=True)
                wall = time.perf_counter() - start
                cpu = server_cpu(PROGRAMS[args.server]) - cpu0
                figures[name].append((wall, cpu))
                print(
                    f"rep {rep} {name:18s} wall {wall:6.2f} s  server CPU {cpu:6.2f} s", flush=True
                )
    print(
        f"\n{args.server}, {nfs.fmt_size(args.size)}, {args.reps} repetitions, page cache dropped"
    )
    print("\n| client | wall s | server CPU s |\n|---|---|---|")
    for name, runs in figures.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(
            f"| {name} | {statistics.median(walls):.2f} [{min(walls):.2f}-{max(walls):.2f}] "
            f"| {statistics.median(cpus):.2f} [{min(cpus):.2f}-{max(cpus):.2f}] |"
        )
    ratios = [
        b[0] / v[0]
        for v, b in zip(figures["vmstore upload"], figures["boto3 upload_file"], strict=True)
    ]
    print(
        f"\nspeed, boto3's wall / vmstore's per repetition: {statistics.median(ratios):.2f} "
        f"[{min(ratios):.2f}-{max(ratios):.2f}]"
    )


if __name__ == "__main__":
    main()
