"""vmstore: move VM disk images between a host and S3, HTTP(S) or NFS storage.

The bytes that arrive are the bytes that left (SHA-256, end to end); an interrupted
transfer resumes; the native core, not Python, does the byte-touching work.

    from vmstore import new_storage, StorageConfig, UploadRequest

    with new_storage(StorageConfig(type="nfs", endpoint="/mnt/nfs-share")) as store:
        up = store.upload(UploadRequest("disk.qcow2", "nfs://vm-exports/disk.qcow2"))
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from vmstore._native import CancelToken
from vmstore.config import StorageConfig
from vmstore.errors import (
    CancelledError,
    ChecksumMismatchError,
    ErrorType,
    InvalidConfigError,
    NetworkError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    StorageError,
)
from vmstore.images import ImageInfo, inspect_image
from vmstore.models import (
    DownloadRequest,
    DownloadResponse,
    FileMetadata,
    IncompleteTransfer,
    UploadRequest,
    UploadResponse,
)
from vmstore.storage import Storage, new_storage, register_backend

try:
    __version__ = _version("vmstore")
except _PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "CancelToken",
    "CancelledError",
    "ChecksumMismatchError",
    "DownloadRequest",
    "DownloadResponse",
    "ErrorType",
    "FileMetadata",
    "ImageInfo",
    "IncompleteTransfer",
    "InvalidConfigError",
    "NetworkError",
    "NotFoundError",
    "OperationFailedError",
    "PermissionDeniedError",
    "Storage",
    "StorageConfig",
    "StorageError",
    "UploadRequest",
    "UploadResponse",
    "__version__",
    "inspect_image",
    "new_storage",
    "register_backend",
]
