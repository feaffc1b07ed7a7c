"""The Storage protocol every backend implements, and the factory that picks a backend."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from vmstore.config import BUILTIN_BACKEND_TYPES, StorageConfig
from vmstore.errors import InvalidConfigError
from vmstore.models import (
    DownloadRequest,
    DownloadResponse,
    FileMetadata,
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


BackendFactory = Callable[[StorageConfig], Storage]
"""Builds a backend from a validated config (a backend class is one)."""

# Backends whose module is imported on first use, so that boto3 / requests are only needed
# by the backend that uses them. Each module defines the named class, built from a config.
_LAZY_BACKENDS: dict[str, tuple[str, str, str]] = {
    # name: (module, class, pip extra)
    "nfs": ("vmstore.backends.nfs", "NfsStorage", ""),
    "s3": ("vmstore.backends.s3", "S3Storage", "s3"),
    "minio": ("vmstore.backends.s3", "S3Storage", "s3"),
    "http": ("vmstore.backends.http", "HttpStorage", "http"),
    "https": ("vmstore.backends.http", "HttpStorage", "http"),
}
assert set(_LAZY_BACKENDS) == set(BUILTIN_BACKEND_TYPES)

_registry: dict[str, BackendFactory] = {}
_registry_lock = threading.Lock()


def backend_names() -> tuple[str, ...]:
    """Names accepted as ``StorageConfig.type``: the built-in ones and any registered."""
    with _registry_lock:
        return tuple(dict.fromkeys([*BUILTIN_BACKEND_TYPES, *_registry]))


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make ``StorageConfig(type=name)`` build its storage with ``factory(config)``.

    Registering an existing name (a built-in one too) replaces its factory.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidConfigError(f"backend name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise InvalidConfigError(f"backend factory for {name!r} must be callable")
    with _registry_lock:
        _registry[name.strip().lower()] = factory


def new_storage(config: StorageConfig) -> Storage:
    """Build the storage backend that ``config.type`` names."""
    if not isinstance(config, StorageConfig):
        raise InvalidConfigError(
            f"new_storage() takes a StorageConfig, not {type(config).__name__}"
        )
    return _factory_for(config.type)(config)


def _factory_for(name: str) -> BackendFactory:
    with _registry_lock:
        factory = _registry.get(name)
    if factory is not None:
        return factory
    if name not in _LAZY_BACKENDS:
        raise InvalidConfigError(
            f"no storage backend named {name!r}; use one of {', '.join(backend_names())}"
        )
    module_name, class_name, extra = _LAZY_BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise InvalidConfigError(
                f"the {name!r} backend is not available yet in this version of vmstore "
                f"({module_name} is missing); use a release that includes it"
            ) from exc
        hint = f"install it with: pip install 'vmstore[{extra}]'" if extra else "reinstall vmstore"
        raise InvalidConfigError(
            f"the {name!r} backend needs the Python package {exc.name!r}, which is not "
            f"installed; {hint}"
        ) from exc
    factory = getattr(module, class_name)
    with _registry_lock:
        # setdefault: a register_backend() that ran meanwhile wins over the built-in.
        return _registry.setdefault(name, factory)
