"""What a VM disk image's header says, and the rule that keeps images naming host files out.

:func:`inspect_image` reads an image's header in the native core (``rust/src/image.rs``; the GIL
is released, every offset and length in the header is bounds-checked: images are untrusted
input) and says what format it is, how large the guest disk is, and which other files the
header names: a qcow2 backing file or external data file, a vmdk parent or extent files, a
vhd/vhdx parent.

Why that matters: an importer that opens such an image (qemu-img, a hypervisor) opens the file
it names *on the importer's host*. A guest controls the bytes of its raw disk, so an exported
"disk" can be a qcow2 header naming ``/etc/shadow`` as its backing file, or a vmdk descriptor
whose extent is ``/dev/sda``: the next VM then reads the host's files. vmstore therefore
refuses to upload such an image and never commits one on download, unless the request says
``allow_backing_file=True`` (the functions below are the hooks the pipelines call at those
points). A header that names nothing but cannot be read either (claims qcow2, then points past
the file) is refused the same way: qemu would probe the file by that header.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vmstore import _native
from vmstore._oserrors import storage_error_from_oserror
from vmstore.errors import InvalidConfigError, StorageError
from vmstore.models import IMAGE_FORMAT_KEY, VIRTUAL_SIZE_KEY, ReadableStream

log = logging.getLogger("vmstore.images")

HEAD_BYTES = 4 << 20
"""The start of a stream that is inspected: enough for every header of a valid image of these
formats (a qcow2 header lies in its first cluster, at most 2 MiB; a vhdx's metadata region
starts at 2 MiB when qemu-img made it)."""

FORMAT_KEY = IMAGE_FORMAT_KEY
"""Object metadata keys of an S3 single PUT (and HTTP upload headers) recording the image's
format and virtual size; hidden from ``custom_metadata`` like the SHA-256."""

IMAGE_KEYS = (FORMAT_KEY, VIRTUAL_SIZE_KEY)

OVERRIDE = (
    "flatten it first (qemu-img convert -O qcow2 SOURCE FLAT.qcow2 writes an image without a "
    "backing file) or, if you trust it, pass allow_backing_file=True (--allow-backing-file)"
)


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says.

    ``format`` is "qcow2", "vmdk", "vhd", "vhdx" or "raw" (anything else). ``virtual_size`` is
    the guest disk's size in bytes (a raw file's size; ``None`` when the bytes inspected do not
    tell, e.g. the start of a raw stream). ``backing_file`` and ``data_file`` are the strings in
    the header, as ``qemu-img info`` prints ``backing-filename`` and ``data-file`` (a vmdk's
    ``parentFileNameHint``, a vhd/vhdx parent's path), ``None`` when absent.

    ``wrapper`` is "gzip", "xz" or "zstd" when the file is compressed as a whole; the other
    fields then describe what the start of the decompressed bytes says (``virtual_size`` of a
    wrapped raw image is known only when it is small enough to decompress whole).
    ``compression_type`` is a qcow2's cluster compression ("zlib" or "zstd": whether any
    cluster is compressed is in the L2 tables, not the header) or "deflate" for a
    stream-optimized vmdk. ``encryption`` is "aes" or "luks" for an encrypted qcow2.
    ``subformat`` is a vmdk's createType or a vhd/vhdx disk type ("fixed", "dynamic",
    "differencing"); ``extents`` the files a vmdk descriptor file keeps the data in;
    ``features`` a qcow2's incompatible feature bits by name; ``needs_other_file`` says the
    image cannot be read without a file its header does not name (a qcow2 with the external
    data file bit but no name, a differencing vhdx without a parent locator).
    """

    format: str
    virtual_size: int | None
    backing_file: str | None = None
    data_file: str | None = None
    encrypted: bool = False
    encryption: str | None = None
    compression_type: str | None = None
    cluster_size: int | None = None
    version: int | None = None
    wrapper: str | None = None
    dirty: bool = False
    corrupt: bool = False
    backing_format: str | None = None
    subformat: str | None = None
    extents: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    needs_other_file: bool = False

    @property
    def other_files(self) -> tuple[str, ...]:
        """Every file the header names besides the image itself."""
        named = [self.backing_file, self.data_file, *self.extents]
        return tuple(name for name in named if name)

    @property
    def refers_to_other_files(self) -> bool:
        """Whether opening the image opens (or needs) another file: the policy's question."""
        return bool(self.other_files) or self.needs_other_file

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (``vmstore inspect --json``)."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in self.__dict__.items()
        }


def _info(fields: Mapping[str, Any]) -> ImageInfo:
    data = dict(fields)
    data["extents"] = tuple(data.get("extents", ()))
    data["features"] = tuple(data.get("features", ()))
    return ImageInfo(**data)


def inspect_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Read the header of the image file at ``path`` (nothing else of it is read).

    A missing file raises NotFoundError, an unreadable one PermissionDeniedError, a directory
    or FIFO InvalidConfigError, a header that contradicts itself or points outside the file
    InvalidConfigError saying which field is wrong.
    """
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InvalidConfigError(f"inspect_image needs the path of an image file, not {path!r}")
    return _info(_native.inspect_image_path(text))


def inspect_image_bytes(
    head: bytes | bytearray | memoryview, *, size: int | None = None, name: str = "<stream>"
) -> ImageInfo:
    """What the start of an image says (``head``: the first bytes of a stream, at least
    :data:`HEAD_BYTES` of it to see every header); ``size`` is the whole image's length when
    known (a raw image's virtual size; a fixed vhd's footer is seen only when ``head`` is the
    whole image)."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise InvalidConfigError(f"size must be a number of bytes, not {size!r}")
    return _info(_native.inspect_image_bytes(bytes(head), size=size, name=name))


# --- the policy, as the pipelines call it ----------------------------------------------------


def _describe(info: ImageInfo) -> str:
    named = []
    if info.backing_file:
        named.append(f"a backing file {info.backing_file!r}")
    if info.data_file:
        named.append(f"an external data file {info.data_file!r}")
    if info.extents:
        named.append(f"extent files {', '.join(repr(e) for e in info.extents)}")
    if not named:
        named.append("another file it needs (a data file or parent not named in it)")
    wrapped = f" (inside its {info.wrapper} wrapper)" if info.wrapper else ""
    return f"a {info.format} image{wrapped} whose header names {' and '.join(named)}"


def _refusal(name: str, info: ImageInfo, outcome: str) -> InvalidConfigError:
    return InvalidConfigError(
        f"{name} is {_describe(info)}: an importer that opens it reads that file from its own "
        f"host (a crafted image reads host files such as /etc/shadow); {outcome}. To accept "
        f"it anyway, {OVERRIDE}"
    )


def _unreadable(name: str, exc: StorageError, outcome: str) -> InvalidConfigError:
    return InvalidConfigError(
        f"{exc.message}; an image whose header cannot be read may still be opened by it (qemu "
        f"probes the format from these bytes), so {name} is refused: {outcome}. If it is a raw "
        "disk that only looks like an image, pass allow_backing_file=True",
        cause=exc,
    )


def screen(
    inspect: Callable[[], ImageInfo], name: str, *, allow: bool, outcome: str
) -> ImageInfo | None:
    """Inspect, then apply the policy: the image's info, or None when its header could not be
    read and ``allow`` says to go on anyway. Raises InvalidConfigError for a refused image."""
    try:
        info = inspect()
    except InvalidConfigError as exc:
        if allow:
            log.warning("%s: %s; transferring it anyway (allow_backing_file)", name, exc.message)
            return None
        raise _unreadable(name, exc, outcome) from exc
    if info.refers_to_other_files:
        if not allow:
            raise _refusal(name, info, outcome)
        log.warning(
            "%s is %s; transferring it as asked (allow_backing_file)", name, _describe(info)
        )
    return info


def check_upload_file(path: str, *, allow: bool) -> ImageInfo | None:
    """The upload hook for a file source, before any byte is sent."""
    return screen(lambda: inspect_image(path), path, allow=allow, outcome="nothing was uploaded")


class _ReplayStream:
    """A source stream whose first bytes were read for inspection: they are served again
    first, then the stream itself (``readinto`` and ``read``, as the pipelines use)."""

    def __init__(self, head: bytes, stream: ReadableStream) -> None:
        self._head = memoryview(head)
        self._stream = stream

    def readinto(self, buffer: memoryview | bytearray) -> int | None:
        if self._head.nbytes:
            view = memoryview(buffer).cast("B")
            n = min(view.nbytes, self._head.nbytes)
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        readinto = getattr(self._stream, "readinto", None)
        if callable(readinto):
            got: int | None = readinto(buffer)
            return got
        data = self._stream.read(len(buffer))
        if data is None:
            return None
        if len(data) > len(buffer):
            raise InvalidConfigError(
                f"source_stream.read({len(buffer)}) returned {len(data)} bytes"
            )
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def read(self, size: int = -1, /) -> bytes:
        if self._head.nbytes:
            n = self._head.nbytes if size < 0 else min(size, self._head.nbytes)
            data = bytes(self._head[:n])
            self._head = self._head[n:]
            return data
        return self._stream.read(size)

    def __getattr__(self, name: str) -> Any:
        # name, fileno, ... of the stream it stands for (stream_label, logs).
        return getattr(self._stream, name)


def _read_head(stream: ReadableStream, limit: int) -> bytes:
    """Up to ``limit`` bytes from the start of ``stream`` (fewer only at its end)."""
    parts: list[bytes] = []
    have = 0
    while have < limit:
        try:
            data = stream.read(limit - have)
        except OSError as exc:
            raise storage_error_from_oserror(
                exc, "read", "the source stream", advice="nothing was stored; retry"
            ) from exc
        except ValueError as exc:  # read from a closed file
            raise InvalidConfigError(f"could not read the source stream: {exc}", cause=exc) from exc
        if data is None:  # a non-blocking stream with nothing yet
            time.sleep(0.01)
            continue
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidConfigError(
                f"source_stream.read() must return bytes, not {type(data).__name__}"
            )
        if not data:
            break
        parts.append(bytes(data))
        have += len(data)
    return b"".join(parts)


def check_upload_stream(
    stream: ReadableStream, *, allow: bool, size: int | None = None
) -> tuple[ReadableStream, ImageInfo | None]:
    """The upload hook for a stream source: its first :data:`HEAD_BYTES` are read and
    inspected before any byte is sent; the stream to read from instead is returned (the head
    served again first, then the rest)."""
    head = _read_head(stream, HEAD_BYTES)
    if len(head) < HEAD_BYTES:
        size = len(head)  # the whole stream
    elif size is not None and size < len(head):
        size = None  # a wrong size_hint, which the upload reports itself
    info = screen(
        lambda: inspect_image_bytes(head, size=size),
        "the source stream",
        allow=allow,
        outcome="nothing was uploaded",
    )
    return _ReplayStream(head, stream), info


def check_download_file(partial_path: str, url: str, destination: str, *, allow: bool) -> None:
    """The download hook before a verified partial file is renamed into place: a refused
    image raises InvalidConfigError, which removes the partial (see ``_failure``)."""
    screen(
        lambda: inspect_image(partial_path),
        url,
        allow=allow,
        outcome=f"it was not saved: {destination} was left as it was and the download removed",
    )


EARLY_BYTES = 64 << 10
"""A download stream's head is first inspected at this length: a raw image or a qcow2 (whose
header reads need nothing it lacks, or fail) is decided then, without holding 4 MiB back."""


class StreamGate:
    """The download hook for a stream destination: holds the start of the object back from
    ``emit`` until the image header in it has been checked, so a refused image never reaches
    the consumer. Raw images and qcow2 are decided from the first :data:`EARLY_BYTES`; other
    formats (whose tables lie further in) and compressed wrappers from the first
    :data:`HEAD_BYTES`, or from the whole object when it is shorter. ``size`` is the object's."""

    def __init__(self, emit: Callable[[bytes], None], url: str, size: int | None) -> None:
        self._emit = emit
        self._url = url
        self._size = size
        self._held: bytearray | None = bytearray()
        self._tried_early = False

    def __call__(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is None:
            self._emit(data if isinstance(data, bytes) else bytes(data))
            return
        self._held += data
        if len(self._held) >= HEAD_BYTES or (
            len(self._held) >= EARLY_BYTES and not self._tried_early and self._decided_early()
        ):
            self._release()

    def _decided_early(self) -> bool:
        """Whether the bytes held already decide: the answer cannot change with more of them
        (a raw image's does not; a qcow2's header reads all succeeded)."""
        self._tried_early = True
        assert self._held is not None
        try:
            info = inspect_image_bytes(self._held)
        except StorageError:
            return False  # perhaps a table further in: wait for the whole head
        return info.wrapper is None and info.format in ("raw", "qcow2")

    def close(self) -> None:
        """The object has ended: check and release whatever is held."""
        if self._held is not None:
            self._release()

    def _release(self) -> None:
        assert self._held is not None
        held = bytes(self._held)
        self._held = None
        whole = self._size is not None and len(held) >= self._size
        screen(
            lambda: inspect_image_bytes(held[:HEAD_BYTES], size=len(held) if whole else self._size),
            self._url,
            allow=False,
            outcome="nothing was written to the destination stream",
        )
        self._emit(held)


# --- what an upload records ------------------------------------------------------------------


def stored_format(info: ImageInfo) -> str:
    """The format of the bytes stored: a compressed copy's is its wrapper ("gzip", "xz",
    "zstd"; an importer must decompress it before anything reads it as an image)."""
    return info.wrapper or info.format


def record_of(info: ImageInfo, size: int) -> dict[str, Any]:
    """The sidecar's ``image`` object for an upload of ``size`` bytes: the stored format and
    the guest disk's virtual size (a raw image's is its size; a compressed copy's is that of
    the image inside when its header says)."""
    virtual = info.virtual_size
    if virtual is None and info.format == "raw" and info.wrapper is None:
        virtual = size
    return {"format": stored_format(info), "virtual_size": virtual}


def metadata_of(info: ImageInfo | None, size: int | None) -> dict[str, str]:
    """The record as object metadata (S3 single PUT, HTTP headers); ``size`` is the upload's
    when known (without it a raw image's virtual size is left out)."""
    if info is None:
        return {}
    virtual = record_of(info, size)["virtual_size"] if size is not None else info.virtual_size
    out = {FORMAT_KEY: stored_format(info)}
    if virtual is not None:
        out[VIRTUAL_SIZE_KEY] = str(virtual)
    return out


def from_metadata(metadata: Mapping[str, str]) -> tuple[str | None, int | None]:
    """(format, virtual size) from object metadata keys (lower-case), None where absent."""
    fmt = metadata.get(FORMAT_KEY) or None
    size_text = metadata.get(VIRTUAL_SIZE_KEY, "")
    virtual = int(size_text) if size_text.isdigit() else None
    return fmt, virtual


def from_record(record: Mapping[str, Any] | None) -> tuple[str | None, int | None]:
    """(format, virtual size) from a sidecar's ``image`` object, None where absent."""
    if not record:
        return None, None
    fmt = record.get("format")
    virtual = record.get("virtual_size")
    return (
        fmt if isinstance(fmt, str) else None,
        virtual if isinstance(virtual, int) and not isinstance(virtual, bool) else None,
    )


__all__ = [
    "HEAD_BYTES",
    "ImageInfo",
    "check_download_file",
    "check_upload_file",
    "check_upload_stream",
    "inspect_image",
    "inspect_image_bytes",
    "record_of",
]
