"""S3 backend: boto3 speaks the protocol, the native core touches every byte.

Upload (multipart above one part): one native pass computes the whole-file SHA-256 and each
part's SHA-256; CreateMultipartUpload stores the whole-file digest as user metadata
``sha256``; parts go up concurrently, each re-read from the source and re-hashed as it is
sent (a source that changed since the first pass is refused) and carrying its
``x-amz-checksum-sha256`` for servers that check it; Complete, or Abort on failure unless
the upload may be resumed. Download: see :mod:`vmstore._download`.

A URL naming another bucket than the configured one (``s3://other/key``) uses that bucket:
the bucket in a URL is explicit, never folded into the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mimetypes
import os
import threading
import uuid
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions

from vmstore import _logredact, _many, _native, images
from vmstore._bodyread import http_client_response, read_into_buffer
from vmstore._codec import (
    ENCODING_METADATA_KEY,
    EncodedPart,
    Encoder,
    Encoding,
    FramePart,
    FrameRecord,
    GroupingChanged,
    encode_parts,
    group_frames,
    missing_record,
    store_key,
    verify_stored_frames,
)
from vmstore._download import DownloadSettings, RemoteObject, S3Checksum, download_object
from vmstore._failure import keeps_partial
from vmstore._hostpolicy import HostPolicy, install_on_boto3_client, refusal_in
from vmstore._incomplete import cutoff, known_downloads, remove_download, state_dir
from vmstore._oserrors import storage_error_from_oserror
from vmstore._parts import S3_MIN_PART
from vmstore._ratelimit import Pacer, StopSignal, limiter_for, pacer_for
from vmstore._retry import RetryableError, RetryPolicy
from vmstore._sidecar import MAX_SIDECAR_BYTES, SIDECAR_SUFFIX, Sidecar, SidecarFormatError
from vmstore._upload import (
    CallbackAbort,
    PartBody,
    PartFeed,
    SourcePlan,
    check_stored_size,
    crc64nvme_b64,
    part_view,
    plan_source,
    progress_for,
    s3_part_size_for,
    send_parts,
    sha256_b64,
    unwrap,
)
from vmstore.config import StorageConfig
from vmstore.errors import (
    CancelledError,
    ChecksumMismatchError,
    InvalidConfigError,
    NetworkError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    StorageError,
)
from vmstore.models import (
    DEFAULT_CONTENT_TYPE,
    SHA256_KEY,
    DownloadRequest,
    DownloadResponse,
    FileMetadata,
    IncompleteTransfer,
    UploadRequest,
    UploadResponse,
    normalize_custom_metadata,
    parse_sha256_hex,
)
from vmstore.urls import S3Location, normalize_endpoint, parse_s3_url, s3_url

log = logging.getLogger("vmstore.s3")

DEFAULT_CHUNK_SIZE = 10 << 20
MAX_PRESIGN_SECONDS = 7 * 24 * 3600

_NOT_FOUND = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "401",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}
_BAD_DIGEST = {"BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest", "InvalidChecksum"}
_THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}
_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    ConnectionError,
    TimeoutError,
)


def _error_code(exc: botocore.exceptions.ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


def classify_retry(exc: BaseException) -> RetryableError | None:
    """The transient S3 failures worth another attempt."""
    if isinstance(exc, StorageError) or refusal_in(exc) is not None:
        return None
    if isinstance(exc, botocore.exceptions.ClientError):
        code, status = _error_code(exc)
        if code in _THROTTLED or status >= 500 or status == 429:
            return RetryableError(f"{code or status}")
        return None
    if isinstance(exc, _TRANSIENT_EXCEPTIONS):
        return RetryableError(type(exc).__name__)
    # urllib3's errors surface unwrapped when a streaming body is read.
    module = type(exc).__module__
    if module.startswith(("urllib3", "http.client")):
        return RetryableError(type(exc).__name__)
    return None


def is_backend_error(exc: BaseException) -> bool:
    """Whether exc came from talking to S3 (and so is ours to translate)."""
    return (
        isinstance(
            exc,
            botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError | RetryableError,
        )
        or classify_retry(exc) is not None
    )


def storage_error(exc: BaseException, action: str, location: S3Location) -> StorageError:
    """The one mapping from a boto3/botocore failure onto vmstore's error types."""
    where = s3_url(location)
    if isinstance(exc, StorageError):
        return exc
    refused = refusal_in(exc)  # the host policy's, wrapped by botocore in HTTPClientError
    if refused is not None:
        return refused
    if isinstance(exc, botocore.exceptions.ClientError):
        code, status = _error_code(exc)
        if code == "NoSuchBucket":
            return NotFoundError(
                f"could not {action} {where}: bucket {location.bucket!r} does not exist; "
                "create it or fix StorageConfig.bucket / the URL",
                cause=exc,
            )
        if code in _NOT_FOUND or status == 404:
            return NotFoundError(f"could not {action} {where}: no such object", cause=exc)
        if code in _DENIED or status in (401, 403):
            return PermissionDeniedError(
                f"could not {action} {where}: access denied ({code or status}); check the "
                "access key, secret key and the bucket's policy",
                cause=exc,
            )
        if code in _BAD_DIGEST:
            return ChecksumMismatchError(
                f"could not {action} {where}: the server rejected the bytes' checksum ({code})",
                cause=exc,
            )
        if code == "PreconditionFailed" or status == 412:
            return OperationFailedError(
                f"could not {action} {where}: the object changed during the transfer; retry",
                cause=exc,
            )
        if code in _THROTTLED or status >= 500:
            return NetworkError(
                f"could not {action} {where}: the server kept failing ({code or status}) "
                "after all retries; try again later",
                cause=exc,
            )
        return OperationFailedError(f"could not {action} {where}: {code or status}", cause=exc)
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return InvalidConfigError(
            f"could not {action} {where}: no S3 credentials found; set access_key/secret_key "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or configure a profile or role",
            cause=exc,
        )
    if isinstance(exc, botocore.exceptions.SSLError):
        return NetworkError(
            f"could not {action} {where}: TLS verification failed; set ca_bundle, or "
            "insecure_skip_verify for a test server",
            cause=exc,
        )
    if classify_retry(exc) is not None:
        return NetworkError(
            f"could not {action} {where}: {type(exc).__name__} after all retries; check the "
            "endpoint and network, then retry",
            cause=exc,
        )
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return OperationFailedError(f"could not {action} {where}: {exc}", cause=exc)
    if isinstance(exc, OSError):
        return storage_error_from_oserror(exc, action, where)
    return OperationFailedError(f"could not {action} {where}: {exc}", cause=exc)


def _b64(hex_digest: str) -> str:
    return sha256_b64(hex_digest)


def _strip_etag(etag: str) -> str:
    return etag.strip('"')


def _lower_metadata(metadata: dict[str, str]) -> dict[str, str]:
    # Servers differ in the case of user-metadata keys (rclone title-cases them).
    return {key.lower(): value for key, value in metadata.items()}


def _state_dir() -> str:
    return state_dir()


UPLOAD_TOKEN_KEY = "vmstore-upload"
"""User metadata naming the upload that wrote an object: its companion sidecar carries the same
token, so a sidecar is believed only for the object it was written for."""

STATE_VERSION = 2
"""2: the whole-object SHA-256 is computed during the upload; parts journal their CRC-64/NVME."""

CHECKSUM_CRC64NVME = "crc64nvme"
CHECKSUM_SHA256 = "sha256"


@dataclass
class _UploadState:
    """What an interrupted multipart upload needs to continue (the journal's first line)."""

    bucket: str
    key: str
    upload_id: str
    token: str
    source: str
    size: int
    mtime_ns: int
    part_size: int
    checksum: str
    """Per-part checksum algorithm the parts were sent with (CHECKSUM_*)."""
    parts: dict[int, tuple[str, int]] = field(default_factory=dict)
    """part number -> (ETag, CRC-64/NVME) of parts the server confirmed (of the stored frame
    when encoded)."""
    encoding: dict[str, Any] | None = None
    """An encoded upload's parameters: compression, salt and key check (never the key)."""
    frames: dict[int, tuple[FrameRecord, ...]] = field(default_factory=dict)
    """Encoded: part number -> the frames the part holds (a part gathers frames up to S3's
    5 MiB minimum)."""

    def header(self) -> dict[str, Any]:
        header = self._header()
        if self.encoding is not None:
            header["encoding"] = self.encoding
        return header

    def _header(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "bucket": self.bucket,
            "key": self.key,
            "upload_id": self.upload_id,
            "token": self.token,
            "source": self.source,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "part_size": self.part_size,
            "checksum": self.checksum,
        }

    @classmethod
    def from_header(cls, data: object) -> _UploadState:
        if not isinstance(data, dict):
            raise ValueError("the state header is not a JSON object")
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"state version {data.get('version')!r}")
        return cls(
            bucket=str(data["bucket"]),
            key=str(data["key"]),
            upload_id=str(data["upload_id"]),
            token=str(data["token"]),
            source=str(data["source"]),
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            part_size=int(data["part_size"]),
            checksum=str(data["checksum"]),
            encoding=data["encoding"] if isinstance(data.get("encoding"), dict) else None,
        )

    def line(self, number: int) -> str:
        etag, crc = self.parts[number]
        if number in self.frames:
            frames = [frame.to_list() for frame in self.frames[number]]
            return json.dumps([number, etag, crc, frames]) + "\n"
        return _part_line(number, (etag, crc))


@dataclass(frozen=True)
class _CompletedUpload:
    """A finished upload of a file (kept so an unchanged file is not sent again)."""

    bucket: str
    key: str
    source: str
    size: int
    mtime_ns: int
    etag: str
    sha256: str
    token: str = ""
    """The multipart upload's token (its ETag is not stable on every server: rclone's Complete
    and HEAD give different ones); "" for a single PUT, which is known by its ETag."""
    encoding: dict[str, Any] | None = None
    """How the upload was encoded (compression, salt, key check), None when stored plain: an
    upload asking for another encoding, or with another key, is not "already uploaded"."""

    def to_json(self) -> str:
        return json.dumps({"version": STATE_VERSION, "completed": True, **self.__dict__})

    @classmethod
    def from_json(cls, text: str) -> _CompletedUpload:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError("not a completed-upload record")
        return cls(
            bucket=str(data["bucket"]),
            key=str(data["key"]),
            source=str(data["source"]),
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            etag=str(data["etag"]),
            sha256=parse_sha256_hex(str(data["sha256"]), "recorded sha256"),
            token=str(data.get("token", "")),
            encoding=data["encoding"] if isinstance(data.get("encoding"), dict) else None,
        )


_UNREADABLE = (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError,
               RecursionError)
"""What reading a state file's JSON into values can raise: a state file is input, and one that
is not what vmstore wrote is ignored (json: ValueError, RecursionError for deep nesting; int():
OverflowError for 1e999, ValueError for NaN; a non-object: AttributeError, TypeError)."""


class _StateFile:
    """The resume state of one (source file, destination) upload, kept as a journal.

    The first line describes the upload and is written atomically (temp file, rename); every
    part stored after that appends one line, so saving after each part costs the same at part
    9,999 as at part 1. A line torn by a crash is skipped on load: that part is sent again.
    Once the upload completes the journal is replaced by a one-line completion record.
    """

    def __init__(self, source: str, location: S3Location) -> None:
        ident = hashlib.sha256(f"{source}\0{location.bucket}\0{location.key}".encode()).hexdigest()
        self.path = os.path.join(_state_dir(), f"s3-upload-{ident[:40]}.json")
        self._journaled: set[int] = set()
        self._started = False

    def _lines(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                return handle.read().splitlines()
        except (OSError, UnicodeDecodeError):
            return []

    def load(self) -> _UploadState | None:
        lines = self._lines()
        try:
            state = _UploadState.from_header(json.loads(lines[0]))
        except _UNREADABLE:
            return None
        for line in lines[1:]:
            try:
                number, etag, crc, *frames = json.loads(line)
                if frames:
                    state.frames[int(number)] = tuple(map(FrameRecord.from_list, frames[0]))
                state.parts[int(number)] = (str(etag), int(crc))
            except _UNREADABLE:
                continue
        return state

    def load_any_upload_id(self) -> str | None:
        """The UploadId recorded by any state version (to abort what an older one left)."""
        lines = self._lines()
        try:
            upload_id = json.loads(lines[0]).get("upload_id")
        except _UNREADABLE:
            return None
        return str(upload_id) if upload_id else None

    def load_completed(self) -> _CompletedUpload | None:
        lines = self._lines()
        try:
            return _CompletedUpload.from_json(lines[0]) if len(lines) == 1 else None
        except (*_UNREADABLE, InvalidConfigError):
            return None

    def _write_atomically(self, text: str) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        temp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(temp, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temp)
            raise

    def save(self, state: _UploadState) -> None:
        """Record ``state``: all of it the first time, then the parts not recorded yet."""
        if not self._started:
            self._write_atomically(
                json.dumps(state.header())
                + "\n"
                + "".join(state.line(n) for n in sorted(state.parts))
            )
            self._journaled = set(state.parts)
            self._started = True
            return
        fresh = state.parts.keys() - self._journaled
        if fresh:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.writelines(state.line(n) for n in sorted(fresh))
            self._journaled.update(fresh)

    def complete(self, record: _CompletedUpload) -> None:
        self._started = False
        self._write_atomically(record.to_json() + "\n")

    def remove(self) -> None:
        self._started = False
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def _part_line(number: int, part: tuple[str, int]) -> str:
    return json.dumps([number, *part]) + "\n"


def _state_files_for(location: S3Location) -> list[str]:
    """Journal and completion records in the state directory that name ``location``."""
    directory = _state_dir()
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        if not (name.startswith("s3-upload-") and name.endswith(".json")):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as handle:
                first = json.loads(handle.readline())
        except (OSError, *_UNREADABLE):
            continue
        if (
            isinstance(first, dict)
            and first.get("bucket") == location.bucket
            and first.get("key") == location.key
        ):
            found.append(path)
    return found


class _S3ObjectReader:
    """Ranged GETs pinned to the ETag seen by HEAD; with a pacer, bodies are read off the
    socket block by block within the store's bandwidth limit."""

    def __init__(
        self, client: Any, location: S3Location, etag: str, pacer: Pacer | None = None
    ) -> None:
        self._client = client
        self._location = location
        self._etag = etag
        self._pacer = pacer
        self._buffers = _native.ChunkBuffers()  # this download's chunk memory, reused

    def read_range(self, start: int, end: int) -> bytes | memoryview:
        extra = {"IfMatch": self._etag} if self._etag else {}
        response = self._client.get_object(
            Bucket=self._location.bucket,
            Key=self._location.key,
            Range=f"bytes={start}-{end - 1}",
            **extra,
        )
        # Judge by Content-Range, not the status: rclone answers 200 with the right range.
        content_range = response.get("ContentRange")
        if content_range and not content_range.startswith(f"bytes {start}-{end - 1}/"):
            raise RetryableError(f"asked for bytes {start}-{end - 1}, got {content_range}")
        body = response["Body"]
        raw = getattr(body, "_raw_stream", None)
        fp = http_client_response(raw) if content_range else None
        try:
            if fp is not None:
                # Straight off the socket into this download's pooled buffer (_bodyread).
                return read_into_buffer(raw, fp, end - start, self._buffers, self._pacer)
            if self._pacer is not None:
                return self._pacer.read(body.read, end - start)
            data: bytes = body.read()
        finally:
            body.close()
        return data

    def read_stream(self) -> Iterable[bytes]:
        response = self._client.get_object(Bucket=self._location.bucket, Key=self._location.key)
        body = response["Body"]
        try:
            if self._pacer is None:
                yield from body.iter_chunks(1 << 20)
                return
            while True:
                self._pacer.take(self._pacer.block)
                block: bytes = body.read(self._pacer.block)
                if not block:
                    return
                yield block
        finally:
            body.close()


class S3Storage(_many.BatchTransfers):
    """Storage on S3 and S3-compatible servers (MinIO, Ceph RGW, rclone, moto, ...)."""

    def __init__(self, config: StorageConfig) -> None:
        self._config = config
        _logredact.install()  # no presigned URL's signature in urllib3/botocore logs
        self._chunk_size = config.chunk_size or DEFAULT_CHUNK_SIZE
        self._retry = RetryPolicy(max_retries=config.max_retries)
        self._endpoint = (
            normalize_endpoint(config.endpoint, use_ssl=config.use_ssl) if config.endpoint else ""
        )
        self._policy = HostPolicy.from_config(config)
        if self._endpoint:
            self._policy.check_host(urlsplit(self._endpoint).hostname or "")
        client_config = botocore.config.Config(
            signature_version="s3v4",
            # Custom endpoints rarely have wildcard DNS for virtual-hosted buckets.
            s3={
                "addressing_style": "path" if self._endpoint else "auto",
                # Every body carries vmstore's own x-amz-checksum-sha256, so botocore need
                # not hash it a third time for the signature (it already skips that on
                # HTTPS when a checksum header is present; this does the same on HTTP).
                "payload_signing_enabled": False,
            },
            # One retry policy for everything (vmstore's), so max_retries means what it says.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=config.timeout,
            read_timeout=config.timeout,
            max_pool_connections=config.concurrency + 4,
            tcp_keepalive=True,
            # vmstore sends its own SHA-256 per part and verifies whole objects itself;
            # some servers return a whole-object checksum on ranged GETs, which botocore's
            # default validation would reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        verify: bool | str = True
        if config.insecure_skip_verify:
            verify = False
        elif config.ca_bundle:
            verify = config.ca_bundle
        session = boto3.session.Session(
            aws_access_key_id=config.access_key or None,
            aws_secret_access_key=config.secret_key or None,
            aws_session_token=config.session_token or None,
            region_name=config.region or None,
        )
        try:
            self._client = session.client(
                "s3",
                endpoint_url=self._endpoint or None,
                region_name=config.region or "us-east-1",
                config=client_config,
                verify=verify,
                use_ssl=config.use_ssl,
            )
        except (botocore.exceptions.BotoCoreError, ValueError) as exc:
            raise InvalidConfigError(f"could not set up the S3 client: {exc}", cause=exc) from exc
        # Every connection resolves through the host policy and goes to the checked address.
        try:
            install_on_boto3_client(self._client, self._policy)
        except InvalidConfigError:
            self._client.close()
            raise
        self._closed = False
        self._limiter = limiter_for(config)
        # CRC-64/NVME per part until the server refuses it once (then SHA-256).
        self._checksum_algorithm = CHECKSUM_CRC64NVME

    # -- closing (with: _many.BatchTransfers) ---------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self._client.close()

    def __repr__(self) -> str:
        return f"S3Storage(endpoint={self._endpoint or 'AWS'!r}, bucket={self._config.bucket!r})"

    # -- URLs -----------------------------------------------------------------------------

    def _location(self, url: str) -> S3Location:
        return parse_s3_url(
            url,
            default_bucket=self._config.bucket,
            endpoint=self._endpoint,
            use_ssl=self._config.use_ssl,
        )

    def validate_url(self, url: str) -> None:
        self._location(url)

    def _call(self, action: str, location: S3Location, operation: Any, **kwargs: Any) -> Any:
        """One S3 request with retries; failures become StorageErrors."""

        def attempt() -> Any:
            body: Any = kwargs.get("Body")
            if hasattr(body, "seek"):
                # Every attempt sends the whole body: a failed one may have read part of it
                # (botocore's own retries rewind it; vmstore's replace them).
                body.seek(0)
            return operation(**kwargs)

        try:
            return self._retry.call(
                attempt,
                classify=classify_retry,
                describe=f"{action} {s3_url(location)}",
            )
        except Exception as exc:
            raise storage_error(exc, action, location) from exc

    # -- metadata / delete ----------------------------------------------------------------

    def _head(self, location: S3Location) -> dict[str, Any]:
        response: dict[str, Any] = self._call(
            "read metadata of",
            location,
            self._client.head_object,
            Bucket=location.bucket,
            Key=location.key,
            # The object's own S3 checksum, which verifies an object another tool uploaded.
            ChecksumMode="ENABLED",
        )
        return response

    def _companion(self, location: S3Location) -> S3Location:
        return S3Location(location.bucket, location.key + SIDECAR_SUFFIX)

    def _stored_sha256(self, location: S3Location, head: dict[str, Any]) -> str | None:
        return self._stored_record(location, head)[0]

    def _stored_record(
        self, location: S3Location, head: dict[str, Any]
    ) -> tuple[str | None, Sidecar | None]:
        """The SHA-256 vmstore recorded for the object HEAD described (or None), and the
        companion sidecar it came from (None for a single PUT, or when not believed).

        A single PUT carries it as metadata ``sha256`` (known before the PUT; so did every
        object of vmstore 0.1). A multipart upload learns it only after the last part, so it
        is in the companion sidecar ``<key>.vmstore.json``, which is believed only when it
        names the upload token the object itself carries, and the object's size.
        """
        metadata = _lower_metadata(head.get("Metadata", {}))
        recorded = metadata.get(SHA256_KEY)
        if recorded:
            return recorded.lower(), None
        token = metadata.get(UPLOAD_TOKEN_KEY)
        if not token:
            return None, None
        companion = self._companion(location)
        try:
            response = self._call(
                "read the checksum sidecar of",
                location,
                self._client.get_object,
                Bucket=companion.bucket,
                Key=companion.key,
            )
            body = response["Body"]
            try:
                text = body.read(MAX_SIDECAR_BYTES + 1)
            finally:
                body.close()
            sidecar = Sidecar.from_json(text)
        except NotFoundError:
            log.warning("%s has no checksum sidecar: its SHA-256 is unknown", s3_url(location))
            return None, None
        except SidecarFormatError as exc:
            log.warning("ignoring unreadable sidecar %s: %s", s3_url(companion), exc)
            return None, None
        why = sidecar.mismatch(
            size=int(head.get("ContentLength", -1)), etag=None, upload_token=token
        )
        if why is not None:
            # Another upload replaced the object after this sidecar's was written, or the
            # other way round: a checksum that may describe other bytes is worse than none.
            log.warning("ignoring sidecar %s: %s", s3_url(companion), why)
            return None, None
        return sidecar.sha256, sidecar

    def get_metadata(self, url: str) -> FileMetadata:
        location = self._location(url)
        head = self._head(location)
        custom = _lower_metadata(head.get("Metadata", {}))
        checksum, sidecar = self._stored_record(location, head)
        image_format, virtual_size = images.from_metadata(custom)
        if sidecar is not None and sidecar.image is not None:
            image_format, virtual_size = images.from_record(sidecar.image)
        custom.pop(SHA256_KEY, None)
        custom.pop(UPLOAD_TOKEN_KEY, None)
        for key in images.IMAGE_KEYS:
            custom.pop(key, None)
        encoded = custom.pop(ENCODING_METADATA_KEY, None)
        size = int(head.get("ContentLength", 0))
        if sidecar is not None and sidecar.encoding is not None:
            size = sidecar.size  # the image's, not the stored frames'
        elif encoded:
            log.warning("%s is stored encoded but its record is missing: size and checksum "
                        "describe the stored frames, not the image", s3_url(location))
        last_modified = head.get("LastModified") or datetime.now(UTC)
        if last_modified.tzinfo is None:
            last_modified = last_modified.replace(tzinfo=UTC)
        return FileMetadata(
            url=s3_url(location),
            size=size,
            checksum=checksum,
            etag=_strip_etag(head.get("ETag", "")),
            last_modified=last_modified.astimezone(UTC),
            content_type=head.get("ContentType") or DEFAULT_CONTENT_TYPE,
            custom_metadata=custom,
            image_format=image_format,
            virtual_size=virtual_size,
        )

    def _delete_key(self, location: S3Location, action: str) -> None:
        try:
            self._call(
                action,
                location,
                self._client.delete_object,
                Bucket=location.bucket,
                Key=location.key,
            )
        except NotFoundError as exc:
            if "bucket" in exc.message:
                raise
            # Cleanup is idempotent: a missing object is already deleted.

    def _open_uploads(self, location: S3Location) -> list[str]:
        """UploadIds of the multipart uploads still open for exactly this key."""
        ids: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": location.bucket, "Prefix": location.key}
        while True:
            response = self._call(
                "list unfinished uploads of",
                location,
                self._client.list_multipart_uploads,
                **kwargs,
            )
            ids += [
                str(upload["UploadId"])
                for upload in response.get("Uploads", [])
                if upload.get("Key") == location.key
            ]
            if not response.get("IsTruncated"):
                return ids
            kwargs["KeyMarker"] = response.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = response.get("NextUploadIdMarker", "")

    def delete(self, url: str) -> None:
        """Remove the object, its sidecar, every unfinished multipart upload to its key (whose
        stored parts would otherwise be kept, and billed, forever) and vmstore's resume state
        for it."""
        location = self._location(url)
        self._delete_key(location, "delete")
        self._delete_key(self._companion(location), "delete the checksum sidecar of")
        try:
            open_uploads = self._open_uploads(location)
        except StorageError as exc:
            # Some servers lack ListMultipartUploads: the object itself is gone.
            log.warning("could not list unfinished uploads of %s: %s", url, exc.message)
            open_uploads = []
        for upload_id in open_uploads:
            with contextlib.suppress(StorageError):
                self._call(
                    "abort an unfinished upload to",
                    location,
                    self._client.abort_multipart_upload,
                    Bucket=location.bucket,
                    Key=location.key,
                    UploadId=upload_id,
                )
        for path in _state_files_for(location):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    # -- what interrupted transfers left -------------------------------------------------

    def _prefix_location(self, prefix: str) -> S3Location:
        """Bucket and key prefix of a URL prefix ("" = the configured bucket, every key)."""
        if not prefix or prefix == "/":
            if not self._config.bucket:
                raise InvalidConfigError(
                    "a prefix naming the bucket is needed (s3://bucket/prefix): no bucket is "
                    "configured"
                )
            return S3Location(self._config.bucket, "")
        # A prefix is a URL that may end in "/" (a "directory"): parsed as the URL of an object
        # named with one more character, which is then taken off the key.
        location = self._location(prefix + "_")
        return S3Location(location.bucket, location.key[:-1])

    def _open_uploads_under(self, where: S3Location) -> list[IncompleteTransfer]:
        found = []
        kwargs: dict[str, Any] = {"Bucket": where.bucket, "Prefix": where.key}
        while True:
            response = self._call(
                "list unfinished uploads under",
                where,
                self._client.list_multipart_uploads,
                **kwargs,
            )
            for upload in response.get("Uploads", []):
                location = S3Location(where.bucket, str(upload["Key"]))
                upload_id = str(upload["UploadId"])
                stored, last_part = self._stored_parts(location, upload_id)
                # Its last part, not its start: a 200 GB upload started a week ago may still
                # be running (and moto reports every upload as started in 2010).
                modified = max(_aware(upload.get("Initiated")), last_part)
                found.append(
                    IncompleteTransfer(
                        url=s3_url(location),
                        kind="upload",
                        location=upload_id,
                        bytes_done=stored,
                        modified=modified,
                    )
                )
            if not response.get("IsTruncated"):
                return found
            kwargs["KeyMarker"] = response.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = response.get("NextUploadIdMarker", "")

    def _parts(self, location: S3Location, upload_id: str) -> Iterator[dict[str, Any]]:
        """Every part the server lists of an open upload, page by page (ListParts returns
        1,000 at most); NotFoundError once the upload is gone."""
        marker = 0
        while True:
            response = self._call(
                "list the parts of",
                location,
                self._client.list_parts,
                Bucket=location.bucket,
                Key=location.key,
                UploadId=upload_id,
                PartNumberMarker=marker,
            )
            yield from response.get("Parts", [])
            if not response.get("IsTruncated"):
                return
            marker = int(response.get("NextPartNumberMarker", 0))

    def _stored_parts(self, location: S3Location, upload_id: str) -> tuple[int, datetime]:
        """Bytes an open upload holds, and when its last part was stored."""
        total, latest = 0, datetime.min.replace(tzinfo=UTC)
        try:
            for part in self._parts(location, upload_id):
                total += int(part.get("Size", 0))
                latest = max(latest, _aware(part.get("LastModified")))
        except StorageError:
            pass  # what was counted before the listing failed
        return total, latest

    def list_incomplete(self, prefix: str = "") -> list[IncompleteTransfer]:
        where = self._prefix_location(prefix)
        uploads = self._open_uploads_under(where)
        downloads = known_downloads(s3_url(where))
        return sorted(uploads + downloads, key=lambda t: (t.url, t.kind, t.location))

    def cleanup_incomplete(self, older_than: float | timedelta) -> list[IncompleteTransfer]:
        """Abort unfinished multipart uploads started before the cutoff (in the configured
        bucket) and remove this host's stale download partials; returns what went."""
        before = cutoff(older_than)
        removed = []
        for transfer in self.list_incomplete():
            if transfer.modified > before:
                continue
            if transfer.kind == "download":
                if remove_download(transfer):
                    removed.append(transfer)
                continue
            location = self._location(transfer.url)
            with contextlib.suppress(NotFoundError):  # finished or aborted meanwhile
                self._call(
                    "abort an unfinished upload to",
                    location,
                    self._client.abort_multipart_upload,
                    Bucket=location.bucket,
                    Key=location.key,
                    UploadId=transfer.location,
                )
            for path in _state_files_for(location):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            removed.append(transfer)
        return removed

    # -- download -------------------------------------------------------------------------

    def download(self, request: DownloadRequest) -> DownloadResponse:
        location = self._location(request.source_url)
        head = self._head(location)
        etag = str(head.get("ETag", ""))
        checksum, sidecar = self._stored_record(location, head)
        encoding = sidecar.encoding if sidecar is not None else None
        if encoding is None and _lower_metadata(head.get("Metadata", {})).get(
            ENCODING_METADATA_KEY
        ):
            raise missing_record(s3_url(location))
        obj = RemoteObject(
            url=s3_url(location),
            size=encoding.plain_size if encoding else int(head.get("ContentLength", 0)),
            etag=etag,
            checksum=checksum,
            s3_checksum=_s3_checksum(head),
            encoding=encoding,
        )
        pacer = pacer_for(self._limiter, request.cancel)
        settings = DownloadSettings(
            chunk_size=self._chunk_size,
            concurrency=_many.concurrency_for(self._config.concurrency),
            retry=self._retry,
            classify=classify_retry,
            encryption_key=store_key(self._config.encryption_key),
            pacer=pacer,
        )
        try:
            return download_object(
                obj, _S3ObjectReader(self._client, location, etag, pacer), request, settings
            )
        except Exception as exc:
            # Only S3 and network failures are translated; anything else (a progress
            # callback's own exception) propagates unchanged.
            if not is_backend_error(exc):
                raise
            raise storage_error(exc, "download", location) from exc

    # -- upload ---------------------------------------------------------------------------

    def upload(self, request: UploadRequest) -> UploadResponse:
        """One pass over the source: see :mod:`vmstore._upload`.

        The first part decides the shape: a source that fits in one part is one PUT carrying
        its SHA-256 as metadata; anything larger is a multipart upload whose SHA-256 goes into
        the companion sidecar once the last part is read.
        """
        location = self._location(request.destination_url)
        metadata = normalize_custom_metadata(request.metadata)
        for reserved in (UPLOAD_TOKEN_KEY, ENCODING_METADATA_KEY):
            if reserved in metadata:
                raise InvalidConfigError(f"metadata key {reserved!r} is reserved for vmstore")
        if request.cancel is not None and request.cancel.is_cancelled:
            raise CancelledError(f"upload of {request.source_name} cancelled")
        plan = plan_source(request, s3_part_size_for(self._chunk_size))
        content_type = (
            request.content_type
            or (mimetypes.guess_type(plan.name)[0] if not plan.is_stream else None)
            or DEFAULT_CONTENT_TYPE
        )
        try:
            return _MultipartUpload(self, request, location, plan, metadata, content_type).run()
        except _ResumedPartDiffers as exc:
            # A stored part is not what the file now holds at its place (the journal and the
            # file's mtime agreed, so the parts themselves are suspect): start over once.
            log.warning("%s; starting the upload over", exc.message)
            plan = plan_source(request, s3_part_size_for(self._chunk_size))
            return _MultipartUpload(self, request, location, plan, metadata, content_type).run()

    # -- flexible checksums ---------------------------------------------------------------

    def _part_checksum(self) -> str:
        """The per-part checksum this server takes: CRC-64/NVME (with a FULL_OBJECT checksum
        at Complete, no second pass) unless it refused that once, then SHA-256."""
        return self._checksum_algorithm

    # -- many at once, and presigned URLs ---------------------------------------------------

    def _batch_destination(self, url: str) -> Hashable:
        """What ``upload_many`` compares to refuse two items writing one object."""
        return self._location(url)

    def presign(self, url: str, expires_in: int = 3600) -> str:
        """A URL that GETs the object without credentials until ``expires_in`` seconds
        (1 to 604800, SigV4's limit of 7 days) have passed: for curl, a browser, or vmstore's
        HTTP backend (``DownloadRequest(source_url=presigned)`` on a ``type="http"`` store).

        The object is looked up first (one HEAD), so a missing one is NotFoundError now rather
        than a URL that answers 404 later; it may still be deleted or replaced afterwards (a
        download through the HTTP backend pins the ETag it first saw). The URL carries a
        credential: vmstore never logs it, and shows it in messages without its query.
        """
        if isinstance(expires_in, bool) or not isinstance(expires_in, int):
            raise InvalidConfigError(
                f"expires_in must be a whole number of seconds, not {type(expires_in).__name__}"
            )
        if not 1 <= expires_in <= MAX_PRESIGN_SECONDS:
            raise InvalidConfigError(
                f"expires_in must be from 1 to {MAX_PRESIGN_SECONDS} seconds (7 days, the "
                f"longest a SigV4 signature is valid), not {expires_in}"
            )
        location = self._location(url)
        self._head(location)
        try:
            presigned: str = self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": location.bucket, "Key": location.key},
                ExpiresIn=expires_in,
            )
        except Exception as exc:
            raise storage_error(exc, "presign", location) from exc
        log.info("presigned %s for %d s", s3_url(location), expires_in)
        return presigned


class _MultipartUpload:
    """One upload: read the source once; PUT it whole if it fits in a part, else create (or
    resume) a multipart upload, send the parts, complete, record the SHA-256; abort on
    failure unless the upload may resume."""

    def __init__(
        self,
        storage: S3Storage,
        request: UploadRequest,
        location: S3Location,
        plan: SourcePlan,
        metadata: dict[str, str],
        content_type: str,
    ) -> None:
        self.storage = storage
        self.client = storage._client
        self.request = request
        self.location = location
        self.plan = plan
        self.metadata = metadata
        self.content_type = content_type
        self.resumable = request.resume and not plan.is_stream
        self.state_file = _StateFile(plan.name, location) if not plan.is_stream else None
        self.lock = threading.Lock()
        # The store's bandwidth limit; its waits end when the upload stops or is cancelled.
        self.pacer = pacer_for(storage._limiter, request.cancel)
        self.stop = StopSignal(self.pacer)
        self.reporter = progress_for(request, plan.size)
        self.key = store_key(storage._config.encryption_key)
        self.encoded = request.compression is not None or self.key is not None
        """Stored as frames (docs/FORMAT.md): always a multipart upload with a companion."""
        self.encoder: Encoder | None = None

    def _cancelled(self) -> bool:
        return self.request.cancel is not None and self.request.cancel.is_cancelled

    @property
    def url(self) -> str:
        return s3_url(self.location)

    # -- the shape of the upload --------------------------------------------------------

    def run(self) -> UploadResponse:
        finished = self._already_uploaded()
        if finished is not None:
            return finished
        size = self.plan.size
        if self.encoded:
            # The frame index exists only after the last part: it goes into the companion,
            # which only a multipart upload's token binds to the object (even for one part).
            return self._multipart(None)
        if size is not None and size <= self.plan.part_size(1):
            return self._put_single()
        if size is None:
            # A stream of unknown size: the first part tells whether it is small.
            first = self.plan.source.next_part(self.plan.part_size(1))
            if self.plan.source.exhausted or first is None:
                return self._put_single(first)
            return self._multipart(first)
        return self._multipart(None)

    def _encoding_params(self) -> dict[str, Any] | None:
        """What the journal and the completion record keep of the encoding (never the key)."""
        if self.encoder is None:
            return None
        encryption = self.encoder.encryption
        return {
            "compression": self.encoder.compression,
            "salt": encryption.salt.hex() if encryption else None,
            "key_check": encryption.key_check.hex() if encryption else None,
        }

    def _same_encoding(self, recorded: dict[str, Any] | None) -> bool:
        """Whether ``recorded`` (a journal's or completion record's) is the encoding this
        request asks for, with this key."""
        if not self.encoded or recorded is None:
            return not self.encoded and recorded is None
        if recorded.get("compression") != self.request.compression:
            return False
        salt, check = recorded.get("salt"), recorded.get("key_check")
        if self.key is None or salt is None:
            return self.key is None and salt is None
        try:
            _native.check_frame_key(self.key, bytes.fromhex(str(salt)), bytes.fromhex(str(check)))
        except (StorageError, ValueError):
            return False
        return True

    def _already_uploaded(self) -> UploadResponse | None:
        """A file uploaded before, unchanged since, to an object that still has the ETag that
        upload left: controllers retry whole steps, and re-sending 200 GB is the most
        expensive way to be idempotent."""
        if self.state_file is None or not self.request.resume or self.plan.stat is None:
            return None
        record = self.state_file.load_completed()
        stat = self.plan.stat
        if record is None or (record.size, record.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            return None
        if not self._same_encoding(record.encoding):
            return None
        try:
            head = self.storage._head(self.location)
        except NotFoundError:
            return None
        if record.token:
            token = _lower_metadata(head.get("Metadata", {})).get(UPLOAD_TOKEN_KEY)
            if token != record.token:
                return None
        elif _strip_etag(str(head.get("ETag", ""))) != record.etag:
            return None
        if int(head.get("ContentLength", -1)) != record.size:
            return None
        log.info("%s is already stored at %s (unchanged since); not sending it again",
                 self.plan.name, self.url)
        self.reporter.finish(record.size)
        return UploadResponse(
            url=self.url,
            checksum=record.sha256,
            bytes_transferred=0,
            etag=_strip_etag(str(head.get("ETag", ""))),
            size=record.size,
            resumed_from=record.size,
        )

    def _put_single(self, first: _native.SourcePart | None = None) -> UploadResponse:
        """The whole source in one PUT: its SHA-256 is known before it goes out."""
        data = self.plan.read_whole(first)
        size = len(data)
        digest = self.plan.source.sha256()
        if self._cancelled():
            raise CancelledError(f"upload of {self.plan.name} cancelled; nothing was stored")
        # A single PUT is its own commit, so the final report precedes it (as the rename
        # does for NFS): a callback that raises here keeps the object from being stored.
        self.reporter.finish(size)
        try:
            response = self.storage._call(
                "upload to",
                self.location,
                self.client.put_object,
                Bucket=self.location.bucket,
                Key=self.location.key,
                # Progress was reported in full above; the body only hands out the bytes.
                Body=cast(Any, PartBody(data, self.pacer)),
                ContentType=self.content_type,
                Metadata={
                    **self.metadata,
                    SHA256_KEY: digest,
                    **images.metadata_of(self.plan.image, size),
                },
                ChecksumSHA256=_b64(digest),
            )
        except CallbackAbort as abort:  # cancelled while waiting for the bandwidth limit
            raise abort.error from None
        etag = _strip_etag(str(response.get("ETag", "")))
        self._check_stored_object(etag, size)
        self._record_completed(etag, digest, size)
        # A stale companion (from an earlier multipart upload) is not believed, but need
        # not stay either.
        with contextlib.suppress(StorageError):
            self.storage._delete_key(self.storage._companion(self.location), "delete")
        return UploadResponse(url=self.url, checksum=digest, bytes_transferred=size,
                              etag=etag, size=size)

    def _check_stored_object(self, etag: str, size: int) -> None:
        """The size the server holds after a single PUT, which is its own commit (see
        :func:`check_stored_size`)."""
        head = self.storage._head(self.location)
        if _strip_etag(str(head.get("ETag", ""))) != etag:
            return  # replaced since by a later upload: not this one's to judge

        def discard() -> bool:
            try:
                self.storage._delete_key(self.location, "delete")
            except StorageError:
                return False
            return True

        held = head.get("ContentLength")
        check_stored_size(self.url, None if held is None else int(held), size, discard)

    # -- multipart ----------------------------------------------------------------------

    def _multipart(self, first: _native.SourcePart | None) -> UploadResponse:
        state = self._resume_or_create()
        try:
            return self._send_and_complete(state, first)
        except BaseException as exc:
            error = unwrap(exc)
            self._after_failure(state, error)
            if error is exc:
                raise
            raise error from None

    def _resume_or_create(self) -> _UploadState:
        previous = self._load_resumable()
        if previous is not None:
            return previous
        token = uuid.uuid4().hex
        checksum = self.storage._part_checksum()
        marker: dict[str, str] = {}
        if self.encoded:
            # A fresh salt for a fresh upload: its frames are encrypted under a key no other
            # upload uses.
            self.encoder = Encoder(self.request.compression, self.key)
            marker = {ENCODING_METADATA_KEY: self.encoder.encoding_scheme}
        kwargs: dict[str, Any] = {
            "Bucket": self.location.bucket,
            "Key": self.location.key,
            "ContentType": self.content_type,
            "Metadata": {**self.metadata, UPLOAD_TOKEN_KEY: token, **marker},
        }
        try:
            response = self.storage._call(
                "start an upload to",
                self.location,
                self.client.create_multipart_upload,
                **kwargs,
                **_create_checksum_args(checksum),
            )
        except (InvalidConfigError, OperationFailedError) as exc:
            if checksum != CHECKSUM_CRC64NVME or not _refuses_checksum(exc):
                raise
            # A server without CRC-64/NVME: SHA-256 per part from now on for this store.
            log.info("%s does not take CRC-64/NVME checksums (%s); using SHA-256 per part",
                     self.storage._endpoint or "S3", exc.message)
            self.storage._checksum_algorithm = checksum = CHECKSUM_SHA256
            response = self.storage._call(
                "start an upload to",
                self.location,
                self.client.create_multipart_upload,
                **kwargs,
                **_create_checksum_args(checksum),
            )
        stat = self.plan.stat
        state = _UploadState(
            bucket=self.location.bucket,
            key=self.location.key,
            upload_id=str(response["UploadId"]),
            token=token,
            source=self.plan.name,
            size=self.plan.size or 0,
            mtime_ns=stat.st_mtime_ns if stat is not None else 0,
            part_size=self.plan.part_size(1),
            checksum=checksum,
            encoding=self._encoding_params(),
        )
        if self.resumable:
            self._save(state)
        return state

    def _load_resumable(self) -> _UploadState | None:
        """The interrupted upload of this same file to this same key, if it can continue."""
        if self.state_file is None:
            return None
        previous = self.state_file.load()
        if previous is None:
            stale = self.state_file.load_any_upload_id()
            if stale is not None and self.state_file.load_completed() is None:
                self._abort(stale)  # left by another version of vmstore: unusable
            return None
        stat = self.plan.stat
        same = (
            self.resumable
            and stat is not None
            and previous.bucket == self.location.bucket
            and previous.key == self.location.key
            and previous.size == stat.st_size
            and previous.mtime_ns == stat.st_mtime_ns
            and previous.part_size == self.plan.part_size(1)
            and self._same_encoding(previous.encoding)
        )
        listed = self._list_parts(previous.upload_id) if same else None
        if listed is None:
            # Not resuming (asked not to, or the file changed): the earlier unfinished
            # upload would only cost storage.
            self._abort(previous.upload_id)
            self.state_file.remove()
            return None
        # Keep a part only if the server still has it with the ETag we were given; its
        # bytes are checked against the source as the pass reaches it.
        previous.parts = {
            n: part
            for n, part in previous.parts.items()
            if n in listed and _strip_etag(listed[n][0]) == _strip_etag(part[0])
        }
        if previous.encoding is not None:
            # The same salt: the frames stored already and those still to come are one object.
            # A stored part is kept with the consecutive frames its journal line names; the
            # parts between are regrouped the same way (see group_frames).
            previous.parts = {
                n: part
                for n, part in previous.parts.items()
                if n in previous.frames and _consecutive(previous.frames[n])
            }
            previous.frames = {n: previous.frames[n] for n in previous.parts}
            if not _ordered(previous.frames):
                previous.parts, previous.frames = {}, {}
            salt = previous.encoding.get("salt")
            self.encoder = Encoder(
                self.request.compression,
                self.key,
                salt=bytes.fromhex(str(salt)) if salt else None,
            )
        self.storage._checksum_algorithm = previous.checksum
        log.info("resuming upload %s with %d parts stored", previous.upload_id, len(previous.parts))
        return previous

    def _send_and_complete(
        self, state: _UploadState, first: _native.SourcePart | None
    ) -> UploadResponse:
        stored = dict(state.parts)
        resumed = 0
        # Encoded, source parts are frames and the parts sent gather frames (group_frames).
        stored_frames = {f.number: f for frames in state.frames.values() for f in frames}
        parts = self._parts(first, stored_frames if self.encoder is not None else stored)

        def resumed_part(length: int) -> None:
            nonlocal resumed
            resumed += length
            self.reporter.advance(length)

        def sent_or_stored(batch: Iterator[_Part]) -> Iterator[_Part]:
            for part in batch:
                if part.number in stored:
                    if stored[part.number][1] != part.crc64nvme:
                        raise _ResumedPartDiffers(part.number)
                    resumed_part(part.length)
                    continue
                yield part

        def landed(batch: list[_Part]) -> None:
            # Save stored parts before reporting them: a process killed from its progress
            # callback must still find them on resume (progress counts stored bytes).
            if self.resumable:
                self._save(state)
            for part in batch:
                self.reporter.advance(part.length)

        with parts as feed:
            outgoing: Iterator[_Part]
            if self.encoder is None:
                outgoing = sent_or_stored(iter(feed))
            else:
                frames = encode_parts(
                    # A resumed upload's stored frames: their plain bytes are checked, not sent.
                    verify_stored_frames(
                        feed, stored_frames, differs=_ResumedPartDiffers, advance=resumed_part
                    ),
                    self.encoder,
                    concurrency=_many.concurrency_for(self.storage._config.concurrency),
                    stored={n: (f.stored_length, f.crc64nvme) for n, f in stored_frames.items()},
                )
                outgoing = _regrouped(
                    frames,
                    first_number=1,
                    min_size=S3_MIN_PART,
                    stored_part_of={
                        f.number: n for n, records in state.frames.items() for f in records
                    },
                )
            send_parts(
                outgoing,
                lambda part: self._send_part(state, part),
                concurrency=_many.concurrency_for(self.storage._config.concurrency),
                stop=self.stop,
                on_landed=landed,
                cancelled=self._cancelled,
                describe=f"upload of {self.plan.name}",
            )
        source = self.plan.source
        size = source.position
        self.plan.check_complete(size)
        digest = source.sha256()
        encoding = self.encoder.encoding() if self.encoder is not None else None
        self._check_stored_parts(state, encoding.stored_size if encoding is not None else size)
        # Reported before Complete, which is the commit: a raising callback stops it.
        self.reporter.finish(size)
        # S3's FULL_OBJECT checksum is of the stored bytes: the frames' CRCs combined.
        crc = self.encoder.stored_crc64nvme() if self.encoder is not None else source.crc64nvme()
        etag = self._complete(state, crc)
        self._write_sidecar(state, digest, size, etag, encoding)
        self._record_completed(etag, digest, size, token=state.token)
        return UploadResponse(
            url=self.url,
            checksum=digest,
            bytes_transferred=size - resumed,
            etag=etag,
            size=size,
            resumed_from=resumed,
        )

    def _parts(self, first: _native.SourcePart | None, stored: Mapping[int, object]) -> _FirstThen:
        feed = PartFeed(
            self.plan,
            keep=lambda number: number not in stored,
            # An O_DIRECT source reads its next part ahead by itself: a queued part on top of
            # it would only hold one more part's memory (peak RSS: 4 in flight + 1 read ahead).
            depth=0 if self.plan.source.direct else 1,
            cancel=self.request.cancel,
            first_number=first.number + 1 if first is not None else 1,
        )
        return _FirstThen(first, feed)

    def _send_part(self, state: _UploadState, part: _Part) -> None:
        data = part_view(part)
        checksum = state.checksum
        checksum_args: dict[str, Any]
        if checksum == CHECKSUM_SHA256:
            digest = hashlib.sha256(data).hexdigest() if part.sha256 is None else part.sha256
            checksum_args = {"ChecksumSHA256": _b64(digest)}
        else:
            checksum_args = {"ChecksumCRC64NVME": crc64nvme_b64(part.crc64nvme)}
        def attempt() -> str:
            if self.stop.is_set():
                raise CancelledError("upload stopped")
            # The part's bytes stay in memory until it is stored: a retry re-sends them
            # from there, never from a consumed stream.
            body = PartBody(data, self.pacer)
            response = self.client.upload_part(
                Bucket=self.location.bucket,
                Key=self.location.key,
                UploadId=state.upload_id,
                PartNumber=part.number,
                # File-like (read/seek/tell/len): botocore sends the native buffer without
                # a copy, in 1 MiB views.
                Body=cast(Any, body),
                **checksum_args,
            )
            for name, value in checksum_args.items():
                echoed = response.get(name)
                if echoed and echoed != value:
                    raise RetryableError(
                        f"the server stored part {part.number} with another {name}"
                    )
            return str(response["ETag"])

        try:
            etag = self.storage._retry.call(
                attempt,
                classify=_classify_part_retry,
                describe=f"uploading part {part.number} of {self.url}",
                cancelled=self.stop,
            )
        except StorageError:
            raise
        except Exception as exc:
            raise storage_error(exc, f"upload part {part.number} to", self.location) from exc
        with self.lock:
            state.parts[part.number] = (etag, part.crc64nvme)
            if isinstance(part, FramePart):
                state.frames[part.number] = part.frames

    def _complete(self, state: _UploadState, crc64nvme: int) -> str:
        completed: list[dict[str, Any]] = [
            {"PartNumber": n, "ETag": state.parts[n][0]} for n in sorted(state.parts)
        ]
        extra: dict[str, Any] = {}
        if state.checksum == CHECKSUM_CRC64NVME:
            # The server checks the parts it holds against the whole object's CRC, combined
            # from the parts' CRCs on its side: no second pass on either side.
            extra = {"ChecksumCRC64NVME": crc64nvme_b64(crc64nvme), "ChecksumType": "FULL_OBJECT"}
            for entry in completed:
                entry["ChecksumCRC64NVME"] = crc64nvme_b64(state.parts[int(entry["PartNumber"])][1])
        response = self.storage._call(
            "complete the upload to",
            self.location,
            self.client.complete_multipart_upload,
            Bucket=self.location.bucket,
            Key=self.location.key,
            UploadId=state.upload_id,
            MultipartUpload={"Parts": completed},
            **extra,
        )
        if self.state_file is not None:
            self.state_file.remove()
        return _strip_etag(str(response.get("ETag", "")))

    def _write_sidecar(
        self,
        state: _UploadState,
        digest: str,
        size: int,
        etag: str,
        encoding: Encoding | None = None,
    ) -> None:
        sidecar = Sidecar(
            sha256=digest,
            size=size,
            etag=etag,
            content_type=self.content_type,
            metadata=self.metadata,
            uploaded_at=datetime.now(UTC).isoformat(),
            upload_token=state.token,
            encoding=encoding,
            image=images.record_of(self.plan.image, size) if self.plan.image else None,
        )
        companion = self.storage._companion(self.location)
        try:
            self.storage._call(
                "store the checksum sidecar of",
                self.location,
                self.client.put_object,
                Bucket=companion.bucket,
                Key=companion.key,
                Body=sidecar.to_bytes(),
                ContentType="application/json",
            )
        except StorageError as exc:
            raise type(exc)(
                f"{self.url} was stored, but its checksum sidecar could not be, so the store "
                f"holds no SHA-256 for it (its SHA-256 is {digest}): {exc.message}",
                cause=exc,
            ) from exc

    def _record_completed(self, etag: str, digest: str, size: int, *, token: str = "") -> None:
        if self.state_file is None or self.plan.stat is None or not etag:
            return
        record = _CompletedUpload(
            bucket=self.location.bucket,
            key=self.location.key,
            source=self.plan.name,
            size=size,
            mtime_ns=self.plan.stat.st_mtime_ns,
            etag=etag,
            sha256=digest,
            token=token,
            encoding=self._encoding_params(),
        )
        try:
            self.state_file.complete(record)
        except OSError as exc:
            log.warning("could not record the finished upload in %s: %s", self.state_file.path, exc)

    def _check_stored_parts(self, state: _UploadState, size: int) -> None:
        """The server's list of the upload's parts against what was sent, before Complete
        commits them: a server that validates part checksums refuses a short part itself, one
        that does not would make an object of other bytes under the final name."""
        listed = self._list_parts(state.upload_id)
        if listed is None:
            return  # the upload is gone: Complete says so
        sizes = [part_size for _, part_size in listed.values()]
        # A server that lists no sizes (none of the tested ones, nor AWS) is held to the ETags.
        held = None if None in sizes else sum(s for s in sizes if s is not None)
        sent = {n: _strip_etag(etag) for n, (etag, _) in state.parts.items()}
        if held in (None, size) and {n: _strip_etag(e) for n, (e, _) in listed.items()} == sent:
            return
        holds = f"{held} bytes" if held is not None else "other parts"
        raise ChecksumMismatchError(
            f"the server holds {holds} in {len(listed)} parts of the upload to {self.url}, "
            f"not the {size} bytes in {len(sent)} parts that were sent: nothing was stored "
            "under the final name; upload again"
        )

    def _list_parts(self, upload_id: str) -> dict[int, tuple[str, int | None]] | None:
        """The server's parts of an upload: number -> (ETag, size, None if the server does
        not say); None if the upload is gone."""
        try:
            return {
                int(part.get("PartNumber", 0)): (
                    str(part.get("ETag", "")),
                    None if part.get("Size") is None else int(part["Size"]),
                )
                for part in self.storage._parts(self.location, upload_id)
            }
        except NotFoundError:
            return None

    def _save(self, state: _UploadState) -> None:
        if self.state_file is None:
            return
        try:
            with self.lock:
                self.state_file.save(state)
        except OSError as exc:
            log.warning("could not save upload state %s: %s", self.state_file.path, exc)

    def _abort(self, upload_id: str) -> None:
        with contextlib.suppress(Exception):
            self.client.abort_multipart_upload(
                Bucket=self.location.bucket, Key=self.location.key, UploadId=upload_id
            )

    def _after_failure(self, state: _UploadState, exc: BaseException) -> None:
        if self.resumable and keeps_partial(exc):
            self._save(state)
            log.info(
                "upload to %s interrupted with %d parts stored; upload again to resume",
                self.url,
                len(state.parts),
            )
            return
        self._abort(state.upload_id)
        if self.state_file is not None:
            self.state_file.remove()


_Part = _native.SourcePart | FramePart
"""What goes out as a part: the source's bytes, or the frame made of them."""


class _ResumedPartDiffers(ChecksumMismatchError):
    def __init__(self, number: int) -> None:
        super().__init__(
            f"part {number} stored by the interrupted upload no longer matches the source; "
            "upload again to start over"
        )


class _FirstThen:
    """A part already read (a stream's first part), then the rest of the feed."""

    def __init__(self, first: _native.SourcePart | None, feed: PartFeed) -> None:
        self._first = first
        self._feed = feed

    def __enter__(self) -> _FirstThen:
        return self

    def __exit__(self, *exc: object) -> None:
        self._feed.close()

    def __iter__(self) -> Iterator[_native.SourcePart]:
        if self._first is not None:
            yield self._first
        yield from self._feed


def _regrouped(frames: Iterator[EncodedPart], **kwargs: Any) -> Iterator[FramePart]:
    """group_frames, a grouping that no longer matches the stored parts restarting the
    upload (as a stored part that no longer matches the source does)."""
    try:
        yield from group_frames(frames, **kwargs)
    except GroupingChanged as exc:
        log.warning("the frames no longer group into the stored parts: %s", exc)
        raise _ResumedPartDiffers(0) from exc


def _consecutive(frames: tuple[FrameRecord, ...]) -> bool:
    numbers = [frame.number for frame in frames]
    return bool(numbers) and numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def _ordered(parts: dict[int, tuple[FrameRecord, ...]]) -> bool:
    """Stored parts hold increasing, disjoint runs of frames, in part-number order."""
    last = 0
    for number in sorted(parts):
        frames = parts[number]
        if frames[0].number <= last:
            return False
        last = frames[-1].number
    return True


def _aware(moment: object) -> datetime:
    """A timestamp from boto3 as aware UTC (the epoch's start when absent)."""
    if not isinstance(moment, datetime):
        return datetime.min.replace(tzinfo=UTC)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def _s3_checksum(head: dict[str, Any]) -> S3Checksum | None:
    """The full-object checksum S3 reports for the object, strongest first; None if none (or
    only a composite one, a checksum of the parts' checksums, which the bytes cannot be
    checked against)."""
    if str(head.get("ChecksumType", "FULL_OBJECT")).upper() != "FULL_OBJECT":
        return None
    for algorithm in ("SHA256", "CRC64NVME", "CRC32C", "CRC32"):
        value = head.get(f"Checksum{algorithm}")
        if value and "-" not in str(value):
            return S3Checksum(algorithm, str(value))
    return None


def _create_checksum_args(checksum: str) -> dict[str, str]:
    if checksum == CHECKSUM_CRC64NVME:
        return {"ChecksumAlgorithm": "CRC64NVME", "ChecksumType": "FULL_OBJECT"}
    return {"ChecksumAlgorithm": "SHA256"}


def _refuses_checksum(exc: StorageError) -> bool:
    cause = exc.__cause__
    if not isinstance(cause, botocore.exceptions.ClientError):
        return False
    code, status = _error_code(cause)
    return code in {"InvalidRequest", "InvalidArgument", "NotImplemented"} or status == 501


def _classify_part_retry(exc: BaseException) -> RetryableError | None:
    """Transient failures of one part, and a part whose bytes a validating server rejected
    (BadDigest: flipped in transit): its bytes are still in memory, so it is sent again."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code, _status = _error_code(exc)
        if code in _BAD_DIGEST:
            return RetryableError(f"the server rejected part's checksum ({code})")
    return classify_retry(exc)
