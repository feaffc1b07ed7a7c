"""The sidecar format: ``<name>.vmstore.json``, what vmstore knows about the data beside it.

A store that cannot keep a checksum with the object itself (an NFS share, a plain WebDAV
server) keeps it in a small JSON file next to it. The sidecar is written by a different
operation than the data, so on its own it could describe *another* version of the data: two
writers racing on one name can leave the data of one and the sidecar of the other. A sidecar
is therefore bound to the data it describes: it records the data's ``size`` and ``etag`` (its
identity: on NFS the committed file's inode, size and mtime; on HTTP the server's ETag), and a
reader believes it only when :meth:`Sidecar.describes` the data it actually found. A sidecar
that does not describe the current data is ignored (checksum unknown), never believed.

The format (one JSON object; unknown keys are ignored, so newer writers stay readable)::

    {"version": 2, "sha256": "<64 hex>", "size": 123, "etag": "...", "mtime_ns": 0,
     "content_type": "...", "metadata": {"k": "v"}, "uploaded_at": "<ISO 8601>",
     "upload_token": "...",            # upload_token only when set
     "image": {"format": "qcow2", "virtual_size": 1073741824},   # image only when recorded
     "encoding": {...}}                # only for a compressed/encrypted object (FORMAT.md)

With ``encoding`` the object is stored as frames (docs/FORMAT.md): ``sha256`` and ``size`` are
still the image's (plain bytes), and the binding to the data uses ``encoding.stored_size``.

Version 1 (vmstore 0.1) had no ``version``, ``etag`` or ``upload_token``; such sidecars are
still read, and are bound to their data by ``size`` and ``mtime_ns`` (the committed file's
mtime), which is what that release recorded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from vmstore._codec import Encoding
from vmstore.errors import InvalidConfigError, OperationFailedError
from vmstore.models import DEFAULT_CONTENT_TYPE, parse_sha256_hex

SIDECAR_SUFFIX = ".vmstore.json"
"""Appended to an object's name (or URL path) to name its sidecar."""

FORMAT_VERSION = 2

MAX_SIDECAR_BYTES = 8 << 20
"""A sidecar is a few hundred bytes (a frame index adds about 11 bytes a frame: 65,536 frames of
16 MiB, 1 TiB, are about 750 KB); anything this large is not one (and is not read)."""


class SidecarFormatError(OperationFailedError, ValueError):
    """The text is not a sidecar. A StorageError (nothing else leaves the readers) and a
    ValueError (what a parser raises), so callers may catch either."""


@dataclass(frozen=True)
class Sidecar:
    """What a sidecar holds. ``etag`` is the identity of the data it was written for
    (``""``: not recorded, as in version 1); ``mtime_ns`` is the data's mtime where the
    store has one (NFS; 0 elsewhere); ``upload_token`` optionally names the upload that
    wrote it (e.g. an S3 UploadId), for a store whose data carries the same token."""

    sha256: str
    size: int
    etag: str = ""
    content_type: str = DEFAULT_CONTENT_TYPE
    metadata: Mapping[str, str] = field(default_factory=dict)
    uploaded_at: str = ""
    mtime_ns: int = 0
    upload_token: str | None = None
    encoding: Encoding | None = None
    """The frame record of a compressed or encrypted object (never the key)."""

    @property
    def stored_size(self) -> int:
        """Bytes the store holds for the data (the frames' total when encoded)."""
        return self.encoding.stored_size if self.encoding is not None else self.size
    image: Mapping[str, Any] | None = None
    """What the upload's image header said: {"format": "qcow2", "virtual_size": 123}
    (virtual_size may be null); None when not recorded (see vmstore.images)."""

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "sha256": self.sha256,
            "size": self.size,
            "etag": self.etag,
            "mtime_ns": self.mtime_ns,
            "content_type": self.content_type,
            "metadata": dict(self.metadata),
            "uploaded_at": self.uploaded_at,
        }
        if self.upload_token is not None:
            data["upload_token"] = self.upload_token
        if self.image is not None:
            data["image"] = dict(self.image)
        if self.encoding is not None:
            data["encoding"] = self.encoding.to_dict()
            # A frame index of thousands of numbers: one line, not one number per line.
            return json.dumps(data, sort_keys=True)
        return json.dumps(data, indent=2, sort_keys=True)

    def to_bytes(self) -> bytes:
        return self.to_json().encode("utf-8")

    @classmethod
    def from_json(cls, text: str | bytes) -> Sidecar:
        """Parse a sidecar of any version; :class:`SidecarFormatError` for anything else
        (whatever the input: bytes that are not UTF-8, JSON nested too deep, wrong types)."""
        if len(text) > MAX_SIDECAR_BYTES:
            raise SidecarFormatError(f"{len(text)} bytes is too large for a sidecar")
        try:
            data: Any = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise SidecarFormatError(f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise SidecarFormatError("not a JSON object")
        version = data.get("version", 1)
        if not _is_int(version) or version < 1:
            raise SidecarFormatError(f"version {version!r} is not a positive integer")
        try:
            sha256 = parse_sha256_hex(_text(data, "sha256"), "sidecar sha256")
        except InvalidConfigError as exc:
            raise SidecarFormatError(str(exc)) from exc
        size = data.get("size")
        mtime_ns = data.get("mtime_ns", 0)
        if not _is_int(size) or size < 0:
            raise SidecarFormatError(f"size {size!r} is not a number of bytes")
        if not _is_int(mtime_ns):
            raise SidecarFormatError(f"mtime_ns {mtime_ns!r} is not an integer")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
        ):
            raise SidecarFormatError("metadata is not an object of strings")
        token = data.get("upload_token")
        if token is not None and not isinstance(token, str):
            raise SidecarFormatError("upload_token is not a string")
        encoding = None
        if data.get("encoding") is not None:
            try:
                encoding = Encoding.from_dict(data["encoding"])
            except (ValueError, TypeError) as exc:
                raise SidecarFormatError(f"encoding: {exc}") from exc
            if encoding.plain_size != size:
                raise SidecarFormatError("the frame index does not add up to the size")
        return cls(
            sha256=sha256,
            size=size,
            etag=_text(data, "etag"),
            content_type=_text(data, "content_type") or DEFAULT_CONTENT_TYPE,
            metadata={key.lower(): value for key, value in metadata.items()},
            uploaded_at=_text(data, "uploaded_at"),
            mtime_ns=mtime_ns,
            upload_token=token,
            encoding=encoding,
            image=_image(data.get("image")),
        )

    def mismatch(
        self,
        *,
        size: int | None,
        etag: str | None,
        mtime_ns: int | None = None,
        upload_token: str | None = None,
    ) -> str | None:
        """Why this sidecar does not describe the data found (``None``: it does).

        Each fact the data offers is compared with the one recorded, when both sides have
        it: ``size``; ``etag`` (weak and strong forms compare equal); ``mtime_ns`` (only
        for a sidecar without an etag, i.e. version 1, and a store with mtimes); and
        ``upload_token``. A store that offers an identity (NFS always does) therefore never
        believes a sidecar written for other data of the same size.
        """
        if size is not None and self.stored_size != size:
            return f"it describes {self.stored_size} bytes, the data has {size}"
        if self.etag and etag:
            if _strong(self.etag) != _strong(etag):
                return f"it describes version {self.etag!r}, the data is {etag!r}"
        elif not self.etag and self.mtime_ns and mtime_ns is not None and self.mtime_ns != mtime_ns:
            return f"it describes data modified at {self.mtime_ns} ns, the data's is {mtime_ns}"
        if (
            self.upload_token is not None
            and upload_token is not None
            and self.upload_token != upload_token
        ):
            return f"it was written by upload {self.upload_token!r}, the data by {upload_token!r}"
        return None

    def describes(
        self,
        *,
        size: int | None,
        etag: str | None,
        mtime_ns: int | None = None,
        upload_token: str | None = None,
    ) -> bool:
        """Whether this sidecar was written for the data found (see :meth:`mismatch`)."""
        return (
            self.mismatch(size=size, etag=etag, mtime_ns=mtime_ns, upload_token=upload_token)
            is None
        )


def _image(value: object) -> dict[str, Any] | None:
    """The ``image`` record, or None when absent or not of the known shape (the rest of the
    sidecar stays usable: the checksum is what it is for)."""
    if not isinstance(value, dict):
        return None
    fmt, virtual = value.get("format"), value.get("virtual_size")
    if not isinstance(fmt, str) or not (virtual is None or (_is_int(virtual) and virtual >= 0)):
        return None
    return {"format": fmt, "virtual_size": virtual}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SidecarFormatError(f"{key} {value!r} is not a string")
    return value


def _strong(etag: str) -> str:
    """An ETag without its weak marker: a server may weaken it (compression) between calls."""
    return etag.removeprefix("W/")
