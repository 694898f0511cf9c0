"""Atomic, durable writes: a reader sees the old content or the new, never a torn file.

Every writer of the project goes through here. A file is written to a temporary name beside its
destination, flushed and fsynced, then renamed over the destination (``os.replace`` is atomic on
POSIX), and the directory is fsynced so the rename itself survives a crash. A failed write removes
its temporary file and leaves the destination untouched.

``atomic_path`` hands a temporary path to code that writes files itself (safetensors, matplotlib,
pandas); ``write_bytes`` / ``write_text`` / ``write_json`` cover the simple cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "fsync_dir", "fsync_file", "temp_name", "write_bytes", "write_json", "write_text"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and creations inside directory ``path`` durable (no-op where unsupported)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to stable storage."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_name(final: str | os.PathLike, kind: str = "tmp") -> Path:
    """A hidden sibling name for ``final`` that no other writer picks: ``.NAME.KIND-PID-RANDOM``."""
    final = Path(final)
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on a clean exit the file written there is fsynced and
    renamed to ``final``, on an exception it is removed and ``final`` is left as it was.

    >>> with atomic_path("results.csv") as tmp:
    ...     frame.to_csv(tmp)
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Atomically replace ``path`` with ``obj`` as strict JSON (NaN and infinities are refused)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False) + "\n")
