"""Requests, responses and object metadata exchanged with a :class:`vmstore.Storage`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from vmstore.errors import InvalidConfigError

if TYPE_CHECKING:
    from vmstore._native import CancelToken

ProgressCallback = Callable[[int, int], object]
"""``callback(transferred, total)``: at most every 100 ms, monotonic, last call (total, total)."""

DEFAULT_CONTENT_TYPE = "application/octet-stream"

SHA256_KEY = "sha256"
"""The metadata key under which a store keeps the whole-object SHA-256 (hidden from callers)."""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def parse_sha256_hex(value: str, what: str = "expected_checksum") -> str:
    """Return ``value`` as 64 lowercase hex digits, or raise InvalidConfigError naming ``what``.

    Accepts upper case and a ``sha256:`` prefix, the forms other tools print.
    """
    if not isinstance(value, str):
        raise InvalidConfigError(f"{what} must be a string of 64 hex digits")
    digest = value.strip().lower().removeprefix("sha256:")
    if not _SHA256_HEX.fullmatch(digest):
        raise InvalidConfigError(
            f"{what} {value!r} is not a SHA-256: expected 64 hex digits (as sha256sum prints)"
        )
    return digest


def normalize_custom_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Lower-case the keys (stores differ in case) and check that keys and values are text.

    The ``sha256`` key is refused: the store's copy of it must be the checksum vmstore
    computed, never a caller's claim.
    """
    normalized: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.strip():
            raise InvalidConfigError(f"metadata key {key!r} must be a non-empty string")
        if not isinstance(value, str):
            raise InvalidConfigError(
                f"metadata value for {key!r} must be a string, not {type(value).__name__}"
            )
        key = key.strip().lower()
        if key == SHA256_KEY:
            raise InvalidConfigError(
                f"metadata key {SHA256_KEY!r} is reserved: vmstore computes and stores the "
                "SHA-256 itself; remove it from the metadata"
            )
        normalized[key] = value
    return normalized


@dataclass
class UploadRequest:
    """Upload ``source_path`` (a local file) to ``destination_url``.

    ``resume=True`` continues an interrupted upload of the same file to the same place;
    ``cancel`` (a :class:`vmstore.CancelToken`) stops the transfer at the next chunk.
    """

    source_path: str
    destination_url: str
    metadata: dict[str, str] = field(default_factory=dict)
    progress_callback: ProgressCallback | None = None
    content_type: str | None = None
    resume: bool = True
    cancel: CancelToken | None = None

    def __post_init__(self) -> None:
        self.source_path = os.fspath(self.source_path)


@dataclass(frozen=True)
class UploadResponse:
    """What an upload stored: ``checksum`` is the SHA-256 of the whole object (64 hex).

    ``bytes_transferred`` counts the bytes moved by this call; a verified resumed prefix of
    ``resumed_from`` bytes is not counted.
    """

    url: str
    checksum: str
    bytes_transferred: int
    etag: str
    size: int
    resumed_from: int = 0


@dataclass
class DownloadRequest:
    """Download ``source_url`` into the local file ``destination_path``.

    The bytes are checked against ``expected_checksum`` when given, otherwise (when
    ``verify_checksum``) against the checksum the store holds; on a mismatch the destination
    keeps what it held before.
    """

    source_url: str
    destination_path: str
    verify_checksum: bool = True
    expected_checksum: str | None = None
    progress_callback: ProgressCallback | None = None
    resume: bool = True
    cancel: CancelToken | None = None

    def __post_init__(self) -> None:
        self.destination_path = os.fspath(self.destination_path)


@dataclass(frozen=True)
class DownloadResponse:
    """What a download wrote: ``checksum`` is the SHA-256 of the whole file (64 hex)."""

    checksum: str
    content_length: int
    bytes_transferred: int
    destination_path: str
    resumed_from: int = 0


@dataclass(frozen=True)
class FileMetadata:
    """An object as the store describes it.

    ``checksum`` is ``None`` when the store holds none; ``last_modified`` is timezone-aware
    UTC; ``custom_metadata`` keys are lower-case and never include the internal sha256 key.
    """

    url: str
    size: int
    checksum: str | None
    etag: str
    last_modified: datetime
    content_type: str = DEFAULT_CONTENT_TYPE
    custom_metadata: dict[str, str] = field(default_factory=dict)
