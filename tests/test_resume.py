"""A training run killed with SIGKILL at a random step and resumed from ``last.ckpt`` ends with
exactly the weights of the same run left alone; ``last.ckpt`` always holds the last epoch.
``RESUME_TEST_STEP=<n>`` replays a kill before step n (a failure message names it)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.classification.data import make_demo_dataset
from tasks.segmentation.data import make_demo_voc

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).parent / "configs"
EPOCHS = 3


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", train_per_class=6, val_per_class=2, size=40)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return make_demo_voc(tmp_path_factory.mktemp("voc") / "VOCdevkit", train_images=8, val_images=2, size=64)


# the ImageNet recipes' exponential moving average of the weights and weight-decay annealing, which must resume too
EMA = {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}}
COSINE_WEIGHT_DECAY = {"class_path": "tasks.common.callbacks.CosineWeightDecay", "init_args": {"start": 1e-3, "end": 1e-5}}


def callbacks(*extra: dict, every_n_steps: int = 2, **checkpoint_args: object) -> str:
    checkpoint = {"class_path": "tasks.common.callbacks.TaskCheckpoint",
                  "init_args": {"last_every_n_train_steps": every_n_steps, **checkpoint_args}}
    return "--trainer.callbacks=" + json.dumps([checkpoint, *extra])


def fit(task: str, workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m tasks.<task> fit`` in a fresh process, as a user runs it."""
    command = [sys.executable, "-m", f"tasks.{task}", "fit", "--config", str(CONFIGS / f"{task}.yaml"),
               "--trainer.default_root_dir", str(workdir), f"--trainer.max_epochs={EPOCHS}", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(expected: dict, actual: dict, what: str) -> None:
    assert expected["global_step"] == actual["global_step"]
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    different = [k for k, v in expected["state_dict"].items() if not torch.equal(v, actual["state_dict"][k])]
    assert not different, f"{what}: {len(different)} tensors differ, first {different[:3]}"
    for a, b in zip(expected["optimizer_states"][0]["state"].values(), actual["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"]), f"{what}: optimizer momentum differs"


def kill_and_resume(task: str, data_args: list[str], steps_per_epoch: int, tmp_path: Path, *extra: dict) -> None:
    steps = steps_per_epoch * EPOCHS
    step = int(os.environ.get("RESUME_TEST_STEP") or random.Random().randint(2, steps - 1))  # the variable replays a failure
    what = f"{task} killed before step {step} of {steps}"
    fit(task, tmp_path / "straight", *data_args, callbacks(*extra))
    killed = fit(task, tmp_path / "killed", *data_args,
                 callbacks(*extra, {"class_path": "kill_at_step.KillAtStep", "init_args": {"step": step}}), check=False)
    assert killed.returncode == -9, f"{what}: the run was not killed (exit {killed.returncode})"
    saved = max(s for s in range(1, step + 1) if s % 2 == 0 or s % steps_per_epoch == 0)
    assert load(tmp_path / "killed" / "checkpoints" / "last.ckpt")["global_step"] == saved, what
    fit(task, tmp_path / "killed", *data_args, callbacks(*extra), "--ckpt_path=last")
    expected = load(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert expected["global_step"] == steps
    assert_same_state(expected, load(tmp_path / "killed" / "checkpoints" / "last.ckpt"), what)


def test_classification_resume_is_bit_exact(image_root, tmp_path):
    # 30 images, batch 4, last partial batch dropped: 7 steps per epoch; two loader workers; EMA, weight decay annealing
    kill_and_resume("classification", [f"--data.root={image_root}", "--data.num_workers=2"], 7, tmp_path,
                    EMA, COSINE_WEIGHT_DECAY)


def test_segmentation_resume_is_bit_exact(voc_root, tmp_path):
    # 8 images, batch 2: 4 steps per epoch; random scale/crop/flip drawn in the loader workers
    kill_and_resume("segmentation", [f"--data.root={voc_root}", "--data.num_workers=2"], 4, tmp_path)


def test_last_checkpoint_is_the_last_epoch_when_the_monitored_metric_stalls(image_root, tmp_path):
    # the monitored val/constant is 1.0 at every epoch: no improvement after epoch 0
    fit("classification", tmp_path, f"--data.root={image_root}",
        callbacks({"class_path": "stalled_metric.ConstantMetric"}, every_n_steps=0, monitor="val/constant", mode="max", filename="best"))
    assert load(tmp_path / "checkpoints" / "best.ckpt")["epoch"] == 0
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (EPOCHS - 1, 7 * EPOCHS)
