"""Shared fixtures of the MIL tests."""

from __future__ import annotations

import pytest

from tests.mil.test_continual import make_bags


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory):
    """Two tasks of small synthetic bags with known tumour tiles (``tests.mil.test_continual.make_bags``)."""
    return make_bags(tmp_path_factory.mktemp("bags"))
