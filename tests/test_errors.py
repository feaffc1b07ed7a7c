"""One error hierarchy for the whole library, raised alike by Python and by the native core."""

from __future__ import annotations

import errno
import logging
import os
import pickle
from pathlib import Path

import pytest
import vmstore
import vmstore._native as native
from vmstore import (
    CancelledError,
    ChecksumMismatchError,
    ErrorType,
    InvalidConfigError,
    NetworkError,
    NotFoundError,
    OperationFailedError,
    PermissionDeniedError,
    StorageConfig,
    StorageError,
    new_storage,
)
from vmstore._oserrors import error_class_of_errno, storage_error_from_oserror

SUBCLASS_OF = {
    ErrorType.NOT_FOUND: NotFoundError,
    ErrorType.PERMISSION_DENIED: PermissionDeniedError,
    ErrorType.NETWORK_ERROR: NetworkError,
    ErrorType.CHECKSUM_MISMATCH: ChecksumMismatchError,
    ErrorType.INVALID_CONFIG: InvalidConfigError,
    ErrorType.OPERATION_FAILED: OperationFailedError,
    ErrorType.CANCELLED: CancelledError,
}

SECRET = "s3cr3t-never-show-me-0451"


def test_error_type_values_are_the_documented_names() -> None:
    assert {t.value for t in ErrorType} >= {
        "NotFound",
        "PermissionDenied",
        "NetworkError",
        "ChecksumMismatch",
        "InvalidConfig",
        "OperationFailed",
        "Cancelled",
    }
    assert str(ErrorType.NOT_FOUND) == "NotFound"


@pytest.mark.parametrize("error_type", list(SUBCLASS_OF), ids=lambda t: t.value)
def test_storage_error_with_a_type_builds_that_types_subclass(error_type: ErrorType) -> None:
    err = StorageError(error_type, "what failed and what to do")

    assert type(err) is SUBCLASS_OF[error_type]
    assert isinstance(err, StorageError)
    assert err.type is error_type
    assert str(err) == "what failed and what to do"


@pytest.mark.parametrize("error_type", list(SUBCLASS_OF), ids=lambda t: t.value)
def test_subclass_takes_only_the_message_and_knows_its_type(error_type: ErrorType) -> None:
    err = SUBCLASS_OF[error_type]("just the message")

    assert err.type is error_type
    assert err.message == "just the message"


def test_except_by_class_and_by_type_are_equivalent() -> None:
    with pytest.raises(NotFoundError) as caught:
        raise StorageError(ErrorType.NOT_FOUND, "gone")

    assert caught.value.type is ErrorType.NOT_FOUND


def test_cause_is_chained() -> None:
    cause = ConnectionResetError("peer reset")

    err = StorageError(ErrorType.NETWORK_ERROR, "upload of part 3 failed", cause=cause)

    assert err.__cause__ is cause


def test_errors_survive_pickling_with_class_type_and_message() -> None:
    """Controllers hand errors across process pools; the type must not degrade."""
    err = ChecksumMismatchError("sha256 differs")

    back = pickle.loads(pickle.dumps(err))

    assert type(back) is ChecksumMismatchError
    assert (back.type, back.message) == (ErrorType.CHECKSUM_MISMATCH, "sha256 differs")


def test_native_core_raises_the_same_classes(tmp_path: Path) -> None:
    with pytest.raises(vmstore.NotFoundError) as caught:
        native.sha256_file(str(tmp_path / "missing.img"))

    assert caught.value.type is ErrorType.NOT_FOUND
    assert "missing.img" in str(caught.value)


def test_native_cancel_token_is_the_public_one() -> None:
    assert vmstore.CancelToken is native.CancelToken


def test_nfs_config_error_does_not_reveal_a_secret(tmp_path: Path) -> None:
    config = StorageConfig(type="nfs", endpoint=str(tmp_path / "absent"), token=SECRET)

    with pytest.raises(InvalidConfigError) as caught:
        new_storage(config)

    assert SECRET not in f"{caught.value} {caught.value!r}"


def unreachable_failure_text(
    config: StorageConfig, url: str, caplog: pytest.LogCaptureFixture
) -> str:
    """Everything a user could see of a failed call: message, repr, causes, vmstore's logs."""
    caplog.set_level(logging.DEBUG, logger="vmstore")
    with pytest.raises(StorageError) as caught, new_storage(config) as store:
        store.get_metadata(url)
    shown = [str(caught.value), repr(caught.value)]
    cause = caught.value.__cause__
    while cause is not None:
        shown.append(str(cause))
        cause = cause.__cause__
    shown += [r.getMessage() for r in caplog.records if r.name.startswith("vmstore")]
    assert caught.value.type in (ErrorType.NETWORK_ERROR, ErrorType.OPERATION_FAILED)
    return "\n".join(shown)


def test_s3_connection_failure_does_not_reveal_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("vmstore.backends.s3", reason="the S3 backend is not written yet")
    config = StorageConfig(
        type="s3",
        endpoint="http://127.0.0.1:9",  # discard port: nothing listens, the connect is refused
        bucket="vm-exports",
        region="us-east-1",
        access_key="AKIAEXAMPLEACCESS77",
        secret_key=SECRET,
        max_retries=0,
        timeout=5.0,
    )

    shown = unreachable_failure_text(config, "s3://vm-exports/disk.qcow2", caplog)

    assert SECRET not in shown
    assert "AKIAEXAMPLEACCESS77" not in shown


def test_http_connection_failure_does_not_reveal_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("vmstore.backends.http", reason="the HTTP backend is not written yet")
    config = StorageConfig(
        type="http", endpoint="http://127.0.0.1:9", token=SECRET, max_retries=0, timeout=5.0
    )

    shown = unreachable_failure_text(config, "http://127.0.0.1:9/vm/disk.qcow2", caplog)

    assert SECRET not in shown


# --- one errno table: the core's (rust/src/error.rs ERRNO_TABLE) and Python's agree ---------


def test_rust_and_python_map_every_errno_to_the_same_error_class() -> None:
    errno_classes = getattr(native, "errno_classes", None)
    assert errno_classes is not None, (
        "vmstore._native.errno_classes is not registered: lib.rs needs "
        "m.add_function(wrap_pyfunction!(error::errno_classes, m)?)?;"
    )
    rust = dict(errno_classes())
    python_listed = {
        code for code in errno.errorcode if error_class_of_errno(code) is not OperationFailedError
    }

    # Every errno either side lists, and every other errno the OS knows (unlisted on both:
    # OperationFailedError), is raised as the same class from Rust and from Python.
    disagreements = {
        errno.errorcode.get(code, str(code)): (rust.get(code, "OperationFailedError"), python)
        for code in set(errno.errorcode) | set(rust) | python_listed
        if rust.get(code, "OperationFailedError") != (python := error_class_of_errno(code).__name__)
    }
    assert disagreements == {}
    assert errno.ECONNRESET in rust  # the disagreement the issue found


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ECONNRESET, NetworkError),
        (errno.ESTALE, NetworkError),
        (errno.ENOSPC, OperationFailedError),
        (errno.EACCES, PermissionDeniedError),
        (errno.ENOENT, NotFoundError),
        (errno.EISDIR, InvalidConfigError),
        (errno.EIO, OperationFailedError),
    ],
)
def test_python_oserror_becomes_the_tables_class(code: int, expected: type[StorageError]) -> None:
    error = storage_error_from_oserror(OSError(code, os.strerror(code)), "read", "/x")

    assert type(error) is expected
    assert os.strerror(code) in str(error)


def test_native_core_raises_invalid_config_for_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError):
        native.sha256_file(str(tmp_path))


def test_native_core_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    with pytest.raises(InvalidConfigError) as caught:
        native.sha256_file(str(fifo))  # a plain open() would wait for a writer forever

    assert "FIFO" in str(caught.value)
