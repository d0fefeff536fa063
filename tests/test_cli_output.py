"""Each task's CLI, run as a user runs it (``fit``, ``predict``, ``export`` in a fresh working
directory): every file it writes is named in its output, nothing lands in the repository, and it
prints no warning from the project or its image decoding."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.classification.data import make_demo_dataset
from tasks.detection.data import make_demo_coco
from tasks.segmentation.data import make_demo_voc

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).parent / "configs"
# a warning line as Python prints it: "<file>:<line>: <Category>Warning: <message>"
WARNING_LINE = re.compile(r"^(?P<file>\S+?):\d+: (?P<category>\w*Warning): (?P<message>.*)$", re.MULTILINE)


def files_under(directory: Path) -> set[Path]:
    return {Path(dirpath) / name for dirpath, _, names in os.walk(directory) for name in names}


def run_cli(task: str, workdir: Path, *args: str) -> str:
    """``python -m tasks.<task> <args>`` in ``workdir`` with every warning shown; its output. Checks
    that each file it wrote is named (itself or a folder holding it) and that no project or
    image-decoding warning was printed."""
    before = files_under(workdir)
    command = [sys.executable, "-W", "default", "-m", f"tasks.{task}", *args]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{output[-3000:]}"
    written = files_under(workdir) - before
    named_paths = {(workdir / token).resolve() for token in re.split(r"[\s'\"(),;]+", output) if token}
    for path in written:
        assert any(parent in named_paths for parent in (path.resolve(), *path.resolve().parents)), (
            f"{args[0]} wrote {path} without naming it:\n{output[-2000:]}")
    for warning in WARNING_LINE.finditer(output):
        source = warning["file"]
        assert not source.startswith((str(ROOT / "tasks"), str(ROOT / "backbones"))), warning.group(0)
        assert "image decoding" not in warning["message"], warning.group(0)
    assert "Tip:" not in output and "LeafSpec" not in output, output[-2000:]  # Lightning's adverts, its own deprecation
    return output


@pytest.fixture
def repository_root_unchanged():
    before = set(os.listdir(ROOT))
    yield
    assert set(os.listdir(ROOT)) == before, f"written into the repository: {set(os.listdir(ROOT)) - before}"


def test_classification_cli_names_what_it_writes(tmp_path, repository_root_unchanged):
    data = make_demo_dataset(tmp_path / "shapes", train_per_class=2, val_per_class=1, size=40)
    common = ["--config", str(CONFIGS / "classification.yaml"), f"--data.root={data}"]
    output = run_cli("classification", tmp_path, "fit", *common, "--trainer.default_root_dir=run")
    assert "last checkpoint:" in output and "SGD lr" in output
    # a logger in the config (as in the shipped ones) gives predict no version_N/ folder: run_cli checks that
    # every file written is named
    run_cli("classification", tmp_path, "predict", *common, "--ckpt_path=run/checkpoints/last.ckpt",
            f"--data.predict_dir={data / 'val'}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir=logs")
    assert not (tmp_path / "logs").exists()
    assert (tmp_path / "outputs" / "classification" / "predictions.csv").is_file()  # the default place
    output = run_cli("classification", tmp_path, "export", *common, "--ckpt_path=run/checkpoints/last.ckpt")
    assert (tmp_path / "outputs" / "classification" / "exported" / "model.onnx").is_file()  # the default place
    assert re.search(r"fused_vs_unfused_agreement: 1\.000000 \(\d+ predictions\)|agreement not measured", output)
    # a run's output folder (as every shipped config sets it) holds its predictions and exports too
    run_cli("classification", tmp_path, "predict", *common, "--ckpt_path=run/checkpoints/last.ckpt", "--trainer.default_root_dir=run",
            f"--data.predict_dir={data / 'val'}")
    run_cli("classification", tmp_path, "export", *common, "--ckpt_path=run/checkpoints/last.ckpt", "--trainer.default_root_dir=run",
            "--onnx=false")
    assert (tmp_path / "run" / "predictions.csv").is_file() and (tmp_path / "run" / "exported" / "model.json").is_file()


def test_detection_cli_names_what_it_writes(tmp_path, repository_root_unchanged):
    data = make_demo_coco(tmp_path / "coco", train_images=4, val_images=2, size=96)
    common = ["--config", str(CONFIGS / "detection.yaml"), f"--data.root={data}"]
    run_cli("detection", tmp_path, "fit", *common, "--trainer.default_root_dir=run")
    run_cli("detection", tmp_path, "predict", *common, "--ckpt_path=run/checkpoints/last.ckpt",
            f"--data.predict_dir={data / 'val2017'}", "--predictions.output=detections")
    assert (tmp_path / "detections" / "detections.json").is_file()
    # a detector trained for 2 steps is ill-conditioned: float32 fusing moves it by ~5e-4 (see test_detection)
    run_cli("detection", tmp_path, "export", *common, "--ckpt_path=run/checkpoints/last.ckpt", "--output=exported",
            "--tolerance=1e-2")


def test_segmentation_cli_names_what_it_writes(tmp_path, repository_root_unchanged):
    data = make_demo_voc(tmp_path / "VOCdevkit", train_images=4, val_images=2, size=64)
    common = ["--config", str(CONFIGS / "segmentation.yaml"), f"--data.root={data}"]
    run_cli("segmentation", tmp_path, "fit", *common, "--trainer.default_root_dir=run")
    run_cli("segmentation", tmp_path, "predict", *common, "--ckpt_path=run/checkpoints/last.ckpt",
            f"--data.predict_dir={data / 'VOC2012' / 'JPEGImages'}", "--predictions.output=masks")
    assert any((tmp_path / "masks").glob("*_overlay.jpg"))
    run_cli("segmentation", tmp_path, "export", *common, "--ckpt_path=run/checkpoints/last.ckpt", "--output=exported")


def test_log_lines_start_on_a_line_of_their_own_above_a_progress_bar(monkeypatch):
    """A result table logged while a progress bar is drawn (validation's) is not glued onto the
    bar's line: with tqdm (Lightning's TQDMProgressBar) and with Rich (its default when rich is
    installed), the handler being made before the bar starts, as the CLI makes it."""
    import io
    import logging

    from rich.console import Console
    from rich.progress import Progress
    from tqdm import tqdm

    from tasks.common.cli import _ProgressBarSafeHandler

    def lines_logged_during(bar_context, stream) -> list[str]:
        logger = logging.getLogger("tasks.test_progress_bar")
        handler = _ProgressBarSafeHandler()  # follows sys.stderr
        logger.addHandler(handler)
        try:
            with bar_context():
                logger.warning("class  IoU\nmIoU  42.00")
        finally:
            logger.removeHandler(handler)
        return [line.strip() for line in stream.getvalue().replace("\r", "\n").split("\n")]

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)

    def tqdm_bar():
        bar = tqdm(total=10, file=stream, desc="Validation", ascii=True)
        bar.update(3)
        return bar

    lines = lines_logged_during(tqdm_bar, stream)
    assert "class  IoU" in lines and "mIoU  42.00" in lines, lines

    # Rich swaps sys.stderr for a proxy while its bar runs: lines written there are printed by its
    # console above the bar (the console's record holds them); lines written past it would not be
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    console = Console(file=stream, force_terminal=True, width=80, record=True)

    def rich_bar():
        progress = Progress(console=console, redirect_stderr=True)
        progress.add_task("Validation", total=10, completed=3)
        return progress

    lines_logged_during(rich_bar, stream)
    printed = console.export_text()  # what the console printed (the cursor moves that place it are left out)
    assert "class  IoU" in printed and "mIoU  42.00" in printed, printed
