"""Why MobileOne-S0 learns CamVid more slowly than MobileNetV2 from scratch: the identity shortcuts.

    python -m benchmarks.shortcut_ablation --datasets-root ../shared/datasets --seeds 0 1

MobileOne is a plain network at inference. In its train form each layer's only shortcut is its
BatchNorm skip branch, summed *before* the layer's ReLU (so that it folds into the convolution). MobileNetV2's
inverted residual blocks add their input to their output *after* the block, an identity path
across the network. This benchmark trains the real-data segmentation recipe
(``configs/segmentation/camvid.yaml``, only the backbone changes) with four backbones:

- ``mobileone``, ``mobilenet_v2``: as the real-data benchmark trains them;
- ``mobileone+shortcuts``: MobileOne-S0 whose depthwise + pointwise layer pairs with equal input
  and output shapes are wrapped in ``x + pair(x)`` (same parameters; no longer reparameterizable
  into a plain CNN, so a probe, not a model to ship);
- ``mobilenet_v2-shortcuts``: MobileNetV2 without its blocks' identity shortcuts (same parameters).

It writes one row per run (final mIoU, per-epoch curve, tree IoU, training loss, wall time) to
``--output`` and prints them as a Markdown table. Runs go one after another in this process.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from backbones.atomic import atomic_write_file
from backbones.network import MobileOne, MobileOneBlock
from benchmarks.machine import describe_machine
from benchmarks.real_data import DEFAULT_DATASETS, ROOT, SETTINGS, _metrics, csv_logger, tail_mean_sd

CONFIG = SETTINGS["segmentation"].config


class PairWithShortcut(nn.Module):
    """``x + pointwise(depthwise(x))``: a MobileOne layer pair given a post-activation identity shortcut."""

    def __init__(self, depthwise: MobileOneBlock, pointwise: MobileOneBlock) -> None:
        super().__init__()
        self.depthwise, self.pointwise = depthwise, pointwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pointwise(self.depthwise(x))


def add_shortcuts(network: MobileOne) -> int:
    """Wrap every depthwise + pointwise pair of stages 1-4 that keeps its input's shape (stride 1,
    as many output as input channels) in :class:`PairWithShortcut`; return how many were wrapped."""
    wrapped = 0
    for stage in network.stages[1:]:
        layers = list(stage)
        rebuilt: list[nn.Module] = []
        for depthwise, pointwise in zip(layers[0::2], layers[1::2]):
            if depthwise.stride == 1 and depthwise.in_channels == pointwise.out_channels:
                rebuilt.append(PairWithShortcut(depthwise, pointwise))
                wrapped += 1
            else:
                rebuilt += [depthwise, pointwise]
        for name in list(stage._modules):
            del stage._modules[name]
        for index, module in enumerate(rebuilt):
            stage.add_module(str(index), module)
    return wrapped


def remove_shortcuts(network: nn.Module) -> int:
    """Turn off the identity shortcut of every torchvision inverted residual block (MobileNetV2's,
    and EfficientNet's MBConv) in ``network``; return how many were on."""
    removed = 0
    for module in network.modules():
        if getattr(module, "use_res_connect", False):
            module.use_res_connect = False
            removed += 1
    return removed


# variant -> (--model.backbone, the change made to the built backbone)
VARIANTS = {
    "mobileone": ("mobileone_s0", None),
    "mobileone+shortcuts": ("mobileone_s0", add_shortcuts),
    "mobilenet_v2": ("mobilenet_v2", None),
    "mobilenet_v2-shortcuts": ("mobilenet_v2", remove_shortcuts),
}


def train_one(variant: str, datasets_root: Path, work: Path, seed: int, epochs: int | None) -> dict:
    """Train the CamVid recipe with one backbone variant; return its figures."""
    from tasks.segmentation.__main__ import main as segmentation_cli

    backbone, change = VARIANTS[variant]
    args = ["--config", CONFIG, "--data.root", str(datasets_root / "camvid"), "--model.backbone", backbone,
            f"--seed_everything={seed}", "--trainer.enable_progress_bar=false",
            "--trainer.logger", json.dumps(csv_logger(work, "fit")),
            "--trainer.default_root_dir", str(work)]
    args += [f"--trainer.max_epochs={epochs}"] if epochs else []
    cli = segmentation_cli(args, run=False)
    features = cli.model.model.backbone
    changed = change(features) if change else 0
    if change and not changed:
        raise SystemExit(f"{variant}: the backbone has no layers to change")
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    csv_path = work / "fit" / "metrics.csv"
    curve = _metrics(csv_path)
    with open(csv_path) as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    final = curve[-1]
    return {"variant": variant, "seed": seed, "epochs": final["epoch"] + 1, "changed_blocks": changed,
            "parameters": sum(p.numel() for p in features.parameters()),
            "mIoU": final["mIoU"], "last5_mean": tail_mean_sd(curve, "mIoU")[0], "tree_IoU": final.get("IoU/tree", float("nan")),
            "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]), "wall_s": round(seconds, 1),
            "curve": [round(100 * row["mIoU"], 1) for row in curve if "mIoU" in row]}


def markdown(rows: list[dict]) -> str:
    """The runs as a Markdown table (metrics in %)."""
    lines = ["| backbone | seed | blocks changed | mIoU | last 5 mean | tree IoU | train loss (last 10 steps) | mIoU per epoch | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['seed']} | {row['changed_blocks']} | **{100 * row['mIoU']:.1f}** | "
                     f"{100 * row['last5_mean']:.1f} | {100 * row['tree_IoU']:.1f} | {row['train_loss_last10']:.3f} | "
                     f"{', '.join(map(str, row['curve']))} | {row['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets-root", type=Path, default=DEFAULT_DATASETS, help="folder holding camvid/")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "shortcut_ablation", help="logs and checkpoints")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "shortcut_ablation_camvid.csv")
    args = parser.parse_args(argv)
    if not (args.datasets_root / "camvid").is_dir():
        raise SystemExit(f"{args.datasets_root / 'camvid'} does not exist: give --datasets-root (the folder holding camvid/)")

    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            print(f"[shortcut_ablation] {variant} / seed {seed}", flush=True)
            rows.append(train_one(variant, args.datasets_root, args.work_dir / f"{variant}_seed{seed}", seed, args.epochs))
            print(f"[shortcut_ablation] {variant} / seed {seed}: mIoU {100 * rows[-1]['mIoU']:.1f}", flush=True)
    command = "python -m benchmarks.shortcut_ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    fields = [*rows[0]]

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as handle:
            handle.write(f"# {command}; machine: {describe_machine('cpu', None)}\n")
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows({**row, "curve": " ".join(map(str, row["curve"]))} for row in rows)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(args.output, write)
    print(markdown(rows))
    print(f"[shortcut_ablation] wrote {args.output}")


if __name__ == "__main__":
    main()
