"""Files written so that a kill at any moment leaves either the old file or the new one, never a torn one.

A file is written under a temporary name (".NAME.tmp-PID" beside it), fsynced, then renamed over the
old one. A run that was killed leaves such temporary files behind; `is_temp` recognises them so the
next run (which holds the folder's lock) can remove them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from gptcli.errors import GptcliError, first_line

_TEMP = re.compile(r"^\..+\.tmp-\w+$")


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temp(name: str) -> bool:
    """Whether a file or folder name is one of our temporary names (a killed run's leftover)."""
    return bool(_TEMP.match(name))


def fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every OS (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def free_space(folder: Path) -> str:
    """ "; N MB free on that disk", for messages about a write that failed (empty when unknown)."""
    try:
        return f"; {shutil.disk_usage(folder).free / 1e6:,.0f} MB free on that disk"
    except OSError:
        return ""


def file_mode() -> int:
    """The mode a new file gets from open() under this process's umask (0644 under the usual 022)."""
    mask = os.umask(0o022)  # the only way to read the umask is to set it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write `path` through `write(file)` under a temporary name, fsync it, then rename it into place.

    Raises GptcliError when the file cannot be written (a full disk, a file-size limit); `path` then
    still holds its previous content.
    """
    temp = temp_path(path)
    sink: _Sink | None = None
    try:
        with open(temp, "wb") as f:
            sink = _Sink(f)
            write(sink)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        cause = sink.error if sink is not None and sink.error is not None else exc
        reason = getattr(cause, "strerror", None) or first_line(cause)
        raise GptcliError(f"could not write {path} ({reason}{free_space(path.parent)})") from exc
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def move_into_place(written: Path, path: Path, *, sync_folder: bool = True) -> None:
    """Make a file written elsewhere (`temp_path(path)`, or a folder on the same disk) durable, then
    rename it over `path`: what `atomic_write` does for files a library writes itself.
    `sync_folder=False` leaves the folder's fsync to the caller (one for many files)."""
    with open(written, "rb") as f:
        os.fsync(f.fileno())
    os.replace(written, path)
    if sync_folder:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON in `path`, written atomically."""
    text = json.dumps(obj, indent=1, default=str)
    atomic_write(path, lambda f: f.write(text.encode()))


class _Sink:
    """A file that remembers why a write failed: torch.save turns the OSError (a full disk, a file-size
    limit) into a RuntimeError that only says `unexpected pos 704 vs 598`."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)
