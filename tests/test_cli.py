"""The `vmstore` command, run for real in subprocesses as an operator or a script would."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import MiB, random_bytes, sha256_bytes, write_file

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_PERMISSION_DENIED = 4
EXIT_CHECKSUM_MISMATCH = 6
EXIT_INVALID_CONFIG = 7

SECRET = "tok-never-print-me-8086"


class Cli:
    """Runs `vmstore ...` with a clean environment pointing at one NFS share."""

    def __init__(self, command: str, share: Path, cwd: Path) -> None:
        self.command = command
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VMSTORE_", "AWS_"))}
        self.env.update({"VMSTORE_TYPE": "nfs", "VMSTORE_ENDPOINT": str(share)})

    def __call__(
        self, *args: str | Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.command, *map(str, args)],
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def json(self, *args: str | Path, env: dict[str, str] | None = None) -> Any:
        result = self(*args, "--json", env=env)
        assert result.returncode == EXIT_OK, result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def cli(vmstore_cmd: str, share: Path, host: Path) -> Cli:
    return Cli(vmstore_cmd, share, host)


@pytest.fixture
def image(host: Path) -> tuple[Path, bytes]:
    data = random_bytes(2 * MiB + 77, seed=71)
    return write_file(host / "disk.qcow2", data), data


def assert_error_line(stderr: str, type_name: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("vmstore: error")]
    assert len(lines) == 1, stderr
    assert re.match(rf"^vmstore: error \({type_name}\): \S", lines[0]), lines[0]


def test_upload_with_json_prints_one_object_with_the_checksum(
    cli: Cli, share: Path, image: tuple[Path, bytes]
) -> None:
    source, data = image

    out = cli.json("upload", source, "nfs://vm-exports/disk.qcow2", "--metadata", "vm-name=vm-01")

    assert out["checksum"] == sha256_bytes(data)
    assert out["bytes_transferred"] == len(data)
    assert isinstance(out["url"], str)
    assert (share / "vm-exports" / "disk.qcow2").read_bytes() == data


def test_download_with_expected_checksum_writes_the_file(
    cli: Cli, host: Path, image: tuple[Path, bytes]
) -> None:
    source, data = image
    up = cli.json("upload", source, "nfs://disk.qcow2")
    dest = host / "imported.qcow2"

    out = cli.json("download", up["url"], dest, "--expected-checksum", up["checksum"])

    assert dest.read_bytes() == data
    assert out["checksum"] == sha256_bytes(data)
    assert out["bytes_transferred"] == len(data)


def test_stat_json_reports_size_checksum_and_metadata(cli: Cli, image: tuple[Path, bytes]) -> None:
    source, data = image
    up = cli.json(
        "upload",
        source,
        "nfs://disk.qcow2",
        "--metadata",
        "VM-Name=vm-01",
        "--metadata",
        "owner=team-a",
    )

    out = cli.json("stat", up["url"])

    assert out["size"] == len(data)
    assert out["checksum"] == sha256_bytes(data)
    assert out["custom_metadata"] == {"vm-name": "vm-01", "owner": "team-a"}
    assert dt.datetime.fromisoformat(out["last_modified"]).tzinfo is not None


def test_stat_without_json_shows_the_checksum_to_a_person(
    cli: Cli, image: tuple[Path, bytes]
) -> None:
    source, data = image
    cli("upload", source, "nfs://disk.qcow2")

    result = cli("stat", "nfs://disk.qcow2")

    assert result.returncode == EXIT_OK, result.stderr
    assert sha256_bytes(data) in result.stdout


def test_rm_removes_the_object_and_is_idempotent(
    cli: Cli, share: Path, image: tuple[Path, bytes]
) -> None:
    source, _data = image
    cli.json("upload", source, "nfs://disk.qcow2")

    first = cli("rm", "nfs://disk.qcow2")
    second = cli("rm", "nfs://disk.qcow2")

    assert (first.returncode, second.returncode) == (EXIT_OK, EXIT_OK), first.stderr + second.stderr
    assert list(share.iterdir()) == []
    assert cli("stat", "nfs://disk.qcow2").returncode == EXIT_NOT_FOUND


def test_checksum_agrees_with_sha256sum(cli: Cli, image: tuple[Path, bytes]) -> None:
    source, _data = image
    reference = subprocess.run(
        ["sha256sum", str(source)], capture_output=True, text=True, check=True
    ).stdout.split()[0]

    result = cli("checksum", source)

    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.split()[0] == reference


@pytest.mark.parametrize("position", ["after-command", "before-command"])
def test_backend_flags_work_without_environment(
    vmstore_cmd: str, share: Path, host: Path, image: tuple[Path, bytes], position: str
) -> None:
    source, data = image
    bare = Cli(vmstore_cmd, share, host)
    bare.env = {k: v for k, v in bare.env.items() if not k.startswith("VMSTORE_")}
    flags = ["--type", "nfs", "--endpoint", str(share)]
    args = ["upload", *flags] if position == "after-command" else [*flags, "upload"]

    result = bare(*args, source, "nfs://d.qcow2")

    assert result.returncode == EXIT_OK, result.stderr
    assert (share / "d.qcow2").read_bytes() == data


def test_flags_override_the_environment(
    cli: Cli, tmp_path: Path, image: tuple[Path, bytes]
) -> None:
    source, data = image
    other = tmp_path / "other-share"
    other.mkdir()

    result = cli("upload", "--endpoint", other, source, "nfs://d.qcow2")

    assert result.returncode == EXIT_OK, result.stderr
    assert (other / "d.qcow2").read_bytes() == data


def test_no_progress_output_when_stderr_is_not_a_terminal(
    cli: Cli, image: tuple[Path, bytes]
) -> None:
    source, _data = image

    result = cli("upload", source, "nfs://disk.qcow2")

    assert result.returncode == EXIT_OK, result.stderr
    assert "\r" not in result.stderr
    assert "ETA" not in result.stderr
    assert "%" not in result.stderr


def test_download_of_missing_object_exits_3_with_one_error_line(cli: Cli, host: Path) -> None:
    result = cli("download", "nfs://missing.qcow2", host / "x.qcow2")

    assert result.returncode == EXIT_NOT_FOUND
    assert_error_line(result.stderr, "NotFound")
    assert result.stdout == ""
    assert not (host / "x.qcow2").exists()


def test_upload_of_missing_file_exits_3(cli: Cli, host: Path) -> None:
    result = cli("upload", host / "missing.qcow2", "nfs://disk.qcow2")

    assert result.returncode == EXIT_NOT_FOUND
    assert_error_line(result.stderr, "NotFound")


def test_checksum_of_missing_file_exits_3(cli: Cli, host: Path) -> None:
    result = cli("checksum", host / "missing.qcow2")

    assert result.returncode == EXIT_NOT_FOUND


def test_download_with_wrong_checksum_exits_6_and_keeps_the_destination(
    cli: Cli, host: Path, image: tuple[Path, bytes]
) -> None:
    source, _data = image
    cli.json("upload", source, "nfs://disk.qcow2")
    dest = write_file(host / "imported.qcow2", b"yesterday's import")

    result = cli("download", "nfs://disk.qcow2", dest, "--expected-checksum", "0" * 64)

    assert result.returncode == EXIT_CHECKSUM_MISMATCH
    assert_error_line(result.stderr, "ChecksumMismatch")
    assert dest.read_bytes() == b"yesterday's import"


def test_missing_share_exits_7(cli: Cli, tmp_path: Path, image: tuple[Path, bytes]) -> None:
    source, _data = image

    result = cli(
        "upload", source, "nfs://disk.qcow2", env={"VMSTORE_ENDPOINT": str(tmp_path / "nope")}
    )

    assert result.returncode == EXIT_INVALID_CONFIG
    assert_error_line(result.stderr, "InvalidConfig")


def test_unknown_backend_type_exits_7(cli: Cli, image: tuple[Path, bytes]) -> None:
    source, _data = image

    result = cli("upload", source, "nfs://disk.qcow2", env={"VMSTORE_TYPE": "carrier-pigeon"})

    assert result.returncode == EXIT_INVALID_CONFIG


def test_path_outside_the_share_exits_4(cli: Cli, image: tuple[Path, bytes]) -> None:
    source, _data = image

    result = cli("upload", source, "nfs://../escaped.qcow2")

    assert result.returncode == EXIT_PERMISSION_DENIED
    assert_error_line(result.stderr, "PermissionDenied")


@pytest.mark.parametrize(
    "args", [(), ("frobnicate",), ("upload",)], ids=["none", "unknown", "short"]
)
def test_usage_errors_exit_2(cli: Cli, args: tuple[str, ...]) -> None:
    assert cli(*args).returncode == EXIT_USAGE


def test_error_output_never_contains_the_token(cli: Cli, host: Path) -> None:
    result = cli("download", "nfs://missing.qcow2", host / "x", env={"VMSTORE_TOKEN": SECRET})

    assert result.returncode == EXIT_NOT_FOUND
    assert SECRET not in result.stdout + result.stderr


def test_help_shows_an_example(cli: Cli) -> None:
    result = cli("--help")

    assert result.returncode == EXIT_OK
    assert "example" in result.stdout.lower()
    assert "vmstore upload" in result.stdout
    for command in ("upload", "download", "stat", "rm", "checksum"):
        assert command in result.stdout
