"""Atomic file writes with one temporary-name convention, and the disk-full and stale-file rules around them.

Every output pathopeft writes goes to ``.<name>.<host>.<pid>.tmp`` beside its final name and is renamed into
place, so a killed job never leaves a file that looks finished. The owner is in the name, so a cleaner removes
only temporaries whose writer is gone (same host, dead pid) or, for other hosts on a shared file system, that
are older than :data:`FOREIGN_STALE_S` — a second job on the same folder never deletes the first one's
in-flight files. A write that fails because the disk or the quota is full raises
:class:`~pathopeft.errors.DiskFullError` naming the file, after removing its temporary.

HDF5 files are built in memory and written as bytes: the HDF5 C library can crash the process when the disk
fills under it, a plain ``write`` only raises.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pathopeft.errors import DiskFullError

TMP_SUFFIX = ".tmp"
#: A temporary from another host is left alone until it is this old (its writer may still be running).
FOREIGN_STALE_S = 24 * 3600.0
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
HOST = socket.gethostname().replace(".", "_")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) is ENOSPC / EDQUOT."""
    while error is not None:
        if isinstance(error, DiskFullError) or (isinstance(error, OSError) and error.errno in _DISK_FULL):
            return True
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return False


def tmp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under by this process."""
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}{TMP_SUFFIX}")


def _write_all(tmp: Path, data: bytes) -> None:
    """The one low-level write (tests patch it to simulate a full disk)."""
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename; nothing is left on failure."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(p)
    try:
        _write_all(tmp, data)
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in _DISK_FULL:
            raise DiskFullError(f"{p}: disk full, could not write {len(data):,} bytes") from e
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 90) -> Path:
    """Render a matplotlib ``Figure`` with the Agg canvas (no pyplot, no global state, no display needed) and
    write it as a PNG atomically."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str))


@contextmanager
def atomic_h5(path: str | os.PathLike[str]) -> Iterator[Any]:
    """``with atomic_h5(p) as f:`` an in-memory ``h5py.File`` whose image is written atomically on success."""
    import h5py

    f = h5py.File(f"mem-{os.getpid()}-{id(path)}.h5", "w", driver="core", backing_store=False)
    try:
        yield f
        f.flush()
        image = f.id.get_file_image()
    finally:
        f.close()
    atomic_write_bytes(path, image)


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_gone(host: str, pid: int, mtime: float, now: float | None = None) -> bool:
    """Whether the writer ``host:pid`` of a file last touched at ``mtime`` can no longer be working on it."""
    if host == HOST:
        return not pid_alive(pid)
    return (now or time.time()) - mtime > FOREIGN_STALE_S


def _tmp_owner(name: str) -> tuple[str, int] | None:
    """``(host, pid)`` from ``.<name>.<host>.<pid>.tmp``; None for names not written by :func:`tmp_path`."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    parts = name[: -len(TMP_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def is_stale_tmp(path: Path) -> bool:
    """A temporary of ours whose writer is gone (or an older-style ``.x.tmp<pid>`` of a dead pid)."""
    owner = _tmp_owner(path.name)
    if owner is None:
        legacy = path.name.rsplit(".tmp", 1)
        if path.name.startswith(".") and len(legacy) == 2 and legacy[1].isdigit():
            return not pid_alive(int(legacy[1]))
        return False
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return False
    return owner_gone(owner[0], owner[1], mtime)


def clean_stale_temporaries(root: str | os.PathLike[str], own: bool = False) -> list[Path]:
    """Remove stale temporaries in ``root`` and its subfolders (``own=True`` also this process's); returns them."""
    removed = []
    base = Path(root)
    if not base.is_dir():
        return removed
    for tmp in base.rglob(".*.tmp*"):
        owner = _tmp_owner(tmp.name)
        mine = owner is not None and owner == (HOST, os.getpid())
        if (own and mine) or (not mine and is_stale_tmp(tmp)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
