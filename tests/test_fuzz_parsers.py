"""The parsers of untrusted input, fuzzed briefly (fuzz/targets.py, atheris) and pinned on the
inputs fuzzing found.

Each fuzz target runs in a subprocess for a bounded number of inputs (a few seconds; the seed
is fixed so CI is repeatable, VMSTORE_FUZZ_SEED picks another); ``fuzz/run.sh`` runs them
for longer. The contract: a parser returns the documented value (or ``None``) or raises a
StorageError, never another exception.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402  (fuzz/targets.py)

# Inputs per target in CI: each takes 1-4 s here; -max_total_time caps a slow machine.
RUNS = {
    "urls": 12_000,
    "sidecar": 40_000,
    "s3_state": 5_000,
    "download_state": 8_000,
    "http_headers": 25_000,
}


def test_every_target_has_a_ci_budget() -> None:
    assert set(RUNS) == set(targets.TARGETS)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(RUNS))
def test_fuzz_target_finds_nothing(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris (PyPI) is not installed")
    seed = os.environ.get("VMSTORE_FUZZ_SEED", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "fuzz_parsers.py"),
            name,
            str(tmp_path / "corpus"),
            f"-runs={RUNS[name]}",
            "-max_total_time=20",
            f"-seed={seed}",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert result.returncode == 0 and not crashes, (
        f"fuzz target {name} failed (replay: python fuzz/fuzz_parsers.py {name} <crash file>)"
        f"\n{result.stderr[-4000:]}"
    )
    assert "stat::number_of_executed_units" in result.stderr


# --- inputs fuzzing found, fixed on this branch ---------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://[::1/bucket/key",  # urlsplit: "Invalid IPv6 URL" (a raw ValueError)
        "http://[fe80::1/f",
        "HTTPS://../key",  # host ".." against endpoint ".": an empty virtual-hosted bucket
        "http://ok/\udc7a",  # a lone surrogate: no HTTP request can carry it
        "nfs://dir/\udc7a",  # ... nor a file name (surrogateescape covers \udc80-\udcff only)
        "/share/\ud800x",
    ],
)
def test_url_parsers_refuse_with_storage_errors(url: str) -> None:
    targets.check_urls(url, "/share", "bucket", "./\x00", False)
    targets.check_urls(url, targets.workspace().share, "", "http://127.0.0.1:9", True)


def test_an_unclosed_ipv6_endpoint_is_an_invalid_config() -> None:
    from vmstore.errors import InvalidConfigError
    from vmstore.urls import normalize_endpoint, parse_s3_url

    with pytest.raises(InvalidConfigError):
        normalize_endpoint("http://[::1")
    with pytest.raises(InvalidConfigError):
        parse_s3_url("https://h/b/k", endpoint="http://[::1")


def test_an_nfs_name_of_escaped_bytes_is_still_accepted() -> None:
    # \udc80-\udcff are what os.fsdecode makes of non-UTF-8 bytes: a real file name.
    from vmstore.urls import parse_nfs_url

    assert parse_nfs_url("nfs://dir/caf\udce9", ["/share"]) == "dir/caf\udce9"


@pytest.mark.parametrize(
    "content",
    [
        b"2`",  # a number, not an object: from_header's data.get raised AttributeError
        b"[1, 2]\n",
        b"null\n",
        b"[" * 100_000 + b"\n",  # RecursionError
        b'{"version": 2, "bucket": "b", "key": "k", "upload_id": "u", "token": "t", '
        b'"source": "s", "size": 1e999, "mtime_ns": 1, "part_size": 5, "checksum": "c"}\n',
        b'{"version": 2, "bucket": "b", "key": "k", "upload_id": "u", "token": "t", '
        b'"source": "s", "size": NaN, "mtime_ns": 1, "part_size": 5, "checksum": "c"}\n',
        targets._S3_SEEDS[0] + b'[1e999, "e", 1]\n' + b"[" * 100_000 + b"\n",
        b'{"version": 2, "completed": true, "size": 1e999}\n',
        b'{"upload_id": ' + b"[" * 100_000 + b"\n",
    ],
)
def test_s3_journal_readers_ignore_what_they_cannot_read(content: bytes) -> None:
    targets.check_s3_state(content)


def test_s3_journal_still_loads_its_parts_around_a_torn_line() -> None:
    with targets.private_state_dir():
        state_file = targets.s3_name("_StateFile")(
            "/fuzz/source.img", targets.S3Location("bucket", "key")
        )
        with open(state_file.path, "wb") as handle:
            handle.write(targets._S3_SEEDS[0] + b'[3, "e3", 1e999]\n[4, "e4", 4]\n')
        try:
            state = state_file.load()
        finally:
            os.remove(state_file.path)
    assert state is not None
    assert state.parts == {1: ('"e1"', 12345), 2: ('"e2"', 6789), 4: ("e4", 4)}


@pytest.mark.parametrize(
    "text", [b"[" * 100_000, b'{"sha256": ' + b"[" * 5000, b"\xff\xfe", "\udc80"]
)
def test_sidecar_reader_refuses_with_its_format_error(text: str | bytes) -> None:
    targets.check_sidecar(text, None, None, 0)


def test_the_seed_inputs_pass() -> None:
    pytest.importorskip("atheris", reason="atheris (PyPI) is not installed")
    for name, seeds in targets.SEEDS.items():
        for seed in seeds:
            targets.TARGETS[name](seed)


# --- found by fuzzing, fixed: each input that failed is a test ---


def test_a_superscript_retry_after_is_no_delay() -> None:
    # '²' is byte 0xB2 of a Latin-1 header: str.isdigit() says yes, float() says no.
    assert targets.http_name("_retry_after")("\xb2") is None


def test_a_superscript_content_length_is_no_size() -> None:
    head = targets.http_name("_Head").parse(targets._headers([("Content-Length", "\xb3")]))
    assert head.size is None


def test_a_superscript_retry_after_on_a_ranged_get_is_a_status_error() -> None:
    reader = targets.http_name("_ObjectReader")(
        targets._FakeTransport(
            targets._FakeResponse(503, targets._headers([("Retry-After", "\xb9")]), b"")
        ),
        "http://127.0.0.1:9/f",
        10,
        targets.http_name("_Validator")('"v1"', ""),
    )
    with pytest.raises(targets.http_name("HttpStatusError")):
        reader.read_range(0, 10)


def test_a_content_length_of_5000_digits_is_no_size() -> None:
    head = targets.http_name("_Head").parse(targets._headers([("Content-Length", "9" * 5000)]))
    assert head.size is None or head.size > 0


def test_a_deeply_nested_download_state_is_ignored(tmp_path: Path) -> None:
    from vmstore._download import _load_state

    path = tmp_path / "state.json"
    path.write_text("[" * 100_000)
    assert _load_state(str(path)) is None
    path.write_text(json.dumps({"done": [[1, 2]]}))
    assert _load_state(str(path)) == {"done": [[1, 2]]}
