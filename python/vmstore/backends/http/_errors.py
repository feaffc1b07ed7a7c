"""The HTTP backend's errors: HttpStatusError, which answers retry (classify_retry), and the one
mapping of requests/urllib3/HTTP failures onto StorageError (storage_error)."""

from __future__ import annotations

import http.client
import re
import ssl
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import requests
import urllib3.exceptions

from vmstore._oserrors import storage_error_from_oserror
from vmstore._retry import RetryableError
from vmstore.backends.http._headers import _retry_after
from vmstore.errors import (
    InvalidConfigError,
    NetworkError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    StorageError,
)
from vmstore.urls import redact_url

# 5xx that retrying cannot fix: the server lacks the feature, or the space.
_PERMANENT_5XX = frozenset({501, 505, 506, 507, 508, 510, 511})


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
    error = _map_error(exc, action, redact_url(url))
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
