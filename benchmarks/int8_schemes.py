"""Which onnxruntime INT8 scheme to use on which x86 CPU, measured on real ImageNet weights and images.

    python -m benchmarks.int8_schemes                       # this CPU
    python -m benchmarks.int8_schemes --emulate-cpu Haswell # and an AVX2-only CPU, emulated

onnxruntime's x86 int8 kernels compute u8 x s8 dot products exactly with VNNI, and with int16
saturation without it (AVX2, AVX-512 without VNNI): the same INT8 file gives other outputs on the
two kinds of CPU. For MobileOne-S0 (Apple's fused ImageNet release) and MobileNetV2 (torchvision's
ImageNet weights), this writes the float32 ONNX file and one INT8 file per scheme of
``backbones.runtimes.INT8_SCHEMES`` (the export's calibration: ``--calibration-images`` images,
``minmax``), then measures on the other, held-out images of ``imagenet-sample``:

- ImageNet top-1 (labels from ``classes.txt``), and agreement of the top-1 class with float32;
- ``kernel vs QDQ``: the relative difference between onnxruntime's int8 kernels and the same
  file run with graph optimizations off (every QuantizeLinear / DequantizeLinear computed in float,
  i.e. what the file means); near 0 where the kernels are exact, large where they saturate;
- batch-1, one-thread latency (this CPU only; emulated timings mean nothing).

With ``--emulate-cpu MODEL`` the measurements (not the latency) are repeated in the same files
under ``qemu-x86_64 -cpu MODEL`` (Debian: ``apt-get install qemu-user``), whose instruction set
onnxruntime sees and dispatches on: ``Haswell`` is AVX2 without AVX-512 or VNNI. The table names
each CPU's flags (``backbones.runtimes.cpu_flags``; under qemu, numpy's cpuid view).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("MOBILEONE_SHARED", ROOT.parent / "shared"))
MODELS = {"mobileone_s0": "mobileone_s0.pth.tar", "mobilenet_v2": "mobilenet_v2_imagenet_dequantized.pth"}


def imagenet_sample(folder: Path) -> tuple[list[Path], list[int]]:
    """The images of ``folder/val/<wnid>/`` and their ImageNet class indices (``folder/classes.txt``)."""
    wnids = (folder / "classes.txt").read_text().split()
    index = {wnid: i for i, wnid in enumerate(wnids)}
    paths = sorted(p for p in (folder / "val").glob("*/*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not paths:
        raise SystemExit(f"no images under {folder / 'val'}: expected val/<wnid>/<name>.JPEG")
    return paths, [index[p.parent.name] for p in paths]


def preprocess(paths: list[Path]) -> np.ndarray:
    """torchvision's ImageNet evaluation: resize 256, centre crop 224, ImageNet mean / std."""
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    transform = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return torch.stack([transform(decode_image(str(p), mode=ImageReadMode.RGB)) for p in paths]).numpy()


def fused_network(name: str, weights: Path):
    """The float32 inference network with every BatchNorm folded, from its ImageNet file."""
    import torch
    import torchvision

    from backbones import fuse_for_deployment, load_checkpoint, mobileone

    if name == "mobileone_s0":
        network = mobileone("s0", inference_mode=True)
        load_checkpoint(network, str(weights))
    else:
        network = torchvision.models.mobilenet_v2()
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return fuse_for_deployment(network.eval())


def write_files(work: Path, shared: Path, calibration_images: int, seed: int) -> None:
    """Float32 and INT8 ONNX files of every model, and the held-out images and labels, under ``work``."""
    import torch

    from backbones.export import to_onnx_bytes
    from backbones.runtimes import INT8_SCHEMES, quantize_onnx

    paths, labels = imagenet_sample(shared / "datasets" / "imagenet-sample")
    order = np.random.default_rng(seed).permutation(len(paths))
    calibration, held_out = order[:calibration_images], order[calibration_images:]
    images = preprocess(paths)
    np.save(work / "images.npy", images[held_out])
    np.save(work / "labels.npy", np.asarray(labels)[held_out])
    batches = [torch.from_numpy(images[calibration[i:i + 32]]) for i in range(0, len(calibration), 32)]
    for name, file in MODELS.items():
        onnx_bytes = to_onnx_bytes(fused_network(name, shared / "weights" / file), batches[0][:1])
        (work / f"{name}.float32.onnx").write_bytes(onnx_bytes)
        for scheme in INT8_SCHEMES:
            (work / f"{name}.{scheme}.onnx").write_bytes(quantize_onnx(onnx_bytes, batches, scheme=scheme))


def evaluate(work: Path, emulated: bool = False) -> dict:
    """Top-1, agreement with float32 and kernel-vs-QDQ difference of every file in ``work``, on
    this CPU (needs onnxruntime and numpy only, so that it also runs under emulation; ``emulated``:
    the CPU's flags from cpuid alone, since qemu-user shows the host's /proc/cpuinfo)."""
    import onnxruntime as ort

    from backbones.runtimes import cpu_flags, int8_cpu

    images, labels = np.load(work / "images.npy"), np.load(work / "labels.npy")

    def logits(path: Path, optimized: bool) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"images": images[i:i + 25]})[0] for i in range(0, len(images), 25)])

    rows = {}
    for name in MODELS:
        reference = logits(work / f"{name}.float32.onnx", True).argmax(1)
        for path in sorted(work.glob(f"{name}.*.onnx")):
            kernel = logits(path, True)
            row = {"top1": float((kernel.argmax(1) == labels).mean()), "agreement": float((kernel.argmax(1) == reference).mean())}
            if ".float32." not in path.name:
                # what the file means does not depend on the CPU: computed once, natively, and reused under emulation
                reference_file = work / f"{path.stem}.qdq.npy"
                if not emulated:
                    np.save(reference_file, logits(path, False))
                qdq = np.load(reference_file)
                row["kernel_vs_qdq"] = float(np.linalg.norm(kernel - qdq) / np.linalg.norm(qdq))
            rows[path.name] = row
    flags = cpu_flags(proc_cpuinfo=not emulated)
    return {"cpu": int8_cpu(flags), "flags": flags, "images": len(labels), "files": rows}


def one_thread_session(path: Path):
    """An onnxruntime CPU session of the file at ``path`` on one thread (intra- and inter-op)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ms(work: Path, rounds: int) -> dict[str, float]:
    """Median batch-1, one-thread latency of every file, timed interleaved."""
    from benchmarks.timing import interleaved_median_ms

    image = np.load(work / "images.npy")[:1]
    calls = {path.name: (lambda session=one_thread_session(path): session.run(None, {"images": image}))
             for path in sorted(work.glob("*.onnx"))}
    return interleaved_median_ms(calls, rounds)


def markdown(results: list[dict], latency: dict[str, float]) -> str:
    lines = ["| model | file | CPU (flags) | top-1 | vs float32 | agreement with float32 | kernel vs QDQ | latency, 1 thread |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        flags = result["flags"]
        short = ", ".join(f for f in flags if f in ("AVX2", "AVX512F", "AVX512VNNI", "AVX_VNNI")) or "none read"
        for name in MODELS:
            reference = result["files"][f"{name}.float32.onnx"]["top1"]
            for file, row in result["files"].items():
                if not file.startswith(name + "."):
                    continue
                speed = f"{latency[file]:.2f} ms" if result.get("native") and file in latency else "(emulated)"
                drift = f"{row['kernel_vs_qdq']:.4f}" if "kernel_vs_qdq" in row else ""
                lines.append(f"| {name} | `{file}` | {result['label']} {result['cpu']} ({short}) | {100 * row['top1']:.1f} | "
                             f"{100 * (row['top1'] - reference):+.1f} | {100 * row['agreement']:.1f}% | {drift} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder holding weights/ and datasets/imagenet-sample")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "int8_schemes")
    parser.add_argument("--calibration-images", type=int, default=250, help="the rest of the 500 images are held out")
    parser.add_argument("--seed", type=int, default=0, help="the calibration / held-out split")
    parser.add_argument("--rounds", type=int, default=30, help="latency rounds")
    parser.add_argument("--emulate-cpu", nargs="*", default=[], metavar="MODEL", help="qemu-x86_64 -cpu models to measure in too (e.g. Haswell)")
    parser.add_argument("--evaluate-only", action="store_true", help=argparse.SUPPRESS)  # the emulated half
    args = parser.parse_args(argv)
    if args.evaluate_only:
        print(json.dumps(evaluate(args.work_dir, emulated=True)))
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    write_files(args.work_dir, args.shared, args.calibration_images, args.seed)
    results = [{**evaluate(args.work_dir), "label": "this CPU", "native": True}]
    latency = latency_ms(args.work_dir, args.rounds)
    print(markdown(results, latency), flush=True)  # this CPU's rows first: the emulated ones take long (tens of minutes)
    for model in args.emulate_cpu:
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            raise SystemExit("--emulate-cpu needs qemu-x86_64 (Debian / Ubuntu: apt-get install qemu-user)")
        command = [qemu, "-cpu", model, sys.executable, "-m", "benchmarks.int8_schemes", "--evaluate-only", "--work-dir", str(args.work_dir)]
        environment = {**os.environ, "PYTHONPATH": str(ROOT)}
        completed = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=environment)
        emulated = json.loads(completed.stdout.strip().splitlines()[-1])
        results.append({**emulated, "label": f"qemu -cpu {model}"})
    from benchmarks.machine import describe_machine

    print(f"machine: {describe_machine('cpu', 1)}; {results[0]['images']} held-out images of imagenet-sample, "
          f"{args.calibration_images} for calibration (seed {args.seed})")
    print(markdown(results[1:], latency))


if __name__ == "__main__":
    main()
