"""HTTP/HTTPS backend: requests speaks the protocol, the native core touches every byte.

Download: HEAD gives the size, the validators (ETag, Last-Modified) and any SHA-256 the server
advertises (``X-Checksum-SHA256``, RFC 9530 ``Repr-Digest``, RFC 3230 ``Digest``); the object
then comes through the shared ranged pipeline (:mod:`vmstore._download`). Every GET is pinned
to the version HEAD saw (``If-Match`` and ``If-Range`` on a strong ETag, else
``If-Unmodified-Since`` and ``If-Range`` on Last-Modified), and the answer's own validators
are compared too: a resource that changes mid-download is fetched again from zero, never
spliced. A server that answers a Range request with the whole object (200, no Content-Range)
gets one stream.

Upload: one native pass hashes the source; a PUT then streams it from the native ChunkReader
with Content-Length, ``X-Checksum-SHA256``, ``Repr-Digest`` and ``X-Metadata-<key>`` headers.
The sent bytes are hashed again on the way, and the last block is held back unless they hash
to the announced digest: a source that changed during the upload never completes a PUT.
A HEAD then confirms the stored size.

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

import base64
import binascii
import contextlib
import dataclasses
import email.utils
import http.client
import ipaddress
import logging
import mimetypes
import os
import re
import ssl
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urljoin, urlsplit, urlunsplit

import requests
import requests.adapters
import requests.auth
import urllib3.exceptions

from vmstore import _logredact, _many, _native, images
from vmstore._codec import EncodedPart, Encoder, encode_parts, store_key
from vmstore._download import DownloadSettings, RemoteObject, download_object
from vmstore._hostpolicy import HostPolicy, policy_adapter
from vmstore._incomplete import cutoff, known_downloads, remove_download
from vmstore._oserrors import storage_error_from_oserror
from vmstore._ratelimit import Pacer, limiter_for, pacer_for
from vmstore._retry import RetryableError, RetryPolicy
from vmstore._sidecar import SIDECAR_SUFFIX, Sidecar, SidecarFormatError
from vmstore._upload import (
    BODY_BLOCK,
    CallbackAbort,
    PartBody,
    PartFeed,
    SourcePlan,
    encoder_for,
    pace_body,
    part_view,
    plan_source,
    progress_for,
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
)
from vmstore.urls import has_query, normalize_endpoint, parse_http_url, redact_url

T = TypeVar("T")

log = logging.getLogger("vmstore.http")

DEFAULT_CHUNK_SIZE = 16 << 20
CHECKSUM_HEADER = "X-Checksum-SHA256"
METADATA_PREFIX = "x-metadata-"
MAX_REDIRECTS = 10
# A resource that keeps changing while it is downloaded is fetched again at most this often.
MAX_RESTARTS = 2
# Largest block a single-stream download hands to the writer at once.
STREAM_BLOCK = 4 << 20

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# 5xx that retrying cannot fix: the server lacks the feature, or the space.
_PERMANENT_5XX = frozenset({501, 505, 506, 507, 508, 510, 511})
# Header names are RFC 9110 tokens; other metadata keys travel only in the sidecar.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")
# Header values: printable ASCII except "%", which escapes everything else.
_HEADER_VALUE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class HttpStatusError(Exception):
    """The server answered with a status that is not success (raised before mapping)."""

    def __init__(
        self,
        method: str,
        status: int,
        reason: str,
        *,
        retry_after: float | None = None,
        code: str = "",
    ) -> None:
        super().__init__(f"{method} answered {status} {reason}".strip())
        self.method = method
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.code = code
        """The S3 error code of an XML error body (a presigned URL's server), else ""."""


class _ResourceChangedError(OperationFailedError):
    """The object is no longer the version HEAD described; the download starts over."""


# --- small pure helpers -------------------------------------------------------------------


def _display(url: str) -> str:
    """``url`` without user info, query or fragment: those may carry credentials."""
    return redact_url(url)


def _with_path_suffix(url: str, suffix: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path + suffix))


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _may_send_token(named_url: str, hop_url: str) -> bool:
    """The token goes to the origin the caller named, or its https upgrade, nowhere else."""
    named, hop = _origin(named_url), _origin(hop_url)
    if named == hop:
        return True
    return named == ("http", hop[1], 80) and hop == ("https", named[1], 443)


def _is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MAX_HEADER_DIGITS = 20
"""Digits of the largest number a header may carry here (2^64 has 20): a longer run is no
size, and int() never sees it (CPython refuses more than 4300 digits with ValueError)."""


def _header_int(value: str) -> int | None:
    """A header's non-negative decimal number, or None. ASCII digits only: str.isdigit() is
    also true for '²' (byte 0xB2 of a Latin-1 header), which int() refuses."""
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= MAX_HEADER_DIGITS:
        return int(value)
    return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if (seconds := _header_int(value)) is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _http_date(value: str) -> datetime | None:
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def _sha256_from_base64(text: str) -> str | None:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _sha256_from_hex_or_base64(text: str) -> str | None:
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return text.lower()
    return _sha256_from_base64(text)


def advertised_sha256(headers: Mapping[str, str]) -> str | None:
    """The SHA-256 a server advertises: ``X-Checksum-SHA256`` (hex, or base64),
    ``Repr-Digest: sha-256=:<base64>:`` (RFC 9530) or ``Digest: SHA-256=<base64>`` (RFC 3230)."""
    value = headers.get(CHECKSUM_HEADER)
    if value:
        digest = _sha256_from_hex_or_base64(value)
        if digest:
            return digest
    for member in headers.get("Repr-Digest", "").split(","):
        name, _, encoded = member.strip().partition("=")
        if name.strip().lower() == "sha-256" and encoded.startswith(":"):
            digest = _sha256_from_base64(encoded.strip().strip(":"))
            if digest:
                return digest
    for member in headers.get("Digest", "").split(","):
        name, _, encoded = member.strip().partition("=")
        if name.strip().lower() == "sha-256":
            digest = _sha256_from_base64(encoded)
            if digest:
                return digest
    return None


def _bare_etag(etag: str) -> str:
    """The ETag as FileMetadata shows it: quotes removed from a strong one."""
    return etag if etag.startswith("W/") else etag.strip('"')


def _weak_equal(a: str, b: str) -> bool:
    return a.removeprefix("W/") == b.removeprefix("W/")


def _reason(exc: BaseException) -> str:
    """A short cause for a transport failure; never the URL or its query string."""
    text = str(exc)
    if isinstance(exc, HttpStatusError):
        return f"HTTP {exc.status} {exc.reason}".strip()
    if isinstance(exc, RetryableError):
        return text
    verify = re.search(r"certificate verify failed: ([^(]+?)\s*\(_ssl", text)
    if verify:
        return f"certificate verify failed: {verify.group(1)}"
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno_text:
        return errno_text.group(1).strip().lower()
    lowered = text.lower()
    if "timed out" in lowered:
        return "no data within the idle timeout"
    if "incompleteread" in lowered or "connection broken" in lowered:
        return "the response body ended early"
    if "remotedisconnected" in lowered or "connection aborted" in lowered:
        return "the server closed the connection"
    return type(exc).__name__


# --- errors: classification for retries and the one mapping onto StorageError -----------

_TRANSIENT: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.DecodeError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)
_TLS: tuple[type[BaseException], ...] = (
    requests.exceptions.SSLError,
    urllib3.exceptions.SSLError,
)
_TLS_BROKEN_REASONS = frozenset(
    {"BAD_RECORD_MAC", "DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "UNEXPECTED_EOF_WHILE_READING",
     "SSLV3_ALERT_BAD_RECORD_MAC"}
)  # fmt: skip
"""OpenSSL's reasons for a record that was cut off or damaged in transit, not refused (the
last: the peer's alert that a record we sent arrived damaged)."""


def _tls_connection_broke(exc: BaseException) -> bool:
    """A TLS failure of the connection, not of the peer's identity: the connection was cut
    (an EOF inside a record, a reset) or a record arrived damaged (its MAC failed). Another
    connection may well succeed, unlike after a certificate that does not verify."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return False
        if isinstance(item, ssl.SSLEOFError | ConnectionResetError):
            return True
        if isinstance(item, ssl.SSLError) and item.reason in _TLS_BROKEN_REASONS:
            return True
        todo.extend([*item.args, getattr(item, "reason", None), item.__cause__, item.__context__])
    return False


_BAD_REQUEST_SETUP: tuple[type[BaseException], ...] = (
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidSchema,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidHeader,
)


def _retryable_status(status: int) -> bool:
    return status in (408, 429) or (status >= 500 and status not in _PERMANENT_5XX)


def classify_retry(exc: BaseException) -> RetryableError | None:
    """The transient HTTP failures worth another attempt (the request is redone whole)."""
    if isinstance(exc, StorageError | RetryableError):
        return exc if isinstance(exc, RetryableError) else None
    if isinstance(exc, HttpStatusError):
        if _retryable_status(exc.status):
            return RetryableError(f"HTTP {exc.status}", retry_after=exc.retry_after)
        return None
    if isinstance(exc, _TLS):
        if _tls_connection_broke(exc):
            return RetryableError("the TLS connection broke")
        return None  # a certificate does not become valid by asking again
    if isinstance(exc, _TRANSIENT):
        return RetryableError(_reason(exc))
    return None


def _is_transport_failure(exc: BaseException) -> bool:
    """Failures of the protocol or the network, which storage_error maps. Anything else (a
    progress callback's own exception, a bug) propagates as it is."""
    return isinstance(
        exc,
        HttpStatusError
        | RetryableError
        | requests.exceptions.RequestException
        | urllib3.exceptions.HTTPError
        | http.client.HTTPException
        | OSError,
    )


def storage_error(exc: BaseException, action: str, url: str, *, token: str = "") -> StorageError:
    """The one mapping from an HTTP/transport failure onto vmstore's error types."""
    error = _map_error(exc, action, _display(url))
    if token and token in error.message:
        # Belt and braces: no message ever carries the token, whatever a server echoed.
        error = type(error)(error.message.replace(token, "***"), cause=exc)
    secrets = _query_secrets(url)
    if any(secret in error.message for secret in secrets):
        # Nor a presigned URL's signature, whatever an exception's text held of the URL.
        message = error.message
        for secret in secrets:
            message = message.replace(secret, "REDACTED")
        error = type(error)(message, cause=exc)
    return error


def _query_secrets(url: str) -> list[str]:
    """The query of ``url`` and its longer values (signatures, credentials, tokens), as
    they could appear in a message: raw and percent-decoded, longest first."""
    query = urlsplit(url).query
    if not query:
        return []
    found = {query, unquote(query)}
    for _name, value in parse_qsl(query, keep_blank_values=True):
        if len(value) >= 8:
            found.update({value, quote(value, safe="")})
    return sorted(found, key=len, reverse=True)


def _map_error(exc: BaseException, action: str, where: str) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, HttpStatusError):
        status = exc.status
        what = f"could not {action} {where}"
        if status in (404, 410):
            return NotFoundError(f"{what}: no such file on the server ({status})", cause=exc)
        if exc.code in _S3_DENIED_CODES:
            # rclone answers an expired or mis-signed presigned URL with 400 AccessDenied.
            return PermissionDeniedError(
                f"{what}: the server refused access ({status} {exc.code}); a presigned URL "
                "may have expired or been altered (ask for a new one), otherwise check "
                "StorageConfig.token (VMSTORE_TOKEN) and the server's permissions",
                cause=exc,
            )
        if status in (401, 403):
            return PermissionDeniedError(
                f"{what}: the server refused access ({status} {exc.reason}); check "
                "StorageConfig.token (VMSTORE_TOKEN) and the server's permissions",
                cause=exc,
            )
        if status in (405, 501):
            return OperationFailedError(
                f"{what}: the server refuses {exc.method} ({status} {exc.reason}); enable "
                f"{exc.method} on it (nginx: dav_methods PUT DELETE) or use another backend",
                cause=exc,
            )
        if status in (412, 416):
            return OperationFailedError(
                f"{what}: the file changed on the server during the transfer ({status}); retry",
                cause=exc,
            )
        if status == 409:
            return OperationFailedError(
                f"{what}: the server refused it as a conflict (409); does the parent directory "
                "exist, and may it be created (WebDAV MKCOL)?",
                cause=exc,
            )
        if status == 413:
            return OperationFailedError(
                f"{what}: the file is too large for the server (413); raise its request body "
                "limit (nginx: client_max_body_size)",
                cause=exc,
            )
        if status == 507:
            return OperationFailedError(f"{what}: the server is out of space (507)", cause=exc)
        if _retryable_status(status):
            return NetworkError(
                f"{what}: the server kept failing ({status} {exc.reason}) after all retries; "
                "try again later",
                cause=exc,
            )
        return OperationFailedError(f"{what}: HTTP {status} {exc.reason}".rstrip(), cause=exc)
    if isinstance(exc, _TLS):
        reason = _reason(exc)
        if "certificate verify failed" in reason:
            return NetworkError(
                f"could not {action} {where}: TLS {reason}; set StorageConfig.ca_bundle "
                "(VMSTORE_CA_BUNDLE) to the CA certificate that signed the server's, or "
                "insecure_skip_verify=True for a test server",
                cause=exc,
            )
        if _tls_connection_broke(exc):
            return NetworkError(
                f"could not {action} {where}: the TLS connection broke ({reason}) after all "
                "retries; check the endpoint and the network, then retry",
                cause=exc,
            )
        return NetworkError(
            f"could not {action} {where}: TLS handshake failed ({reason}); check that the "
            "endpoint speaks HTTPS, or set ca_bundle / insecure_skip_verify",
            cause=exc,
        )
    if isinstance(exc, _BAD_REQUEST_SETUP):
        return InvalidConfigError(f"could not {action} {where}: {exc}", cause=exc)
    if isinstance(exc, RetryableError) or classify_retry(exc) is not None:
        return NetworkError(
            f"could not {action} {where}: {_reason(exc)} (after all retries); check the "
            "endpoint and the network, then retry",
            cause=exc,
        )
    if isinstance(exc, OSError) and not isinstance(exc, requests.exceptions.RequestException):
        return storage_error_from_oserror(exc, action, where)
    return OperationFailedError(f"could not {action} {where}: {_reason(exc)}", cause=exc)


# --- what HEAD says -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Validator:
    """The version of a resource that every read is pinned to."""

    etag: str
    last_modified: str

    @property
    def strong_etag(self) -> bool:
        return bool(self.etag) and not self.etag.startswith("W/")

    def request_headers(self) -> dict[str, str]:
        # If-Match makes a server that checks it answer 412; If-Range makes one that does not
        # send the whole new object (200) instead of a range of it. Weak ETags are useless
        # for both, so Last-Modified stands in.
        if self.strong_etag:
            return {"If-Match": self.etag, "If-Range": self.etag}
        if self.last_modified:
            return {"If-Unmodified-Since": self.last_modified, "If-Range": self.last_modified}
        return {}

    def changed(self, headers: Mapping[str, str]) -> bool:
        """Whether a response describes another version (for servers ignoring If-Match)."""
        etag = headers.get("ETag", "")
        if self.etag and etag:
            return not _weak_equal(self.etag, etag)
        modified = headers.get("Last-Modified", "")
        return bool(self.last_modified and modified and modified != self.last_modified)


@dataclass(frozen=True)
class _Head:
    size: int | None
    validator: _Validator
    content_type: str
    checksum: str | None
    metadata: dict[str, str]
    accept_ranges: str
    ranged: bool | None = None
    """From a ranged GET standing in for HEAD: whether the answer was the range asked for
    (None: learnt from HEAD, not probed)."""

    @classmethod
    def parse(cls, headers: Mapping[str, str], *, ranged: bool = False) -> _Head:
        """From a HEAD's headers, or (``ranged``) from a 206's, whose size is in
        Content-Range."""
        if ranged:
            length = headers.get("Content-Range", "").rpartition("/")[2]
        else:
            length = headers.get("Content-Length", "")
        metadata: dict[str, str] = {}
        for name, value in headers.items():
            if name.lower().startswith(METADATA_PREFIX):
                key = name[len(METADATA_PREFIX) :].lower()
                if key and key != SHA256_KEY:
                    metadata[key] = unquote(value)
        content_type = headers.get("Content-Type", "").strip() or DEFAULT_CONTENT_TYPE
        return cls(
            size=_header_int(length),
            validator=_Validator(headers.get("ETag", ""), headers.get("Last-Modified", "")),
            content_type=content_type,
            checksum=advertised_sha256(headers),
            metadata=metadata,
            accept_ranges=headers.get("Accept-Ranges", "").strip().lower(),
        )


# --- transport ----------------------------------------------------------------------------


class _BearerAuth(requests.auth.AuthBase):
    """Sets (or, for a foreign hop, removes) the Authorization header. Passing an auth object
    on every request also keeps requests from filling one in from ~/.netrc."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self._token:
            request.headers["Authorization"] = f"Bearer {self._token}"
        else:
            request.headers.pop("Authorization", None)
        return request


BodyFactory = Callable[[], Any]


class _Transport:
    """One requests.Session, redirects followed by hand so the token never leaves its host."""

    def __init__(self, config: StorageConfig) -> None:
        self.token = config.token
        self._timeout = (config.timeout, config.timeout)
        self._verify: bool | str = True
        if config.insecure_skip_verify:
            self._verify = False
        elif config.ca_bundle:
            if not os.path.isfile(config.ca_bundle):
                raise InvalidConfigError(
                    f"invalid StorageConfig.ca_bundle: {config.ca_bundle} is not a file; give "
                    "the path of a PEM file holding the CA certificate(s) to trust"
                )
            self._verify = config.ca_bundle
        session = requests.Session()
        # Byte ranges must be ranges of the file itself, not of a compressed rendition.
        session.headers.update({"Accept-Encoding": "identity", "User-Agent": _user_agent()})
        # Retries are vmstore's (RetryPolicy), so max_retries means one thing everywhere.
        # Every connection resolves through the host policy and goes to the checked address.
        self.policy = HostPolicy.from_config(config)
        adapter = policy_adapter(
            self.policy, pool_connections=4, pool_maxsize=config.concurrency + 4, max_retries=0
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._session = session
        self._warned_plain_http = False

    def close(self) -> None:
        self._session.close()

    def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: BodyFactory | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """One request, redirects followed; the response is returned whatever its status."""
        hop = url
        for _ in range(MAX_REDIRECTS + 1):
            with_token = bool(self.token) and _may_send_token(url, hop)
            if (
                with_token
                and hop.startswith("http://")
                and not _is_loopback(hop)
                and not self._warned_plain_http
            ):
                self._warned_plain_http = True
                log.warning("sending the bearer token over plain http to %s", _display(hop))
            self.policy.check_url(hop)  # each hop: a redirect may point anywhere
            response = self._session.request(
                method,
                hop,
                headers=dict(headers or {}),
                # A fresh body per hop: a redirected PUT re-reads the source, never a spent one.
                data=body() if body is not None else None,
                stream=stream,
                allow_redirects=False,
                timeout=self._timeout,
                verify=self._verify,
                auth=_BearerAuth(self.token if with_token else None),
            )
            location = response.headers.get("Location")
            if response.status_code not in _REDIRECTS or not location:
                return response
            if response.status_code == 303 and method not in ("GET", "HEAD"):
                return response
            response.close()
            hop = urljoin(hop, location)
            log.debug("%s %s redirected to %s", method, _display(url), _display(hop))
        raise HttpStatusError(method, 310, f"more than {MAX_REDIRECTS} redirects")


def _user_agent() -> str:
    from vmstore import __version__

    return f"vmstore/{__version__} python-requests/{requests.__version__}"


def _is_range_answer(response: requests.Response, start: int, last: int) -> bool:
    """Whether a success carries exactly bytes ``start``-``last``: a 206, or a 200 with that
    Content-Range (rclone's answer)."""
    content_range = response.headers.get("Content-Range", "")
    return response.status_code in (200, 206) and content_range.startswith(
        f"bytes {start}-{last}/"
    )


def _close_probe(response: requests.Response) -> None:
    """Finish a one-byte ``Range: bytes=0-0`` probe. A 206 carries that byte: reading it
    returns the connection to the pool for the ranged GETs that follow. Any other answer is
    closed unread, dropping the connection: a server ignoring Range sends the whole file."""
    if _is_range_answer(response, 0, 0):
        # .content, not raw.read: requests pools the connection only once it saw the body.
        with contextlib.suppress(requests.RequestException, OSError):
            _ = response.content
    response.close()


def _check(response: requests.Response, method: str) -> requests.Response:
    """Raise HttpStatusError unless the response is a success."""
    if 200 <= response.status_code < 300:
        return response
    retry_after = _retry_after(response.headers.get("Retry-After"))
    code = _s3_error_code(response) if response.status_code in (400, 403) else ""
    response.close()
    raise HttpStatusError(
        method, response.status_code, response.reason or "", retry_after=retry_after, code=code
    )


_S3_DENIED_CODES = frozenset(
    {"AccessDenied", "ExpiredToken", "SignatureDoesNotMatch", "InvalidAccessKeyId",
     "AuthorizationQueryParametersError", "InvalidToken", "TokenRefreshRequired"}
)  # fmt: skip
_S3_ERROR_CODE = re.compile(rb"<Code>\s*([A-Za-z]+)\s*</Code>")


def _s3_error_code(response: requests.Response) -> str:
    """The ``<Code>`` of an S3 XML error body (at most its first 4 KiB are read)."""
    if "xml" not in response.headers.get("Content-Type", "").lower():
        return ""
    try:
        # The first block of the body, whether it was streamed or already read.
        head: bytes = next(response.iter_content(4096), b"")
    except (OSError, requests.RequestException, urllib3.exceptions.HTTPError):
        return ""
    match = _S3_ERROR_CODE.search(head)
    return match.group(1).decode() if match else ""


def _read_exactly(response: requests.Response, length: int, pacer: Pacer | None = None) -> bytes:
    # raw.read(n) loops in C until n bytes or the end: one call per chunk, not per 10 KiB
    # as iter_content would do (with a bandwidth limit: one call per paced block).
    data: bytes
    if pacer is not None:
        data = pacer.read(lambda n: response.raw.read(n, decode_content=False), length)
    else:
        data = response.raw.read(length, decode_content=False)
    if len(data) != length:
        raise RetryableError(f"the response body ended after {len(data)} of {length} bytes")
    return data


class _ObjectReader:
    """The ObjectReader of the shared pipeline: GETs pinned to one version of the resource."""

    def __init__(
        self,
        transport: _Transport,
        url: str,
        size: int,
        validator: _Validator,
        pacer: Pacer | None = None,
    ):
        self._transport = transport
        self._url = url
        self._size = size
        self._validator = validator
        self._pacer = pacer

    def _get(self, headers: dict[str, str]) -> requests.Response:
        response = self._transport.send(
            "GET", self._url, headers={**headers, **self._validator.request_headers()}, stream=True
        )
        if response.status_code in (412, 416):
            response.close()
            raise _ResourceChangedError(f"{_display(self._url)} changed during the download")
        _check(response, "GET")
        if self._validator.changed(response.headers):
            response.close()
            raise _ResourceChangedError(f"{_display(self._url)} changed during the download")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            response.close()
            raise OperationFailedError(
                f"{_display(self._url)} was sent {encoding}-encoded although identity was "
                "asked for; its bytes cannot be ranges of the file"
            )
        return response

    def read_range(self, start: int, end: int) -> bytes:
        response = self._get({"Range": f"bytes={start}-{end - 1}"})
        with contextlib.closing(response):
            # A 200 with a Content-Range is a range too (rclone answers so).
            if response.status_code == 206 or response.headers.get("Content-Range"):
                expected = f"bytes {start}-{end - 1}/"
                content_range = response.headers.get("Content-Range", "")
                total = content_range.rpartition("/")[2]
                if not content_range.startswith(expected):
                    raise RetryableError(f"asked for {expected}*, got {content_range!r}")
                if total not in ("*", str(self._size)):
                    raise _ResourceChangedError(
                        f"{_display(self._url)} is now {total} bytes, not {self._size}"
                    )
            elif not (start == 0 and end == self._size):
                # The whole object for a part of it: fine only when the part is the whole.
                raise RetryableError(f"the server ignored Range bytes={start}-{end - 1}")
            return _read_exactly(response, end - start, self._pacer)

    def read_stream(self) -> Iterable[bytes]:
        response = self._get({})
        block_size = STREAM_BLOCK if self._pacer is None else self._pacer.block
        with contextlib.closing(response):
            while True:
                if self._pacer is not None:
                    self._pacer.take(block_size)
                block: bytes = response.raw.read(block_size, decode_content=False)
                if not block:
                    return
                yield block


class _PipelineBody:
    """One PUT body: the source's parts as the one pass reads and hashes them
    (:class:`vmstore._upload.PartFeed`), handed to the socket in 1 MiB views of the native
    buffers.

    ``len()`` gives requests the Content-Length when the size is known (a file, a stream's size
    hint; 0 makes requests send it chunked). Progress is reported before a block goes out, and
    the last block is held back until the source is known to be complete, of the announced
    size and unchanged: otherwise the body stays incomplete and the server stores nothing.
    Iterating again (a retried or redirected PUT) reads a file again from its start; a stream
    cannot be read twice.
    """

    def __init__(
        self,
        open_plan: Callable[[], SourcePlan],
        size: int | None,
        report: Callable[[int], None],
        cancelled: Callable[[], bool],
        pacer: Pacer | None = None,
        encode: Callable[[Iterator[_native.SourcePart]], Iterator[EncodedPart]] | None = None,
    ) -> None:
        self._open_plan = open_plan
        self._size = size
        self._report = report
        self._cancelled = cancelled
        self._pacer = pacer
        self._block = BODY_BLOCK if pacer is None else pacer.block
        self._encode = encode
        """The frame stage of an encoded upload (a fresh encoder per attempt)."""
        self.plan: SourcePlan | None = None
        self.sent = 0

    def __len__(self) -> int:
        return self._size or 0

    def __bool__(self) -> bool:
        # requests replaces a falsy body with an empty one (`data or {}`): an unsized stream
        # (len 0) is still a body.
        return True

    def _blocks(self, feed: PartFeed) -> Iterator[tuple[memoryview, int]]:
        """Body blocks, each with the image bytes done once it is sent (what progress counts:
        an encoded part's frame is credited in proportion)."""
        parts: Iterator[_native.SourcePart | EncodedPart]
        parts = self._encode(iter(feed)) if self._encode is not None else iter(feed)
        for part in parts:
            view = part_view(part)
            for start in range(0, len(view), self._block):
                block = view[start : start + self._block]
                done = part.offset + part.length * (start + len(block)) // len(view)
                yield block, done

    def __iter__(self) -> Iterator[memoryview]:
        plan = self._open_plan()
        self.plan, self.sent = plan, 0
        with PartFeed(plan, cancel=None) as feed:
            blocks = self._blocks(feed)
            held, done = next(blocks, (None, 0))
            while held is not None:
                if self._cancelled():
                    raise CancelledError(f"upload of {plan.name} cancelled; nothing was stored")
                following, following_done = next(blocks, (None, 0))
                if following is None:
                    # The last block: only a complete, unchanged source gets it sent.
                    plan.check_complete(plan.source.position)
                self.sent += len(held)
                try:
                    self._report(done)
                except Exception as exc:  # noqa: BLE001 - the caller's own exception, carried out
                    raise CallbackAbort(exc) from None
                # Within the store's bandwidth limit, as the block goes to the socket.
                pace_body(self._pacer, len(held))
                yield held
                held, done = following, following_done


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
            self._transport.close()

    def __repr__(self) -> str:
        return f"HttpStorage(endpoint={self._config.endpoint!r})"

    # -- URLs and calls -------------------------------------------------------------------

    def _url(self, url: str) -> str:
        resolved = parse_http_url(url, endpoint=self._config.endpoint, use_ssl=self._use_ssl)
        if unquote(urlsplit(resolved).path).endswith(SIDECAR_SUFFIX):
            raise InvalidConfigError(
                f"{_display(url)!r} names a vmstore metadata sidecar ({SIDECAR_SUFFIX}); "
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
                f"cannot {action} {_display(resolved)} through a URL with a query string (such "
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
                operation, classify=classify_retry, describe=f"{action} {_display(url)}"
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
            log.warning("ignoring unreadable sidecar %s: %s", _display(sidecar_url), exc)
            return None
        if not sidecar.describes(size=head.size, etag=head.validator.etag):
            log.warning(
                "ignoring stale sidecar %s: it describes another version of the file",
                _display(sidecar_url),
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
                f"{_display(url)} was stored, but its checksum sidecar could not be, so the "
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
        base = _display(self._url(prefix + "_"))[:-1] if prefix else ""
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
                        f"could not download {_display(url)}: it kept changing on the server "
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
                f"could not download {_display(url)}: the server tells neither its size "
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
            url=_display(url),
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
                raise _ResourceChangedError(f"{_display(url)} changed during the download")
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
                            f"could not upload {request.source_name} to {_display(url)}: the "
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
        if head.size is not None and head.size != stored:
            raise ChecksumMismatchError(
                f"{_display(url)} holds {head.size} bytes after the upload, expected {stored}"
            )
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
            log.debug("MKCOL %s: %d", _display(directory), response.status_code)

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


def _upload_headers(
    size: int | None, digest: str | None, content_type: str, metadata: dict[str, str]
) -> dict[str, str]:
    headers = {"Content-Type": content_type}
    if size is not None:
        headers["Content-Length"] = str(size)
    if digest is not None:
        headers[CHECKSUM_HEADER] = digest
        headers["Repr-Digest"] = f"sha-256=:{base64.b64encode(bytes.fromhex(digest)).decode()}:"
    for key, value in metadata.items():
        if _TOKEN.match(key):
            headers[f"X-Metadata-{key}"] = quote(value, safe=_HEADER_VALUE_SAFE)
    return headers


class _StreamSpent(Exception):
    """A stream body was asked for a second time (a retried PUT)."""


def _stores_natively(head: _Head, digest: str, metadata: dict[str, str]) -> bool:
    """Whether the server itself kept the checksum and every metadata key (then no sidecar)."""
    return head.checksum == digest and all(head.metadata.get(k) == v for k, v in metadata.items())


__all__ = ["HttpStatusError", "HttpStorage", "advertised_sha256", "classify_retry", "storage_error"]
