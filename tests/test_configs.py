"""The shipped configs compose: a config built on another (``config: <file>`` and dotted keys) is,
as the CLI reads it, the other one with exactly the keys it names changed; every run writes under
its ``trainer.default_root_dir``."""

import importlib
from pathlib import Path

import pytest
import yaml
from conftest import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DERIVED = sorted(p for p in CONFIGS.glob("*/*.yaml") if "config" in (yaml.safe_load(p.read_text()) or {}))


def resolved(task: str, config: Path, capsys) -> dict:
    """The full config the task's CLI builds from ``config`` (``fit --print_config``)."""
    main = importlib.import_module(f"tasks.{task}.__main__").main
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_there_are_derived_configs():
    assert len(DERIVED) >= 8, DERIVED  # the S1-S4 recipes of each task are stated once, in their base


@pytest.mark.parametrize("config", DERIVED, ids=[p.stem for p in DERIVED])
def test_derived_config_is_its_base_with_the_named_keys_changed(config, capsys):
    own = yaml.safe_load(config.read_text())
    base = config.parent / own.pop("config")
    task = config.parent.name
    derived_flat, base_flat = flatten(resolved(task, config, capsys)), flatten(resolved(task, base, capsys))
    changed = {key for key in derived_flat.keys() | base_flat.keys() if derived_flat.get(key) != base_flat.get(key)}
    assert changed == set(own), f"{config.name} changes {sorted(changed)}, names {sorted(own)}"
    assert all(derived_flat[key] == value for key, value in own.items())


@pytest.mark.parametrize("config", DERIVED, ids=[p.stem for p in DERIVED])
def test_load_config_reads_a_derived_config_as_the_cli_does(config, capsys):
    """The tests' ``load_config`` (used to find a config's variant and weights) agrees with the CLI."""
    task = config.parent.name
    cli = flatten(resolved(task, config, capsys))
    for key, value in flatten(load_config(config)).items():
        if not isinstance(value, list):  # lists of callbacks / loggers are expanded by the CLI
            assert cli.get(key) == value, key


def test_default_root_dir_holds_logs_and_checkpoints(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from tasks.common.callbacks import TaskCheckpoint
    from tasks.common.cli import TaskTrainer

    checkpoint = TaskCheckpoint(monitor="val/acc1", mode="max")
    trainer = TaskTrainer(default_root_dir=str(tmp_path / "run"), callbacks=[checkpoint], accelerator="cpu")
    assert [type(logger) for logger in trainer.loggers] == [CSVLogger, TensorBoardLogger]
    assert {Path(logger.save_dir) for logger in trainer.loggers} == {tmp_path / "run"}
    assert Path(checkpoint.dirpath) == (tmp_path / "run" / "checkpoints").resolve()
    explicit = TaskCheckpoint(dirpath=str(tmp_path / "elsewhere"))
    trainer = TaskTrainer(default_root_dir=str(tmp_path / "run"), callbacks=[explicit], logger=False, accelerator="cpu")
    assert trainer.loggers == [] and Path(explicit.dirpath) == (tmp_path / "elsewhere").resolve()


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_without_a_configured_folder_a_run_writes_under_outputs_task(task, tmp_path, capsys):
    """Not into the working directory: logs and checkpoints go to outputs/<task>, as predictions and exports do."""
    config = tmp_path / "bare.yaml"
    config.write_text("data:\n  root: x\n")
    assert resolved(task, config, capsys)["trainer"]["default_root_dir"] == f"outputs/{task}"
