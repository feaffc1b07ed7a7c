"""Compression and client-side encryption: the frame stage of the one upload pipeline and the
one download pipeline (docs/FORMAT.md is the specification).

An encoded upload turns each part the one pass reads (:class:`vmstore._native.UploadSource`)
into one self-delimiting frame (native :class:`vmstore._native.FrameCodec`: zstd, then
AES-256-GCM-SIV, with the GIL released), on ``concurrency`` threads, in order. The whole-object
SHA-256 stays that of the image (the pass hashes the plain bytes); the stored bytes' CRC-64/NVME
(S3's per-part and FULL_OBJECT checksums) is computed per frame and combined.

What a reader needs (the scheme, the frame index, the salt and key check; never the key) is an
:class:`Encoding`, kept in the object's sidecar (``encoding``). A download without it cannot
place or decrypt the frames: the record is required.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from vmstore import _native
from vmstore.errors import (
    ChecksumMismatchError,
    InvalidConfigError,
    OperationFailedError,
    PermissionDeniedError,
)
from vmstore.urls import redact_url

ENCODING_METADATA_KEY = "vmstore-encoding"
"""S3 user metadata (set at Create) saying the object is stored as frames: a reader without its
companion record refuses it instead of handing out encoded bytes as the image."""

FORMAT_NAME = "vmstore-frames"
FORMAT_VERSION = 1
AEAD_NAME = "AES-256-GCM-SIV"
KDF_NAME = "HKDF-SHA256"
SALT_SIZE = 32


@dataclass(frozen=True)
class Encryption:
    """The public parameters of an encrypted object: its upload's salt and key check."""

    salt: bytes
    key_check: bytes


@dataclass(frozen=True)
class Frame:
    """Where frame ``index`` sits in the image (plain) and in the stored object."""

    index: int
    plain_offset: int
    plain_length: int
    stored_offset: int
    stored_length: int
    last: bool

    @property
    def number(self) -> int:
        """1-based, as chunk and part numbers are."""
        return self.index + 1

    @property
    def plain_end(self) -> int:
        return self.plain_offset + self.plain_length

    @property
    def stored_end(self) -> int:
        return self.stored_offset + self.stored_length


@dataclass(frozen=True)
class Encoding:
    """The record of an encoded object: the sidecar's ``encoding`` object."""

    compression: str | None
    encryption: Encryption | None
    frames: tuple[tuple[int, int], ...]
    """(plain length, stored length) of each frame, in order (at least one)."""

    @property
    def scheme(self) -> str:
        names = [name for name in (self.compression, self.encryption and "aes-256-gcm-siv") if name]
        return "+".join(names)

    @property
    def plain_size(self) -> int:
        return sum(plain for plain, _ in self.frames)

    @property
    def stored_size(self) -> int:
        return sum(stored for _, stored in self.frames)

    def frame_list(self) -> list[Frame]:
        frames, plain_at, stored_at = [], 0, 0
        for index, (plain, stored) in enumerate(self.frames):
            frames.append(
                Frame(index, plain_at, plain, stored_at, stored, index == len(self.frames) - 1)
            )
            plain_at += plain
            stored_at += stored
        return frames

    def identity(self) -> str:
        """A digest of the record (for a download's resume state: same record, same frames)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        runs: list[list[int]] = []
        for plain, _ in self.frames:
            if runs and runs[-1][0] == plain:
                runs[-1][1] += 1
            else:
                runs.append([plain, 1])
        data: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "compression": self.compression,
            "encryption": None,
            "plain_size": self.plain_size,
            "stored_size": self.stored_size,
            "frame_plain_lengths": runs,
            "frame_stored_lengths": [stored for _, stored in self.frames],
        }
        if self.encryption is not None:
            data["encryption"] = {
                "aead": AEAD_NAME,
                "kdf": KDF_NAME,
                "salt": self.encryption.salt.hex(),
                "key_check": self.encryption.key_check.hex(),
            }
        return data

    @classmethod
    def from_dict(cls, data: object) -> Encoding:
        """Parse the record; ValueError for anything that is not a well-formed one."""
        if not isinstance(data, dict):
            raise ValueError("encoding is not an object")
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"encoding format {data.get('format')!r} version {data.get('version')!r} "
                "is not one this vmstore reads"
            )
        compression = data.get("compression")
        if compression not in (None, "zstd"):
            raise ValueError(f"compression {compression!r} is not supported")
        encryption = None
        raw = data.get("encryption")
        if raw is not None:
            if (
                not isinstance(raw, dict)
                or raw.get("aead") != AEAD_NAME
                or raw.get("kdf") != KDF_NAME
            ):
                raise ValueError("encryption is not AES-256-GCM-SIV with HKDF-SHA256")
            salt, check = _hex(raw.get("salt"), SALT_SIZE), _hex(raw.get("key_check"), 32)
            encryption = Encryption(salt, check)
        runs, stored = data.get("frame_plain_lengths"), data.get("frame_stored_lengths")
        if not isinstance(runs, list) or not isinstance(stored, list):
            raise ValueError("the frame index is missing")
        plain: list[int] = []
        for run in runs:
            if not (isinstance(run, list) and len(run) == 2 and all(_is_count(v) for v in run)):
                raise ValueError("frame_plain_lengths holds a malformed run")
            if run[1] > len(stored) - len(plain):
                raise ValueError("frame_plain_lengths describes more frames than are stored")
            plain.extend([run[0]] * run[1])
        if not stored or len(plain) != len(stored) or not all(_is_count(v) for v in stored):
            raise ValueError("the frame index is malformed")
        minimum = _native.FRAME_HEADER_SIZE + (_native.FRAME_TAG_SIZE if encryption else 0)
        if any(length < minimum for length in stored):
            raise ValueError("a frame is shorter than its header")
        encoding = cls(compression, encryption, tuple(zip(plain, stored, strict=True)))
        if (
            data.get("plain_size") != encoding.plain_size
            or data.get("stored_size") != encoding.stored_size
        ):
            raise ValueError("the frame index does not add up to the recorded sizes")
        return encoding


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _hex(value: object, size: int) -> bytes:
    if not isinstance(value, str):
        raise ValueError("expected hex")
    raw = bytes.fromhex(value)
    if len(raw) != size:
        raise ValueError(f"expected {size} bytes of hex")
    return raw


def read_key_file(path: str) -> bytes:
    """An encryption key from a file: 64 hex digits (surrounding whitespace ignored) or 32 raw
    bytes. Errors say what is wrong with the file, never what it holds."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(4097)
    except OSError as exc:
        raise InvalidConfigError(
            f"could not read the encryption key file {path}: {exc.strerror or exc}", cause=exc
        ) from exc
    if len(raw) == 32:
        return raw
    text = raw.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise InvalidConfigError(
        f"the encryption key file {path} must hold 64 hexadecimal digits or 32 raw bytes "
        f"(it holds {len(raw) if len(raw) <= 4096 else 'more than 4096'} bytes that are neither)"
    )


def decoder_for(encoding: Encoding, key: bytes | None, url: str) -> _native.FrameCodec:
    """The decoder of an encoded object; refused before any byte is written: no key for an
    encrypted object is InvalidConfigError, the wrong key PermissionDeniedError."""
    if encoding.encryption is None:
        return _native.FrameCodec(compression=encoding.compression)
    if key is None:
        raise InvalidConfigError(
            f"{url} is encrypted: set StorageConfig.encryption_key (the CLI's "
            "--encryption-key-file) to the key it was uploaded with"
        )
    try:
        _native.check_frame_key(key, encoding.encryption.salt, encoding.encryption.key_check)
    except PermissionDeniedError:
        raise PermissionDeniedError(
            f"{url} was encrypted with another key than StorageConfig.encryption_key; "
            "nothing was written"
        ) from None
    return _native.FrameCodec(
        compression=encoding.compression, key=key, salt=encoding.encryption.salt
    )


def looks_encoded(head: bytes | bytearray | memoryview) -> bool:
    """Whether bytes an object starts with are vmstore's first frame (magic, version, zero
    reserved bytes, index 0 at plain offset 0: 24 fixed bytes that no disk image format starts
    with). Read without a record, such an object would hand out frames as the image."""
    if len(head) < _native.FRAME_HEADER_SIZE:
        return False
    try:
        _flags, index, offset, _plain, _payload = _native.parse_frame_header(
            bytes(head[: _native.FRAME_HEADER_SIZE])
        )
    except ChecksumMismatchError:
        return False
    return index == 0 and offset == 0


def missing_record(url: str) -> OperationFailedError:
    return OperationFailedError(
        f"{redact_url(url)} is stored compressed or encrypted, but its vmstore record (the "
        "sidecar that holds its frame index and encryption parameters) is missing or does not "
        "describe it: the object cannot be decoded without it"
    )


@dataclass(frozen=True)
class EncodedPart:
    """One part of the source as the frame that is stored for it. ``offset``/``length`` are
    the part's place in the image (plain bytes, what progress counts); ``crc64nvme`` and
    ``stored_length`` describe the stored frame; ``data`` is None for a part a resumed upload
    already stored (its frame is known from the journal)."""

    number: int
    offset: int
    length: int
    plain_crc64nvme: int
    crc64nvme: int
    stored_length: int
    data: bytes | None
    sha256: str | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


class Encoder:
    """The frame encoder of one upload attempt, and the frame index it builds.

    ``salt`` is the upload's (a resumed upload passes its journal's); a new encoder draws a
    random one, so no frame key is shared by two uploads. Frames are deterministic for a given
    salt (AES-GCM-SIV, nonce = frame index): a part sent again is the same bytes.
    """

    def __init__(
        self, compression: str | None, key: bytes | None, *, salt: bytes | None = None
    ) -> None:
        self.compression = compression
        self.encryption: Encryption | None = None
        if key is not None:
            salt = salt if salt is not None else secrets.token_bytes(SALT_SIZE)
            self.encryption = Encryption(salt, _native.frame_key_check(key, salt))
        self._codec = _native.FrameCodec(
            compression=compression,
            key=key,
            salt=salt if key is not None else None,
        )
        self._frames: dict[int, tuple[int, int, int]] = {}
        """index -> (plain length, stored length, stored CRC-64/NVME)"""

    @property
    def encoding_scheme(self) -> str:
        """ "zstd", "aes-256-gcm-siv" or "zstd+aes-256-gcm-siv"."""
        return Encoding(self.compression, self.encryption, ()).scheme

    def encode(self, number: int, offset: int, data: object, last: bool) -> EncodedPart:
        frame = self._codec.encode(data, number - 1, offset, last)
        plain = memoryview(data).nbytes  # type: ignore[arg-type]
        self._frames[number - 1] = (plain, len(frame.data), frame.crc64nvme)
        return EncodedPart(
            number=number,
            offset=offset,
            length=plain,
            plain_crc64nvme=0,
            crc64nvme=frame.crc64nvme,
            stored_length=len(frame.data),
            data=frame.data,
        )

    def record(self, number: int, plain_length: int, stored_length: int, crc: int) -> None:
        """A frame stored by an earlier attempt (a resumed upload's journal)."""
        self._frames[number - 1] = (plain_length, stored_length, crc)

    def encoding(self) -> Encoding:
        count = len(self._frames)
        if sorted(self._frames) != list(range(count)) or count == 0:
            raise AssertionError("the frame index has gaps")
        return Encoding(
            self.compression,
            self.encryption,
            tuple((self._frames[i][0], self._frames[i][1]) for i in range(count)),
        )

    def stored_crc64nvme(self) -> int:
        """CRC-64/NVME of the whole stored object, combined from the frames' CRCs."""
        crc = 0
        for index in range(len(self._frames)):
            _plain, length, frame_crc = self._frames[index]
            crc = frame_crc if index == 0 else _native.crc64nvme_combine(crc, frame_crc, length)
        return crc


def encode_parts(
    parts: Iterable[_native.SourcePart],
    encoder: Encoder,
    *,
    concurrency: int,
    stored: Mapping[int, tuple[int, int]] | None = None,
    on_part: Callable[[_native.SourcePart], None] | None = None,
) -> Iterator[EncodedPart]:
    """The source's parts as frames, in order, encoded on up to ``concurrency`` threads.

    A part is encoded once the next one exists (or the source ended), so its frame knows
    whether it is the last. A source with no bytes at all becomes one empty frame. Parts in
    ``stored`` (number -> (stored length, stored CRC), from a resumed upload's journal) are
    not encoded: they come out with ``data=None``.
    """
    stored = stored or {}
    window: collections.deque[tuple[_native.SourcePart, cf.Future[EncodedPart] | None]]
    window = collections.deque()

    def passed(part: _native.SourcePart) -> EncodedPart:
        length, crc = stored[part.number]
        encoder.record(part.number, part.length, length, crc)
        return EncodedPart(part.number, part.offset, part.length, part.crc64nvme, crc, length, None)

    def finish(part: _native.SourcePart, future: cf.Future[EncodedPart] | None) -> EncodedPart:
        if future is None:
            return passed(part)
        encoded = future.result()
        return EncodedPart(
            encoded.number,
            encoded.offset,
            encoded.length,
            part.crc64nvme,
            encoded.crc64nvme,
            encoded.stored_length,
            encoded.data,
        )

    def submit(
        pool: cf.ThreadPoolExecutor, part: _native.SourcePart, last: bool
    ) -> cf.Future[EncodedPart] | None:
        if part.number in stored and part.data is None:
            return None
        if part.data is None:
            raise AssertionError(f"part {part.number} was read without its bytes")
        return pool.submit(encoder.encode, part.number, part.offset, part.data, last)

    with cf.ThreadPoolExecutor(
        max_workers=max(1, concurrency), thread_name_prefix="vmstore-encode"
    ) as pool:
        try:
            held: _native.SourcePart | None = None
            for part in parts:
                if on_part is not None:
                    on_part(part)
                if held is not None:
                    window.append((held, submit(pool, held, False)))
                held = part
                while len(window) > concurrency or (window and _ready(window[0][1])):
                    yield finish(*window.popleft())
            if held is not None:
                window.append((held, submit(pool, held, True)))
            while window:
                yield finish(*window.popleft())
            if held is None:
                yield encoder.encode(1, 0, b"", True)
        finally:
            for _part, future in window:
                if future is not None:
                    future.cancel()


@dataclass(frozen=True)
class FrameRecord:
    """One frame of an S3 part, as the upload journal keeps it (enough to resume without
    reading the frame back: its place in the index and the plain bytes' CRC to re-check)."""

    number: int
    plain_crc64nvme: int
    plain_length: int
    stored_length: int
    crc64nvme: int

    def to_list(self) -> list[int]:
        return [
            self.number,
            self.plain_crc64nvme,
            self.plain_length,
            self.stored_length,
            self.crc64nvme,
        ]

    @classmethod
    def from_list(cls, values: object) -> FrameRecord:
        if not (isinstance(values, list) and len(values) == 5 and all(map(_is_count, values))):
            raise ValueError("not a frame record")
        return cls(*values)


def verify_stored_frames(
    feed: Iterable[_native.SourcePart],
    stored_frames: Mapping[int, FrameRecord],
    *,
    differs: Callable[[int], Exception],
    advance: Callable[[int], None],
) -> Iterator[_native.SourcePart]:
    """A resumed encoded upload's feed, every part passed on: a part whose frame the
    interrupted attempt stored has its plain bytes checked against that frame (not sent
    again). A mismatch raises ``differs(part number)``; a match calls ``advance(part length)``
    (the caller counts the resumed bytes and reports progress)."""
    for part in feed:
        frame = stored_frames.get(part.number)
        if frame is not None:
            if frame.plain_crc64nvme != part.crc64nvme:
                raise differs(part.number)
            advance(part.length)
        yield part


@dataclass(frozen=True)
class FramePart:
    """Consecutive frames sent as one S3 part: S3 wants every part but the last to hold at
    least 5 MiB, which a compressed frame rarely does. ``offset``/``length`` are plain (what
    progress counts), ``crc64nvme`` is of the stored bytes (``data``)."""

    number: int
    offset: int
    length: int
    crc64nvme: int
    data: bytes
    frames: tuple[FrameRecord, ...]
    sha256: str | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length


class GroupingChanged(Exception):
    """A resumed upload's frames no longer group into the parts stored before (their stored
    sizes changed): the upload must start over."""


def group_frames(
    frames: Iterable[EncodedPart],
    *,
    first_number: int,
    min_size: int,
    stored_part_of: Mapping[int, int] | None = None,
) -> Iterator[FramePart]:
    """Frames (in order) gathered into parts of at least ``min_size`` stored bytes (the last
    part may be smaller), numbered from ``first_number``.

    A resumed upload passes ``stored_part_of`` (frame number -> number of the stored part
    holding it; those frames come without data): grouping restarts after each stored part,
    which reproduces the parts of the interrupted attempt in between (the same frames have the
    same stored sizes, and a stored part ends where a group ended). If it does not,
    GroupingChanged is raised rather than a part sent under another part's number.
    """
    stored_part_of = stored_part_of or {}
    stored_numbers = set(stored_part_of.values())
    number = first_number
    held: list[EncodedPart] = []
    size = 0

    def emit() -> FramePart:
        if number in stored_numbers:
            raise GroupingChanged(f"part {number} would hold other frames than it stores")
        crc = 0
        for index, frame in enumerate(held):
            crc = (
                frame.crc64nvme
                if index == 0
                else _native.crc64nvme_combine(crc, frame.crc64nvme, frame.stored_length)
            )
        records = tuple(
            FrameRecord(f.number, f.plain_crc64nvme, f.length, f.stored_length, f.crc64nvme)
            for f in held
        )
        data = held[0].data if len(held) == 1 else b"".join(f.data or b"" for f in held)
        assert data is not None
        return FramePart(number, held[0].offset, sum(f.length for f in held), crc, data, records)

    for frame in frames:
        stored = stored_part_of.get(frame.number)
        if stored is not None:
            if held:
                raise GroupingChanged(f"frame {frame.number} no longer starts a part")
            number = stored + 1
            continue
        if frame.data is None:
            raise AssertionError(f"frame {frame.number} has no bytes to send")
        held.append(frame)
        size += frame.stored_length
        if size >= min_size:
            yield emit()
            number += 1
            held, size = [], 0
    if held:
        yield emit()


def _ready(future: cf.Future[EncodedPart] | None) -> bool:
    return future is None or future.done()


__all__ = [
    "ENCODING_METADATA_KEY",
    "EncodedPart",
    "Encoder",
    "Encoding",
    "Encryption",
    "Frame",
    "FramePart",
    "FrameRecord",
    "GroupingChanged",
    "decoder_for",
    "encode_parts",
    "group_frames",
    "looks_encoded",
    "missing_record",
    "read_key_file",
    "store_key",
    "verify_stored_frames",
]


def store_key(value: bytes | str | None) -> bytes | None:
    """StorageConfig.encryption_key as validated (32 bytes), or None."""
    return value if isinstance(value, bytes) else None
