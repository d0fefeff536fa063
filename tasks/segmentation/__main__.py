"""``python -m tasks.segmentation {fit,validate,test,predict,export} --config ...``"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType

from tasks.common.cli import TaskCLI
from tasks.segmentation.data import SegmentationDataModule
from tasks.segmentation.module import MaskWriter, SemanticSegmentationTask


class SegmentationCLI(TaskCLI):
    prediction_writer = MaskWriter
    data_to_model = (*TaskCLI.data_to_model, "ignore_index")


def main(args: ArgsType = None, run: bool = True) -> TaskCLI:
    """The task's command line on ``args`` (default: ``sys.argv``); with ``run=False`` it only builds
    the model and data module from the options (``.model``, ``.datamodule``), without a subcommand."""
    return SegmentationCLI(SemanticSegmentationTask, SegmentationDataModule, args=args, run=run)


if __name__ == "__main__":
    main()
