"""What INT8 and ExecuTorch cost in accuracy: export the real-data benchmark's MobileOne models.

    python -m benchmarks.int8_cost                      # after python -m benchmarks.real_data
    python -m benchmarks.int8_cost --tasks detection --calibration-images 512
    python -m benchmarks.int8_cost --start imagenet     # the models fine-tuned from ImageNet weights (real_data --pretrained)

For each task, the ``last.ckpt`` that ``benchmarks.real_data`` trained (``--work-dir``, seed
``--seed``) is exported with ``--int8 true --executorch true`` through the task's own CLI and
recipe; the export runs every file over the validation split (``model.json``: ``deployed``).
Prints one markdown table: per file, the validation metric, its difference from the fused float32
model, the prediction agreement with it and the file size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.real_data import DEFAULT_DATASETS, IMAGENET, ROOT, SCRATCH, SETTINGS, _run, run_folder

FILES = ("model_fused.pt", "model.int8.onnx", "model.pte", "model.int8.pte")


def export(task: str, datasets_root: Path, work_dir: Path, seed: int, calibration_images: int, backbone: str, start: str = SCRATCH,
           executorch: bool = True) -> dict:
    """Export one real-data model with INT8 and ExecuTorch files; return its ``model.json`` and wall time."""
    setting = SETTINGS[task]
    work = run_folder(work_dir, task, backbone, seed, start)
    checkpoint = work / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        pretrained = " --pretrained" if start == IMAGENET else ""
        raise SystemExit(f"{checkpoint} does not exist: run python -m benchmarks.real_data --tasks {task} --seeds {seed}{pretrained} first")
    output = work / "exported_int8"
    command = [
        sys.executable, "-m", f"tasks.{task}", "export", "--config", setting.config_for(start), "--config", str(work / "override.yaml"),
        "--data.root", str(datasets_root / setting.data_dir), "--ckpt_path", str(checkpoint), "--output", str(output),
        "--int8", "true", "--executorch", str(executorch).lower(), "--calibration_images", str(calibration_images),
    ]
    seconds = _run(command, work / "export_int8.log")
    return {"metadata": json.loads((output / "model.json").read_text()), "seconds": seconds}


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "| task | metric | file | runtime | metric value | vs float32 | agreement with float32 | size |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, result in results.items():
        metric = f"val/{SETTINGS[task].metric}"
        deployed, sizes = result["metadata"]["deployed"], result["metadata"]["file_bytes"]
        reference = deployed["model_fused.pt"]["validation"][metric]
        for name in [name for name in FILES if name in deployed]:
            record = deployed[name]
            value = record["validation"][metric]
            comparison = record.get("vs_float32")
            agreement = "(reference)" if comparison is None else (
                f"{100 * comparison['agreement']:.1f}% of {comparison['agreement_count']}" if comparison["agreement"] is not None else "n/a")
            lines.append(
                f"| {task} | {SETTINGS[task].metric} | `{name}` | {record['runtime']} | {100 * value:.1f} | "
                f"{100 * (value - reference):+.1f} | {agreement} | {sizes[name] / 1e6:.1f} MB |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--datasets-root", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "real_data", help="benchmarks.real_data's --work-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="mobileone_s0")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--start", choices=[SCRATCH, IMAGENET], default=SCRATCH, help="the runs from scratch or fine-tuned from ImageNet")
    parser.add_argument("--no-executorch", dest="executorch", action="store_false", help="the onnxruntime files only")
    args = parser.parse_args(argv)
    results = {}
    for task in args.tasks:
        results[task] = export(task, args.datasets_root, args.work_dir, args.seed, args.calibration_images, args.backbone, args.start,
                                args.executorch)
        print(f"[int8_cost] {task}: exported in {results[task]['seconds']:.0f} s", file=sys.stderr, flush=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
