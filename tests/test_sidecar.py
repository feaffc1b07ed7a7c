"""The sidecar format (vmstore/_sidecar.py): round trip, the version-1 format of vmstore 0.1,
the binding to the data it describes, and readers that raise nothing but StorageError."""

from __future__ import annotations

import contextlib
import json
import random

import pytest
from vmstore import StorageError
from vmstore._sidecar import Sidecar, SidecarFormatError

SHA = "ab" * 32


def test_round_trip_keeps_every_field() -> None:
    sidecar = Sidecar(
        sha256=SHA,
        size=123,
        etag="1f-7b-99",
        content_type="application/x-qemu-disk",
        metadata={"vm-name": "v1"},
        uploaded_at="2026-01-05T10:00:00+00:00",
        mtime_ns=99,
        upload_token="upload-7",
    )

    assert Sidecar.from_json(sidecar.to_json()) == sidecar
    assert Sidecar.from_json(sidecar.to_bytes()) == sidecar


def test_upload_token_is_written_only_when_set() -> None:
    assert "upload_token" not in json.loads(Sidecar(sha256=SHA, size=1).to_json())


def test_release_1_sidecar_is_read_and_bound_by_size_and_mtime() -> None:
    old = Sidecar.from_json(
        json.dumps(
            {
                "sha256": SHA.upper(),
                "size": 10,
                "mtime_ns": 5,
                "content_type": "text/plain",
                "metadata": {"VM-Name": "x"},
                "uploaded_at": "",
            }
        )
    )

    assert (old.sha256, old.etag, old.metadata) == (SHA, "", {"vm-name": "x"})
    assert old.describes(size=10, etag="any-etag", mtime_ns=5)
    assert not old.describes(size=10, etag="any-etag", mtime_ns=6)
    assert not old.describes(size=11, etag="any-etag", mtime_ns=5)


def test_an_etag_binds_the_sidecar_to_one_version_of_the_data() -> None:
    sidecar = Sidecar(sha256=SHA, size=10, etag="ino1-a-5", mtime_ns=5)

    assert sidecar.describes(size=10, etag="ino1-a-5", mtime_ns=5)
    # Same size and mtime, another file: exactly what racing writers produce.
    assert not sidecar.describes(size=10, etag="ino2-a-5", mtime_ns=5)
    assert "ino2" in (sidecar.mismatch(size=10, etag="ino2-a-5") or "")


def test_weak_and_strong_forms_of_one_etag_are_the_same_version() -> None:
    assert Sidecar(sha256=SHA, size=1, etag='"abc"').describes(size=1, etag='W/"abc"')


def test_a_store_without_etags_compares_sizes_only() -> None:
    sidecar = Sidecar(sha256=SHA, size=10, etag='"abc"')

    assert sidecar.describes(size=10, etag=None)
    assert not sidecar.describes(size=9, etag=None)


def test_upload_tokens_must_agree_when_both_sides_have_one() -> None:
    sidecar = Sidecar(sha256=SHA, size=1, upload_token="u1")

    assert sidecar.describes(size=1, etag=None, upload_token="u1")
    assert sidecar.describes(size=1, etag=None)
    assert not sidecar.describes(size=1, etag=None, upload_token="u2")


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"sha256": "nope", "size": 1}',
        b'{"sha256": "' + SHA.encode() + b'", "size": -1}',
        b'{"sha256": "' + SHA.encode() + b'", "size": true}',
        b'{"sha256": "' + SHA.encode() + b'", "size": 1, "metadata": {"a": 1}}',
        b'{"sha256": "' + SHA.encode() + b'", "size": 1, "etag": 5}',
        b'{"sha256": "' + SHA.encode() + b'", "size": 1, "version": "2"}',
        b'{"sha256": "' + SHA.encode() + b'", "size": 1, "upload_token": []}',
        b"[" * 100_000,
        b" " * (2 << 20),
    ],
)
def test_anything_that_is_not_a_sidecar_is_a_sidecar_format_error(text: bytes) -> None:
    with pytest.raises(SidecarFormatError) as caught:
        Sidecar.from_json(text)

    assert isinstance(caught.value, StorageError)
    assert isinstance(caught.value, ValueError)


def test_random_and_mutated_input_raises_nothing_but_storage_error() -> None:
    # A small fuzz pass in the suite (the long one belongs to the fuzz target).
    valid = Sidecar(sha256=SHA, size=3, etag="e", metadata={"k": "v"}).to_bytes()
    rng = random.Random(8)
    for _ in range(3000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        for text in (bytes(data), rng.randbytes(rng.randint(0, 64))):
            with contextlib.suppress(StorageError):
                Sidecar.from_json(text)
