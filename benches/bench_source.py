"""The upload's source pass alone, page cache dropped: what reading + hashing costs before
any byte reaches the network (issue 7, the CPU floor of an upload).

Contenders, each in its own child, the page cache dropped before each (root):

  native          vmstore's UploadSource.file(path): read once, SHA-256 + CRC-64/NVME per part
  native-direct   the same with direct=True (O_DIRECT, no page cache)
  hashlib         Python: f.readinto(8 MiB buffer) + hashlib.sha256 (boto3 + hashlib's hash pass)
  read-only       Python: f.readinto(8 MiB buffer), no hash (the second, warm read boto3 makes
                  is cheaper than this: it runs after the hash pass filled the cache)
  dd / dd-direct  dd bs=8M to /dev/null, buffered and iflag=direct: the kernel's own cost

For each: wall s, CPU s (getrusage of the child's work; wait4 for dd), bytes read.

    python benches/bench_source.py --size 1G --reps 3 [--dir DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_nfs as nfs  # noqa: E402 - sizes, make_random

PART = 8 * nfs.MiB


def child(role: str, path: str, part: int) -> dict[str, Any]:
    def io() -> int:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("read_bytes")).split()[1])

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    sha = ""
    if role.startswith("native"):
        from vmstore import _native

        read0, cpu0, t0 = io(), cpu(), time.perf_counter()
        source = _native.UploadSource.file(path, direct=role == "native-direct")
        while source.next_part(part) is not None:
            pass
        sha = source.sha256()
    else:
        buf = bytearray(part)
        view = memoryview(buf)
        digest = hashlib.sha256()
        read0, cpu0, t0 = io(), cpu(), time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if role == "hashlib":
                    digest.update(view[:n])
        sha = digest.hexdigest() if role == "hashlib" else ""
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cpu_s": cpu() - cpu0, "read_bytes": io() - read0, "sha256": sha}


def hash_in_memory() -> dict[str, float]:
    """CPU-seconds per GiB of SHA-256 and CRC-64/NVME over bytes already in memory (warm,
    256 MiB, best of 3): the per-byte cost no source pass can go below."""
    from vmstore import _native

    data = os.urandom(256 * nfs.MiB)
    per_gib = 4.0

    def best(fn: Any) -> float:
        times = []
        for _ in range(3):
            t0 = time.process_time()
            fn()
            times.append((time.process_time() - t0) * per_gib)
        return min(times)

    def native_sha() -> None:
        h = _native.Sha256()
        h.update(data)
        h.hexdigest()

    return {
        "hashlib_sha256_s_per_gib": best(lambda: hashlib.sha256(data).hexdigest()),
        "native_sha256_s_per_gib": best(native_sha),
        "native_crc64nvme_s_per_gib": best(lambda: _native.crc64nvme(data)),
    }


def run_dd(path: str, direct: bool) -> dict[str, Any]:
    argv = ["dd", f"if={path}", "of=/dev/null", "bs=8M", "status=none"]
    if direct:
        argv.append("iflag=direct")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{argv} failed: {status}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "read_bytes": None}


def read_x(rec: dict[str, Any], size: int) -> str:
    return "-" if rec["read_bytes"] is None else f"{rec['read_bytes'] / size:.2f}"


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--child", nargs=2, metavar=("ROLE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=str(HERE.parent / ".bench-data"))
    ap.add_argument("--part", type=int, default=PART)
    ap.add_argument("--only", default="native,native-direct,hashlib,read-only,dd,dd-direct")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.part)))
        return
    size = nfs.parse_size(args.size)
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"source-{args.size}.raw")
    if not os.path.exists(path) or os.path.getsize(path) != size:
        nfs.make_random(path, size)
    expected = ""
    roles = args.only.split(",")
    runs: list[dict[str, Any]] = []
    cold = True
    for rep in range(args.reps):
        order = roles[:]
        random.shuffle(order)
        for role in order:
            cold = drop_caches() and cold
            if role.startswith("dd"):
                rec = run_dd(path, role == "dd-direct")
            else:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", role, path, "--part", str(args.part)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                rec = json.loads(out.stdout)
                if rec["sha256"]:
                    expected = expected or rec["sha256"]
                    if rec["sha256"] != expected:
                        raise SystemExit(f"{role}: SHA-256 {rec['sha256']} != {expected}")
            rec.update(role=role, rep=rep)
            runs.append(rec)
            print(
                f"rep {rep} {role:14} wall {rec['wall_s']:6.2f} s  cpu {rec['cpu_s']:5.2f} s  "
                f"read {read_x(rec, size)} x",
                flush=True,
            )
    print(
        f"\n{'cold' if cold else 'WARM (drop_caches failed)'}, {args.size}, "
        f"{args.reps} reps; median [min-max]"
    )
    for role in roles:
        rs = [r for r in runs if r["role"] == role]
        for key in ("wall_s", "cpu_s"):
            vals = [r[key] for r in rs]
            print(
                f"  {role:14} {key:7} {statistics.median(vals):6.2f} "
                f"[{min(vals):.2f}-{max(vals):.2f}]"
            )
    in_memory = hash_in_memory()
    for key, value in in_memory.items():
        print(f"  in memory: {key} {value:.3f}")
    if args.out:
        report = {"size": size, "cold": cold, "runs": runs, "in_memory": in_memory}
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
