"""Parsing of the URL forms the backends accept; pure functions that never touch a file.

- NFS: ``nfs://rel/path``, ``/abs/path`` inside the mount point, ``rel/path``.
- S3: ``s3://bucket/key``, ``https://host/bucket/key`` (path style) or
  ``https://bucket.host/key`` (virtual-hosted, when the host is the endpoint's),
  ``/key`` or ``key`` in the configured bucket.
- HTTP: absolute ``http(s)://host/path``; ``/path`` or ``path`` joined onto the endpoint.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

from vmstore.errors import InvalidConfigError, PermissionDeniedError

NFS_SCHEME = "nfs"
S3_SCHEME = "s3"

_SCHEME_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Characters left as they are when a relative HTTP path is put into a URL; "%" stays so an
# already percent-encoded path is not encoded twice.
_HTTP_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


def url_scheme(url: str) -> str:
    """The lower-case scheme of ``url`` ("" for a plain path)."""
    match = _SCHEME_PREFIX.match(url)
    return match.group(1).lower() if match else ""


def _split(url: str, what: str) -> SplitResult:
    """urlsplit, with its ValueError (e.g. an unclosed "[" IPv6 host) as InvalidConfigError."""
    try:
        return urlsplit(url)
    except ValueError as exc:
        raise InvalidConfigError(
            f"{what} {redact_url(url)!r} is not a valid URL: {exc}", cause=exc
        ) from exc


def _check_text(url: object, what: str) -> str:
    if not isinstance(url, str) or not url:
        raise InvalidConfigError(f"{what} URL must be a non-empty string, got {url!r}")
    if "\x00" in url:
        raise InvalidConfigError(f"{what} URL {url!r} contains a NUL character")
    return url


# --- NFS ----------------------------------------------------------------------------------


def parse_nfs_url(url: str, mount_points: Sequence[str]) -> str:
    """The path that ``url`` names, relative to the mount point (or absolute, inside it).

    Only lexical checks happen here: the result is relative and does not climb out with
    ``..``, or is absolute and lies under one of ``mount_points`` (the configured mount
    point and its real path). Symlinks are the caller's to resolve and check, because that
    needs the file system. Raises :class:`InvalidConfigError` for a URL of another scheme,
    or one that names no file (empty, ending in ``/``, ``.`` or ``..``), and
    :class:`PermissionDeniedError` for a path outside the mount point.
    """
    _check_text(url, "NFS")
    scheme = url_scheme(url)
    if scheme and scheme != NFS_SCHEME:
        raise InvalidConfigError(
            f"{url!r} is not an NFS URL; use nfs://rel/path, /abs/path inside the mount "
            "point, or rel/path"
        )
    path = url[len(NFS_SCHEME) + 3 :] if scheme else url
    try:
        os.fsencode(path)  # a surrogate that stands for no byte of a file name
    except UnicodeEncodeError as exc:
        raise InvalidConfigError(
            f"NFS URL {url!r} is not a file name this system can represent", cause=exc
        ) from exc
    last_component = path.rsplit("/", 1)[-1]
    if last_component in ("", ".", ".."):
        raise InvalidConfigError(
            f"NFS URL {url!r} names a directory, not a file; give the file's path, "
            "e.g. nfs://vm-exports/disk.qcow2"
        )
    normalized = posixpath.normpath(path)
    if posixpath.isabs(path):
        for mount_point in mount_points:
            mount = posixpath.normpath(mount_point)
            if normalized.startswith(mount.rstrip("/") + "/"):
                return path
        raise PermissionDeniedError(
            f"{url!r} is outside the mount point {mount_points[0]}; give a path inside it "
            "or one relative to it"
        )
    if normalized == ".." or normalized.startswith("../"):
        raise PermissionDeniedError(
            f"{url!r} climbs out of the mount point with '..'; give a path inside it"
        )
    return path


def nfs_url(relative_path: str) -> str:
    """The canonical URL of a file at ``relative_path`` inside the mount point."""
    return f"{NFS_SCHEME}://{relative_path}"


# --- S3 -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Location:
    """An object in an S3 bucket."""

    bucket: str
    key: str


def normalize_endpoint(endpoint: str, *, use_ssl: bool = True) -> str:
    """``endpoint`` with a scheme (https unless ``use_ssl`` is false) and no trailing slash."""
    endpoint = endpoint.strip()
    if not endpoint:
        return ""
    if not url_scheme(endpoint):
        endpoint = f"{'https' if use_ssl else 'http'}://{endpoint}"
    parts = _split(endpoint, "endpoint")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidConfigError(
            f"endpoint {endpoint!r} is not an http(s) URL; use e.g. https://s3.example.com"
        )
    return endpoint.rstrip("/")


S3_MAX_KEY_BYTES = 1024
"""S3's limit on an object key, in bytes of UTF-8 (some servers store longer keys; AWS does not)."""


def _check_key(key: str, url: str) -> str:
    if not key or key.endswith("/"):
        raise InvalidConfigError(
            f"S3 URL {url!r} names no object (empty key, or one ending in '/'); use s3://bucket/key"
        )
    try:
        length = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a badly decoded name
        raise InvalidConfigError(f"S3 key in {url!r} is not valid Unicode text", cause=exc) from exc
    if length > S3_MAX_KEY_BYTES:
        raise InvalidConfigError(
            f"S3 key of {url[:80]!r}... is {length} bytes of UTF-8; S3 allows at most "
            f"{S3_MAX_KEY_BYTES}: choose a shorter name"
        )
    return key


def parse_s3_url(
    url: str, *, default_bucket: str = "", endpoint: str = "", use_ssl: bool = True
) -> S3Location:
    """Bucket and key of ``url``; ``default_bucket`` serves the ``/key`` form."""
    _check_text(url, "S3")
    scheme = url_scheme(url)
    if scheme == S3_SCHEME:
        bucket, _, key = url[len(S3_SCHEME) + 3 :].partition("/")
        if not bucket:
            raise InvalidConfigError(f"S3 URL {url!r} has no bucket; use s3://bucket/key")
        return S3Location(bucket, _check_key(key, url))
    if scheme in ("http", "https"):
        parts = _split(url, "S3 URL")
        path = unquote(parts.path).lstrip("/")
        base = normalize_endpoint(endpoint, use_ssl=use_ssl)
        endpoint_host = _split(base, "endpoint").hostname or ""
        host = parts.hostname or ""
        virtual_bucket = host[: -len(endpoint_host) - 1]
        if endpoint_host and host.endswith("." + endpoint_host) and virtual_bucket.strip("."):
            # Virtual-hosted style: the bucket is the first label of the host name.
            return S3Location(virtual_bucket, _check_key(path, url))
        bucket, _, key = path.partition("/")
        if not bucket:
            raise InvalidConfigError(
                f"S3 URL {url!r} has no bucket in its path; use https://host/bucket/key"
            )
        return S3Location(bucket, _check_key(key, url))
    if scheme:
        raise InvalidConfigError(
            f"{url!r} is not an S3 URL; use s3://bucket/key, https://host/bucket/key or /key"
        )
    if not default_bucket:
        raise InvalidConfigError(
            f"S3 URL {url!r} has no bucket and none is configured; set StorageConfig.bucket "
            "(VMSTORE_BUCKET) or use s3://bucket/key"
        )
    return S3Location(default_bucket, _check_key(url.lstrip("/"), url))


def s3_url(location: S3Location) -> str:
    """The canonical ``s3://bucket/key`` URL of an object."""
    return f"{S3_SCHEME}://{location.bucket}/{location.key}"


# --- HTTP ---------------------------------------------------------------------------------


def parse_http_url(url: str, *, endpoint: str = "", use_ssl: bool = True) -> str:
    """The absolute http(s) URL that ``url`` names.

    An absolute URL is taken as it is. A relative one (``/path`` or ``path``) is put under
    the endpoint's path, so ``/disk.qcow2`` with endpoint ``https://host/exports`` is
    ``https://host/exports/disk.qcow2``: like S3's ``/key``, it means "in the configured
    place", and it cannot climb above it with ``..``.
    """
    _check_text(url, "HTTP")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no request can carry it
        raise InvalidConfigError(
            f"HTTP URL {redact_url(url)!r} is not valid Unicode text", cause=exc
        ) from exc
    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        parts = _split(url, "HTTP URL")
        if not parts.netloc:
            raise InvalidConfigError(f"HTTP URL {redact_url(url)!r} has no host")
        if not parts.path.strip("/") or parts.path.endswith("/"):
            raise InvalidConfigError(
                f"HTTP URL {redact_url(url)!r} names no file; give the file's path"
            )
        return url
    if scheme:
        raise InvalidConfigError(
            f"{url!r} is not an HTTP URL; use http(s)://host/path or a path on the endpoint"
        )
    base = normalize_endpoint(endpoint, use_ssl=use_ssl)
    if not base:
        raise InvalidConfigError(
            f"relative URL {url!r} needs an endpoint; set StorageConfig.endpoint "
            "(VMSTORE_ENDPOINT) or give an absolute http(s):// URL"
        )
    path = url.lstrip("/")
    if not path or path.endswith("/"):
        raise InvalidConfigError(f"HTTP URL {url!r} names no file; give the file's path")
    if ".." in path.split("/"):
        raise InvalidConfigError(f"HTTP path {url!r} may not contain '..' segments")
    return f"{base}/{quote(path, safe=_HTTP_PATH_SAFE)}"


# --- what logs and messages show of a URL ---------------------------------------------------


def has_query(url: str) -> bool:
    """Whether ``url`` carries a query string (a presigned URL: it is fetched as it is and
    only itself, since its signature covers that one path)."""
    return bool(urlsplit(url).query) if isinstance(url, str) else False


def redact_url(url: str) -> str:
    """``url`` as logs, error messages, reprs and resume state show it: without user info,
    query or fragment, which may carry credentials (a presigned URL's ``X-Amz-Signature``,
    ``X-Amz-Credential``, ``X-Amz-Security-Token``; a ``user:password@``).

    The one helper every place that prints a URL uses. Keying resume state by this form also
    lets a re-issued presigned URL of the same object resume (the ETag pins the version)."""
    if not isinstance(url, str):
        return repr(url)
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL urlsplit takes (an unclosed "[" host): cut by hand
        head = url.split("#", 1)[0].split("?", 1)[0]
        scheme, sep, rest = head.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else head
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) if parts.scheme else parts.path
