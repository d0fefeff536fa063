"""benchmarks/: the inference form reproduces the paper's MAC counts; the latency and training
throughput scripts measure what their rows say and write their tables, CSV and plot."""

import csv

import pytest
import torch

from backbones import mobileone
from benchmarks.size import PAPER_MACS_M, macs


@pytest.mark.parametrize("variant", sorted(PAPER_MACS_M))
def test_inference_macs_match_paper(variant):
    counted = macs(mobileone(variant, inference_mode=True)) / 1e6
    assert abs(counted - PAPER_MACS_M[variant]) / PAPER_MACS_M[variant] < 0.01, counted


def test_train_form_costs_more_and_fusing_removes_it():
    train, fused = macs(mobileone("s0")), macs(mobileone("s0", inference_mode=True))
    assert train > 3.5 * fused, "S0's 4 conv branches + scale branches cost ~3.8x at train time"


def test_backend_names_parse_into_what_they_say():
    from benchmarks.latency import Backend

    compiled = Backend.parse("compile-bf16", "cuda", 4)
    assert (compiled.kind, compiled.dtype, compiled.channels_last) == ("compile", torch.bfloat16, True)
    assert compiled.label == "torch.compile bf16 channels_last"
    assert Backend.parse("eager-cl", "cpu", 2).channels_last
    assert not Backend.parse("eager-fp16", "cpu", 2).channels_last, "channels_last is implied for half precision on CUDA only"
    assert Backend.parse("ort", "cpu", 2).label == "onnxruntime 2 threads"
    assert Backend.parse("ort-1", "cpu", 2).label == "onnxruntime 1 thread"
    assert Backend.parse("ort-int8", "cpu", 2).label == "onnxruntime int8 2 threads"
    assert Backend.parse("executorch-int8-1", "cpu", 2).label == "ExecuTorch XNNPACK int8 1 thread"
    assert Backend.parse("executorch", "cpu", 2).label == "ExecuTorch XNNPACK 2 threads"
    with pytest.raises(ValueError, match="ort-int8-2"):
        Backend.parse("ort-int8-2", "cpu", 2)
    with pytest.raises(ValueError, match="eager-int8"):
        Backend.parse("eager-int8", "cpu", 2)
    with pytest.raises(ValueError, match="runs on the CPU"):
        Backend.parse("ort-1", "cuda", 2)


def test_latency_rows_tables_csv_and_plot(tmp_path):
    from benchmarks.latency import markdown, measure, plot
    from benchmarks.timing import write_csv

    rows = measure(["s0"], ["eager", "ort-1"], batch_sizes=[1, 2], rounds=3, warmup=1, threads=1, peers=False)
    assert {(r["model"], r["backend"], r["batch"]) for r in rows} == {
        (m, b, n) for m in ("mobileone_s0 (fused)", "mobileone_s0 (unfused)")
        for b in ("eager fp32", "onnxruntime 1 thread") for n in (1, 2)
    }
    for row in rows:
        assert row["q1_ms"] <= row["median_ms"] <= row["q3_ms"]
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["median_ms"] * 1e3)
        assert row["top1"] == 71.4
        if row["model"] == "mobileone_s0 (fused)":
            assert row["ratio"] == 1.0

    table = markdown(rows, "mobileone_s0 (fused)")
    assert "Batch 1," in table and "Batch 2," in table and "images/s" in table
    assert table.count("| mobileone_s0 (unfused) |") == 2

    write_csv(rows, tmp_path / "latency.csv")
    with open(tmp_path / "latency.csv", newline="") as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == len(rows) and float(read[0]["median_ms"]) == pytest.approx(rows[0]["median_ms"])

    plot(rows, str(tmp_path / "figure1.png"), "onnxruntime 1 thread", "test")
    assert (tmp_path / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure1.png", "latency.csv"], "no temporary files left"
    with pytest.raises(SystemExit, match="no batch-1 rows"):
        plot(rows, str(tmp_path / "other.png"), "torch.compile fp32", "test")


def test_latency_times_an_int8_onnx_file():
    from benchmarks.latency import measure

    (row,) = measure(["s0"], ["ort-int8-1"], rounds=2, warmup=1, threads=1, unfused="none", peers=False)
    assert row["backend"] == "onnxruntime int8 1 thread" and row["median_ms"] > 0 and row["ratio"] == 1.0


def test_latency_peers_are_torchvision_and_timm_with_documented_top1():
    from benchmarks.latency import models, top1

    names = set(models(["s0", "s1"], unfused="none"))
    assert names == {"mobileone_s0 (fused)", "mobileone_s1 (fused)", "mobilenet_v2", "mobilenet_v3_large",
                     "efficientnet_b0", "timm mobileone_s0 (fused)", "timm mobileone_s1 (fused)"}
    assert top1("mobilenet_v2") == 72.154 and top1("mobileone_s1 (unfused)") == 75.9
    assert top1("timm mobileone_s0 (fused)") is None


def test_train_throughput_rows_and_timm_ratio():
    from benchmarks.train_throughput import markdown, measure

    rows = measure(["s0"], batch_sizes=[2], precisions=["fp32", "bf16"], steps=2, warmup=1)
    assert {(r["model"], r["precision"]) for r in rows} == {
        (m, p) for m in ("mobileone_s0", "timm mobileone_s0", "mobilenet_v2") for p in ("fp32", "bf16")
    }
    by_name = {(r["model"], r["precision"]): r for r in rows}
    assert by_name["mobileone_s0", "fp32"]["vs ours"] == 1.0
    timm_row = by_name["timm mobileone_s0", "bf16"]
    assert timm_row["vs ours"] == pytest.approx(timm_row["median_ms"] / by_name["mobileone_s0", "bf16"]["median_ms"])
    assert by_name["mobilenet_v2", "fp32"]["vs ours"] is None
    assert "× ours" in markdown(rows) and "eager bf16" in markdown(rows)


@pytest.mark.slow
def test_compiled_backend_matches_eager_rows():
    from benchmarks.latency import measure

    rows = measure(["s0"], ["compile"], rounds=2, warmup=1, threads=1, unfused="none", peers=False)
    assert [(r["model"], r["backend"]) for r in rows] == [("mobileone_s0 (fused)", "torch.compile fp32")]


@pytest.mark.slow
def test_compiled_training_runs_on_cpu():
    """torch.compile of the train form: inductor's channels-last layout would crash on this CPU."""
    from benchmarks.train_throughput import measure

    rows = measure(["s0"], batch_sizes=[2], modes=["compile"], steps=1, warmup=1, peers=False)
    assert [(r["model"], r["mode"]) for r in rows] == [("mobileone_s0", "compile")]


def test_real_data_reads_curves_and_rewrites_only_its_section(tmp_path):
    from benchmarks.real_data import SECTION_BEGIN, SECTION_END, SETTINGS, _metrics, markdown, merge, write_section

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss,val/mIoU,val/IoU/road\n0,4,1.5,,\n0,5,,0.25,0.5\n1,9,1.2,,\n1,10,,0.4,0.75\n")
    curve = _metrics(metrics)
    assert curve == [{"epoch": 0, "mIoU": 0.25, "IoU/road": 0.5}, {"epoch": 1, "mIoU": 0.4, "IoU/road": 0.75}]
    setting = SETTINGS["segmentation"]
    run = {"task": "segmentation", "backbone": "mobileone_s0", "seed": 0, "epochs": 2, "wall_s": 90.0, "final": curve[-1],
           "untrained": {"mIoU": 0.01}, "curve": curve}
    summary = {"commands": ["python -m benchmarks.real_data"], "machine": "test box", "class_order": ["road"],
               "settings": {"segmentation": setting.summary()}, "runs": [run]}
    section = markdown(summary)
    assert "| segmentation | CamVid (11 classes) | mobileone_s0 | scratch | 0 | 2 | mIoU | **40.0** | 32.5 ± 10.6 | 1.0 |" in section
    assert "| mobileone_s0 | scratch | 0 | 75.0 |" in section, "per-class IoU row"
    assert "Over the seeds" not in section, "one seed: no spread to give"
    assert "camvid.yaml" in section and "camvid_pretrained.yaml" not in section, "only the recipes of the runs shown"
    second = {**run, "seed": 1, "final": {"mIoU": 0.2, "IoU/road": 0.5}}
    two_seeds = markdown({**summary, "runs": [run, second]})
    assert "| segmentation | mobileone_s0 | scratch | mIoU | 2 | **30.0** | 14.1 | 20.0–40.0 |" in two_seeds
    # a pretrained run of the same backbone and seed is another row, and merging keeps both
    pretrained = {**run, "start": "imagenet", "final": {"mIoU": 0.5, "IoU/road": 0.9}, "untrained": {"mIoU": 0.05}}
    imagenet = [{"backbone": "mobileone_s0", "weights": "/w/mobileone_s0.pth.tar", "images": 500, "task_acc1": 0.828,
                 "task_acc5": 0.95, "reference_acc1": 0.828, "reference_acc5": 0.95}]
    merged = merge({**summary, "runs": [run, second]}, {**summary, "runs": [pretrained], "imagenet": imagenet})
    assert [(r.get("start", "scratch"), r["seed"]) for r in merged["runs"]] == [("scratch", 0), ("scratch", 1), ("imagenet", 0)]
    both = markdown(merged)
    assert "| segmentation | CamVid (11 classes) | mobileone_s0 | imagenet | 0 | 2 | mIoU | **50.0** |" in both
    assert "| mobileone_s0 | `mobileone_s0.pth.tar` | 500 | **82.8** | 95.0 | 82.8 | 95.0 |" in both
    assert "camvid_pretrained.yaml" in both
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\nbefore\n\n{SECTION_BEGIN}\nold table\n{SECTION_END}\n\nafter\n")
    write_section(results, section)
    text = results.read_text()
    assert "old table" not in text and "**40.0**" in text
    assert text.startswith("# Results\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    write_section(results, section)
    assert results.read_text() == text, "rewriting is idempotent"


def test_batchnorm_recalibration_repairs_stale_running_statistics():
    """Running statistics that no longer match the weights (here: set 1000x too small) wreck the
    evaluation; recomputed from a few batches under the same weights, they give it back."""
    from benchmarks.batchnorm_recalibration import evaluate, recalibrated

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    batches = [(torch.randn(16, 3, 8, 8) * 5 + 2, torch.randint(0, 2, (16,))) for _ in range(4)]
    network.train()
    with torch.no_grad():
        for images, _ in batches * 10:
            network(images)
    healthy = evaluate(network, batches)[0]
    network[1].running_var /= 1000
    assert evaluate(network, batches)[0] > 3 * healthy
    fixed = recalibrated(network, batches, batches=4)
    assert abs(evaluate(fixed, batches)[0] - healthy) < 0.05 * healthy
    assert network[1].running_var.max() < 1  # the original is left as it was


def test_int8_sensitivity_rounds_one_layer_at_a_time_and_restores_the_network():
    from torch import nn

    from benchmarks.int8_sensitivity import diagonal_ratio, input_ranges, int8_weights, layer_sensitivity, quantized_layers, simulated_int8

    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    with torch.no_grad():  # a reparameterized block's 1x1 conv: the identity (skip branch) plus small learned weights
        network[0].weight.copy_(torch.eye(8)[:, :, None, None] * 40 + torch.randn(8, 8, 1, 1) * 0.1)
    assert diagonal_ratio(network[0]) > 100 and diagonal_ratio(network[2]) < 3 and diagonal_ratio(network[1]) is None
    weight = network[2].weight.detach().clone()
    step = weight.abs().flatten(1).amax(1).view(-1, 1, 1, 1) / 127
    assert (int8_weights(weight) - weight).abs().le(step / 2 + 1e-7).all() and not torch.equal(int8_weights(weight), weight)

    layers = quantized_layers(network)
    images = torch.rand(4, 8, 6, 6)
    ranges = input_ranges(network, layers, [images])
    assert ranges["0"] == (float(images.min()), float(images.max()))
    ranges["2"] = (0.0, 1000 * ranges["2"][1])  # an outlier in the calibration images: a coarse int8 step for layer 2's input
    rows = {row["layer"]: row for row in layer_sensitivity(network, layers, ranges, images)}
    assert rows["2"]["input_error"] > 20 * rows["0"]["input_error"] > 0
    assert rows["0"]["weights_error"] > 0 and rows["2"]["weights_error"] > 0
    with simulated_int8(network, ["2"], ["2"], ranges):
        assert not torch.equal(network[2].weight, weight) and network[2]._forward_pre_hooks and not network[0]._forward_pre_hooks
    assert torch.equal(network[2].weight, weight) and not network[2]._forward_pre_hooks, "restored on exit"


def test_shortcut_ablation_adds_and_removes_identity_paths_without_changing_parameters():
    from benchmarks.shortcut_ablation import PairWithShortcut, add_shortcuts, remove_shortcuts
    from tasks.common.backbones import feature_extractor

    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    plain = feature_extractor("mobileone_s0", 16).eval()
    with_shortcuts = feature_extractor("mobileone_s0", 16).eval()
    with_shortcuts.load_state_dict(plain.state_dict())
    # S0's stages hold 2, 8, 10, 1 layer pairs; the first of each changes the shape
    assert add_shortcuts(with_shortcuts) == 1 + 7 + 9
    assert with_shortcuts.state_dict().keys() != plain.state_dict().keys()
    assert sum(p.numel() for p in with_shortcuts.parameters()) == sum(p.numel() for p in plain.parameters())
    pair = next(m for m in with_shortcuts.modules() if isinstance(m, PairWithShortcut))
    x = torch.randn(1, pair.depthwise.in_channels, 8, 8)
    torch.testing.assert_close(pair(x), x + pair.pointwise(pair.depthwise(x)))
    assert not torch.allclose(with_shortcuts(images)[1], plain(images)[1])

    network = feature_extractor("mobilenet_v2", 16).eval()
    before = network(images)[0]  # C4: the output of a block with a shortcut
    assert remove_shortcuts(network) == 10  # MobileNetV2's stride-1 blocks with equal in/out widths
    assert remove_shortcuts(network) == 0
    assert not torch.allclose(network(images)[0], before)


def test_real_data_reads_each_tasks_declarations():
    """The benchmark's metric and weights option come from the task classes: each names an __init__
    argument and the metric the task logs."""
    import inspect

    from benchmarks.real_data import SETTINGS

    expected = {"classification": ("acc1", "--model.weights"), "detection": ("mAP", "--model.backbone_weights"),
                "segmentation": ("mIoU", "--model.backbone_weights")}
    for task, setting in SETTINGS.items():
        assert (setting.metric, setting.weights_option) == expected[task]
        assert setting.task_class.weights_hparam in inspect.signature(setting.task_class.__init__).parameters
