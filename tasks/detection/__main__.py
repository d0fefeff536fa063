"""``python -m tasks.detection {fit,validate,test,predict,export} --config ...``"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningArgumentParser

from tasks.common.cli import TaskCLI
from tasks.detection.data import DetectionDataModule
from tasks.detection.module import DetectionWriter, ObjectDetectionTask


class DetectionCLI(TaskCLI):
    prediction_writer = DetectionWriter
    data_to_model = (*TaskCLI.data_to_model, "category_ids")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.image_size", "model.image_size")  # an option of both: set once, in data


def main(args: ArgsType = None, run: bool = True) -> TaskCLI:
    """The task's command line on ``args`` (default: ``sys.argv``); with ``run=False`` it only builds
    the model and data module from the options (``.model``, ``.datamodule``), without a subcommand."""
    return DetectionCLI(ObjectDetectionTask, DetectionDataModule, args=args, run=run)


if __name__ == "__main__":
    main()
