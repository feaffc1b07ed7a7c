"""The cold-cache harness that bench_s3.py and bench_http.py share (issue 7, "Benchmarks").

A migration host reads a disk image that is not in its page cache (a 200 GB disk is not in
RAM), so before EACH contender run the harness syncs and drops the page cache
(``sync; echo 3 > /proc/sys/vm/drop_caches``, root only; when that fails the run goes on warm
and every record and the report say so). The tools' own code (the interpreter's modules,
boto3's service models, s5cmd's and curl's binaries) and the server's code path are then
warmed again by a small warm-up (``warm_tools``): a host running a controller has its code
in memory, and the point is the data. The source file, the object's backing file and the
destination are left cold.

Every contender is one child process, run under GNU time (peak RSS: its %M). The parent
waits for it with ``waitid(WNOWAIT)`` so that the exited process can still be read in /proc:

  wall          the timed operation, measured inside a Python child from the call (after
                imports and client set-up); the whole process for binaries (s5cmd, curl)
  CPU s         user + system CPU of the operation: ``getrusage(RUSAGE_SELF)`` (all threads)
                + ``RUSAGE_CHILDREN`` deltas around the call inside a Python child; the whole
                process tree (``os.wait4`` of GNU time, which reaps the child) for binaries.
                ``cpu_proc_s`` (wait4, interpreter start-up and imports included) is kept
                in the JSON for every contender.
  read          bytes read from storage (``read_bytes`` of ``/proc/self/io``, delta around the
                call) inside a Python child; ``/proc/<pid>/io`` of the exited GNU time (which
                holds its reaped child's counters) for binaries
  first         time from the call to the first progress report with done > 0: vmstore's
                progress_callback, boto3's ``Callback=``, requests: the first block read from
                the file (PUT) or from the response (GET); n/a for s5cmd and curl
  peak RSS      GNU time's %M of the child (its largest process)

Servers are excluded from every figure (they are other processes). Results are verified after
each run, untimed (see the scripts).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_nfs as nfs  # noqa: E402 - sizes, logging, machine info, make_random, prefault

KiB, MiB, GiB = nfs.KiB, nfs.MiB, nfs.GiB
GNU_TIME = "/usr/bin/time"
DIRECT_ENV = "VMSTORE_BENCH_DIRECT"
RSS_SLACK = 100 * MiB  # the memory target: concurrency x part size + this
NATIVE = HERE.parent / "python" / "vmstore" / "_native.abi3.so"


def native_id() -> str:
    """The native core's build (other engineers rebuild it while a run goes on: a run whose
    records name two builds is not one comparison)."""
    try:
        st = NATIVE.stat()
    except OSError:
        return ""
    return f"{st.st_size}:{int(st.st_mtime)}"


# --------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------


def proc_io(pid: int | str = "self") -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = int(v)
    return out


LEGACY_CONTENDERS = {
    # HTTP read its upload's source through the page cache by default until 2026-12-03.
    "vmstore upload (page cache, default)": "vmstore upload (page cache)",
    "vmstore upload (O_DIRECT)": "vmstore upload (O_DIRECT, default)",
}


def load_results(path: str | Path) -> dict[str, Any]:
    """A results JSON, its contenders under today's names (the reading mode is the name's)."""
    data: dict[str, Any] = json.loads(Path(path).read_text())
    for run in data.get("runs", []):
        run["contender"] = LEGACY_CONTENDERS.get(run["contender"], run["contender"])
    return data


def apply_direct_env() -> bool:
    """VMSTORE_BENCH_DIRECT=1 makes vmstore's uploads read their file with O_DIRECT (the
    default on a local disk), =0 through the page cache, by putting
    ``functools.partial(plan_source, direct=...)`` into the backends'
    namespaces (they import ``plan_source`` by name). Returns whether the run reads direct."""
    import vmstore._upload
    import vmstore.backends.http._backend
    import vmstore.backends.s3

    direct = os.environ.get(DIRECT_ENV) != "0"
    planner = functools.partial(vmstore._upload.plan_source, direct=direct)
    vmstore.backends.s3.plan_source = planner  # type: ignore[assignment]
    vmstore.backends.http._backend.plan_source = planner  # type: ignore[assignment]
    return direct


def code_files() -> list[str]:
    """The files this interpreter's code came from (modules, their .pyc, extension modules)
    and the data files boto3/botocore read when a client is made: what a child needs that
    is not the transfer's data."""
    import importlib.util

    out: set[str] = {os.path.realpath(sys.executable)}
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None)
        if not f:
            continue
        out.add(f)
        if f.endswith(".py"):
            with contextlib.suppress(Exception):
                out.add(importlib.util.cache_from_source(f))
    for pkg, subdirs in (("botocore", ("s3",)), ("boto3", ("s3",)), ("certifi", ())):
        mod = sys.modules.get(pkg)
        if not mod or not getattr(mod, "__file__", None):
            continue
        base = Path(str(mod.__file__)).parent
        data = base / "data"
        out.update(str(p) for p in data.glob("*.json*"))
        for sub in subdirs:
            out.update(str(p) for p in (data / sub).rglob("*") if p.is_file())
        out.update(str(p) for p in base.glob("*.pem"))
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:  # shared libraries (libpython, libssl, ...)
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/"):
                out.add(parts[5])
    return sorted(p for p in out if os.path.isfile(p))


def binary_files(program: str) -> list[str]:
    """A program and the shared libraries it links (ldd), to hold in memory."""
    import shutil

    path = shutil.which(program) or program
    if not os.path.isfile(path):
        return []
    out = [os.path.realpath(path)]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        ldd = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=10).stdout
        for line in ldd.splitlines():
            for tok in line.split():
                if tok.startswith("/") and os.path.isfile(tok):
                    out.append(os.path.realpath(tok))
    return out


class CodeHolder:
    """Keeps the tools' code in the page cache across ``drop_caches``: every listed file is
    mapped into this (the parent) process and its pages touched; the kernel does not drop
    page-cache pages that are mapped. The transfer's data (sources, the server's objects,
    outputs) is never held, so it stays cold. Children's peak RSS is unaffected (GNU time's
    %M is the grandchild's own)."""

    def __init__(self) -> None:
        self.maps: list[Any] = []
        self.bytes = 0
        self.files = 0

    def hold(self, paths: list[str]) -> None:
        import mmap

        for p in paths:
            try:
                with open(p, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if not size:
                        continue
                    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            except (OSError, ValueError):
                continue
            for off in range(0, size, 4096):
                m[off]  # touch: fault the page in; the mapping keeps it
            self.maps.append(m)
            self.bytes += size
            self.files += 1


class OpMeter:
    """Measures one operation inside a child: wall, CPU (all threads + reaped children),
    bytes read from storage, and the first progress report."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.t0 = 0.0
        self.result: dict[str, Any] = {}

    def progress(self, done: int, _total: int | None = None) -> None:
        """A progress callback: the first call with done > 0 is the first progress."""
        if self.first is None and done > 0:
            self.first = time.perf_counter() - self.t0

    def mark_first(self) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.t0

    def __enter__(self) -> OpMeter:
        self.io0 = proc_io()
        self.ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self.rc0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        t1 = time.perf_counter()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        rc = resource.getrusage(resource.RUSAGE_CHILDREN)
        io = proc_io()
        self.result.update(
            seconds=t1 - self.t0,
            first_progress_s=self.first,
            cpu_user=ru.ru_utime - self.ru0.ru_utime + rc.ru_utime - self.rc0.ru_utime,
            cpu_sys=ru.ru_stime - self.ru0.ru_stime + rc.ru_stime - self.rc0.ru_stime,
            read_bytes=io.get("read_bytes", 0) - self.io0.get("read_bytes", 0),
            rchar=io.get("rchar", 0) - self.io0.get("rchar", 0),
            cpu_from="in-process getrusage around the call",
        )


FLOOR_UP = "floor: vmstore's pass + socket, no HTTP"
FLOOR_ROLE = "floor"

_SINK = (
    "import socket,sys\n"
    "s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(1)\n"
    "print(s.getsockname()[1], flush=True)\n"
    "c,_=s.accept(); b=bytearray(1<<20); n=0\n"
    "while (k:=c.recv_into(b)): n+=k\n"
    "print(n, flush=True)\n"
)


def floor_upload(src: str, part_size: int, meter: OpMeter) -> dict[str, Any]:
    """The least CPU an upload with this issue's checks can cost, measured: vmstore's own
    pass over the source (UploadSource, O_DIRECT: one read, SHA-256 + CRC-64/NVME in Rust)
    with every part's bytes handed to a loopback TCP socket, and nothing else: no HTTP
    request, no signing, no response, no thread pool. The receiving end is another process
    (excluded, like every server); it is reaped after the meter stops."""
    from vmstore import _native

    sink = subprocess.Popen([sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    port = int(sink.stdout.readline())
    import socket

    conn = socket.create_connection(("127.0.0.1", port))
    with meter:
        source = _native.UploadSource.file(src, direct=True)
        while (part := source.next_part(part_size)) is not None:
            conn.sendall(memoryview(part.data).cast("B"))
            meter.progress(source.position)
        conn.close()
        sha = source.sha256()
    received = int(sink.stdout.readline())
    sink.wait()
    if received != os.path.getsize(src):
        raise SystemExit(f"the sink received {received} bytes of {os.path.getsize(src)}")
    return {"sha256": sha, "direct": True}


class FirstRead:
    """A file object for requests' PUT that notes its first read, then gets out of the way:
    the bound method of the file replaces this wrapper's after the first call, so the later
    8 KiB reads of http.client cost what they cost without it."""

    def __init__(self, f: Any, size: int, meter: OpMeter) -> None:
        self._f, self._size, self._meter = f, size, meter

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        self._meter.mark_first()
        self.read = self._f.read  # type: ignore[method-assign]
        data: bytes = self._f.read(n)
        return data


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------


def run_proc(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one child under GNU time; its JSON line (if any) merged with the process's
    figures. A Python child's own figures (seconds, cpu, read_bytes) take precedence."""
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as tout:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [GNU_TIME, "-o", tout.name, "-f", "%M", *argv],
            stdout=subprocess.PIPE,
            stderr=err,
            env=full_env,
        )
        out = p.stdout.read() if p.stdout else b""
        # exited but not reaped: /proc/<pid>/io still holds its (and its reaped child's) I/O
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        io = proc_io(p.pid)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.stdout:
            p.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        timed = tout.read().split()
    if p.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited {p.returncode}: {stderr.strip()[-1500:]}")
    lines = out.decode().strip().splitlines()
    res: dict[str, Any] = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    proc = {
        "wall": wall,
        "maxrss_kib": int(timed[-1]) if timed and timed[-1].isdigit() else ru.ru_maxrss,
        "cpu_proc_s": ru.ru_utime + ru.ru_stime,
        "read_bytes_proc": io.get("read_bytes", 0),
        "rchar_proc": io.get("rchar", 0),
    }
    res.update(proc)
    if "seconds" not in res:  # a binary: the whole process is the operation
        res.update(
            seconds=wall,
            first_progress_s=None,
            cpu_user=ru.ru_utime,
            cpu_sys=ru.ru_stime,
            read_bytes=io.get("read_bytes", 0),
            rchar=io.get("rchar", 0),
            cpu_from="wait4 of the whole process",
        )
    return res


def drop_caches() -> str | None:
    """sync, then drop the page cache, dentries and inodes; the error text when it cannot."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class Contender:
    name: str
    direction: str  # "upload" | "download"
    argv: list[str]
    role: str  # "vmstore", "vmstore-direct", "peer", "peer+hash", "ceiling"
    env: dict[str, str] = field(default_factory=dict)
    # untimed, after the run: verify the result (raise on a wrong byte); gets the record
    check: Callable[[dict[str, Any]], None] | None = None
    # before and after each run: remove what the run writes
    clean: Callable[[], None] | None = None
    # right before the timed child starts (after the drop and the warm-up)
    start: Callable[[], None] | None = None


def floor_contender(argv: list[str], sha256: str) -> Contender:
    """The floor (see floor_upload) as an upload contender of either bench: ``argv`` runs
    the bench's ``floor-upload`` child; the digest of the bytes it sent must be the file's."""

    def check(rec: dict[str, Any]) -> None:
        if rec.get("sha256") != sha256:
            raise RuntimeError(f"floor: sha256 {rec.get('sha256')} != {sha256}")
        rec["verified"] = "digest of the bytes sent"

    return Contender(FLOOR_UP, "upload", argv, FLOOR_ROLE, {}, check, None)


@dataclass
class SizeSpec:
    name: str  # e.g. "1G"
    size: int
    path: str
    sha256: str
    part_size: int  # vmstore's upload part size for this size
    extra: dict[str, Any] = field(default_factory=dict)


class ColdRunner:
    """Runs contenders from a defined cold state, interleaved, shuffled per repetition."""

    def __init__(
        self,
        args: Any,
        warm_tools: Callable[[], None],
        contenders: Callable[[SizeSpec], list[Contender]],
    ) -> None:
        self.args = args
        self.warm_tools = warm_tools
        self.contenders = contenders
        self.runs: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.drop_error: str | None = None
        self.holder = CodeHolder()

    def measure(self, spec: SizeSpec, c: Contender, rep: int) -> None:
        a = self.args
        if c.clean:
            c.clean()
        err = drop_caches() if not a.warm else "--warm given"
        if err and not self.drop_error:
            self.drop_error = err
            self.notes.append(f"page cache NOT dropped ({err}): the runs are warm")
        self.warm_tools()
        if a.prefault_mib:
            nfs.prefault(a.prefault_mib)
        time.sleep(a.settle)
        load = os.getloadavg()[0]
        rec: dict[str, Any] = {
            "size_name": spec.name,
            "size": spec.size,
            "contender": c.name,
            "direction": c.direction,
            "role": c.role,
            "rep": rep,
            "load1": load,
            "cold": err is None,
            "native": native_id(),
        }
        if c.start:
            c.start()
        rec.update(run_proc(c.argv, c.env))
        if "sha256" in rec and rec["sha256"] != spec.sha256:
            raise RuntimeError(f"{c.name}: reported sha256 {rec['sha256']} != {spec.sha256}")
        if c.check:
            c.check(rec)
        if c.clean:
            c.clean()
        self.runs.append(rec)
        fp = rec.get("first_progress_s")
        nfs.log(
            f"  rep {rep} {spec.name:>4} {c.direction:<8} {c.name:<40} {rec['seconds']:7.2f} s"
            f" cpu={rec['cpu_user'] + rec['cpu_sys']:5.2f}"
            f" read={rec['read_bytes'] / spec.size:4.2f}x"
            f" first={'-' if fp is None else f'{fp:.2f}'}"
            f" rss={rec['maxrss_kib'] / KiB:.0f}M load={load:.2f}"
        )

    def run(self, specs: list[SizeSpec]) -> None:
        a = self.args
        for rep in range(a.reps):
            nfs.log(f"repetition {rep + 1}/{a.reps} (load {os.getloadavg()})")
            order = random.Random(a.seed + rep)
            smallest = min(s.size for s in specs)
            for spec in specs:
                cs = self.contenders(spec)
                if a.large_only and spec.size != smallest:
                    keep = set(a.large_only.split(","))
                    cs = [c for c in cs if c.role in keep]
                order.shuffle(cs)  # a new order each repetition: no fixed neighbours
                for c in cs:
                    try:
                        self.measure(spec, c, rep)
                    except Exception as exc:  # noqa: BLE001 - recorded and reported, not fatal
                        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:500]
                        nfs.log(f"  rep {rep} {spec.name} {c.name}: FAILED {msg}")
                        self.failures.append(
                            {
                                "size_name": spec.name,
                                "contender": c.name,
                                "direction": c.direction,
                                "rep": rep,
                                "error": msg,
                            }
                        )
                        if c.clean:
                            with contextlib.suppress(Exception):
                                c.clean()


def common_arguments(ap: Any, workdir: str) -> None:
    ap.add_argument(
        "--size",
        type=nfs.parse_size,
        action="append",
        help="file size, repeatable (default: 1G and 4G)",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--settle", type=float, default=0.5, help="idle seconds before each run")
    ap.add_argument(
        "--prefault-mib",
        type=int,
        default=1024,
        help="MiB touched then freed before each run (see bench_nfs.prefault); 0: never",
    )
    ap.add_argument("--seed", type=int, default=1, help="seed of the per-repetition order")
    ap.add_argument("--workdir", default=workdir)
    ap.add_argument("--reuse", action="store_true", help="reuse source files of the right size")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache (debug)")
    ap.add_argument("--only", help="comma-separated roles to run (e.g. vmstore,peer+hash)")
    ap.add_argument(
        "--large-only",
        help="roles to run at every size but the smallest (a shorter run: e.g. "
        "vmstore,vmstore-direct,peer+hash keeps the RSS-flatness and equal-work figures)",
    )
    ap.add_argument("--chunk-size", type=nfs.parse_size, default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--report", metavar="JSON", help="print the markdown of saved results")
    ap.add_argument("--update-doc", metavar="MD", help="replace the generated section in MD")


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def cpu(r: dict[str, Any]) -> float:
    return float(r["cpu_user"] + r["cpu_sys"])


@dataclass(frozen=True)
class Target:
    """One row of issue 7's targets table, computed per repetition from vmstore and `vs`
    run in the same repetition: read = vmstore's read_bytes / size; cpu = vmstore's CPU /
    vs's CPU; wall = vs's time / vmstore's time (> 1: vmstore faster); first = vmstore's
    first progress in s; rss = vmstore's peak RSS in MiB (bound given per size)."""

    label: str
    direction: str
    kind: str  # "read" | "cpu" | "wall" | "first" | "rss"
    vs: str | None  # the peer contender, or None for an absolute figure
    op: str  # "<=" | ">="
    bound: float


def per_rep(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    out: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault((r["size_name"], r["rep"]), {})[r["contender"]] = r
    return out


def target_values(runs: list[dict[str, Any]], t: Target, size_name: str, vm: str) -> list[float]:
    """The target's figure per repetition of one size, for the vmstore contender `vm` (the
    default one or the O_DIRECT one)."""
    vals: list[float] = []
    for (sn, _rep), row in sorted(per_rep(runs).items()):
        v = row.get(vm)
        o = row.get(t.vs) if t.vs else None
        if sn != size_name or v is None or (t.vs and o is None):
            continue
        if t.kind == "read":
            vals.append(v["read_bytes"] / v["size"])
        elif t.kind == "cpu" and o is not None:
            vals.append(cpu(v) / cpu(o) if cpu(o) else float("nan"))
        elif t.kind == "wall" and o is not None:
            vals.append(o["seconds"] / v["seconds"])
        elif t.kind == "first":
            fp = v.get("first_progress_s")
            vals.append(float("inf") if fp is None else fp)
        elif t.kind == "rss":
            vals.append(v["maxrss_kib"] * KiB / MiB)
    return vals


def met(value: float, op: str, bound: float) -> bool:
    return value <= bound if op == "<=" else value >= bound


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per size and contender: median [min-max] of every figure."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault((r["size_name"], r["contender"]), []).append(r)
    table: dict[str, dict[str, Any]] = {}
    for (sn, name), rs in by.items():
        fps = [r["first_progress_s"] for r in rs if r.get("first_progress_s") is not None]
        table.setdefault(sn, {})[name] = {
            "direction": rs[0]["direction"],
            "role": rs[0]["role"],
            "size": rs[0]["size"],
            "seconds": stats([r["seconds"] for r in rs]),
            "cpu_s": stats([cpu(r) for r in rs]),
            "cpu_proc_s": stats([r["cpu_proc_s"] for r in rs]),
            "read_x": stats([r["read_bytes"] / r["size"] for r in rs]),
            "first_s": stats(fps) if fps else None,
            "maxrss_mib": stats([r["maxrss_kib"] / KiB for r in rs]),
            "cold": all(r.get("cold") for r in rs),
        }
    return table


def fmt_stat(s: dict[str, float] | None, digits: int = 2) -> str:
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def contender_table(table: dict[str, dict[str, Any]], size_name: str) -> list[str]:
    rows = table.get(size_name, {})
    lines = [
        "| direction | contender | wall s | MiB/s | client CPU s | read x size | first progress s "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {"upload": 0, "download": 1}
    for name, e in sorted(
        rows.items(), key=lambda kv: (order.get(kv[1]["direction"], 2), kv[1]["seconds"]["median"])
    ):
        mibs = e["size"] / MiB / e["seconds"]["median"]
        lines.append(
            f"| {e['direction']} | {name} | {fmt_stat(e['seconds'])} | {mibs:.0f} | "
            f"{fmt_stat(e['cpu_s'])} | {fmt_stat(e['read_x'])} | {fmt_stat(e['first_s'])} | "
            f"{fmt_stat(e['maxrss_mib'], 0)} |"
        )
    return lines


def size_names(runs: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, int] = {}
    for r in runs:
        seen.setdefault(r["size_name"], r["size"])
    return sorted(seen, key=lambda n: seen[n])


def targets_rows(
    runs: list[dict[str, Any]],
    targets: list[Target],
    vm_names: dict[str, dict[str, str]],
    rss_bound_mib: Callable[[str, str], float],
) -> list[dict[str, Any]]:
    """Each target per size and per vmstore variant (default, O_DIRECT): median [min-max]
    of the per-repetition values, met or not. `vm_names[direction][variant]` names the
    vmstore contender; `rss_bound_mib(size_name, direction)` the memory bound."""
    out: list[dict[str, Any]] = []
    for sn in size_names(runs):
        for t in targets:
            for variant, vm in vm_names[t.direction].items():
                if vm == FLOOR_UP and t.kind != "cpu":
                    continue  # the floor stores nothing: only its CPU is a bound
                bound = rss_bound_mib(sn, t.direction) if t.kind == "rss" else t.bound
                op = t.op
                vals = target_values(runs, t, sn, vm)
                if not vals:
                    continue
                s = stats(vals)
                # a target must hold in the typical run: judged on the median; the spread
                # is shown beside it
                worst = s["max"] if op == "<=" else s["min"]
                out.append(
                    {
                        "size_name": sn,
                        "label": t.label,
                        "variant": variant,
                        "stats": s,
                        "target": f"{op} {bound:g}",
                        "met": met(s["median"], op, bound),
                        "met_every_rep": met(worst, op, bound),
                        "kind": t.kind,
                        "vs": t.vs,
                        "direction": t.direction,
                    }
                )
    return out


def rss_flat(runs: list[dict[str, Any]], vm: str, part_size_by_size: dict[str, int]) -> Any:
    """Peak RSS of `vm` at the smallest and largest size (median over reps) and whether it
    stayed flat: the largest within the smallest + one part size."""
    names = [
        n
        for n in size_names(runs)
        if any(r["contender"] == vm and r["size_name"] == n for r in runs)
    ]
    if len(names) < 2:
        return None
    med = {
        n: statistics.median(
            r["maxrss_kib"] / KiB for r in runs if r["contender"] == vm and r["size_name"] == n
        )
        for n in (names[0], names[-1])
    }
    slack = part_size_by_size.get(names[-1], 0) / MiB
    return {
        "small": names[0],
        "large": names[-1],
        "small_mib": med[names[0]],
        "large_mib": med[names[-1]],
        "flat": med[names[-1]] <= med[names[0]] + slack,
        "slack_mib": slack,
    }


def targets_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| size | target | vmstore | measured: median [min-max] | bound | met? |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["stats"]
        digits = 0 if r["kind"] == "rss" else 2
        verdict = "met" if r["met"] else "**not met**"
        if r["met"] and not r["met_every_rep"]:
            verdict += " (not in every rep)"
        lines.append(
            f"| {r['size_name']} | {r['label']} | {r['variant']} | "
            f"{fmt_stat(s, digits)} | {r['target']} | {verdict} |"
        )
    return lines


def results_sections(
    data: dict[str, Any], summ: dict[str, Any], unit: str, bound: str
) -> list[str]:
    """The report's per-size contender tables, its issue 7 targets and the RSS flatness line,
    the same for every network bench; ``unit`` names what a transfer moves at a time ("part",
    "chunk") and ``bound`` how its memory bound is written."""
    lines: list[str] = []
    for sn in size_names(data["runs"]):
        lines += [f"**{sn} random file, page cache dropped before each run**", ""]
        lines += [*contender_table(summ["table"], sn), ""]
    lines += [
        "**Targets of issue 7** (each ratio computed per repetition from contenders of the same "
        "repetition, then median [min-max]; speed = the peer's time / vmstore's time; peak RSS "
        f"bound: {bound} + 100 MiB; judged on the median)",
        "",
    ]
    lines += targets_markdown(summ["targets"])
    flat = [
        f"{vm}: {f['small']} {f['small_mib']:.0f} MiB -> {f['large']} {f['large_mib']:.0f} MiB "
        f"({'flat' if f['flat'] else '**not flat**'}: within one {unit}, "
        f"{f['slack_mib']:.0f} MiB)"
        for vm, f in summ["flat"].items()
        if f
    ]
    if flat:
        lines += ["", "Peak RSS from the smallest to the largest size: " + "; ".join(flat) + "."]
    return lines


def update_doc(doc: Path, start: str, end: str, heading: str, text: str) -> None:
    """Replace the text between the markers; append a section with them if absent."""
    body = doc.read_text() if doc.exists() else ""
    if start in body and end in body:
        head, rest = body.split(start, 1)
        _, tail = rest.split(end, 1)
        doc.write_text(f"{head}{start}\n{text}\n{end}{tail}")
        return
    sep = "" if not body or body.endswith("\n\n") else ("\n" if body.endswith("\n") else "\n\n")
    doc.write_text(f"{body}{sep}{heading}\n\n{start}\n{text}\n{end}\n")


def finish(
    a: Any,
    run: Callable[[], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
    doc_markers: tuple[str, str, str],
) -> None:
    """Run (or load with --report), save the JSON, print the markdown, update the doc."""
    if a.report:
        data = load_results(a.report)
    else:
        os.makedirs(a.workdir, exist_ok=True)
        meta = nfs.machine_info(a.workdir)
        meta.pop("nfs_py_sha256", None)
        meta["load_before"] = os.getloadavg()
        results = run()
        meta["load_after"] = os.getloadavg()
        builds = sorted({r.get("native", "") for r in results.get("runs", [])})
        meta["native_builds"] = builds
        if len(builds) > 1:
            results.setdefault("notes", []).append(
                f"the native core was rebuilt during the run ({len(builds)} builds: "
                "records carry which one)"
            )
        data = {"meta": meta, "args": dict(vars(a)), **results}
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(data, indent=1) + "\n")
            nfs.log(f"wrote {a.out}")
    text = markdown(data)
    print(text)
    if a.update_doc:
        update_doc(Path(a.update_doc), *doc_markers, text)
        nfs.log(f"updated {a.update_doc}")


def header_lines(data: dict[str, Any], server: str) -> list[str]:
    m = data["meta"]
    load = [r["load1"] for r in data["runs"]] or [0.0]
    cold = all(r.get("cold") for r in data["runs"])
    sizes = ", ".join(size_names(data["runs"]))
    return [
        f"Run {m['date']} on {m['nproc']} x {m['cpu_model']} "
        f"(sha_ni: {'yes' if m['sha_ni'] else 'no'}), {m['mem_gib']} GiB RAM, kernel "
        f"{m['kernel']}, files on `{m['filesystem']}`; server {server} on 127.0.0.1; sizes "
        f"{sizes}; {data['args']['reps']} repetitions, contenders interleaved in a shuffled "
        f"order per repetition; page cache "
        + (
            "**dropped before every run** (`sync; echo 3 > /proc/sys/vm/drop_caches`)"
            if cold
            else "**NOT dropped** for some runs: " + "; ".join(data.get("notes", []))
        )
        + "; 1-min load during the runs (server, client and whatever else shares the 2 cores): "
        f"median {statistics.median(load):.2f}, max {max(load):.2f}.",
    ]
