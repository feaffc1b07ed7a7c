"""The error types of vmstore.

Every failure surfaces as a :class:`StorageError` whose ``type`` says what kind of failure it
was; each type has its own subclass, so ``except NotFoundError`` and
``err.type is ErrorType.NOT_FOUND`` are equivalent. The native core raises these same
classes (it imports them from here), so there is one hierarchy for the whole library.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class ErrorType(enum.Enum):
    """What kind of failure a :class:`StorageError` reports."""

    NOT_FOUND = "NotFound"
    PERMISSION_DENIED = "PermissionDenied"
    NETWORK_ERROR = "NetworkError"
    CHECKSUM_MISMATCH = "ChecksumMismatch"
    INVALID_CONFIG = "InvalidConfig"
    OPERATION_FAILED = "OperationFailed"
    CANCELLED = "Cancelled"

    def __str__(self) -> str:
        return self.value


class StorageError(Exception):
    """A storage operation failed.

    ``StorageError(ErrorType.NOT_FOUND, "...")`` builds the matching subclass
    (:class:`NotFoundError` here), so callers may raise either form. Subclasses take just
    the message: ``NotFoundError("...")``. Pass ``cause=`` to chain the underlying error.
    """

    error_type: ClassVar[ErrorType | None] = None
    _by_type: ClassVar[dict[ErrorType, type[StorageError]]] = {}

    type: ErrorType
    message: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.error_type is not None:
            StorageError._by_type.setdefault(cls.error_type, cls)

    def __new__(cls, *args: Any, **kwargs: Any) -> StorageError:
        if cls is StorageError:
            given = args[0] if args else kwargs.get("type")
            if isinstance(given, ErrorType):
                cls = StorageError._by_type.get(given, StorageError)
        return super().__new__(cls)

    def __init__(self, *args: Any, cause: BaseException | None = None, **kwargs: Any) -> None:
        etype, message = self._parse(args, kwargs)
        super().__init__(message)
        self.type = etype
        self.message = message
        if cause is not None:
            self.__cause__ = cause

    def _parse(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[ErrorType, str]:
        rest = list(args)
        etype: ErrorType | None = kwargs.get("type")
        if rest and isinstance(rest[0], ErrorType):
            etype = rest.pop(0)
        message = kwargs.get("message", rest.pop(0) if rest else "")
        if etype is None:
            etype = self.error_type or ErrorType.OPERATION_FAILED
        return etype, str(message)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.type.value}: {self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (StorageError, (self.type, self.message))


class NotFoundError(StorageError):
    """The object, file or bucket does not exist."""

    error_type = ErrorType.NOT_FOUND


class PermissionDeniedError(StorageError):
    """Credentials were refused, or the path is not writable or lies outside the share."""

    error_type = ErrorType.PERMISSION_DENIED


class NetworkError(StorageError):
    """The server could not be reached, or the connection failed after all retries."""

    error_type = ErrorType.NETWORK_ERROR


class ChecksumMismatchError(StorageError):
    """The bytes' SHA-256 differs from the one expected; nothing was committed."""

    error_type = ErrorType.CHECKSUM_MISMATCH


class InvalidConfigError(StorageError):
    """A configuration value, URL or argument is not acceptable."""

    error_type = ErrorType.INVALID_CONFIG


class OperationFailedError(StorageError):
    """Any other failure (a full disk, a server refusing the operation, ...)."""

    error_type = ErrorType.OPERATION_FAILED


class CancelledError(StorageError):
    """The transfer was cancelled through its cancel token, or interrupted."""

    error_type = ErrorType.CANCELLED


__all__ = [
    "CancelledError",
    "ChecksumMismatchError",
    "ErrorType",
    "InvalidConfigError",
    "NetworkError",
    "NotFoundError",
    "OperationFailedError",
    "PermissionDeniedError",
    "StorageError",
]
