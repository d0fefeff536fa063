"""Evaluate segmentation checkpoints with BatchNorm's running statistics and with batch statistics.

    python -m benchmarks.batchnorm_check --root ../shared/datasets/camvid \
        outputs/real_data/segmentation/mobileone_seed0/checkpoints/last.ckpt ...

If a model scores much better with batch statistics, its running statistics lag behind its weights
(a short training's usual trouble); if not, the running statistics are not what holds it back.
The data are those of ``configs/segmentation/camvid.yaml`` (a ``--data.format folder`` root, evaluated
at ``--eval-scale``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from tasks.segmentation.data import SegmentationDataModule
from tasks.segmentation.module import SemanticSegmentationTask, iou_from_confusion


@torch.no_grad()
def evaluate(task: SemanticSegmentationTask, data: SegmentationDataModule, batch_statistics: bool) -> tuple[float, float]:
    """mIoU and pixel accuracy over the validation split; with ``batch_statistics`` every
    BatchNorm normalizes with the batch's own statistics (its running ones left untouched)."""
    task.eval()
    for module in task.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and batch_statistics:
            module.train()
            module.momentum = 0.0
    task.confusion.reset()
    for images, masks in data.val_dataloader():
        task.confusion.update(task.model(images)["out"].argmax(1), masks)
    _, miou, accuracy = iou_from_confusion(task.confusion.compute())
    return miou, accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="segmentation .ckpt files")
    parser.add_argument("--root", required=True, help="a folder-format root ({train,val}/{images,masks}, classes.json)")
    parser.add_argument("--eval-scale", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    data = SegmentationDataModule(args.root, "folder", num_workers=2, val_batch_size=args.batch_size, eval_scale=args.eval_scale)
    data.setup("validate")
    print("| checkpoint | running statistics: mIoU / pixel acc | batch statistics: mIoU / pixel acc |")
    print("| --- | --- | --- |")
    for path in args.checkpoints:
        results = [evaluate(SemanticSegmentationTask.load_from_checkpoint(path, map_location="cpu"), data, batch) for batch in (False, True)]
        cells = [f"{100 * miou:.1f} / {100 * accuracy:.1f}" for miou, accuracy in results]
        print(f"| `{path}` | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
