"""What get_metadata reports about a stored object, and delete's idempotence."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from vmstore import (
    ErrorType,
    FileMetadata,
    InvalidConfigError,
    NotFoundError,
    Storage,
    UploadRequest,
)

from tests.support import MiB, random_bytes, sha256_bytes, write_file

from .harness import BackendHarness


def test_metadata_round_trip_keeps_custom_keys_lower_case_and_the_checksum(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(MiB + 3, seed=21)
    source = write_file(workdir / "disk.qcow2", data)
    before = dt.datetime.now(dt.UTC)

    up = store.upload(
        UploadRequest(
            str(source),
            backend.url("disk.qcow2"),
            metadata={"VM-Name": "test-vm-01", "owner": "team-a"},
            content_type="application/x-qemu-disk",
        )
    )
    md = store.get_metadata(up.url)

    assert isinstance(md, FileMetadata)
    assert md.url == up.url
    assert md.size == len(data)
    assert md.checksum == sha256_bytes(data)
    assert md.custom_metadata == {"vm-name": "test-vm-01", "owner": "team-a"}
    assert md.content_type == "application/x-qemu-disk"
    assert md.last_modified.tzinfo is not None
    assert md.last_modified.utcoffset() == dt.timedelta(0)
    # Stores keep whole seconds at worst; the object cannot predate the upload by more.
    assert before - dt.timedelta(seconds=2) <= md.last_modified
    assert md.last_modified <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)


def test_metadata_never_exposes_the_internal_sha256_key(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(1000, seed=22))

    up = store.upload(UploadRequest(str(source), backend.url("disk.img"), metadata={"a": "1"}))
    md = store.get_metadata(up.url)

    assert "sha256" not in md.custom_metadata
    assert md.custom_metadata == {"a": "1"}


def test_caller_metadata_cannot_forge_the_stored_checksum(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(5000, seed=23)
    source = write_file(workdir / "disk.img", data)
    forged = "0" * 64

    try:
        up = store.upload(
            UploadRequest(str(source), backend.url("disk.img"), metadata={"SHA256": forged})
        )
    except InvalidConfigError:
        return  # refusing the reserved key is as good as ignoring it

    assert store.get_metadata(up.url).checksum == sha256_bytes(data)


def test_metadata_etag_matches_the_upload_response(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(MiB, seed=24))

    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))

    assert up.etag
    assert store.get_metadata(up.url).etag == up.etag


def test_get_metadata_of_a_missing_object_is_not_found(
    backend: BackendHarness, store: Storage
) -> None:
    with pytest.raises(NotFoundError) as caught:
        store.get_metadata(backend.url("no-such-disk.img"))

    assert caught.value.type is ErrorType.NOT_FOUND


def test_delete_removes_the_object_and_is_idempotent(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(MiB, seed=25))
    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))

    store.delete(up.url)

    assert backend.read_object("disk.img") is None
    assert backend.stored_names() == set()
    with pytest.raises(NotFoundError):
        store.get_metadata(up.url)
    store.delete(up.url)  # a second cleanup of the same object is not an error


def test_delete_of_an_object_that_never_existed_is_not_an_error(
    backend: BackendHarness, store: Storage
) -> None:
    store.delete(backend.url("never-uploaded.img"))

    assert backend.stored_names() == set()


def test_delete_leaves_other_objects_alone(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    keep = random_bytes(4096, seed=26)
    store.upload(UploadRequest(str(write_file(workdir / "a.img", keep)), backend.url("keep.img")))
    gone = store.upload(
        UploadRequest(str(write_file(workdir / "b.img", b"x" * 10)), backend.url("gone.img"))
    )

    store.delete(gone.url)

    assert backend.read_object("keep.img") == keep
    assert backend.stored_names() == {"keep.img"} | backend.companion_names("keep.img")
