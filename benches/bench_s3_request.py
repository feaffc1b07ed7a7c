#!/usr/bin/env python3
"""What one S3 UploadPart costs the client in CPU, and how much of it botocore's client layer
is: the measurement behind "would a native S3 request path pay off?" (issue 7).

One ``rclone serve s3`` on 127.0.0.1 (tests/s3_servers.py), one process, one thread; for each
body size, rounds of ``--parts`` parts per contender, contenders interleaved per round:

  botocore upload_part  vmstore's own S3 client (S3Storage's, host policy installed), the
                        body a vmstore PartBody over the native buffer: what an upload does
                        today for every part
  bare signed PUT       the same request signed with botocore's S3SigV4Auth and sent through
                        the same client's URLLib3Session (same pools, same host policy), with
                        none of the client layer (no parameter validation, serialisation,
                        endpoint rules, event hooks, response parsing): the most a leaner
                        request path (Python or native) could save is botocore minus this
  socket sendall        the body's bytes alone to a loopback socket read by another process:
                        what any client pays to move them through the kernel (no HTTP)

Figures: CPU of the calling thread (``time.thread_time``) per part, median [min-max] over the
rounds; the server and the sink are other processes. The bodies are in memory (this measures
the request path, not the disk).

    python benches/bench_s3_request.py [--sizes 64K,10M] [--parts 40] [--rounds 5] [--out F.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT / "tests"), str(ROOT / "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_nfs as nfs  # noqa: E402 - sizes, machine info
import coldbench as cb  # noqa: E402 - the loopback sink of the floor contender
import s3_servers  # noqa: E402
from botocore.auth import S3SigV4Auth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from vmstore import StorageConfig  # noqa: E402
from vmstore._upload import PartBody  # noqa: E402
from vmstore.backends.s3 import S3Storage  # noqa: E402

CONTENDERS = ("botocore upload_part", "bare signed PUT", "socket sendall")


def per_part(run: Callable[[int], None], parts: int) -> float:
    """CPU-seconds of this thread per call of ``run(number)``, for part numbers 1..``parts``
    (the same bytes again each round: rclone keeps an upload's parts in memory, and refuses to
    replace a part with other bytes)."""
    start = time.thread_time()
    for number in range(1, parts + 1):
        run(number)
    return (time.thread_time() - start) / parts


class Parts:
    """One open multipart upload on the server, and the three ways of sending a part to it."""

    def __init__(
        self, server: s3_servers.S3Server, storage: S3Storage, sink: socket.socket
    ) -> None:
        self.server, self.sink = server, sink
        self.client = storage._client
        self.key = "bench/request-cost"
        self.upload_id = ""
        self.session = self.client._endpoint.http_session
        self.credentials = self.client._request_signer._credentials
        self.base = f"{server.endpoint}/{server.bucket}/{quote(self.key, safe='/~')}"

    def start(self) -> None:
        """A new multipart upload (one per body size), the previous one aborted."""
        self.abort()
        created = self.client.create_multipart_upload(Bucket=self.server.bucket, Key=self.key)
        self.upload_id = created["UploadId"]

    def botocore_part(self, body: memoryview, number: int) -> None:
        self.client.upload_part(
            Bucket=self.server.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=PartBody(body),
        )

    def bare_part(self, body: memoryview, number: int) -> None:
        url = f"{self.base}?partNumber={number}&uploadId={quote(self.upload_id, safe='')}"
        request = AWSRequest(
            "PUT", url, data=PartBody(body), headers={"Content-Length": str(len(body))}
        )
        request.context["client_config"] = self.client.meta.config
        frozen = self.credentials.get_frozen_credentials()
        S3SigV4Auth(frozen, "s3", self.client.meta.region_name).add_auth(request)
        response = self.session.send(request.prepare())
        if response.status_code != 200:
            raise SystemExit(f"bare PUT: HTTP {response.status_code}: {response.content!r}")

    def socket_part(self, body: memoryview, _number: int) -> None:
        self.sink.sendall(body)

    def abort(self) -> None:
        if not self.upload_id:
            return
        self.client.abort_multipart_upload(
            Bucket=self.server.bucket, Key=self.key, UploadId=self.upload_id
        )


def measure(parts: Parts, sizes: list[int], count: int, rounds: int) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {}
    for size in sizes:
        body = memoryview(bytearray(os.urandom(size)))
        parts.start()
        runs = {
            "botocore upload_part": functools.partial(parts.botocore_part, body),
            "bare signed PUT": functools.partial(parts.bare_part, body),
            "socket sendall": functools.partial(parts.socket_part, body),
        }
        by_name: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        for _ in range(rounds):
            for name, run in runs.items():
                by_name[name].append(per_part(run, count))
        results[nfs.fmt_size(size)] = by_name
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="64K,10M", help="body sizes, comma-separated")
    parser.add_argument("--parts", type=int, default=40, help="parts per contender per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    sizes = [nfs.parse_size(s) for s in args.sizes.split(",")]

    config = {"type": "s3"}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="vmstore-bench-req-"))
        server = stack.enter_context(s3_servers.running_s3_server("rclone", Path(tmp)))
        config.update(
            endpoint=server.endpoint,
            access_key=server.access_key,
            secret_key=server.secret_key,
            bucket=server.bucket,
        )
        storage = stack.enter_context(contextlib.closing(S3Storage(StorageConfig(**config))))
        sink_server = subprocess.Popen(
            [sys.executable, "-c", cb._SINK], stdout=subprocess.PIPE, text=True
        )
        assert sink_server.stdout is not None
        port = int(sink_server.stdout.readline())
        stack.callback(sink_server.wait)
        sink = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        parts = Parts(server, storage, sink)
        stack.callback(parts.abort)
        results = measure(parts, sizes, args.parts, args.rounds)

    print(
        f"\nCPU of the calling thread per part, ms: median [min-max] of {args.rounds} rounds "
        f"of {args.parts} parts; rclone serve s3 on 127.0.0.1\n"
    )
    print("| body | " + " | ".join(CONTENDERS) + " | botocore - bare |")
    print("|---|" + "---|" * (len(CONTENDERS) + 1))
    for label, by_name in results.items():
        cells = []
        for name in CONTENDERS:
            ms = [v * 1e3 for v in by_name[name]]
            cells.append(f"{statistics.median(ms):.2f} [{min(ms):.2f}-{max(ms):.2f}]")
        pairs = zip(by_name["botocore upload_part"], by_name["bare signed PUT"], strict=True)
        saved = [(b - a) * 1e3 for b, a in pairs]
        cells.append(f"{statistics.median(saved):.2f} [{min(saved):.2f}-{max(saved):.2f}]")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.out:
        record = {
            "machine": nfs.machine_info(str(HERE)),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "parts": args.parts,
            "rounds": args.rounds,
            "seconds_per_part": results,
        }
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
