"""The repository's static checks, in the default suite: the import contracts of ``.importlinter``
(layers benchmarks → tasks → tasks.common → backbones, the three tasks independent, ``backbones``
free of Lightning, no import cycle) and ``ruff check`` with ``ruff.toml``."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    """The console script ``name`` of this environment (``.[dev]`` installs it)."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert path, f'{name} is not installed: pip install -e ".[dev]"'
    return path


def test_import_contracts_hold():
    completed = subprocess.run([_tool("lint-imports"), "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=ROOT,
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "3 kept, 0 broken" in completed.stdout, completed.stdout


def test_ruff_finds_nothing():
    completed = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr
