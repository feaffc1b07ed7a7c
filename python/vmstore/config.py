"""StorageConfig: which backend to talk to and how."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmstore._hostpolicy import check_allowed_hosts, split_allowed_hosts
from vmstore._registry import BUILTIN_BACKEND_TYPES, backend_names
from vmstore.errors import InvalidConfigError

MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 5 << 30
"""5 GiB, S3's largest part. A chunk is held in memory (NFS copies allocate it whole, times
the buffers in flight), so a larger one is a mistake, not a tuning: refused up front."""
MAX_CONCURRENCY = 64
MAX_TIMEOUT = 86400.0
"""One day of no progress at all: beyond that a "timeout" is a typo (or inf), and values near
the float limits overflow the socket and retry arithmetic."""
MAX_RETRIES = 100
"""With exponential back-off 100 retries already span hours; more is a mistake (or 10**9)."""
MAX_BANDWIDTH = (1 << 63) - 1
"""The largest rate the native limiter takes (bytes per second): in effect, no limit."""

_STRING_FIELDS = (
    "endpoint",
    "bucket",
    "region",
    "access_key",
    "secret_key",
    "session_token",
    "token",
    "ca_bundle",
)

_SECRET_FIELDS = frozenset({"access_key", "secret_key", "session_token", "token", "encryption_key"})
_MASK = "***"

# Environment variable -> field. VMSTORE_* wins over the AWS name when both are set, so
# a vmstore-specific setting is never shadowed by an unrelated AWS profile.
_ENV_VARIABLES: dict[str, tuple[str, ...]] = {
    "type": ("VMSTORE_TYPE",),
    "endpoint": ("VMSTORE_ENDPOINT",),
    "bucket": ("VMSTORE_BUCKET",),
    "region": ("VMSTORE_REGION",),
    "access_key": ("VMSTORE_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
    "secret_key": ("VMSTORE_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
    "session_token": ("VMSTORE_SESSION_TOKEN", "AWS_SESSION_TOKEN"),
    "token": ("VMSTORE_TOKEN",),
    "use_ssl": ("VMSTORE_USE_SSL",),
    "insecure_skip_verify": ("VMSTORE_INSECURE_SKIP_VERIFY",),
    "ca_bundle": ("VMSTORE_CA_BUNDLE",),
    "timeout": ("VMSTORE_TIMEOUT",),
    "max_retries": ("VMSTORE_MAX_RETRIES",),
    "chunk_size": ("VMSTORE_CHUNK_SIZE",),
    "concurrency": ("VMSTORE_CONCURRENCY",),
    "allowed_hosts": ("VMSTORE_ALLOWED_HOSTS",),

    "max_bandwidth": ("VMSTORE_MAX_BANDWIDTH",),
}

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
}
_SIZE_PATTERN = re.compile(r"\s*(\d+)\s*([a-zA-Z]*)\s*")


def parse_byte_size(text: str) -> int:
    """Parse "33554432", "32M", "32MiB" or "64k" (binary units) into a number of bytes."""
    match = _SIZE_PATTERN.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 33554432, 32M, 32MiB, 64k)")
    return int(match.group(1)) * _SIZE_UNITS[unit]


@dataclass
class StorageConfig:
    """Which backend to use and how to reach it; validated when built.

    ``type`` is one of "s3", "minio", "http", "https", "nfs" (or a name given to
    :func:`vmstore.register_backend`). For NFS, ``endpoint`` is the mount point. ``timeout``
    is the number of seconds without progress after which a transfer fails, not a limit on
    the whole transfer. ``chunk_size=None`` picks the backend's default. Secrets
    (``access_key``, ``secret_key``, ``session_token``, ``token``) never appear in ``repr``.
    """

    type: str
    endpoint: str = ""
    bucket: str = ""
    region: str = ""
    access_key: str = ""
    secret_key: str = ""
    session_token: str = ""
    token: str = ""
    use_ssl: bool = True
    insecure_skip_verify: bool = False
    ca_bundle: str = ""
    timeout: float = 300.0
    max_retries: int = 3
    chunk_size: int | None = None
    concurrency: int = 4
    encryption_key: bytes | str | None = None
    """Client-side encryption (docs/FORMAT.md): 32 raw bytes or 64 hex digits; never shown."""
    allowed_hosts: list[str] | None = None
    """Host policy (SSRF): None refuses link-local (cloud metadata), unspecified, multicast
    and broadcast addresses; a list makes only those names and CIDRs reachable."""

    max_bandwidth: int | None = None
    """Bytes per second on the wire for the whole store (every transfer and every part
    together); None or 0 means unlimited."""

    def __post_init__(self) -> None:
        self.type = _check_type(self.type)
        for name in _STRING_FIELDS:
            value = getattr(self, name)
            if value is None:
                # None means "not set", as an unset environment variable or flag does.
                value = ""
            elif isinstance(value, os.PathLike):
                value = os.fspath(value)
            if not isinstance(value, str):
                raise _invalid(name, "must be a string")
            if "\x00" in value:
                raise _invalid(name, "must not contain a NUL character")
            setattr(self, name, value)
        for name in ("use_ssl", "insecure_skip_verify"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, "must be True or False")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float):
            raise _invalid("timeout", "must be a number of seconds")
        try:
            timeout = float(self.timeout)
        except OverflowError as exc:  # an int too large for a float
            raise _invalid("timeout", "is too large") from exc
        if not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT:
            raise _invalid(
                "timeout",
                f"must be greater than 0 and at most {MAX_TIMEOUT:.0f} (one day) seconds "
                f"without progress before giving up, got {self.timeout!r}",
            )
        self.timeout = timeout
        if not _is_int(self.max_retries) or not 0 <= self.max_retries <= MAX_RETRIES:
            raise _invalid("max_retries", f"must be an integer from 0 to {MAX_RETRIES}")
        if self.chunk_size is not None and (
            not _is_int(self.chunk_size) or not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE
        ):
            raise _invalid(
                "chunk_size",
                f"must be an integer from {MIN_CHUNK_SIZE} (64 KiB) to {MAX_CHUNK_SIZE} "
                "(5 GiB, S3's largest part), or None for the backend's default",
            )
        if not _is_int(self.concurrency) or not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise _invalid("concurrency", f"must be an integer from 1 to {MAX_CONCURRENCY}")
        if self.encryption_key is not None:
            self.encryption_key = _check_encryption_key(self.encryption_key)
        self.allowed_hosts = check_allowed_hosts(self.allowed_hosts)

        if self.max_bandwidth is not None and (
            not _is_int(self.max_bandwidth) or not 0 <= self.max_bandwidth <= MAX_BANDWIDTH
        ):
            raise _invalid(
                "max_bandwidth",
                "must be a whole number of bytes per second from 0 to "
                f"{MAX_BANDWIDTH} (0 or None: unlimited), got {self.max_bandwidth!r}",
            )

    def __repr__(self) -> str:
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _SECRET_FIELDS and value:
                value = _MASK
            shown.append(f"{field.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @classmethod
    def from_env(
        cls, *, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> StorageConfig:
        """Build a config from ``VMSTORE_*`` (and ``AWS_*`` key) variables.

        Keyword arguments override the environment; an override of ``None`` means "not
        given" (so command-line flags can be passed through as they are). ``environ``
        defaults to ``os.environ``.
        """
        env = os.environ if environ is None else environ
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidConfigError(
                f"unknown StorageConfig field(s): {', '.join(unknown)}; "
                f"known fields: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for name, variables in _ENV_VARIABLES.items():
            for variable in variables:
                if variable in env:
                    values[name] = _parse_env_value(name, variable, env[variable])
                    break
        values.update({name: value for name, value in overrides.items() if value is not None})
        if not values.get("type"):
            raise InvalidConfigError(
                f"type is required (one of {', '.join(BUILTIN_BACKEND_TYPES)}): set "
                "VMSTORE_TYPE, or pass --type on the command line / type= in Python"
            )
        return cls(**values)


def _check_type(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _invalid("type", f"is required: one of {', '.join(BUILTIN_BACKEND_TYPES)}")
    name = value.strip().lower()
    # The registry (which may hold backends added by register_backend) decides which names
    # are valid.
    names = backend_names()
    if name not in names:
        raise _invalid("type", f"{value!r} is not a known backend; use one of {', '.join(names)}")
    return name


def _check_encryption_key(value: object) -> bytes:
    """32 raw bytes, or 64 hex digits (as str or bytes); the message never shows the value."""
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if isinstance(value, bytes) and len(value) == 32:
        return value
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            value = ""
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[0-9A-Fa-f]{64}", text):
            return bytes.fromhex(text)
    raise _invalid(
        "encryption_key",
        "must be 32 raw bytes or 64 hexadecimal digits (the value is not shown)",
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(field_name: str, problem: str) -> InvalidConfigError:
    return InvalidConfigError(f"invalid StorageConfig.{field_name}: {problem}")


def _parse_env_value(field_name: str, variable: str, text: str) -> object:
    if field_name in ("use_ssl", "insecure_skip_verify"):
        word = text.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise InvalidConfigError(f"{variable}={text!r} is not a boolean; use true or false")
    if field_name == "allowed_hosts":
        return split_allowed_hosts(text) or None
    try:
        if field_name == "chunk_size":
            return parse_byte_size(text) if text.strip() else None
        if field_name == "max_bandwidth":
            return parse_byte_size(text) if text.strip() else None
        if field_name in ("max_retries", "concurrency"):
            return int(text)
        if field_name == "timeout":
            return float(text)
    except ValueError as exc:
        raise InvalidConfigError(f"{variable}={text!r} is not valid: {exc}", cause=exc) from exc
    return text
