"""The one "what does a failure leave?" rule, shared by every pipeline.

An interruption (a dropped connection, a timeout, Ctrl-C, a cancel, a killed callback, and
credentials that stopped working mid-transfer: renewed, the same call goes on) keeps what was
transferred, so the same call can resume; a failure that resuming cannot fix (bytes that do
not match their checksum, a missing object, a full disk or a server's refusal of the request
itself, a bad configuration) removes it, so nothing stale is left behind to be trusted or paid
for.
"""

from __future__ import annotations

from vmstore.errors import (
    ChecksumMismatchError,
    InvalidConfigError,
    NotFoundError,
    OperationFailedError,
)

_FINAL = (
    ChecksumMismatchError,
    InvalidConfigError,
    NotFoundError,
    OperationFailedError,
)


def keeps_partial(exc: BaseException) -> bool:
    """Whether a transfer that failed with ``exc`` keeps its partial result for a resume."""
    return not isinstance(exc, _FINAL)
