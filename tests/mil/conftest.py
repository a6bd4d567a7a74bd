"""Shared fixtures of the MIL tests."""

from __future__ import annotations

import pytest

from tests.mil.test_continual import make_bags


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory):
    """Two tasks of small synthetic bags with known tumour tiles (``tests.mil.test_continual.make_bags``)."""
    return make_bags(tmp_path_factory.mktemp("bags"))


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (bit-exact comparisons across two runs), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
