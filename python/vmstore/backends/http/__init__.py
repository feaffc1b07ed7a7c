"""HTTP/HTTPS backend, one module per concern:

- ``_backend``: :class:`HttpStorage` (download, upload, metadata, delete, the sidecar);
- ``_transport``: the requests session, redirects followed hop by hop under the host policy,
  the bearer token only for the origin the caller named;
- ``_headers``: what headers say (numbers, dates, validators, advertised SHA-256, the HEAD
  answer) and the headers an upload sends;
- ``_errors``: :class:`HttpStatusError`, what is retried (:func:`classify_retry`) and the one
  mapping onto vmstore's errors (:func:`storage_error`);
- ``_bodies``: ranged reads pinned to one version, and the PUT body fed by the upload pass.
"""

from __future__ import annotations

from vmstore.backends.http._backend import HttpStorage
from vmstore.backends.http._errors import HttpStatusError, classify_retry, storage_error
from vmstore.backends.http._headers import advertised_sha256

__all__ = ["HttpStatusError", "HttpStorage", "advertised_sha256", "classify_retry", "storage_error"]
