"""An export folder is replaced as one unit (never a mix of two exports), its files follow the
umask, and the two atomic writers of ``backbones.atomic`` keep what exists when they fail."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import tasks.common.export as export
import tasks.common.export.fuse as fuse
from backbones import mobileone, save_mlpackage
from backbones.atomic import atomic_write_dir, atomic_write_file
from backbones.testing import randomize_batchnorm

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(mobileone("s0", num_classes=4), seed=seed)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (hidden ones too): file bytes, ``None`` for folders."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def fake_onnx(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ONNX step without the (slow) exporter: bytes that depend on the weights, error 0."""
    monkeypatch.setattr(fuse, "onnx_export",
                        lambda fused, *args: (b"onnx:" + str(float(sum(p.detach().sum() for p in fused.parameters()))).encode(), 0.0))


class _PackageThatFailsToSave:
    """Stands for a CoreML model whose ``save`` writes half a package, then fails (a full disk, Ctrl-C)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def save(self, path: str) -> None:
        Path(path).mkdir()
        (Path(path) / "Manifest.json").write_text("half a package")
        raise self.error


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "KeyboardInterrupt"])
def test_failed_reexport_leaves_the_earlier_export_as_it_was(tmp_path, monkeypatch, fake_onnx, error):
    """The second export fails after its weights and ONNX file are written (in the CoreML step,
    the one after them): the first export's folder keeps the same files and bytes, and no scratch
    folder is left."""
    out = tmp_path / "exported"
    export.fuse_and_export(network(1), EXAMPLE, out, {"run": 1}, export.ExportOptions(onnx=True))
    before = snapshot(out)
    assert sorted(before) == ["model.json", "model.onnx", "model_fused.pt"]

    monkeypatch.setattr(fuse, "coreml_export", lambda *args: (_PackageThatFailsToSave(error), {}))
    with pytest.raises(type(error)):
        export.fuse_and_export(network(2), EXAMPLE, out, {"run": 2}, export.ExportOptions(onnx=True, coreml=True))
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"], "no scratch folder is left"


def test_killed_reexport_leaves_the_earlier_export_and_at_most_a_hidden_scratch_folder(tmp_path):
    """The user's case: a re-export killed (SIGKILL, no clean-up at all) while it writes
    ``model.json``, after the new weights: the target is the first export, byte for byte."""
    out = tmp_path / "exported"
    export.fuse_and_export(network(1), EXAMPLE, out, {"run": 1}, export.ExportOptions(onnx=False))
    before = snapshot(out)
    script = """if True:
        import os, pathlib, signal, sys, torch
        import tasks.common.export as export
        from backbones import mobileone
        from backbones.testing import randomize_batchnorm
        real = pathlib.Path.write_text
        def killed_midway(self, *args, **kwargs):
            if self.name == "model.json" or self.name.startswith(".model.json."):
                real(self, '{"half": ')
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *args, **kwargs)
        pathlib.Path.write_text = killed_midway
        torch.manual_seed(2)
        x = torch.randn(2, 3, 32, 32)
        export.fuse_and_export(randomize_batchnorm(mobileone("s0", num_classes=4), seed=2), x, sys.argv[1], {}, export.ExportOptions(onnx=False))
    """
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert snapshot(out) == before
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "exported")
    assert len(leftovers) == 1 and leftovers[0].startswith(".exported.") and leftovers[0].endswith(".tmp"), leftovers
    # the next export replaces the folder as usual (the scratch folder of the killed one stays for the user to remove)
    export.fuse_and_export(network(3), EXAMPLE, out, {"run": 3}, export.ExportOptions(onnx=False))
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model_fused.pt"]


def test_reexport_replaces_the_folder_completely(tmp_path, fake_onnx):
    """No file of the first export survives a successful second one (its ``model.onnx`` when the
    second has none)."""
    out = tmp_path / "exported"
    export.fuse_and_export(network(1), EXAMPLE, out, {"run": 1}, export.ExportOptions(onnx=True))
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model_fused.pt"]
    first_weights = (out / "model_fused.pt").read_bytes()

    result = export.fuse_and_export(network(2), EXAMPLE, out, {"run": 2}, export.ExportOptions(onnx=False))
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model_fused.pt"]
    assert (out / "model_fused.pt").read_bytes() != first_weights
    assert '"run": 2' in (out / "model.json").read_text()
    assert result["files"] == {"weights": str(out / "model_fused.pt"), "metadata": str(out / "model.json")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"], "no scratch or old folder is left"


def test_export_refuses_a_folder_holding_foreign_files(tmp_path, fake_onnx):
    """A user's own file in the export folder: a clear error naming the folder and the file,
    before any work, and the folder is left exactly as it was."""
    out = tmp_path / "exported"
    export.fuse_and_export(network(1), EXAMPLE, out, {"run": 1}, export.ExportOptions(onnx=True))
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(out))}.*notes\.txt.*refusing to replace"):
        export.fuse_and_export(network(2), EXAMPLE, out, {"run": 2}, export.ExportOptions(onnx=False))
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match="a_file"):
        export.fuse_and_export(network(2), EXAMPLE, tmp_path / "a_file", {}, export.ExportOptions(onnx=False))


def test_export_files_and_folder_follow_the_umask(tmp_path, fake_onnx):
    """0644 / 0755 under umask 022 (a fresh export and a re-export), 0600 / 0700 under 077."""
    for mask, file_mode, dir_mode, seeds in [(0o022, 0o644, 0o755, (1, 2)), (0o077, 0o600, 0o700, (1,))]:
        out = tmp_path / f"exported_{mask:o}"
        for seed in seeds:
            with umask(mask):
                export.fuse_and_export(network(seed), EXAMPLE, out, {}, export.ExportOptions(onnx=True))
            assert mode(out) == dir_mode, f"umask {mask:o}: folder {mode(out):o}"
            assert {p.name: mode(p) for p in out.iterdir()} == dict.fromkeys(
                ["model.json", "model.onnx", "model_fused.pt"], file_mode
            ), f"umask {mask:o}"


# ---- the writers themselves


def test_atomic_write_file_replaces_or_keeps_and_follows_the_umask(tmp_path):
    target = tmp_path / "a.csv"
    with umask(0o027):
        assert atomic_write_file(target, lambda p: p.write_text("one")) == target
    assert target.read_text() == "one" and mode(target) == 0o640

    def failing(p: Path) -> None:
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_file(target, failing)
    assert target.read_text() == "one", "the existing file is kept"
    with pytest.raises(OSError, match="disk full"):
        atomic_write_file(tmp_path / "new.csv", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"], "nothing is written, no temporary file is left"
    with umask(0o002):
        atomic_write_file(target, lambda p: p.write_text("two"))
    assert target.read_text() == "two" and mode(target) == 0o664


def test_atomic_write_dir_writes_and_replaces_whole_folders_with_the_umask(tmp_path):
    target = tmp_path / "out"

    def write(names: list[str]):
        def fill(folder: Path) -> None:
            for name in names:
                (folder / name).write_text(name)
        return fill

    with umask(0o027):
        assert atomic_write_dir(target, write(["a", "b"])) == target
    assert snapshot(target) == {"a": b"a", "b": b"b"} and mode(target) == 0o750 and mode(target / "a") == 0o640
    atomic_write_dir(target, write(["c"]), ours=lambda name: name in {"a", "b", "c"})
    assert snapshot(target) == {"c": b"c"}, "replaced completely"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    (tmp_path / "empty").mkdir()
    atomic_write_dir(tmp_path / "empty", write(["x"]))  # ours=None: an empty folder may be replaced
    assert snapshot(tmp_path / "empty") == {"x": b"x"}


def test_atomic_write_dir_keeps_the_old_folder_when_anything_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    (target / "sub").mkdir()
    (target / "sub" / "deep").write_text("deep")
    before = snapshot(target)
    ours = lambda name: True  # noqa: E731

    def failing(folder: Path) -> None:
        (folder / "new").write_text("half")
        raise RuntimeError("failed midway")

    with pytest.raises(RuntimeError, match="failed midway"):
        atomic_write_dir(target, failing, ours=ours)
    assert snapshot(target) == before
    with pytest.raises(RuntimeError, match="failed midway"):
        atomic_write_dir(tmp_path / "fresh", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no target, no scratch folder"

    # the swap itself fails (e.g. a cross-device or permission error): the old folder is put back
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_dir(target, lambda folder: (folder / "new").write_text("new"), ours=ours)
    monkeypatch.undo()
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_dir_refuses_foreign_entries_before_writing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine").write_text("")
    (target / "yours").write_text("")
    called = []
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(target))} holds 1 entry.*\(yours\)"):
        atomic_write_dir(target, called.append, ours=lambda name: name == "mine")
    with pytest.raises(FileExistsError, match=r"holds 2 entries"):
        atomic_write_dir(target, called.append)  # ours=None: only an empty folder is replaced
    assert not called and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["mine", "yours"]


def test_save_mlpackage_replaces_the_package_with_the_umask(tmp_path):
    """``save_mlpackage`` through ``atomic_write_dir``, with a stand-in for coremltools' model that,
    like it, copies a package from a private (0700) temporary folder."""

    class FakeModel:
        def save(self, path: str) -> None:
            assert path.endswith(".mlpackage")
            private = Path(tempfile.mkdtemp(suffix=".mlpackage"))
            (private / "Data").mkdir()
            (private / "Data" / "weights.bin").write_bytes(b"w")
            (private / "Manifest.json").write_text("{}")
            os.chmod(private / "Manifest.json", 0o600)
            shutil.copytree(private, path)
            shutil.rmtree(private)

    target = tmp_path / "model.mlpackage"
    target.mkdir()
    (target / "stale").write_text("from an older export")
    with umask(0o022):
        save_mlpackage(FakeModel(), target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["Data", "Data/weights.bin", "Manifest.json"]
    assert mode(target) == mode(target / "Data") == 0o755 and mode(target / "Manifest.json") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"]
