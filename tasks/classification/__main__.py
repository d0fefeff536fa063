"""``python -m tasks.classification {fit,validate,test,predict,export} --config ...``"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningArgumentParser

from tasks.classification.data import ImageFolderDataModule
from tasks.classification.module import ImageClassificationTask, TopKPredictionWriter
from tasks.common.cli import TaskCLI


class ClassificationCLI(TaskCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.add_lightning_class_args(TopKPredictionWriter, "predictions")


def main(args: ArgsType = None, run: bool = True) -> TaskCLI:
    """The task's command line on ``args`` (default: ``sys.argv``); with ``run=False`` it only builds
    the model and data module from the options (``.model``, ``.datamodule``), without a subcommand."""
    return ClassificationCLI(ImageClassificationTask, ImageFolderDataModule, args=args, run=run)


if __name__ == "__main__":
    main()
