"""The `vmstore` command, run for real in subprocesses as an operator, a script or a
Kubernetes controller would: on a terminal (a pty), with stderr going to a pod log (a pipe),
and in pipelines through stdin and stdout."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

from tests.s3_servers import S3Server, free_port, running_s3_server, unique_prefix
from tests.support import MiB, random_bytes, sha256_bytes, write_file

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_PERMISSION_DENIED = 4
EXIT_NETWORK_ERROR = 5
EXIT_CHECKSUM_MISMATCH = 6
EXIT_INVALID_CONFIG = 7
EXIT_OPERATION_FAILED = 8
EXIT_DESTINATION_EXISTS = 10
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

SECRET = "tok-never-print-me-8086"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
def _without_backend_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("VMSTORE_", "AWS_"))}


class Cli:
    """Runs `vmstore ...` with a clean environment pointing at one NFS share."""

    def __init__(self, command: str, share: Path, cwd: Path) -> None:
        self.command = command
        self.cwd = cwd
        self.env = _without_backend_environment()
        self.env.update({"VMSTORE_TYPE": "nfs", "VMSTORE_ENDPOINT": str(share)})

    def argv(self, *args: str | Path) -> list[str]:
        return [self.command, *map(str, args)]

    def environment(self, env: dict[str, str] | None = None) -> dict[str, str]:
        return {**self.env, **(env or {})}

    def __call__(
        self, *args: str | Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            cwd=self.cwd,
            env=self.environment(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def binary(
        self, *args: str | Path, env: dict[str, str] | None = None, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """The same, with stdin and stdout as bytes: for images piped in and out."""
        return subprocess.run(
            self.argv(*args),
            cwd=self.cwd,
            env=self.environment(env),
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            timeout=120,
            check=False,
        )

    def json(self, *args: str | Path, env: dict[str, str] | None = None) -> Any:
        result = self(*args, "--json", env=env)
        assert result.returncode == EXIT_OK, result.stderr
        return json.loads(result.stdout)

    def start(self, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            cwd=self.cwd,
            env=self.environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )


def _default_sigint() -> None:
    """SIGINT at its default in the child, as in a terminal: a test run started in the
    background (``cmd &`` in a script) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler, so Ctrl-C would not reach the command under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def cli(vmstore_cmd: str, share: Path, host: Path) -> Cli:
    return Cli(vmstore_cmd, share, host)


@pytest.fixture
def image(host: Path) -> tuple[Path, bytes]:
    data = random_bytes(2 * MiB + 77, seed=71)
    return write_file(host / "disk.qcow2", data), data


def sparse_image(path: Path, *, data: bytes, hole: int) -> Path:
    """``data``, a hole of ``hole`` bytes, ``data`` again: hashing the hole takes the core
    about a second per GiB on this machine, long enough to watch progress move, while the
    file occupies only its data on disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.seek(len(data) + hole)
        f.write(data)
    return path


@pytest.fixture
def slow_image(host: Path) -> Path:
    return sparse_image(host / "slow.raw", data=random_bytes(4 * MiB, seed=5), hole=768 * MiB)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("vmstore: error")]


def assert_error_line(stderr: str, label: str) -> str:
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert re.match(rf"^vmstore: error \({label}\): \S", lines[0]), lines[0]
    return lines[0]


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def strictly_json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` parsed as JSON (fails on the first line that is not)."""
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line on stderr: {line!r}\n{text}")
    return events


# --- results: --json everywhere, the same keys for the same facts -----------------------


def test_upload_with_json_prints_one_object_with_the_checksum(
    cli: Cli, share: Path, image: tuple[Path, bytes]
) -> None:
    source, data = image

    out = cli.json("upload", source, "nfs://vm-exports/disk.qcow2", "--metadata", "vm-name=vm-01")

    assert out["checksum"] == sha256_bytes(data)
    assert out["bytes_transferred"] == len(data)
    assert out["size"] == len(data)
    assert out["url"] == "nfs://vm-exports/disk.qcow2"
    assert out["source"] == str(source)
    assert out["resumed_from"] == 0
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


def test_every_command_names_the_same_facts_with_the_same_keys(
    cli: Cli, host: Path, image: tuple[Path, bytes]
) -> None:
    source, data = image
    dest = host / "imported.qcow2"

    up = cli.json("upload", source, "nfs://vm-exports/disk.qcow2")
    down = cli.json("download", "nfs://vm-exports/disk.qcow2", dest)
    stat = cli.json("stat", "nfs://vm-exports/disk.qcow2")
    local = cli.json("checksum", source)
    removed = cli.json("rm", "nfs://vm-exports/disk.qcow2")

    digest = sha256_bytes(data)
    assert [r["checksum"] for r in (up, down, stat, local)] == [digest] * 4
    assert [r["size"] for r in (up, down, stat, local)] == [len(data)] * 4
    assert [r["url"] for r in (up, down, stat, removed)] == ["nfs://vm-exports/disk.qcow2"] * 4
    assert down["destination"] == str(dest)
    assert up["source"] == local["source"] == str(source)
    for transfer in (up, down):
        assert transfer["bytes_transferred"] == len(data)
        assert transfer["resumed_from"] == 0
    assert "content_length" not in down and "destination_path" not in down


def test_json_may_come_before_the_command(cli: Cli, image: tuple[Path, bytes]) -> None:
    source, data = image

    result = cli("--json", "upload", source, "nfs://disk.qcow2")

    assert result.returncode == EXIT_OK, result.stderr
    assert json.loads(result.stdout)["checksum"] == sha256_bytes(data)


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
    assert first.stdout == second.stdout == ""
    assert list(share.iterdir()) == []
    assert cli("stat", "nfs://disk.qcow2").returncode == EXIT_NOT_FOUND


def test_checksum_agrees_with_sha256sum(cli: Cli, image: tuple[Path, bytes]) -> None:
    source, _data = image
    reference = subprocess.run(
        ["sha256sum", str(source)], capture_output=True, text=True, check=True
    ).stdout.split()[0]

    result = cli("checksum", source)

    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout == f"{reference}  {source}\n"


# --- which backend, and messages in the user's words -------------------------------------


@pytest.mark.parametrize("position", ["after-command", "before-command"])
def test_backend_flags_work_without_environment(
    vmstore_cmd: str, share: Path, host: Path, image: tuple[Path, bytes], position: str
) -> None:
    source, data = image
    bare = Cli(vmstore_cmd, share, host)
    bare.env = _without_backend_environment()
    flags = ["--type", "nfs", "--endpoint", str(share)]
    args = ["upload", *flags] if position == "after-command" else [*flags, "upload"]

    result = bare(*args, source, "nfs://d.qcow2")

    assert result.returncode == EXIT_OK, result.stderr
    assert (share / "d.qcow2").read_bytes() == data


def test_an_nfs_url_selects_the_nfs_backend_without_type(
    cli: Cli, share: Path, image: tuple[Path, bytes]
) -> None:
    source, data = image
    cli.env.pop("VMSTORE_TYPE")

    out = cli.json("upload", source, "nfs://vm-exports/d.qcow2")

    assert out["url"] == "nfs://vm-exports/d.qcow2"
    assert (share / "vm-exports" / "d.qcow2").read_bytes() == data


def test_an_nfs_url_without_an_endpoint_names_the_flag_and_the_variable(
    cli: Cli, image: tuple[Path, bytes]
) -> None:
    source, _data = image
    cli.env = _without_backend_environment()

    result = cli("upload", source, "nfs://d.qcow2")

    assert result.returncode == EXIT_INVALID_CONFIG
    line = assert_error_line(result.stderr, "InvalidConfig")
    assert "--endpoint" in line and "VMSTORE_ENDPOINT" in line
    assert "StorageConfig" not in result.stderr


def test_a_url_without_a_scheme_and_no_type_asks_for_type(
    cli: Cli, image: tuple[Path, bytes]
) -> None:
    source, _data = image
    cli.env.pop("VMSTORE_TYPE")

    result = cli("upload", source, "vm-exports/d.qcow2")

    assert result.returncode == EXIT_INVALID_CONFIG
    line = assert_error_line(result.stderr, "InvalidConfig")
    assert "--type" in line and "VMSTORE_TYPE" in line


def test_an_http_url_selects_the_http_backend_without_type(cli: Cli) -> None:
    cli.env = _without_backend_environment()
    # Nothing listens there: a network error proves the HTTP backend tried to connect.
    url = f"http://127.0.0.1:{free_port()}/exports/disk.qcow2"

    result = cli("stat", url, "--max-retries", "0", "--timeout", "5")

    assert result.returncode == EXIT_NETWORK_ERROR, result.stderr
    assert_error_line(result.stderr, "NetworkError")


@pytest.fixture(scope="module")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server("rclone", tmp_path_factory.mktemp("rclone")) as server:
        yield server


def test_an_s3_url_selects_the_s3_backend_without_type(
    vmstore_cmd: str, rclone_s3: S3Server, share: Path, host: Path, image: tuple[Path, bytes]
) -> None:
    source, data = image
    s3 = Cli(vmstore_cmd, share, host)
    s3.env = {
        **_without_backend_environment(),
        "VMSTORE_ENDPOINT": rclone_s3.endpoint,
        "AWS_ACCESS_KEY_ID": rclone_s3.access_key,
        "AWS_SECRET_ACCESS_KEY": rclone_s3.secret_key,
    }
    url = f"s3://{rclone_s3.bucket}/{unique_prefix()}/disk.qcow2"

    up = s3.json("upload", source, url)
    stat = s3.json("stat", url)
    down = s3.json("download", url, host / "back.qcow2")

    assert up["url"] == stat["url"] == down["url"] == url
    assert up["checksum"] == stat["checksum"] == down["checksum"] == sha256_bytes(data)
    assert (host / "back.qcow2").read_bytes() == data


def test_flags_override_the_environment(
    cli: Cli, tmp_path: Path, image: tuple[Path, bytes]
) -> None:
    source, data = image
    other = tmp_path / "other-share"
    other.mkdir()

    result = cli("upload", "--endpoint", other, source, "nfs://d.qcow2")

    assert result.returncode == EXIT_OK, result.stderr
    assert (other / "d.qcow2").read_bytes() == data


@pytest.mark.parametrize(
    ("flags", "env", "named", "not_named"),
    [
        (["--concurrency", "100"], {}, "--concurrency", "VMSTORE_CONCURRENCY"),
        ([], {"VMSTORE_CONCURRENCY": "100"}, "VMSTORE_CONCURRENCY", "--concurrency"),
        (["--chunk-size", "1k"], {}, "--chunk-size", "VMSTORE_CHUNK_SIZE"),
        ([], {"VMSTORE_TIMEOUT": "0"}, "VMSTORE_TIMEOUT", "--timeout"),
    ],
    ids=["flag", "environment", "chunk-size-flag", "timeout-variable"],
)
def test_a_bad_setting_is_named_the_way_the_user_set_it(
    cli: Cli,
    image: tuple[Path, bytes],
    flags: list[str],
    env: dict[str, str],
    named: str,
    not_named: str,
) -> None:
    source, _data = image

    result = cli("upload", *flags, source, "nfs://d.qcow2", env=env)

    assert result.returncode == EXIT_INVALID_CONFIG
    line = assert_error_line(result.stderr, "InvalidConfig")
    assert named in line
    assert not_named not in line
    assert "StorageConfig" not in line


def test_a_bad_expected_checksum_is_named_as_the_flag(cli: Cli, image: tuple[Path, bytes]) -> None:
    source, _data = image
    cli.json("upload", source, "nfs://disk.qcow2")

    result = cli("download", "nfs://disk.qcow2", "x.qcow2", "--expected-checksum", "abc")

    assert result.returncode == EXIT_INVALID_CONFIG
    line = assert_error_line(result.stderr, "InvalidConfig")
    assert "--expected-checksum 'abc'" in line and "expected_checksum" not in line


def test_a_stream_longer_than_its_size_names_the_flag_and_stores_nothing(
    cli: Cli, share: Path
) -> None:
    result = cli.binary("upload", "-", "nfs://piped.raw", "--size", "1k", stdin=bytes(5000))

    assert result.returncode == EXIT_INVALID_CONFIG
    line = assert_error_line(result.stderr.decode(), "InvalidConfig")
    assert "--size" in line and "size_hint" not in line
    assert not (share / "piped.raw").exists()


# --- progress ---------------------------------------------------------------------------


def test_a_quick_transfer_logs_one_done_line_when_stderr_is_not_a_terminal(
    cli: Cli, image: tuple[Path, bytes]
) -> None:
    source, _data = image

    result = cli("upload", source, "nfs://disk.qcow2")

    assert result.returncode == EXIT_OK, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    progress = [line for line in result.stderr.splitlines() if "upload" in line]
    assert len(progress) == 1, result.stderr
    assert re.match(rf"^vmstore: upload {re.escape(str(source))}: done, 2\.0 MiB in ", progress[0])


def test_a_long_transfer_logs_a_plain_line_every_interval_when_stderr_is_a_pipe(
    cli: Cli, slow_image: Path
) -> None:
    result = cli("upload", slow_image, "nfs://slow.raw", "--progress-interval", "0.2")

    assert result.returncode == EXIT_OK, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("vmstore: upload")]
    moving = [line for line in lines if "ETA" in line]
    assert len(moving) >= 2, result.stderr
    percents = [float(re.search(r": (\d+\.\d)%, ", line).group(1)) for line in moving]  # type: ignore[union-attr]
    assert percents == sorted(percents) and 0 < percents[0] < 100
    for line in moving:
        assert re.search(r"\d+\.\d [KMG]iB / 776\.0 MiB, (\d+\.\d [KMG]iB|--)/s, ETA ", line), line
    assert "done, 776.0 MiB in" in lines[-1]


def test_json_progress_is_one_object_per_line_on_stderr(cli: Cli, slow_image: Path) -> None:
    size = slow_image.stat().st_size

    result = cli(
        "upload",
        slow_image,
        "nfs://slow.raw",
        "--json",
        "--progress",
        "json",
        "--progress-interval",
        "0.2",
    )

    assert result.returncode == EXIT_OK, result.stderr
    events = strictly_json_lines(result.stderr)
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) >= 2
    for event in progress:
        assert set(event) >= {"transferred", "total", "rate", "eta"}
        assert event["total"] == size
    transferred = [e["transferred"] for e in progress]
    assert transferred == sorted(transferred) and transferred[-1] == size
    assert any(e["rate"] and e["rate"] > 0 and e["eta"] is not None for e in progress[:-1])
    done = [e for e in events if e["event"] == "done"]
    assert done == [
        {
            "event": "done",
            "size": size,
            "bytes_transferred": size,
            "resumed_from": 0,
            "elapsed": done[0]["elapsed"],
        }
    ]
    assert json.loads(result.stdout)["size"] == size


def test_json_progress_turns_warnings_into_json_too(cli: Cli, image: tuple[Path, bytes]) -> None:
    source, _data = image

    # The test share is not NFS: the backend warns about it, through the logging module.
    result = cli("upload", source, "nfs://disk.qcow2", "--progress", "json")

    assert result.returncode == EXIT_OK, result.stderr
    events = strictly_json_lines(result.stderr)
    logs = [e for e in events if e["event"] == "log"]
    assert logs and all(e["level"] == "warning" and e["message"] for e in logs)


def test_progress_mode_comes_from_the_environment_too(cli: Cli, image: tuple[Path, bytes]) -> None:
    source, _data = image

    result = cli("upload", source, "nfs://disk.qcow2", env={"VMSTORE_PROGRESS": "json"})

    assert result.returncode == EXIT_OK, result.stderr
    assert any(e["event"] == "done" for e in strictly_json_lines(result.stderr))


def test_progress_none_prints_nothing_but_warnings(cli: Cli, slow_image: Path) -> None:
    result = cli("upload", slow_image, "nfs://slow.raw", "--progress", "none")

    assert result.returncode == EXIT_OK, result.stderr
    assert [line for line in result.stderr.splitlines() if "WARNING" not in line] == []


def run_on_terminal(
    argv: Sequence[str], *, columns: int, cwd: Path, env: dict[str, str]
) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal ``columns`` wide; returns (status, what the
    terminal received, stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env={**env, "TERM": "xterm"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    received = bytearray()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the last writer of the terminal has gone
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    assert process.stdout is not None
    stdout = process.stdout.read().decode()
    status = process.wait(timeout=60)
    return status, received.decode(errors="replace"), stdout


@pytest.mark.parametrize("columns", [40, 72, 150])
def test_the_terminal_bar_fits_the_width_and_redraws_in_place(
    cli: Cli, host: Path, columns: int
) -> None:
    name = "a-rather-long-directory-name-for-exports/vm-0042-root-disk.raw"
    source = sparse_image(
        write_file(host / name, b"").parent / "vm-0042-root-disk.raw",
        data=random_bytes(MiB, seed=9),
        hole=512 * MiB,
    )

    status, terminal, _ = run_on_terminal(
        cli.argv("upload", source, "nfs://disk.raw"), columns=columns, cwd=host, env=cli.env
    )

    assert status == EXIT_OK, terminal
    # Each redraw starts with \r; the pty turns the final \n into \r\n.
    drawn = [ANSI_ESCAPE.sub("", part) for part in re.split(r"[\r\n]+", terminal)]
    bars = [part for part in drawn if "%" in part and "WARNING" not in part]
    assert bars, terminal
    assert max(len(part) for part in bars) <= columns - 1, bars
    assert "\r" in terminal and "\x1b[K" in terminal
    assert bars[-1].rstrip().endswith("done")
    if columns >= 72:
        assert any(re.search(r"\d+\.\d [KMG]iB/s", part) for part in bars), bars
    if columns >= 100:
        assert "vm-0042-root-disk.raw" in bars[-1]  # the label keeps the file name's end
        assert re.search(r"\[#+\]", bars[-1])


@pytest.mark.parametrize(
    "label",
    [
        "upload disk.qcow2",
        "download s3://bucket/" + "very/" * 30 + "deep.qcow2",
        "upload 仮想ディスク.raw",
    ],
    ids=["short", "long", "wide-characters"],
)
def test_the_bar_line_never_reaches_the_last_column_at_any_width(label: str) -> None:
    # The pty test above runs the real command at three widths; this walks every width
    # through the same rendering function, in-process, for the corner cases.
    from vmstore.cli._progress import cell_width, render_bar_line
    from vmstore.progress import ProgressSample

    samples = [
        ProgressSample(0, 0, None, None, 0.0),
        ProgressSample(3 << 40, 5 << 40, 987654321.0, 7200.0, 60.0),
        ProgressSample(5 << 40, 5 << 40, 987654321.0, 0.0, 60.0),
        ProgressSample(123456789, None, 1024.0, None, 3.0),
    ]
    for columns in range(1, 200):
        for sample in samples:
            line = render_bar_line(label, sample, columns)
            assert cell_width(line) <= max(columns - 1, 1), (columns, line)
            assert "\n" not in line and "\r" not in line


def test_download_to_stdout_refuses_a_terminal(cli: Cli, image: tuple[Path, bytes]) -> None:
    source, _data = image
    cli.json("upload", source, "nfs://disk.qcow2")
    master, slave = pty.openpty()
    try:
        result = subprocess.run(
            cli.argv("download", "nfs://disk.qcow2", "-"),
            cwd=cli.cwd,
            env=cli.env,
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(slave)
        os.close(master)

    assert result.returncode == EXIT_USAGE
    assert "terminal" in result.stderr


# --- interruption: SIGTERM as SIGINT, and the resume that follows -------------------------


def wait_for_progress(process: subprocess.Popen[str], *, at_least: int) -> list[str]:
    """Read JSON progress events from the process's stderr until ``at_least`` bytes are done."""
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        event = json.loads(line)
        if event["event"] == "progress" and at_least <= event["transferred"] < event["total"]:
            return seen
    pytest.fail(f"the transfer ended before {at_least} bytes were reported: {seen}")


@pytest.mark.parametrize(
    ("signum", "status"),
    [(signal.SIGTERM, EXIT_TERMINATED), (signal.SIGINT, EXIT_INTERRUPTED)],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_keeps_the_partial_download_and_the_next_run_says_it_resumed(
    cli: Cli, host: Path, share: Path, signum: int, status: int
) -> None:
    data = random_bytes(16 * MiB, seed=3)
    source = sparse_image(host / "big.raw", data=data, hole=1024 * MiB)
    cli("upload", source, "nfs://big.raw", "--progress", "none")
    dest = host / "imported.raw"
    # Chunks smaller than the data before the hole, so that what was written can be reused.
    chunks = ["--chunk-size", "1M"]

    process = cli.start(
        "download", "nfs://big.raw", dest, *chunks, "--progress", "json", "--progress-interval", "0"
    )
    wait_for_progress(process, at_least=len(data))
    process.send_signal(signum)
    _, rest = process.communicate(timeout=60)

    assert process.returncode == status, rest
    message = [e for e in json_lines(rest) if e["event"] == "error"]
    assert message and message[0]["type"] == "Interrupted", rest
    assert f"partial file {dest}.vmstore-partial was kept" in message[0]["message"]
    assert not dest.exists()
    partials = list(host.glob("imported.raw.vmstore-partial*"))
    assert partials, list(host.iterdir())

    resumed = cli("download", "nfs://big.raw", dest, *chunks, "--json")

    assert resumed.returncode == EXIT_OK, resumed.stderr
    out = json.loads(resumed.stdout)
    assert out["resumed_from"] >= len(data) // 2
    assert out["bytes_transferred"] == out["size"] - out["resumed_from"]
    assert f"resumed from {out['resumed_from'] / MiB:.1f} MiB ({out['resumed_from']} bytes" in (
        resumed.stderr
    )
    assert dest.stat().st_size == source.stat().st_size


def test_sigterm_while_waiting_for_stdin_exits_143_with_a_message(cli: Cli) -> None:
    process = subprocess.Popen(
        cli.argv("checksum", "-", "--progress", "json", "--progress-interval", "0"),
        cwd=cli.cwd,
        env=cli.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stderr is not None
    process.stdin.write("some bytes, and then the producer stalls")
    process.stdin.flush()
    # The first progress event: vmstore is running its command and blocks on the pipe.
    assert json.loads(process.stderr.readline())["event"] == "progress"

    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)

    assert process.returncode == EXIT_TERMINATED
    assert [e["message"] for e in json_lines(err) if e["event"] == "error"] == [
        "terminated (SIGTERM)"
    ]
    assert out == ""


# --- failures -----------------------------------------------------------------------------


def test_download_of_missing_object_exits_3_with_one_error_line(cli: Cli, host: Path) -> None:
    result = cli("download", "nfs://missing.qcow2", host / "x.qcow2")

    assert result.returncode == EXIT_NOT_FOUND
    assert_error_line(result.stderr, "NotFound")
    assert result.stdout == ""
    assert not (host / "x.qcow2").exists()


@pytest.mark.parametrize(
    ("args", "error_type", "status"),
    [
        (("download", "nfs://missing.qcow2", "x.qcow2"), "NotFound", EXIT_NOT_FOUND),
        (("stat", "nfs://missing.qcow2"), "NotFound", EXIT_NOT_FOUND),
        (("upload", "missing.qcow2", "nfs://d.qcow2"), "NotFound", EXIT_NOT_FOUND),
        (("checksum", "missing.qcow2"), "NotFound", EXIT_NOT_FOUND),
        (("rm", "nfs://../outside.qcow2"), "PermissionDenied", EXIT_PERMISSION_DENIED),
        (("upload",), "Usage", EXIT_USAGE),
    ],
    ids=["download", "stat", "upload", "checksum", "rm", "usage"],
)
def test_json_failure_prints_an_error_object_on_stdout(
    cli: Cli, args: tuple[str, ...], error_type: str, status: int
) -> None:
    result = cli(*args, "--json")

    assert result.returncode == status, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"error"}
    assert out["error"]["type"] == error_type
    assert isinstance(out["error"]["message"], str) and out["error"]["message"]


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


def test_no_clobber_refuses_an_existing_destination_and_leaves_it_alone(
    cli: Cli, host: Path, image: tuple[Path, bytes]
) -> None:
    source, _data = image
    cli.json("upload", source, "nfs://disk.qcow2")
    dest = write_file(host / "imported.qcow2", b"yesterday's import")

    result = cli("download", "nfs://disk.qcow2", dest, "--no-clobber")
    as_json = cli("download", "nfs://disk.qcow2", dest, "--no-clobber", "--json")

    assert result.returncode == as_json.returncode == EXIT_DESTINATION_EXISTS
    line = assert_error_line(result.stderr, "DestinationExists")
    assert str(dest) in line and "--no-clobber" in line
    assert json.loads(as_json.stdout)["error"]["type"] == "DestinationExists"
    assert dest.read_bytes() == b"yesterday's import"


def test_no_clobber_downloads_when_the_destination_is_free(
    cli: Cli, host: Path, image: tuple[Path, bytes]
) -> None:
    source, data = image
    cli.json("upload", source, "nfs://disk.qcow2")

    out = cli.json("download", "nfs://disk.qcow2", host / "new.qcow2", "--no-clobber")

    assert (host / "new.qcow2").read_bytes() == data
    assert out["destination"] == str(host / "new.qcow2")


def test_missing_share_exits_7(cli: Cli, tmp_path: Path, image: tuple[Path, bytes]) -> None:
    source, _data = image

    result = cli(
        "upload", source, "nfs://disk.qcow2", env={"VMSTORE_ENDPOINT": str(tmp_path / "nope")}
    )

    assert result.returncode == EXIT_INVALID_CONFIG
    assert_error_line(result.stderr, "InvalidConfig")


def test_unknown_backend_type_exits_7_naming_the_variable(
    cli: Cli, image: tuple[Path, bytes]
) -> None:
    source, _data = image

    result = cli("upload", source, "nfs://disk.qcow2", env={"VMSTORE_TYPE": "carrier-pigeon"})

    assert result.returncode == EXIT_INVALID_CONFIG
    assert "VMSTORE_TYPE" in assert_error_line(result.stderr, "InvalidConfig")


@pytest.mark.parametrize("url", ["nfs://../escaped.qcow2", "nfs://a/../../escaped.qcow2"])
def test_a_path_outside_the_share_says_so_rather_than_permission_denied(
    cli: Cli, image: tuple[Path, bytes], url: str
) -> None:
    source, _data = image

    result = cli("upload", source, url)
    as_json = cli("upload", source, url, "--json")

    assert result.returncode == as_json.returncode == EXIT_PERMISSION_DENIED
    line = assert_error_line(result.stderr, "OutsideShare")
    assert "leaves the share" in line and "not a credentials problem" in line
    error = json.loads(as_json.stdout)["error"]
    assert (error["type"], error["reason"]) == ("PermissionDenied", "OutsideShare")


@pytest.mark.parametrize(
    "args",
    [(), ("frobnicate",), ("upload",), ("upload", "disk.qcow2", "nfs://d", "--size", "1M")],
    ids=["none", "unknown", "short", "size-for-a-file"],
)
def test_usage_errors_exit_2(cli: Cli, args: tuple[str, ...]) -> None:
    assert cli(*args).returncode == EXIT_USAGE


def test_error_output_never_contains_the_token(cli: Cli, host: Path) -> None:
    result = cli("download", "nfs://missing.qcow2", host / "x", env={"VMSTORE_TOKEN": SECRET})

    assert result.returncode == EXIT_NOT_FOUND
    assert SECRET not in result.stdout + result.stderr


def test_help_shows_an_example_and_every_exit_status(cli: Cli) -> None:
    result = cli("--help")

    assert result.returncode == EXIT_OK
    assert "example" in result.stdout.lower()
    assert "vmstore upload" in result.stdout
    for command in ("upload", "download", "stat", "rm", "checksum"):
        assert command in result.stdout
    for status in ("10 destination exists", "130 interrupted", "143 terminated"):
        assert status in " ".join(result.stdout.split())


# --- streams: stdin and stdout -------------------------------------------------------------


def test_upload_from_stdin_stores_what_the_pipe_carried(cli: Cli, share: Path) -> None:
    data = random_bytes(3 * MiB + 5, seed=11)

    result = cli.binary("upload", "-", "nfs://vm-exports/piped.raw", "--json", stdin=data)

    assert result.returncode == EXIT_OK, result.stderr.decode()
    out = json.loads(result.stdout)
    assert out["checksum"] == sha256_bytes(data)
    assert out["size"] == len(data)
    assert out["source"] == "-"
    assert (share / "vm-exports" / "piped.raw").read_bytes() == data


def test_upload_from_stdin_with_a_size_shows_a_percentage(cli: Cli, share: Path) -> None:
    data = random_bytes(2 * MiB, seed=12)

    result = cli.binary(
        "upload", "-", "nfs://piped.raw", "--size", "2M", "--progress", "json", stdin=data
    )

    assert result.returncode == EXIT_OK, result.stderr.decode()
    progress = [e for e in strictly_json_lines(result.stderr.decode()) if e["event"] == "progress"]
    assert progress and progress[-1]["total"] == len(data) and progress[-1]["percent"] == 100.0
    assert (share / "piped.raw").read_bytes() == data


def test_dash_is_stdin_never_a_file_named_dash(cli: Cli, host: Path, share: Path) -> None:
    write_file(host / "-", b"a file that happens to be called -")
    data = random_bytes(MiB, seed=13)

    result = cli.binary("upload", "-", "nfs://piped.raw", stdin=data)

    assert result.returncode == EXIT_OK, result.stderr.decode()
    assert (share / "piped.raw").read_bytes() == data
    assert (host / "-").read_bytes() == b"a file that happens to be called -"
    # The file is still reachable, by a path that is not exactly "-".
    stored = cli.json("upload", "./-", "nfs://file.raw")
    assert stored["checksum"] == sha256_bytes(b"a file that happens to be called -")


def test_upload_from_a_slow_pipe_logs_bytes_and_rate(cli: Cli, share: Path) -> None:
    blocks = [random_bytes(MiB, seed=seed) for seed in range(4)]
    process = subprocess.Popen(
        cli.argv(
            "upload",
            "-",
            "nfs://slow.raw",
            "--chunk-size",
            "256k",  # a line can only come between chunks
            "--progress",
            "plain",
            "--progress-interval",
            "0.2",
        ),
        cwd=cli.cwd,
        env=cli.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None

    def feed(pipe: IO[bytes]) -> None:
        # A vmstore that failed early closes its end; the assertions below say why.
        with contextlib.suppress(BrokenPipeError), pipe:
            for block in blocks:  # like qemu-img convert, which writes as it reads
                pipe.write(block)
                pipe.flush()
                time.sleep(0.4)

    feeder = threading.Thread(target=feed, args=(process.stdin,))
    feeder.start()
    assert process.stderr is not None
    err = process.stderr.read()  # until vmstore exits; its stdout is one short line
    process.wait(timeout=60)
    feeder.join()

    assert process.returncode == EXIT_OK, err.decode()
    lines = [line for line in err.decode().splitlines() if line.startswith("vmstore: upload")]
    assert any(re.search(r"<stdin>: \d+\.\d MiB, ", line) for line in lines), lines
    assert "done, 4.0 MiB" in lines[-1]
    assert (share / "slow.raw").read_bytes() == b"".join(blocks)


def test_download_to_stdout_writes_only_the_image_there(
    cli: Cli, host: Path, image: tuple[Path, bytes]
) -> None:
    source, data = image
    cli.json("upload", source, "nfs://disk.qcow2")

    result = cli.binary("download", "nfs://disk.qcow2", "-", "--json", "--progress", "json")

    assert result.returncode == EXIT_OK, result.stderr.decode()
    assert result.stdout == data
    events = strictly_json_lines(result.stderr.decode())
    results = [e for e in events if "event" not in e]
    assert len(results) == 1
    assert results[0]["destination"] == "-"
    assert results[0]["checksum"] == sha256_bytes(data)
    assert not (host / "-").exists()


def test_download_to_stdout_with_a_wrong_checksum_says_the_reader_has_the_bytes(
    cli: Cli, image: tuple[Path, bytes]
) -> None:
    source, data = image
    cli.json("upload", source, "nfs://disk.qcow2")

    result = cli.binary("download", "nfs://disk.qcow2", "-", "--expected-checksum", "0" * 64)

    assert result.returncode == EXIT_CHECKSUM_MISMATCH, result.stderr.decode()
    line = assert_error_line(result.stderr.decode(), "ChecksumMismatch")
    assert "already written to stdout" in line and "discard" in line
    assert result.stdout == data  # streamed before the end could be checked


def test_a_reader_that_closes_stdout_early_gets_a_message_and_exit_8(
    cli: Cli, image: tuple[Path, bytes]
) -> None:
    source, data = image
    cli.json("upload", source, "nfs://disk.qcow2")
    process = subprocess.Popen(
        cli.argv("download", "nfs://disk.qcow2", "-"),
        cwd=cli.cwd,
        env=cli.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None

    head = process.stdout.read(1000)  # like `| head -c 1000`, then the reader exits
    process.stdout.close()
    err = process.stderr.read().decode()
    process.wait(timeout=60)

    assert head == data[:1000]
    assert process.returncode == EXIT_OPERATION_FAILED, err
    assert "stdout was closed before the download finished" in assert_error_line(
        err, "OperationFailed"
    )
    assert "Traceback" not in err and "Exception ignored" not in err


def test_upload_from_stdin_refuses_a_terminal(cli: Cli) -> None:
    master, slave = pty.openpty()
    try:
        result = subprocess.run(
            cli.argv("upload", "-", "nfs://typed.raw"),
            cwd=cli.cwd,
            env=cli.env,
            stdin=slave,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(slave)
        os.close(master)

    assert result.returncode == EXIT_USAGE
    assert "stdin, which is a terminal" in result.stderr


def test_a_failed_download_to_stdout_puts_the_json_error_on_stderr(cli: Cli) -> None:
    result = cli.binary("download", "nfs://missing.qcow2", "-", "--json")

    assert result.returncode == EXIT_NOT_FOUND
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    errors = [json.loads(line) for line in lines if line.startswith("{")]
    assert errors and errors[0]["error"]["type"] == "NotFound"


def test_checksum_of_stdin_agrees_with_sha256sum(cli: Cli) -> None:
    data = random_bytes(5 * MiB + 1, seed=14)

    text = cli.binary("checksum", "-", stdin=data)
    as_json = cli.binary("checksum", "-", "--json", stdin=data)

    assert text.returncode == EXIT_OK, text.stderr.decode()
    assert text.stdout.decode() == f"{sha256_bytes(data)}  -\n"
    assert json.loads(as_json.stdout) == {
        "source": "-",
        "size": len(data),
        "checksum": sha256_bytes(data),
    }


def test_gc_removes_old_leftovers_in_the_share_and_keeps_recent_ones(
    cli: Cli, share: Path, host: Path
) -> None:
    state = {"VMSTORE_STATE_DIR": str(host / "state")}
    (share / "vm-01").mkdir()
    old = write_file(share / "vm-01" / "disk.img.vmstore-partial-deadhost", b"x" * 4096)
    week_ago = time.time() - 8 * 86400
    os.utime(old, (week_ago, week_ago))
    recent = write_file(share / "vm-01" / "other.img.vmstore-partial-livehost", b"y" * 10)
    kept = write_file(share / "vm-01" / "done.img", b"z")

    dry = cli.json("gc", "--dry-run", env=state)
    assert [row["url"] for row in dry["would_remove"]] == ["nfs://vm-01/disk.img"]
    assert old.exists()

    removed = cli.json("gc", "--older-than", "7d", "nfs://vm-01/", env=state)
    assert [(r["url"], r["kind"]) for r in removed["removed"]] == [
        ("nfs://vm-01/disk.img", "upload")
    ]
    assert not old.exists() and recent.exists() and kept.exists()

    everything = cli("gc", "--older-than", "0", env=state)
    assert everything.returncode == EXIT_OK, everything.stderr
    assert "removed upload nfs://vm-01/other.img" in everything.stdout
    assert not recent.exists() and kept.exists()


def test_gc_refuses_an_age_it_cannot_read(cli: Cli) -> None:
    result = cli("gc", "--older-than", "a while")
    assert result.returncode == EXIT_USAGE
    assert "not an age" in result.stderr


# --- compression and encryption (docs/FORMAT.md) ----------------------------------------


def test_compress_and_encryption_key_file_round_trip_and_never_print_the_key(
    cli: Cli, share: Path, host: Path
) -> None:
    key = bytes(range(32))
    key_file = host / "vm.key"
    key_file.write_text(f"  {key.hex()}\n")
    data = b"a compressible disk image line\n" * 100_000
    source = write_file(host / "disk.raw", data)

    up = cli(
        "upload", source, "nfs://enc/disk.raw", "--compress", "zstd",
        "--encryption-key-file", key_file, "--json",
    )  # fmt: skip
    assert up.returncode == EXIT_OK, up.stderr
    assert json.loads(up.stdout)["size"] == len(data)
    stored = (share / "enc" / "disk.raw").read_bytes()
    assert len(stored) < len(data) // 10 and b"disk image line" not in stored

    dest = host / "back.raw"
    down = cli("download", "nfs://enc/disk.raw", dest, "--encryption-key-file", key_file)
    assert down.returncode == EXIT_OK, down.stderr
    assert dest.read_bytes() == data
    for result in (up, down):
        assert key.hex() not in result.stdout + result.stderr

    keyless = cli("download", "nfs://enc/disk.raw", host / "no.raw")
    assert keyless.returncode == EXIT_INVALID_CONFIG
    assert "--encryption-key-file" in assert_error_line(keyless.stderr, "InvalidConfig")
    other = host / "other.key"
    other.write_bytes(bytes(32))
    wrong = cli("download", "nfs://enc/disk.raw", host / "no.raw", "--encryption-key-file", other)
    assert wrong.returncode == EXIT_PERMISSION_DENIED
    assert not (host / "no.raw").exists()


def test_a_bad_key_file_is_a_clear_invalid_config(cli: Cli, host: Path) -> None:
    source = write_file(host / "disk.raw", b"x" * 1000)
    bad = host / "bad.key"
    bad.write_text("this is not a key\n")
    for key_file in (bad, host / "missing.key"):
        result = cli("upload", source, "nfs://d.raw", "--encryption-key-file", key_file)
        assert result.returncode == EXIT_INVALID_CONFIG, result.stderr
        line = assert_error_line(result.stderr, "InvalidConfig")
        assert str(key_file) in line and "this is not a key" not in line
# --- --limit-rate (issue 9: the bandwidth limit) ---------------------------------------------


def test_limit_rate_slows_an_upload_and_a_download_to_the_rate(cli: Cli, host: Path) -> None:
    data = random_bytes(3 * MiB, seed=72)
    source = write_file(host / "disk.raw", data)

    started = time.monotonic()
    up = cli("upload", source, "nfs://limited.raw", "--limit-rate", "4M")
    up_seconds = time.monotonic() - started
    started = time.monotonic()
    down = cli("download", "nfs://limited.raw", host / "back.raw", "--limit-rate", "4M")
    down_seconds = time.monotonic() - started

    assert up.returncode == EXIT_OK, up.stderr
    assert down.returncode == EXIT_OK, down.stderr
    assert (host / "back.raw").read_bytes() == data
    # (3 MiB - the largest burst the contract allows, 1 MiB) / 4 MiB/s.
    assert up_seconds >= 0.5 and down_seconds >= 0.5, (up_seconds, down_seconds)


def test_the_environment_variable_limits_the_rate_too(cli: Cli, host: Path) -> None:
    source = write_file(host / "disk.raw", random_bytes(3 * MiB, seed=73))

    started = time.monotonic()
    result = cli("upload", source, "nfs://env.raw", env={"VMSTORE_MAX_BANDWIDTH": "4M"})

    assert result.returncode == EXIT_OK, result.stderr
    assert time.monotonic() - started >= 0.5


@pytest.mark.parametrize("value", ["fast", "1.5M", "10 parsecs", "-5M"])
@pytest.mark.parametrize("command", ["upload", "download"])
def test_a_bad_limit_rate_is_invalid_config_naming_the_flag(
    cli: Cli, image: tuple[Path, bytes], command: str, value: str
) -> None:
    source, _data = image
    args = (source, "nfs://d.qcow2") if command == "upload" else ("nfs://d.qcow2", "back")

    result = cli(command, *args, f"--limit-rate={value}")

    assert result.returncode == EXIT_INVALID_CONFIG, result.stderr
    assert "--limit-rate" in assert_error_line(result.stderr, "InvalidConfig")


def test_a_bad_max_bandwidth_variable_names_the_variable(
    cli: Cli, image: tuple[Path, bytes]
) -> None:
    source, _data = image

    result = cli("upload", source, "nfs://d.qcow2", env={"VMSTORE_MAX_BANDWIDTH": "lots"})

    assert result.returncode == EXIT_INVALID_CONFIG, result.stderr
    assert "VMSTORE_MAX_BANDWIDTH" in assert_error_line(result.stderr, "InvalidConfig")


def test_limit_rate_is_in_the_help_of_upload_and_download(cli: Cli) -> None:
    for command in ("upload", "download"):
        result = cli(command, "--help")
        assert result.returncode == EXIT_OK
        assert "--limit-rate" in result.stdout
