from setuptools import find_packages, setup

setup(
    name="mobileone-lightning",
    version="0.1.0",
    description="MobileOne (CVPR 2023) backbone with exact reparameterization, and Lightning tasks on top of it",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["backbones", "backbones.*", "tasks", "tasks.*"]),
    package_data={"tasks.classification": ["imagenet_classes.txt"]},  # ImageNet-1k's class list (--data.classes imagenet)
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "lightning>=2.5",
        "torchmetrics>=1.4",
        "jsonargparse[signatures]>=4.30",
        "tensorboard>=2.14",
        "pillow>=10",
        "onnx>=1.15",
        "onnxruntime>=1.17",
        "onnxscript>=0.1",
        "pycocotools>=2.0.7",
    ],
    extras_require={
        # tests: 2 processes; the benchmarks' optional peers and plot; Rich's progress bar (tests/test_cli_output.py);
        # the import contracts and the linter (.importlinter, ruff.toml: tests/test_architecture.py)
        "dev": ["pytest>=7", "pytest-xdist>=3", "timm>=1.0", "matplotlib>=3.7", "rich>=13", "import-linter>=2.1", "ruff>=0.6"],
        "bench": ["timm>=1.0", "matplotlib>=3.7"],  # timm's MobileOne as a peer; the latency plot
        "coreml": ["coremltools>=8.0"],  # backbones.export.to_coreml (conversion runs on Linux, prediction does not)
        "executorch": ["executorch>=1.5"],  # backbones.runtimes: ExecuTorch programs (XNNPACK) and PT2E INT8 (brings torchao)
        # + mmcv 2.1.0 from scripts/install_openmmlab.sh; mmengine needs pkg_resources
        "openmmlab": ["mmengine==0.10.7", "mmdet==3.3.0", "mmsegmentation==1.2.2", "ftfy>=6.1", "regex>=2023.6", "setuptools>=77.0.3,<81"],
    },
)
