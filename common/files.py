"""Atomic, durable writes: a reader sees the old content or the new, never a torn file.

Every writer of the project goes through here. A file is written to a temporary name beside its
destination, flushed and fsynced, then renamed over the destination (``os.replace`` is atomic on
POSIX), and the directory is fsynced so the rename itself survives a crash. A failed write removes
its temporary file and leaves the destination untouched.

``atomic_path`` hands a temporary path to code that writes files itself (safetensors, matplotlib,
pandas); ``write_bytes`` / ``write_text`` / ``write_json`` cover the simple cases.

Directories (checkpoints, fitted models) follow the same rule one level up: a writer fills
``dir_temp_name(final)``, then ``publish_dir`` fsyncs everything in it and renames it to ``final``;
``remove_dir`` deletes without ever showing a half-deleted folder, and ``sweep_dead_writers`` tidies
up after writers that crashed (their names carry host and pid).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path", "dir_temp_name", "file_digest", "fsync_dir", "fsync_file", "publish_dir", "remove_dir",
    "sweep_dead_writers", "temp_name", "write_bytes", "write_json", "write_text",
]  # fmt: skip


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


# ----------------------------------------------------------------------------------------- directories


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, read once."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


# .NAME.KIND-PID-RANDOM-HOST, as dir_temp_name makes them
_WRITER_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|trash|replaced)-(?P<pid>\d+)-[0-9a-f]+-(?P<host>[A-Za-z0-9_.]+)$")


def dir_temp_name(final: str | os.PathLike, kind: str = "tmp") -> Path:
    """A hidden sibling of directory ``final`` that names its writer: ``.NAME.KIND-PID-RANDOM-HOST``.

    ``kind`` is "tmp" (being written), "trash" (being deleted) or "replaced" (an old ``final`` moved
    aside); ``sweep_dead_writers`` recognises these names."""
    return Path(f"{temp_name(final, kind)}-{_host()}")


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_renameat2 = None
if sys.platform.startswith("linux"):
    try:
        _renameat2 = getattr(ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True), "renameat2", None)
        if _renameat2 is not None:
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2.restype = ctypes.c_int
    except OSError:  # pragma: no cover
        _renameat2 = None


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Make the complete directory ``tmp`` visible as ``final`` in one rename, after fsyncing every
    file and folder in it; an existing ``final`` is replaced, never lost.

    The replacement is one atomic swap on Linux (``renameat2(RENAME_EXCHANGE)``); elsewhere the old
    ``final`` is first renamed to a "replaced" name, which ``sweep_dead_writers`` renames back if the
    writer dies before the new one takes its place."""
    tmp, final = Path(tmp), Path(final)
    _fsync_tree(tmp)
    try:
        os.rename(tmp, final)  # atomic; fails if final exists and is not empty
    except OSError:
        if not final.exists():
            raise
        if _rename_exchange(tmp, final):  # tmp now holds the old directory
            fsync_dir(final.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        replaced = dir_temp_name(final, "replaced")
        os.rename(final, replaced)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(replaced, ignore_errors=True)
        return final
    fsync_dir(final.parent)
    return final


def remove_dir(path: str | os.PathLike) -> None:
    """Delete directory ``path`` so that it is never visible half-deleted (renamed away first)."""
    trash = dir_temp_name(path, "trash")
    os.rename(path, trash)
    fsync_dir(trash.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # without a safe probe, leftovers are only ignored
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_dead_writers(parent: str | os.PathLike) -> list[Path]:
    """Tidy ``parent`` after writers that died: their "tmp" and "trash" directories are deleted, and a
    "replaced" one is renamed back to its final name if nothing took its place (deleted otherwise).
    Only directories made on this host by a process that no longer runs are touched. Returns the
    directories restored."""
    parent = Path(parent)
    try:
        names = sorted(os.listdir(parent))
    except FileNotFoundError:
        return []
    restored = []
    for name in names:
        m = _WRITER_RE.match(name)
        path = parent / name
        if m is None or m["host"] != _host() or _pid_alive(int(m["pid"])) or not path.is_dir():
            continue
        final = parent / m["name"]
        if m["kind"] == "replaced" and not final.exists():
            try:
                os.rename(path, final)
            except OSError:
                continue
            fsync_dir(parent)
            restored.append(final)
        else:
            shutil.rmtree(path, ignore_errors=True)
    return restored
