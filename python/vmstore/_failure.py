"""The one "what does a failure leave?" rule, shared by every pipeline.

An interruption (a dropped connection, a timeout, Ctrl-C, a cancel, a killed callback) keeps
what was transferred, so the same call can resume; a failure that resuming cannot fix (bytes
that do not match their checksum, a refusal, a missing object, a full disk, a bad
configuration) removes it, so nothing stale is left behind to be trusted or paid for.
"""

from __future__ import annotations

from vmstore.errors import (
    ChecksumMismatchError,
    InvalidConfigError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
)

_FINAL = (
    ChecksumMismatchError,
    InvalidConfigError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
)


def keeps_partial(exc: BaseException) -> bool:
    """Whether a transfer that failed with ``exc`` keeps its partial result for a resume."""
    return not isinstance(exc, _FINAL)
