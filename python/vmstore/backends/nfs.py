"""NFS backend: the share is a directory mounted on this host.

Bytes move through the native core (``copy_file`` into a ``ChunkWriter`` temp file beside
the final name, hashed while copied); this module decides names, checks that every path
stays inside the mount point, keeps the checksum in a sidecar file, and decides when a
partial file is worth keeping for a resume.

Files beside a stored ``<name>``:

- ``<name>.vmstore.json``: the sidecar (sha256, size, content type, metadata), replaced
  atomically *before* the data is renamed into place, so a reader never finds new data
  with an old checksum.
- ``<name>.vmstore-partial-<host>``: an upload in progress or interrupted on ``<host>``,
  locked with ``flock`` while written; reused by the next upload from that host.
- ``<name>.vmstore-tmp-<host>-<pid>-<random>``: a one-off temp file for a writer that
  found the partial locked by another; never resumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from vmstore import _native
from vmstore._oserrors import is_disk_full, storage_error_from_oserror
from vmstore.config import StorageConfig
from vmstore.errors import (
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
    ProgressCallback,
    UploadRequest,
    UploadResponse,
    normalize_custom_metadata,
    parse_sha256_hex,
)
from vmstore.progress import ProgressReporter
from vmstore.urls import nfs_url, parse_nfs_url

logger = logging.getLogger("vmstore.nfs")

DEFAULT_CHUNK_SIZE = 32 << 20

SIDECAR_SUFFIX = ".vmstore.json"
PARTIAL_SUFFIX = ".vmstore-partial"
TEMP_MARKER = ".vmstore-tmp-"

_RESERVED_NAME = re.compile(
    rf"({re.escape(SIDECAR_SUFFIX)}$|{re.escape(PARTIAL_SUFFIX)}|{re.escape(TEMP_MARKER)})"
)


def _host_label() -> str:
    """This host's name, safe inside a file name (partials are per host on a shared mount)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _unique_temp_path(final_path: str) -> str:
    return f"{final_path}{TEMP_MARKER}{_host_label()}-{os.getpid()}-{secrets.token_hex(4)}"


def _etag(st: os.stat_result) -> str:
    # The inode changes with every atomic replace, size and mtime with any edit in place.
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


def _keeps_partial(exc: BaseException) -> bool:
    """Whether a partial file is worth keeping for a resume after the transfer failed with exc.

    Kept after an interruption (cancel, a raising progress callback, Ctrl-C, a vanished
    source); removed when its bytes are known bad (checksum mismatch) or when keeping them
    is what hurts (a full disk, which the core reports as OperationFailedError).
    """
    if isinstance(exc, ChecksumMismatchError | OperationFailedError):
        return False
    return not is_disk_full(exc)


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


@dataclass(frozen=True)
class _Sidecar:
    """What ``<name>.vmstore.json`` holds about the data file beside it."""

    sha256: str
    size: int
    mtime_ns: int
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)
    uploaded_at: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "sha256": self.sha256,
                "size": self.size,
                "mtime_ns": self.mtime_ns,
                "content_type": self.content_type,
                "metadata": self.metadata,
                "uploaded_at": self.uploaded_at,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> _Sidecar:
        """Parse a sidecar; raises ValueError for anything that is not one."""
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
        ):
            raise ValueError("metadata is not an object of strings")
        size = data.get("size")
        mtime_ns = data.get("mtime_ns", 0)
        if not isinstance(size, int) or not isinstance(mtime_ns, int):
            raise ValueError("size or mtime_ns is not an integer")
        return cls(
            sha256=parse_sha256_hex(str(data.get("sha256", "")), "sidecar sha256"),
            size=size,
            mtime_ns=mtime_ns,
            content_type=str(data.get("content_type") or DEFAULT_CONTENT_TYPE),
            metadata={key.lower(): value for key, value in metadata.items()},
            uploaded_at=str(data.get("uploaded_at", "")),
        )


class NfsStorage:
    """Storage on an NFS share mounted at ``config.endpoint``."""

    def __init__(self, config: StorageConfig) -> None:
        self._config = config
        self._mount_point = self._check_mount_point(config.endpoint)
        self._mount_real = os.path.realpath(self._mount_point)
        self._chunk_size = config.chunk_size or DEFAULT_CHUNK_SIZE
        self._closed = False
        self._log_filesystem_type()

    # --- the Storage protocol -------------------------------------------------------------

    def upload(self, request: UploadRequest) -> UploadResponse:
        self._check_open()
        target = self._resolve(request.destination_url)
        metadata = normalize_custom_metadata(request.metadata)
        source_path = request.source_path
        source_size = self._stat_source_file(source_path).st_size
        if os.path.isdir(target.path):
            raise InvalidConfigError(
                f"cannot upload to {target.url}: a directory of that name exists; "
                "give a file path inside it"
            )
        self._make_parent_directories(target)
        content_type = request.content_type or (
            mimetypes.guess_type(source_path)[0] or DEFAULT_CONTENT_TYPE
        )

        def write_sidecar(result: _native.CopyResult, temp_path: str) -> None:
            temp_stat = self._stat(temp_path, "read the size of")
            sidecar = _Sidecar(
                sha256=result.sha256,
                size=result.size,
                mtime_ns=temp_stat.st_mtime_ns,
                content_type=content_type,
                metadata=metadata,
                uploaded_at=datetime.now(UTC).isoformat(),
            )
            self._write_sidecar(target.path, sidecar)

        logger.info("uploading %s (%d bytes) to %s", source_path, source_size, target.url)
        started = time.monotonic()
        result = self._copy(
            source_path,
            source_label=source_path,
            final_path=target.path,
            partial_path=f"{target.path}{PARTIAL_SUFFIX}-{_host_label()}",
            resume=request.resume,
            progress_callback=request.progress_callback,
            cancel=request.cancel,
            expected_sha256=None,
            before_commit=write_sidecar,
        )
        self._log_done("uploaded", target.url, result, started)
        return UploadResponse(
            url=target.url,
            checksum=result.sha256,
            bytes_transferred=result.bytes_copied,
            etag=_etag(self._stat(target.path, "read the metadata of")),
            size=result.size,
            resumed_from=result.resumed_from,
        )

    def download(self, request: DownloadRequest) -> DownloadResponse:
        self._check_open()
        target = self._resolve(request.source_url)
        source_stat = self._stat_stored_file(target)
        expected_sha256: str | None = None
        if request.expected_checksum is not None:
            expected_sha256 = parse_sha256_hex(request.expected_checksum)
        elif request.verify_checksum:
            sidecar = self._read_sidecar(target.path, source_stat)
            if sidecar is None:
                logger.info(
                    "%s has no stored checksum; the download cannot be verified against one",
                    target.url,
                )
            else:
                expected_sha256 = sidecar.sha256
        destination_path = os.path.abspath(request.destination_path)
        if os.path.isdir(destination_path):
            raise InvalidConfigError(
                f"cannot download to {destination_path}: it is a directory; give a file path"
            )
        self._make_directories(os.path.dirname(destination_path))

        logger.info(
            "downloading %s (%d bytes) to %s", target.url, source_stat.st_size, destination_path
        )
        started = time.monotonic()
        result = self._copy(
            target.path,
            source_label=target.url,
            final_path=destination_path,
            partial_path=destination_path + PARTIAL_SUFFIX,
            resume=request.resume,
            progress_callback=request.progress_callback,
            cancel=request.cancel,
            expected_sha256=expected_sha256,
            before_commit=None,
        )
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
            size=st.st_size,
            checksum=sidecar.sha256 if sidecar else None,
            etag=_etag(st),
            last_modified=datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC),
            content_type=sidecar.content_type if sidecar else DEFAULT_CONTENT_TYPE,
            custom_metadata=dict(sidecar.metadata) if sidecar else {},
        )

    def delete(self, url: str) -> None:
        self._check_open()
        target = self._resolve(url)
        if os.path.isdir(target.path):
            raise InvalidConfigError(f"{target.url} is a directory; vmstore deletes files only")
        # Data first: a reader that races with us sees no file rather than a file whose
        # checksum has already gone.
        removed = []
        for path in (
            target.path,
            target.path + SIDECAR_SUFFIX,
            f"{target.path}{PARTIAL_SUFFIX}-{_host_label()}",
        ):
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise storage_error_from_oserror(exc, "delete", path) from exc
            removed.append(os.path.basename(path))
        if removed:
            logger.info("deleted %s (%s)", target.url, ", ".join(removed))
        else:
            logger.info("nothing to delete at %s", target.url)

    def validate_url(self, url: str) -> None:
        self._resolve(url)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

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
    ) -> _native.CopyResult:
        """Copy source into a temp file beside final_path, verify, then commit atomically."""
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
            self._abort(writer, keep=resumable and _keeps_partial(exc))
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
            return _native.ChunkWriter(final_path, partial_path, resume=resume), resume
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
            return _native.ChunkWriter(final_path, temp_path, resume=False), False
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

    def _stat_source_file(self, source_path: str) -> os.stat_result:
        try:
            st = os.stat(source_path)
        except FileNotFoundError as exc:
            raise NotFoundError(
                f"source file {source_path} does not exist; check the path", cause=exc
            ) from exc
        except OSError as exc:
            raise storage_error_from_oserror(exc, "read source file", source_path) from exc
        if not stat.S_ISREG(st.st_mode):
            raise InvalidConfigError(
                f"source {source_path} is not a regular file; give the disk image's path"
            )
        return st

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
        return st

    @staticmethod
    def _read_sidecar(data_path: str, data_stat: os.stat_result) -> _Sidecar | None:
        """The sidecar of data_path, or None when missing, unreadable or stale."""
        sidecar_path = data_path + SIDECAR_SUFFIX
        try:
            with open(sidecar_path, encoding="utf-8") as sidecar_file:
                sidecar = _Sidecar.from_json(sidecar_file.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, StorageError) as exc:
            logger.warning("ignoring unreadable sidecar %s: %s", sidecar_path, exc)
            return None
        if sidecar.size != data_stat.st_size:
            # The data was replaced or changed by something other than vmstore.
            logger.warning(
                "ignoring stale sidecar %s: it describes %d bytes, the file has %d",
                sidecar_path,
                sidecar.size,
                data_stat.st_size,
            )
            return None
        return sidecar

    @staticmethod
    def _write_sidecar(data_path: str, sidecar: _Sidecar) -> None:
        """Replace data_path's sidecar atomically: temp file, fsync, rename.

        The directory is fsynced by the data commit that follows (same directory), which
        makes both renames durable together.
        """
        sidecar_path = data_path + SIDECAR_SUFFIX
        temp_path = _unique_temp_path(sidecar_path)
        try:
            fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as temp_file:
                temp_file.write(sidecar.to_json())
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
        try:
            is_nfs, filesystem = _native.is_network_filesystem(self._mount_real)
        except (OSError, StorageError) as exc:
            logger.warning("could not tell the filesystem type of %s: %s", self._mount_real, exc)
            return
        if is_nfs:
            logger.info("NFS mount point %s is on %s", self._mount_point, filesystem)
        else:
            logger.warning(
                "mount point %s is on %s, not NFS: transfers work, but other hosts see the "
                "files only if this directory is shared with them",
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
    def _log_done(verb: str, url: str, result: _native.CopyResult, started: float) -> None:
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
