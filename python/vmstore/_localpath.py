"""Checks of the local file a transfer reads from or writes to, the same on every backend.

A source must be a regular file: a directory cannot be uploaded, and a FIFO, socket or device
would block ``open`` or read forever (a FIFO with no writer never returns) or report a size of
0, so they are refused before anything opens them (a stream source is the way to upload from a
pipe or a device). A destination must be a file path: not a directory, not an existing FIFO or
device (renaming over ``/dev/null`` as root would replace it). Each failure has one error type
whichever backend asks: :class:`InvalidConfigError` for a path that cannot work (NUL byte, a
directory, not a regular file), :class:`NotFoundError` for a missing source,
:class:`PermissionDeniedError` for EACCES (through the shared errno table).
"""

from __future__ import annotations

import errno
import os
import stat

from vmstore import _native
from vmstore._oserrors import storage_error_from_oserror
from vmstore.errors import InvalidConfigError, NotFoundError, StorageError


def _kind(mode: int) -> str:
    """What a non-regular file is, in words a user recognises."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISCHR(mode):
        return "a character device"
    return "not a regular file"


def check_path_text(path: object, what: str) -> str:
    """``path`` as a str (``os.PathLike`` accepted), or InvalidConfigError when it is empty,
    not text, or holds a NUL byte (which no system call can take)."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str) or not path:
        raise InvalidConfigError(f"{what} must be a non-empty path, got {path!r}")
    if "\x00" in path:
        raise InvalidConfigError(f"{what} {path!r} contains a NUL byte; no file can have that name")
    return path


def refuse_non_regular(
    st: os.stat_result, path: str, what: str, *, advice: str | None = None
) -> None:
    """InvalidConfigError unless ``st`` is a regular file's (the file is not opened)."""
    if stat.S_ISREG(st.st_mode):
        return
    kind = _kind(st.st_mode)
    if advice is None:
        advice = (
            "give the disk image's file path"
            if stat.S_ISDIR(st.st_mode)
            else "only regular files are transferred; read a pipe or device through a "
            "stream (source_stream / `vmstore upload - URL`)"
        )
    raise InvalidConfigError(f"{what} {path} is {kind}, not a regular file; {advice}")


def check_source_file(path: object, what: str = "source file") -> os.stat_result:
    """stat ``path`` (never open it) and return the result if it is a readable regular file's.

    NotFoundError if it does not exist; PermissionDeniedError if a directory on the way may
    not be searched; InvalidConfigError for a NUL byte, a directory, FIFO, socket or device.
    (Read permission itself is judged when the file is opened, by the same errno table.)
    """
    text = check_path_text(path, what)
    try:
        st = os.stat(text)
    except FileNotFoundError as exc:
        raise NotFoundError(f"{what} {text} does not exist; check the path", cause=exc) from exc
    except OSError as exc:
        raise storage_error_from_oserror(exc, f"read {what}", text) from exc
    refuse_non_regular(st, text, what)
    return st


def check_destination_file(path: object, what: str = "destination") -> str:
    """The absolute path a download may write to (the file itself need not exist).

    InvalidConfigError for a NUL byte, a directory, or an existing FIFO, socket or device;
    PermissionDeniedError when the path cannot even be looked at. The parent directory is
    not checked here: backends create it.
    """
    text = os.path.abspath(check_path_text(path, what))
    try:
        st = os.stat(text)
    except (FileNotFoundError, NotADirectoryError):
        return text
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise InvalidConfigError(f"{what} {text} is too long a path", cause=exc) from exc
        raise storage_error_from_oserror(exc, f"inspect {what}", text) from exc
    if stat.S_ISDIR(st.st_mode):
        raise InvalidConfigError(f"cannot download to {text}: it is a directory; give a file path")
    refuse_non_regular(st, text, what)
    return text


def open_regular_file(path: str, what: str) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading without ever blocking, and check what was opened.

    O_NONBLOCK makes open() of a FIFO return at once instead of waiting for a writer, and
    fstat of the open descriptor judges the file actually opened (not one swapped in after a
    stat). The descriptor is returned in blocking mode; the caller closes it.
    """
    text = check_path_text(path, what)
    try:
        fd = os.open(text, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError as exc:
        raise NotFoundError(f"{what} {text} does not exist; check the path", cause=exc) from exc
    except OSError as exc:
        raise storage_error_from_oserror(exc, f"open {what}", text) from exc
    try:
        st = os.fstat(fd)
        refuse_non_regular(st, text, what)
        os.set_blocking(fd, True)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise storage_error_from_oserror(exc, f"open {what}", text) from exc
        raise
    return fd, st


def stream_label(stream: object) -> str:
    """How messages name a source or destination stream: its file name, ``<stream fd N>``
    for a pipe or socket opened from a descriptor, else ``<TypeName stream>``."""
    name = getattr(stream, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(name, int) and not isinstance(name, bool):
        return f"<stream fd {name}>"
    return f"<{type(stream).__name__} stream>"


def direct_io_suits(path: str) -> bool:
    """Whether the transfer's local file (``path``, or the directory it goes into) is read or
    written with O_DIRECT: on a local disk, yes. The bytes go between the device and the
    transfer's own buffers without a page-cache copy, and a 200 GB image does not evict the
    host's cache (qemu-img's ``-T none``, KubeVirt's importer). Measured, page cache dropped:
    a download about 1 CPU-second less per GiB (the page-cache pages' first touch is most of
    its kernel time); an S3 upload 15 % less client CPU at the same speed (1 and 4 GiB), an
    HTTP upload about 0.5 x the CPU and 1.4 x the speed (1 GiB; docs/BENCHMARKS.md); an NFS copy's
    temp file, 2-3 x faster on this VM (its source is read cached: a local copy is bound by
    the disk, see design-notes.md). Not on a network filesystem, where O_DIRECT means one
    synchronous RPC per block. A filesystem that refuses O_DIRECT (tmpfs) is read and
    written cached."""
    try:
        shared, _kind = _native.is_network_filesystem(path)
    except StorageError:
        return False
    return not shared
