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

import base64
import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import mimetypes
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import boto3
import botocore.config
import botocore.exceptions

from vmstore import _native
from vmstore._download import DownloadSettings, RemoteObject, download_object
from vmstore._oserrors import storage_error_from_oserror
from vmstore._parts import Chunk, s3_part_size, split
from vmstore._retry import RetryableError, RetryPolicy
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
    UploadRequest,
    UploadResponse,
    normalize_custom_metadata,
)
from vmstore.progress import ProgressReporter
from vmstore.urls import S3Location, normalize_endpoint, parse_s3_url, s3_url

log = logging.getLogger("vmstore.s3")

DEFAULT_CHUNK_SIZE = 10 << 20

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
    if isinstance(exc, StorageError):
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
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def _strip_etag(etag: str) -> str:
    return etag.strip('"')


def _lower_metadata(metadata: dict[str, str]) -> dict[str, str]:
    # Servers differ in the case of user-metadata keys (rclone title-cases them).
    return {key.lower(): value for key, value in metadata.items()}


def _state_dir() -> str:
    configured = os.environ.get("VMSTORE_STATE_DIR")
    if configured:
        return configured
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "vmstore")


@dataclass
class _UploadState:
    """What an interrupted multipart upload needs to continue (saved as JSON)."""

    bucket: str
    key: str
    upload_id: str
    source: str
    size: int
    mtime_ns: int
    part_size: int
    sha256: str
    parts: dict[int, tuple[str, str]] = field(default_factory=dict)
    """part number -> (ETag, SHA-256 hex) of parts the server confirmed."""

    def to_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "key": self.key,
            "upload_id": self.upload_id,
            "source": self.source,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "part_size": self.part_size,
            "sha256": self.sha256,
            "parts": {str(n): list(v) for n, v in self.parts.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _UploadState:
        parts = {int(n): (str(v[0]), str(v[1])) for n, v in dict(data.get("parts", {})).items()}
        return cls(
            bucket=str(data["bucket"]),
            key=str(data["key"]),
            upload_id=str(data["upload_id"]),
            source=str(data["source"]),
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            part_size=int(data["part_size"]),
            sha256=str(data["sha256"]),
            parts=parts,
        )


class _StateFile:
    """The resume state of one (source, destination) upload, kept as a journal.

    The first line describes the upload and is written atomically (temp file, rename) with
    the parts known at that moment; every part stored after that appends one line. Saving
    after each part then costs the same at part 9,999 as at part 1, where rewriting the
    whole state would write O(parts²) bytes over a 10,000-part upload. A line torn by a
    crash is skipped on load: that part is sent again.
    """

    def __init__(self, source: str, location: S3Location) -> None:
        ident = hashlib.sha256(f"{source}\0{location.bucket}\0{location.key}".encode()).hexdigest()
        self.path = os.path.join(_state_dir(), f"s3-upload-{ident[:40]}.json")
        self._journaled: set[int] = set()
        self._started = False

    def load(self) -> _UploadState | None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
            state = _UploadState.from_json(json.loads(lines[0]))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        for line in lines[1:]:
            try:
                number, etag, digest = json.loads(line)
                state.parts[int(number)] = (str(etag), str(digest))
            except (ValueError, TypeError):
                continue
        return state

    def save(self, state: _UploadState) -> None:
        """Record ``state``: all of it the first time, then the parts not recorded yet."""
        if not self._started:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            temp = f"{self.path}.{os.getpid()}.tmp"
            with open(temp, "w", encoding="utf-8") as handle:
                handle.write(json.dumps({**state.to_json(), "parts": {}}) + "\n")
                handle.writelines(_part_line(n, part) for n, part in sorted(state.parts.items()))
            os.replace(temp, self.path)
            self._journaled = set(state.parts)
            self._started = True
            return
        fresh = state.parts.keys() - self._journaled
        if fresh:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.writelines(_part_line(n, state.parts[n]) for n in sorted(fresh))
            self._journaled.update(fresh)

    def remove(self) -> None:
        self._started = False
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def _part_line(number: int, part: tuple[str, str]) -> str:
    return json.dumps([number, *part]) + "\n"


class _S3ObjectReader:
    """Ranged GETs pinned to the ETag seen by HEAD."""

    def __init__(self, client: Any, location: S3Location, etag: str) -> None:
        self._client = client
        self._location = location
        self._etag = etag

    def read_range(self, start: int, end: int) -> bytes:
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
        try:
            data: bytes = body.read()
        finally:
            body.close()
        return data

    def read_stream(self) -> Iterable[bytes]:
        response = self._client.get_object(Bucket=self._location.bucket, Key=self._location.key)
        body = response["Body"]
        try:
            yield from body.iter_chunks(1 << 20)
        finally:
            body.close()


class S3Storage:
    """Storage on S3 and S3-compatible servers (MinIO, Ceph RGW, rclone, moto, ...)."""

    def __init__(self, config: StorageConfig) -> None:
        self._config = config
        self._chunk_size = config.chunk_size or DEFAULT_CHUNK_SIZE
        self._retry = RetryPolicy(max_retries=config.max_retries)
        self._endpoint = (
            normalize_endpoint(config.endpoint, use_ssl=config.use_ssl) if config.endpoint else ""
        )
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
        self._closed = False

    # -- context --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

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
        try:
            return self._retry.call(
                lambda: operation(**kwargs),
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
        )
        return response

    def get_metadata(self, url: str) -> FileMetadata:
        location = self._location(url)
        head = self._head(location)
        custom = _lower_metadata(head.get("Metadata", {}))
        checksum = custom.pop(SHA256_KEY, None)
        last_modified = head.get("LastModified") or datetime.now(UTC)
        if last_modified.tzinfo is None:
            last_modified = last_modified.replace(tzinfo=UTC)
        return FileMetadata(
            url=s3_url(location),
            size=int(head.get("ContentLength", 0)),
            checksum=checksum.lower() if checksum else None,
            etag=_strip_etag(head.get("ETag", "")),
            last_modified=last_modified.astimezone(UTC),
            content_type=head.get("ContentType") or DEFAULT_CONTENT_TYPE,
            custom_metadata=custom,
        )

    def delete(self, url: str) -> None:
        location = self._location(url)
        try:
            self._call(
                "delete",
                location,
                self._client.delete_object,
                Bucket=location.bucket,
                Key=location.key,
            )
        except NotFoundError as exc:
            if "bucket" in exc.message:
                raise
            # Cleanup is idempotent: a missing object is already deleted.

    # -- download -------------------------------------------------------------------------

    def download(self, request: DownloadRequest) -> DownloadResponse:
        location = self._location(request.source_url)
        head = self._head(location)
        checksum = _lower_metadata(head.get("Metadata", {})).get(SHA256_KEY)
        etag = str(head.get("ETag", ""))
        obj = RemoteObject(
            url=s3_url(location),
            size=int(head.get("ContentLength", 0)),
            etag=etag,
            checksum=checksum.lower() if checksum else None,
        )
        settings = DownloadSettings(
            chunk_size=self._chunk_size,
            concurrency=self._config.concurrency,
            retry=self._retry,
            classify=classify_retry,
        )
        try:
            return download_object(
                obj, _S3ObjectReader(self._client, location, etag), request, settings
            )
        except Exception as exc:
            # Only S3 and network failures are translated; anything else (a progress
            # callback's own exception) propagates unchanged.
            if not is_backend_error(exc):
                raise
            raise storage_error(exc, "download", location) from exc

    # -- upload ---------------------------------------------------------------------------

    def upload(self, request: UploadRequest) -> UploadResponse:
        location = self._location(request.destination_url)
        source = os.path.abspath(request.source_path)
        try:
            stat = os.stat(source)
        except OSError as exc:
            raise storage_error_from_oserror(exc, "read", source) from exc
        if not os.path.isfile(source):
            raise OperationFailedError(f"could not read {source}: not a regular file")
        metadata = normalize_custom_metadata(request.metadata)
        content_type = (
            request.content_type or mimetypes.guess_type(source)[0] or DEFAULT_CONTENT_TYPE
        )
        part_size = s3_part_size(stat.st_size, self._chunk_size)
        if stat.st_size <= part_size:
            return self._put_single(request, location, source, stat.st_size, metadata, content_type)
        return _MultipartUpload(
            self, request, location, source, stat, part_size, metadata, content_type
        ).run()

    def _put_single(
        self,
        request: UploadRequest,
        location: S3Location,
        source: str,
        size: int,
        metadata: dict[str, str],
        content_type: str,
    ) -> UploadResponse:
        reporter = ProgressReporter(request.progress_callback, size)
        if request.cancel is not None and request.cancel.is_cancelled:
            raise CancelledError(f"upload of {source} cancelled")
        with _native.ChunkReader(source) as reader:
            data = reader.read(0, size)
        if len(data) != size:
            raise ChecksumMismatchError(
                f"{source} changed size during the upload; nothing was stored"
            )
        hasher = _native.Sha256()
        hasher.update(data)
        digest = hasher.hexdigest()
        # A single PUT is its own commit, so the final report precedes it (as the rename
        # does for NFS): a callback that raises here keeps the object from being stored.
        reporter.finish(size)
        response = self._call(
            "upload to",
            location,
            self._client.put_object,
            Bucket=location.bucket,
            Key=location.key,
            Body=data,
            ContentType=content_type,
            Metadata={**metadata, SHA256_KEY: digest},
            ChecksumSHA256=_b64(digest),
        )
        return UploadResponse(
            url=s3_url(location),
            checksum=digest,
            bytes_transferred=size,
            etag=_strip_etag(str(response.get("ETag", ""))),
            size=size,
        )


class _MultipartUpload:
    """One multipart upload: hash pass, create or resume, parts, complete or abort."""

    def __init__(
        self,
        storage: S3Storage,
        request: UploadRequest,
        location: S3Location,
        source: str,
        stat: os.stat_result,
        part_size: int,
        metadata: dict[str, str],
        content_type: str,
    ) -> None:
        self.storage = storage
        self.client = storage._client
        self.request = request
        self.location = location
        self.source = source
        self.stat = stat
        self.part_size = part_size
        self.metadata = metadata
        self.content_type = content_type
        self.state_file = _StateFile(source, location)
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _cancelled(self) -> bool:
        return self.request.cancel is not None and self.request.cancel.is_cancelled

    def run(self) -> UploadResponse:
        size = self.stat.st_size
        log.info("hashing %s (%d bytes) in parts of %d", self.source, size, self.part_size)
        whole, part_hashes = _native.hash_parts(
            self.source,
            self.part_size,
            threads=max(1, (os.cpu_count() or 2) - 1),
            cancel=self.request.cancel,
        )
        parts = split(size, self.part_size)
        state = self._resume_or_create(whole, part_hashes)
        reporter = ProgressReporter(self.request.progress_callback, size)
        already = sum(p.length for p in parts if p.number in state.parts)
        reporter(already, size)
        try:
            self._send_parts(state, parts, part_hashes, reporter)
            # Reported before Complete, which is the commit: a raising callback stops it.
            reporter.finish(size)
            completed = [
                {
                    "PartNumber": n,
                    "ETag": state.parts[n][0],
                    "ChecksumSHA256": _b64(state.parts[n][1]),
                }
                for n in sorted(state.parts)
            ]
            self.storage._call(
                "complete the upload to",
                self.location,
                self.client.complete_multipart_upload,
                Bucket=self.location.bucket,
                Key=self.location.key,
                UploadId=state.upload_id,
                MultipartUpload={"Parts": completed},
            )
        except BaseException as exc:
            self._after_failure(state, exc)
            raise
        self.state_file.remove()
        head = self.storage._head(self.location)
        stored_size = int(head.get("ContentLength", -1))
        if stored_size != size:
            # Complete already published it: an object that is not the source must not stay
            # visible under the final name, labelled with the source's SHA-256.
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.location.bucket, Key=self.location.key)
            raise ChecksumMismatchError(
                f"{s3_url(self.location)} held {stored_size} bytes after the upload, "
                f"expected {size}; the object was deleted, upload again"
            )
        return UploadResponse(
            url=s3_url(self.location),
            checksum=whole,
            bytes_transferred=size - already,
            etag=_strip_etag(str(head.get("ETag", ""))),
            size=size,
            resumed_from=already,
        )

    def _resume_or_create(self, whole: str, part_hashes: list[str]) -> _UploadState:
        previous = self.state_file.load()
        if previous is not None and not self.request.resume:
            # Not resuming: the earlier unfinished upload would only cost storage.
            self._abort(previous.upload_id)
            self.state_file.remove()
            previous = None
        if previous is not None:
            same = (
                previous.bucket == self.location.bucket
                and previous.key == self.location.key
                and previous.size == self.stat.st_size
                and previous.mtime_ns == self.stat.st_mtime_ns
                and previous.part_size == self.part_size
                and previous.sha256 == whole
            )
            if same:
                listed = self._list_parts(previous.upload_id)
                if listed is not None:
                    # Keep a part only if the server still has it with the ETag we were
                    # given and its bytes in the source are the bytes we hashed then.
                    previous.parts = {
                        n: (etag, digest)
                        for n, (etag, digest) in previous.parts.items()
                        if listed.get(n) == etag
                        and 1 <= n <= len(part_hashes)
                        and part_hashes[n - 1] == digest
                    }
                    log.info(
                        "resuming upload %s with %d parts stored",
                        previous.upload_id,
                        len(previous.parts),
                    )
                    return previous
            self._abort(previous.upload_id)
        response = self.storage._call(
            "start an upload to",
            self.location,
            self.client.create_multipart_upload,
            Bucket=self.location.bucket,
            Key=self.location.key,
            ContentType=self.content_type,
            Metadata={**self.metadata, SHA256_KEY: whole},
            ChecksumAlgorithm="SHA256",
        )
        state = _UploadState(
            bucket=self.location.bucket,
            key=self.location.key,
            upload_id=str(response["UploadId"]),
            source=self.source,
            size=self.stat.st_size,
            mtime_ns=self.stat.st_mtime_ns,
            part_size=self.part_size,
            sha256=whole,
        )
        if self.request.resume:
            self._save(state)
        return state

    def _list_parts(self, upload_id: str) -> dict[int, str] | None:
        listed: dict[int, str] = {}
        marker = 0
        try:
            while True:
                response = self.storage._call(
                    "list the parts of",
                    self.location,
                    self.client.list_parts,
                    Bucket=self.location.bucket,
                    Key=self.location.key,
                    UploadId=upload_id,
                    PartNumberMarker=marker,
                )
                for part in response.get("Parts", []):
                    listed[int(part["PartNumber"])] = str(part["ETag"])
                if not response.get("IsTruncated"):
                    return listed
                marker = int(response.get("NextPartNumberMarker", 0))
        except NotFoundError:
            return None

    def _save(self, state: _UploadState) -> None:
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
        interrupted = not isinstance(
            exc, ChecksumMismatchError | PermissionDeniedError | NotFoundError | InvalidConfigError
        )
        if self.request.resume and interrupted:
            self._save(state)
            log.info(
                "upload to %s interrupted with %d parts stored; upload again to resume",
                s3_url(self.location),
                len(state.parts),
            )
            return
        self._abort(state.upload_id)
        self.state_file.remove()

    def _send_parts(
        self,
        state: _UploadState,
        parts: list[Chunk],
        part_hashes: list[str],
        reporter: ProgressReporter,
    ) -> None:
        todo = [p for p in parts if p.number not in state.parts]
        with _native.ChunkReader(self.source) as reader:

            def send(part: Chunk) -> Chunk:
                expected = part_hashes[part.number - 1]

                def attempt() -> str:
                    if self.stop.is_set():
                        raise CancelledError("upload stopped")
                    # Re-read on every attempt: a retry never re-sends a consumed body.
                    data = reader.read(part.offset, part.length)
                    hasher = _native.Sha256()
                    hasher.update(data)
                    if len(data) != part.length or hasher.hexdigest() != expected:
                        raise ChecksumMismatchError(
                            f"{self.source} changed during the upload (part {part.number} "
                            "differs from when it was hashed); the upload was aborted"
                        )
                    response = self.client.upload_part(
                        Bucket=self.location.bucket,
                        Key=self.location.key,
                        UploadId=state.upload_id,
                        PartNumber=part.number,
                        Body=data,
                        ChecksumSHA256=_b64(expected),
                    )
                    echoed = response.get("ChecksumSHA256")
                    if echoed and echoed != _b64(expected):
                        raise ChecksumMismatchError(
                            f"the server stored part {part.number} with another SHA-256"
                        )
                    return str(response["ETag"])

                try:
                    etag = self.storage._retry.call(
                        attempt,
                        classify=classify_retry,
                        describe=f"uploading part {part.number} of {s3_url(self.location)}",
                        cancelled=self.stop,
                    )
                except StorageError:
                    raise
                except Exception as exc:
                    raise storage_error(
                        exc, f"upload part {part.number} to", self.location
                    ) from exc
                with self.lock:
                    state.parts[part.number] = (etag, expected)
                return part

            self._run_pool(send, todo, state, reporter)

    def _run_pool(
        self,
        send: Any,
        todo: list[Chunk],
        state: _UploadState,
        reporter: ProgressReporter,
    ) -> None:
        concurrency = self.storage._config.concurrency
        queue: Iterator[Chunk] = iter(todo)
        pending: set[cf.Future[Chunk]] = set()
        with cf.ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="vmstore-put"
        ) as pool:
            try:
                exhausted = False
                while True:
                    # At most `concurrency` parts are read at once: memory stays near
                    # concurrency x part size, whatever the disk's size.
                    while not exhausted and len(pending) < concurrency:
                        part = next(queue, None)
                        if part is None:
                            exhausted = True
                            break
                        pending.add(pool.submit(send, part))
                    if not pending:
                        break
                    finished, pending = cf.wait(
                        pending, timeout=0.1, return_when=cf.FIRST_COMPLETED
                    )
                    landed = [future.result() for future in finished]
                    # Save stored parts before reporting them: a process killed from its
                    # progress callback must still find them on resume.
                    if landed and self.request.resume:
                        self._save(state)
                    for part in landed:
                        reporter.advance(part.length)
                    if self._cancelled():
                        raise CancelledError(f"upload of {self.source} cancelled")
            except BaseException:
                self.stop.set()
                for future in pending:
                    future.cancel()
                cf.wait(pending)
                raise
