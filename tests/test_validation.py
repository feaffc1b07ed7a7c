"""Bad input is refused the same way for every backend, before any backend sees it:
requests (paths, metadata, content type, expected checksum) and URLs (S3 key length)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from vmstore import DownloadRequest, ErrorType, InvalidConfigError, UploadRequest
from vmstore.models import normalize_custom_metadata
from vmstore.urls import parse_s3_url


def test_nul_byte_in_a_source_path_is_invalid_config() -> None:
    # Was a raw ValueError from os.stat ("embedded null byte").
    with pytest.raises(InvalidConfigError) as caught:
        UploadRequest("disk\x00.img", "nfs://disk.img")

    assert caught.value.type is ErrorType.INVALID_CONFIG
    assert "NUL" in str(caught.value)


def test_nul_byte_in_a_destination_path_is_invalid_config() -> None:
    # Was OperationFailedError from the native writer.
    with pytest.raises(InvalidConfigError):
        DownloadRequest("nfs://disk.img", "out\x00.img")


@pytest.mark.parametrize(
    "metadata",
    [
        {"vm-name": "a\r\nx-amz-acl: public-read"},
        {"vm-name": "line\nbreak"},
        {"vm\rname": "v"},
        {"key": "nul\x00"},
        {"key": "tab\there"},
        {"key": "del\x7f"},
        {"key": "c1\x85"},
    ],
)
def test_control_characters_in_metadata_are_invalid_config(metadata: dict[str, str]) -> None:
    # On S3 these were retried and reported as NetworkError: a header cannot hold them.
    with pytest.raises(InvalidConfigError) as caught:
        normalize_custom_metadata(metadata)

    assert "control character" in str(caught.value)


def test_printable_unicode_metadata_is_kept() -> None:
    assert normalize_custom_metadata({"VM-Name": "Prüfung 01 · ok"}) == {
        "vm-name": "Prüfung 01 · ok"
    }


@pytest.mark.parametrize("content_type", ["text/plain\r\nx-evil: 1", "a\nb", "", "  "])
def test_control_characters_or_nothing_in_a_content_type_are_invalid_config(
    content_type: str,
) -> None:
    with pytest.raises(InvalidConfigError) as caught:
        UploadRequest("disk.img", "nfs://disk.img", content_type=content_type)

    assert "content_type" in str(caught.value)


@pytest.mark.parametrize("checksum", ["", "   ", "abc", "g" * 64])
def test_an_empty_or_malformed_expected_checksum_is_refused_for_every_backend(
    checksum: str,
) -> None:
    # "" was silently "not given" on S3 and HTTP, and refused on NFS.
    with pytest.raises(InvalidConfigError) as caught:
        DownloadRequest("s3://bucket/key", "out.img", expected_checksum=checksum)

    assert "expected_checksum" in str(caught.value)


def test_expected_checksum_in_another_tools_form_is_accepted() -> None:
    digest = "AB" * 32
    request = DownloadRequest("s3://b/k", destination_stream=io.BytesIO(), expected_checksum=digest)

    assert request.expected_checksum == digest  # kept as given; backends normalize it


def test_an_s3_key_of_1024_utf8_bytes_is_accepted_and_one_more_is_not() -> None:
    assert len(parse_s3_url("s3://bucket/" + "é" * 512).key.encode()) == 1024

    with pytest.raises(InvalidConfigError) as caught:
        parse_s3_url("s3://bucket/" + "é" * 512 + "x")

    assert "1024" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "fields"),
    [
        ("s3://bucket/" + "k" * 1025, {}),
        ("https://s3.example.com/bucket/" + "k" * 1025, {"endpoint": "https://s3.example.com"}),
        ("/" + "k" * 1025, {"default_bucket": "bucket"}),
    ],
)
def test_every_s3_url_form_refuses_a_key_over_1024_bytes(url: str, fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfigError):
        parse_s3_url(url, **fields)
