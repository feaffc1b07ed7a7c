"""StorageConfig: defaults, validation that names the bad field, secrets kept out of sight."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import vmstore.config
from vmstore import ErrorType, InvalidConfigError, StorageConfig

SECRETS = {
    "access_key": "AKIAEXAMPLEACCESS77",
    "secret_key": "wJalrXUtnFEMI-secret-value-42",
    "session_token": "FQoGZXIvYXdzEXAMPLEsessiontoken",
    "token": "bearer-token-value-9000",
}


def test_defaults_are_the_documented_ones() -> None:
    config = StorageConfig(type="nfs")

    assert dataclasses.is_dataclass(config)
    assert (config.endpoint, config.bucket, config.region) == ("", "", "")
    assert (config.access_key, config.secret_key, config.session_token, config.token) == (
        "",
        "",
        "",
        "",
    )
    assert config.use_ssl is True
    assert config.insecure_skip_verify is False
    assert config.ca_bundle == ""
    assert config.timeout == 300.0
    assert config.max_retries == 3
    assert config.chunk_size is None
    assert config.concurrency == 4


@pytest.mark.parametrize("backend_type", ["s3", "minio", "http", "https", "nfs"])
def test_every_documented_backend_type_is_accepted(backend_type: str) -> None:
    assert StorageConfig(type=backend_type).type == backend_type


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("type", "ftp"),
        ("type", ""),
        ("chunk_size", -1),
        ("chunk_size", 0),
        ("chunk_size", 64 * 1024 - 1),
        ("chunk_size", "big"),
        ("concurrency", 0),
        ("concurrency", 65),
        ("concurrency", -4),
        ("max_retries", -1),
        ("timeout", -1.0),
        ("timeout", "soon"),
    ],
)
def test_bad_value_is_invalid_config_naming_the_field(field: str, value: Any) -> None:
    fields: dict[str, Any] = {"type": "nfs", field: value}

    with pytest.raises(InvalidConfigError) as caught:
        StorageConfig(**fields)

    assert caught.value.type is ErrorType.INVALID_CONFIG
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("chunk_size", 64 * 1024),
        ("chunk_size", 32 << 20),
        ("concurrency", 1),
        ("concurrency", 64),
        ("max_retries", 0),
    ],
)
def test_boundary_values_are_accepted(field: str, value: int) -> None:
    fields: dict[str, Any] = {"type": "nfs", field: value}

    assert getattr(StorageConfig(**fields), field) == value


def test_type_is_required() -> None:
    with pytest.raises(TypeError):
        StorageConfig()  # type: ignore[call-arg]


def test_repr_masks_every_secret_that_is_set() -> None:
    config = StorageConfig(type="s3", endpoint="http://127.0.0.1:9000", bucket="b", **SECRETS)

    text = repr(config)

    for field, secret in SECRETS.items():
        assert secret not in text
        assert f"{field}='***'" in text
    assert "http://127.0.0.1:9000" in text  # the rest stays visible for debugging
    assert all(secret not in str(config) for secret in SECRETS.values())


def test_repr_shows_unset_secrets_as_empty_not_masked() -> None:
    text = repr(StorageConfig(type="s3"))

    assert "'***'" not in text
    assert "secret_key=''" in text


def test_validation_error_never_contains_a_secret() -> None:
    with pytest.raises(InvalidConfigError) as caught:
        StorageConfig(type="s3", chunk_size=-5, **SECRETS)

    shown = f"{caught.value} {caught.value!r}"
    assert all(secret not in shown for secret in SECRETS.values())


def test_from_env_reads_vmstore_and_aws_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "VMSTORE_TYPE": "s3",
        "VMSTORE_ENDPOINT": "http://127.0.0.1:9000",
        "VMSTORE_BUCKET": "vm-exports",
        "VMSTORE_REGION": "eu-west-1",
        "VMSTORE_TOKEN": SECRETS["token"],
        "AWS_ACCESS_KEY_ID": SECRETS["access_key"],
        "AWS_SECRET_ACCESS_KEY": SECRETS["secret_key"],
        "AWS_SESSION_TOKEN": SECRETS["session_token"],
    }.items():
        monkeypatch.setenv(name, value)

    config = StorageConfig.from_env()

    assert (config.type, config.endpoint, config.bucket, config.region) == (
        "s3",
        "http://127.0.0.1:9000",
        "vm-exports",
        "eu-west-1",
    )
    assert config.token == SECRETS["token"]
    assert config.access_key == SECRETS["access_key"]
    assert config.secret_key == SECRETS["secret_key"]
    assert config.session_token == SECRETS["session_token"]


def test_from_env_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSTORE_TYPE", "nfs")
    monkeypatch.setenv("VMSTORE_ENDPOINT", "/mnt/from-env")

    config = StorageConfig.from_env(endpoint="/mnt/override")

    assert (config.type, config.endpoint) == ("nfs", "/mnt/override")


def test_from_env_validates_like_the_constructor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSTORE_TYPE", "carrier-pigeon")

    with pytest.raises(InvalidConfigError) as caught:
        StorageConfig.from_env()

    assert "type" in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("chunk_size", 1 << 40),  # aborted the process on NFS (allocation of the whole chunk)
        ("chunk_size", (5 << 30) + 1),
        ("timeout", float("inf")),  # a raw OverflowError on HTTP, a NetworkError on S3
        ("timeout", float("nan")),
        ("timeout", 86400.0 * 2),
        ("timeout", 10**400),
        ("timeout", 0),
        ("max_retries", 10**9),
        ("max_retries", 101),
        ("max_retries", 2.5),
    ],
)
def test_values_nothing_can_use_are_invalid_config_at_construction(field: str, value: Any) -> None:
    fields: dict[str, Any] = {"type": "s3", field: value}

    with pytest.raises(InvalidConfigError) as caught:
        StorageConfig(**fields)

    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("chunk_size", 5 << 30), ("timeout", 86400), ("timeout", 0.5), ("max_retries", 100)],
)
def test_largest_usable_values_are_accepted(field: str, value: int) -> None:
    fields: dict[str, Any] = {"type": "s3", field: value}

    assert getattr(StorageConfig(**fields), field) == value


@pytest.mark.parametrize(
    "field",
    ["endpoint", "bucket", "region", "access_key", "secret_key", "session_token", "token",
     "ca_bundle"],
)  # fmt: skip
def test_none_for_a_text_field_means_not_set(field: str) -> None:
    fields: dict[str, Any] = {"type": "http", field: None}

    assert getattr(StorageConfig(**fields), field) == ""


def test_a_nul_character_in_a_text_field_is_invalid_config() -> None:
    with pytest.raises(InvalidConfigError) as caught:
        StorageConfig(type="nfs", endpoint="/mnt/share\x00/x")

    assert "endpoint" in str(caught.value)


def test_config_does_not_import_the_storage_module() -> None:
    # The circle config.py <-> storage.py: config now asks the backend registry itself.
    source = Path(vmstore.config.__file__).read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import)
        for alias in node.names
    }

    assert "vmstore.storage" not in imported
    assert "vmstore._registry" in imported


def test_registry_keeps_its_public_import_paths() -> None:
    from vmstore.storage import backend_names, new_storage, register_backend

    assert callable(new_storage)
    assert "nfs" in backend_names()
    register_backend("test-config-backend", lambda config: None)  # type: ignore[arg-type,return-value]
    assert StorageConfig(type="test-config-backend").type == "test-config-backend"


def test_each_module_imports_on_its_own() -> None:
    for module in ("vmstore.config", "vmstore.storage", "vmstore._registry"):
        result = subprocess.run(
            [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr


# --- max_bandwidth (issue 9: the bandwidth limit) -------------------------------------------


def test_max_bandwidth_defaults_to_unlimited() -> None:
    assert StorageConfig(type="nfs").max_bandwidth is None


@pytest.mark.parametrize("value", [None, 0, 1, 100 << 20, (1 << 63) - 1])
def test_max_bandwidth_accepts_none_zero_and_positive_integers(value: int | None) -> None:
    assert StorageConfig(type="nfs", max_bandwidth=value).max_bandwidth == value


@pytest.mark.parametrize(
    "value", [-1, -(100 << 20), True, False, 1.5, 100.0, "100M", b"1", 1 << 63, [1]]
)
def test_bad_max_bandwidth_is_invalid_config_naming_the_field(value: Any) -> None:
    with pytest.raises(InvalidConfigError) as caught:
        StorageConfig(type="nfs", max_bandwidth=value)

    assert caught.value.type is ErrorType.INVALID_CONFIG
    assert "max_bandwidth" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("100M", 100 << 20), ("64k", 64 << 10), ("1GiB", 1 << 30), ("5000000", 5000000), ("0", 0)],
)
def test_max_bandwidth_from_env_takes_a_byte_size(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: int
) -> None:
    monkeypatch.setenv("VMSTORE_TYPE", "nfs")
    monkeypatch.setenv("VMSTORE_MAX_BANDWIDTH", text)

    assert StorageConfig.from_env().max_bandwidth == expected


def test_an_empty_max_bandwidth_variable_means_unlimited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSTORE_TYPE", "nfs")
    monkeypatch.setenv("VMSTORE_MAX_BANDWIDTH", "")

    assert StorageConfig.from_env().max_bandwidth is None


@pytest.mark.parametrize("text", ["fast", "-5M", "10 parsecs", "1.5M"])
def test_a_bad_max_bandwidth_variable_is_invalid_config_naming_it(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv("VMSTORE_TYPE", "nfs")
    monkeypatch.setenv("VMSTORE_MAX_BANDWIDTH", text)

    with pytest.raises(InvalidConfigError) as caught:
        StorageConfig.from_env()

    assert "VMSTORE_MAX_BANDWIDTH" in str(caught.value)


def test_the_flag_overrides_the_max_bandwidth_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSTORE_TYPE", "nfs")
    monkeypatch.setenv("VMSTORE_MAX_BANDWIDTH", "1M")

    assert StorageConfig.from_env(max_bandwidth=2 << 20).max_bandwidth == 2 << 20
