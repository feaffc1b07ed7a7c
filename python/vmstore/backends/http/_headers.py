"""What HTTP headers say and what the backend sends: numbers, dates, validators (ETag,
Last-Modified), the SHA-256 a server advertises, the HEAD answer (_Head), upload headers."""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote

from vmstore.models import (
    DEFAULT_CONTENT_TYPE,
    SHA256_KEY,
)

CHECKSUM_HEADER = "X-Checksum-SHA256"
METADATA_PREFIX = "x-metadata-"
# Header names are RFC 9110 tokens; other metadata keys travel only in the sidecar.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")
# Header values: printable ASCII except "%", which escapes everything else.
_HEADER_VALUE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


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


def _stores_natively(head: _Head, digest: str, metadata: dict[str, str]) -> bool:
    """Whether the server itself kept the checksum and every metadata key (then no sidecar)."""
    return head.checksum == digest and all(head.metadata.get(k) == v for k, v in metadata.items())
