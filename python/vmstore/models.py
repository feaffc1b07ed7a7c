"""Requests, responses and object metadata exchanged with a :class:`vmstore.Storage`."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from vmstore.errors import InvalidConfigError
from vmstore.urls import redact_url

if TYPE_CHECKING:
    from vmstore._native import CancelToken

ProgressCallback = Callable[[int, int], object]
"""``callback(transferred, total)``: at most every 100 ms, monotonic, last call (total, total).

It is called from one of vmstore's threads (not necessarily the caller's). For a stream of
unknown size ``total`` is 0 until the last call."""

DEFAULT_CONTENT_TYPE = "application/octet-stream"

SHA256_KEY = "sha256"
"""The metadata key under which a store keeps the whole-object SHA-256 (hidden from callers)."""

IMAGE_FORMAT_KEY = "vmstore-image-format"
VIRTUAL_SIZE_KEY = "vmstore-virtual-size"
"""Metadata keys under which a store keeps the image format and virtual size recorded at upload
(hidden from callers, reserved like sha256; see vmstore.images)."""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

S3_MAX_OBJECT_SIZE = 5 << 40
"""The largest object S3 stores (5 TiB): a stream announced as larger cannot be uploaded."""


def _repr_redacting(instance: object, url_fields: tuple[str, ...]) -> str:
    """The dataclass repr, with the URL fields shown by :func:`vmstore.urls.redact_url`: a
    presigned URL's signature (a credential) never appears in a repr or a log line."""
    shown = []
    for item in dataclasses.fields(instance):  # type: ignore[arg-type]
        value = getattr(instance, item.name)
        if item.name in url_fields and isinstance(value, str):
            value = redact_url(value)
        shown.append(f"{item.name}={value!r}")
    return f"{type(instance).__name__}({', '.join(shown)})"


@runtime_checkable
class ReadableStream(Protocol):
    """A source stream: anything with ``read(n) -> bytes`` (``sys.stdin.buffer``, a pipe from
    ``qemu-img convert``, a socket file). ``readinto`` is used when present (no copy)."""

    def read(self, size: int = -1, /) -> bytes: ...


@runtime_checkable
class WritableStream(Protocol):
    """A destination stream: anything with ``write(bytes)`` (``sys.stdout.buffer``, a pipe)."""

    def write(self, data: bytes, /) -> object: ...


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
    computed, never a caller's claim. Control characters (CR, LF, NUL, ...) are refused in
    keys and values on every backend: in an HTTP header they would split it (S3 and HTTP
    carry metadata as headers), and retrying cannot help.
    """
    if not isinstance(metadata, dict):
        raise InvalidConfigError(
            f"metadata must be a dict of strings, not {type(metadata).__name__}"
        )
    normalized: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.strip():
            raise InvalidConfigError(f"metadata key {key!r} must be a non-empty string")
        if not isinstance(value, str):
            raise InvalidConfigError(
                f"metadata value for {key!r} must be a string, not {type(value).__name__}"
            )
        for what, text in (("key", key), ("value for " + repr(key), value)):
            # C0 controls, DEL and C1 controls: never part of a header or of a name.
            if re.search(r"[\x00-\x1f\x7f-\x9f]", text):
                raise InvalidConfigError(
                    f"metadata {what} {text!r} contains a control character (CR, LF, tab, "
                    "NUL, ...); metadata travels in headers, so use printable text only"
                )
        key = key.strip().lower()
        if key == SHA256_KEY:
            raise InvalidConfigError(
                f"metadata key {SHA256_KEY!r} is reserved: vmstore computes and stores the "
                "SHA-256 itself; remove it from the metadata"
            )
        if key in (IMAGE_FORMAT_KEY, VIRTUAL_SIZE_KEY):
            raise InvalidConfigError(
                f"metadata key {key!r} is reserved: vmstore records the image's format and "
                "virtual size from its header itself; remove it from the metadata"
            )
        normalized[key] = value
    return normalized


@dataclass
class UploadRequest:
    """Upload a local file (``source_path``) or a stream (``source_stream``) to
    ``destination_url``; exactly one of the two sources is given.

    A stream is read once, front to back, and never rewound; ``size_hint`` (bytes, when the
    producer knows it) picks the part size up front and is checked before the stream is
    touched. A stream upload cannot resume after a crash: only a file can be read again.
    ``resume=True`` continues an interrupted upload of the same file to the same place;
    ``cancel`` (a :class:`vmstore.CancelToken`) stops the transfer at the next chunk.
    """

    source_path: str | None = None
    destination_url: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    progress_callback: ProgressCallback | None = None
    content_type: str | None = None
    resume: bool = True
    cancel: CancelToken | None = None
    source_stream: ReadableStream | None = None
    size_hint: int | None = None
    compression: str | None = None
    """None (stored as it is) or "zstd": each part compressed on its own (docs/FORMAT.md)."""
    allow_backing_file: bool = False
    """Upload even an image whose header names a backing file or external data file (refused
    by default: an importer that follows it reads files of its own host; see vmstore.images)."""

    def __post_init__(self) -> None:
        if self.compression is not None and self.compression != "zstd":
            raise InvalidConfigError(
                f"UploadRequest.compression {self.compression!r} is not supported: use None "
                'or "zstd"'
            )
        if (self.source_path is None) == (self.source_stream is None):
            raise InvalidConfigError(
                "UploadRequest needs exactly one source: source_path (a file) or "
                "source_stream (a readable binary stream)"
            )
        if self.source_path is not None:
            self.source_path = os.fspath(self.source_path)
            if not isinstance(self.source_path, str) or not self.source_path:
                raise InvalidConfigError("UploadRequest.source_path must be a non-empty path")
            if "\x00" in self.source_path:
                raise InvalidConfigError(
                    f"UploadRequest.source_path {self.source_path!r} contains a NUL byte; "
                    "no file can have that name"
                )
        elif not callable(getattr(self.source_stream, "read", None)):
            raise InvalidConfigError(
                "UploadRequest.source_stream must be a binary stream with read() "
                f"(got {type(self.source_stream).__name__})"
            )
        if not isinstance(self.destination_url, str) or not self.destination_url:
            raise InvalidConfigError("UploadRequest.destination_url is required")
        if self.content_type is not None and (
            not isinstance(self.content_type, str)
            or not self.content_type.strip()
            or re.search(r"[\x00-\x1f\x7f-\x9f]", self.content_type)
        ):
            # A CR/LF would split the Content-Type header; no retry can fix that.
            raise InvalidConfigError(
                f"UploadRequest.content_type {self.content_type!r} must be a media type such "
                "as application/octet-stream, without control characters"
            )
        if self.size_hint is not None:
            if isinstance(self.size_hint, bool) or not isinstance(self.size_hint, int):
                raise InvalidConfigError("UploadRequest.size_hint must be a number of bytes")
            if self.size_hint < 0:
                raise InvalidConfigError("UploadRequest.size_hint must not be negative")
            if self.size_hint > S3_MAX_OBJECT_SIZE:
                raise InvalidConfigError(
                    f"UploadRequest.size_hint {self.size_hint} is above the 5 TiB "
                    f"({S3_MAX_OBJECT_SIZE} bytes) an object may hold; split the image"
                )

    @property
    def source_name(self) -> str:
        """How messages name the source: the path, or ``<stream>``."""
        return self.source_path if self.source_path is not None else "<stream>"


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
    """Download ``source_url`` into the local file ``destination_path``, or into
    ``destination_stream``; exactly one of the two destinations is given.

    The bytes are checked against ``expected_checksum`` when given, otherwise (when
    ``verify_checksum``) against the checksum the store holds; on a mismatch a file
    destination keeps what it held before. A stream receives the bytes in order as they
    arrive and is verified at the end: a mismatch then raises ChecksumMismatchError after
    the consumer has seen the bytes, and a stream download cannot resume after a crash.
    """

    source_url: str
    destination_path: str | None = None
    verify_checksum: bool = True
    expected_checksum: str | None = None
    progress_callback: ProgressCallback | None = None
    resume: bool = True
    cancel: CancelToken | None = None
    destination_stream: WritableStream | None = None
    allow_backing_file: bool = False
    """Save even an image whose header names a backing file or external data file (by
    default such a download is verified, then not committed; see vmstore.images)."""

    def __post_init__(self) -> None:
        if (self.destination_path is None) == (self.destination_stream is None):
            raise InvalidConfigError(
                "DownloadRequest needs exactly one destination: destination_path (a file) "
                "or destination_stream (a writable binary stream)"
            )
        if self.destination_path is not None:
            self.destination_path = os.fspath(self.destination_path)
            if not isinstance(self.destination_path, str) or not self.destination_path:
                raise InvalidConfigError(
                    "DownloadRequest.destination_path must be a non-empty path"
                )
            if "\x00" in self.destination_path:
                raise InvalidConfigError(
                    f"DownloadRequest.destination_path {self.destination_path!r} contains a "
                    "NUL byte; no file can have that name"
                )
        elif not callable(getattr(self.destination_stream, "write", None)):
            raise InvalidConfigError(
                "DownloadRequest.destination_stream must be a binary stream with write() "
                f"(got {type(self.destination_stream).__name__})"
            )
        if not isinstance(self.source_url, str) or not self.source_url:
            raise InvalidConfigError("DownloadRequest.source_url is required")
        if self.expected_checksum is not None:
            # "" is a mistake (an unset variable), not "no checksum": None says that. The
            # form is checked here, once for every backend; each backend normalizes it.
            parse_sha256_hex(self.expected_checksum, "DownloadRequest.expected_checksum")

    def __repr__(self) -> str:
        return _repr_redacting(self, ("source_url",))


@dataclass(frozen=True)
class DownloadResponse:
    """What a download wrote: ``checksum`` is the SHA-256 of the whole file (64 hex)."""

    checksum: str
    content_length: int
    bytes_transferred: int
    destination_path: str | None
    """The file written; ``None`` for a stream destination."""
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
    image_format: str | None = None
    """The image format vmstore recorded at upload ("qcow2", "vmdk", "vhd", "vhdx", "raw";
    "gzip", "xz" or "zstd" for a compressed copy); None for an object stored without it."""
    virtual_size: int | None = None
    """The guest disk's size in bytes recorded at upload (None when not recorded)."""

    def __repr__(self) -> str:
        return _repr_redacting(self, ("url",))


@dataclass(frozen=True)
class IncompleteTransfer:
    """Something an interrupted transfer left behind (see ``Storage.list_incomplete``).

    ``kind`` is "upload" or "download"; ``location`` is where it is: an S3 UploadId, a
    partial file inside an NFS share, or a download's partial file on this host;
    ``bytes_done`` what it holds; ``modified`` (aware UTC) when it last changed.
    """

    url: str
    kind: str
    location: str
    bytes_done: int
    modified: datetime
