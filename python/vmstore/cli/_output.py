"""Where the command's words go: results, errors, log lines and progress.

stdout carries the result (``--json``: one object; otherwise ``key: value`` lines), or the
image itself for ``download URL -``, and then nothing else. stderr carries progress, log lines
and error messages; with ``--progress json`` every line on stderr is a JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

from vmstore.cli._progress import BarDisplay, Display, make_display, write_json_line


@dataclass(frozen=True)
class Failure:
    """A failure as the command reports it.

    ``type`` is an ErrorType value (``NotFound``, ...) or one of the command's own
    (``Usage``, ``DestinationExists``, ``Interrupted``); ``label`` is what the text line shows
    in parentheses, when it should read differently from the type (``OutsideShare``).
    """

    type: str
    message: str
    exit_status: int
    label: str | None = None
    reason: str | None = None

    def as_json(self) -> dict[str, object]:
        error: dict[str, object] = {"type": self.type, "message": self.message}
        if self.reason is not None:
            error["reason"] = self.reason
        return {"error": error}


class Console:
    """The command's output streams and the progress display of the transfer under way."""

    def __init__(
        self,
        *,
        json_result: bool = False,
        progress_mode: str = "auto",
        progress_interval: float | None = None,
    ) -> None:
        self.json_result = json_result
        self.progress_mode = progress_mode
        self.progress_interval = progress_interval
        self.result_stream: TextIO = sys.stdout
        self.display: Display = Display()

    @property
    def stderr(self) -> TextIO:
        # Looked up each time: tests and embedding callers may swap sys.stderr.
        return sys.stderr

    def reserve_stdout_for_data(self) -> None:
        """stdout carries the image: the result goes to stderr, like everything else."""
        self.result_stream = sys.stderr

    def start_progress(self, label: str, *, known_size: bool = True) -> Display:
        self.display = make_display(
            self.progress_mode,
            label,
            self.stderr,
            interval=self.progress_interval,
            known_size=known_size,
        )
        return self.display

    def result(self, fields: dict[str, object]) -> None:
        stream = self.result_stream
        if self.json_result:
            stream.write(json.dumps(fields, default=_json_value) + "\n")
        else:
            width = max((len(name) for name in fields), default=0)
            for name, value in fields.items():
                stream.write(f"{name + ':':<{width + 1}} {_text_value(value)}\n")
        stream.flush()

    def text(self, line: str) -> None:
        """A line of plain result text (``checksum`` prints like sha256sum)."""
        self.result_stream.write(line + "\n")
        self.result_stream.flush()

    def failure(self, failure: Failure) -> None:
        self.display.clear()
        if self.json_result:
            write_json_line(self.result_stream, failure.as_json())
            if self.result_stream is self.stderr:
                return  # said once on stderr is enough
        if self.progress_mode == "json":
            event: dict[str, object] = {"event": "error", **failure.as_json()["error"]}  # type: ignore[dict-item]
            write_json_line(self.stderr, event)
            return
        if failure.type == "Interrupted":
            newline = (
                "\n"
                if _is_terminal(self.stderr) and not isinstance(self.display, BarDisplay)
                else ""
            )  # step off the line where the terminal echoed ^C
            self.stderr.write(f"{newline}vmstore: {failure.message}\n")
        else:
            label = failure.label or failure.type
            self.stderr.write(f"vmstore: error ({label}): {failure.message}\n")
        self.stderr.flush()

    def log(self, record: logging.LogRecord, formatted: str) -> None:
        self.display.clear()
        if self.progress_mode == "json":
            write_json_line(
                self.stderr,
                {
                    "event": "log",
                    "level": record.levelname.lower(),
                    "message": record.getMessage(),
                },
            )
        else:
            self.stderr.write(formatted + "\n")
            self.stderr.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


def _json_value(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _text_value(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return " ".join(f"{key}={item}" for key, item in sorted(value.items()))
    if value is None:
        return "-"
    return str(value)


class _ConsoleLogHandler(logging.Handler):
    """Sends the library's log records through the console in charge (it clears the bar
    first, or turns them into JSON events)."""

    def __init__(self) -> None:
        super().__init__()
        self.console: Console | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            formatted = self.format(record)
            if self.console is not None:
                self.console.log(record, formatted)
            else:
                sys.stderr.write(formatted + "\n")
        except Exception:  # noqa: BLE001 -- logging must never fail the command
            self.handleError(record)


_log_handler = _ConsoleLogHandler()
_log_handler.setFormatter(logging.Formatter("vmstore: %(levelname)s: %(message)s"))


def configure_logging(console: Console, verbose: bool) -> None:
    library_logger = logging.getLogger("vmstore")
    if _log_handler not in library_logger.handlers:
        library_logger.addHandler(_log_handler)
    _log_handler.console = console
    library_logger.setLevel(logging.INFO if verbose else logging.WARNING)
