"""Which backend a ``StorageConfig.type`` names: the built-in ones and any registered.

Its own module so that ``config.py`` (which validates ``type`` against it) and ``storage.py``
(which builds backends from a config) both import it, and neither imports the other's users:
no import circle. The public names stay ``vmstore.storage.register_backend``,
``backend_names`` and ``new_storage``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from vmstore.errors import InvalidConfigError

if TYPE_CHECKING:
    from vmstore.config import StorageConfig
    from vmstore.storage import Storage

BUILTIN_BACKEND_TYPES = ("s3", "minio", "http", "https", "nfs")

BackendFactory = Callable[["StorageConfig"], "Storage"]
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


def factory_for(name: str) -> BackendFactory:
    """The factory of backend ``name``, importing a built-in backend's module on first use."""
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
    built_in: BackendFactory = getattr(module, class_name)
    with _registry_lock:
        # setdefault: a register_backend() that ran meanwhile wins over the built-in.
        return _registry.setdefault(name, built_in)
