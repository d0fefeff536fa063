"""The repository's static checks, in the default suite: the import contracts of ``.importlinter``
(layers benchmarks → tasks → tasks.common → backbones, the three tasks independent, ``backbones``
free of Lightning, no import cycle) and ``ruff check`` with ``ruff.toml``."""

import os
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


def _spin_count_after_import(argv0: str | None, preset: str | None) -> str:
    """GOMP_SPINCOUNT in a fresh interpreter after ``import tasks``, with ``sys.argv[0]`` as Python
    sets it while locating ``python -m tasks.<task>`` ("-m") or left as ``-c``."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | ({"GOMP_SPINCOUNT": preset} if preset else {})
    set_argv = f"sys.argv[0] = {argv0!r}; " if argv0 else ""
    code = f"import os, sys; {set_argv}import tasks; print(os.environ.get('GOMP_SPINCOUNT'))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_only_the_task_command_lines_shorten_openmp_spinning():
    assert _spin_count_after_import("-m", None) == "1000", "python -m tasks.<task> sets it for its own process"
    assert _spin_count_after_import(None, None) == "None", "importing the library leaves the environment alone"
    assert _spin_count_after_import("-m", "300000") == "300000", "a value the user set is kept"
