"""Are a classification checkpoint's BatchNorm running statistics stale? Evaluate it as saved, then
with the running statistics recomputed from training batches under the same weights.

    python -m benchmarks.batchnorm_recalibration --config configs/classification/demo.yaml CKPT ...

(a checkpoint of every epoch: a ``TaskCheckpoint`` callback with ``save_top_k: -1``).

A checkpoint that scores far better after recalibration had running statistics that lag behind its
weights (BatchNorm keeps an exponential average over the last ~10 batches, momentum 0.1; while the
learning rate is high the weights move faster than that average follows). The data module is the
config's ``data`` section (``--data-root`` replaces its root).
"""

from __future__ import annotations

import argparse
import copy

import torch
import yaml
from torch import nn

from tasks.classification.data import ImageFolderDataModule
from tasks.classification.module import ImageClassificationTask


@torch.no_grad()
def evaluate(network: nn.Module, loader) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy over ``loader`` in eval mode."""
    network.eval()
    loss = correct = count = 0.0
    for batch in loader:
        if batch is None:
            continue
        images, labels = batch
        logits = network(images)
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return loss / count, correct / count


@torch.no_grad()
def recalibrated(network: nn.Module, loader, batches: int) -> nn.Module:
    """A copy whose BatchNorm running statistics are the plain average over ``batches`` training
    batches, computed with the network's current weights (nothing else changes)."""
    network = copy.deepcopy(network).train()
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    for index, batch in enumerate(loader):
        if index == batches:
            break
        if batch is not None:
            network(batch[0])
    return network.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="classification .ckpt files")
    parser.add_argument("--config", required=True, help="the training config (its data section is used)")
    parser.add_argument("--data-root", help="replaces the config's data root")
    parser.add_argument("--batches", type=int, default=10, help="training batches the statistics are recomputed on")
    args = parser.parse_args(argv)
    with open(args.config) as handle:
        data_args = dict(yaml.safe_load(handle)["data"])
    if args.data_root:
        data_args["root"] = args.data_root
    data_args.update(num_workers=0, demo=False)
    data = ImageFolderDataModule(**data_args)
    data.setup("fit")
    print(f"| checkpoint | val loss / top-1, running statistics as saved | after recomputing them on {args.batches} training batches |")
    print("| --- | --- | --- |")
    for path in args.checkpoints:
        network = ImageClassificationTask.load_from_checkpoint(path, map_location="cpu").model
        torch.manual_seed(0)
        cells = [evaluate(net, data.val_dataloader()) for net in (network, recalibrated(network, data.train_dataloader(), args.batches))]
        print(f"| `{path}` | " + " | ".join(f"{loss:.4g} / {100 * top1:.1f}%" for loss, top1 in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
