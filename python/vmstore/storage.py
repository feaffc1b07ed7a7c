"""The Storage protocol every backend implements, and the factory that picks a backend."""

from __future__ import annotations

from datetime import timedelta
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from vmstore._registry import (
    BUILTIN_BACKEND_TYPES,
    BackendFactory,
    backend_names,
    factory_for,
    register_backend,
)
from vmstore.config import StorageConfig
from vmstore.errors import InvalidConfigError
from vmstore.models import (
    DownloadRequest,
    DownloadResponse,
    FileMetadata,
    IncompleteTransfer,
    UploadRequest,
    UploadResponse,
)


@runtime_checkable
class Storage(Protocol):
    """A place VM disk images are uploaded to and downloaded from.

    Use it as a context manager (``with new_storage(config) as store:``) or call
    :meth:`close` when done. Every failure is a :class:`vmstore.StorageError`.
    """

    def upload(self, request: UploadRequest) -> UploadResponse:
        """Store a local file; the response carries its SHA-256 as stored with the object."""
        ...

    def download(self, request: DownloadRequest) -> DownloadResponse:
        """Fetch an object into a local file, verified before it appears under its name."""
        ...

    def get_metadata(self, url: str) -> FileMetadata:
        """Describe an object without transferring it (NotFoundError if it is missing)."""
        ...

    def delete(self, url: str) -> None:
        """Remove an object; a missing one is not an error, so cleanup can be repeated."""
        ...

    def list_incomplete(self, prefix: str = "") -> list[IncompleteTransfer]:
        """What interrupted transfers under the URL prefix left: open multipart uploads,
        partial files in the share, and the partials of downloads this host started."""
        ...

    def cleanup_incomplete(self, older_than: float | timedelta) -> list[IncompleteTransfer]:
        """Remove what ``list_incomplete()`` finds that has not changed for ``older_than``
        (seconds or a timedelta; 0: everything not in use); returns what was removed."""
        ...

    def validate_url(self, url: str) -> None:
        """Raise InvalidConfigError (or PermissionDeniedError) unless this backend can use url."""
        ...

    def close(self) -> None:
        """Release connections and files; calling it again does nothing."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


def new_storage(config: StorageConfig) -> Storage:
    """Build the storage backend that ``config.type`` names."""
    if not isinstance(config, StorageConfig):
        raise InvalidConfigError(
            f"new_storage() takes a StorageConfig, not {type(config).__name__}"
        )
    return factory_for(config.type)(config)


__all__ = [
    "BUILTIN_BACKEND_TYPES",
    "BackendFactory",
    "Storage",
    "backend_names",
    "new_storage",
    "register_backend",
]
