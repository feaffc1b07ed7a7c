"""The frame stage on its own (vmstore._codec, vmstore._native.FrameCodec): the key setting,
the key file, the record, and the pieces the pipelines put together."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from vmstore import (
    ChecksumMismatchError,
    InvalidConfigError,
    PermissionDeniedError,
    StorageConfig,
    _native,
)
from vmstore._codec import (
    Encoder,
    Encoding,
    Encryption,
    decoder_for,
    encode_parts,
    group_frames,
    read_key_file,
)
from vmstore._sidecar import Sidecar, SidecarFormatError

KEY = bytes(range(32))


def crc64(data: bytes) -> int:
    source = _native.UploadSource.stream(io.BytesIO(data))
    source.next_part(max(len(data), 1))
    return source.crc64nvme()


def test_encryption_key_takes_raw_bytes_or_hex_and_is_never_shown() -> None:
    raw = StorageConfig(type="nfs", endpoint="/tmp", encryption_key=KEY)
    hexed = StorageConfig(type="nfs", endpoint="/tmp", encryption_key=f"  {KEY.hex().upper()}\n")
    assert raw.encryption_key == hexed.encryption_key == KEY
    assert KEY.hex() not in repr(raw) and "encryption_key='***'" in repr(raw)
    assert "encryption_key=None" in repr(StorageConfig(type="nfs", endpoint="/tmp"))


@pytest.mark.parametrize("bad", [b"short", "ab" * 31, "zz" * 32, 12345, bytes(33)])
def test_a_malformed_key_is_invalid_config_without_its_value(bad: object) -> None:
    with pytest.raises(InvalidConfigError) as info:
        StorageConfig(type="nfs", endpoint="/tmp", encryption_key=bad)  # type: ignore[arg-type]
    assert "encryption_key" in str(info.value)
    assert str(bad) not in str(info.value)


def test_key_file_holds_hex_or_raw_bytes(tmp_path: Path) -> None:
    (tmp_path / "hex").write_text(f"\n {KEY.hex()} \n")
    (tmp_path / "raw").write_bytes(KEY)
    (tmp_path / "bad").write_text("not a key at all")
    assert read_key_file(str(tmp_path / "hex")) == KEY
    assert read_key_file(str(tmp_path / "raw")) == KEY
    with pytest.raises(InvalidConfigError) as info:
        read_key_file(str(tmp_path / "bad"))
    assert "not a key" not in str(info.value)
    with pytest.raises(InvalidConfigError):
        read_key_file(str(tmp_path / "missing"))


def test_record_round_trips_and_never_holds_the_key() -> None:
    encoder = Encoder("zstd", KEY)
    parts = list(_parts(b"x" * 3000 + bytes(5000), 2048))
    frames = list(encode_parts(parts, encoder, concurrency=2))
    encoding = encoder.encoding()
    assert len(frames) == len(encoding.frames) == 4
    assert Encoding.from_dict(json.loads(json.dumps(encoding.to_dict()))) == encoding
    text = json.dumps(encoding.to_dict())
    assert KEY.hex() not in text and "salt" in text and "key_check" in text
    assert encoding.plain_size == 8000
    assert encoding.stored_size == sum(f.stored_length for f in frames)


@pytest.mark.parametrize(
    "change",
    [
        {"format": "other"},
        {"version": 2},
        {"compression": "gzip"},
        {"frame_stored_lengths": []},
        {"frame_plain_lengths": [[100, 9]]},
        {"plain_size": 1},
        {"frame_stored_lengths": [1, 1, 1, 1]},
    ],
)
def test_a_malformed_record_is_refused(change: dict[str, object]) -> None:
    encoder = Encoder("zstd", None)
    list(encode_parts(_parts(bytes(8000), 2048), encoder, concurrency=1))
    data = {**encoder.encoding().to_dict(), **change}
    with pytest.raises(ValueError):
        Encoding.from_dict(data)


def test_sidecar_keeps_the_record_and_binds_by_the_stored_size() -> None:
    encoding = Encoding("zstd", None, ((1000, 120), (500, 80)))
    sidecar = Sidecar(sha256="a" * 64, size=1500, etag="e", encoding=encoding)
    back = Sidecar.from_json(sidecar.to_json())
    assert back.encoding == encoding and back.size == 1500
    assert back.describes(size=200, etag="e")
    assert not back.describes(size=1500, etag="e")
    broken = json.loads(sidecar.to_json())
    broken["size"] = 7
    with pytest.raises(SidecarFormatError):
        Sidecar.from_json(json.dumps(broken))


def test_decoder_refuses_a_missing_or_wrong_key_up_front() -> None:
    encoder = Encoder(None, KEY)
    list(encode_parts(_parts(b"secret", 10), encoder, concurrency=1))
    encoding = encoder.encoding()
    with pytest.raises(InvalidConfigError):
        decoder_for(encoding, None, "nfs://x")
    with pytest.raises(PermissionDeniedError):
        decoder_for(encoding, bytes(32), "nfs://x")
    decoder_for(encoding, KEY, "nfs://x")


def test_every_upload_gets_its_own_salt_and_a_part_encrypts_the_same_twice() -> None:
    a, b = Encoder(None, KEY), Encoder(None, KEY)
    assert isinstance(a.encryption, Encryption) and isinstance(b.encryption, Encryption)
    assert a.encryption.salt != b.encryption.salt
    fa = a.encode(1, 0, b"same bytes", True)
    fb = b.encode(1, 0, b"same bytes", True)
    assert fa.data != fb.data
    # A resumed upload (same salt) sends a part again as the same bytes (AES-GCM-SIV).
    again = Encoder(None, KEY, salt=a.encryption.salt).encode(1, 0, b"same bytes", True)
    assert again.data == fa.data


def test_frames_decode_only_at_their_own_place() -> None:
    encoder = Encoder("zstd", KEY)
    frames = list(encode_parts(_parts(b"abc" * 5000, 4096), encoder, concurrency=2))
    decoder = decoder_for(encoder.encoding(), KEY, "nfs://x")
    first, second = frames[0], frames[1]
    assert first.data is not None and second.data is not None
    assert decoder.decode(first.data, 0, 0, 4096, False) == (b"abc" * 5000)[:4096]
    with pytest.raises(ChecksumMismatchError):
        decoder.decode(second.data, 0, 0, 4096, False)
    flipped = bytearray(first.data)
    flipped[-3] ^= 1
    with pytest.raises(ChecksumMismatchError):
        decoder.decode(bytes(flipped), 0, 0, 4096, False)


def test_only_the_final_frame_is_marked_last_and_an_empty_source_is_one_frame() -> None:
    encoder = Encoder(None, None)
    frames = list(encode_parts(_parts(bytes(10), 4), encoder, concurrency=3))
    flags = [_native.parse_frame_header(f.data or b"")[0] & 0x04 for f in frames]
    assert flags == [0, 0, 0x04]
    empty = Encoder(None, KEY)
    (only,) = encode_parts(iter(()), empty, concurrency=1)
    assert only.length == 0 and empty.encoding().frames[0][0] == 0


def test_grouped_parts_are_large_enough_and_their_crcs_combine() -> None:
    encoder = Encoder("zstd", None)
    data = bytes(range(256)) * 400 + b"tail"
    frames = list(encode_parts(_parts(data, 1000), encoder, concurrency=2))
    groups = list(group_frames(iter(frames), first_number=3, min_size=600))
    assert [g.number for g in groups] == list(range(3, 3 + len(groups)))
    assert all(len(g.data) >= 600 for g in groups[:-1])
    assert sum(g.length for g in groups) == len(data)
    for group in groups:
        assert group.crc64nvme == crc64(group.data)
    stored = b"".join(g.data for g in groups)
    assert encoder.stored_crc64nvme() == crc64(stored)


def _parts(data: bytes, size: int) -> list[_native.SourcePart]:
    source = _native.UploadSource.stream(io.BytesIO(data))
    parts = []
    while (part := source.next_part(size)) is not None:
        parts.append(part)
    return parts


VECTOR_FRAME = bytes.fromhex(
    "564d53460106000000000000000000000000000000000000000000000000000000000000"
    "0000001400000000000000241233110c46b7cd171b8f54ae85ae3c4844e2882ff2a71dd3"
    "92777d37508ab88f90082e3c"
)


def test_the_format_test_vector_of_docs_format_md() -> None:
    key, salt = bytes(range(32)), bytes(range(32, 64))
    codec = _native.FrameCodec(key=key, salt=salt)
    frame = codec.encode(b"vmstore test vector\n", 0, 0, True)
    assert frame.data == VECTOR_FRAME
    assert _native.frame_key_check(key, salt).hex() == (
        "01305ddb52bb321f671228bc1deae7af516821747b6a5b7f6309fbe7e4e7f97b"
    )


def test_frames_agree_with_an_independent_aes_gcm_siv_and_hkdf() -> None:
    """The frame layout of docs/FORMAT.md, rebuilt with the `cryptography` package (its
    AES-GCM-SIV is OpenSSL's, an implementation independent of vmstore's RustCrypto one)."""
    aead = pytest.importorskip("cryptography.hazmat.primitives.ciphers.aead")
    hkdf = pytest.importorskip("cryptography.hazmat.primitives.kdf.hkdf")
    hashes = pytest.importorskip("cryptography.hazmat.primitives.hashes")
    key, salt, prefix = bytes(range(32)), bytes(range(32, 64)), bytes.fromhex("a1b2c3d4")
    plain = b"vmstore test vector\n" * 50
    frame = _native.FrameCodec(key=key, salt=salt, nonce_prefix=prefix).encode(
        plain, 7, 4096, False
    )
    head = frame.data[:48]
    frame_key = hkdf.HKDF(hashes.SHA256(), 32, salt, b"vmstore/v1/frame-key").derive(key)
    nonce = prefix + (7).to_bytes(8, "big")
    if not hasattr(aead, "AESGCMSIV"):
        pytest.skip("this cryptography has no AES-GCM-SIV")
    assert aead.AESGCMSIV(frame_key).decrypt(nonce, frame.data[48:], salt + head) == plain
    assert head[:6] == b"VMSF\x01\x02"
    assert int.from_bytes(head[16:24], "big") == 7
    assert int.from_bytes(head[24:32], "big") == 4096
    assert int.from_bytes(head[32:40], "big") == len(plain)
    assert int.from_bytes(head[40:48], "big") == len(plain) + 16
