"""The inference form reproduces the paper's multiply-accumulate counts (torch's FlopCounterMode)."""

import pytest

from backbones import mobileone
from benchmarks.size import PAPER_MACS_M, macs


@pytest.mark.parametrize("variant", sorted(PAPER_MACS_M))
def test_inference_macs_match_paper(variant):
    counted = macs(mobileone(variant, inference_mode=True)) / 1e6
    assert abs(counted - PAPER_MACS_M[variant]) / PAPER_MACS_M[variant] < 0.01, counted


def test_train_form_costs_more_and_fusing_removes_it():
    train, fused = macs(mobileone("s0")), macs(mobileone("s0", inference_mode=True))
    assert train > 3.5 * fused, "S0's 4 conv branches + scale branches cost ~3.8x at train time"
