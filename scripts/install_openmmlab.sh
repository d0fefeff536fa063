#!/usr/bin/env bash
# Install the OpenMMLab stack that works with this repository into the *current* Python
# environment (the `python` on PATH, or $PYTHON): mmcv 2.1.0 (built from source once, then
# cached as a wheel), mmengine 0.10.7, mmdet 3.3.0, mmsegmentation 1.2.2, and this repository
# with its `openmmlab` extra.
#
#   bash scripts/install_openmmlab.sh
#
# Why a script: PyPI has no mmcv wheels for current torch. mmcv 2.1.0 (the newest that mmdet
# 3.3.0 and mmsegmentation 1.2.2 accept) builds from source (8-20 min on 2 cores) only with
# setuptools<70 (its setup.py imports pkg_resources) and with -std=c++20 given to the C++
# compiler *after* mmcv's own -std=c++17 (torch >= 2.10 headers need C++20). The build tools go
# into a throw-away directory, so the environment's own setuptools (torch wants >= 77) is left
# alone. Without a CUDA toolkit (or a visible GPU) the ops are CPU-only.
#
# Environment variables:
#   PYTHON                   interpreter to install into (default: python, else python3)
#   MOBILEONE_WHEEL_CACHE    wheel cache (default: ${XDG_CACHE_HOME:-~/.cache}/mobileone-lightning/wheels);
#                            the mmcv wheel is kept under <cache>/<mmcv, python, torch, cpu|cuda key>/
#   MAX_JOBS                 parallel compile jobs for the mmcv build (default: number of CPUs)
set -euo pipefail

MMCV_VERSION="2.1.0"

log() { printf '[install_openmmlab] %s\n' "$*" >&2; }
die() { printf '[install_openmmlab] ERROR: %s\n' "$*" >&2; exit 1; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -f "$REPO_ROOT/setup.py" ] || die "no setup.py in $REPO_ROOT (run the script from a checkout of this repository)"

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif command -v python >/dev/null 2>&1; then
    PY="python"
elif command -v python3 >/dev/null 2>&1; then
    PY="python3"
else
    die "no python on PATH; activate the environment to install into, or set PYTHON"
fi
"$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work; install pip into that environment first"
log "installing into $("$PY" -c 'import sys; print(sys.prefix)') ($("$PY" --version 2>&1))"

# torch must already be there: mmcv's extension is compiled against it, and the cache key names it.
# CUDA ops are built only when torch has CUDA, a CUDA toolkit is found (nvcc / CUDA_HOME) and a GPU
# is visible (or FORCE_CUDA=1); otherwise the build hides the GPUs and makes the CPU-only ops.
INFO="$("$PY" - "$MMCV_VERSION" <<'EOF'
import os, platform, sys
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
except ImportError:
    sys.exit("torch is not installed in this environment: run `pip install -e .` first")
wanted = torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"
device = f"cu{torch.version.cuda}" if wanted and torch.version.cuda and CUDA_HOME else "cpu"
torch_version = torch.__version__.replace("+", "_")
print(f"mmcv-{sys.argv[1]}-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch_version}-{device}-{platform.machine()}", device)
EOF
)" || die "could not inspect torch with $PY (is torch installed? run \`pip install -e .\` first)"
read -r KEY DEVICE <<< "$INFO"
CACHE_ROOT="${MOBILEONE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mobileone-lightning/wheels}"
CACHE_DIR="$CACHE_ROOT/$KEY"
log "mmcv wheel cache: $CACHE_DIR"

find_wheel() {
    [ -d "$CACHE_DIR" ] || return 0
    find "$CACHE_DIR" -maxdepth 1 -name "mmcv-${MMCV_VERSION}-*.whl" | head -n 1
}

WHEEL="$(find_wheel)"
if [ -n "$WHEEL" ]; then
    log "using the cached mmcv wheel $(basename "$WHEEL")"
else
    command -v c++ >/dev/null 2>&1 || command -v "${CXX:-}" >/dev/null 2>&1 \
        || die "no C++ compiler (c++ or \$CXX) found: mmcv must be compiled (e.g. apt-get install g++)"
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/mmcv-build.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
    log "no cached wheel: building mmcv $MMCV_VERSION from source (8-20 minutes on 2 cores); scratch dir $WORK"

    # Build tools in their own directory, put first on PYTHONPATH for the build only (--no-deps:
    # nothing there may shadow the environment's numpy or torch). With opencv-python-headless there,
    # mmcv's setup.py finds cv2 and adds no OpenCV requirement of its own to the wheel; mmengine's
    # requirement (opencv-python) decides which OpenCV the environment gets.
    "$PY" -m pip install --quiet --no-deps --target "$WORK/tools" "setuptools<70" wheel ninja opencv-python-headless \
        || die "could not install the build tools (setuptools<70, wheel, ninja) into $WORK/tools"

    # The compiler wrapper appends -std=c++20 after mmcv's -std=c++17 (the last -std wins).
    REAL_CXX="${CXX:-c++}"
    cat > "$WORK/cxx" <<EOF
#!/bin/sh
exec $REAL_CXX "\$@" -std=c++20
EOF
    chmod +x "$WORK/cxx"

    JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
    GPU_ENV=(FORCE_CUDA="${FORCE_CUDA:-0}")
    if [ "$DEVICE" = "cpu" ]; then
        GPU_ENV=(CUDA_VISIBLE_DEVICES="" FORCE_CUDA=0)
    fi
    log "compiling ($DEVICE ops) with CXX=$WORK/cxx (-> $REAL_CXX ... -std=c++20), MAX_JOBS=$JOBS"
    start=$(date +%s)
    env "${GPU_ENV[@]}" PYTHONPATH="$WORK/tools${PYTHONPATH:+:$PYTHONPATH}" PATH="$WORK/tools/bin:$PATH" \
        CXX="$WORK/cxx" MAX_JOBS="$JOBS" \
        "$PY" -m pip wheel --no-build-isolation --no-deps --no-cache-dir "mmcv==$MMCV_VERSION" -w "$WORK/wheel" \
        || die "building mmcv $MMCV_VERSION failed (see the compiler output above)"
    log "mmcv built in $(( $(date +%s) - start )) s"

    built="$(find "$WORK/wheel" -maxdepth 1 -name "mmcv-${MMCV_VERSION}-*.whl" | head -n 1)"
    [ -n "$built" ] || die "pip wheel finished but no mmcv-${MMCV_VERSION}-*.whl in $WORK/wheel"
    mkdir -p "$CACHE_DIR"
    cp "$built" "$CACHE_DIR/.$(basename "$built").partial"
    mv "$CACHE_DIR/.$(basename "$built").partial" "$CACHE_DIR/$(basename "$built")"
    WHEEL="$CACHE_DIR/$(basename "$built")"
    log "cached $WHEEL"
fi

# One resolver run for mmcv and the pure-Python parts (pinned in setup.py's `openmmlab` extra).
log "pip install $(basename "$WHEEL") -e \"$REPO_ROOT[openmmlab]\""
"$PY" -m pip install "$WHEEL" -e "$REPO_ROOT[openmmlab]" \
    || die "pip could not install mmcv and the openmmlab extra into this environment"

log "checking that the stack imports (torch, numpy, cv2, mmcv ops, mmdet, mmseg, backbones.openmmlab)"
"$PY" - <<'EOF' || die "the installed stack does not import cleanly (see the traceback above)"
import numpy, torch, torchvision, cv2, mmengine, mmcv, mmdet, mmseg
from mmcv.ops import nms
import backbones.openmmlab  # registers MobileOne in mmdet's and mmseg's registries
boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
_, keep = nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
assert keep.tolist() == [0], keep
assert torch.from_numpy(numpy.zeros(2)).sum().item() == 0
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {numpy.__version__}, "
      f"opencv {cv2.__version__}, mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, "
      f"mmdet {mmdet.__version__}, mmseg {mmseg.__version__}: OK")
EOF
log "done"
