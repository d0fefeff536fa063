import pytest
import torch

VARIANT_NAMES = ["s0", "s1", "s2", "s3", "s4"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
