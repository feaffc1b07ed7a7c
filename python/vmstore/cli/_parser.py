"""The ``vmstore`` command line: commands, flags, help text and the documented exit statuses."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from vmstore._hostpolicy import split_allowed_hosts
from vmstore.cli._progress import PROGRESS_MODES
from vmstore.config import parse_byte_size
from vmstore.errors import ErrorType

STREAM = "-"
"""As SOURCE or DEST: stdin / stdout. Never a file named "-" (write ./- for that)."""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DESTINATION_EXISTS = 10  # download --no-clobber found DEST already there
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM: what Kubernetes and systemd send before SIGKILL
EXIT_CODE_BY_ERROR_TYPE: dict[ErrorType, int] = {
    ErrorType.NOT_FOUND: 3,
    ErrorType.PERMISSION_DENIED: 4,
    ErrorType.NETWORK_ERROR: 5,
    ErrorType.CHECKSUM_MISMATCH: 6,
    ErrorType.INVALID_CONFIG: 7,
    ErrorType.OPERATION_FAILED: 8,
    ErrorType.CANCELLED: 9,
}

# Flag of each StorageConfig field that has one (messages name what the user typed).
FLAG_BY_FIELD = {
    "type": "--type",
    "endpoint": "--endpoint",
    "bucket": "--bucket",
    "region": "--region",
    "token": "--token",
    "chunk_size": "--chunk-size",
    "concurrency": "--concurrency",
    "timeout": "--timeout",
    "max_retries": "--max-retries",
    "insecure_skip_verify": "--insecure-skip-verify",
    "ca_bundle": "--ca-bundle",
    "allowed_hosts": "--allowed-hosts",

    "max_bandwidth": "--limit-rate",
}


def _add_key_file_option(parser: argparse.ArgumentParser, purpose: str) -> None:
    parser.add_argument(
        "--encryption-key-file",
        metavar="FILE",
        help=f"{purpose}: FILE holds the key, 64 hex digits or 32 raw bytes (docs/FORMAT.md)",
    )


_EPILOG = """\
examples:
  export VMSTORE_ENDPOINT=/mnt/nfs-share          # the backend comes from the URL's scheme
  vmstore upload disk.qcow2 nfs://vm-exports/disk.qcow2 --metadata vm-name=test-vm-01
  vmstore download nfs://vm-exports/disk.qcow2 imported.qcow2 --json
  qemu-img convert -O raw disk.qcow2 /dev/stdout | vmstore upload - nfs://vm-exports/disk.raw
  vmstore download nfs://vm-exports/disk.raw - | dd of=/dev/vdb bs=4M
  vmstore upload a.qcow2 b.qcow2 s3://vms/vm-01/   # several: one budget, one progress view
  vmstore download s3://vms/vm-01/a.qcow2 s3://vms/vm-01/b.qcow2 imported/
  vmstore presign s3://vms/vm-01/a.qcow2 --expires-in 10m   # for curl, no keys needed
  vmstore stat nfs://vm-exports/disk.qcow2
  vmstore rm nfs://vm-exports/disk.qcow2
  vmstore checksum disk.qcow2
  vmstore inspect disk.qcow2

  vmstore --endpoint https://s3.example.com upload disk.qcow2 s3://vms/disk.qcow2
      # keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY

Options may come before or after the command. Backend options also come from the
environment: VMSTORE_TYPE, VMSTORE_ENDPOINT, VMSTORE_BUCKET, VMSTORE_REGION, VMSTORE_TOKEN,
VMSTORE_CHUNK_SIZE, ...; S3 keys from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_SESSION_TOKEN. Without --type or VMSTORE_TYPE the backend is the URL's scheme:
s3:// -> s3, nfs:// -> nfs, http:// -> http, https:// -> https.

exit status: 0 ok, 2 usage, 3 not found, 4 permission denied (or a path outside the NFS
share), 5 network error, 6 checksum mismatch, 7 invalid configuration, 8 operation failed,
9 cancelled, 10 destination exists (--no-clobber), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM); an interrupted or terminated file transfer resumes when run again.
"""


class UsageError(Exception):
    """A command line that cannot be run; raised instead of argparse's exit so that
    ``--json`` can report it like any other failure."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def _byte_size(text: str) -> int:
    try:
        return parse_byte_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from exc
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


def _metadata_item(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _add_output_options(parser: argparse.ArgumentParser, *, on_subcommand: bool) -> None:
    """Flags every command takes; on a subcommand they default to "absent" so that a flag
    given before the subcommand is not overwritten by the subcommand's default."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if on_subcommand else value

    group = parser.add_argument_group("output options")
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the result, or the error, as one JSON object on stdout (on stderr when "
        "stdout carries the image)",
    )
    group.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default=default(None),
        help="progress on stderr: a bar on a terminal, a plain line every few seconds "
        "otherwise (auto), or one JSON object per line (json) [VMSTORE_PROGRESS; auto]",
    )
    group.add_argument(
        "--progress-interval",
        type=_seconds,
        default=default(None),
        metavar="SECONDS",
        help="seconds between plain or JSON progress lines [plain: 5, json: 1]",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="log what is being done to stderr",
    )


def _add_backend_options(parser: argparse.ArgumentParser, *, on_subcommand: bool) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if on_subcommand else value

    group = parser.add_argument_group("backend options (default from the environment)")
    group.add_argument(
        "--type",
        default=default(None),
        help="s3, minio, http, https or nfs [VMSTORE_TYPE; else the URL's scheme]",
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
        "--allowed-hosts",
        type=split_allowed_hosts,
        default=default(None),
        metavar="HOSTS",
        help="comma-separated names and CIDRs, the only hosts S3/HTTP may reach "
        "[VMSTORE_ALLOWED_HOSTS; default: all but link-local, multicast, ...]",
    )


def _add_limit_rate(parser: argparse.ArgumentParser) -> None:
    # Parsed by the command, not argparse: a bad rate is an invalid configuration (exit 7),
    # as the same value in VMSTORE_MAX_BANDWIDTH is.
    parser.add_argument(
        "--limit-rate",
        dest="max_bandwidth",
        metavar="RATE",
        help="at most RATE bytes per second on the wire, e.g. 100M (binary units; 0: no "
        "limit) [VMSTORE_MAX_BANDWIDTH]",
    )


def _add_command(
    commands: Any,
    name: str,
    help_text: str,
    example: str,
    *,
    backend: bool = True,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(command=name)
    if backend:
        _add_backend_options(parser, on_subcommand=True)
    _add_output_options(parser, on_subcommand=True)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vmstore",
        description="Move VM disk images between this host and S3, HTTP(S) or NFS storage, "
        "verified end to end with SHA-256.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_backend_options(parser, on_subcommand=False)
    _add_output_options(parser, on_subcommand=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    upload = _add_command(
        commands,
        "upload",
        "upload a local file, or stdin (-), to URL",
        "vmstore upload disk.qcow2 nfs://vm-exports/disk.qcow2 --metadata vm-name=vm01",
    )
    upload.add_argument(
        "source",
        metavar="SOURCE",
        nargs="+",
        help="local file to upload; - for stdin; several files go to URL/ under their names",
    )
    upload.add_argument(
        "url", metavar="URL", help="where to store it; ending in /: a prefix for each SOURCE"
    )
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
        "--size",
        type=_byte_size,
        metavar="SIZE",
        help="with SOURCE -: how many bytes stdin will carry, e.g. 20G (picks the part size "
        "and shows a percentage; optional)",
    )
    upload.add_argument(
        "--no-resume",
        action="store_true",
        help="start over instead of continuing an interrupted upload",
    )
    upload.add_argument(
        "--compress",
        choices=["zstd"],
        metavar="zstd",
        help="store the image compressed (each part on its own; downloads decompress)",
    )
    upload.add_argument(
        "--allow-backing-file",
        action="store_true",
        help="upload even an image whose header names a backing file or external data file "
        "(refused by default: an importer following it reads its own host's files)",
    )
    _add_key_file_option(upload, "encrypt the image on this host before it is stored")
    _add_limit_rate(upload)

    download = _add_command(
        commands,
        "download",
        "download URL to a local file, or to stdout (-)",
        "vmstore download nfs://vm-exports/disk.qcow2 imported.qcow2",
    )
    download.add_argument(
        "url", metavar="URL", nargs="+", help="object to download (several: DEST must be DIR/)"
    )
    download.add_argument(
        "destination",
        metavar="DEST",
        help="local file to write; - for stdout; ending in /: a directory for each URL's file",
    )
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
    _add_key_file_option(download, "decrypt an image stored encrypted")
    download.add_argument(
        "--no-clobber",
        action="store_true",
        help=f"refuse (exit {EXIT_DESTINATION_EXISTS}) when DEST already exists",
    )
    download.add_argument(
        "--allow-backing-file",
        action="store_true",
        help="save even an image whose header names a backing file or external data file "
        "(by default it is verified, then not saved)",
    )

    _add_limit_rate(download)

    stat = _add_command(
        commands,
        "stat",
        "show an object's size, checksum and metadata",
        "vmstore stat nfs://vm-exports/disk.qcow2 --json",
    )
    stat.add_argument("url", metavar="URL", help="object to describe")

    remove = _add_command(
        commands,
        "rm",
        "delete an object (no error if it does not exist)",
        "vmstore rm nfs://vm-exports/disk.qcow2",
    )
    remove.add_argument("url", metavar="URL", help="object to delete")

    gc = _add_command(
        commands,
        "gc",
        "remove what interrupted transfers left: unfinished multipart uploads, partial files "
        "in the share, this host's download partials",
        "vmstore gc --older-than 7d s3://vm-exports/",
    )
    gc.add_argument(
        "prefix",
        metavar="PREFIX",
        nargs="?",
        default="",
        help="only under this URL prefix (default: the whole store)",
    )
    gc.add_argument(
        "--older-than",
        metavar="AGE",
        default="7d",
        type=parse_age,
        help="only what has not changed for AGE: 30m, 12h, 7d, or 0 for everything not in use "
        "(default 7d)",
    )
    gc.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing"
    )

    presign = _add_command(
        commands,
        "presign",
        "print a URL that downloads an S3 object without credentials until it expires "
        "(curl, a browser, or vmstore download with no S3 keys)",
        "vmstore presign s3://vm-exports/disk.qcow2 --expires-in 1h",
    )
    presign.add_argument("url", metavar="URL", help="S3 object to share")
    presign.add_argument(
        "--expires-in",
        metavar="AGE",
        default="1h",
        type=parse_age,
        help="how long the URL works: 90s, 30m, 12h, 7d (1 s to 7 days; default 1h)",
    )

    checksum = _add_command(
        commands,
        "checksum",
        "print a local file's SHA-256 as '<hex>  FILE', like sha256sum",
        "vmstore checksum disk.qcow2",
        backend=False,
    )
    checksum.add_argument("file", metavar="FILE", help="local file to hash; - for stdin")

    inspect = _add_command(
        commands,
        "inspect",
        "show what a local image's header says: format, virtual size, backing file, data file",
        "vmstore inspect disk.qcow2 --json",
        backend=False,
    )
    inspect.add_argument("file", metavar="FILE", help="local image file")
    return parser


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'30m', '12h', '7d', '2w', '90s' or '0' as seconds (argparse type)."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _AGE_UNITS else "s"
    number = value[:-1] if value[-1:] in _AGE_UNITS else value
    try:
        seconds = float(number) * _AGE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an age: {text!r} (examples: 30m, 12h, 7d, 0)"
        ) from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"not an age: {text!r} (it must be 0 or more)")
    return seconds


def _version() -> str:
    from vmstore import __version__

    return __version__
