"""What interrupted transfers leave behind is found (``list_incomplete``) and removed
(``cleanup_incomplete``) on every backend: open multipart uploads, partials in the share, and
the partials of downloads this host started, whatever directory they were written to."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from vmstore import InvalidConfigError, Storage, UploadRequest

from tests.support import random_bytes, write_file

from .harness import BackendHarness, Capability
from .test_resume import download_size, interrupt_download, interrupt_upload, upload_size


def area_prefix(backend: BackendHarness) -> str:
    """The URL prefix of this test's own area of the store ("" for NFS: a share per test)."""
    prefix = backend.url("probe").removesuffix("probe")
    return "" if prefix == "nfs://" else prefix


def test_an_interrupted_upload_is_listed_until_it_is_cleaned_up(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.UPLOAD_RESUME)
    source = write_file(workdir / "disk.img", random_bytes(upload_size(backend), seed=401))
    interrupt_upload(backend, store, source, backend.url("disk.img"))

    left = [t for t in store.list_incomplete(area_prefix(backend)) if t.kind == "upload"]
    assert [t.url for t in left] == [backend.url("disk.img")]
    assert left[0].bytes_done >= backend.upload_unit
    assert left[0].modified.tzinfo is not None

    assert store.cleanup_incomplete(timedelta(hours=1)) == []  # too recent to be abandoned
    assert backend.stored_names() != set()
    removed = store.cleanup_incomplete(0)
    assert [t.location for t in removed] == [left[0].location]
    assert [t for t in store.list_incomplete(area_prefix(backend)) if t.kind == "upload"] == []
    assert backend.stored_names() == set()

    # Nothing of the old attempt is reused: the next upload starts from zero and completes.
    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))
    assert up.resumed_from == 0
    assert backend.read_object("disk.img") == source.read_bytes()


def test_an_interrupted_download_is_listed_and_its_partial_removed(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    backend.require(Capability.DOWNLOAD_RESUME)
    data = random_bytes(download_size(backend), seed=402)
    up = store.upload(UploadRequest(str(write_file(workdir / "src.img", data)), backend.url("d")))
    dest = workdir / "elsewhere" / "imported.img"
    interrupt_download(backend, store, up.url, dest)
    partial = Path(f"{dest}.vmstore-partial")
    assert partial.exists()

    left = [t for t in store.list_incomplete(area_prefix(backend)) if t.kind == "download"]
    assert [(t.url, t.location) for t in left] == [(up.url, str(partial))]

    removed = store.cleanup_incomplete(0)
    assert [t.location for t in removed if t.kind == "download"] == [str(partial)]
    assert not partial.exists()
    assert not Path(f"{dest}.vmstore-partial.state").exists()
    assert not dest.exists()
    assert [t for t in store.list_incomplete(area_prefix(backend)) if t.kind == "download"] == []


def test_a_finished_transfer_leaves_nothing_to_list(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(upload_size(backend), seed=403)
    up = store.upload(UploadRequest(str(write_file(workdir / "a.img", data)), backend.url("a")))
    from vmstore import DownloadRequest

    store.download(DownloadRequest(up.url, str(workdir / "back.img")))
    assert store.list_incomplete(area_prefix(backend)) == []


@pytest.mark.parametrize("older_than", [-1, float("nan"), float("inf"), "7d"])
def test_an_absurd_age_is_invalid_config(store: Storage, older_than: object) -> None:
    with pytest.raises(InvalidConfigError):
        store.cleanup_incomplete(older_than)  # type: ignore[arg-type]
