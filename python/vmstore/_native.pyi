"""Type stubs of ``vmstore._native``, the Rust core that touches every byte.

Every call that reads, writes or hashes file data releases the GIL. Errors are raised as
the classes of :mod:`vmstore.errors` (``NotFoundError``, ``PermissionDeniedError``,
``OperationFailedError`` for a full disk, ``CancelledError``, ``ChecksumMismatchError``);
an exception raised by a progress callback propagates unchanged.
"""

from collections.abc import Callable, Iterable
from typing import final

Buffer = bytes | bytearray | memoryview
ProgressCallback = Callable[[int, int], object]
"""Called as ``callback(bytes_done, bytes_total)``; monotonic, the last call has done == total."""

DEFAULT_PROGRESS_INTERVAL_MS: int
"""Least time between two progress callbacks (the final call is always made)."""

@final
class CancelToken:
    """A flag the core polls once per chunk; ``cancel()`` may be called from any thread."""

    def __init__(self) -> None: ...
    def cancel(self) -> None: ...
    @property
    def is_cancelled(self) -> bool: ...

@final
class Sha256:
    """Streaming SHA-256 (CPU SHA extensions where present)."""

    def __init__(self) -> None: ...
    def update(self, data: Buffer) -> None: ...
    def hexdigest(self) -> str:
        """Digest of everything fed so far; the hasher stays usable."""
    @property
    def bytes_hashed(self) -> int: ...

def sha256_file(
    path: str,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> str:
    """Whole-file SHA-256 as 64 lowercase hex digits; holes are hashed as zeros, never read."""

@final
class ChunkWriter:
    """Writes chunks at offsets into a temporary file beside the destination, hashing them in
    order from memory as they arrive.

    The temporary file is opened (created if missing) and locked with an exclusive
    ``flock``; if another writer holds the lock, ``BlockingIOError`` is raised so the
    caller can choose another temp name. With ``resume=False`` any existing content is
    discarded; with ``resume=True`` it is kept (see ``existing_length``).

    With ``hash=True`` (SHA-256) and/or ``crc`` (any of ``"CRC64NVME"``, ``"CRC32C"``,
    ``"CRC32"``: S3's full-object checksums) the object is digested in one in-order pass
    over the bytes as they are written, with the GIL released: the ``write_at`` whose chunk
    is next at the hash frontier hashes it, then every chunk held for after it; a chunk that
    arrives early is held until the frontier reaches it (an immutable ``bytes`` or a buffer
    given up with ``owned=True`` by reference, any other as a copy), never read back from
    the file. Only ranges given to ``mark_done`` (a resumed prefix) are hashed by reading
    the file, on a thread of its own.
    The caller bounds how far ahead of ``hashed_length`` it writes: that is the memory held.
    An error of the in-order pass (a failed read-back, a sink that raised) is raised by the
    call that met it and again by every later ``write_at``, ``hexdigest`` and ``crc_values``.
    """

    def __init__(
        self,
        final_path: str,
        temp_path: str,
        *,
        resume: bool = False,
        hash: bool = False,
        crc: tuple[str, ...] | list[str] = (),
        direct: bool = False,
    ) -> None: ...
    @property
    def direct(self) -> bool:
        """Whether data is written with O_DIRECT (asked for, and the filesystem takes it):
        no page-cache copy; unaligned heads and tails still go through the cache."""
    @staticmethod
    def for_stream(
        sink: Callable[[Buffer], object], *, crc: tuple[str, ...] | list[str] = ()
    ) -> ChunkWriter:
        """A writer without a file: bytes go to ``sink(data)`` strictly in order as the hash
        frontier passes them (SHA-256 always, plus ``crc``), from whichever thread's
        ``write_at`` moved the frontier, with the GIL taken for the call. ``data`` is the
        object given to ``write_at`` (a copy when that was a mutable buffer held early, or a
        part of it). An exception from ``sink`` stops the writer and is raised unchanged by
        that ``write_at`` and every later call. ``final_path``/``temp_path`` are ``""``;
        ``set_len``, ``mark_done`` raise; ``commit``/``abort`` just close."""
    @property
    def final_path(self) -> str: ...
    @property
    def temp_path(self) -> str: ...
    @property
    def is_stream(self) -> bool: ...
    @property
    def existing_length(self) -> int:
        """Length of the temp file when it was opened (0 unless resume=True)."""
    @property
    def bytes_written(self) -> int:
        """Bytes accepted by write_at (zero chunks count, though they are not stored)."""
    @property
    def hashed_length(self) -> int:
        """End of the in-order prefix hashed so far (for a stream: handed to the sink)."""
    @property
    def held_bytes(self) -> int:
        """Bytes of early chunks held now, waiting for the frontier."""
    @property
    def held_bytes_peak(self) -> int:
        """The most bytes ever held at once (the reorder window's memory high-water mark)."""
    def write_at(self, offset: int, data: Buffer, *, owned: bool = False) -> None:
        """pwrite data at offset (GIL released; all-zero blocks are skipped to stay sparse),
        then hash it if it is next, or hold it: by reference when it is a ``bytes`` or when
        ``owned=True`` (the caller gives the buffer up and never changes it again), else as
        a copy (a fresh copy costs page faults: about 2 CPU-s per GiB held)."""
    def mark_done(self, offset: int, length: int) -> None:
        """Tell the in-order hasher that [offset, offset+length) is already on disk (resume):
        it is read back and hashed, on a background thread when it is next."""
    def set_len(self, size: int) -> None:
        """Truncate or extend the temp file (extension leaves a hole)."""
    def hexdigest(self, size: int) -> str:
        """With hash=True: wait until [0, size) is hashed and return the SHA-256 hex."""
    def crc_values(self, size: int) -> dict[str, int]:
        """Wait until [0, size) is hashed; the CRCs asked for by ``crc``, by S3 name, as
        integers (S3's wire form is base64 of their 8 or 4 big-endian bytes)."""
    def commit(self) -> None:
        """fsync the temp file, rename it over final_path, fsync the directory."""
    def abort(self, keep: bool = False) -> None:
        """Close; remove the temp file unless keep=True (kept for a later resume)."""
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> ChunkWriter: ...
    def __exit__(self, *exc: object) -> None:
        """Aborts (removing the temp file) unless commit() already ran."""

@final
class CopyResult:
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def bytes_copied(self) -> int:
        """Bytes read from the source in this call (excludes a verified resumed prefix)."""
    @property
    def resumed_from(self) -> int:
        """Offset the copy continued from (0 when it started fresh)."""
    @property
    def holes_skipped(self) -> int:
        """Bytes of holes and zero chunks not written to the destination."""

def copy_file(
    source_path: str,
    writer: ChunkWriter,
    *,
    chunk_size: int = 32 << 20,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    limiter: RateLimiter | None = None,
    limit_writes: bool = False,
) -> CopyResult:
    """Copy source into writer's temp file, hashing while copying; does not commit.

    With ``limiter``, the bytes read from the source (``limit_writes=False``: a download from
    a share) or the bytes stored into the destination (``limit_writes=True``: an upload onto
    it; holes and skipped zero blocks are no traffic) are taken from it, in pieces of at most
    its burst, the resume's re-read of that side included.

    Reading, hashing and writing run on three threads so the time is the slowest of the
    three, not their sum. Holes and all-zero chunks are hashed but not written, and the temp
    file is left exactly source-sized. With ``resume=True`` the writer's existing prefix (its
    ``existing_length``, rounded down to ``chunk_size``) is re-hashed from both files and
    reused only if the bytes are equal; otherwise the copy starts over.
    """

def is_network_filesystem(path: str) -> tuple[bool, str]:
    """(True if ``path`` lives on NFS, name of the filesystem type) from statfs(2)."""

@final
class PartBuffer:
    """A part's bytes in native memory (pooled); ``memoryview(buffer)`` reads them without a
    copy. Read-only."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

@final
class ChunkBuffers:
    """The pooled buffers of one download's ranged reads (vmstore._bodyread)."""

    def __init__(self) -> None: ...
    def take(self, n: int) -> ChunkBuffer:
        """A writable buffer of exactly ``n`` bytes, contents unspecified; its allocation
        returns to the pool when the buffer is dropped."""

@final
class ChunkBuffer:
    """One chunk's memory: ``memoryview(buffer)`` is writable (fill it, e.g. ``readinto``,
    then give it up: the writer's ``owned=True``)."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

@final
class SourcePart:
    """One part of an upload's source, as read and hashed by :class:`UploadSource`."""

    @property
    def number(self) -> int:
        """1-based, in source order."""
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def crc64nvme(self) -> int:
        """CRC-64/NVME of this part's bytes (S3's wire form: base64 of 8 big-endian bytes)."""
    @property
    def sha256(self) -> str | None:
        """SHA-256 hex of this part, when the source was opened with ``part_sha256``."""
    @property
    def data(self) -> PartBuffer | bytearray | None:
        """The bytes (None when read with ``keep=False``: hashed only)."""

@final
class UploadSource:
    """The one sequential pass over an upload's source: each part is read once, into memory
    handed to the HTTP body, and hashed from that memory (whole-object SHA-256 and
    CRC-64/NVME in order, and the part's own checksum), with the GIL released."""

    @staticmethod
    def file(path: str, *, part_sha256: bool = False, direct: bool = False) -> UploadSource:
        """A regular file; holes are zeros, never read. ``direct`` reads it with O_DIRECT
        where the filesystem allows (no page-cache copy; the host's cache left alone)."""
    @property
    def direct(self) -> bool:
        """Whether the file is read with O_DIRECT."""
    @staticmethod
    def stream(
        stream: object, *, name: str = "<stream>", part_sha256: bool = False
    ) -> UploadSource:
        """A binary stream, read with ``readinto`` when it has one (else ``read``)."""
    def next_part(self, length: int, *, keep: bool = True) -> SourcePart | None:
        """The next part, at most ``length`` bytes (fewer only at the end), None at the end."""
    @property
    def position(self) -> int: ...
    @property
    def size(self) -> int | None:
        """The file's size when opened; None for a stream."""
    @property
    def name(self) -> str: ...
    @property
    def exhausted(self) -> bool: ...
    def sha256(self) -> str:
        """SHA-256 hex of every byte consumed so far."""
    def crc64nvme(self) -> int:
        """CRC-64/NVME of every byte consumed so far."""

# --- codec (rust/src/codec.rs; docs/FORMAT.md) -------------------------------------------

FRAME_HEADER_SIZE: int
"""Bytes of the fixed header in front of every stored frame (48)."""
FRAME_TAG_SIZE: int
"""Bytes of an encrypted frame's AES-GCM-SIV tag (16)."""

@final
class EncodedFrame:
    @property
    def data(self) -> bytes:
        """The whole frame as stored (header + payload)."""
    @property
    def crc64nvme(self) -> int:
        """CRC-64/NVME of ``data``."""

@final
class FrameCodec:
    """One transfer's frame transform: zstd (``compression="zstd"``, ``level``) and/or
    AES-256-GCM-SIV under HKDF-SHA256(``key``, ``salt``). Errors: InvalidConfigError for bad
    parameters; ``decode`` raises ChecksumMismatchError for a frame that is damaged, altered,
    from another object or out of place."""

    def __init__(
        self,
        *,
        compression: str | None = None,
        level: int = 3,
        key: bytes | None = None,
        salt: bytes | None = None,
        nonce_prefix: bytes | None = None,
    ) -> None: ...
    def encode(self, data: object, index: int, plain_offset: int, last: bool) -> EncodedFrame:
        """One part's bytes as a frame, with the GIL released."""
    def decode(
        self, frame: object, index: int, plain_offset: int, plain_length: int, last: bool
    ) -> bytes:
        """A frame's plain bytes, checked against the place given, with the GIL released."""

def frame_key_check(key: bytes, salt: bytes) -> bytes:
    """HKDF-SHA256(key, salt, "vmstore/v1/key-check"), 32 bytes: recorded with the object."""

def check_frame_key(key: bytes, salt: bytes, expected: bytes) -> None:
    """PermissionDeniedError unless ``key`` gives the key check ``expected``."""

def parse_frame_header(head: bytes) -> tuple[int, int, int, int, int]:
    """(flags, index, plain_offset, plain_length, payload_length) of a frame header."""

def crc64nvme_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC-64/NVME of A||B from the CRCs of A and B and the length of B."""

def crc64nvme(data: object) -> int:
    """CRC-64/NVME of a bytes-like object (the GIL released for large ones)."""
# --- image inspection (rust/src/image.rs; vmstore.images wraps these) ---------------------

def inspect_image_path(path: str) -> dict[str, object]:
    """What the header of the image file at ``path`` says (the fields of
    ``vmstore.images.ImageInfo``); GIL released; InvalidConfigError for a malformed header."""

def inspect_image_bytes(
    head: bytes, *, size: int | None = None, name: str = "<stream>"
) -> dict[str, object]:
    """The same for the start of an image (``size``: the whole image's length, when known)."""

@final
class RateLimiter:
    """A token bucket of ``rate_bytes_per_s`` (> 0) bytes per second, shared by every thread
    that holds it; burst ``max(512 KiB, rate / 16)``, full at first.

    ``acquire(n)`` reserves ``n`` bytes at once (callers are served in the order they asked)
    and sleeps, with the GIL released, until they are earned; more than the burst is taken in
    pieces. ``cancel`` (a CancelToken, or several in an iterable, None entries ignored) ends
    the wait with ``CancelledError`` within 50 ms of being cancelled, giving the tokens back;
    a pending signal (Ctrl-C) ends a main thread's wait too."""

    def __init__(self, rate_bytes_per_s: int) -> None: ...
    def acquire(
        self,
        n: int,
        cancel: CancelToken | Iterable[CancelToken | None] | None = None,
    ) -> None: ...
    @property
    def rate(self) -> int: ...
    @property
    def burst(self) -> int: ...
    @property
    def granted(self) -> int:
        """Bytes granted so far (cancelled waits excluded)."""
