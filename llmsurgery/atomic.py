"""Folders and files written beside the target and renamed into place: a failure or kill leaves nothing behind.

The temporary folder is `.NAME.tmp-PID` next to the target. A run that is killed outright (SIGKILL, power loss)
cannot clean up, so every later write towards the same target first removes the temporary folders of processes
that no longer exist.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError, first_line


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` beside `target` left by dead processes; an orphaned old copy of a
    replaced target is put back when the target itself is gone. Returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)$")
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        match = pattern.match(path.name)
        if match is None or int(match[2]) == os.getpid() or _alive(int(match[2])):
            continue
        if match[1] == "old" and not target.exists():
            path.replace(target)
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_failure(target: Path, exc: BaseException) -> UserError:
    """A failed write (full disk, no permission, read-only file system) as one line."""
    reason = getattr(exc, "strerror", None) or first_line(exc)
    return UserError(f"could not write {target}: {reason}; nothing was written")


@contextmanager
def replacing_folder(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; when the block succeeds it replaces `target` (an old
    one is removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    trash = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            yield tmp
        except OSError as exc:
            raise write_failure(target, exc) from None
        except Exception as exc:  # noqa: BLE001 - safetensors reports a full disk as its own error type
            if type(exc).__name__ == "SafetensorError" or "No space left" in str(exc):
                raise write_failure(target, exc) from None
            raise
        if target.exists():
            target.replace(trash)
        try:
            tmp.replace(target)
        except BaseException:
            if trash.exists() and not target.exists():
                trash.replace(target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def replacing_file(target: Path) -> Iterator[Path]:
    """Yield a temporary file path beside `target`; when the block succeeds it replaces `target` (rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        try:
            yield tmp
        except OSError as exc:
            raise write_failure(target, exc) from None
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
