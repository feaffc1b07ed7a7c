"""The public surface of `import vmstore`: exactly the documented names and shapes."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import subprocess
import sys
import typing
import uuid
from pathlib import Path
from typing import Any

import vmstore
from vmstore import (
    DownloadRequest,
    DownloadResponse,
    FileMetadata,
    Storage,
    StorageConfig,
    UploadRequest,
    UploadResponse,
    new_storage,
    register_backend,
)

DOCUMENTED_NAMES = {
    "new_storage",
    "register_backend",
    "Storage",
    "StorageConfig",
    "UploadRequest",
    "UploadResponse",
    "DownloadRequest",
    "DownloadResponse",
    "FileMetadata",
    "IncompleteTransfer",
    "CancelToken",
    "ErrorType",
    "StorageError",
    "NotFoundError",
    "PermissionDeniedError",
    "NetworkError",
    "ChecksumMismatchError",
    "InvalidConfigError",
    "OperationFailedError",
    "CancelledError",
    "__version__",
    "ImageInfo",
    "inspect_image",
}

STORAGE_METHODS = (
    "upload",
    "download",
    "get_metadata",
    "delete",
    "validate_url",
    "list_incomplete",
    "cleanup_incomplete",
    "close",
    "__enter__",
    "__exit__",
)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_import_vmstore_exports_exactly_the_documented_names() -> None:
    assert set(vmstore.__all__) == DOCUMENTED_NAMES
    assert len(vmstore.__all__) == len(DOCUMENTED_NAMES)
    for name in DOCUMENTED_NAMES:
        assert hasattr(vmstore, name), name


def test_star_import_gives_the_documented_names() -> None:
    namespace: dict[str, Any] = {}
    exec("from vmstore import *", namespace)

    assert set(namespace) - {"__builtins__"} == DOCUMENTED_NAMES


def test_version_matches_the_installed_distribution() -> None:
    assert vmstore.__version__ == importlib.metadata.version("vmstore")


def test_package_ships_type_information() -> None:
    package_dir = Path(vmstore.__file__).parent

    assert (package_dir / "py.typed").exists()
    assert (package_dir / "_native.pyi").exists()


def test_request_dataclasses_have_the_documented_fields_and_defaults() -> None:
    up = UploadRequest("disk.qcow2", "nfs://vm/disk.qcow2")
    down = DownloadRequest("nfs://vm/disk.qcow2", "imported.qcow2")

    assert field_names(UploadRequest) == [
        "source_path",
        "destination_url",
        "metadata",
        "progress_callback",
        "content_type",
        "resume",
        "cancel",
        "source_stream",
        "size_hint",
        "compression",
        "allow_backing_file",
    ]
    assert (up.metadata, up.progress_callback, up.content_type, up.resume, up.cancel) == (
        {},
        None,
        None,
        True,
        None,
    )
    assert field_names(DownloadRequest) == [
        "source_url",
        "destination_path",
        "verify_checksum",
        "expected_checksum",
        "progress_callback",
        "resume",
        "cancel",
        "destination_stream",
        "allow_backing_file",
    ]
    assert (
        down.verify_checksum,
        down.expected_checksum,
        down.progress_callback,
        down.resume,
        down.cancel,
    ) == (True, None, None, True, None)


def test_each_upload_request_gets_its_own_metadata_dict() -> None:
    first = UploadRequest("a", "nfs://a")
    first.metadata["vm-name"] = "a"

    assert UploadRequest("b", "nfs://b").metadata == {}


def test_response_and_metadata_dataclasses_have_the_documented_fields() -> None:
    assert field_names(UploadResponse) == [
        "url",
        "checksum",
        "bytes_transferred",
        "etag",
        "size",
        "resumed_from",
    ]
    assert field_names(DownloadResponse) == [
        "checksum",
        "content_length",
        "bytes_transferred",
        "destination_path",
        "resumed_from",
    ]
    assert field_names(FileMetadata) == [
        "url",
        "size",
        "checksum",
        "etag",
        "last_modified",
        "content_type",
        "custom_metadata",
        "image_format",
        "virtual_size",
    ]
    assert UploadResponse("u", "c", 0, "e", 0).resumed_from == 0
    assert DownloadResponse("c", 0, 0, "p").resumed_from == 0


def test_storage_is_a_protocol_with_the_documented_methods() -> None:
    assert typing.Protocol in Storage.__mro__
    for method in STORAGE_METHODS:
        assert callable(getattr(Storage, method, None)), method


def test_new_storage_returns_a_context_manager_with_every_storage_method(tmp_path: Path) -> None:
    with new_storage(StorageConfig(type="nfs", endpoint=str(tmp_path))) as store:
        for method in STORAGE_METHODS:
            assert callable(getattr(store, method, None)), method


def test_register_backend_makes_new_storage_use_the_factory() -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    built: list[StorageConfig] = []

    class Recorder:
        def __init__(self, config: StorageConfig) -> None:
            built.append(config)

    register_backend(name, Recorder)
    store = new_storage(StorageConfig(type=name))

    assert isinstance(store, Recorder)
    assert [c.type for c in built] == [name]


def test_nfs_storage_does_not_import_network_libraries(tmp_path: Path) -> None:
    """boto3 and requests are optional extras: only their own backends may pull them in."""
    code = (
        "import sys, vmstore\n"
        f"config = vmstore.StorageConfig(type='nfs', endpoint={str(tmp_path)!r})\n"
        "with vmstore.new_storage(config):\n"
        "    pass\n"
        "network = ('boto3', 'botocore', 'requests', 'urllib3')\n"
        "print(sorted(m for m in network if m in sys.modules))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
