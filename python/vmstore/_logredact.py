"""Keeps presigned URLs' signatures out of the logs of the libraries vmstore drives.

vmstore prints every URL through :func:`vmstore.urls.redact_url`. urllib3 logs each request's
full target at DEBUG (``"GET /bucket/key?X-Amz-Signature=... HTTP/1.1" 206``) and botocore's
signer logs the canonical request and the signature it computes, so an application that turns
DEBUG on would write a presigned URL's credential into its logs. A filter on exactly those
loggers rewrites such records (the signature, credential and token values become
``REDACTED``); every other record passes untouched.
"""

from __future__ import annotations

import logging
import re
import threading

REDACTED = "REDACTED"

_LOGGERS = ("urllib3.connectionpool", "botocore.auth", "botocore.endpoint")

# Query parameters that authenticate a request (SigV4 and SigV2 presigned URLs, session
# tokens, generic bearer-ish names); the value runs to the next separator.
_SECRET_PARAMETER = re.compile(
    r"(?i)\b((?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId"
    r"|token|access_token|sig)=)[^&\s\"'<>]+"
)
# botocore.auth: "Signature:\n<hex>" and the string that was signed.
_SIGNER_LINE = re.compile(r"(?s)^(Signature|StringToSign|CanonicalRequest):.*")


class _SecretRedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: leave it to logging's handling
            return True
        redacted = _SIGNER_LINE.sub(lambda m: f"{m.group(1)}: {REDACTED}", message)
        redacted = _SECRET_PARAMETER.sub(lambda m: m.group(1) + REDACTED, redacted)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_FILTER = _SecretRedactingFilter()
_installed = False
_lock = threading.Lock()


def install() -> None:
    """Put the filter on the loggers that print request targets or signatures (once)."""
    global _installed
    with _lock:
        if _installed:
            return
        for name in _LOGGERS:
            logging.getLogger(name).addFilter(_FILTER)
        _installed = True
