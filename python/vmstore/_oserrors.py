"""The one place where an ``OSError`` raised in Python code becomes a :class:`StorageError`.

The native core maps its own I/O errors with THE errno table, ``ERRNO_TABLE`` in
``rust/src/error.rs``; this module maps the OSErrors of the file-system calls Python makes
itself (``stat``, ``makedirs``, ``rename``, sidecar files) with a copy of it, so every backend
reports the same failure with the same error type. ``tests/test_errors.py`` walks every errno
and checks that the two agree (through ``_native.errno_classes()``): change both together.
"""

from __future__ import annotations

import errno

from vmstore.errors import (
    ErrorType,
    InvalidConfigError,
    NetworkError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    StorageError,
)

_ERROR_TYPE_BY_ERRNO: dict[int, ErrorType] = {
    errno.ENOENT: ErrorType.NOT_FOUND,
    # A path component that is a file, not a directory: the path cannot exist.
    errno.ENOTDIR: ErrorType.NOT_FOUND,
    errno.EACCES: ErrorType.PERMISSION_DENIED,
    errno.EPERM: ErrorType.PERMISSION_DENIED,
    errno.EROFS: ErrorType.PERMISSION_DENIED,
    errno.ENOSPC: ErrorType.OPERATION_FAILED,
    errno.EDQUOT: ErrorType.OPERATION_FAILED,
    errno.EFBIG: ErrorType.OPERATION_FAILED,
    # An NFS server that went away shows up as these rather than as socket errors.
    errno.ESTALE: ErrorType.NETWORK_ERROR,
    errno.ETIMEDOUT: ErrorType.NETWORK_ERROR,
    errno.EHOSTDOWN: ErrorType.NETWORK_ERROR,
    errno.EHOSTUNREACH: ErrorType.NETWORK_ERROR,
    errno.ENETUNREACH: ErrorType.NETWORK_ERROR,
    errno.ENETDOWN: ErrorType.NETWORK_ERROR,
    errno.ECONNREFUSED: ErrorType.NETWORK_ERROR,
    errno.ECONNRESET: ErrorType.NETWORK_ERROR,
    errno.ECONNABORTED: ErrorType.NETWORK_ERROR,
    errno.ENOTCONN: ErrorType.NETWORK_ERROR,
    # A path that cannot work as given; retrying it changes nothing.
    errno.EISDIR: ErrorType.INVALID_CONFIG,
    errno.ENAMETOOLONG: ErrorType.INVALID_CONFIG,
    errno.ELOOP: ErrorType.INVALID_CONFIG,
    # open() of a socket file, or of a device without a driver.
    errno.ENXIO: ErrorType.INVALID_CONFIG,
}

_DEFAULT_ADVICE: dict[ErrorType, str] = {
    ErrorType.NOT_FOUND: "check the path",
    ErrorType.PERMISSION_DENIED: (
        "check the file permissions and that the filesystem is mounted read-write"
    ),
    ErrorType.NETWORK_ERROR: "check that the NFS server is reachable and the share is mounted",
    ErrorType.OPERATION_FAILED: "check the filesystem and retry",
    ErrorType.INVALID_CONFIG: "give the path of a regular file",
}

_FULL_DISK_ADVICE = "free space (or raise the quota) on that filesystem and retry"

_ERROR_CLASS: dict[ErrorType, type[StorageError]] = {
    ErrorType.NOT_FOUND: NotFoundError,
    ErrorType.PERMISSION_DENIED: PermissionDeniedError,
    ErrorType.NETWORK_ERROR: NetworkError,
    ErrorType.OPERATION_FAILED: OperationFailedError,
    ErrorType.INVALID_CONFIG: InvalidConfigError,
}


def error_class_of_errno(code: int | None) -> type[StorageError]:
    """The StorageError subclass an OSError with errno ``code`` is raised as."""
    if code is None:
        return OperationFailedError
    return _ERROR_CLASS[_ERROR_TYPE_BY_ERRNO.get(code, ErrorType.OPERATION_FAILED)]


def error_type_of(exc: OSError) -> ErrorType:
    """The :class:`ErrorType` that an ``OSError`` stands for."""
    if exc.errno is None:
        return ErrorType.OPERATION_FAILED
    return _ERROR_TYPE_BY_ERRNO.get(exc.errno, ErrorType.OPERATION_FAILED)


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, the failures after which a partial file is worthless."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def storage_error_from_oserror(
    exc: OSError, action: str, path: str, *, advice: str | None = None
) -> StorageError:
    """Build the error to raise (``from exc``) when ``action`` on ``path`` failed.

    ``action`` is a verb phrase ("create directory", "read metadata of"); the message reads
    "could not <action> <path>: <reason>; <advice>".
    """
    error_type = error_type_of(exc)
    if advice is None:
        advice = _FULL_DISK_ADVICE if is_disk_full(exc) else _DEFAULT_ADVICE[error_type]
    reason = exc.strerror or str(exc) or type(exc).__name__
    message = f"could not {action} {path}: {reason}; {advice}"
    return _ERROR_CLASS[error_type](message, cause=exc)
