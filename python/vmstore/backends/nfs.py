"""NFS backend: the share is a directory mounted on this host.

Bytes move through the native core (``copy_file`` into a ``ChunkWriter`` temp file beside
the final name, hashed while copied; a stream is written chunk by chunk through the same
writer); this module decides names, checks that every path stays inside the mount point,
keeps the checksum in a sidecar file, and decides when a partial file is worth keeping for a
resume.

Files beside a stored ``<name>``:

- ``<name>.vmstore.json``: the sidecar (:mod:`vmstore._sidecar`: sha256, size, content type,
  metadata), replaced atomically just *before* the data is renamed into place. It is bound
  to the data it describes by the committed file's identity (inode, size, mtime; not the
  device number, which differs on every client of the share): a reader believes it only for
  that very file, so two writers racing on one name can never leave a checksum that lies.
  After its commit, a writer whose data is in place re-writes its sidecar if a racing
  writer's replaced it (or if the server changed the mtime on the final flush).
- ``<name>.vmstore-partial-<host>``: an upload in progress or interrupted on ``<host>``,
  locked with ``flock`` while written; reused by the next upload from that host.
- ``<name>.vmstore-tmp-<host>-<pid>-<random>``: a one-off temp file for a writer that
  found the partial locked by another, or for a stream (which cannot resume); never resumed.

``delete`` removes all of them that no transfer holds locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mimetypes
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from vmstore import _many, _native, images
from vmstore._codec import (
    EncodedPart,
    Encoder,
    Encoding,
    FrameRecord,
    encode_parts,
    looks_encoded,
    missing_record,
    store_key,
    verify_stored_frames,
)
from vmstore._download import DownloadSettings, RemoteObject, download_object
from vmstore._failure import keeps_partial
from vmstore._incomplete import (
    cutoff,
    forget_download,
    known_downloads,
    record_download,
    remove_download,
    remove_file,
    state_dir,
)
from vmstore._localpath import (
    check_destination_file,
    check_source_file,
    direct_io_suits,
    open_regular_file,
    refuse_non_regular,
    stream_label,
)
from vmstore._oserrors import storage_error_from_oserror
from vmstore._ratelimit import Pacer, limiter_for, pacer_for
from vmstore._retry import RetryableError, RetryPolicy
from vmstore._sidecar import MAX_SIDECAR_BYTES, SIDECAR_SUFFIX, Sidecar, SidecarFormatError
from vmstore._upload import PartFeed, SourcePlan, encoder_for, plan_source
from vmstore.config import StorageConfig
from vmstore.errors import (
    CancelledError,
    ChecksumMismatchError,
    InvalidConfigError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    StorageError,
)
from vmstore.models import (
    DEFAULT_CONTENT_TYPE,
    DownloadRequest,
    DownloadResponse,
    FileMetadata,
    IncompleteTransfer,
    ProgressCallback,
    ReadableStream,
    UploadRequest,
    UploadResponse,
    WritableStream,
    normalize_custom_metadata,
    parse_sha256_hex,
)
from vmstore.progress import ProgressReporter
from vmstore.urls import nfs_url, parse_nfs_url

logger = logging.getLogger("vmstore.nfs")

DEFAULT_CHUNK_SIZE = 32 << 20
DEFAULT_FRAME_SIZE = 16 << 20
"""Part size of an encoded (compressed/encrypted) upload without a chunk_size: each frame is
held plain and encoded while in flight, so 32 MiB frames cost twice the memory of the HTTP
backend's 16 MiB for 0.1 % of compression ratio (docs/BENCHMARKS.md)."""

PARTIAL_SUFFIX = ".vmstore-partial"
TEMP_MARKER = ".vmstore-tmp-"

# Mount points whose filesystem type was already reported: a controller that builds a store
# per transfer gets one warning per process, not one per transfer.
_reported_mounts: set[str] = set()
_reported_mounts_lock = threading.Lock()

_RESERVED_NAME = re.compile(
    rf"({re.escape(SIDECAR_SUFFIX)}$|{re.escape(PARTIAL_SUFFIX)}|{re.escape(TEMP_MARKER)})"
)


def _host_label() -> str:
    """This host's name, safe inside a file name (partials are per host on a shared mount)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _chunk_writer(final_path: str, temp_path: str, *, resume: bool) -> _native.ChunkWriter:
    """The writer of every copy into a temp file beside ``final_path``: O_DIRECT where the
    directory is on a local disk (``direct_io_suits``, the network backends' rule for their
    partials), so a copy neither fills the page cache nor pays the first touch of its fresh
    pages (docs/BENCHMARKS.md, NFS backend); a share on NFS is written through the cache."""
    return _native.ChunkWriter(
        final_path,
        temp_path,
        resume=resume,
        direct=direct_io_suits(os.path.dirname(final_path) or "."),
    )


def _unique_temp_path(final_path: str) -> str:
    return f"{final_path}{TEMP_MARKER}{_host_label()}-{os.getpid()}-{secrets.token_hex(4)}"


def _etag(st: os.stat_result) -> str:
    # The inode changes with every atomic replace, size and mtime with any edit in place.
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


def _written_for_this_file(sidecar: Sidecar, st: os.stat_result) -> bool:
    """Whether sidecar was written for this very file (its inode), which may have been
    changed in place since; a release-1 sidecar (no etag) is judged by size, as then."""
    if not sidecar.etag:
        return sidecar.size == st.st_size
    return sidecar.etag.split("-", 1)[0] == f"{st.st_ino:x}"


def _has_content(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


@dataclass(frozen=True)
class _Target:
    """A file inside the mount point, symlinks resolved and containment checked."""

    path: str
    url: str


class _CopyOutcome(Protocol):
    """What a finished copy reports: a native CopyResult or a stream copy's _StreamCopy."""

    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def bytes_copied(self) -> int: ...
    @property
    def resumed_from(self) -> int: ...
    @property
    def holes_skipped(self) -> int: ...


@dataclass(frozen=True)
class _StreamCopy:
    sha256: str
    size: int
    bytes_copied: int
    resumed_from: int = 0
    holes_skipped: int = 0


def _check_cancel(cancel: _native.CancelToken | None, what: str) -> None:
    if cancel is not None and cancel.is_cancelled:
        raise CancelledError(f"{what} cancelled")


def _fill_from_stream(
    stream: ReadableStream, view: memoryview, cancel: _native.CancelToken | None, label: str
) -> int:
    """Read from stream until view is full or the stream ends; returns the bytes read.

    A pipe hands out what it has (often 64 KiB), so one read rarely fills a chunk; filling
    it keeps chunks aligned, which lets all-zero chunks stay holes.
    """
    readinto = getattr(stream, "readinto", None)
    filled = 0
    while filled < len(view):
        try:
            if callable(readinto):
                got = readinto(view[filled:])
            else:
                data = stream.read(len(view) - filled)
                got = None if data is None else len(data)
                if got is not None and got > len(view) - filled:
                    raise InvalidConfigError(
                        f"source_stream.read({len(view) - filled}) returned {got} bytes"
                    )
                if got:
                    view[filled : filled + got] = data
        except OSError as exc:
            raise storage_error_from_oserror(
                exc, "read", f"the source stream {label}", advice="nothing was stored; retry"
            ) from exc
        except ValueError as exc:  # read from a closed file
            raise InvalidConfigError(
                f"could not read the source stream {label}: {exc}", cause=exc
            ) from exc
        if got is None:
            # A non-blocking stream with nothing to read yet: wait for it, cancellably.
            _check_cancel(cancel, "upload of <stream>")
            time.sleep(0.01)
            continue
        if got == 0:
            break
        filled += got
    return filled


def _write_to_stream(stream: WritableStream, data: bytes, label: str) -> None:
    """Write all of data (a raw stream may take only part of it per call)."""
    view = memoryview(data)
    while view:
        try:
            # bytes, never a view of a reused buffer: a consumer may keep what it is given.
            written = stream.write(data if len(view) == len(data) else bytes(view))
        except OSError as exc:
            raise storage_error_from_oserror(
                exc,
                "write to",
                f"the destination stream {label}",
                advice="the consumer stopped"
                " reading (or failed); what it received is incomplete: discard it and retry",
            ) from exc
        except ValueError as exc:  # write to a closed file
            raise InvalidConfigError(
                f"could not write to the destination stream {label}: {exc}", cause=exc
            ) from exc
        if written is None:
            time.sleep(0.01)  # a non-blocking stream that is full; try again
            continue
        if not isinstance(written, int) or isinstance(written, bool):
            return  # a stream whose write() returns nothing useful took it all
        view = view[written:]


class _ResumedFramesDiffer(ChecksumMismatchError):
    def __init__(self, number: int) -> None:
        super().__init__(f"frame {number} of the interrupted upload no longer matches the source")


class _FrameJournal:
    """What an interrupted encoded NFS upload wrote into its partial: a header line (source
    identity, part size, compression, salt, key check: never the key) and one line per frame
    written, ``[number, plain CRC, plain length, stored length, stored CRC]``, in order. Kept
    in vmstore's state directory, named after the partial."""

    VERSION = 1

    def __init__(self, partial: str) -> None:
        ident = hashlib.sha256(os.path.realpath(partial).encode()).hexdigest()[:40]
        self.path = os.path.join(state_dir(), f"nfs-frames-{ident}.json")

    def _header(self, plan: SourcePlan, encoder: Encoder) -> dict[str, Any]:
        assert plan.stat is not None
        encryption = encoder.encryption
        return {
            "version": self.VERSION,
            "source": plan.name,
            "size": plan.stat.st_size,
            "mtime_ns": plan.stat.st_mtime_ns,
            "part_size": plan.part_size(1),
            "compression": encoder.compression,
            "salt": encryption.salt.hex() if encryption else None,
            "key_check": encryption.key_check.hex() if encryption else None,
        }

    def resume(
        self, plan: SourcePlan, encoder: Encoder, writer: _native.ChunkWriter, key: bytes | None
    ) -> tuple[Encoder, dict[int, FrameRecord]]:
        """The encoder to continue with and the frames of the partial that can be kept (a
        contiguous prefix whose stored bytes still have their CRCs); the journal and the
        partial are cut back to them."""
        kept: dict[int, FrameRecord] = {}
        try:
            with open(self.path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
            header = json.loads(lines[0])
            records = []
            for line in lines[1:]:
                try:
                    records.append(FrameRecord.from_list(json.loads(line)))
                except ValueError:
                    break  # a line torn by a crash: the frames before it are the journal
        except (OSError, ValueError, IndexError, UnicodeDecodeError):
            header, records = None, []
        current = self._header(plan, encoder)
        same = isinstance(header, dict) and all(
            header.get(k) == current[k]
            for k in ("version", "source", "size", "mtime_ns", "part_size", "compression")
        )
        if same and isinstance(header, dict) and (header.get("salt") is None) == (key is None):
            try:
                if key is not None:
                    salt = bytes.fromhex(str(header["salt"]))
                    _native.check_frame_key(key, salt, bytes.fromhex(str(header["key_check"])))
                    encoder = Encoder(encoder.compression, key, salt=salt)
                kept = self._verified(records, writer)
            except (StorageError, ValueError, OSError):
                kept = {}
        if not kept:
            encoder = Encoder(encoder.compression, key)  # a fresh salt for a fresh start
        writer.set_len(sum(f.stored_length for f in kept.values()))
        self._write(self._header(plan, encoder), list(kept.values()))
        return encoder, kept

    @staticmethod
    def _verified(
        records: list[FrameRecord], writer: _native.ChunkWriter
    ) -> dict[int, FrameRecord]:
        kept: dict[int, FrameRecord] = {}
        offset, on_disk = 0, writer.existing_length
        with open(writer.temp_path, "rb", buffering=0) as partial:
            for expected, frame in enumerate(records, start=1):
                if frame.number != expected or offset + frame.stored_length > on_disk:
                    break
                data = os.pread(partial.fileno(), frame.stored_length, offset)
                if len(data) != frame.stored_length or _native.crc64nvme(data) != frame.crc64nvme:
                    break  # lost or garbled by a crash: written again from here
                kept[frame.number] = frame
                offset += frame.stored_length
        return kept

    def _write(self, header: dict[str, Any], frames: list[FrameRecord]) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        temp = f"{self.path}.{os.getpid()}.tmp"
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(header) + "\n")
            handle.writelines(json.dumps(f.to_list()) + "\n" for f in frames)
        os.replace(temp, self.path)

    def append(self, frame: EncodedPart) -> None:
        record = FrameRecord(
            frame.number, frame.plain_crc64nvme, frame.length, frame.stored_length, frame.crc64nvme
        )
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record.to_list()) + "\n")
        except OSError as exc:
            logger.warning("could not journal frame %d in %s: %s", frame.number, self.path, exc)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def _never_retry(_exc: BaseException) -> RetryableError | None:
    return None


class _FileRangeReader:
    """The download pipeline's reader over a file of the share (already opened, so a file
    replaced meanwhile is not mixed in)."""

    def __init__(self, source: Any, target: _Target, pacer: Pacer | None) -> None:
        self._fd: int = source.fileno()
        self._target = target
        self._pacer = pacer

    def read_range(self, start: int, end: int) -> bytes:
        if self._pacer is not None:
            # Off the share within the bandwidth limit (the same blocks a plain copy takes).
            for offset in range(start, end, self._pacer.block):
                self._pacer.take(min(self._pacer.block, end - offset))
        try:
            data = os.pread(self._fd, end - start, start)
            while len(data) < end - start:
                more = os.pread(self._fd, end - start - len(data), start + len(data))
                if not more:
                    break
                data += more
        except OSError as exc:
            raise storage_error_from_oserror(exc, "read", self._target.url) from exc
        if len(data) != end - start:
            raise OperationFailedError(
                f"{self._target.url} ended at byte {start + len(data)}, before the frames its "
                "sidecar records: it was truncated; nothing was written"
            )
        return data

    def read_stream(self) -> Iterable[bytes]:
        raise AssertionError("a file in the share is always read by range")


class NfsStorage(_many.BatchTransfers):
    """Storage on an NFS share mounted at ``config.endpoint``."""

    def __init__(self, config: StorageConfig) -> None:
        self._config = config
        self._mount_point = self._check_mount_point(config.endpoint)
        self._mount_real = os.path.realpath(self._mount_point)
        self._chunk_size = config.chunk_size or DEFAULT_CHUNK_SIZE
        self._closed = False
        self._limiter = limiter_for(config)
        self._log_filesystem_type()

    # --- the Storage protocol -------------------------------------------------------------

    def upload(self, request: UploadRequest) -> UploadResponse:
        self._check_open()
        target = self._resolve(request.destination_url)
        metadata = normalize_custom_metadata(request.metadata)
        source_path = request.source_path
        source_size: int | None = request.size_hint
        if source_path is not None:
            # stat, never open: a FIFO would block open() forever (the core re-checks the
            # descriptor it opens, so a FIFO swapped in meanwhile is refused too).
            source_size = check_source_file(source_path).st_size
        if os.path.isdir(target.path):
            raise InvalidConfigError(
                f"cannot upload to {target.url}: a directory of that name exists; "
                "give a file path inside it"
            )
        encoder = encoder_for(request, store_key(self._config.encryption_key))
        # The image policy's hook, before anything is written to the share (an encoded
        # upload's plan_source applies it: it reads the source itself).
        stream = request.source_stream
        image: images.ImageInfo | None = None
        if encoder is not None:
            pass
        elif stream is not None:
            stream, image = images.check_upload_stream(
                stream, allow=request.allow_backing_file, size=request.size_hint
            )
        else:
            assert source_path is not None
            image = images.check_upload_file(source_path, allow=request.allow_backing_file)
        self._make_parent_directories(target)
        content_type = request.content_type or (
            (mimetypes.guess_type(source_path)[0] if source_path else None) or DEFAULT_CONTENT_TYPE
        )
        sidecar_written: list[tuple[Sidecar, os.stat_result]] = []

        def write_sidecar(
            sha256: str,
            temp_path: str,
            encoding: Encoding | None = None,
            encoded_image: images.ImageInfo | None = None,
        ) -> None:
            # Bound to the temp file's identity, which the rename into place keeps.
            temp_stat = self._stat(temp_path, "read the size of")
            size = encoding.plain_size if encoding is not None else temp_stat.st_size
            info = encoded_image or image
            sidecar = Sidecar(
                sha256=sha256,
                size=size,
                encoding=encoding,
                etag=_etag(temp_stat),
                mtime_ns=temp_stat.st_mtime_ns,
                content_type=content_type,
                metadata=metadata,
                uploaded_at=datetime.now(UTC).isoformat(),
                image=images.record_of(info, size) if info else None,
            )
            self._write_sidecar(target.path, sidecar)
            sidecar_written.append((sidecar, temp_stat))

        logger.info(
            "uploading %s (%s bytes) to %s",
            request.source_name,
            "unknown" if source_size is None else source_size,
            target.url,
        )
        started = time.monotonic()
        result: _CopyOutcome
        # What the sidecar held before, so that an upload failing after its sidecar was
        # written (the commit's fsync or rename) leaves the previous object's sidecar.
        previous_sidecar = self._sidecar_bytes(target.path)
        try:
            if encoder is not None:
                result = self._encoded_upload(request, target.path, encoder, write_sidecar)
            elif stream is not None:
                result = self._copy_stream_in(
                    stream,
                    size_hint=request.size_hint,
                    final_path=target.path,
                    progress_callback=request.progress_callback,
                    cancel=request.cancel,
                    before_commit=write_sidecar,
                )
            else:
                assert source_path is not None  # UploadRequest guarantees one source
                result = self._copy(
                    source_path,
                    source_label=source_path,
                    final_path=target.path,
                    partial_path=f"{target.path}{PARTIAL_SUFFIX}-{_host_label()}",
                    resume=request.resume,
                    progress_callback=request.progress_callback,
                    cancel=request.cancel,
                    expected_sha256=None,
                    before_commit=lambda copied, temp_path: write_sidecar(copied.sha256, temp_path),
                    onto_share=True,
                )
        except BaseException:
            if sidecar_written:
                self._restore_sidecar(target.path, sidecar_written[-1][0], previous_sidecar)
            raise
        final_stat = self._stat(target.path, "read the metadata of")
        if sidecar_written:
            self._confirm_sidecar(target, final_stat, *sidecar_written[-1])
        self._log_done("uploaded", target.url, result, started)
        return UploadResponse(
            url=target.url,
            checksum=result.sha256,
            bytes_transferred=result.bytes_copied,
            etag=_etag(final_stat),
            size=result.size,
            resumed_from=result.resumed_from,
        )

    def download(self, request: DownloadRequest) -> DownloadResponse:
        self._check_open()
        target = self._resolve(request.source_url)
        source_stat = self._stat_stored_file(target)
        sidecar = self._load_sidecar(target.path)
        if (
            sidecar is not None
            and sidecar.encoding is not None
            and _written_for_this_file(sidecar, source_stat)
        ):
            # Even if the file was changed in place since: its frames will not decode.
            return self._encoded_download(request, target, sidecar, sidecar.encoding)
        self._refuse_frames_without_record(target)
        if request.destination_stream is not None:
            return self._download_to_stream(request, target, request.destination_stream)
        assert request.destination_path is not None  # DownloadRequest guarantees one
        expected_sha256 = self._expected_sha256(request, target, source_stat)
        destination_path = check_destination_file(request.destination_path)
        self._make_directories(os.path.dirname(destination_path))

        logger.info(
            "downloading %s (%d bytes) to %s", target.url, source_stat.st_size, destination_path
        )
        started = time.monotonic()
        partial_path = destination_path + PARTIAL_SUFFIX
        # Recorded before the copy starts, so gc finds the partial even of a killed download
        # (a record whose partial is gone is dropped when listed).
        record_download(target.url, partial_path, None)
        result = self._copy(
            target.path,
            source_label=target.url,
            final_path=destination_path,
            partial_path=partial_path,
            resume=request.resume,
            progress_callback=request.progress_callback,
            cancel=request.cancel,
            expected_sha256=expected_sha256,
            # The image policy's hook: the verified copy's header, before it is renamed.
            before_commit=None
            if request.allow_backing_file
            else lambda _copied, temp_path: images.check_download_file(
                temp_path, target.url, destination_path, allow=False
            ),
            onto_share=False,
        )
        forget_download(partial_path)
        self._log_done("downloaded", target.url, result, started)
        return DownloadResponse(
            checksum=result.sha256,
            content_length=result.size,
            bytes_transferred=result.bytes_copied,
            destination_path=destination_path,
            resumed_from=result.resumed_from,
        )

    def get_metadata(self, url: str) -> FileMetadata:
        self._check_open()
        target = self._resolve(url)
        st = self._stat_stored_file(target)
        sidecar = self._read_sidecar(target.path, st)
        return FileMetadata(
            url=target.url,
            # An encoded file's size is its image's (the sidecar matched the stored size).
            size=sidecar.size if sidecar is not None and sidecar.encoding else st.st_size,
            checksum=sidecar.sha256 if sidecar else None,
            etag=_etag(st),
            last_modified=datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC),
            content_type=sidecar.content_type if sidecar else DEFAULT_CONTENT_TYPE,
            custom_metadata=dict(sidecar.metadata) if sidecar else {},
            image_format=images.from_record(sidecar.image if sidecar else None)[0],
            virtual_size=images.from_record(sidecar.image if sidecar else None)[1],
        )

    def delete(self, url: str) -> None:
        """Remove the object, its sidecar, and every partial or temp file a transfer to this
        URL left in the share (from any host), except those a running transfer holds locked."""
        self._check_open()
        target = self._resolve(url)
        if os.path.isdir(target.path):
            raise InvalidConfigError(f"{target.url} is a directory; vmstore deletes files only")
        # Data first: a reader that races with us sees no file rather than a file whose
        # checksum has already gone.
        removed = [p for p in (target.path, target.path + SIDECAR_SUFFIX) if self._unlink(p)]
        in_use = []
        for path in self._leftovers(target.path):
            outcome = self._unlink_unless_locked(path)
            if outcome is None:
                in_use.append(os.path.basename(path))
            elif outcome:
                removed.append(path)
        if in_use:
            logger.warning(
                "left %s beside %s: a transfer in progress holds %s",
                ", ".join(in_use),
                target.url,
                "it" if len(in_use) == 1 else "them",
            )
        if removed:
            logger.info(
                "deleted %s (%s)", target.url, ", ".join(os.path.basename(p) for p in removed)
            )
        else:
            logger.info("nothing to delete at %s", target.url)

    def validate_url(self, url: str) -> None:
        self._resolve(url)

    # --- what interrupted transfers left ------------------------------------------------

    def list_incomplete(self, prefix: str = "") -> list[IncompleteTransfer]:
        """Partial and temp files of uploads inside the share under ``prefix`` (any host's),
        and the partials of downloads from it that this host started."""
        self._check_open()
        root = self._mount_real if not prefix else self._resolve(prefix).path
        base, start = (root, "") if os.path.isdir(root) else os.path.split(root)
        found = []
        for directory, _dirs, names in os.walk(base):
            for name in names:
                path = os.path.join(directory, name)
                if not path.startswith(os.path.join(base, start)) or not _RESERVED_NAME.search(
                    name
                ):
                    continue
                if name.endswith(SIDECAR_SUFFIX):
                    continue  # a committed file's sidecar, not a leftover
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                data_name = re.split(
                    f"{re.escape(SIDECAR_SUFFIX)}|{re.escape(PARTIAL_SUFFIX)}|{re.escape(TEMP_MARKER)}",
                    name,
                )[0]
                relative = os.path.relpath(os.path.join(directory, data_name), self._mount_real)
                found.append(
                    IncompleteTransfer(
                        url=nfs_url(relative),
                        kind="upload",
                        location=path,
                        bytes_done=st.st_size,
                        modified=datetime.fromtimestamp(st.st_mtime, UTC),
                    )
                )
        prefix_url = nfs_url(os.path.relpath(root, self._mount_real)) if prefix else "nfs://"
        downloads = known_downloads(prefix_url.removesuffix("."))
        return sorted(found + downloads, key=lambda t: (t.url, t.kind, t.location))

    def cleanup_incomplete(self, older_than: float | timedelta) -> list[IncompleteTransfer]:
        """Remove the leftovers ``list_incomplete()`` finds that are older than the cutoff and
        that no running transfer holds (its flock); returns what went."""
        before = cutoff(older_than)
        removed = []
        for transfer in self.list_incomplete():
            if transfer.modified > before:
                continue
            gone = (
                remove_download(transfer)
                if transfer.kind == "download"
                else remove_file(transfer.location)
            )
            if gone:
                removed.append(transfer)
        return removed

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return f"NfsStorage(mount_point={self._mount_point!r})"

    # --- the copy, shared by upload and download ------------------------------------------

    def _copy(
        self,
        source_path: str,
        *,
        source_label: str,
        final_path: str,
        partial_path: str,
        resume: bool,
        progress_callback: ProgressCallback | None,
        cancel: _native.CancelToken | None,
        expected_sha256: str | None,
        before_commit: Callable[[_native.CopyResult, str], None] | None,
        onto_share: bool,
    ) -> _native.CopyResult:
        """Copy source into a temp file beside final_path, verify, then commit atomically.

        ``onto_share``: the destination is on the share (an upload), so the bandwidth limit
        counts the bytes stored there; else (a download) the bytes read from the source."""
        writer, resumable = self._open_writer(final_path, partial_path, resume)
        # Always hand the core a Python callback, even without a caller's: running Python
        # code every ~100 ms is what lets Ctrl-C (KeyboardInterrupt) stop a long copy.
        reporter = ProgressReporter(progress_callback)
        try:
            result = _native.copy_file(
                source_path,
                writer,
                chunk_size=self._chunk_size,
                resume=resumable,
                progress=reporter,
                cancel=cancel,
                limiter=self._limiter,
                limit_writes=onto_share,
            )
            reporter.finish(result.size)
            if expected_sha256 is not None and result.sha256 != expected_sha256:
                raise ChecksumMismatchError(
                    f"checksum mismatch for {source_label}: expected sha256 {expected_sha256}, "
                    f"got {result.sha256}; {final_path} was left as it was and the partial "
                    "copy removed: check the source and the expected checksum, then retry"
                )
            if result.resumed_from:
                logger.info(
                    "resumed %s at byte %d (prefix verified)", final_path, result.resumed_from
                )
            if before_commit is not None:
                before_commit(result, writer.temp_path)
            writer.commit()
        except BaseException as exc:
            self._abort(writer, keep=resumable and keeps_partial(exc))
            if isinstance(exc, OSError):
                raise storage_error_from_oserror(exc, "copy to", final_path) from exc
            raise
        return result

    def _open_writer(
        self, final_path: str, partial_path: str, resume: bool
    ) -> tuple[_native.ChunkWriter, bool]:
        """Open the writer on partial_path, or on a unique temp file if that one is locked.

        Returns the writer and whether it may resume (only the shared partial name can).
        """
        try:
            return _chunk_writer(final_path, partial_path, resume=resume), resume
        except BlockingIOError:
            temp_path = _unique_temp_path(final_path)
            logger.warning(
                "%s is locked by another transfer; writing to %s instead (no resume)",
                partial_path,
                temp_path,
            )
        except OSError as exc:
            raise storage_error_from_oserror(exc, "create temporary file", partial_path) from exc
        try:
            return _chunk_writer(final_path, temp_path, resume=False), False
        except OSError as exc:
            raise storage_error_from_oserror(exc, "create temporary file", temp_path) from exc

    @staticmethod
    def _abort(writer: _native.ChunkWriter, *, keep: bool) -> None:
        keep = keep and _has_content(writer.temp_path)
        try:
            writer.abort(keep=keep)
        except (OSError, StorageError) as exc:
            # Never hide the error that made us abort behind one about cleaning up.
            logger.warning("could not clean up %s: %s", writer.temp_path, exc)
            return
        if keep:
            logger.info("kept %s for a later resume", writer.temp_path)

    # --- encoded (compressed / encrypted) transfers: the shared frame pipeline -------------

    def _encoded_upload(
        self,
        request: UploadRequest,
        final_path: str,
        encoder: Encoder,
        write_sidecar: Callable[[str, str, Encoding | None, images.ImageInfo | None], None],
        *,
        may_resume: bool = True,
    ) -> _StreamCopy:
        """The one upload pipeline's parts (UploadSource), encoded into frames
        (docs/FORMAT.md) and written in order into the partial, then the sidecar with the
        frame record, then the commit.

        A file's upload resumes like a plain one: the partial keeps the frames written, a
        journal in the state directory (never the key) names them with their CRCs and the
        upload's salt; a resume re-reads those frames from the partial, checks them and the
        source's plain bytes against the journal, and continues under the same salt."""
        frame_size = self._config.chunk_size or DEFAULT_FRAME_SIZE
        plan = plan_source(request, lambda _size: frame_size)
        resumable = may_resume and request.resume and plan.stat is not None
        if resumable:
            partial = f"{final_path}{PARTIAL_SUFFIX}-{_host_label()}"
            writer, resumable = self._open_writer(final_path, partial, True)
        else:
            temp = _unique_temp_path(final_path)
            try:
                writer = _chunk_writer(final_path, temp, resume=False)
            except OSError as exc:
                raise storage_error_from_oserror(exc, "create temporary file", temp) from exc
        journal = _FrameJournal(writer.temp_path) if resumable else None
        stored_frames: dict[int, FrameRecord] = {}
        if journal is not None:
            encoder, stored_frames = journal.resume(plan, encoder, writer, self._key)
        reporter = ProgressReporter(request.progress_callback, plan.size or 0)
        stored = sum(frame.stored_length for frame in stored_frames.values())
        resumed = 0
        pacer = pacer_for(self._limiter, request.cancel)

        def resumed_frame(length: int) -> None:
            nonlocal resumed
            resumed += length
            reporter.advance(length)

        try:
            if resumed_bytes := sum(f.plain_length for f in stored_frames.values()):
                logger.info("resuming %s at %d bytes (frames verified)", final_path, resumed_bytes)
            with PartFeed(
                plan, cancel=request.cancel, keep=lambda number: number not in stored_frames
            ) as feed:
                for frame in encode_parts(
                    verify_stored_frames(
                        feed, stored_frames, differs=_ResumedFramesDiffer, advance=resumed_frame
                    ),
                    encoder,
                    concurrency=_many.concurrency_for(self._config.concurrency),
                    stored={n: (f.stored_length, f.crc64nvme) for n, f in stored_frames.items()},
                ):
                    _check_cancel(request.cancel, f"upload of {plan.name}")
                    if frame.data is None:
                        continue  # stored by the interrupted attempt
                    if pacer is None:
                        writer.write_at(stored, frame.data)
                    else:
                        # Onto the share within the bandwidth limit, a paced block at a time.
                        data = memoryview(frame.data)
                        for start in range(0, len(data), pacer.block):
                            piece = data[start : start + pacer.block]
                            pacer.take(len(piece))
                            writer.write_at(stored + start, piece)
                    stored += frame.stored_length
                    if journal is not None:
                        journal.append(frame)
                    reporter.advance(frame.length)
            size = plan.source.position
            plan.check_complete(size)
            writer.set_len(stored)
            reporter.finish(size)
            sha256 = plan.source.sha256()
            write_sidecar(sha256, writer.temp_path, encoder.encoding(), plan.image)
            writer.commit()
        except _ResumedFramesDiffer as exc:
            self._abort(writer, keep=False)
            if journal is not None:
                journal.remove()
            logger.warning("%s; starting the upload over", exc.message)
            return self._encoded_upload(
                request, final_path, Encoder(encoder.compression, self._key), write_sidecar,
                may_resume=False,
            )  # fmt: skip
        except BaseException as exc:
            keep = resumable and keeps_partial(exc)
            self._abort(writer, keep=keep)
            if journal is not None and not keep:
                journal.remove()
            if isinstance(exc, OSError):
                raise storage_error_from_oserror(exc, "write", writer.temp_path) from exc
            raise
        if journal is not None:
            journal.remove()
        return _StreamCopy(
            sha256=sha256, size=size, bytes_copied=size - resumed, resumed_from=resumed
        )

    @property
    def _key(self) -> bytes | None:
        return store_key(self._config.encryption_key)

    @staticmethod
    def _refuse_frames_without_record(target: _Target) -> None:
        """A file that starts with vmstore's first frame but has no (believable) sidecar is
        an encoded object whose record is gone: refused, not handed out as the image."""
        try:
            with open(target.path, "rb") as handle:
                head = handle.read(_native.FRAME_HEADER_SIZE)
        except OSError:
            return  # the copy reports it
        if looks_encoded(head):
            raise missing_record(target.url)

    def _encoded_download(
        self, request: DownloadRequest, target: _Target, sidecar: Sidecar, encoding: Encoding
    ) -> DownloadResponse:
        """Frames read by range from the stored file, decoded and written by the one download
        pipeline (ChunkWriter, in-order hash, resume by frame)."""
        fd, opened = open_regular_file(target.path, f"stored file of {target.url}")
        with os.fdopen(fd, "rb", buffering=0) as source:
            if not _written_for_this_file(sidecar, opened):
                raise OperationFailedError(
                    f"{target.url} was replaced while it was opened; retry the download"
                )
            if sidecar.stored_size != opened.st_size:
                raise ChecksumMismatchError(
                    f"{target.url} holds {opened.st_size} bytes, not the {sidecar.stored_size} "
                    "its frames were stored as: it was changed since; nothing was written"
                )
            obj = RemoteObject(
                url=target.url,
                size=encoding.plain_size,
                etag=_etag(opened),
                checksum=sidecar.sha256,
                encoding=encoding,
            )
            pacer = pacer_for(self._limiter, request.cancel)
            settings = DownloadSettings(
                chunk_size=self._chunk_size,
                concurrency=_many.concurrency_for(self._config.concurrency),
                retry=RetryPolicy(max_retries=0),
                classify=_never_retry,
                encryption_key=store_key(self._config.encryption_key),
                pacer=pacer,
            )
            started = time.monotonic()
            reader = _FileRangeReader(source, target, pacer)
            response = download_object(obj, reader, request, settings)
        copied = _StreamCopy(
            sha256=response.checksum,
            size=response.content_length,
            bytes_copied=response.bytes_transferred,
            resumed_from=response.resumed_from,
        )
        self._log_done("downloaded", target.url, copied, started)
        return response

    # --- streams --------------------------------------------------------------------------

    def _copy_stream_in(
        self,
        stream: ReadableStream,
        *,
        size_hint: int | None,
        final_path: str,
        progress_callback: ProgressCallback | None,
        cancel: _native.CancelToken | None,
        before_commit: Callable[[str, str], None],
    ) -> _StreamCopy:
        """Read stream once, front to back, into a one-off temp file beside final_path,
        hashing in the same pass; then commit atomically.

        A stream cannot be read again, so this never resumes: an interrupted stream upload
        leaves nothing behind (the temp file is removed) and must start over. A size_hint
        that differs from the bytes the stream held fails the upload, committing nothing.
        """
        temp_path = _unique_temp_path(final_path)
        label = stream_label(stream)
        try:
            writer = _chunk_writer(final_path, temp_path, resume=False)
        except OSError as exc:
            raise storage_error_from_oserror(exc, "create temporary file", temp_path) from exc
        hasher = _native.Sha256()
        reporter = ProgressReporter(progress_callback, size_hint or 0)
        pacer = pacer_for(self._limiter, cancel)
        buffer = bytearray(self._chunk_size)
        view = memoryview(buffer)
        offset = 0
        try:
            while True:
                _check_cancel(cancel, "upload of <stream>")
                length = _fill_from_stream(stream, view, cancel, label)
                if length:
                    if size_hint is not None and offset + length > size_hint:
                        raise InvalidConfigError(
                            f"the stream {label} holds more than its size_hint of {size_hint} "
                            f"bytes; nothing was stored at {final_path}: give the right "
                            "size_hint or none"
                        )
                    chunk = view[:length]
                    hasher.update(chunk)
                    if pacer is None:
                        writer.write_at(offset, chunk)
                    else:
                        # Onto the share within the bandwidth limit, a paced block at a time.
                        for start in range(0, length, pacer.block):
                            piece = chunk[start : start + pacer.block]
                            pacer.take(len(piece))
                            writer.write_at(offset + start, piece)
                    offset += length
                    # Without a hint the total is 0 until finish(): (done, 0), as for every
                    # stream of unknown size.
                    reporter.advance(length)
                if length < len(view):
                    break  # the stream is at its end
            if size_hint is not None and offset != size_hint:
                raise InvalidConfigError(
                    f"the stream {label} held {offset} bytes, not its size_hint of {size_hint}; "
                    f"nothing was stored at {final_path}: give the right size_hint or none"
                )
            # All-zero blocks at the end were not written: the file must still be whole.
            writer.set_len(offset)
            reporter.finish(offset)
            sha256 = hasher.hexdigest()
            before_commit(sha256, writer.temp_path)
            writer.commit()
        except BaseException as exc:
            self._abort(writer, keep=False)
            if isinstance(exc, OSError):
                raise storage_error_from_oserror(exc, "write", temp_path) from exc
            raise
        return _StreamCopy(sha256=sha256, size=offset, bytes_copied=offset)

    def _download_to_stream(
        self, request: DownloadRequest, target: _Target, stream: WritableStream
    ) -> DownloadResponse:
        """Read the stored file in order into stream, hashing as it goes; verify at the end.

        The consumer has every byte before the checksum is known, so a mismatch can only be
        reported, not undone: ChecksumMismatchError says the bytes were already handed over.
        A stream download cannot resume.
        """
        fd, opened = open_regular_file(target.path, f"stored file of {target.url}")
        label = stream_label(stream)
        started = time.monotonic()
        hasher = _native.Sha256()
        reporter = ProgressReporter(request.progress_callback, opened.st_size)
        done = 0
        # The image policy's hook: the head is held back until its header was checked.
        emit: Callable[[bytes], None] = lambda data: _write_to_stream(stream, data, label)  # noqa: E731
        write = emit if request.allow_backing_file else images.StreamGate(
            emit, target.url, opened.st_size
        )
        pacer = pacer_for(self._limiter, request.cancel)
        # Off the share within the bandwidth limit: a paced block per read.
        block = self._chunk_size if pacer is None else pacer.block
        with os.fdopen(fd, "rb", buffering=0) as source:
            # Judged against the file actually opened: a racing upload cannot slip another
            # file's checksum in between.
            expected_sha256 = self._expected_sha256(request, target, opened)
            logger.info("downloading %s (%d bytes) to %s", target.url, opened.st_size, label)
            while True:
                _check_cancel(request.cancel, f"download of {target.url}")
                if pacer is not None:
                    pacer.take(min(block, max(opened.st_size - done, 1)))
                try:
                    data = source.read(block)
                except OSError as exc:
                    raise storage_error_from_oserror(exc, "read", target.path) from exc
                if not data:
                    break
                hasher.update(data)
                write(data)
                done += len(data)
                reporter(done, max(done, opened.st_size))
            if isinstance(write, images.StreamGate):
                write.close()
        if done != opened.st_size:
            raise OperationFailedError(
                f"{target.url} changed size while it was read ({opened.st_size} bytes when "
                f"opened, {done} read); the stream received {done} bytes: discard them and retry"
            )
        reporter.finish(done)
        sha256 = hasher.hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise ChecksumMismatchError(
                f"checksum mismatch for {target.url}: expected sha256 {expected_sha256}, got "
                f"{sha256}; the destination stream {label} already received all {done} bytes: "
                "discard what it received, check the source, then retry"
            )
        copied = _StreamCopy(sha256=sha256, size=done, bytes_copied=done)
        self._log_done("downloaded", target.url, copied, started)
        return DownloadResponse(
            checksum=sha256,
            content_length=done,
            bytes_transferred=done,
            destination_path=None,
        )

    def _expected_sha256(
        self, request: DownloadRequest, target: _Target, data_stat: os.stat_result
    ) -> str | None:
        """The checksum a download must match: the caller's, else the sidecar's (if any)."""
        if request.expected_checksum is not None:
            return parse_sha256_hex(request.expected_checksum)
        if not request.verify_checksum:
            return None
        sidecar = self._load_sidecar(target.path)
        if sidecar is None:
            logger.info(
                "%s has no stored checksum; the download cannot be verified against one",
                target.url,
            )
            return None
        reason = sidecar.mismatch(
            size=data_stat.st_size, etag=_etag(data_stat), mtime_ns=data_stat.st_mtime_ns
        )
        if reason is None:
            return sidecar.sha256
        if _written_for_this_file(sidecar, data_stat):
            # The file vmstore committed was changed in place since (bit rot, another tool):
            # what it held then is what the download must deliver, so verify against that.
            logger.warning(
                "%s changed since vmstore stored it (%s); verifying it against the checksum "
                "recorded at upload",
                target.url,
                reason,
            )
            return sidecar.sha256
        logger.warning(
            "ignoring the sidecar of %s, written for another file (%s); the download cannot "
            "be verified",
            target.url,
            reason,
        )
        return None

    # --- leftovers --------------------------------------------------------------------------

    @staticmethod
    def _leftovers(data_path: str) -> list[str]:
        """Partials (any host) and one-off temp files of data_path and of its sidecar."""
        directory, name = os.path.split(data_path)
        prefixes = (
            name + PARTIAL_SUFFIX + "-",
            name + TEMP_MARKER,
            name + SIDECAR_SUFFIX + TEMP_MARKER,
        )
        try:
            entries = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise storage_error_from_oserror(exc, "list", directory) from exc
        return sorted(
            os.path.join(directory, entry) for entry in entries if entry.startswith(prefixes)
        )

    @staticmethod
    def _unlink(path: str) -> bool:
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise storage_error_from_oserror(exc, "delete", path) from exc
        return True

    @classmethod
    def _unlink_unless_locked(cls, path: str) -> bool | None:
        """Remove path unless a transfer holds its flock (then None); False if it is gone.

        Writers lock their temp files with flock (NFS carries it to the server as a byte
        range lock), so a lock we can take means nobody is writing it.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise storage_error_from_oserror(exc, "open", path) from exc
            return cls._unlink(path)  # a symlink with our name: nothing can lock it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            except OSError as exc:
                logger.debug("could not lock %s (%s); removing it anyway", path, exc)
            return cls._unlink(path)
        finally:
            os.close(fd)

    # --- paths ----------------------------------------------------------------------------

    def _resolve(self, url: str) -> _Target:
        """Map url to a real path inside the mount point; nothing is created or written."""
        path = parse_nfs_url(url, (self._mount_point, self._mount_real))
        # realpath resolves every existing component, symlinks included, in order, so a
        # "link/.." or a symlinked directory is judged by where it really leads.
        real_path = os.path.realpath(os.path.join(self._mount_real, path))
        if real_path == self._mount_real:
            raise InvalidConfigError(f"{url!r} names the mount point itself; give a file path")
        if not real_path.startswith(self._mount_real.rstrip(os.sep) + os.sep):
            raise PermissionDeniedError(
                f"{url!r} resolves to {real_path}, outside the NFS mount point "
                f"{self._mount_point}; paths (and symlinks) must stay inside the share"
            )
        if _RESERVED_NAME.search(os.path.basename(real_path)):
            raise InvalidConfigError(
                f"{url!r} looks like one of vmstore's own files ({SIDECAR_SUFFIX}, "
                f"{PARTIAL_SUFFIX}, {TEMP_MARKER.rstrip('-')}); choose another name"
            )
        relative = os.path.relpath(real_path, self._mount_real).replace(os.sep, "/")
        return _Target(path=real_path, url=nfs_url(relative))

    def _make_parent_directories(self, target: _Target) -> None:
        parent = os.path.dirname(target.path)
        self._make_directories(parent)
        # Re-check after creating: a directory swapped for a symlink since _resolve must
        # not redirect the write out of the share.
        if os.path.realpath(parent) != parent:
            raise PermissionDeniedError(
                f"{parent} changed into a symlink while uploading {target.url}; refusing to "
                "write through it"
            )

    @staticmethod
    def _make_directories(path: str) -> None:
        try:
            os.makedirs(path, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise storage_error_from_oserror(
                exc,
                "create directory",
                path,
                advice="a file of that name is in the way; remove it or choose another path",
            ) from exc
        except OSError as exc:
            raise storage_error_from_oserror(exc, "create directory", path) from exc

    # --- stat and sidecar -----------------------------------------------------------------

    @staticmethod
    def _stat(path: str, action: str) -> os.stat_result:
        try:
            return os.stat(path)
        except OSError as exc:
            raise storage_error_from_oserror(exc, action, path) from exc

    def _stat_stored_file(self, target: _Target) -> os.stat_result:
        try:
            st = os.stat(target.path)
        except FileNotFoundError as exc:
            raise NotFoundError(
                f"{target.url} does not exist (no file {target.path}); check the URL",
                cause=exc,
            ) from exc
        except OSError as exc:
            raise storage_error_from_oserror(exc, "read the metadata of", target.path) from exc
        if stat.S_ISDIR(st.st_mode):
            raise InvalidConfigError(f"{target.url} is a directory, not a file")
        # A FIFO, socket or device placed in the share: opening one could block forever.
        refuse_non_regular(
            st, f"{target.url} ({target.path})", "stored object", advice="vmstore stores files"
        )
        return st

    @staticmethod
    def _load_sidecar(data_path: str) -> Sidecar | None:
        """The sidecar beside data_path as written, or None when missing or unreadable."""
        sidecar_path = data_path + SIDECAR_SUFFIX
        try:
            with open(sidecar_path, "rb") as sidecar_file:
                return Sidecar.from_json(sidecar_file.read(MAX_SIDECAR_BYTES + 1))
        except FileNotFoundError:
            return None
        except (OSError, SidecarFormatError) as exc:
            logger.warning("ignoring unreadable sidecar %s: %s", sidecar_path, exc)
            return None

    @classmethod
    def _read_sidecar(cls, data_path: str, data_stat: os.stat_result) -> Sidecar | None:
        """The sidecar of data_path, or None when missing, unreadable, or written for other
        data than the file data_stat describes (a racing writer's, or a stale one)."""
        sidecar = cls._load_sidecar(data_path)
        if sidecar is None:
            return None
        reason = sidecar.mismatch(
            size=data_stat.st_size, etag=_etag(data_stat), mtime_ns=data_stat.st_mtime_ns
        )
        if reason is not None:
            logger.warning(
                "ignoring sidecar %s%s, which does not describe the file beside it (%s); "
                "the file's checksum is unknown",
                data_path,
                SIDECAR_SUFFIX,
                reason,
            )
            return None
        return sidecar

    @staticmethod
    def _sidecar_bytes(data_path: str) -> bytes | None:
        try:
            with open(data_path + SIDECAR_SUFFIX, "rb") as sidecar_file:
                return sidecar_file.read(MAX_SIDECAR_BYTES + 1)
        except OSError:
            return None

    def _restore_sidecar(self, data_path: str, ours: Sidecar, previous: bytes | None) -> None:
        """Put the previous sidecar back if the one there is still ours (a failed commit
        left the old data in place); a racing writer's newer sidecar is left alone."""
        if self._sidecar_bytes(data_path) != ours.to_bytes():
            return
        sidecar_path = data_path + SIDECAR_SUFFIX
        temp_path = _unique_temp_path(sidecar_path)
        try:
            if previous is None:
                os.unlink(sidecar_path)
            else:
                with open(temp_path, "xb") as temp_file:
                    temp_file.write(previous)
                os.replace(temp_path, sidecar_path)
        except OSError as exc:
            # Never hide the error that failed the upload; the old data is then without a
            # checksum (its sidecar describes another file), which is ignored, not believed.
            logger.warning("could not restore the previous sidecar %s: %s", sidecar_path, exc)
            with contextlib.suppress(OSError):
                os.unlink(temp_path)

    def _confirm_sidecar(
        self,
        target: _Target,
        final_stat: os.stat_result,
        written: Sidecar,
        temp_stat: os.stat_result,
    ) -> None:
        """After our commit: if our data is in place but its sidecar is not ours (a racing
        writer replaced it between our sidecar and our rename) or no longer matches (the
        server changed the mtime on the final flush), write ours again.

        If another writer's data has replaced ours already, its sidecar is its own to write;
        whichever pair a race leaves, a reader believes only a sidecar bound to the file.
        """
        if (final_stat.st_dev, final_stat.st_ino) != (temp_stat.st_dev, temp_stat.st_ino):
            return
        current = self._read_sidecar(target.path, final_stat)
        if current is not None and current.sha256 == written.sha256:
            return
        logger.info("re-writing the sidecar of %s, replaced by a concurrent upload", target.url)
        self._write_sidecar(
            target.path,
            Sidecar(
                sha256=written.sha256,
                size=final_stat.st_size,
                etag=_etag(final_stat),
                mtime_ns=final_stat.st_mtime_ns,
                content_type=written.content_type,
                metadata=written.metadata,
                uploaded_at=written.uploaded_at,
            ),
        )

    @staticmethod
    def _write_sidecar(data_path: str, sidecar: Sidecar) -> None:
        """Replace data_path's sidecar atomically: temp file, fsync, rename.

        The directory is fsynced by the data commit that follows (same directory), which
        makes both renames durable together.
        """
        sidecar_path = data_path + SIDECAR_SUFFIX
        temp_path = _unique_temp_path(sidecar_path)
        try:
            fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as temp_file:
                temp_file.write(sidecar.to_bytes())
                temp_file.flush()
                os.fsync(temp_file.fileno())
            os.replace(temp_path, sidecar_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp_path)
            raise storage_error_from_oserror(exc, "write metadata file", sidecar_path) from exc

    # --- construction ---------------------------------------------------------------------

    @staticmethod
    def _check_mount_point(endpoint: str) -> str:
        if not endpoint:
            raise InvalidConfigError(
                "StorageConfig.endpoint must be the NFS mount point, a directory such as "
                "/mnt/nfs-share (VMSTORE_ENDPOINT)"
            )
        mount_point = os.path.abspath(endpoint)
        try:
            st = os.stat(mount_point)
        except FileNotFoundError as exc:
            raise InvalidConfigError(
                f"NFS mount point {mount_point} does not exist; mount the share there or set "
                "endpoint to where it is mounted",
                cause=exc,
            ) from exc
        except OSError as exc:
            raise storage_error_from_oserror(exc, "open NFS mount point", mount_point) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidConfigError(
                f"NFS mount point {mount_point} is not a directory; set endpoint to the "
                "directory where the share is mounted"
            )
        if not os.access(mount_point, os.W_OK | os.X_OK):
            raise PermissionDeniedError(
                f"NFS mount point {mount_point} is not writable by this process "
                f"(uid {os.geteuid()}); mount the share read-write or fix its permissions"
            )
        return mount_point

    def _log_filesystem_type(self) -> None:
        """Say what the mount point is on, once per mount point and process.

        Only a local filesystem earns a warning (other hosts will not see the files unless
        the directory is exported); NFS and other shared filesystems (CephFS, GlusterFS,
        Lustre, FUSE, SMB, ...) work the same way for vmstore and are logged as info.
        """
        with _reported_mounts_lock:
            if self._mount_real in _reported_mounts:
                return
            _reported_mounts.add(self._mount_real)
        try:
            shared, filesystem = _native.is_network_filesystem(self._mount_real)
        except (OSError, StorageError) as exc:
            logger.warning("could not tell the filesystem type of %s: %s", self._mount_real, exc)
            return
        if filesystem == "nfs":
            logger.info("NFS mount point %s is on %s", self._mount_point, filesystem)
        elif shared:
            logger.info(
                "mount point %s is on %s, a shared filesystem but not NFS; vmstore uses it "
                "like an NFS share (atomic renames, flock) ",
                self._mount_point,
                filesystem,
            )
        else:
            logger.warning(
                "mount point %s is on %s (a local filesystem), not NFS: transfers work, but "
                "other hosts see the files only if this directory is shared with them",
                self._mount_point,
                filesystem,
            )

    def _check_open(self) -> None:
        if self._closed:
            raise OperationFailedError(
                f"this NFS storage ({self._mount_point}) was closed; create a new one with "
                "new_storage()"
            )

    @staticmethod
    def _log_done(verb: str, url: str, result: _CopyOutcome, started: float) -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        logger.info(
            "%s %s: %d bytes (%d copied, %d resumed, %d in holes) in %.2fs (%.1f MiB/s), sha256 %s",
            verb,
            url,
            result.size,
            result.bytes_copied,
            result.resumed_from,
            result.holes_skipped,
            elapsed,
            result.bytes_copied / elapsed / (1 << 20),
            result.sha256,
        )

    # -- many at once, and presigned URLs ---------------------------------------------------

    def _batch_destination(self, url: str) -> Hashable:
        """What ``upload_many`` compares to refuse two items writing one object."""
        return self._resolve(url).path

    def presign(self, url: str, expires_in: int = 3600) -> str:
        """Presigned URLs are an S3 feature: always InvalidConfigError here."""
        _many.refuse_presign("NFS")
