"""Fuzz targets over vmstore's parsers of untrusted input.

Each ``fuzz_<name>(data)`` turns fuzzer bytes into inputs for one parser and calls the
matching ``check_<name>(...)``, which asserts the parser's contract: it returns a value of
the documented kind (or the documented ``None``), or raises a :class:`StorageError`; any
other exception escapes and is a finding. The parsers:

- ``urls``: ``parse_nfs_url`` / ``parse_s3_url`` / ``parse_http_url`` / ``normalize_endpoint``
  and ``validate_url`` of an NFS, an S3 and an HTTP store (the public entry);
- ``sidecar``: ``Sidecar.from_json`` (``SidecarFormatError`` for anything not a sidecar;
  what it accepts survives a round trip);
- ``s3_state``: the S3 upload journal and completion record (``_StateFile.load`` and
  friends: the state or ``None``, never an exception);
- ``download_state``: the download state file (``_load_state`` then ``ChunkSet.from_runs``);
- ``http_headers``: what the HTTP backend reads from response headers (``_Head.parse``,
  ``advertised_sha256``, ``Retry-After``, dates, validators) and a ranged GET's
  ``Content-Range`` check (``_ObjectReader.read_range`` over a fake response).

``KNOWN_BUGS`` lists failures found here in code this branch may not change; a target
tolerates exactly those inputs (so fuzzing goes on finding others) and
``tests/test_fuzz_parsers.py`` holds one strict xfail per entry, which starts failing, as a
reminder to delete the entry, once the bug is fixed.

Run them with ``fuzz/run.sh`` (atheris, coverage-guided), or briefly through pytest.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import pkgutil
import posixpath
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from types import ModuleType
from typing import Any

from vmstore import StorageConfig, new_storage
from vmstore._parts import ChunkSet
from vmstore._retry import RetryableError
from vmstore._sidecar import Sidecar, SidecarFormatError
from vmstore.errors import StorageError
from vmstore.storage import Storage
from vmstore.urls import (
    S3_MAX_KEY_BYTES,
    S3Location,
    normalize_endpoint,
    parse_http_url,
    parse_nfs_url,
    parse_s3_url,
    url_scheme,
)

# --- where the parsers live ---------------------------------------------------------------


def _modules(package: str) -> Iterator[ModuleType]:
    module = importlib.import_module(package)
    yield module
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), f"{package}."):
        yield importlib.import_module(info.name)


@cache
def http_name(name: str) -> Any:
    """``name`` from the HTTP backend, a module today and a package by concern after its
    split (same import path): looked up in the package and its submodules."""
    for module in _modules("vmstore.backends.http"):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"vmstore.backends.http has no {name}")


def s3_name(name: str) -> Any:
    return getattr(importlib.import_module("vmstore.backends.s3"), name)


# --- a private place to work --------------------------------------------------------------


@dataclass(frozen=True)
class _Workspace:
    root: str
    share: str
    state_dir: str
    stores: tuple[Storage, ...]


@cache
def workspace() -> _Workspace:
    """A temporary NFS share and state directory, and one store per backend for
    ``validate_url``. Nothing is contacted: 127.0.0.1:9 is never used."""
    root = tempfile.mkdtemp(prefix="vmstore-fuzz-")
    share = os.path.join(root, "share")
    state_dir = os.path.join(root, "state")
    os.makedirs(share)
    os.makedirs(state_dir)
    stores: list[Storage] = [new_storage(StorageConfig(type="nfs", endpoint=share))]
    stores.append(new_storage(StorageConfig(type="http", endpoint="http://127.0.0.1:9/base")))
    s3 = StorageConfig(
        type="s3",
        endpoint="http://127.0.0.1:9",
        bucket="fuzz",
        access_key="fuzz",
        secret_key="fuzz-secret",
        use_ssl=False,
    )
    with contextlib.suppress(StorageError):  # boto3 missing: the S3 store is left out
        stores.append(new_storage(s3))
    return _Workspace(root, share, state_dir, tuple(stores))


@contextlib.contextmanager
def private_state_dir() -> Iterator[str]:
    """VMSTORE_STATE_DIR pointing at the workspace's state directory, for the block only."""
    path = workspace().state_dir
    saved = os.environ.get("VMSTORE_STATE_DIR")
    os.environ["VMSTORE_STATE_DIR"] = path
    try:
        yield path
    finally:
        if saved is None:
            del os.environ["VMSTORE_STATE_DIR"]
        else:
            os.environ["VMSTORE_STATE_DIR"] = saved


# --- known bugs in code this branch may not edit --------------------------------------------


def _non_ascii_digits(text: str) -> bool:
    """str.isdigit() is true, int()/float() refuse it: '²', '³', '¹' (Latin-1 superscripts,
    which a header can carry) and other Unicode digits."""
    text = text.strip()
    return text.isdigit() and not (text.isascii() and text.isdecimal())


KNOWN_BUGS: dict[str, str] = {}


def _known(bug: str, when: bool) -> bool:
    return when and bug in KNOWN_BUGS


# --- urls --------------------------------------------------------------------------------


def check_urls(url: str, mount: str, bucket: str, endpoint: str, use_ssl: bool) -> None:
    """URL parsing: a well-formed result, or InvalidConfigError / PermissionDeniedError."""
    assert isinstance(url_scheme(url), str)
    try:
        path = parse_nfs_url(url, [mount])
    except StorageError:
        pass
    else:
        assert isinstance(path, str) and path
        normalized = posixpath.normpath(path)
        if posixpath.isabs(path):
            assert normalized.startswith(posixpath.normpath(mount).rstrip("/") + "/"), path
        else:
            assert normalized != ".." and not normalized.startswith("../"), path
    try:
        location = parse_s3_url(url, default_bucket=bucket, endpoint=endpoint, use_ssl=use_ssl)
    except StorageError:
        pass
    else:
        assert isinstance(location, S3Location)
        assert location.bucket and location.key and not location.key.endswith("/")
        assert len(location.key.encode("utf-8")) <= S3_MAX_KEY_BYTES
    try:
        absolute = parse_http_url(url, endpoint=endpoint, use_ssl=use_ssl)
    except StorageError:
        pass
    else:
        assert url_scheme(absolute) in ("http", "https"), absolute
    try:
        normalized_endpoint = normalize_endpoint(endpoint, use_ssl=use_ssl)
    except StorageError:
        pass
    else:
        assert normalized_endpoint == "" or url_scheme(normalized_endpoint) in ("http", "https")
    for store in workspace().stores:
        with contextlib.suppress(StorageError):
            store.validate_url(url)


_URL_PREFIXES = ["", "/", "nfs://", "s3://", "http://", "https://", "HTTPS://", "ftp://"]
_ENDPOINTS = ["", "http://127.0.0.1:9", "https://s3.example.test", "127.0.0.1:9/base"]


def fuzz_urls(data: bytes) -> None:
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    prefix = fdp.PickValueInList(_URL_PREFIXES)
    use_ssl = fdp.ConsumeBool()
    endpoint = fdp.PickValueInList(_ENDPOINTS)
    if fdp.ConsumeBool():
        endpoint = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))
    bucket = fdp.PickValueInList(["", "bucket"])
    # Mostly the share's own path (absolute URLs inside it), sometimes anything.
    mount = workspace().share if fdp.ConsumeBool() else "/" + fdp.ConsumeUnicode(8)
    url = prefix + fdp.ConsumeUnicode(fdp.remaining_bytes())
    if prefix == "/" and fdp.ConsumeBool():
        url = mount + url
    check_urls(url, mount, bucket, endpoint, use_ssl)


# --- sidecar -------------------------------------------------------------------------------


def check_sidecar(text: str | bytes, size: int | None, etag: str | None, mtime_ns: int) -> None:
    """Sidecar.from_json: a Sidecar that survives a round trip, or SidecarFormatError."""
    try:
        sidecar = Sidecar.from_json(text)
    except SidecarFormatError:
        return
    assert isinstance(sidecar, Sidecar)
    assert Sidecar.from_json(sidecar.to_json()) == sidecar, sidecar
    assert Sidecar.from_json(sidecar.to_bytes()) == sidecar, sidecar
    why = sidecar.mismatch(size=size, etag=etag, mtime_ns=mtime_ns, upload_token=etag)
    assert why is None or isinstance(why, str)
    assert sidecar.describes(size=sidecar.size, etag=sidecar.etag or None, mtime_ns=None)


def fuzz_sidecar(data: bytes) -> None:
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    size = fdp.ConsumeIntInRange(-1, 1 << 40)
    etag = fdp.PickValueInList([None, "", '"abc"', 'W/"abc"'])
    mtime_ns = fdp.ConsumeInt(8)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    # As bytes (how backends read a sidecar) and as text (both are documented inputs).
    check_sidecar(raw, None if size < 0 else size, etag, mtime_ns)
    check_sidecar(raw.decode("utf-8", "replace"), None if size < 0 else size, etag, mtime_ns)


# --- the S3 upload journal and completion record ---------------------------------------------


def check_s3_state(content: bytes) -> None:
    """The journal readers: the state (or record, or upload id), or None; never an exception."""
    with private_state_dir():
        _check_s3_state(content)


def _check_s3_state(content: bytes) -> None:
    location = S3Location("bucket", "key")
    state_file = s3_name("_StateFile")("/fuzz/source.img", location)
    with open(state_file.path, "wb") as handle:
        handle.write(content)
    try:
        state = state_file.load()
        assert state is None or isinstance(state, s3_name("_UploadState"))
        if state is not None:
            assert all(isinstance(n, int) for n in state.parts)
            assert all(
                isinstance(etag, str) and isinstance(crc, int) for etag, crc in state.parts.values()
            )
        upload_id = state_file.load_any_upload_id()
        assert upload_id is None or isinstance(upload_id, str)
        completed = state_file.load_completed()
        assert completed is None or isinstance(completed, s3_name("_CompletedUpload"))
        found = s3_name("_state_files_for")(location)
        assert isinstance(found, list)
    finally:
        os.remove(state_file.path)


_S3_SEEDS = [
    b'{"version": 2, "bucket": "bucket", "key": "key", "upload_id": "u", "token": "t", '
    b'"source": "/fuzz/source.img", "size": 10, "mtime_ns": 1, "part_size": 5, '
    b'"checksum": "crc64nvme"}\n[1, "\\"e1\\"", 12345]\n[2, "\\"e2\\"", 6789]\n',
    b'{"version": 2, "completed": true, "bucket": "bucket", "key": "key", "source": "/s", '
    b'"size": 1, "mtime_ns": 2, "etag": "e", "sha256": "' + b"a" * 64 + b'", "token": ""}\n',
]


def fuzz_s3_state(data: bytes) -> None:
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    seed = fdp.PickValueInList([b"", *_S3_SEEDS])
    content = fdp.ConsumeBytes(fdp.remaining_bytes())
    if seed and content:
        # Splice the fuzzer's bytes into a valid journal: a torn or altered line.
        cut = len(content) % len(seed)
        content = seed[:cut] + content
    check_s3_state(content or seed)


# --- the download state file ----------------------------------------------------------------


def check_download_state(content: bytes, last: int) -> None:
    """_load_state: a dict or None; the resumed chunk set only ever holds chunks 1..last."""
    load_state = importlib.import_module("vmstore._download")._load_state
    path = os.path.join(workspace().state_dir, "download-fuzz.state")
    with open(path, "wb") as handle:
        handle.write(content)
    try:
        try:
            state = load_state(path)
        except RecursionError:
            if _known("download-state-deep-json", True):
                return
            raise
        assert state is None or isinstance(state, dict)
        if state is None:
            return
        done = ChunkSet.from_runs(state.get("done"), last)
        assert all(1 <= n <= last for n in done), done.runs()
    finally:
        os.remove(path)


def fuzz_download_state(data: bytes) -> None:
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    last = fdp.ConsumeIntInRange(0, 1000)
    check_download_state(fdp.ConsumeBytes(fdp.remaining_bytes()), last)


# --- HTTP response headers ------------------------------------------------------------------

_HEADER_NAMES = [
    "Content-Length",
    "Content-Range",
    "Content-Type",
    "ETag",
    "Last-Modified",
    "Accept-Ranges",
    "Retry-After",
    "X-Checksum-SHA256",
    "Repr-Digest",
    "Digest",
    "X-Vmstore-Meta-Vm-Name",
    "Content-Encoding",
]


def _headers(pairs: list[tuple[str, str]]) -> Any:
    from requests.structures import CaseInsensitiveDict

    headers: Any = CaseInsensitiveDict()
    for name, value in pairs:
        headers[name] = value
    return headers


def check_http_headers(pairs: list[tuple[str, str]], ranged: bool) -> None:
    """What the HTTP backend reads from headers: well-formed values or None, never raising."""
    headers = _headers(pairs)
    retry_after = headers.get("Retry-After", "")
    length = headers.get("Content-Range", "").rpartition("/")[2] if ranged else headers.get(
        "Content-Length", ""
    )
    try:
        head = http_name("_Head").parse(headers, ranged=ranged)
    except ValueError:
        if _known("http-unicode-digits", _non_ascii_digits(length)):
            return
        if _known("http-long-digits", length.isdigit() and len(length) > 4300):
            return
        raise
    assert head.size is None or (isinstance(head.size, int) and head.size >= 0)
    assert head.checksum is None or (
        len(head.checksum) == 64 and set(head.checksum) <= set("0123456789abcdef")
    )
    assert isinstance(head.metadata, dict) and isinstance(head.content_type, str)
    assert isinstance(head.validator.request_headers(), dict)
    assert isinstance(head.validator.changed(headers), bool)
    try:
        seconds = http_name("_retry_after")(retry_after)
    except ValueError:
        if _known("http-unicode-digits", _non_ascii_digits(retry_after)):
            return
        raise
    assert seconds is None or (isinstance(seconds, float) and not math.isnan(seconds))
    assert seconds is None or seconds >= 0
    when = http_name("_http_date")(headers.get("Last-Modified", ""))
    assert when is None or (isinstance(when, datetime) and when.tzinfo is not None)


class _FakeRaw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def read(self, n: int, decode_content: bool = False) -> bytes:
        data, self._body = self._body[:n], self._body[n:]
        return data


class _FakeResponse:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.reason = "fuzz"
        self.raw = _FakeRaw(body)

    def close(self) -> None:
        pass


class _FakeTransport:
    def __init__(self, response: _FakeResponse) -> None:
        self.response = response

    def send(self, method: str, url: str, **kwargs: Any) -> _FakeResponse:
        return self.response


def check_ranged_get(
    status: int, pairs: list[tuple[str, str]], body: bytes, size: int, start: int, end: int
) -> None:
    """A ranged GET over any response: exactly the bytes asked for, or a retry / a status
    error / a StorageError (the backend's retry loop maps those), nothing else."""
    validator = http_name("_Validator")('"v1"', "")
    reader = http_name("_ObjectReader")(
        _FakeTransport(_FakeResponse(status, _headers(pairs), body)),
        "http://127.0.0.1:9/f",
        size,
        validator,
    )
    try:
        data = reader.read_range(start, end)
    except (RetryableError, StorageError, http_name("HttpStatusError")):
        return
    except ValueError:
        retry_after = _headers(pairs).get("Retry-After", "")
        if _known("http-unicode-digits", _non_ascii_digits(retry_after)):
            return
        raise
    assert isinstance(data, bytes) and len(data) == end - start


def _latin1_value(fdp: Any, limit: int) -> str:
    # What http.client hands requests: Latin-1 text, one line.
    text = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, limit)).decode("latin-1")
    return text.replace("\r", "").replace("\n", "")


def _header_pairs(fdp: Any) -> list[tuple[str, str]]:
    pairs = []
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        name = fdp.PickValueInList(_HEADER_NAMES)
        if fdp.ConsumeProbability() < 0.1:
            name = "X-Vmstore-Meta-" + _latin1_value(fdp, 8)
        pairs.append((name, _latin1_value(fdp, 48)))
    return pairs


def fuzz_http_headers(data: bytes) -> None:
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    ranged = fdp.ConsumeBool()
    check_http_headers(_header_pairs(fdp), ranged)
    size = fdp.ConsumeIntInRange(1, 1 << 20)
    start = fdp.ConsumeIntInRange(0, size - 1)
    end = fdp.ConsumeIntInRange(start + 1, size)
    status = fdp.PickValueInList([200, 206, 206, 206, 304, 412, 416, 500, 503])
    pairs = _header_pairs(fdp)
    if fdp.ConsumeBool():
        pairs.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
    body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    if fdp.ConsumeBool():
        body = bytes(end - start)
    check_ranged_get(status, pairs, body, size, start, end)


# --- the registry -------------------------------------------------------------------------

TARGETS: Mapping[str, Callable[[bytes], None]] = {
    "urls": fuzz_urls,
    "sidecar": fuzz_sidecar,
    "s3_state": fuzz_s3_state,
    "download_state": fuzz_download_state,
    "http_headers": fuzz_http_headers,
}

SEEDS: Mapping[str, list[bytes]] = {
    "urls": [b"\x00\x01bucket/dir/disk.qcow2", b"\x02\x00\x00\x00../../etc/passwd"],
    "sidecar": [
        json.dumps(
            {
                "version": 2,
                "sha256": "a" * 64,
                "size": 3,
                "etag": "1-2-3",
                "mtime_ns": 5,
                "content_type": "application/octet-stream",
                "metadata": {"vm-name": "x"},
                "uploaded_at": "2026-01-01T00:00:00Z",
                "upload_token": "tok",
            }
        ).encode(),
        b'{"sha256": "' + b"B" * 64 + b'", "size": 0}',
    ],
    "s3_state": [b"\x01" + seed for seed in _S3_SEEDS],
    "download_state": [
        b'\x00\x0a{"version": 1, "url": "u", "etag": "e", "size": 9, "chunk_size": 3, '
        b'"done": [[1, 2], [3, 99], [0, -5], "x"]}'
    ],
    "http_headers": [b"\x01\x03\x00Content-Length\x0512345"],
}
