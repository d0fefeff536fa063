"""The command line shared by all tasks: LightningCLI with an ``export`` subcommand."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from tqdm import tqdm

from backbones import is_named_weights
from tasks.common.callbacks import TaskCheckpoint, run_output
from tasks.common.export import export_task
from tasks.common.module import task_name

__all__ = ["TaskCLI", "TaskTrainer", "read_task_checkpoint"]

SUBCOMMAND_HELP = {
    "fit": "Train (and validate every epoch); resume with --ckpt_path last.",
    "validate": "Evaluate a checkpoint (--ckpt_path) on the validation split.",
    "test": "Evaluate a checkpoint (--ckpt_path) on the test split.",
    "predict": "Run a checkpoint (--ckpt_path) on a folder of images and write the predictions.",
    "export": "Reparameterize a checkpoint, check it numerically and write the deployable files.",
}

# --ckpt_path values that Lightning resolves itself
CKPT_PATH_KEYWORDS = ("last", "best", "hpc", "registry")


def read_task_checkpoint(path: str | os.PathLike, module_class: type | None = None) -> dict[str, Any]:
    """Read a task's Lightning checkpoint with ``torch.load(weights_only=True)``, naming what is wrong.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not a
    PyTorch checkpoint (text, truncated), one holding pickled Python objects (refused: unpickling
    them could run code), one without a ``state_dict``, and - with ``module_class`` - a checkpoint
    of another task (recorded in the file, or, for older files, hyper-parameters the task lacks).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # text, truncated and foreign files raise several types
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise ValueError(
                f"checkpoint {path!r} holds pickled Python objects besides tensors and plain values; they are not"
                f" loaded, because unpickling an untrusted file can run code. ({str(error).splitlines()[0]})"
            ) from error
        raise ValueError(f"{path!r} is not a PyTorch checkpoint, or it is truncated ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path!r} is not a Lightning checkpoint: expected a dict with a 'state_dict', found {found}")
    if module_class is not None:
        expected, recorded = task_name(module_class), checkpoint.get("task")
        if recorded is not None and recorded != expected:
            raise ValueError(f"{path!r} is a checkpoint of {recorded}, not of {expected}")
        options = inspect.signature(module_class.__init__).parameters
        foreign = sorted(set(checkpoint.get("hyper_parameters", {})) - set(options) - {"_instantiator", "_class_path"})
        if recorded is None and foreign:
            raise ValueError(
                f"{path!r} is not a checkpoint of {expected}: its hyper-parameters {foreign} are not options of"
                " this task (a checkpoint of another task?)"
            )
    return checkpoint


def _task_folder(model_class: type) -> str:
    """``classification`` for ``tasks.classification.module.ImageClassificationTask``; the class
    name in lower case for a task defined elsewhere."""
    parts = model_class.__module__.split(".")
    return parts[1] if parts[0] == "tasks" and len(parts) > 2 else model_class.__name__.lower()


class TaskTrainer(pl.Trainer):
    """A ``Trainer`` with an ``export`` subcommand and one folder for a run's files, ``default_root_dir``.

    LightningCLI turns the ``export`` method into a subcommand.

    Without a ``logger`` (or with ``logger=True``) it logs to ``<default_root_dir>/version_N/
    metrics.csv`` (CSV) and ``<default_root_dir>/tensorboard/version_N`` (TensorBoard), instead of
    Lightning's single TensorBoard logger; and a ``TaskCheckpoint`` without a ``dirpath`` writes to
    ``<default_root_dir>/checkpoints``. So a config states its output folder once, and a config
    built on another (``config: <file>`` plus ``trainer.default_root_dir: ...``) moves all of it.
    """

    def __init__(self, *args: Any, logger: Logger | Iterable[Logger] | bool | None = None, **kwargs: Any) -> None:
        if logger is None or logger is True:
            root = kwargs.get("default_root_dir") or os.getcwd()
            logger = [CSVLogger(root, name=""), TensorBoardLogger(root, name="tensorboard")]
        super().__init__(*args, logger=logger, **kwargs)
        for callback in self.callbacks:
            if isinstance(callback, TaskCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.realpath(os.path.join(self.default_root_dir, "checkpoints"))

    def export(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Reparameterize a checkpoint, check it numerically and write the deployable files.

        Writes the inference-form weights, ``model.json`` and ONNX (and, on request, TorchScript,
        CoreML, INT8 ONNX and ExecuTorch), each checked against the trained model on real
        validation images.

        Args:
            model: the task module (its weights come from ``ckpt_path`` when given).
            datamodule: supplies the real validation images the fused model is checked on.
            ckpt_path: a training checkpoint; with the EMA callback its ``state_dict`` holds the
                averaged weights, which are the ones exported.
            output: directory for ``model_fused.pt``, ``model.json``, ``model.onnx`` (default:
                ``exported/`` under ``trainer.default_root_dir``, the run's one output folder;
                ``outputs/<task>/exported`` without one), replaced as a whole.
            **options: ``tasks.common.export.export_task``'s options (``onnx``, ``int8``, ...), the
                subcommand's other flags.
        """
        if ckpt_path is not None:
            model.load_state_dict(read_task_checkpoint(ckpt_path, type(model))["state_dict"])
        return export_task(model, datamodule, run_output(self, output, "exported"), **options)


class _ProgressBarSafeHandler(logging.StreamHandler):
    """Writes each record on lines of its own above a running progress bar: through ``tqdm.write``
    (which lifts tqdm's bars out of the way), into ``stream`` or else whatever ``sys.stderr`` is at
    that moment, so that Rich's progress bar, which swaps ``sys.stderr`` for a proxy printing above
    its live display while it runs, takes the lines too."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.fixed_stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.fixed_stream or sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


def _not_an_advert(record: logging.LogRecord) -> bool:
    """Drop Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines."""
    return not str(record.msg).startswith("💡 Tip")


def configure_cli_output() -> None:
    """Print the ``tasks.*`` loggers' INFO lines (where files were written, the learning rate, export
    steps, result tables, ...) on stderr, on rank 0 only, on lines of their own above any progress
    bar, once per process. Where logging is already configured (a handler on ``tasks`` or on the
    root logger, e.g. ``logging.basicConfig``), it is left alone.

    Silenced, as not the user's business: Lightning's advertising tips, the deprecation warning
    Lightning 2.6 raises from inside itself (``LeafSpec``), and jsonargparse's deprecation warnings
    about the calls LightningCLI makes (unless ``JSONARGPARSE_DEPRECATION_WARNINGS`` is set)."""
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_an_advert not in rank_zero_logger.filters:
        rank_zero_logger.addFilter(_not_an_advert)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    logger = logging.getLogger("tasks")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = _ProgressBarSafeHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda record: rank_zero_only.rank == 0)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class SaveConfigNextToLogs(SaveConfigCallback):
    """Saves the run's ``config.yaml`` into the logger's folder and says where, and writes nothing
    without a logger (``--trainer.logger false``, ``fast_dev_run``), where Lightning would write it
    into ``default_root_dir``, the working directory by default."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.logger is None or isinstance(trainer.logger, DummyLogger):
            return
        saved_before = self.already_saved
        super().setup(trainer, pl_module, stage)
        if self.already_saved and not saved_before and trainer.log_dir is not None:
            rank_zero_info(f"config: {os.path.join(trainer.log_dir, self.config_filename)}")


class TaskCLI(LightningCLI):
    """LightningCLI with the ``export`` subcommand and this repo's defaults: the tasks' log lines
    shown, ``config.yaml`` saved next to the logs only, the best checkpoint named at the end of fit.

    A task's CLI names its ``prediction_writer`` (a callback, configured under ``predictions``) and
    the data module's attributes that set model options of the same name (``data_to_model``, read
    once the data module is built: the classes come from the data).
    """

    prediction_writer: type[pl.Callback] | None = None
    data_to_model: tuple[str, ...] = ("num_classes", "class_names")

    def __init__(self, model_class: type[pl.LightningModule], *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", TaskTrainer)
        kwargs.setdefault("save_config_callback", SaveConfigNextToLogs)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        task = _task_folder(model_class)
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("prog", f"python -m tasks.{task}" if model_class.__module__.startswith("tasks.") else None)
        parser_kwargs.setdefault("description", (
            f"{task.capitalize()} on MobileOne: train (fit), evaluate (validate, test), predict on a folder "
            "of images, export the reparameterized network. Each subcommand lists its options "
            "(e.g. fit --help)."
        ))
        configure_cli_output()
        super().__init__(model_class, *args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        # a run without a configured output folder writes under outputs/<task>, as predict and export do
        parser.set_defaults({"trainer.default_root_dir": os.path.join("outputs", _task_folder(self.model_class))})
        for name in self.data_to_model:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        if self.prediction_writer is not None:
            parser.add_lightning_class_args(self.prediction_writer, "predictions")

    def _add_subcommands(self, parser: Any, **kwargs: Any) -> None:
        """Lightning's subcommands, with help lines that are whole sentences (Lightning's own are
        the first line of a wrapped docstring, cut mid-sentence)."""
        super()._add_subcommands(parser, **kwargs)
        for action in parser._subcommands_action._choices_actions:
            action.help = SUBCOMMAND_HELP.get(action.dest, action.help)

    def before_instantiate_classes(self) -> None:
        """``predict`` logs no metrics: it gets no logger, so it leaves no ``version_N/`` folder
        holding only ``hparams.yaml`` beside the training logs."""
        if self.config.get("subcommand") == "predict":
            self.config.predict.trainer.logger = False

    def after_fit(self) -> None:
        """Name the checkpoints the run left: the best with its metric, and the last."""
        for callback in self.trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            if callback.best_model_path and callback.monitor and callback.best_model_score is not None:
                score = float(callback.best_model_score)
                rank_zero_info(f"best checkpoint ({callback.monitor} = {score:.4f}): {callback.best_model_path}")
            elif callback.best_model_path:
                rank_zero_info(f"checkpoint: {callback.best_model_path}")
            if callback.last_model_path:
                rank_zero_info(f"last checkpoint: {callback.last_model_path}")

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before LightningCLI reads the model's options from it.

        A file that is not this task's checkpoint gets an error naming it and what it is; model
        options given on the command line or in a config that differ from the checkpoint's are
        named in a warning, since the checkpoint's values are the ones used.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and not (ckpt_path in CKPT_PATH_KEYWORDS and not Path(ckpt_path).exists()):
            checkpoint = read_task_checkpoint(ckpt_path, self.model_class)
            given = self.config[subcommand].get("model") or {}
            overridden = [
                f"{key}={value!r} (given: {given[key]!r})"
                for key, value in checkpoint.get("hyper_parameters", {}).items()
                if key in given and given[key] is not None and not _same_value(given[key], value)
            ]
            if overridden:
                rank_zero_warn(f"--ckpt_path {ckpt_path}: the model is built with the checkpoint's " + ", ".join(overridden))
        super()._parse_ckpt_path()
        if ckpt_path:  # the checkpoint holds the weights: initial weights by name need no download (nor network)
            model = self.config[subcommand].get("model") or {}
            key = self.model_class.weights_hparam
            if key and key in model and is_named_weights(model[key]):
                model[key] = None

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b or str(a) == str(b)
