"""``python -m tasks.classification {fit,validate,test,predict,export} --config ...``"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType

from tasks.classification.data import ImageFolderDataModule
from tasks.classification.module import ImageClassificationTask, TopKPredictionWriter
from tasks.common.cli import TaskCLI


class ClassificationCLI(TaskCLI):
    prediction_writer = TopKPredictionWriter


def main(args: ArgsType = None, run: bool = True) -> TaskCLI:
    """The task's command line on ``args`` (default: ``sys.argv``); with ``run=False`` it only builds
    the model and data module from the options (``.model``, ``.datamodule``), without a subcommand."""
    return ClassificationCLI(ImageClassificationTask, ImageFolderDataModule, args=args, run=run)


if __name__ == "__main__":
    main()
