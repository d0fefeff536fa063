"""INT8 of MobileOne-S0 through the command line: post-training (``export --int8 true``) against
quantization-aware distillation (``tasks.classification.qat``), on real ImageNet images.

    python -m benchmarks.int8_qat                 # both folds, S0: about 40 minutes on 2 cores
    python -m benchmarks.int8_qat --folds 0 --schemes s8s8

A step whose output is already there (``model.json``, ``last.ckpt``) is not run again: delete
``--work-dir`` to start over.

``imagenet-sample``'s 500 images are split into the halves of ``benchmarks.int8_methods``
(``half_indices``): per fold, ``<work-dir>/fold<k>/data/train`` links the images of one half (the
calibration and distillation images, read without labels) and ``val`` those of the other (held
out, labelled by their class folders). Per fold and INT8 scheme, these commands run, each in its
own process, as a user runs them:

1. ``python -m tasks.classification export --config configs/classification/mobileone_s0_imagenet.yaml
   --model.weights <S0 file> --int8 true --executorch true --int8_scheme <scheme>``: post-training
   quantization, the export's default (prepared, percentile calibration);
2. ``python -m tasks.classification.qat fit --config configs/classification/qat_s0.yaml
   --model.weights <S0 file> --model.int8_scheme <scheme>``, then ``... qat export --ckpt_path
   <last.ckpt> --int8 true --executorch true`` (``--executorch`` for s8s8 only: the export refuses
   XNNPACK's int8 of a network trained for ``reduce_range``'s 64-level weights, which lost 15-20
   points here at commit 2b42d4e, before it did).

Every export validates each file it writes on the held-out half; the table gives the top-1 of the
INT8 files against that of Apple's float32 network (the same images, the same pipeline) and how often
their top class is float32's. Then batch-1, one-thread latency of float32 and INT8 files of the
distilled export, interleaved in one run (``benchmarks.int8_methods.latency_ms``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.int8_methods import half_indices, latency_ms
from benchmarks.int8_schemes import DEFAULT_SHARED, ROOT, imagenet_sample

WEIGHTS = "weights/mobileone_s0.pth.tar"
METRIC = "val/acc1"


def fold_folders(shared: Path, fold: int, root: Path) -> Path:
    """``root`` with ``train/`` and ``val/`` ImageFolder trees of links to ``fold``'s halves of imagenet-sample."""
    paths, _ = imagenet_sample(shared / "datasets" / "imagenet-sample")
    for split, indices in zip(("train", "val"), half_indices(len(paths), fold)):
        for index in indices:
            link = root / split / paths[index].parent.name / paths[index].name
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(paths[index].resolve())
    return root


def run(arguments: list[str], log: Path, done: Path) -> float:
    """Run ``python -m <arguments>`` from the repository root, output to ``log``, unless ``done`` (the
    file it writes last) exists from an earlier run; its wall time."""
    if done.exists():
        return 0.0
    started = time.perf_counter()
    with open(log, "w") as handle:
        completed = subprocess.run([sys.executable, "-m", *arguments], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    if completed.returncode != 0:
        raise SystemExit(f"python -m {' '.join(arguments)} failed ({completed.returncode}); its output: {log}")
    return time.perf_counter() - started


def rows(method: str, fold: int, scheme: str, metadata: dict, float32: float) -> list[dict]:
    """One row per INT8 file of an export's ``model.json``."""
    result = []
    for name in ("model.int8.onnx", "model.int8.pte"):
        if name not in metadata["deployed"]:  # no ExecuTorch INT8 from a network trained for reduce_range
            continue
        record = metadata["deployed"][name]
        validation = record["validation"]
        result.append({
            "method": method, "fold": fold, "file": name, "runtime": record["runtime"],
            "scheme": scheme if name.endswith(".onnx") else "XNNPACK int8",
            "float32": float32, "int8": validation[METRIC],
            # the distilled export compares each file with the teacher (val/agreement); PTQ's vs_float32 is the same comparison
            "agreement": validation.get("val/agreement", record["vs_float32"]["agreement"]),
        })
    return result


def markdown(results: list[dict]) -> str:
    lines = ["| method | file (runtime, scheme) | fold | float32 top-1 | INT8 top-1 | vs float32 | agreement with float32 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in results:
        lines.append(f"| {row['method']} | `{row['file']}` ({row['runtime']}, {row['scheme']}) | {row['fold']} | "
                     f"{100 * row['float32']:.1f} | {100 * row['int8']:.1f} | {100 * (row['int8'] - row['float32']):+.1f} | "
                     f"{100 * row['agreement']:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder holding weights/ and datasets/imagenet-sample")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "int8_qat")
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    parser.add_argument("--schemes", nargs="+", default=["s8s8", "reduce_range"], choices=["s8s8", "reduce_range"])
    parser.add_argument("--rounds", type=int, default=50, help="latency rounds")
    parser.add_argument("--fit", nargs="*", default=[], help="extra options of the distillation's fit (e.g. --trainer.max_epochs=4)")
    args = parser.parse_args(argv)
    from benchmarks.machine import describe_machine

    weights = str((args.shared / WEIGHTS).resolve())
    results = []
    for fold in args.folds:
        data = fold_folders(args.shared, fold, args.work_dir / f"fold{fold}" / "data")
        common = [f"--data.root={data}", f"--model.weights={weights}", "--data.num_workers=2"]
        for scheme in args.schemes:
            work = args.work_dir / f"fold{fold}" / scheme
            work.mkdir(parents=True, exist_ok=True)
            ptq = work / "ptq"
            seconds = run(["tasks.classification", "export", "--config=configs/classification/mobileone_s0_imagenet.yaml", *common,
                           "--data.unlabelled_train=true", "--data.batch_size=32", f"--output={ptq}", "--int8=true",
                           "--executorch=true", f"--int8_scheme={scheme}"], work / "ptq.log", ptq / "model.json")
            ptq_metadata = json.loads((ptq / "model.json").read_text())
            float32 = ptq_metadata["deployed"]["model_fused.pt"]["validation"][METRIC]
            results += rows("post-training (export default)", fold, scheme, ptq_metadata, float32)
            print(f"fold {fold} {scheme}: post-training export in {seconds:.0f} s", flush=True)
            config = ["--config=configs/classification/qat_s0.yaml", *common]
            seconds = run(["tasks.classification.qat", "fit", *config, f"--model.int8_scheme={scheme}",
                           f"--trainer.default_root_dir={work / 'qat'}", *args.fit], work / "qat_fit.log",
                          work / "qat" / "checkpoints" / "last.ckpt")
            print(f"fold {fold} {scheme}: distillation in {seconds:.0f} s", flush=True)
            exported = work / "qat_export"
            seconds = run(["tasks.classification.qat", "export", *config, f"--model.int8_scheme={scheme}",
                           f"--ckpt_path={work / 'qat' / 'checkpoints' / 'last.ckpt'}", f"--output={exported}", "--int8=true",
                           f"--executorch={scheme == 's8s8'}"], work / "qat_export.log", exported / "model.json")
            results += rows("quantization-aware distillation", fold, scheme, json.loads((exported / "model.json").read_text()), float32)
            print(f"fold {fold} {scheme}: distilled export in {seconds:.0f} s", flush=True)
    print(f"machine: {describe_machine('cpu')}; held-out half of imagenet-sample (250 images), the other half calibrates / distils")
    print(markdown(results))
    (args.work_dir / f"results_fold{'_'.join(map(str, args.folds))}.json").write_text(json.dumps(results, indent=1) + "\n")
    folder = args.work_dir / f"fold{args.folds[0]}" / args.schemes[0] / "qat_export"
    times = latency_ms(folder, args.rounds)
    print(f"\nbatch 1, 1 thread, median of {args.rounds} interleaved rounds, {folder.relative_to(args.work_dir)}:")
    print("| onnxruntime float32 | onnxruntime INT8 | speed-up | ExecuTorch float32 | ExecuTorch INT8 | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {times['model.onnx']:.2f} ms | {times['model.int8.onnx']:.2f} ms | {times['model.onnx'] / times['model.int8.onnx']:.2f}x | "
          f"{times['model.pte']:.2f} ms | {times['model.int8.pte']:.2f} ms | {times['model.pte'] / times['model.int8.pte']:.2f}x |")


if __name__ == "__main__":
    main()
