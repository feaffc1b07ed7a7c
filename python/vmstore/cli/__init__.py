"""The ``vmstore`` command: upload, download, stat, rm and checksum from a shell.

``main`` is the console script's entry point; the pieces live beside it: ``_parser`` (flags,
help, exit statuses), ``_commands`` (what each command does), ``_output`` (stdout/stderr)
and ``_progress`` (the bar, plain and JSON progress displays).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType

from vmstore._download import PARTIAL_SUFFIX
from vmstore._oserrors import storage_error_from_oserror
from vmstore.cli._commands import (
    HANDLERS,
    CommandFailed,
    Invocation,
    SettingOrigins,
    setting_origins,
    stdout_closed_failure,
)
from vmstore.cli._output import Console, Failure, configure_logging
from vmstore.cli._parser import (
    EXIT_CODE_BY_ERROR_TYPE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    UsageError,
    build_parser,
)
from vmstore.cli._progress import PROGRESS_MODES
from vmstore.errors import StorageError

__all__ = ["EXIT_CODE_BY_ERROR_TYPE", "build_parser", "main"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: the library treats both
    as an interruption (partial kept for a resume), so a pod being stopped loses no work."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # Once: a second SIGTERM must not break off the cleanup that keeps the partial file.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted_failure(args: argparse.Namespace, terminated: bool) -> Failure:
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    command = args.command
    if command == "upload" and args.source == "-":
        note = "a stream cannot be resumed: run the command again to start over"
    elif command == "download" and args.destination == "-":
        note = (
            "the bytes already written to stdout are incomplete and were not verified; a "
            "stream cannot be resumed: run the command again to start over"
        )
    elif command in ("upload", "download") and args.no_resume:
        note = "the partial file was removed (--no-resume)"
    elif command == "download" and isinstance(args.url, list):
        # Several files (DEST is a directory): each keeps its own partial.
        note = "each unfinished file's partial was kept: run the same command again to resume"
    elif command == "download" and not os.path.exists(args.destination + PARTIAL_SUFFIX):
        note = "it stopped before any data was kept; run the same command again"
    elif command == "download":
        note = (
            f"the partial file {args.destination + PARTIAL_SUFFIX} was kept: run the same "
            "command again to resume"
        )
    elif command == "upload":
        note = "what was stored so far is kept: run the same command again to resume"
    else:
        note = ""
    message = f"{what}; {note}" if note else what
    return Failure("Interrupted", message, EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)


def _progress_mode(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.progress is not None:
        return str(args.progress)
    mode = environ.get("VMSTORE_PROGRESS", "").strip().lower() or "auto"
    if mode not in PROGRESS_MODES:
        raise CommandFailed(
            Failure(
                "Usage",
                f"VMSTORE_PROGRESS={mode!r} is not a progress mode; use one of "
                f"{', '.join(PROGRESS_MODES)}",
                EXIT_USAGE,
            )
        )
    return mode


def _usage_failure(error: UsageError, argv: Sequence[str]) -> int:
    error.parser.print_usage(sys.stderr)
    sys.stderr.write(f"{error.parser.prog}: error: {error.message}\n")
    # Parsing failed, so --json is looked for by hand: a controller still gets an object.
    if "--json" in argv:
        Console(json_result=True).failure(Failure("Usage", error.message, EXIT_USAGE))
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    with _sigterm_as_interrupt():
        return _run(list(sys.argv[1:] if argv is None else argv), os.environ)


def _run(arguments: list[str], environ: Mapping[str, str]) -> int:
    try:
        args = build_parser().parse_args(arguments)
    except UsageError as exc:
        return _usage_failure(exc, arguments)
    except SystemExit as exc:  # --help or --version, already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    console = Console(json_result=args.json)
    run = Invocation(args, console, SettingOrigins(environ))
    try:
        console.progress_mode = _progress_mode(args, environ)
        console.progress_interval = args.progress_interval
        configure_logging(console, args.verbose)
        run.origins = setting_origins(args, environ)
        return HANDLERS[args.command](run)
    except Terminated:
        failure = _interrupted_failure(args, terminated=True)
    except KeyboardInterrupt:
        failure = _interrupted_failure(args, terminated=False)
    except CommandFailed as exc:
        failure = exc.failure
    except StorageError as exc:
        failure = run.failure_of(exc)
    except BrokenPipeError:
        failure = stdout_closed_failure()
    except OSError as exc:  # from Python-side file access the backends did not map
        path = str(exc.filename) if exc.filename is not None else "a file"
        failure = run.failure_of(storage_error_from_oserror(exc, "access", path))
    console.failure(failure)
    return failure.exit_status


if __name__ == "__main__":
    sys.exit(main())
