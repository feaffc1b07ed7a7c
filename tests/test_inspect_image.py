"""vmstore.inspect_image against `qemu-img info`, on images qemu-img made; and against
malformed input, since an image's header is whatever its maker (or a guest) wrote.

The cross-check compares what both tools read from the header: format, virtual size,
backing file name (relative and absolute), external data file, encryption, compression type,
cluster size, qcow2 version, vmdk create type. The robustness tests feed truncated headers,
absurd offsets and random or mutated bytes: the answer is an ImageInfo or a StorageError,
never another exception, a hang or a huge allocation.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vmstore import (
    ImageInfo,
    InvalidConfigError,
    NotFoundError,
    PermissionDeniedError,
    StorageError,
    inspect_image,
)
from vmstore._sidecar import Sidecar
from vmstore.images import (
    EARLY_BYTES,
    HEAD_BYTES,
    StreamGate,
    check_download_file,
    check_upload_file,
    check_upload_stream,
    inspect_image_bytes,
)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img not installed (Debian package qemu-utils)"
)

MiB = 1 << 20


def run(*command: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=120, check=False,
        cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def qemu_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    args: list[str | Path] = ["qemu-img", "info", "--output=json"]
    if fmt is not None:
        args += ["-f", fmt]
    info = json.loads(run(*args, path))
    assert isinstance(info, dict)
    return info


# name -> (qemu-img create arguments after the file name's directory is the cwd, qemu -f)
IMAGES: dict[str, tuple[list[str], str]] = {
    "qcow2-v2": (["-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "100M"], "qcow2"),
    "qcow2-v3": (["-f", "qcow2", "v3.qcow2", "1G"], "qcow2"),
    "qcow2-v3-cluster-2M": (["-f", "qcow2", "-o", "cluster_size=2M", "c2m.qcow2", "3G"], "qcow2"),
    "qcow2-backing-relative": (
        ["-f", "qcow2", "-b", "base.raw", "-F", "raw", "child.qcow2"], "qcow2"),
    "qcow2-backing-absolute": (
        ["-f", "qcow2", "-b", "{dir}/base.raw", "-F", "raw", "abs.qcow2"], "qcow2"),
    "qcow2-v2-backing": (
        ["-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw", "v2child.qcow2"],
        "qcow2"),
    "qcow2-data-file": (["-f", "qcow2", "-o", "data_file=data.raw", "df.qcow2", "32M"], "qcow2"),
    "qcow2-luks": (
        ["--object", "secret,id=s,data=x", "-f", "qcow2", "-o",
         "encrypt.format=luks,encrypt.key-secret=s", "enc.qcow2", "16M"], "qcow2"),
    "qcow2-zstd": (["-f", "qcow2", "-o", "compression_type=zstd", "z.qcow2", "16M"], "qcow2"),
    "vmdk-monolithicSparse": (
        ["-f", "vmdk", "-o", "subformat=monolithicSparse", "s.vmdk", "100M"], "vmdk"),
    "vmdk-streamOptimized": (
        ["-f", "vmdk", "-o", "subformat=streamOptimized", "so.vmdk", "100M"], "vmdk"),
    "vpc-fixed": (["-f", "vpc", "-o", "subformat=fixed", "f.vhd", "100M"], "vpc"),
    "vpc-dynamic": (["-f", "vpc", "-o", "subformat=dynamic", "d.vhd", "100M"], "vpc"),
    "vhdx": (["-f", "vhdx", "x.vhdx", "100M"], "vhdx"),
    "raw": (["-f", "raw", "r.raw", "5M"], "raw"),
}  # fmt: skip

FORMAT_NAMES = {"vpc": "vhd"}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Every image of IMAGES, made by qemu-img in one directory (with base.raw beside)."""
    where = tmp_path_factory.mktemp("images")
    run("qemu-img", "create", "-q", "-f", "raw", where / "base.raw", "8M")
    out: dict[str, tuple[Path, str]] = {}
    for name, (args, fmt) in IMAGES.items():
        args = [a.replace("{dir}", str(where)) for a in args]
        run("qemu-img", "create", "-q", *args, cwd=where)
        file_name = next(a for a in reversed(args) if "." in a and "=" not in a and "/" not in a)
        out[name] = (where / file_name, fmt)
    return out


def _specific(info: dict[str, Any]) -> dict[str, Any]:
    data = info.get("format-specific", {}).get("data", {})
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("name", list(IMAGES))
def test_inspect_agrees_with_qemu_img_info(made: dict[str, tuple[Path, str]], name: str) -> None:
    path, fmt = made[name]
    theirs = qemu_info(path, fmt)
    specific = _specific(theirs)

    ours = inspect_image(path)

    assert ours.format == FORMAT_NAMES.get(fmt, fmt)
    assert ours.virtual_size == theirs["virtual-size"]
    assert ours.backing_file == theirs.get("backing-filename")
    assert ours.data_file == specific.get("data-file")
    assert ours.encrypted == bool(theirs.get("encrypted", False))
    if fmt == "qcow2":
        assert ours.cluster_size == theirs["cluster-size"]
        assert ours.compression_type == specific["compression-type"]
        assert ours.version == {"0.10": 2, "1.1": 3}[specific["compat"]]
        assert ours.encryption == specific.get("encrypt", {}).get("format")
        assert ours.corrupt == specific.get("corrupt", False)
        assert ours.backing_format == theirs.get("backing-filename-format")
    if fmt == "vmdk":
        assert ours.subformat == specific["create-type"]
        assert ours.cluster_size == specific["extents"][0]["cluster-size"]
        assert (ours.compression_type == "deflate") == specific["extents"][0].get(
            "compressed", False
        )
    if fmt == "vpc":
        assert ours.subformat == name.removeprefix("vpc-")
    assert ours.refers_to_other_files == (
        theirs.get("backing-filename") is not None or "data-file" in specific
    )


def test_the_backing_file_is_the_header_string_relative_or_absolute(
    made: dict[str, tuple[Path, str]],
) -> None:
    assert inspect_image(made["qcow2-backing-relative"][0]).backing_file == "base.raw"
    absolute = made["qcow2-backing-absolute"][0]
    assert inspect_image(absolute).backing_file == str(absolute.parent / "base.raw")
    assert inspect_image(made["qcow2-v2-backing"][0]).other_files == ("base.raw",)
    assert inspect_image(made["qcow2-v3"][0]).backing_file is None


WRAPPERS: dict[str, list[str]] = {
    "gzip": ["gzip", "-k", "-f"],
    "xz": ["xz", "-k", "-f"],
    "zstd": ["zstd", "-q", "-k", "-f"],
}
SUFFIX = {"gzip": ".gz", "xz": ".xz", "zstd": ".zst"}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("name", ["qcow2-backing-relative", "qcow2-data-file", "vhdx", "raw"])
def test_a_compressed_copy_reports_its_wrapper_and_what_is_inside(
    made: dict[str, tuple[Path, str]], tmp_path: Path, wrapper: str, name: str
) -> None:
    if shutil.which(WRAPPERS[wrapper][0]) is None:
        pytest.skip(f"{WRAPPERS[wrapper][0]} not installed")
    source = tmp_path / made[name][0].name
    shutil.copyfile(made[name][0], source)
    run(*WRAPPERS[wrapper], source)
    wrapped = Path(str(source) + SUFFIX[wrapper])
    plain = inspect_image(source)

    info = inspect_image(wrapped)

    assert info.wrapper == wrapper
    assert info.format == plain.format
    assert info.backing_file == plain.backing_file
    assert info.data_file == plain.data_file
    assert info.refers_to_other_files == plain.refers_to_other_files
    # A raw image is known whole only when it decompresses within the inspected head.
    expected_size = plain.virtual_size if plain.format != "raw" else None
    assert info.virtual_size == expected_size
    # The start of the compressed stream says the same as the file.
    assert inspect_image_bytes(wrapped.read_bytes()[:HEAD_BYTES]) == info


def test_a_stream_optimized_vmdk_with_data_agrees_with_qemu_img(tmp_path: Path) -> None:
    raw = _write(tmp_path / "data.raw", random.Random(5).randbytes(3 * MiB))
    vmdk = tmp_path / "so.vmdk"
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
        raw, vmdk)  # fmt: skip
    theirs = qemu_info(vmdk, "vmdk")
    ours = inspect_image(vmdk)
    assert (ours.format, ours.virtual_size, ours.subformat, ours.compression_type) == (
        "vmdk",
        theirs["virtual-size"],
        "streamOptimized",
        "deflate",
    )


def test_qcow2_dirty_and_corrupt_bits_are_reported(
    made: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    data = bytearray(made["qcow2-v3"][0].read_bytes())
    data[72:80] = (1 | 2).to_bytes(8, "big")
    info = inspect_image(_write(tmp_path / "dirty.qcow2", bytes(data)))
    assert (info.dirty, info.corrupt, info.features) == (True, True, ("dirty", "corrupt"))
    assert qemu_info(tmp_path / "dirty.qcow2", "qcow2")["format-specific"]["data"]["corrupt"]


def test_a_small_compressed_raw_image_has_its_size_known(tmp_path: Path) -> None:
    data = b"\x01" * 100_000
    path = tmp_path / "small.raw.gz"
    path.write_bytes(gzip.compress(data))
    info = inspect_image(path)
    assert (info.format, info.wrapper, info.virtual_size) == ("raw", "gzip", len(data))


@pytest.mark.parametrize(
    "name", ["qcow2-v3", "qcow2-backing-relative", "qcow2-data-file", "qcow2-luks",
             "vmdk-monolithicSparse", "vpc-dynamic", "vhdx"],
)  # fmt: skip
def test_the_head_of_a_stream_says_what_the_file_says(
    made: dict[str, tuple[Path, str]], name: str
) -> None:
    path = made[name][0]
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    size = path.stat().st_size
    assert inspect_image_bytes(head, size=size) == inspect_image(path)
    assert inspect_image_bytes(head) == inspect_image(path)


def test_a_raw_or_fixed_vhd_stream_head_leaves_what_it_cannot_see_unknown(
    made: dict[str, tuple[Path, str]],
) -> None:
    fixed = made["vpc-fixed"][0]
    with fixed.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    # The footer of a fixed vhd is at its end, which a stream's head does not reach.
    assert inspect_image_bytes(head) == ImageInfo(format="raw", virtual_size=None)
    assert inspect_image_bytes(head, size=fixed.stat().st_size).virtual_size == fixed.stat().st_size
    whole = fixed.read_bytes()
    assert inspect_image_bytes(whole, size=len(whole)).format == "vhd"


# --- files that are not images, or not there ----------------------------------------------


def test_missing_unreadable_and_non_regular_paths_map_to_the_shared_error_types(
    tmp_path: Path,
) -> None:
    with pytest.raises(NotFoundError):
        inspect_image(tmp_path / "missing.qcow2")
    with pytest.raises(NotFoundError):
        inspect_image(tmp_path / "missing" / "x.qcow2")
    with pytest.raises(InvalidConfigError):
        inspect_image(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def inspect_fifo() -> None:
        try:
            inspect_image(fifo)
        except StorageError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=inspect_fifo, daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "inspecting a FIFO blocked"
    assert len(outcome) == 1 and isinstance(outcome[0], InvalidConfigError)
    assert inspect_image(_write(tmp_path / "empty", b"")) == ImageInfo("raw", 0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_image_is_permission_denied(made: dict[str, tuple[Path, str]],
                                                  tmp_path: Path) -> None:  # fmt: skip
    path = tmp_path / "locked.qcow2"
    shutil.copyfile(made["qcow2-v3"][0], path)
    path.chmod(0)
    with pytest.raises(PermissionDeniedError):
        inspect_image(path)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- crafted headers: what a guest could write into its raw disk ---------------------------


def _qcow2_naming(backing: bytes, *, size: int = 1 << 30) -> bytes:
    header = bytearray(64 * 1024)
    header[0:4] = b"QFI\xfb"
    header[4:8] = (2).to_bytes(4, "big")
    header[8:16] = (512).to_bytes(8, "big")
    header[16:20] = len(backing).to_bytes(4, "big")
    header[20:24] = (16).to_bytes(4, "big")
    header[24:32] = size.to_bytes(8, "big")
    header[512 : 512 + len(backing)] = backing
    return bytes(header)


def test_a_raw_disk_whose_guest_wrote_a_qcow2_header_is_seen_as_naming_host_files(
    tmp_path: Path,
) -> None:
    disk = _write(tmp_path / "guest.raw", _qcow2_naming(b"/etc/shadow") + bytes(1 << 20))
    info = inspect_image(disk)
    assert (info.format, info.backing_file) == ("qcow2", "/etc/shadow")
    with pytest.raises(InvalidConfigError, match="/etc/shadow"):
        check_upload_file(str(disk), allow=False)
    assert check_upload_file(str(disk), allow=True) == info


def test_a_vmdk_descriptor_naming_host_files_as_extents_refers_to_them(tmp_path: Path) -> None:
    text = (
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        b'createType="monolithicFlat"\n\n# Extent description\n'
        b'RW 2048 FLAT "/dev/sda" 0\nRW 2048 FLAT "/etc/shadow" 0\n'
    )
    info = inspect_image(_write(tmp_path / "d.vmdk", text))
    assert info.format == "vmdk"
    assert info.subformat == "monolithicFlat"
    assert info.extents == ("/dev/sda", "/etc/shadow")
    assert info.virtual_size == 4096 * 512
    assert info.refers_to_other_files


def test_a_differencing_vhd_reports_its_parent(made: dict[str, tuple[Path, str]],
                                               tmp_path: Path) -> None:  # fmt: skip
    data = bytearray(made["vpc-dynamic"][0].read_bytes())
    for footer in (0, len(data) - 512):
        data[footer + 60 : footer + 64] = (4).to_bytes(4, "big")
    header = int.from_bytes(data[16:24], "big")
    name = "C:\\vms\\parent.vhd".encode("utf-16-be")
    data[header + 64 : header + 64 + len(name)] = name
    info = inspect_image(_write(tmp_path / "diff.vhd", bytes(data)))
    assert (info.format, info.subformat, info.backing_file) == (
        "vhd",
        "differencing",
        "C:\\vms\\parent.vhd",
    )


def _vhdx_file_parameters_offset(data: bytes) -> int:
    """Where a vhdx's File Parameters item is (region table -> metadata table -> item)."""
    table = 192 * 1024
    metadata_guid = bytes.fromhex("06A27C8B90479A4BB8FE575F050F886E")
    parameters_guid = bytes.fromhex("3767A1CA36FA434DB3B633F0AA44E76B")
    count = int.from_bytes(data[table + 8 : table + 12], "little")
    for i in range(count):
        entry = data[table + 16 + 32 * i : table + 48 + 32 * i]
        if entry[:16] == metadata_guid:
            meta = int.from_bytes(entry[16:24], "little")
            entries = int.from_bytes(data[meta + 10 : meta + 12], "little")
            for j in range(entries):
                item = data[meta + 32 + 32 * j : meta + 64 + 32 * j]
                if item[:16] == parameters_guid:
                    return meta + int.from_bytes(item[16:20], "little")
    raise AssertionError("no file parameters")


def test_a_vhdx_with_a_parent_but_no_locator_needs_another_file(
    made: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    data = bytearray(made["vhdx"][0].read_bytes())
    at = _vhdx_file_parameters_offset(bytes(data))
    flags = int.from_bytes(data[at + 4 : at + 8], "little") | 2
    data[at + 4 : at + 8] = flags.to_bytes(4, "little")
    info = inspect_image(_write(tmp_path / "diff.vhdx", bytes(data)))
    assert (info.subformat, info.needs_other_file, info.refers_to_other_files) == (
        "differencing",
        True,
        True,
    )


# --- malformed input -------------------------------------------------------------------------


def _must_be_info_or_storage_error(call: Callable[[], ImageInfo]) -> ImageInfo | StorageError:
    try:
        return call()
    except StorageError as exc:
        return exc


@pytest.mark.parametrize("name", [n for n in IMAGES if n not in ("raw",)])
def test_truncated_headers_give_an_error_or_an_answer_never_a_crash(
    made: dict[str, tuple[Path, str]], tmp_path: Path, name: str
) -> None:
    data = made[name][0].read_bytes()[: 512 * 1024]
    cuts = sorted({0, 1, 4, 8, 71, 72, 103, 104, 511, 512, 1023, 1024, 4096, 65536, 200_000})
    for cut in cuts:
        part = data[:cut]
        path = _write(tmp_path / "cut", part)
        for outcome in (
            _must_be_info_or_storage_error(lambda p=path: inspect_image(p)),
            _must_be_info_or_storage_error(lambda b=part: inspect_image_bytes(b, size=len(b))),
        ):
            if isinstance(outcome, StorageError):
                assert isinstance(outcome, InvalidConfigError), outcome
                assert "truncated" in outcome.message or "past" in outcome.message, outcome


ABSURD_QCOW2_FIELDS = [
    ("backing offset past the cluster", 8, 8, 1 << 40),
    ("backing offset at the end of u64", 8, 8, (1 << 64) - 1),
    ("backing name 4 GiB long", 16, 4, (1 << 32) - 1),
    ("cluster bits 63", 20, 4, 63),
    ("header length 4 GiB", 100, 4, (1 << 32) - 1),
    ("header length 8", 100, 4, 8),
    ("encryption method 7", 32, 4, 7),
    ("version 99", 4, 4, 99),
]


@pytest.mark.parametrize(("what", "at", "width", "value"), ABSURD_QCOW2_FIELDS,
                         ids=[f[0] for f in ABSURD_QCOW2_FIELDS])  # fmt: skip
def test_absurd_qcow2_header_fields_are_refused_with_a_clear_message(
    made: dict[str, tuple[Path, str]], tmp_path: Path, what: str, at: int, width: int, value: int
) -> None:
    data = bytearray(made["qcow2-backing-relative"][0].read_bytes())
    data[at : at + width] = value.to_bytes(width, "big")
    path = _write(tmp_path / "bad.qcow2", bytes(data))
    with pytest.raises(InvalidConfigError, match="qcow2") as refused:
        inspect_image(path)
    assert str(path) in refused.value.message
    with pytest.raises(InvalidConfigError, match="cannot be read"):
        check_download_file(str(path), "nfs://x", "dest", allow=False)


def test_a_qcow2_extension_longer_than_the_header_area_is_refused(
    made: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    data = bytearray(made["qcow2-data-file"][0].read_bytes())
    at = int.from_bytes(data[100:104], "big")  # the first extension follows the header
    data[at + 4 : at + 8] = (1 << 31).to_bytes(4, "big")
    with pytest.raises(InvalidConfigError, match="extension"):
        inspect_image(_write(tmp_path / "bad.qcow2", bytes(data)))


@pytest.mark.parametrize(
    ("name", "at", "width", "value", "order"),
    [
        ("vmdk-monolithicSparse", 28, 8, (1 << 63) // 256, "little"),  # descriptor offset
        ("vmdk-monolithicSparse", 36, 8, 1 << 40, "little"),  # descriptor size
        ("vmdk-monolithicSparse", 12, 8, (1 << 64) - 1, "little"),  # capacity
        ("vpc-dynamic", 16, 8, 1 << 62, "big"),  # dynamic header offset
        ("vpc-dynamic", 60, 4, 9, "big"),  # disk type
        ("vhdx", 192 * 1024 + 8, 4, 1 << 30, "little"),  # region entries
    ],
)
def test_absurd_offsets_in_other_formats_are_refused(
    made: dict[str, tuple[Path, str]], tmp_path: Path, name: str, at: int, width: int,
    value: int, order: Any,
) -> None:  # fmt: skip
    data = bytearray(made[name][0].read_bytes())
    data[at : at + width] = value.to_bytes(width, order)
    with pytest.raises(InvalidConfigError):
        inspect_image(_write(tmp_path / "bad", bytes(data)))


def test_random_and_mutated_headers_give_an_image_info_or_a_storage_error(
    made: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    rng = random.Random(20261202)
    seeds = [made[name][0].read_bytes()[: 300 * 1024] for name in IMAGES if name != "raw"]
    path = tmp_path / "fuzz"
    answers = errors = 0
    for round_number in range(3000):
        if round_number % 5 == 0:
            data = bytearray(rng.randbytes(rng.choice([0, 3, 100, 600, 70_000])))
            magic = rng.choice([b"QFI\xfb", b"KDMV", b"vhdxfile", b"conectix", b"\x1f\x8b", b""])
            data[: len(magic)] = magic
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 12)):
                # Mostly the header fields, sometimes anywhere.
                at = rng.randrange(128) if rng.random() < 0.7 else rng.randrange(len(data))
                data[at] = rng.randrange(256)
            if rng.random() < 0.3:
                del data[rng.randrange(len(data) + 1) :]
        blob = bytes(data)
        whole = (
            _must_be_info_or_storage_error(lambda b=blob: inspect_image(_write(path, b)))
            if round_number % 10 == 0
            else _must_be_info_or_storage_error(lambda b=blob: inspect_image_bytes(b, size=len(b)))
        )
        head = _must_be_info_or_storage_error(lambda b=blob: inspect_image_bytes(b))
        for outcome in (whole, head):
            if isinstance(outcome, ImageInfo):
                answers += 1
                assert outcome.format in ("qcow2", "vmdk", "vhd", "vhdx", "raw")
            else:
                errors += 1
    assert answers and errors  # both outcomes happened, so the loop exercised both paths


# --- the policy's stream hooks -----------------------------------------------------------------


class _ReadOnly:
    """A stream with read() only, that hands out at most 1000 bytes per call (a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1, /) -> bytes:
        return self._data.read(min(size, 1000) if size >= 0 else 1000)


@pytest.mark.parametrize("size", [0, 10, HEAD_BYTES - 1, HEAD_BYTES, HEAD_BYTES + 12345])
def test_an_inspected_upload_stream_still_yields_every_byte_in_order(size: int) -> None:
    data = random.Random(size).randbytes(size)
    for stream in (io.BytesIO(data), _ReadOnly(data)):
        replay, info = check_upload_stream(stream, allow=False)
        assert info is not None and info.format == "raw"
        out = bytearray()
        buffer = bytearray(300_000)
        while True:
            if isinstance(stream, io.BytesIO):
                count = replay.read(300_000)
                if not count:
                    break
                out += count
            else:
                got = replay.readinto(memoryview(buffer))  # type: ignore[attr-defined]
                if not got:
                    break
                out += buffer[:got]
        assert bytes(out) == data


def test_a_stream_naming_a_backing_file_is_refused_before_it_is_passed_on() -> None:
    with pytest.raises(InvalidConfigError, match="/etc/shadow"):
        check_upload_stream(io.BytesIO(_qcow2_naming(b"/etc/shadow")), allow=False)
    _replay, info = check_upload_stream(io.BytesIO(_qcow2_naming(b"/etc/shadow")), allow=True)
    assert info is not None and info.backing_file == "/etc/shadow"


def test_the_download_stream_gate_holds_the_head_until_it_was_checked(
    made: dict[str, tuple[Path, str]],
) -> None:
    received: list[bytes] = []
    data = random.Random(3).randbytes(HEAD_BYTES + 5000)
    gate = StreamGate(received.append, "s3://b/k", len(data))
    gate(data[:1000])
    gate(memoryview(data)[1000 : EARLY_BYTES - 1])
    assert received == []  # nothing reaches the consumer before the header was checked
    gate(data[EARLY_BYTES - 1 : EARLY_BYTES + 10])  # raw: decided from the first 64 KiB
    assert b"".join(received) == data[: EARLY_BYTES + 10]
    gate(data[EARLY_BYTES + 10 :])
    gate.close()
    assert b"".join(received) == data

    # A vhdx's tables lie further in: held until the whole head is there.
    vhdx = made["vhdx"][0].read_bytes()
    held: list[bytes] = []
    vhdx_gate = StreamGate(held.append, "s3://b/v", len(vhdx))
    vhdx_gate(vhdx[: HEAD_BYTES - 1])
    assert held == []
    vhdx_gate(vhdx[HEAD_BYTES - 1 :])
    vhdx_gate.close()
    assert b"".join(held) == vhdx

    # A qcow2 naming a backing file is refused as soon as its header is there.
    refused: list[bytes] = []
    bad = StreamGate(refused.append, "s3://b/k", None)
    with pytest.raises(InvalidConfigError, match="nothing was written"):
        bad(_qcow2_naming(b"base.img") + bytes(EARLY_BYTES))
    assert refused == []
    small: list[bytes] = []
    short = StreamGate(small.append, "s3://b/k", None)
    short(_qcow2_naming(b"base.img")[:3000])
    with pytest.raises(InvalidConfigError):
        short.close()
    assert small == []


def test_the_sidecar_keeps_the_image_record() -> None:
    sidecar = Sidecar(sha256="a" * 64, size=5, image={"format": "qcow2", "virtual_size": 1 << 30})
    again = Sidecar.from_json(sidecar.to_json())
    assert again.image == {"format": "qcow2", "virtual_size": 1 << 30}
    assert Sidecar.from_json(Sidecar(sha256="a" * 64, size=5).to_json()).image is None
    odd = json.loads(sidecar.to_json())
    odd["image"] = {"format": 3}
    assert Sidecar.from_json(json.dumps(odd)).image is None  # ignored, the checksum still read


# --- the command line ----------------------------------------------------------------------


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMSTORE_", "AWS_"))}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return subprocess.run(
        [sys.executable, "-m", "vmstore.cli", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False, cwd=cwd, env=env,
    )  # fmt: skip


def test_cli_inspect_prints_the_header_as_text_and_as_json(
    made: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    child = made["qcow2-backing-relative"][0]
    text = _cli("inspect", child, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    lines = dict(line.split(":", 1) for line in text.stdout.splitlines())
    assert lines["format"].strip() == "qcow2"
    assert lines["backing_file"].strip() == "base.raw"
    assert lines["refers_to_other_files"].strip() == "True"

    as_json = _cli("inspect", "--json", made["vhdx"][0], cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    fields = json.loads(as_json.stdout)
    assert (fields["format"], fields["virtual_size"], fields["backing_file"]) == (
        "vhdx",
        100 * MiB,
        None,
    )
    missing = _cli("inspect", tmp_path / "nope.qcow2", cwd=tmp_path)
    assert missing.returncode == 3, missing.stderr


def test_cli_upload_and_download_refuse_a_backing_file_unless_allowed(
    made: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    child = made["qcow2-backing-relative"][0]
    backend = ("--type", "nfs", "--endpoint", share)
    refused = _cli("upload", child, "nfs://c.qcow2", *backend, cwd=tmp_path)
    assert refused.returncode == 7, refused.stderr
    assert "--allow-backing-file" in refused.stderr
    assert not (share / "c.qcow2").exists()

    allowed = _cli("upload", child, "nfs://c.qcow2", "--allow-backing-file", *backend,
                   cwd=tmp_path)  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    stat_out = _cli("stat", "nfs://c.qcow2", "--json", *backend, cwd=tmp_path)
    assert json.loads(stat_out.stdout)["image_format"] == "qcow2"

    dest = tmp_path / "dl.qcow2"
    refused_down = _cli("download", "nfs://c.qcow2", dest, *backend, cwd=tmp_path)
    assert refused_down.returncode == 7, refused_down.stderr
    assert not dest.exists()
    allowed_down = _cli("download", "nfs://c.qcow2", dest, "--allow-backing-file", *backend,
                        cwd=tmp_path)  # fmt: skip
    assert allowed_down.returncode == 0, allowed_down.stderr
    assert dest.read_bytes() == child.read_bytes()
    assert stat.S_ISREG(dest.stat().st_mode)
