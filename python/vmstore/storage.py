"""The Storage protocol every backend implements, and the factory that picks a backend."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from vmstore._native import CancelToken
from vmstore._registry import (
    BUILTIN_BACKEND_TYPES,
    BackendFactory,
    backend_names,
    factory_for,
    register_backend,
)
from vmstore.config import StorageConfig
from vmstore.errors import InvalidConfigError, StorageError
from vmstore.models import (
    DownloadRequest,
    DownloadResponse,
    FileMetadata,
    IncompleteTransfer,
    ProgressCallback,
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

    def upload_many(
        self,
        items: Iterable[UploadRequest],
        *,
        raise_on_error: bool = False,
        progress_callback: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> list[UploadResponse | StorageError]:
        """Upload several items at once, all within the store's ``concurrency`` (requests in
        flight for the whole batch) and its bandwidth limit; returns, in input order, each
        item's response or the StorageError it raised (``raise_on_error=True``: the first
        failure cancels the rest and is raised). ``progress_callback(done, total)`` sums all
        items (each request's own callback is still called); ``cancel`` stops them all. Two
        items with the same destination: InvalidConfigError before anything starts."""
        ...

    def download_many(
        self,
        items: Iterable[DownloadRequest],
        *,
        raise_on_error: bool = False,
        progress_callback: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> list[DownloadResponse | StorageError]:
        """Download several items at once; the same contract as :meth:`upload_many` (two
        items writing one file: InvalidConfigError before anything starts)."""
        ...

    def presign(self, url: str, expires_in: int = 3600) -> str:
        """S3: a URL that GETs the object without credentials for ``expires_in`` seconds
        (1..604800), fetchable by curl or the HTTP backend; NotFoundError if the object is
        missing. Other backends raise InvalidConfigError (presign is an S3 feature)."""
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
