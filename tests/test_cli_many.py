"""`vmstore upload A B URL/` and `vmstore download URL1 URL2 DIR/`: several files in one run,
one progress view, a result per item, a non-zero exit when any item failed."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3_servers import S3Server, running_s3_server, unique_prefix
from tests.support import random_bytes, sha256_bytes, write_file

EXIT_NOT_FOUND = 3
EXIT_USAGE = 2


def _run(
    vmstore_cmd: str, cwd: Path, env: dict[str, str], *args: str | Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [vmstore_cmd, *map(str, args)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def nfs_env(share: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMSTORE_", "AWS_"))}
    env.update({"VMSTORE_TYPE": "nfs", "VMSTORE_ENDPOINT": str(share)})
    return env


def _disks(host: Path) -> dict[str, bytes]:
    made = {}
    for number, size in enumerate((200_001, 1, 700_000)):
        data = random_bytes(size, seed=number)
        write_file(host / f"disk-{number}.qcow2", data)
        made[f"disk-{number}.qcow2"] = data
    return made


def test_upload_of_several_files_to_a_prefix_lists_each_item_in_json(
    vmstore_cmd: str, host: Path, share: Path, nfs_env: dict[str, str]
) -> None:
    disks = _disks(host)
    result = _run(vmstore_cmd, host, nfs_env, "upload", *disks, "nfs://vm-01/", "--json")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["failed"] == 0
    assert [item["source"] for item in output["items"]] == list(disks)
    for item, (name, data) in zip(output["items"], disks.items(), strict=True):
        assert item["url"] == f"nfs://vm-01/{name}"
        assert item["checksum"] == sha256_bytes(data)
        assert (share / "vm-01" / name).read_bytes() == data


def test_a_missing_source_fails_the_run_but_the_others_are_stored(
    vmstore_cmd: str, host: Path, share: Path, nfs_env: dict[str, str]
) -> None:
    disks = _disks(host)
    first, *rest = disks
    names = [first, "absent.qcow2", *rest]
    result = _run(vmstore_cmd, host, nfs_env, "upload", *names, "nfs://vm-01/")
    assert result.returncode == EXIT_NOT_FOUND
    assert "absent.qcow2" in result.stderr and "error (NotFound)" in result.stderr
    for name, data in disks.items():
        assert (share / "vm-01" / name).read_bytes() == data
        assert f"{sha256_bytes(data)}  {name} -> nfs://vm-01/{name}" in result.stdout

    as_json = _run(vmstore_cmd, host, nfs_env, "upload", *names, "nfs://vm-02/", "--json")
    assert as_json.returncode == EXIT_NOT_FOUND
    output = json.loads(as_json.stdout)  # one object on stdout, failures inside it
    assert output["failed"] == 1
    assert output["items"][1]["error"]["type"] == "NotFound"
    assert "checksum" in output["items"][0] and "checksum" in output["items"][2]


def test_several_sources_need_a_destination_ending_in_a_slash(
    vmstore_cmd: str, host: Path, share: Path, nfs_env: dict[str, str]
) -> None:
    disks = _disks(host)
    result = _run(vmstore_cmd, host, nfs_env, "upload", *disks, "nfs://vm-01")
    assert result.returncode == EXIT_USAGE
    assert "ending in '/'" in result.stderr
    assert not (share / "vm-01").exists()


def test_one_source_and_a_trailing_slash_keeps_the_file_name(
    vmstore_cmd: str, host: Path, share: Path, nfs_env: dict[str, str]
) -> None:
    write_file(host / "only.raw", b"abc")
    result = _run(vmstore_cmd, host, nfs_env, "upload", "only.raw", "nfs://vm-01/")
    assert result.returncode == 0, result.stderr
    assert (share / "vm-01" / "only.raw").read_bytes() == b"abc"


def test_download_of_several_urls_into_a_directory(
    vmstore_cmd: str, host: Path, nfs_env: dict[str, str]
) -> None:
    disks = _disks(host)
    assert _run(vmstore_cmd, host, nfs_env, "upload", *disks, "nfs://vm-01/").returncode == 0
    urls = [f"nfs://vm-01/{name}" for name in disks]
    result = _run(vmstore_cmd, host, nfs_env, "download", *urls, "nfs://vm-01/gone", "in/",
                  "--json")  # fmt: skip
    assert result.returncode == EXIT_NOT_FOUND
    output = json.loads(result.stdout)
    assert output["failed"] == 1
    assert output["items"][-1]["error"]["type"] == "NotFound"
    for name, data in disks.items():
        assert (host / "in" / name).read_bytes() == data
    assert not (host / "in" / "gone").exists()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server("moto", tmp_path_factory.mktemp("moto-cli-many")) as server:
        yield server


def test_upload_of_two_disks_to_an_s3_prefix(
    vmstore_cmd: str, host: Path, moto: S3Server, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMSTORE_", "AWS_"))}
    env.update(
        {
            "VMSTORE_ENDPOINT": moto.endpoint,
            "AWS_ACCESS_KEY_ID": moto.access_key,
            "AWS_SECRET_ACCESS_KEY": moto.secret_key,
            "VMSTORE_STATE_DIR": str(tmp_path / "state"),
        }
    )
    write_file(host / "a.qcow2", a := random_bytes(300_000, seed=1))
    write_file(host / "b.qcow2", b := random_bytes(6 << 20, seed=2))
    prefix = f"s3://{moto.bucket}/{unique_prefix()}/vm-01/"
    result = _run(vmstore_cmd, host, env, "upload", "a.qcow2", "b.qcow2", prefix, "--json")
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)["items"]
    assert [item["url"] for item in items] == [prefix + "a.qcow2", prefix + "b.qcow2"]
    assert [item["checksum"] for item in items] == [sha256_bytes(a), sha256_bytes(b)]


def test_presign_prints_a_url_whose_download_never_prints_its_signature(
    vmstore_cmd: str, host: Path, moto: S3Server, tmp_path: Path
) -> None:
    from vmstore import StorageConfig, UploadRequest, new_storage

    data = random_bytes(1 << 20, seed=5)
    write_file(host / "root.qcow2", data)
    config = StorageConfig(type="s3", endpoint=moto.endpoint, bucket=moto.bucket,
                           access_key=moto.access_key, secret_key=moto.secret_key,
                           use_ssl=False)  # fmt: skip
    url = f"s3://{moto.bucket}/{unique_prefix()}/root.qcow2"
    with new_storage(config) as store:
        store.upload(UploadRequest(source_path=str(host / "root.qcow2"), destination_url=url))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMSTORE_", "AWS_"))}
    env["VMSTORE_STATE_DIR"] = str(tmp_path / "state")
    s3_env = {**env, "VMSTORE_ENDPOINT": moto.endpoint, "AWS_ACCESS_KEY_ID": moto.access_key,
              "AWS_SECRET_ACCESS_KEY": moto.secret_key}  # fmt: skip
    too_long = _run(vmstore_cmd, host, s3_env, "presign", url, "--expires-in", "8d")
    assert too_long.returncode == 7 and "expires_in" in too_long.stderr
    made = _run(vmstore_cmd, host, s3_env, "presign", url, "--expires-in", "5m")
    assert made.returncode == 0, made.stderr
    presigned = made.stdout.strip()
    signature = presigned.rpartition("X-Amz-Signature=")[2]
    assert len(signature) == 64
    result = _run(vmstore_cmd, host, env, "download", presigned, "out.qcow2", "--json",
                  "--verbose", "--expected-checksum", sha256_bytes(data))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (host / "out.qcow2").read_bytes() == data
    assert signature not in result.stdout + result.stderr
    assert json.loads(result.stdout)["url"] == presigned.partition("?")[0]
