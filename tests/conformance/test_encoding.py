"""Compression and client-side encryption (docs/FORMAT.md), on every backend.

What is checked from the outside (the harness reads the stored object directly): the stored
bytes are frames, never the plaintext, and smaller for compressible data; what vmstore answers
(responses, get_metadata, progress) describes the image, never the stored frames; a wrong key,
a missing key and a flipped stored byte each fail with their own error, committing nothing.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from vmstore import (
    ChecksumMismatchError,
    DownloadRequest,
    InvalidConfigError,
    OperationFailedError,
    PermissionDeniedError,
    Storage,
    UploadRequest,
    UploadResponse,
    _native,
)

from tests.support import InterruptAt, Interrupted, MiB, files_under, random_bytes, write_file

from .harness import (
    BackendHarness,
    Capability,
    HttpHarness,
    NfsHarness,
    PlainHttpHarness,
    S3Harness,
    kill_mid_transfer,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
MARKER = b"PLAINTEXT-MARKER-0123456789"

SCHEMES = {
    # name: (compression, encrypted)
    "zstd": ("zstd", False),
    "encrypted": (None, True),
    "zstd+encrypted": ("zstd", True),
}


def image_bytes(size: int) -> bytes:
    """Compressible bytes that look like a disk image's: text lines, a marker in every 64 KiB,
    a stretch of zeros and a stretch of noise."""
    lines = b"".join(
        b"block %08d of a filesystem image, inode table entry\n" % i for i in range(40000)
    )
    noise = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB, repeats (compressible far away)
    pattern = bytearray()
    while len(pattern) < size:
        pattern += MARKER + lines[: 64 * 1024 - len(MARKER)]
        pattern += bytes(16 * 1024) + noise[: 8 * 1024]
    return bytes(pattern[:size])


def image_size(backend: BackendHarness) -> int:
    """Several upload units (frames), the last one short."""
    return max(4 * MiB, 3 * backend.upload_unit) + 123


def encoded_store(backend: BackendHarness, encrypted: bool, key: bytes = KEY) -> Storage:
    return backend.open(encryption_key=key) if encrypted else backend.open()


def upload(
    store: Storage,
    backend: BackendHarness,
    source: Path,
    key: str,
    compression: str | None,
    progress: InterruptAt | None = None,
) -> UploadResponse:
    return store.upload(
        UploadRequest(
            str(source), backend.url(key), compression=compression, progress_callback=progress
        )
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_encoded_round_trip_reports_the_image_and_stores_frames(
    backend: BackendHarness, workdir: Path, scheme: str
) -> None:
    compression, encrypted = SCHEMES[scheme]
    data = image_bytes(image_size(backend))
    source = write_file(workdir / "disk.img", data)
    expected = hashlib.sha256(data).hexdigest()
    seen: list[tuple[int, int]] = []

    with encoded_store(backend, encrypted) as store:
        up = store.upload(
            UploadRequest(
                str(source),
                backend.url("disk.img"),
                compression=compression,
                progress_callback=lambda done, total: seen.append((done, total)),
            )
        )
        assert (up.checksum, up.size, up.bytes_transferred) == (expected, len(data), len(data))
        assert seen[-1] == (len(data), len(data))

        stored = backend.read_object("disk.img")
        assert stored is not None and stored != data
        if encrypted:
            assert MARKER not in stored
        if compression:
            assert len(stored) < len(data) // 2
        assert backend.stored_names() == {"disk.img"} | backend.companion_names("disk.img")
        record = json.loads(backend.read_object("disk.img.vmstore.json") or b"{}")["encoding"]
        assert len(record["frame_stored_lengths"]) > 1  # the download below reads several
        assert KEY.hex() not in json.dumps(record)
        if isinstance(backend, S3Harness):
            # S3's own FULL_OBJECT checksum is of the stored frames (validated by SeaweedFS).
            head = backend.client.head_object(
                Bucket=backend.bucket, Key=f"{backend.prefix}/disk.img", ChecksumMode="ENABLED"
            )
            # moto answers a 4-byte value of its own for CRC64NVME: not a CRC-64 to compare.
            if len(base64.b64decode(head.get("ChecksumCRC64NVME") or "")) == 8:
                crc = _native.crc64nvme(stored).to_bytes(8, "big")
                assert head["ChecksumCRC64NVME"] == base64.b64encode(crc).decode()

        meta = store.get_metadata(up.url)
        assert (meta.size, meta.checksum) == (len(data), expected)
        assert not any(key.startswith("vmstore") for key in meta.custom_metadata)

        seen.clear()
        dest = workdir / "imported.img"
        down = store.download(
            DownloadRequest(up.url, str(dest), progress_callback=lambda d, t: seen.append((d, t)))
        )
        assert dest.read_bytes() == data
        assert (down.checksum, down.content_length, down.bytes_transferred) == (
            expected,
            len(data),
            len(data),
        )
        assert seen[-1] == (len(data), len(data))
        assert all(total == len(data) for _done, total in seen)
        # expected_checksum means the image's SHA-256, encoded or not.
        again = store.download(
            DownloadRequest(up.url, str(workdir / "again.img"), expected_checksum=expected)
        )
        assert again.checksum == expected


def test_encoded_empty_and_tiny_images_round_trip(backend: BackendHarness, workdir: Path) -> None:
    with backend.open(encryption_key=KEY) as store:
        for size in (0, 1, 1000):
            data = image_bytes(size)
            source = write_file(workdir / f"s{size}.img", data)
            up = upload(store, backend, source, f"s{size}", "zstd")
            dest = workdir / f"back{size}.img"
            down = store.download(DownloadRequest(up.url, str(dest)))
            assert dest.read_bytes() == data
            assert down.content_length == size
            assert store.get_metadata(up.url).size == size


def test_encoded_stream_upload_round_trips(backend: BackendHarness, workdir: Path) -> None:
    data = image_bytes(image_size(backend))
    with (
        backend.open(encryption_key=KEY) as store,
        open(write_file(workdir / "disk.img", data), "rb") as stream,
    ):
        up = store.upload(
            UploadRequest(
                source_stream=stream, destination_url=backend.url("s"), compression="zstd"
            )
        )
        assert up.size == len(data)
        dest = workdir / "back.img"
        store.download(DownloadRequest(up.url, str(dest)))
        assert dest.read_bytes() == data


def test_wrong_key_is_refused_before_anything_is_written(
    backend: BackendHarness, workdir: Path
) -> None:
    data = image_bytes(image_size(backend))
    source = write_file(workdir / "disk.img", data)
    with backend.open(encryption_key=KEY) as store:
        up = upload(store, backend, source, "disk.img", "zstd")
    with (
        backend.open(encryption_key=OTHER_KEY) as other,
        pytest.raises(PermissionDeniedError) as info,
    ):
        other.download(DownloadRequest(up.url, str(workdir / "out.img")))
    assert KEY.hex() not in str(info.value) and OTHER_KEY.hex() not in str(info.value)
    assert files_under(workdir) == {"disk.img"}


def test_missing_key_is_refused_before_anything_is_written(
    backend: BackendHarness, workdir: Path
) -> None:
    source = write_file(workdir / "disk.img", image_bytes(2 * MiB))
    with backend.open(encryption_key=KEY) as store:
        up = upload(store, backend, source, "disk.img", None)
    with backend.open() as keyless, pytest.raises(InvalidConfigError):
        keyless.download(DownloadRequest(up.url, str(workdir / "out.img")))
    assert files_under(workdir) == {"disk.img"}


@pytest.mark.parametrize("scheme", ["zstd", "zstd+encrypted"])
def test_a_flipped_stored_byte_fails_and_commits_nothing(
    backend: BackendHarness, workdir: Path, scheme: str
) -> None:
    backend.require(Capability.TAMPER)
    compression, encrypted = SCHEMES[scheme]
    source = write_file(workdir / "disk.img", image_bytes(image_size(backend)))
    with encoded_store(backend, encrypted) as store:
        up = upload(store, backend, source, "disk.img", compression)
        backend.tamper("disk.img")
        dest = workdir / "out.img"
        with pytest.raises(ChecksumMismatchError):
            store.download(DownloadRequest(up.url, str(dest)))
    assert files_under(workdir) == {"disk.img"}


def assert_key_not_kept(state_dir: Path) -> None:
    """Resume journals and state files hold what a resume needs, never the key."""
    files = [p for p in state_dir.rglob("*") if p.is_file()]
    assert files, "the interrupted transfer left no resume state"
    for path in files:
        content = path.read_bytes()
        assert KEY not in content and KEY.hex().encode() not in content, path


def test_encoded_upload_resumes_after_an_interruption(
    backend: BackendHarness, workdir: Path, private_state_dir: Path
) -> None:
    backend.require(Capability.UPLOAD_RESUME)
    # Incompressible: every frame is stored whole (raw), so each fills an S3 part of its own
    # and the interruption leaves some parts stored and some not.
    data = random_bytes(image_size(backend), seed=91)
    source = write_file(workdir / "disk.img", data)
    with backend.open(encryption_key=KEY) as store:
        with pytest.raises(Interrupted):
            upload(store, backend, source, "disk.img", "zstd",
                   InterruptAt(backend.upload_unit))  # fmt: skip
        assert backend.read_object("disk.img") is None
        assert_key_not_kept(private_state_dir)
        up = upload(store, backend, source, "disk.img", "zstd")
        assert 0 < up.resumed_from <= len(data)
        assert up.bytes_transferred == len(data) - up.resumed_from
        dest = workdir / "back.img"
        down = store.download(DownloadRequest(up.url, str(dest)))
        assert dest.read_bytes() == data
        assert down.checksum == hashlib.sha256(data).hexdigest()


def test_encoded_upload_with_another_key_does_not_resume(
    backend: BackendHarness, workdir: Path
) -> None:
    backend.require(Capability.UPLOAD_RESUME)
    data = image_bytes(image_size(backend))
    source = write_file(workdir / "disk.img", data)
    with backend.open(encryption_key=KEY) as store, pytest.raises(Interrupted):
        upload(store, backend, source, "disk.img", None,
               InterruptAt(backend.upload_unit))  # fmt: skip
    with backend.open(encryption_key=OTHER_KEY) as other:
        up = upload(other, backend, source, "disk.img", None)
        assert up.resumed_from == 0
        dest = workdir / "back.img"
        other.download(DownloadRequest(up.url, str(dest)))
        assert dest.read_bytes() == data


def test_encoded_download_resumes_frame_by_frame(
    backend: BackendHarness, workdir: Path, private_state_dir: Path
) -> None:
    backend.require(Capability.DOWNLOAD_RESUME)
    # Eight frames or more, fetched one at a time: the interruption leaves some undone.
    data = image_bytes(max(4 * MiB, 8 * backend.upload_unit) + 123)
    source = write_file(workdir / "disk.img", data)
    with backend.open(encryption_key=KEY, concurrency=1) as store:
        up = upload(store, backend, source, "d", "zstd")
        dest = workdir / "imported.img"
        with pytest.raises(Interrupted):
            store.download(
                DownloadRequest(up.url, str(dest), progress_callback=InterruptAt(len(data) // 8))
            )
        assert not dest.exists()
        assert_key_not_kept(private_state_dir)
        assert KEY not in (workdir / "imported.img.vmstore-partial.state").read_bytes()
        down = store.download(DownloadRequest(up.url, str(dest)))
        assert 0 < down.resumed_from <= len(data)
        assert down.bytes_transferred == len(data) - down.resumed_from
        assert dest.read_bytes() == data
        assert files_under(workdir) == {"disk.img", "imported.img"}


def test_plain_upload_after_an_encoded_one_is_sent_again(
    backend: BackendHarness, workdir: Path
) -> None:
    data = image_bytes(2 * MiB)
    source = write_file(workdir / "disk.img", data)
    with backend.open(encryption_key=KEY) as store:
        upload(store, backend, source, "disk.img", "zstd")
    with backend.open() as plain:
        up = upload(plain, backend, source, "disk.img", None)
        assert up.bytes_transferred == len(data)
    assert backend.read_object("disk.img") == data


def test_unknown_compression_is_invalid_config() -> None:
    with pytest.raises(InvalidConfigError):
        UploadRequest("x", "nfs://y", compression="gzip")


def remove_record(backend: BackendHarness, key: str) -> None:
    """Delete the object's sidecar (its record) behind vmstore's back."""
    name = f"{key}.vmstore.json"
    if isinstance(backend, NfsHarness):
        (backend.mount / name).unlink()
    elif isinstance(backend, HttpHarness):
        (backend.served / name).unlink()
    elif isinstance(backend, PlainHttpHarness):
        with backend.server.lock:
            del backend.server.files[f"/{backend.area}/{name}"]
    elif isinstance(backend, S3Harness):
        backend.client.delete_object(Bucket=backend.bucket, Key=f"{backend.prefix}/{name}")
    else:
        pytest.skip(f"no way to remove a record on {backend.name}")


@pytest.mark.parametrize("scheme", ["zstd", "encrypted"])
def test_an_encoded_object_without_its_record_is_refused(
    backend: BackendHarness, workdir: Path, scheme: str
) -> None:
    compression, encrypted = SCHEMES[scheme]
    source = write_file(workdir / "disk.img", image_bytes(image_size(backend)))
    with encoded_store(backend, encrypted) as store:
        up = upload(store, backend, source, "disk.img", compression)
        remove_record(backend, "disk.img")
        with pytest.raises(OperationFailedError, match="record"):
            store.download(DownloadRequest(up.url, str(workdir / "out.img")))
    assert files_under(workdir) == {"disk.img"}


def test_resumed_encoded_upload_rewrites_frames_garbled_in_the_partial(
    backend: BackendHarness, workdir: Path
) -> None:
    if not isinstance(backend, NfsHarness):
        pytest.skip("the partial of an NFS upload is a file in the share")
    data = random_bytes(image_size(backend), seed=92)
    source = write_file(workdir / "disk.img", data)
    with backend.open(encryption_key=KEY) as store:
        with pytest.raises(Interrupted):
            upload(store, backend, source, "disk.img", "zstd", InterruptAt(len(data) // 2))
        (partial,) = backend.mount.glob("disk.img.vmstore-partial-*")
        garbled = bytearray(partial.read_bytes())
        garbled[100] ^= 0xFF  # inside the first frame, as a crash losing a page might
        partial.write_bytes(garbled)
        up = upload(store, backend, source, "disk.img", "zstd")
        assert up.resumed_from == 0  # the first frame did not verify: nothing reused
        dest = workdir / "back.img"
        store.download(DownloadRequest(up.url, str(dest)))
        assert dest.read_bytes() == data


def test_encoded_download_to_a_stream_gets_the_image_in_order(
    backend: BackendHarness, workdir: Path
) -> None:
    data = image_bytes(image_size(backend))
    source = write_file(workdir / "disk.img", data)
    with backend.open(encryption_key=KEY) as store:
        up = upload(store, backend, source, "disk.img", "zstd")
        sink = io.BytesIO()
        down = store.download(DownloadRequest(up.url, destination_stream=sink))
    assert sink.getvalue() == data
    assert (down.checksum, down.content_length) == (hashlib.sha256(data).hexdigest(), len(data))


def kill_encoded(backend: BackendHarness, mode: str, source: str, dest: str) -> None:
    """An encoded (zstd, encrypted) transfer in a child process, SIGKILLed once under way."""
    kill_mid_transfer(
        backend,
        mode,
        source,
        dest,
        stall_after=backend.upload_unit,
        encryption_key=KEY,
        compression="zstd",
    )


def test_encoded_transfers_resume_after_the_process_is_killed(
    backend: BackendHarness, workdir: Path
) -> None:
    backend.require(Capability.UPLOAD_RESUME)
    data = random_bytes(image_size(backend), seed=93)
    source = write_file(workdir / "disk.img", data)
    kill_encoded(backend, "upload", str(source), backend.url("disk.img"))
    assert backend.read_object("disk.img") is None
    with backend.open(encryption_key=KEY) as store:
        up = upload(store, backend, source, "disk.img", "zstd")
        assert 0 < up.resumed_from <= len(data)
        assert up.checksum == hashlib.sha256(data).hexdigest()
        dest = workdir / "back.img"
        kill_encoded(backend, "download", up.url, str(dest))
        assert not dest.exists()
        down = store.download(DownloadRequest(up.url, str(dest)))
        assert 0 < down.resumed_from <= len(data)
        assert dest.read_bytes() == data


# --- the image policy and the bandwidth limit hold for encoded transfers too -----------------


def qemu_img(*args: str | Path) -> None:
    result = subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_encoded_transfers_apply_the_image_policy(backend: BackendHarness, workdir: Path) -> None:
    images = workdir / "images"
    images.mkdir()
    qemu_img("create", "-q", "-f", "raw", images / "base.raw", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", images / "child.qcow2")
    child = images / "child.qcow2"
    with encoded_store(backend, encrypted=True) as store:
        with pytest.raises(InvalidConfigError) as from_file:
            upload(store, backend, child, "child.qcow2", "zstd")
        with child.open("rb") as stream, pytest.raises(InvalidConfigError) as from_stream:
            store.upload(
                UploadRequest(
                    source_stream=stream,
                    destination_url=backend.url("s.qcow2"),
                    compression="zstd",
                )
            )
        for refused in (from_file.value, from_stream.value):
            assert "base.raw" in refused.message and "allow_backing_file" in refused.message
        assert backend.stored_names() == set()

        up = store.upload(
            UploadRequest(
                str(child), backend.url("child.qcow2"), compression="zstd", allow_backing_file=True
            )
        )
        meta = store.get_metadata(up.url)
        assert (meta.image_format, meta.virtual_size) == ("qcow2", 1 * MiB)
        assert meta.size == child.stat().st_size

        destination = workdir / "dl" / "child.qcow2"
        with pytest.raises(InvalidConfigError) as refused:
            store.download(DownloadRequest(up.url, str(destination)))
        assert "base.raw" in refused.value.message
        assert not destination.exists() and files_under(workdir / "dl") == set()

        store.download(DownloadRequest(up.url, str(destination), allow_backing_file=True))
        assert destination.read_bytes() == child.read_bytes()


def test_encoded_transfers_keep_the_bandwidth_limit(backend: BackendHarness, workdir: Path) -> None:
    rate, size = 8 * MiB, 6 * MiB + 1
    data = random_bytes(size, seed=93)  # incompressible: the frames are as large as the image
    source = write_file(workdir / "disk.img", data)
    least = (size - max(MiB, rate // 8)) / rate
    with backend.open(encryption_key=KEY, max_bandwidth=rate) as store:
        started = time.monotonic()
        up = upload(store, backend, source, "disk.img", "zstd")
        up_seconds = time.monotonic() - started
        back = workdir / "back.img"
        started = time.monotonic()
        store.download(DownloadRequest(up.url, str(back)))
        down_seconds = time.monotonic() - started

    assert back.read_bytes() == data
    assert up_seconds >= least, f"encoded upload took {up_seconds:.3f} s < {least:.3f} s"
    assert down_seconds >= least, f"encoded download took {down_seconds:.3f} s < {least:.3f} s"
