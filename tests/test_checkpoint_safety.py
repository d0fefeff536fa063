"""Checkpoints given by path: crafted pickles are refused everywhere, and files that are not this
task's checkpoint (text, another task's, another variant) are named as such."""

import logging
import pathlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from backbones import CheckpointMismatchError, load_checkpoint, mobileone, read_state_dict
from tasks.classification.__main__ import main as classification_main
from tasks.classification.data import make_demo_dataset
from tasks.classification.module import ImageClassificationTask
from tasks.common.cli import TaskTrainer, read_task_checkpoint

CONFIG = str(Path(__file__).parent / "configs" / "classification.yaml")


class TouchOnUnpickle:
    """Unpickling this calls ``Path.touch(marker)``: the stand-in for code a crafted file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """A checkpoint-looking file whose unpickling would create ``marker``."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"network.linear.bias": torch.zeros(5)}, "payload": TouchOnUnpickle(marker)}, path)
    return path, marker


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", train_per_class=2, val_per_class=1, size=40)


@pytest.fixture(scope="module")
def trained(image_root, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("fit")
    classification_main(["fit", "--config", CONFIG, f"--data.root={image_root}", f"--trainer.default_root_dir={workdir}"])
    return workdir / "checkpoints" / "last.ckpt"


def cli(subcommand: str, root: Path, *args: str) -> None:
    classification_main([subcommand, "--config", CONFIG, f"--data.root={root}", *args])


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict", "export"])
def test_cli_refuses_a_crafted_pickle(subcommand, crafted, image_root):
    path, marker = crafted
    with pytest.raises(ValueError, match="pickled Python objects"):
        cli(subcommand, image_root, f"--ckpt_path={path}")
    assert not marker.exists()


def test_python_entry_points_refuse_a_crafted_pickle(crafted):
    path, marker = crafted
    model = ImageClassificationTask(num_classes=5)
    with pytest.raises(ValueError, match="pickled Python objects"):
        TaskTrainer(logger=False).export(model, ckpt_path=str(path))
    with pytest.raises(ValueError, match="pickled Python objects"):
        read_task_checkpoint(path)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(mobileone("s0"), path)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(path)
    with pytest.raises(Exception, match="[Ww]eights.only"):  # Lightning's own loader (torch's weights_only default)
        ImageClassificationTask.load_from_checkpoint(path)
    with pytest.raises(Exception, match="[Ww]eights.only"):
        batches = [(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))]
        pl.Trainer(logger=False, max_epochs=1).fit(model, train_dataloaders=batches, ckpt_path=path)
    assert not marker.exists()


def test_text_file_as_checkpoint_is_named(tmp_path, image_root):
    text = tmp_path / "notes.ckpt"
    text.write_text("epoch 3 was the best one\n")
    with pytest.raises(ValueError, match=r"notes\.ckpt' is not a PyTorch checkpoint"):
        cli("validate", image_root, f"--ckpt_path={text}")


def test_missing_checkpoint_is_named(tmp_path, image_root):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        cli("validate", image_root, f"--ckpt_path={tmp_path / 'nowhere.ckpt'}")


def test_another_tasks_checkpoint_is_named(tmp_path, image_root):
    recorded = tmp_path / "segmentation.ckpt"
    torch.save({"state_dict": {}, "task": "tasks.segmentation.module.SemanticSegmentationTask",
                "hyper_parameters": {"backbone": "mobileone_s0"}}, recorded)
    with pytest.raises(ValueError, match="is a checkpoint of tasks.segmentation.module.SemanticSegmentationTask, "
                                         "not of tasks.classification.module.ImageClassificationTask"):
        cli("validate", image_root, f"--ckpt_path={recorded}")
    older = tmp_path / "older-segmentation.ckpt"  # written before checkpoints recorded their task
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": "mobileone_s0", "output_stride": 16, "backbone_weights": None}}, older)
    with pytest.raises(ValueError, match=r"hyper-parameters \['backbone_weights', 'output_stride'\] are not options"):
        cli("validate", image_root, f"--ckpt_path={older}")


def test_checkpoint_records_its_task_and_model_options_it_overrides_are_named(trained, image_root, tmp_path):
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    assert checkpoint["task"] == "tasks.classification.module.ImageClassificationTask"
    assert len(checkpoint["random_states"]) == 1 and checkpoint["random_states"][0]["torch"].dtype == torch.uint8
    with pytest.warns(UserWarning, match=r"built with the checkpoint's backbone='mobileone_s0' \(given: 'mobileone_s1'\)"):
        cli("validate", image_root, f"--ckpt_path={trained}", "--model.backbone=mobileone_s1", f"--trainer.default_root_dir={tmp_path}")


def test_weights_of_another_variant_name_the_file_and_no_classifier_message(trained, caplog):
    s0_weights = trained.parent / "s0-weights.pt"
    torch.save(mobileone("s0", num_classes=5).state_dict(), s0_weights)
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointMismatchError, match="s0-weights.pt"):
        ImageClassificationTask("mobileone_s1", num_classes=5, weights=str(s0_weights))
    assert "re-initialized" not in caplog.text
