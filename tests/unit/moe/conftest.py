import pytest
import torch


@pytest.fixture(autouse=True)
def _float64():
    """MoE math is checked in float64 (tight tolerances, gradcheck)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
