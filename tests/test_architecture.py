"""The import contracts of ``.importlinter`` hold: layers (benchmarks → tasks → tasks.common →
backbones), the three tasks independent, ``backbones`` free of Lightning, no import cycle."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint_imports, 'lint-imports (import-linter) is not installed: pip install -e ".[dev]"'
    completed = subprocess.run([lint_imports, "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=ROOT,
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "3 kept, 0 broken" in completed.stdout, completed.stdout
