"""What each ``vmstore`` command does, and how a failure is put into the user's words."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import BinaryIO, cast
from urllib.parse import unquote, urlsplit

from vmstore import _native
from vmstore._codec import read_key_file
from vmstore.cli._output import Console, Failure
from vmstore.cli._parser import (
    EXIT_CODE_BY_ERROR_TYPE,
    EXIT_DESTINATION_EXISTS,
    EXIT_USAGE,
    FLAG_BY_FIELD,
    STREAM,
)
from vmstore.cli._progress import Display, TransferSummary
from vmstore.config import _ENV_VARIABLES, StorageConfig, parse_byte_size
from vmstore.errors import (
    ChecksumMismatchError,
    ErrorType,
    InvalidConfigError,
    PermissionDeniedError,
    StorageError,
)
from vmstore.images import inspect_image
from vmstore.models import (
    DownloadRequest,
    DownloadResponse,
    ProgressCallback,
    UploadRequest,
    UploadResponse,
)
from vmstore.progress import PROGRESS_INTERVAL_SECONDS, ProgressReporter
from vmstore.storage import Storage, new_storage
from vmstore.urls import redact_url, url_scheme

# The backend a URL names by its scheme when neither --type nor VMSTORE_TYPE says.
TYPE_BY_SCHEME = {"s3": "s3", "nfs": "nfs", "http": "http", "https": "https"}

STDIN_BLOCK = 4 << 20


class CommandFailed(Exception):
    """A failure the command itself detects (not the library's): already in its words."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def usage_failure(message: str) -> CommandFailed:
    return CommandFailed(Failure("Usage", message, EXIT_USAGE))


# --- where each setting came from, so messages name what the user typed ------------------

_FIELD_REFERENCE = re.compile(r"StorageConfig\.(\w+)(?: \([A-Z_]+(?:, [A-Z_]+)*\))?")
_VARIABLE_ASIDE = re.compile(r" \((VMSTORE_[A-Z_]+|AWS_[A-Z_]+)\)")
# Request fields that messages name, and the flag that sets each.
_FLAG_BY_REQUEST_FIELD = {"size_hint": "--size", "expected_checksum": "--expected-checksum"}
_REQUEST_FIELD = re.compile(
    r"\b(?:UploadRequest\.|DownloadRequest\.)?(" + "|".join(_FLAG_BY_REQUEST_FIELD) + r")\b"
)


@dataclass
class SettingOrigins:
    """For each StorageConfig field: the flag or environment variable that set it."""

    environ: Mapping[str, str]
    origin: dict[str, str] = field(default_factory=dict)

    def name_of(self, field_name: str) -> str:
        """``--concurrency`` if the flag set it, ``VMSTORE_CONCURRENCY`` if the environment
        did, and both ways to set it when neither did."""
        given = self.origin.get(field_name)
        if given is not None:
            return given
        flag = FLAG_BY_FIELD.get(field_name)
        variables = " or ".join(_ENV_VARIABLES.get(field_name, ()))
        if flag and variables:
            return f"{flag} (or {variables})"
        return flag or variables or field_name

    def explain(self, message: str) -> str:
        """``message`` with StorageConfig field names put as the user would set them."""
        message = _FIELD_REFERENCE.sub(lambda match: self.name_of(match.group(1)), message)
        message = message.replace("insecure_skip_verify=True", self.name_of("insecure_skip_verify"))
        message = _REQUEST_FIELD.sub(lambda match: _FLAG_BY_REQUEST_FIELD[match.group(1)], message)
        # "set --endpoint (or VMSTORE_ENDPOINT) ... (VMSTORE_ENDPOINT)": say it once.
        return _VARIABLE_ASIDE.sub(
            lambda match: "" if match.group(1) in message[: match.start()] else match.group(0),
            message,
        )


def setting_origins(args: argparse.Namespace, environ: Mapping[str, str]) -> SettingOrigins:
    origins = SettingOrigins(environ)
    for field_name, flag in FLAG_BY_FIELD.items():
        if getattr(args, field_name, None) is not None:
            origins.origin[field_name] = flag
    for field_name, variables in _ENV_VARIABLES.items():
        if field_name in origins.origin:
            continue
        for variable in variables:
            if variable in environ:
                origins.origin[field_name] = variable
                break
    return origins


def open_storage(args: argparse.Namespace, url: str, origins: SettingOrigins) -> Storage:
    backend_type = args.type
    if backend_type is None and not origins.environ.get("VMSTORE_TYPE", "").strip():
        backend_type = TYPE_BY_SCHEME.get(url_scheme(url))
        if backend_type is None:
            raise InvalidConfigError(
                f"cannot tell the backend from {url!r}: give a URL that starts with s3://, "
                "nfs://, http:// or https://, or pass --type (or set VMSTORE_TYPE)"
            )
        origins.origin["type"] = f"the scheme of {redact_url(url)!r}"
    key_file = getattr(args, "encryption_key_file", None)
    if key_file is not None:
        origins.origin["encryption_key"] = "--encryption-key-file"
    config = StorageConfig.from_env(
        environ=origins.environ,
        type=backend_type,
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
        encryption_key=read_key_file(key_file) if key_file is not None else None,
        allowed_hosts=args.allowed_hosts,

        max_bandwidth=limit_rate(getattr(args, "max_bandwidth", None)),
    )
    return new_storage(config)


def limit_rate(text: str | None) -> int | None:
    """``--limit-rate``'s bytes per second ("100M", "512k", "0"); None when not given."""
    if text is None:
        return None
    try:
        return parse_byte_size(text)
    except ValueError as exc:
        raise InvalidConfigError(
            f"invalid --limit-rate {text!r}: {exc}; give bytes per second, e.g. 100M "
            "(0 for no limit)",
            cause=exc,
        ) from exc


# --- translating the library's errors -----------------------------------------------------

# The NFS backend refuses a path that leaves the share with PermissionDeniedError, whose
# name reads like refused credentials; these are the phrases its messages use for it.
_OUTSIDE_SHARE = re.compile(
    r"outside (?:the )?(?:NFS )?mount point|climbs out of the mount point|outside the share"
)


@dataclass
class Invocation:
    """One run of a command: its arguments, output, and what its failures should say."""

    args: argparse.Namespace
    console: Console
    origins: SettingOrigins
    stream_destination: bool = False

    def failure_of(self, error: StorageError) -> Failure:
        message = self.origins.explain(error.message)
        exit_status = EXIT_CODE_BY_ERROR_TYPE.get(
            error.type, EXIT_CODE_BY_ERROR_TYPE[ErrorType.OPERATION_FAILED]
        )
        if isinstance(error, PermissionDeniedError) and _OUTSIDE_SHARE.search(message):
            return Failure(
                error.type.value,
                f"{message} (not a credentials problem: the path leaves the share)",
                exit_status,
                label="OutsideShare",
                reason="OutsideShare",
            )
        if self.stream_destination and _caused_by(error, BrokenPipeError):
            return stdout_closed_failure()
        if isinstance(error, ChecksumMismatchError) and self.stream_destination:
            message += (
                "; the bytes were already written to stdout: whatever read them has received "
                "a corrupt image and must discard it"
            )
        return Failure(error.type.value, message, exit_status)


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def stdout_closed_failure() -> Failure:
    """The reader of ``download URL -`` went away (``| head``, a consumer that crashed)."""
    # Whatever is still buffered for stdout can never be delivered; point the descriptor at
    # /dev/null so the interpreter's final flush does not fail a second time.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return Failure(
        ErrorType.OPERATION_FAILED.value,
        "stdout was closed before the download finished (the reading end of the pipe exited); "
        "what it received is incomplete and unverified",
        EXIT_CODE_BY_ERROR_TYPE[ErrorType.OPERATION_FAILED],
    )


# --- the commands -------------------------------------------------------------------------


def _callback(display: Display) -> ProgressCallback | None:
    return display if display.wants_callback else None


def run_upload(run: Invocation) -> int:
    args = run.args
    sources: list[str] = args.source if isinstance(args.source, list) else [args.source]
    if len(sources) > 1 or args.url.endswith("/"):
        return run_upload_many(run, sources)
    args.source = sources[0]
    from_stdin = args.source == STREAM
    if args.size is not None and not from_stdin:
        raise usage_failure("--size is for a stream (SOURCE -); a file's size is read from it")
    if from_stdin and _is_terminal(sys.stdin):
        raise usage_failure(
            "SOURCE - reads the image from stdin, which is a terminal; pipe it in "
            "(qemu-img convert -O raw disk.qcow2 /dev/stdout | vmstore upload - URL)"
        )
    label = f"upload {'<stdin>' if from_stdin else args.source}"
    with open_storage(args, args.url, run.origins) as store:
        display = run.console.start_progress(
            label, known_size=not from_stdin or args.size is not None
        )
        summary: TransferSummary | None = None
        try:
            request = UploadRequest(
                source_path=None if from_stdin else args.source,
                source_stream=sys.stdin.buffer if from_stdin else None,
                size_hint=args.size,
                destination_url=args.url,
                metadata=dict(args.metadata),
                progress_callback=_callback(display),
                content_type=args.content_type,
                resume=not from_stdin and not args.no_resume,  # a stream cannot be re-read
                compression=args.compress,
                allow_backing_file=args.allow_backing_file,
            )
            response = store.upload(request)
            summary = TransferSummary(
                response.bytes_transferred, response.size, response.resumed_from
            )
        finally:
            display.finish(summary)
    run.console.result(
        {
            "url": response.url,
            "source": args.source,
            "size": response.size,
            "checksum": response.checksum,
            "bytes_transferred": response.bytes_transferred,
            "resumed_from": response.resumed_from,
            "etag": response.etag,
        }
    )
    return 0


def run_download(run: Invocation) -> int:
    args = run.args
    urls: list[str] = args.url if isinstance(args.url, list) else [args.url]
    if len(urls) > 1 or args.destination.endswith("/"):
        return run_download_many(run, urls)
    args.url = urls[0]
    to_stdout = args.destination == STREAM
    if to_stdout:
        if _is_terminal(sys.stdout):
            raise usage_failure(
                "DEST - writes the image to stdout, which is a terminal; redirect it "
                "(vmstore download URL - > disk.img, or | qemu-img dd ...) or give a file"
            )
        run.console.reserve_stdout_for_data()
        run.stream_destination = True
    elif args.no_clobber and os.path.lexists(args.destination):
        raise CommandFailed(
            Failure(
                "DestinationExists",
                f"{args.destination} already exists and --no-clobber was given; nothing was "
                "downloaded (remove it, choose another DEST, or drop --no-clobber)",
                EXIT_DESTINATION_EXISTS,
            )
        )
    label = f"download {redact_url(args.url)}"  # a presigned URL's query is a credential
    with open_storage(args, args.url, run.origins) as store:
        display = run.console.start_progress(label)
        summary: TransferSummary | None = None
        try:
            request = DownloadRequest(
                source_url=args.url,
                destination_path=None if to_stdout else args.destination,
                destination_stream=sys.stdout.buffer if to_stdout else None,
                verify_checksum=not args.no_verify,
                expected_checksum=args.expected_checksum,
                progress_callback=_callback(display),
                # What went to a stream's reader cannot be taken back and re-sent.
                resume=not to_stdout and not args.no_resume,
                allow_backing_file=args.allow_backing_file,
            )
            response = store.download(request)
            if to_stdout:
                sys.stdout.buffer.flush()
            summary = TransferSummary(
                response.bytes_transferred, response.content_length, response.resumed_from
            )
        finally:
            display.finish(summary)
    run.console.result(
        {
            "url": redact_url(args.url),
            "destination": response.destination_path or STREAM,
            "size": response.content_length,
            "checksum": response.checksum,
            "bytes_transferred": response.bytes_transferred,
            "resumed_from": response.resumed_from,
        }
    )
    return 0


# --- several at once: one budget, one progress view, a line (or JSON item) per item -------


def _many_usage(what: str, where: str) -> CommandFailed:
    return usage_failure(
        f"several {what}s go to a {where} ending in '/' (each keeps its file name); "
        f"give one {what} to name the destination itself"
    )


def run_upload_many(run: Invocation, sources: list[str]) -> int:
    args = run.args
    if not args.url.endswith("/"):
        raise _many_usage("SOURCE", "URL")
    if STREAM in sources:
        raise usage_failure("SOURCE - (stdin) can only be uploaded alone")
    if args.size is not None:
        raise usage_failure("--size is for a stream (SOURCE -); a file's size is read from it")
    requests = [
        UploadRequest(
            source_path=source,
            destination_url=args.url + os.path.basename(os.path.normpath(source)),
            metadata=dict(args.metadata),
            content_type=args.content_type,
            resume=not args.no_resume,
        )
        for source in sources
    ]
    with open_storage(args, args.url, run.origins) as store:
        display = run.console.start_progress(_count_label("upload", len(sources)))
        done: list[UploadResponse | StorageError] | None = None
        try:
            done = store.upload_many(requests, progress_callback=_callback(display))
        finally:
            display.finish(_many_summary(done))
    results = done
    rows: list[dict[str, object]] = []
    for request, result in zip(requests, results, strict=True):
        row: dict[str, object] = {"source": request.source_path, "url": request.destination_url}
        if isinstance(result, StorageError):
            row["error"] = run.failure_of(result).as_json()["error"]
        else:
            row.update(
                url=result.url,
                size=result.size,
                checksum=result.checksum,
                bytes_transferred=result.bytes_transferred,
                resumed_from=result.resumed_from,
                etag=result.etag,
            )
        rows.append(row)
    return _report_many(run, rows, [r for r in results if isinstance(r, StorageError)])


def run_download_many(run: Invocation, urls: list[str]) -> int:
    args = run.args
    directory = args.destination
    if not directory.endswith("/"):
        raise _many_usage("URL", "DEST directory")
    if args.no_clobber:
        existing = [url for url in urls if os.path.lexists(directory + _file_name(url))]
        if existing:
            raise CommandFailed(
                Failure(
                    "DestinationExists",
                    f"{directory + _file_name(existing[0])} already exists and --no-clobber "
                    "was given; nothing was downloaded",
                    EXIT_DESTINATION_EXISTS,
                )
            )
    requests = [
        DownloadRequest(
            source_url=url,
            destination_path=directory + _file_name(url),
            verify_checksum=not args.no_verify,
            expected_checksum=args.expected_checksum,
            resume=not args.no_resume,
        )
        for url in urls
    ]
    with open_storage(args, urls[0], run.origins) as store:
        display = run.console.start_progress(_count_label("download", len(urls)))
        done: list[DownloadResponse | StorageError] | None = None
        try:
            done = store.download_many(requests, progress_callback=_callback(display))
        finally:
            display.finish(_many_summary(done))
    results = done
    rows: list[dict[str, object]] = []
    for request, result in zip(requests, results, strict=True):
        row: dict[str, object] = {
            "url": redact_url(request.source_url),
            "destination": request.destination_path,
        }
        if isinstance(result, StorageError):
            row["error"] = run.failure_of(result).as_json()["error"]
        else:
            row.update(
                size=result.content_length,
                checksum=result.checksum,
                bytes_transferred=result.bytes_transferred,
                resumed_from=result.resumed_from,
            )
        rows.append(row)
    return _report_many(run, rows, [r for r in results if isinstance(r, StorageError)])


def _count_label(verb: str, count: int) -> str:
    return f"{verb} {count} file{'s' if count != 1 else ''}"


def _file_name(url: str) -> str:
    """The name a downloaded object gets in DEST/: the last segment of its URL's path."""
    name = unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2])
    if not name or name in (".", ".."):
        raise usage_failure(f"{redact_url(url)} names no file to put in the DEST directory")
    return name


def _many_summary(results: Sequence[object] | None) -> TransferSummary | None:
    if results is None:
        return None
    moved = total = resumed = 0
    for result in results:
        if isinstance(result, UploadResponse):
            moved, total = moved + result.bytes_transferred, total + result.size
            resumed += result.resumed_from
        elif isinstance(result, DownloadResponse):
            moved, total = moved + result.bytes_transferred, total + result.content_length
            resumed += result.resumed_from
    return TransferSummary(moved, total, resumed)


def _report_many(
    run: Invocation, rows: list[dict[str, object]], failures: list[StorageError]
) -> int:
    """One JSON object listing every item, or a line per item (failures on stderr); the exit
    status is that of the first failure's type, 0 when none failed."""
    if run.console.json_result:
        run.console.result({"items": rows, "failed": len(failures)})
    else:
        for row in rows:
            name = row.get("source") or row["url"]
            if "error" in row:
                error = row["error"]
                assert isinstance(error, dict)
                run.console.stderr.write(
                    f"vmstore: error ({error['type']}): {name}: {error['message']}\n"
                )
            else:
                target = row.get("destination") or row["url"]
                run.console.text(f"{row['checksum']}  {name} -> {target}")
        run.console.stderr.flush()
    if not failures:
        return 0
    return run.failure_of(failures[0]).exit_status


def run_stat(run: Invocation) -> int:
    with open_storage(run.args, run.args.url, run.origins) as store:
        metadata = store.get_metadata(run.args.url)
    run.console.result(asdict(metadata))
    return 0


def run_rm(run: Invocation) -> int:
    with open_storage(run.args, run.args.url, run.origins) as store:
        store.delete(run.args.url)
    if run.console.json_result:
        run.console.result({"url": run.args.url})
    return 0


def run_presign(run: Invocation) -> int:
    seconds = run.args.expires_in
    if seconds != int(seconds):
        raise usage_failure(f"--expires-in must be whole seconds, not {seconds:g}")
    with open_storage(run.args, run.args.url, run.origins) as store:
        presigned = store.presign(run.args.url, expires_in=int(seconds))
    # The URL itself is the result (it carries its signature: whoever has it can read the
    # object until it expires); nothing else prints it.
    if run.console.json_result:
        run.console.result({"url": presigned, "expires_in": int(seconds)})
    else:
        run.console.text(presigned)
    return 0


def run_gc(run: Invocation) -> int:
    args = run.args
    # No prefix: the backend comes from --type / VMSTORE_TYPE (there is no URL to read it from).
    with open_storage(args, args.prefix, run.origins) as store:
        if args.dry_run:
            found = store.list_incomplete(args.prefix)
            cutoff = datetime.now(UTC) - timedelta(seconds=args.older_than)
            chosen = [t for t in found if t.modified <= cutoff]
        else:
            chosen = store.cleanup_incomplete(args.older_than)
            if args.prefix:
                chosen = [t for t in chosen if t.url.startswith(args.prefix.rstrip("/"))]
    rows = [
        {
            "url": t.url,
            "kind": t.kind,
            "location": t.location,
            "bytes_done": t.bytes_done,
            "modified": t.modified.isoformat(),
        }
        for t in chosen
    ]
    if run.console.json_result:
        run.console.result({"removed" if not args.dry_run else "would_remove": rows})
    else:
        verb = "would remove" if args.dry_run else "removed"
        for row in rows:
            run.console.text(
                f"{verb} {row['kind']} {row['url']} ({row['location']}, "
                f"{row['bytes_done']} bytes)"
            )
        if not rows:
            run.console.text(f"nothing to remove older than {args.older_than:g} s")
    return 0


def run_checksum(run: Invocation) -> int:
    name = run.args.file
    from_stdin = name == STREAM
    if from_stdin and _is_terminal(sys.stdin):
        raise usage_failure("FILE - hashes stdin, which is a terminal; pipe the data in")
    display = run.console.start_progress(
        f"sha256 {'<stdin>' if from_stdin else name}", known_size=not from_stdin
    )
    summary: TransferSummary | None = None
    try:
        if from_stdin:
            digest, size = _hash_stream(sys.stdin.buffer, display)
        else:
            # A Python callback even with no display: it is what lets Ctrl-C stop a long hash.
            progress = _callback(display) or ProgressReporter(None)
            digest = _native.sha256_file(name, progress=progress)
            size = os.stat(name).st_size
        summary = TransferSummary(size, size)
    finally:
        display.finish(summary)
    if run.console.json_result:
        run.console.result({"source": name, "size": size, "checksum": digest})
    else:
        run.console.text(f"{digest}  {name}")
    return 0


def _hash_stream(stream: BinaryIO, display: Display) -> tuple[str, int]:
    # readinto1: what the pipe holds now (one read), not a full buffer, so progress moves
    # with a slow producer.
    readinto = cast("io.BufferedIOBase", stream).readinto1
    hasher = _native.Sha256()
    buffer = bytearray(STDIN_BLOCK)
    view = memoryview(buffer)
    reporter = _UnknownTotalReporter(display)
    while True:
        count = readinto(view)
        if not count:
            break
        hasher.update(view[:count])
        reporter.advance(count)
    return hasher.hexdigest(), hasher.bytes_hashed


class _UnknownTotalReporter:
    """Progress of a stream whose length is unknown: reports ``(done, 0)`` at most every
    100 ms (ProgressReporter clamps to its total, which a stream does not have)."""

    def __init__(self, display: Display) -> None:
        self._display = display
        self._clock = time.monotonic
        self._done = 0
        self._last = float("-inf")

    def advance(self, count: int) -> None:
        self._done += count
        now = self._clock()
        if self._display.wants_callback and now - self._last >= PROGRESS_INTERVAL_SECONDS:
            self._last = now
            self._display(self._done, 0)


def _is_terminal(stream: object) -> bool:
    isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


def run_inspect(run: Invocation) -> int:
    info = inspect_image(run.args.file)
    fields: dict[str, object] = {"file": run.args.file, **info.to_dict()}
    fields["refers_to_other_files"] = info.refers_to_other_files
    if not run.console.json_result:
        # One line per field; lists as comma-separated names, "-" for none.
        fields = {
            name: (", ".join(value) or None) if isinstance(value, list) else value
            for name, value in fields.items()
        }
    run.console.result(fields)
    return 0


HANDLERS: dict[str, Callable[[Invocation], int]] = {
    "upload": run_upload,
    "download": run_download,
    "stat": run_stat,
    "rm": run_rm,
    "gc": run_gc,
    "presign": run_presign,
    "checksum": run_checksum,
    "inspect": run_inspect,
}
