"""What interrupted transfers leave behind, found and removed (``list_incomplete`` /
``cleanup_incomplete`` on every backend, ``vmstore gc``).

Uploads leave their state where they store: open multipart uploads on S3 (stored, and billed,
until aborted), partial files inside an NFS share. A download leaves ``<dest>.vmstore-partial``
and its state file beside a destination anywhere on this host, so each download records its
partial in vmstore's state directory (``$VMSTORE_STATE_DIR``, default
``~/.local/state/vmstore``) when it starts and forgets it when it commits or removes it: the
record is what lets a later ``gc`` find the partial of a download that was killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from datetime import UTC, datetime, timedelta

from vmstore.errors import InvalidConfigError
from vmstore.models import IncompleteTransfer

log = logging.getLogger("vmstore.incomplete")


def state_dir() -> str:
    """vmstore's per-user state directory (resume journals, download records)."""
    configured = os.environ.get("VMSTORE_STATE_DIR")
    if configured:
        return configured
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "vmstore")


def _records_dir() -> str:
    return os.path.join(state_dir(), "downloads")


def _record_path(partial: str) -> str:
    ident = hashlib.sha256(os.path.abspath(partial).encode()).hexdigest()[:40]
    return os.path.join(_records_dir(), f"{ident}.json")


def record_download(url: str, partial: str, state: str | None) -> None:
    """Note that a download of ``url`` is writing ``partial`` (and ``state``) on this host."""
    path = _record_path(partial)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = f"{path}.{os.getpid()}.tmp"
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump({"url": url, "partial": os.path.abspath(partial), "state": state}, handle)
        os.replace(temp, path)
    except OSError as exc:
        # Not being able to record it costs only a gc that will not find it.
        log.debug("could not record the partial %s in %s: %s", partial, path, exc)


def forget_download(partial: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(_record_path(partial))


def cutoff(older_than: float | timedelta) -> datetime:
    """The moment before which a leftover counts as abandoned."""
    if isinstance(older_than, timedelta):
        seconds = older_than.total_seconds()
    elif isinstance(older_than, int | float) and not isinstance(older_than, bool):
        seconds = float(older_than)
    else:
        raise InvalidConfigError(
            f"older_than must be seconds or a timedelta, not {type(older_than).__name__}"
        )
    if not seconds >= 0 or seconds == float("inf"):
        raise InvalidConfigError(
            f"older_than must be a finite number of seconds >= 0, not {seconds}"
        )
    return datetime.now(UTC) - timedelta(seconds=seconds)


def _mtime(path: str) -> datetime | None:
    try:
        return datetime.fromtimestamp(os.stat(path).st_mtime, UTC)
    except OSError:
        return None


def _records() -> list[tuple[str, dict[str, object]]]:
    try:
        names = os.listdir(_records_dir())
    except OSError:
        return []
    found = []
    for name in sorted(names):
        if not name.endswith(".json"):
            continue
        path = os.path.join(_records_dir(), name)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("partial"), str):
            found.append((path, data))
    return found


def known_downloads(url_prefix: str, owns: object = None) -> list[IncompleteTransfer]:
    """Partials of downloads this host started from URLs beginning with ``url_prefix``.

    ``owns(url)``, when given, says whether a URL belongs to the asking store (its scheme and
    host); records whose partial no longer exists are dropped.
    """
    found = []
    for record_path, data in _records():
        url, partial = str(data.get("url", "")), str(data["partial"])
        if not url.startswith(url_prefix) or (callable(owns) and not owns(url)):
            continue
        modified = _mtime(partial)
        if modified is None:
            with contextlib.suppress(OSError):
                os.remove(record_path)  # committed or removed by hand: nothing left
            continue
        size = 0
        with contextlib.suppress(OSError):
            size = os.stat(partial).st_blocks * 512
        found.append(IncompleteTransfer(url, "download", partial, size, modified))
    return found


def _unlocked_remove(path: str) -> bool:
    """Remove ``path`` unless a running transfer holds its flock; True if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return True
    finally:
        os.close(fd)


def remove_download(transfer: IncompleteTransfer) -> bool:
    """Remove a download partial, its state file and its record; False if it is in use."""
    partial = transfer.location
    if not _unlocked_remove(partial):
        return False
    for _path, data in _records():
        if data.get("partial") == partial and isinstance(data.get("state"), str):
            with contextlib.suppress(OSError):
                os.remove(str(data["state"]))
    forget_download(partial)
    return True


def remove_file(path: str) -> bool:
    """Remove a partial inside a share unless a transfer holds it."""
    return _unlocked_remove(path)
