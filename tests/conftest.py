"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def float64_by_default():
    """Exact comparisons in double precision; the default dtype is restored afterwards for other tests."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
