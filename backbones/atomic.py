"""Atomic writes of one file or one whole folder, with the modes the user's umask gives.

Both writers build the new content under a hidden temporary name in the target's own directory
(``.<name>.<random>.tmp``, same filesystem) and rename it into place only once it is complete, so
a reader never sees a half-written file or a folder mixing two versions. A process killed midway
leaves at most that hidden temporary file or folder. ``tempfile`` creates files 0600 and folders
0700 whatever the umask; the writers give them the modes ``open`` / ``mkdir`` would (e.g. 0644 /
0755 under umask 022). Standard library only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write_dir", "atomic_write_file", "check_replaceable", "current_umask", "reset_modes"]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``);
    elsewhere by setting and restoring it (process-global, hence the lock)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def _dir_mode() -> int:
    return 0o777 & ~current_umask()


def reset_modes(path: str | os.PathLike) -> None:
    """Give ``path`` and, for a folder, everything under it the modes a fresh ``open`` /
    ``mkdir`` would (for trees copied from a private temporary folder, e.g. a CoreML package)."""
    file_mode, dir_mode = _file_mode(), _dir_mode()
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        if not path.is_symlink():
            os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for parent, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(parent, name)):
                os.chmod(os.path.join(parent, name), dir_mode)
        for name in files:
            if not os.path.islink(os.path.join(parent, name)):
                os.chmod(os.path.join(parent, name), file_mode)


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``: ``path`` is never half-written.

    The temporary file ``.<name>.<random>.tmp`` (created empty beside ``path``) is removed if
    ``write`` raises, and an existing ``path`` is then left as it was. The file gets the mode a
    new ``open(path, "w")`` would give (``0o666 & ~umask``). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.chmod(temporary, _file_mode())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def check_replaceable(path: str | os.PathLike, ours: Callable[[str], bool] | None = None) -> None:
    """Raise unless ``atomic_write_dir`` may replace ``path``: it is absent, or a folder whose every
    entry name satisfies ``ours`` (``None``: the folder must be empty).

    ``FileExistsError`` names the folder and the foreign entries; ``NotADirectoryError`` if
    ``path`` is not a folder. Nothing is changed.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder: refusing to replace it")
    foreign = sorted(name for name in os.listdir(path) if ours is None or not ours(name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{path} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} this writer did not write "
            f"({shown}): refusing to replace the folder; move them away or write elsewhere (nothing was changed)"
        )


def atomic_write_dir(
    path: str | os.PathLike, write: Callable[[Path], object], ours: Callable[[str], bool] | None = None
) -> Path:
    """Call ``write(scratch_folder)`` and put the folder in the place of ``path`` in one step.

    ``scratch_folder`` is a new, empty, hidden sibling ``.<name>.<random>.tmp``; ``write`` fills
    it (it may also remove it and create it anew, as CoreML's ``save`` wants). Then an existing
    ``path`` is renamed aside (``.<name>.<random>.old``), the scratch folder renamed to ``path``
    and the old folder removed. If ``write`` or a rename fails, the old folder is put back and the
    scratch folder removed: ``path`` is either the old folder or the new one, never a mix. A
    process killed midway leaves at most the hidden ``.tmp`` (and, killed between the two renames,
    ``.old``) folders beside ``path``; ``path`` itself is old or new, or absent in that instant.

    An existing ``path`` is replaced only if every entry in it satisfies ``ours`` (e.g. names of
    files an earlier run of the same writer made; ``None``: it must be empty): a folder holding
    anything else is refused with ``FileExistsError`` before ``write`` is called, and checked again
    just before the swap (see ``check_replaceable``). A symlink to a folder is followed: the folder
    it points to is replaced. The new folder gets the mode ``mkdir`` would give (``0o777 &
    ~umask``); what ``write`` creates inside gets its usual modes. Not safe against two writers of
    the same ``path`` at once. Returns ``path``.
    """
    given = Path(path)
    target = Path(os.path.abspath(given))
    if target.is_symlink():
        target = target.resolve()
    if not target.name or target.parent == target:
        raise ValueError(f"{given}: cannot replace a filesystem root")
    check_replaceable(target, ours)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    aside = scratch.with_name(scratch.name.removesuffix(".tmp") + ".old")
    moved = False
    try:
        os.chmod(scratch, _dir_mode())
        write(scratch)
        if not scratch.is_dir() or scratch.is_symlink():
            raise RuntimeError(f"the writer of {given} left no folder at {scratch}")
        os.chmod(scratch, _dir_mode())
        check_replaceable(target, ours)
        if os.path.lexists(target):
            os.rename(target, aside)
            moved = True
        os.rename(scratch, target)
    except BaseException:
        if moved and not os.path.lexists(target):
            os.rename(aside, target)
            moved = False
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if moved:
        shutil.rmtree(aside, ignore_errors=True)
        if os.path.lexists(aside):
            warnings.warn(f"the previous {given} was replaced but could not be removed completely: {aside} is left", stacklevel=2)
    return given
