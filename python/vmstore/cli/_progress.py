"""Progress displays of the ``vmstore`` command: a bar, plain log lines, JSON lines, or none.

Every display is a ``progress_callback(transferred, total)`` and ends with :meth:`finish`,
which says how the transfer ended (and whether it resumed). They all write to stderr: stdout
belongs to the result (``--json``) or to the image itself (``download URL -``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from vmstore.progress import (
    ProgressSample,
    RateMeter,
    format_bytes,
    format_duration,
)

PROGRESS_MODES = ("auto", "bar", "plain", "json", "none")
DEFAULT_PLAIN_INTERVAL = 5.0
DEFAULT_JSON_INTERVAL = 1.0
LABEL_MAX_CELLS = 40
BAR_MIN_CELLS = 12  # "[" + 10 + "]": narrower says nothing the percentage does not
BAR_MAX_CELLS = 32


@dataclass(frozen=True)
class TransferSummary:
    """How a transfer ended, for the display's last word."""

    bytes_transferred: int
    size: int | None
    resumed_from: int = 0


class Display:
    """No output at all (``--progress none``); the base of the others.

    ``known_size=False`` is for a stream of unknown length: the library then reports the
    bytes so far as the total too, which must not read as "100 %, done".
    """

    # None tells the command to pass no callback: a display that shows nothing costs nothing.
    wants_callback = False
    known_size = True

    def __call__(self, transferred: int, total: int) -> None:
        """A progress report from the library."""

    def clear(self) -> None:
        """Make room for a line of other output (a log message) on the same stream."""

    def finish(self, summary: TransferSummary | None) -> None:
        """The transfer ended: with ``summary`` when it succeeded, ``None`` when it failed."""


def cell_width(text: str) -> int:
    """Terminal columns ``text`` takes: East Asian wide and full-width characters take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def printable(text: str) -> str:
    """``text`` with control characters (a newline in a file name) shown as ``?``."""
    return "".join(char if char.isprintable() else "?" for char in text)


def shorten(text: str, cells: int) -> str:
    """``text`` in at most ``cells`` columns, its start replaced by "..." when cut: the end
    of a path (the file name) is what tells two transfers apart."""
    if cell_width(text) <= cells:
        return text
    if cells < 4:
        return ""
    kept = ""
    for char in reversed(text):
        if cell_width(kept) + cell_width(char) > cells - 3:
            break
        kept = char + kept
    return "..." + kept


def _percent(sample: ProgressSample) -> str:
    percent = sample.percent
    return f"{percent:5.1f}%" if percent is not None else ""


def _amount(sample: ProgressSample) -> str:
    if sample.total is None:
        return format_bytes(sample.transferred)
    return f"{format_bytes(sample.transferred)} / {format_bytes(sample.total)}"


def _rate(sample: ProgressSample) -> str:
    return f"{format_bytes(sample.rate)}/s" if sample.rate else "--/s"


def _eta(sample: ProgressSample) -> str:
    if sample.total is None:
        return format_duration(sample.elapsed)  # no ETA for a stream of unknown size
    if sample.done:
        return "done"
    return f"ETA {format_duration(sample.eta)}" if sample.eta is not None else "ETA --:--"


def render_bar_line(label: str, sample: ProgressSample, columns: int) -> str:
    """One bar line that fits in ``columns`` minus one: writing the last column makes some
    terminals wrap, and a wrapped line can no longer be redrawn in place with ``\\r``.

    What goes first when the terminal is narrow: the bar graphic, then the label, the byte
    counts and the rate; the percentage and the ETA stay as long as they fit at all.
    """
    room = max(columns - 1, 1)
    fields = [_percent(sample), _amount(sample), _rate(sample), _eta(sample)]
    droppable = [1, 2]  # the amount, then the rate
    tail = "  ".join(field for field in fields if field)
    while cell_width(tail) > room and droppable:
        fields[droppable.pop(0)] = ""
        tail = "  ".join(field for field in fields if field)
    if cell_width(tail) >= room:
        return tail[:room]
    room -= cell_width(tail) + 1  # the space before the tail
    bar = ""
    wanted_label = min(cell_width(label), LABEL_MAX_CELLS)
    bar_cells = min(BAR_MAX_CELLS, room - wanted_label - 1)
    if sample.total is not None and bar_cells >= BAR_MIN_CELLS:
        inner = bar_cells - 2
        filled = (
            int(inner * min(sample.transferred, sample.total) / sample.total)
            if (sample.total)
            else inner
        )
        bar = "[" + "#" * filled + "-" * (inner - filled) + "]"
        room -= bar_cells + 1
    label_text = shorten(label, min(room, LABEL_MAX_CELLS))
    return " ".join(part for part in (label_text, bar, tail) if part)


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to, asked each time (windows get resized)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return shutil.get_terminal_size().columns


class BarDisplay(Display):
    """One line redrawn in place on a terminal: label, bar, percent, bytes, rate and ETA."""

    wants_callback = True

    def __init__(
        self,
        label: str,
        stream: TextIO,
        *,
        columns: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._label = printable(label)
        self._stream = stream
        self._columns = columns or (lambda: terminal_columns(stream))
        self._meter = RateMeter(clock=clock)
        self._drawn = False

    def __call__(self, transferred: int, total: int) -> None:
        sample = self._meter.sample(transferred, total if self.known_size else None)
        line = render_bar_line(self._label, sample, self._columns())
        # \x1b[K clears what a longer earlier line left to the right.
        self._stream.write(f"\r{line}\x1b[K")
        self._stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._drawn = False

    def finish(self, summary: TransferSummary | None) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._drawn = False
        if summary is not None and summary.resumed_from:
            self._stream.write(f"vmstore: {resumed_note(summary)}\n")
        self._stream.flush()


def resumed_note(summary: TransferSummary) -> str:
    return (
        f"resumed from {format_bytes(summary.resumed_from)} ({summary.resumed_from} bytes "
        "already in place and verified)"
    )


class PlainDisplay(Display):
    """A line every ``interval`` seconds, for logs (pods, CI, journald): no \\r, no escapes."""

    wants_callback = True

    def __init__(
        self,
        label: str,
        stream: TextIO,
        *,
        interval: float = DEFAULT_PLAIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._label = printable(label)
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._started = clock()
        self._meter = RateMeter(clock=clock)
        # The first line too waits one interval: a transfer that ends sooner says only "done".
        self._last_line = self._started

    def __call__(self, transferred: int, total: int) -> None:
        sample = self._meter.sample(transferred, total if self.known_size else None)
        now = self._clock()
        if sample.done:
            return  # the final line comes from finish(), which knows how it ended
        if now - self._last_line < self._interval:
            return
        self._last_line = now
        parts = [_amount(sample), _rate(sample)]
        if sample.total is not None:
            parts.insert(0, _percent(sample).strip())
            parts.append(_eta(sample))
        self._write(", ".join(parts))

    def finish(self, summary: TransferSummary | None) -> None:
        if summary is None:
            return  # the error message says what happened
        elapsed = self._clock() - self._started
        text = f"done, {format_bytes(summary.size or summary.bytes_transferred)}"
        text += f" in {format_duration(elapsed)}"
        if elapsed > 0 and summary.bytes_transferred:
            text += f" ({format_bytes(summary.bytes_transferred / elapsed)}/s)"
        if summary.resumed_from:
            text += f"; {resumed_note(summary)}"
        self._write(text)

    def _write(self, text: str) -> None:
        self._stream.write(f"vmstore: {self._label}: {text}\n")
        self._stream.flush()


class JsonDisplay(Display):
    """One JSON object per line, for a controller that parses stderr.

    ``{"event": "progress", "transferred": N, "total": N|null, "rate": bytes/s|null,
    "eta": seconds|null, "percent": float|null}`` at the first report and then every
    ``interval`` seconds and at 100 %, then ``{"event": "done", ...}`` on success.
    """

    wants_callback = True

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = DEFAULT_JSON_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._started = clock()
        self._meter = RateMeter(clock=clock)
        self._last_event: float | None = None

    def __call__(self, transferred: int, total: int) -> None:
        sample = self._meter.sample(transferred, total if self.known_size else None)
        now = self._clock()
        if (
            not sample.done
            and self._last_event is not None
            and now - self._last_event < self._interval
        ):
            return
        self._last_event = now
        percent = sample.percent
        write_json_line(
            self._stream,
            {
                "event": "progress",
                "transferred": sample.transferred,
                "total": sample.total,
                "rate": round(sample.rate) if sample.rate is not None else None,
                "eta": round(sample.eta, 1) if sample.eta is not None else None,
                "percent": round(percent, 2) if percent is not None else None,
            },
        )

    def finish(self, summary: TransferSummary | None) -> None:
        if summary is None:
            return
        write_json_line(
            self._stream,
            {
                "event": "done",
                "size": summary.size,
                "bytes_transferred": summary.bytes_transferred,
                "resumed_from": summary.resumed_from,
                "elapsed": round(self._clock() - self._started, 3),
            },
        )


def write_json_line(stream: TextIO, event: dict[str, object]) -> None:
    stream.write(json.dumps(event) + "\n")
    stream.flush()


def make_display(
    mode: str,
    label: str,
    stream: TextIO,
    *,
    interval: float | None = None,
    known_size: bool = True,
) -> Display:
    """The display ``--progress mode`` asks for; ``auto`` is a bar on a terminal and plain
    lines anywhere else (a pod log, CI, journald: a long transfer must show it moves)."""
    if mode == "auto":
        mode = "bar" if _is_terminal(stream) and os.environ.get("TERM") != "dumb" else "plain"
    display: Display
    if mode == "bar":
        display = BarDisplay(label, stream)
    elif mode == "plain":
        plain_interval = DEFAULT_PLAIN_INTERVAL if interval is None else interval
        display = PlainDisplay(label, stream, interval=plain_interval)
    elif mode == "json":
        json_interval = DEFAULT_JSON_INTERVAL if interval is None else interval
        display = JsonDisplay(stream, interval=json_interval)
    else:
        display = Display()
    display.known_size = known_size
    return display


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False
