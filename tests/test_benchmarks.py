"""benchmarks/: the inference form reproduces the paper's MAC counts; the latency script runs."""

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


@pytest.mark.slow
def test_latency_benchmark_runs_and_reports_every_backend():
    from benchmarks.latency import markdown, measure

    rows = measure(["s0"], rounds=2, warmup=1, threads=1)
    assert {"pytorch eager", "onnxruntime 1 thread"} <= {r["backend"] for r in rows}
    assert {r["model"] for r in rows} >= {"mobileone_s0 (fused)", "mobileone_s0 (unfused)", "mobilenet_v2"}
    assert all(r["median_ms"] > 0 for r in rows)
    assert "mobileone_s0 (fused)" in markdown(rows, "vs mobileone_s0 fused")
