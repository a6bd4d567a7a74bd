"""Per-slide claim files, so several jobs on one output folder share the work instead of repeating it.

Before processing a slide a job creates ``claims/<slide_id>.claim`` with ``O_EXCL`` (atomic on local and NFS
v3+ file systems) holding its host and pid; a job that finds the claim taken leaves the slide to its owner. A
claim whose owner is gone (same host and the pid is dead, or another host and the file untouched for
:data:`pathopeft.io.FOREIGN_STALE_S`) is stale and taken over, so a killed job never blocks a slide for good.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pathopeft.io import HOST, owner_gone

CLAIMS_DIR = "claims"


def claim_path(root: Path, slide_id: str) -> Path:
    return root / CLAIMS_DIR / f"{slide_id}.claim"


def read_claim(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _is_stale(path: Path) -> bool:
    info = read_claim(path)
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return True
    if info is None:  # half-written by a writer that died between create and write, or garbage
        return time.time() - mtime > 60
    return owner_gone(str(info.get("host")), int(info.get("pid", -1)), mtime)


def try_claim(root: Path, slide_id: str) -> bool:
    """Claim ``slide_id`` for this process; False when another live job holds it."""
    path = claim_path(root, slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # second round after removing a stale claim
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = read_claim(path)
            if info and info.get("host") == HOST and info.get("pid") == os.getpid():
                return True
            if not _is_stale(path):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": HOST, "pid": os.getpid(), "claimed_at": time.time()}, f)
        return True
    return False


def release(root: Path, slide_id: str) -> None:
    """Drop this process's claim (a claim of another owner is left alone)."""
    path = claim_path(root, slide_id)
    info = read_claim(path)
    if info and info.get("host") == HOST and info.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def holder(root: Path, slide_id: str) -> str | None:
    """``host:pid`` holding a live claim on ``slide_id``, or None."""
    path = claim_path(root, slide_id)
    if not path.exists() or _is_stale(path):
        return None
    info = read_claim(path) or {}
    return f"{info.get('host')}:{info.get('pid')}"
