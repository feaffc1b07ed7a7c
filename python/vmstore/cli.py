"""The ``vmstore`` command: upload, download, stat, rm and checksum from a shell."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TextIO

from vmstore import _native
from vmstore._oserrors import storage_error_from_oserror
from vmstore.config import StorageConfig, parse_byte_size
from vmstore.errors import ErrorType, StorageError
from vmstore.models import DownloadRequest, ProgressCallback, UploadRequest
from vmstore.progress import ProgressReporter
from vmstore.storage import Storage, new_storage

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_CODE_BY_ERROR_TYPE: dict[ErrorType, int] = {
    ErrorType.NOT_FOUND: 3,
    ErrorType.PERMISSION_DENIED: 4,
    ErrorType.NETWORK_ERROR: 5,
    ErrorType.CHECKSUM_MISMATCH: 6,
    ErrorType.INVALID_CONFIG: 7,
    ErrorType.OPERATION_FAILED: 8,
    ErrorType.CANCELLED: 9,
}

_EPILOG = """\
examples:
  export VMSTORE_TYPE=nfs VMSTORE_ENDPOINT=/mnt/nfs-share
  vmstore upload disk.qcow2 nfs://vm-exports/disk.qcow2 --metadata vm-name=test-vm-01
  vmstore download nfs://vm-exports/disk.qcow2 imported.qcow2 --json
  vmstore stat nfs://vm-exports/disk.qcow2
  vmstore rm nfs://vm-exports/disk.qcow2
  vmstore checksum disk.qcow2

  vmstore --type s3 --endpoint https://s3.example.com --bucket vms \\
      upload disk.qcow2 s3://vms/disk.qcow2     # keys from AWS_ACCESS_KEY_ID/...

Backend options may come before or after the command, or from the environment:
VMSTORE_TYPE, VMSTORE_ENDPOINT, VMSTORE_BUCKET, VMSTORE_REGION, VMSTORE_TOKEN,
VMSTORE_CHUNK_SIZE, ...; S3 keys from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_SESSION_TOKEN.

exit status: 0 ok, 2 usage, 3 not found, 4 permission denied, 5 network error,
6 checksum mismatch, 7 invalid configuration, 8 operation failed, 9 cancelled,
130 interrupted (Ctrl-C; an interrupted transfer resumes when run again).
"""


# --- argument parsing -------------------------------------------------------------------


def _byte_size(text: str) -> int:
    try:
        return parse_byte_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _metadata_item(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _add_backend_options(parser: argparse.ArgumentParser, *, on_subcommand: bool) -> None:
    """Backend flags; on a subcommand they default to "absent" so that a flag given before
    the subcommand is not overwritten by the subcommand's default."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if on_subcommand else value

    group = parser.add_argument_group("backend options (default from the environment)")
    group.add_argument(
        "--type", default=default(None), help="s3, minio, http, https or nfs [VMSTORE_TYPE]"
    )
    group.add_argument(
        "--endpoint",
        default=default(None),
        help="server URL, or the NFS mount point [VMSTORE_ENDPOINT]",
    )
    group.add_argument("--bucket", default=default(None), help="S3 bucket [VMSTORE_BUCKET]")
    group.add_argument("--region", default=default(None), help="S3 region [VMSTORE_REGION]")
    group.add_argument(
        "--token",
        default=default(None),
        help="HTTP bearer token; prefer VMSTORE_TOKEN, command lines are visible to others",
    )
    group.add_argument(
        "--chunk-size",
        type=_byte_size,
        default=default(None),
        metavar="SIZE",
        help="bytes per chunk, e.g. 32M [VMSTORE_CHUNK_SIZE; backend default]",
    )
    group.add_argument(
        "--concurrency",
        type=int,
        default=default(None),
        metavar="N",
        help="parallel transfers, 1..64 [VMSTORE_CONCURRENCY; 4]",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=default(None),
        metavar="SECONDS",
        help="give up after this long without progress [VMSTORE_TIMEOUT; 300]",
    )
    group.add_argument(
        "--max-retries",
        type=int,
        default=default(None),
        metavar="N",
        help="retries of a failed request [VMSTORE_MAX_RETRIES; 3]",
    )
    group.add_argument(
        "--insecure-skip-verify",
        action="store_true",
        default=default(None),
        help="do not verify the server's TLS certificate",
    )
    group.add_argument(
        "--ca-bundle",
        default=default(None),
        metavar="PATH",
        help="CA certificates to trust [VMSTORE_CA_BUNDLE]",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="log what is being done to stderr",
    )


def _add_command(
    commands: Any,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help_text: str,
    example: str,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    _add_backend_options(parser, on_subcommand=True)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmstore",
        description="Move VM disk images between this host and S3, HTTP(S) or NFS storage, "
        "verified end to end with SHA-256.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_backend_options(parser, on_subcommand=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    upload = _add_command(
        commands,
        "upload",
        _run_upload,
        "upload a local file to URL",
        "vmstore upload disk.qcow2 nfs://vm-exports/disk.qcow2 --metadata vm-name=vm01",
    )
    upload.add_argument("source", metavar="SOURCE", help="local file to upload")
    upload.add_argument("url", metavar="URL", help="where to store it")
    upload.add_argument(
        "--metadata",
        type=_metadata_item,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata stored with the object (repeatable)",
    )
    upload.add_argument("--content-type", metavar="TYPE", help="MIME type to store")
    upload.add_argument(
        "--no-resume",
        action="store_true",
        help="start over instead of continuing an interrupted upload",
    )
    upload.add_argument("--json", action="store_true", help="print the result as JSON")

    download = _add_command(
        commands,
        "download",
        _run_download,
        "download URL to a local file",
        "vmstore download nfs://vm-exports/disk.qcow2 imported.qcow2",
    )
    download.add_argument("url", metavar="URL", help="object to download")
    download.add_argument("destination", metavar="DEST", help="local file to write")
    download.add_argument(
        "--expected-checksum",
        metavar="HEX",
        help="SHA-256 the bytes must have (default: the one stored with the object)",
    )
    download.add_argument(
        "--no-verify",
        action="store_true",
        help="do not check against the stored checksum (an --expected-checksum still is)",
    )
    download.add_argument(
        "--no-resume",
        action="store_true",
        help="start over instead of continuing an interrupted download",
    )
    download.add_argument("--json", action="store_true", help="print the result as JSON")

    stat = _add_command(
        commands,
        "stat",
        _run_stat,
        "show an object's size, checksum and metadata",
        "vmstore stat nfs://vm-exports/disk.qcow2 --json",
    )
    stat.add_argument("url", metavar="URL", help="object to describe")
    stat.add_argument("--json", action="store_true", help="print the result as JSON")

    remove = _add_command(
        commands,
        "rm",
        _run_rm,
        "delete an object (no error if it does not exist)",
        "vmstore rm nfs://vm-exports/disk.qcow2",
    )
    remove.add_argument("url", metavar="URL", help="object to delete")

    checksum = commands.add_parser(
        "checksum",
        help="print a local file's SHA-256, like sha256sum",
        description="Print a local file's SHA-256 as '<hex>  FILE', like sha256sum.",
        epilog="example:\n  vmstore checksum disk.qcow2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    checksum.set_defaults(handler=_run_checksum)
    checksum.add_argument("file", metavar="FILE", help="local file to hash")
    checksum.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    return parser


def _version() -> str:
    from vmstore import __version__

    return __version__


# --- commands ---------------------------------------------------------------------------


def _storage_from_args(args: argparse.Namespace) -> Storage:
    config = StorageConfig.from_env(
        type=args.type,
        endpoint=args.endpoint,
        bucket=args.bucket,
        region=args.region,
        token=args.token,
        chunk_size=args.chunk_size,
        concurrency=args.concurrency,
        timeout=args.timeout,
        max_retries=args.max_retries,
        # A flag that is absent must not override VMSTORE_INSECURE_SKIP_VERIFY.
        insecure_skip_verify=True if args.insecure_skip_verify else None,
        ca_bundle=args.ca_bundle,
    )
    return new_storage(config)


def _run_upload(args: argparse.Namespace) -> int:
    with _storage_from_args(args) as store, _TerminalProgressBar(f"upload {args.source}") as bar:
        response = store.upload(
            UploadRequest(
                source_path=args.source,
                destination_url=args.url,
                metadata=dict(args.metadata),
                progress_callback=bar,
                content_type=args.content_type,
                resume=not args.no_resume,
            )
        )
    _print_response(response, as_json=args.json)
    return EXIT_OK


def _run_download(args: argparse.Namespace) -> int:
    with _storage_from_args(args) as store, _TerminalProgressBar(f"download {args.url}") as bar:
        response = store.download(
            DownloadRequest(
                source_url=args.url,
                destination_path=args.destination,
                verify_checksum=not args.no_verify,
                expected_checksum=args.expected_checksum,
                progress_callback=bar,
                resume=not args.no_resume,
            )
        )
    _print_response(response, as_json=args.json)
    return EXIT_OK


def _run_stat(args: argparse.Namespace) -> int:
    with _storage_from_args(args) as store:
        metadata = store.get_metadata(args.url)
    _print_response(metadata, as_json=args.json)
    return EXIT_OK


def _run_rm(args: argparse.Namespace) -> int:
    with _storage_from_args(args) as store:
        store.delete(args.url)
    return EXIT_OK


def _run_checksum(args: argparse.Namespace) -> int:
    with _TerminalProgressBar(f"sha256 {args.file}") as bar:
        # A Python callback even without a TTY: it is what lets Ctrl-C stop a long hash.
        digest = _native.sha256_file(args.file, progress=bar or ProgressReporter(None))
    print(f"{digest}  {args.file}")
    return EXIT_OK


# --- output -----------------------------------------------------------------------------


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _print_response(response: Any, *, as_json: bool) -> None:
    fields = dataclasses.asdict(response)
    if as_json:
        print(json.dumps(fields, default=_json_value, sort_keys=False))
        return
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, dict):
            value = " ".join(f"{key}={item}" for key, item in sorted(value.items()))
        elif value is None:
            value = "-"
        print(f"{name + ':':<{width + 1}} {value}")


def _human_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """One self-overwriting line on a terminal: percent, bytes, rate and ETA."""

    def __init__(
        self, label: str, stream: TextIO, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._label = label if len(label) <= 40 else "..." + label[-37:]
        self._stream = stream
        self._clock = clock
        self._start_time = clock()
        self._drawn = False

    def __call__(self, transferred: int, total: int) -> None:
        elapsed = self._clock() - self._start_time
        # A resume counts its re-hashed prefix as progress: verifying it is work done now.
        rate = transferred / elapsed if elapsed > 0 else 0.0
        percent = 100.0 * transferred / total if total else 100.0
        if transferred >= total:
            eta = "done"
        elif rate > 0:
            eta = "ETA " + _duration((total - transferred) / rate)
        else:
            eta = "ETA --:--"
        speed = f"{_human_size(rate)}/s" if rate > 0 else "--/s"
        line = (
            f"{self._label}  {percent:5.1f}%  {_human_size(transferred)} / "
            f"{_human_size(total)}  {speed}  {eta}"
        )
        self._stream.write(f"\r{line}\x1b[K")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


class _TerminalProgressBar:
    """A ProgressBar on stderr when it is a terminal; None (no output) when piped."""

    def __init__(self, label: str) -> None:
        self._bar = ProgressBar(label, sys.stderr) if sys.stderr.isatty() else None

    def __enter__(self) -> ProgressCallback | None:
        return self._bar

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (tests and callers may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 -- logging must never fail the command
            self.handleError(record)


_log_handler = _StderrHandler()
_log_handler.setFormatter(logging.Formatter("vmstore: %(levelname)s: %(message)s"))


def _configure_logging(verbose: bool) -> None:
    library_logger = logging.getLogger("vmstore")
    if _log_handler not in library_logger.handlers:
        library_logger.addHandler(_log_handler)
    library_logger.setLevel(logging.INFO if verbose else logging.WARNING)


# --- entry point ------------------------------------------------------------------------


def _print_error(error: StorageError) -> int:
    print(f"vmstore: error ({error.type.value}): {error.message}", file=sys.stderr)
    return EXIT_CODE_BY_ERROR_TYPE.get(
        error.type, EXIT_CODE_BY_ERROR_TYPE[ErrorType.OPERATION_FAILED]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose)
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except KeyboardInterrupt:
        if args.command in ("upload", "download"):
            if args.no_resume:
                note = "the partial file was removed (--no-resume)"
            else:
                note = "the partial file was kept: run the same command again to resume"
            print(f"\nvmstore: interrupted; {note}", file=sys.stderr)
        else:
            print("\nvmstore: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StorageError as exc:
        return _print_error(exc)
    except OSError as exc:  # from Python-side file access the backends did not map
        path = str(exc.filename) if exc.filename is not None else "a file"
        return _print_error(storage_error_from_oserror(exc, "access", path))


if __name__ == "__main__":
    sys.exit(main())
