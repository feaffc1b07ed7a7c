"""Progress reporting, cancellation, and a progress callback that raises."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from vmstore import (
    CancelledError,
    CancelToken,
    DownloadRequest,
    ErrorType,
    Storage,
    UploadRequest,
)

from tests.support import (
    InterruptAt,
    Interrupted,
    MiB,
    ProgressRecorder,
    is_non_decreasing,
    random_bytes,
    write_file,
)

from .harness import CHUNK, BackendHarness

PROGRESS_SIZES = {"empty": 0, "multi-chunk": 4 * MiB + 1}


def assert_well_formed_progress(recorder: ProgressRecorder, total: int) -> None:
    assert recorder.calls, "the progress callback was never called"
    assert recorder.calls[-1] == (total, total)
    assert all(t == total for _done, t in recorder.calls)
    assert is_non_decreasing(done for done, _t in recorder.calls)
    assert all(0 <= done <= total for done, _t in recorder.calls)
    assert recorder.threads == {threading.get_ident()}, "callback must run on the calling thread"
    # At most every 100 ms; only the final call may come sooner after the previous one. The
    # margin absorbs scheduling jitter on a busy machine; a report per chunk still fails.
    gaps = [b - a for a, b in zip(recorder.times[:-1], recorder.times[1:-1], strict=False)]
    assert all(gap >= 0.05 for gap in gaps), gaps


@pytest.mark.parametrize("size", PROGRESS_SIZES.values(), ids=PROGRESS_SIZES.keys())
def test_upload_progress_is_monotonic_and_ends_at_total(
    backend: BackendHarness, store: Storage, workdir: Path, size: int
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(size, seed=31))
    recorder = ProgressRecorder()

    store.upload(UploadRequest(str(source), backend.url("disk.img"), progress_callback=recorder))

    assert_well_formed_progress(recorder, size)


@pytest.mark.parametrize("size", PROGRESS_SIZES.values(), ids=PROGRESS_SIZES.keys())
def test_download_progress_is_monotonic_and_ends_at_total(
    backend: BackendHarness, store: Storage, workdir: Path, size: int
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(size, seed=32))
    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))
    recorder = ProgressRecorder()

    store.download(DownloadRequest(up.url, str(workdir / "back.img"), progress_callback=recorder))

    assert_well_formed_progress(recorder, size)


def test_upload_with_a_cancelled_token_raises_cancelled_and_stores_nothing(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(2 * MiB, seed=33))
    token = CancelToken()
    token.cancel()

    with pytest.raises(CancelledError) as caught:
        store.upload(UploadRequest(str(source), backend.url("disk.img"), cancel=token))

    assert caught.value.type is ErrorType.CANCELLED
    assert backend.read_object("disk.img") is None


def test_download_with_a_cancelled_token_raises_cancelled_and_creates_no_file(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(2 * MiB, seed=34))
    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))
    token = CancelToken()
    token.cancel()
    dest = workdir / "back.img"

    with pytest.raises(CancelledError):
        store.download(DownloadRequest(up.url, str(dest), cancel=token))

    assert not dest.exists()


class CancelOnFirstReport:
    """A progress callback that cancels the token from another thread at its first report."""

    def __init__(self, token: CancelToken) -> None:
        self.token = token
        self.first: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.first is None:
            self.first = (done, total)
            canceller = threading.Thread(target=self.token.cancel)
            canceller.start()
            canceller.join()

    def landed_after_the_last_chunk(self) -> bool:
        return self.first is not None and self.first[0] == self.first[1]


def test_cancel_during_upload_stops_it_or_comes_too_late_but_never_half_stores(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    """The token is cancelled from another thread at the first progress report.

    The core polls the token per chunk. Reports come at most every 100 ms, so a fast local
    copy may be past its last chunk when the first report (then the final one) arrives: such
    a cancel is too late and the upload completes. A cancel before the last chunk must stop
    it. Either way the final name holds nothing or the whole object, never a part.
    """
    data = random_bytes(4 * MiB, seed=35)
    source = write_file(workdir / "disk.img", data)
    token = CancelToken()
    canceller = CancelOnFirstReport(token)

    try:
        store.upload(
            UploadRequest(
                str(source), backend.url("disk.img"), cancel=token, progress_callback=canceller
            )
        )
    except CancelledError:
        assert backend.read_object("disk.img") is None
    else:
        assert canceller.landed_after_the_last_chunk(), "a cancel before the last chunk was ignored"
        assert backend.read_object("disk.img") == data
    assert token.is_cancelled


def test_cancel_during_download_stops_it_or_comes_too_late_but_never_half_writes(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    data = random_bytes(4 * MiB, seed=36)
    up = store.upload(UploadRequest(str(write_file(workdir / "disk.img", data)), backend.url("d")))
    token = CancelToken()
    canceller = CancelOnFirstReport(token)
    dest = workdir / "back.img"

    try:
        store.download(
            DownloadRequest(up.url, str(dest), cancel=token, progress_callback=canceller)
        )
    except CancelledError:
        assert not dest.exists()
    else:
        assert canceller.landed_after_the_last_chunk(), "a cancel before the last chunk was ignored"
        assert dest.read_bytes() == data


def test_exception_from_upload_progress_callback_propagates_and_stores_nothing(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(4 * MiB, seed=37))

    with pytest.raises(Interrupted) as caught:
        store.upload(
            UploadRequest(
                str(source), backend.url("disk.img"), progress_callback=InterruptAt(CHUNK)
            )
        )

    assert type(caught.value) is Interrupted  # unchanged, not wrapped in a StorageError
    assert backend.read_object("disk.img") is None


def test_exception_from_download_progress_callback_propagates_and_creates_no_file(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(4 * MiB, seed=38))
    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))
    dest = workdir / "back.img"

    with pytest.raises(Interrupted) as caught:
        store.download(DownloadRequest(up.url, str(dest), progress_callback=InterruptAt(CHUNK)))

    assert type(caught.value) is Interrupted
    assert not dest.exists()


def test_raising_callback_on_a_download_keeps_the_previous_destination(
    backend: BackendHarness, store: Storage, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", random_bytes(2 * MiB, seed=39))
    up = store.upload(UploadRequest(str(source), backend.url("disk.img")))
    previous = b"the disk imported yesterday\n" * 1000
    dest = write_file(workdir / "back.img", previous)

    with pytest.raises(Interrupted):
        store.download(DownloadRequest(up.url, str(dest), progress_callback=InterruptAt(CHUNK)))

    assert dest.read_bytes() == previous
