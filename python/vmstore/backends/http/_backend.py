"""HTTP/HTTPS backend: requests speaks the protocol, the native core touches every byte.

Download: HEAD gives the size, the validators (ETag, Last-Modified) and any SHA-256 the server
advertises (``X-Checksum-SHA256``, RFC 9530 ``Repr-Digest``, RFC 3230 ``Digest``); the object
then comes through the shared ranged pipeline (:mod:`vmstore._download`). Every GET is pinned
to the version HEAD saw (``If-Match`` and ``If-Range`` on a strong ETag, else
``If-Unmodified-Since`` and ``If-Range`` on Last-Modified), and the answer's own validators
are compared too: a resource that changes mid-download is fetched again from zero, never
spliced. A server that answers a Range request with the whole object (200, no Content-Range)
gets one stream.

Upload: a HEAD checks write access first (refused credentials fail before any byte is
read); then one PUT streams the source as the one pass of the upload pipeline reads and hashes
it (:class:`vmstore._upload.PartFeed`), with ``X-Metadata-<key>`` headers and Content-Length
when the size is known (chunked otherwise). A small source is read first, so its checksum
goes in the headers (``X-Checksum-SHA256``, ``Repr-Digest``). The last block is held back
until the source is known complete and unchanged: otherwise the body stays incomplete and the
server stores nothing. A HEAD then confirms the stored size.

Plain WebDAV servers (nginx's dav module, Apache mod_dav, ...) keep neither checksum nor
metadata. When the HEAD after a PUT does not echo them, a sidecar ``<path>.vmstore.json``
(the NFS backend's format: sha256, size, content type, metadata, plus the data's ETag) is PUT
after the data. It is trusted only while its size and ETag match the data's, so a file
replaced behind vmstore's back reads as "no checksum", not as a wrong one. ``delete`` removes
it too, and URLs naming a sidecar are refused.

The bearer token goes only to the origin of the URL the caller named: redirects are followed
here, not by requests, and a hop to another scheme, host or port gets no Authorization header
(an http to https upgrade on the same host keeps it). ``~/.netrc`` is never consulted: the
config is the only source of credentials. ``timeout`` is requests' read timeout, which
applies to each socket operation: an idle timeout, never a cap on a long transfer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mimetypes
from collections.abc import Callable, Hashable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from vmstore import _logredact, _many, _native, images
from vmstore._codec import EncodedPart, Encoder, encode_parts, store_key
from vmstore._download import DownloadSettings, RemoteObject, download_object
from vmstore._hostpolicy import HostPolicy
from vmstore._incomplete import cutoff, known_downloads, remove_download
from vmstore._ratelimit import Pacer, limiter_for, pacer_for
from vmstore._retry import RetryPolicy
from vmstore._sidecar import SIDECAR_SUFFIX, Sidecar, SidecarFormatError
from vmstore._upload import (
    CallbackAbort,
    PartBody,
    SourcePlan,
    check_stored_size,
    encoder_for,
    plan_source,
    progress_for,
)
from vmstore.backends.http._bodies import (
    _close_probe,
    _is_range_answer,
    _ObjectReader,
    _PipelineBody,
    _StreamSpent,
)
from vmstore.backends.http._errors import (
    _check,
    _is_transport_failure,
    _ResourceChangedError,
    _retryable_status,
    classify_retry,
    storage_error,
)
from vmstore.backends.http._headers import (
    _bare_etag,
    _Head,
    _header_int,
    _http_date,
    _stores_natively,
    _upload_headers,
    _Validator,
)
from vmstore.backends.http._transport import _Transport, _with_path_suffix
from vmstore.config import StorageConfig
from vmstore.errors import (
    CancelledError,
    InvalidConfigError,
    NetworkError,
    NotFoundError,
    OperationFailedError,
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
)
from vmstore.urls import has_query, normalize_endpoint, parse_http_url, redact_url

log = logging.getLogger("vmstore.http")

T = TypeVar("T")

DEFAULT_CHUNK_SIZE = 16 << 20
# A resource that keeps changing while it is downloaded is fetched again at most this often.
MAX_RESTARTS = 2


# --- the backend --------------------------------------------------------------------------


class HttpStorage(_many.BatchTransfers):
    """Storage on an HTTP(S) file server: nginx or Apache with WebDAV PUT/DELETE, an object
    store gateway, or (for downloads) any server, ``python -m http.server`` included."""

    def __init__(self, config: StorageConfig) -> None:
        self._config = config
        _logredact.install()  # no presigned URL's signature in urllib3/botocore logs
        self._chunk_size = config.chunk_size or DEFAULT_CHUNK_SIZE
        self._retry = RetryPolicy(max_retries=config.max_retries)
        # A scheme-less endpoint takes the scheme the type names; use_ssl=False forces http.
        self._use_ssl = config.type == "https" and config.use_ssl
        endpoint = normalize_endpoint(config.endpoint, use_ssl=self._use_ssl)  # early errors
        if endpoint:
            HostPolicy.from_config(config).check_host(urlsplit(endpoint).hostname or "")
        self._transport = _Transport(config)
        self._closed = False
        self._limiter = limiter_for(config)

    # -- closing (with: _many.BatchTransfers) ---------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._transport.close()

    def __repr__(self) -> str:
        return f"HttpStorage(endpoint={self._config.endpoint!r})"

    # -- URLs and calls -------------------------------------------------------------------

    def _url(self, url: str) -> str:
        resolved = parse_http_url(url, endpoint=self._config.endpoint, use_ssl=self._use_ssl)
        if unquote(urlsplit(resolved).path).endswith(SIDECAR_SUFFIX):
            raise InvalidConfigError(
                f"{redact_url(url)!r} names a vmstore metadata sidecar ({SIDECAR_SUFFIX}); "
                "choose another name"
            )
        return resolved

    def _writable_url(self, url: str, action: str) -> str:
        """A URL to PUT or DELETE: one with a query string (a presigned GET URL) is refused,
        since a sidecar or parent collection derived from it would carry a signature made
        for another path."""
        resolved = self._url(url)
        if has_query(resolved):
            raise InvalidConfigError(
                f"cannot {action} {redact_url(resolved)} through a URL with a query string (such "
                "as a presigned URL): it is fetched as it is and only itself, so it can only be "
                "downloaded; use the plain URL with StorageConfig.token, or the S3 backend"
            )
        return resolved

    def validate_url(self, url: str) -> None:
        self._url(url)

    def _error(self, exc: BaseException, action: str, url: str) -> StorageError:
        return storage_error(exc, action, url, token=self._transport.token)

    def _call(self, action: str, url: str, operation: Callable[[], T]) -> T:
        """One request with retries; transport failures become StorageErrors."""
        try:
            return self._retry.call(
                operation, classify=classify_retry, describe=f"{action} {redact_url(url)}"
            )
        except StorageError:
            raise
        except Exception as exc:
            if not _is_transport_failure(exc):
                raise
            raise self._error(exc, action, url) from exc

    def _head(self, url: str, action: str = "read metadata of") -> _Head:
        def head() -> _Head:
            if has_query(url):
                # A presigned URL is signed for GET: a HEAD with its signature is refused
                # (403, counted as a failed request by the store), so a one-byte ranged GET
                # answers instead, its Content-Range giving the size.
                return self._head_by_get(url, strict=True) or _Head.parse({})
            response = self._transport.send("HEAD", url)
            response.close()
            if response.status_code in (403, 405, 501):
                # Some servers allow GET only: a presigned S3 GET URL's signature does not
                # cover HEAD (403), minimal servers lack it (405/501). One byte tells the same.
                fallback = self._head_by_get(url)
                if fallback is not None:
                    return fallback
            _check(response, "HEAD")
            return _Head.parse(response.headers)

        return self._call(action, url, head)

    def _head_by_get(self, url: str, *, strict: bool = False) -> _Head | None:
        """HEAD's answers from ``GET`` with ``Range: bytes=0-0``; None if that fails too
        (``strict``: raise its HttpStatusError instead)."""
        response = self._transport.send("GET", url, headers={"Range": "bytes=0-0"}, stream=True)
        if strict:
            _check(response, "GET")  # before the probe is closed: an error body tells why
        _close_probe(response)
        # Decided by Content-Range, not by the status: rclone answers a range with 200.
        if _is_range_answer(response, 0, 0):
            return dataclasses.replace(_Head.parse(response.headers, ranged=True), ranged=True)
        if response.status_code == 200:
            return dataclasses.replace(_Head.parse(response.headers), ranged=False)
        return None

    # -- sidecar --------------------------------------------------------------------------

    def _read_sidecar(self, url: str, head: _Head) -> Sidecar | None:
        sidecar_url = _with_path_suffix(url, SIDECAR_SUFFIX)

        def get() -> bytes:
            response = _check(self._transport.send("GET", sidecar_url), "GET")
            return response.content

        try:
            text = self._call("read the metadata sidecar of", url, get)
        except NotFoundError:
            return None
        try:
            sidecar = Sidecar.from_json(text)
        except SidecarFormatError as exc:
            log.warning("ignoring unreadable sidecar %s: %s", redact_url(sidecar_url), exc)
            return None
        if not sidecar.describes(size=head.size, etag=head.validator.etag):
            log.warning(
                "ignoring stale sidecar %s: it describes another version of the file",
                redact_url(sidecar_url),
            )
            return None
        return sidecar

    def _write_sidecar(self, url: str, sidecar: Sidecar) -> None:
        body = sidecar.to_bytes()
        sidecar_url = _with_path_suffix(url, SIDECAR_SUFFIX)
        headers = {"Content-Type": "application/json"}

        def put() -> None:
            _check(
                self._transport.send("PUT", sidecar_url, headers=headers, body=lambda: body), "PUT"
            ).close()

        try:
            self._call("store the checksum sidecar of", url, put)
        except StorageError as exc:
            raise type(exc)(
                f"{redact_url(url)} was stored, but its checksum sidecar could not be, so the "
                f"server holds no checksum for it: {exc.message}",
                cause=exc,
            ) from exc

    # -- metadata / delete ----------------------------------------------------------------

    def get_metadata(self, url: str) -> FileMetadata:
        url = self._url(url)
        head = self._head(url)
        # A query URL is only itself: no sidecar URL is derived from it.
        sidecar = None if head.checksum or has_query(url) else self._read_sidecar(url, head)
        custom = dict(head.metadata)
        if sidecar is not None:
            custom.update(sidecar.metadata)
        custom.pop(SHA256_KEY, None)
        image_format, virtual_size = images.from_metadata(custom)
        if sidecar is not None and sidecar.image is not None:
            image_format, virtual_size = images.from_record(sidecar.image)
        for key in images.IMAGE_KEYS:
            custom.pop(key, None)
        last_modified = _http_date(head.validator.last_modified)
        if last_modified is None and sidecar is not None:
            with contextlib.suppress(ValueError):
                last_modified = datetime.fromisoformat(sidecar.uploaded_at).astimezone(UTC)
        size = head.size if head.size is not None else (sidecar.size if sidecar else 0)
        if sidecar is not None and sidecar.encoding is not None:
            size = sidecar.size  # the image's, not the stored frames'
        return FileMetadata(
            url=url,
            size=size,
            checksum=head.checksum or (sidecar.sha256 if sidecar else None),
            etag=_bare_etag(head.validator.etag),
            last_modified=last_modified or datetime.now(UTC),
            # The uploader's declared type beats the server's guess from the file name.
            content_type=sidecar.content_type if sidecar else head.content_type,
            custom_metadata=custom,
            image_format=image_format,
            virtual_size=virtual_size,
        )

    def _delete_one(self, url: str, action: str) -> None:
        def delete() -> None:
            response = self._transport.send("DELETE", url)
            response.close()
            if response.status_code in (404, 410):
                return  # cleanup is idempotent: a missing file is already deleted
            _check(response, "DELETE")

        self._call(action, url, delete)

    def delete(self, url: str) -> None:
        url = self._writable_url(url, "delete")
        self._delete_one(url, "delete")
        self._delete_one(_with_path_suffix(url, SIDECAR_SUFFIX), "delete the sidecar of")

    # -- what interrupted transfers left -------------------------------------------------

    def _owns(self, url: str) -> bool:
        try:
            self._url(url)
        except StorageError:
            return False
        return True

    def list_incomplete(self, prefix: str = "") -> list[IncompleteTransfer]:
        """HTTP keeps nothing of an unfinished PUT (it has no partial upload), so only the
        partials of downloads this host started from URLs under ``prefix``."""
        # A prefix may end in "/" (a directory): parsed as a file's URL one character longer.
        base = redact_url(self._url(prefix + "_"))[:-1] if prefix else ""
        return known_downloads(base, owns=self._owns if not prefix else None)

    def cleanup_incomplete(self, older_than: float | timedelta) -> list[IncompleteTransfer]:
        before = cutoff(older_than)
        return [
            transfer
            for transfer in self.list_incomplete()
            if transfer.modified <= before and remove_download(transfer)
        ]

    # -- download -------------------------------------------------------------------------

    def download(self, request: DownloadRequest) -> DownloadResponse:
        url = self._url(request.source_url)
        settings = DownloadSettings(
            chunk_size=self._chunk_size,
            concurrency=_many.concurrency_for(self._config.concurrency),
            retry=self._retry,
            classify=classify_retry,
            encryption_key=store_key(self._config.encryption_key),
        )
        for restart in range(MAX_RESTARTS + 1):
            try:
                # A fresh pacer per attempt: a failed attempt stops its own.
                pacer = pacer_for(self._limiter, request.cancel)
                obj, reader = self._prepare_download(url, pacer)
                attempt_settings = dataclasses.replace(settings, pacer=pacer)
                return download_object(obj, reader, request, attempt_settings)
            except _ResourceChangedError as exc:
                if restart == MAX_RESTARTS:
                    raise OperationFailedError(
                        f"could not download {redact_url(url)}: it kept changing on the server "
                        f"({MAX_RESTARTS + 1} attempts); retry when it is no longer written to",
                        cause=exc,
                    ) from exc
                log.warning("%s; starting over from zero", exc)
            except StorageError:
                raise
            except Exception as exc:
                if not _is_transport_failure(exc):
                    raise
                raise self._error(exc, "download", url) from exc
        raise AssertionError("unreachable")

    def _prepare_download(
        self, url: str, pacer: Pacer | None = None
    ) -> tuple[RemoteObject, _ObjectReader]:
        head = self._head(url)
        checksum = head.checksum
        encoding = None
        if checksum is None and not has_query(url):
            sidecar = self._read_sidecar(url, head)
            checksum = sidecar.sha256 if sidecar else None
            encoding = sidecar.encoding if sidecar else None
        size = head.size
        supports_ranges = head.accept_ranges != "none"
        # An encoded object of several frames is read frame by frame, whatever its size.
        several = size is not None and (
            size > self._chunk_size or (encoding is not None and len(encoding.frames) > 1)
        )
        if head.ranged is not None and size is not None:
            supports_ranges = head.ranged  # the ranged GET standing in for HEAD showed it
        elif size is None or (supports_ranges and several):
            # Decided by the answer, not by Accept-Ranges: some servers claim ranges and send
            # 200, others send 206 without the header.
            supports_ranges, total = self._probe_ranges(url, head.validator)
            size = size if size is not None else total
        if size is None:
            raise OperationFailedError(
                f"could not download {redact_url(url)}: the server tells neither its size "
                "(Content-Length) nor supports ranges"
            )
        validator = head.validator
        # Resume identity: the version (ETag, else Last-Modified) and the stored checksum, so
        # a same-size replacement within one second (nginx ETags are mtime-size) still shows.
        version = validator.etag or validator.last_modified
        identity = f"{version}|{checksum or ''}" if version else ""
        obj = RemoteObject(
            # Named in messages, logs and the resume state: never the query (a presigned
            # URL's signature), and a re-signed URL of the same file still resumes.
            url=redact_url(url),
            # An encoded object's size is its image's; the sidecar matched the stored size.
            size=encoding.plain_size if encoding is not None else size,
            etag=identity,
            checksum=checksum,
            supports_ranges=supports_ranges,
            encoding=encoding,
        )
        return obj, _ObjectReader(self._transport, url, size, validator, pacer)

    def _probe_ranges(self, url: str, validator: _Validator) -> tuple[bool, int | None]:
        """(whether the server honours Range, the total size its Content-Range gives)."""

        def probe() -> tuple[bool, int | None]:
            headers = {"Range": "bytes=0-0", **validator.request_headers()}
            response = self._transport.send("GET", url, headers=headers, stream=True)
            _close_probe(response)
            if response.status_code in (412, 416):
                raise _ResourceChangedError(f"{redact_url(url)} changed during the download")
            _check(response, "GET")
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            ranged = _is_range_answer(response, 0, 0)
            return ranged, _header_int(total)

        return self._call("download", url, probe)

    # -- upload ---------------------------------------------------------------------------

    def upload(self, request: UploadRequest) -> UploadResponse:
        """PUT the source in one pass (HTTP has no partial PUT: ``request.resume`` has nothing
        to resume). The SHA-256 is known only once the last byte is read, after the headers
        went out, so a server that keeps no checksum of its own gets a sidecar afterwards;
        a source that fits in one chunk is read first and its checksum sent as headers."""
        url = self._writable_url(request.destination_url, "upload to")
        metadata = normalize_custom_metadata(request.metadata)
        cancel = request.cancel

        def cancelled() -> bool:
            return cancel is not None and cancel.is_cancelled

        if cancelled():
            raise CancelledError(f"upload of {request.source_name} cancelled; nothing was stored")

        def open_plan() -> SourcePlan:
            # O_DIRECT where the file is on a local disk, as S3's upload reads: against nginx
            # on 127.0.0.1 (1 GiB, page cache dropped, same repetitions) 1.71-1.92 s and
            # 1.41-1.59 CPU-s against 2.02-2.41 s and 1.74-2.30 CPU-s read cached
            # (docs/BENCHMARKS.md, "Where the targets stand").
            return plan_source(request, lambda _size: self._chunk_size)

        plan = open_plan()
        content_type = (
            request.content_type
            or (mimetypes.guess_type(plan.name)[0] if not plan.is_stream else None)
            or DEFAULT_CONTENT_TYPE
        )
        # The first request, before any byte is read: refused credentials or a read-only
        # server fail now, not after a 100 GiB body.
        is_new = self._check_write_access(url) == 404
        if is_new:
            # A WebDAV server that does not create missing directories (Apache mod_dav,
            # nginx without create_full_put_path) would refuse the PUT only after receiving
            # all of it (409, or 500 from nginx).
            self._make_parent_collections(url)
        reporter = progress_for(request, plan.size)
        size = plan.size
        digest: str | None = None
        headers: dict[str, str]
        body_factory: Callable[[], Any]
        key = store_key(self._config.encryption_key)
        encoders: list[Encoder] = []
        encode = None
        if encoder_for(request, key) is not None:

            def encode(parts: Iterator[_native.SourcePart]) -> Iterator[EncodedPart]:
                # Each attempt of the PUT gets its own salt and nonces: nothing repeats.
                encoder = encoder_for(request, key)
                assert encoder is not None
                encoders.append(encoder)
                return encode_parts(
                    parts, encoder, concurrency=_many.concurrency_for(self._config.concurrency)
                )

        if encode is None and size is not None and size <= self._chunk_size:
            # Small enough to read before the PUT: its checksum goes in the headers, for a
            # server that keeps it itself.
            data = plan.read_whole()
            digest = plan.source.sha256()
            reporter.finish(size)  # before the PUT, as every final report precedes the commit
            headers = _upload_headers(
                size, digest, content_type, {**metadata, **images.metadata_of(plan.image, size)}
            )
            pacer = pacer_for(self._limiter, cancel)
            body_factory = lambda: PartBody(data, pacer)  # noqa: E731 - a fresh body per attempt
            body: _PipelineBody | None = None
        else:
            spent = [False]

            def reopen() -> SourcePlan:
                if spent[0]:
                    if plan.is_stream:
                        raise _StreamSpent(
                            f"could not upload {request.source_name} to {redact_url(url)}: the "
                            "PUT failed after part of the stream was sent, and a stream cannot "
                            "be read twice; run the upload again from the start"
                        )
                    return open_plan()
                spent[0] = True
                return plan

            # Encoded, the stored size is known only at the end: the body goes out chunked,
            # and the image record is only in the sidecar (the stored bytes are frames).
            body = _PipelineBody(
                reopen,
                None if encode is not None else size,
                lambda sent: reporter(sent, size or 0),
                cancelled,
                pacer_for(self._limiter, cancel),
                encode,
            )
            recorded = metadata if encode is not None else images.metadata_of(plan.image, size)
            headers = _upload_headers(
                None if encode is not None else size,
                None,
                content_type,
                {**metadata, **recorded},
            )
            body_factory = lambda: body  # noqa: E731

        made_parents = is_new

        def put() -> None:
            nonlocal made_parents
            response = self._transport.send("PUT", url, headers=headers, body=body_factory)
            if response.status_code == 409 and not made_parents:
                # WebDAV's answer when the parent collection is missing.
                response.close()
                made_parents = True
                self._make_parent_collections(url)
                response = self._transport.send("PUT", url, headers=headers, body=body_factory)
            _check(response, "PUT").close()

        try:
            self._call("upload to", url, put)
        except CallbackAbort as abort:
            raise abort.error from None
        except _StreamSpent as exc:
            raise NetworkError(str(exc), cause=exc.__context__) from exc
        if body is not None:
            assert body.plan is not None
            digest = body.plan.source.sha256()
            size = body.plan.source.position
        assert digest is not None and size is not None
        encoding = encoders[-1].encoding() if encoders else None
        stored = encoding.stored_size if encoding is not None else size
        head = self._head(url, "confirm the upload to")
        # No discard: nginx's PUT gives no ETag, so vmstore cannot tell its own object from a
        # later upload's.
        check_stored_size(redact_url(url), head.size, stored)
        recorded = {**metadata, **images.metadata_of(plan.image, size)}
        if encoding is not None or not _stores_natively(head, digest, recorded):
            # An encoded object always has its sidecar: it holds the frame index.
            self._write_sidecar(
                url,
                Sidecar(
                    sha256=digest,
                    size=size,
                    etag=head.validator.etag,
                    content_type=content_type,
                    metadata=metadata,
                    uploaded_at=datetime.now(UTC).isoformat(),
                    encoding=encoding,
                    image=images.record_of(plan.image, size) if plan.image else None,
                ),
            )
        reporter.finish(size)
        return UploadResponse(
            url=url,
            checksum=digest,
            bytes_transferred=size,
            etag=_bare_etag(head.validator.etag),
            size=size,
        )

    def _make_parent_collections(self, url: str) -> None:
        """MKCOL every directory above ``url``, top down; existing ones answer 405, and any
        refusal shows in the PUT that follows, so answers here are not errors."""
        parts = urlsplit(url)
        segments = parts.path.split("/")[1:-1]
        for depth in range(1, len(segments) + 1):
            directory = urlunsplit(parts._replace(path="/" + "/".join(segments[:depth]) + "/"))
            response = self._transport.send("MKCOL", directory)
            response.close()
            log.debug("MKCOL %s: %d", redact_url(directory), response.status_code)

    def _check_write_access(self, url: str) -> int:
        """Fail on refused credentials before hashing what may be a 100 GiB file; the HEAD's
        status (404: a new file)."""

        def head() -> int:
            response = self._transport.send("HEAD", url)
            response.close()
            if response.status_code in (401, 403) or _retryable_status(response.status_code):
                _check(response, "HEAD")
            return response.status_code

        return self._call("upload to", url, head)

    # -- many at once, and presigned URLs ---------------------------------------------------

    def _batch_destination(self, url: str) -> Hashable:
        """What ``upload_many`` compares to refuse two items writing one object."""
        return self._writable_url(url, "upload to")

    def presign(self, url: str, expires_in: int = 3600) -> str:
        """Presigned URLs are an S3 feature: always InvalidConfigError here."""
        _many.refuse_presign("HTTP")
