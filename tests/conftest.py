"""Fixtures shared by the whole test suite (export helpers live in ``tests/pruning/_helpers.py``)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Run each test single-threaded: the networks are small, and on a shared
    CI machine extra intra-op threads mostly wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
