"""Pretrained weights by name: Apple's ImageNet releases downloaded once, cached and verified.

``resolve_weights("apple", "s0")`` downloads ``mobileone_s0_unfused.pth.tar`` (the train form;
``inference_mode=True``: the fused ``mobileone_s0.pth.tar``) into :func:`weights_cache_dir` and
returns its path; later calls make no request and check the cached file against the SHA-256
recorded beside it (``<file>.sha256``). A download is written under a hidden temporary name and
renamed into place only once complete and verified, so the cache never holds a partial file.
Offline, place the file in the cache folder by hand or pass its local path instead.
Standard library and torch only (``tqdm`` and ``huggingface_hub`` are used when installed).
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

from backbones.atomic import atomic_write_file
from backbones.network import VARIANTS

__all__ = [
    "APPLE_WEIGHTS_BASE",
    "WeightsDownloadError",
    "WeightsIntegrityError",
    "apple_weights_url",
    "download_weights",
    "is_apple_weights",
    "is_named_weights",
    "resolve_weights",
    "weights_cache_dir",
]

APPLE_WEIGHTS_BASE = "https://docs-assets.developer.apple.com/ml-research/datasets/mobileone/"
CACHE_ENV = "MOBILEONE_WEIGHTS_DIR"
# backbones.checkpoint reads files with torch.load(weights_only=True), not safetensors: use the torch
# file that Hugging Face repositories (timm's among them) hold besides model.safetensors.
HF_DEFAULT_FILENAME = "pytorch_model.bin"
_CHUNK = 1 << 20


class WeightsDownloadError(RuntimeError):
    """Weights could not be downloaded (network failure, HTTP error, truncated transfer)."""


class WeightsIntegrityError(WeightsDownloadError):
    """A downloaded or cached weights file does not have the SHA-256 it should have."""


def apple_weights_url(variant: str, inference_mode: bool = False) -> str:
    """URL of Apple's ImageNet weights of ``variant`` ("s0" .. "s4" or "mobileone_s0" ..):
    the train form (``_unfused``), or the fused form when ``inference_mode``."""
    name = variant.lower().removeprefix("mobileone_")
    if name not in VARIANTS:
        raise ValueError(f"unknown MobileOne variant {variant!r}; expected one of {sorted(VARIANTS)}")
    suffix = "" if inference_mode else "_unfused"
    return f"{APPLE_WEIGHTS_BASE.rstrip('/')}/mobileone_{name}{suffix}.pth.tar"


def weights_cache_dir() -> Path:
    """Where downloaded weights live: ``$MOBILEONE_WEIGHTS_DIR`` if set, else torch's hub cache
    ``<torch.hub.get_dir()>/checkpoints`` (``$TORCH_HOME/hub/checkpoints``, by default
    ``~/.cache/torch/hub/checkpoints``)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints"


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    return value


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_record(path: Path, sha256: str) -> None:
    atomic_write_file(_record_path(path), lambda tmp: tmp.write_text(f"{sha256}  {path.name}\n"))


def _local_alternative(path: Path) -> str:
    match = re.match(r"mobileone_(s\d)", path.name)
    variant = f'"{match.group(1)}"' if match else "variant"
    return (
        f"To use the weights without downloading, fetch {path.name} on another machine and place it at\n"
        f"  {path}\n"
        f"(or set {CACHE_ENV} to a folder holding it), or pass a local path instead of downloading: "
        f'mobileone({variant}, weights="/path/to/{path.name}").'
    )


def _download_failed(url: str, path: Path, reason: str) -> WeightsDownloadError:
    return WeightsDownloadError(
        f"could not download MobileOne weights from {url}: {reason}. Nothing was saved.\n{_local_alternative(path)}"
    )


class _StderrProgress:
    """A percentage line on stderr, for when tqdm is not installed."""

    def __init__(self, total: int | None, name: str) -> None:
        self.total, self.name, self.done, self.shown = total, name, 0, -1

    def update(self, count: int) -> None:
        self.done += count
        if self.total:
            percent = min(100, self.done * 100 // self.total)
            if percent != self.shown:
                self.shown = percent
                sys.stderr.write(f"\r{self.name}: {percent:3d}% of {self.total / 2**20:.1f} MiB")
                sys.stderr.flush()

    def close(self) -> None:
        if self.total:
            sys.stderr.write("\n")
        else:
            sys.stderr.write(f"{self.name}: {self.done / 2**20:.1f} MiB\n")
        sys.stderr.flush()


class _NoProgress:
    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int | None, name: str, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _StderrProgress(total, name)
    return tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)


def _verify_cached(path: Path, sha256: str | None) -> Path:
    """Check a cached file against its recorded SHA-256 (and the pinned one); record it if unrecorded."""
    actual = _file_sha256(path)
    record = _record_path(path)
    delete = f"Delete {path} to download it again (or put a good copy there)."
    if record.is_file():
        fields = record.read_text().split()
        recorded = fields[0].lower() if fields else "nothing"
        if actual != recorded:
            raise WeightsIntegrityError(
                f"the cached weights file {path} is corrupt or was changed after it was downloaded: its SHA-256 is "
                f"{actual} but {recorded} was recorded in {record}. {delete}"
            )
    if sha256 is not None and actual != sha256:
        raise WeightsIntegrityError(
            f"the cached weights file {path} has SHA-256 {actual}, not the pinned {sha256}. {delete}"
        )
    if not record.is_file():  # placed by hand: remember its hash so that later changes are noticed
        try:
            _write_record(path, actual)
        except OSError:  # a read-only shared cache still serves its files
            pass
    return path


def download_weights(url: str, sha256: str | None = None, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download ``url`` once into :func:`weights_cache_dir` and return the cached file's path.

    The first call streams the file to a hidden temporary name in the cache folder, checks its
    size against Content-Length and its SHA-256 against ``sha256`` (when given), then renames it
    into place and records the hash in ``<file>.sha256``. Later calls make no request and check
    the cached file against the recorded (and the given) hash. Raises
    :class:`WeightsDownloadError` (network or HTTP failure, truncated transfer: the message says
    where to place the file by hand) or :class:`WeightsIntegrityError` (hash mismatch); no
    partial file is ever left in the cache. ``timeout`` (seconds) bounds the connection and
    every read.
    """
    sha256 = _check_sha256(sha256)
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise ValueError(f"cannot name a cache file after {url!r}: the URL does not end in a file name")
    path = weights_cache_dir() / name
    if path.is_file():
        return _verify_cached(path, sha256)
    result: dict[str, str] = {}

    def fetch(temporary: Path) -> None:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as error:
            raise _download_failed(url, path, f"HTTP {error.code} {error.reason}") from error
        except urllib.error.URLError as error:
            reason = error.reason
            if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
                reason = f"no answer within {timeout:g} s"
            raise _download_failed(url, path, f"{reason}") from error
        except TimeoutError as error:
            raise _download_failed(url, path, f"no answer within {timeout:g} s") from error
        except (OSError, http.client.HTTPException) as error:  # connection reset, bad status line, ...
            raise _download_failed(url, path, f"{type(error).__name__}: {error}") from error
        with response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            digest = hashlib.sha256()
            received = 0
            if progress:
                sys.stderr.write(f"Downloading {url} to {path}\n")
            bar = _progress_bar(expected, name, progress)
            try:
                with open(temporary, "wb") as file:
                    while True:
                        try:
                            chunk = response.read1(_CHUNK)  # what has arrived, so a stall is reported with the count
                        except TimeoutError as error:
                            raise _download_failed(
                                url, path, f"the server sent nothing for {timeout:g} s after {received} bytes"
                            ) from error
                        except (OSError, http.client.HTTPException) as error:
                            raise _download_failed(
                                url, path, f"the transfer broke off after {received} bytes ({type(error).__name__}: {error})"
                            ) from error
                        if not chunk:
                            break
                        file.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            finally:
                bar.close()
        if expected is not None and received != expected:
            raise _download_failed(
                url, path, f"the transfer was cut short: received {received} of {expected} bytes"
            )
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256:
            raise WeightsIntegrityError(
                f"the file downloaded from {url} has SHA-256 {actual}, not the pinned {sha256}; it was not saved "
                f"to {path}. Check the pinned hash, or whether the server now serves a different file."
            )
        result["sha256"] = actual

    atomic_write_file(path, fetch)
    _write_record(path, result["sha256"])
    return path


def _hf_hub(spec: str, sha256: str | None) -> Path:
    target = spec[len("hf-hub:"):].strip("/")
    parts = target.split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"{spec!r}: expected hf-hub:<owner>/<repo>[/<filename>], e.g. hf-hub:timm/mobileone_s0.apple_in1k")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or HF_DEFAULT_FILENAME
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError(
            f"{spec!r} needs the huggingface_hub package: pip install huggingface_hub "
            "(or download the file yourself and pass its local path)"
        ) from error
    try:
        local = Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as error:  # huggingface_hub's errors for offline, missing repo / file, auth
        raise WeightsDownloadError(
            f"could not get {filename} from the Hugging Face repository {repo_id}: {type(error).__name__}: {error}\n"
            "Pass a local path instead: mobileone(variant, weights=\"/path/to/file\")."
        ) from error
    if sha256 is not None and (actual := _file_sha256(local)) != sha256:
        raise WeightsIntegrityError(f"{local} (from {spec}) has SHA-256 {actual}, not the pinned {sha256}")
    return local


def is_apple_weights(spec: object) -> bool:
    """Whether a weights argument is ``"apple"`` (any case, surrounding spaces ignored)."""
    return isinstance(spec, str) and spec.strip().lower() == "apple"


def is_named_weights(spec: object) -> bool:
    """Whether a weights argument names weights to fetch (``"apple"``, ``"hf-hub:..."``) rather than a path."""
    return is_apple_weights(spec) or (isinstance(spec, str) and spec.startswith("hf-hub:"))


def resolve_weights(
    spec: str | os.PathLike | None, variant: str, inference_mode: bool = False, sha256: str | None = None
) -> Path | None:
    """Turn a weights argument into a local file.

    ``None`` -> ``None``; ``"apple"`` -> Apple's ImageNet weights of ``variant`` (train form, or the
    fused form when ``inference_mode``), downloaded once and cached (:func:`download_weights`);
    ``"hf-hub:<owner>/<repo>[/<filename>]"`` -> a file of a Hugging Face repository (default
    ``pytorch_model.bin``; needs ``huggingface_hub``); anything else -> a local path, which must
    exist. ``sha256`` pins the file's hash in every case.
    """
    if spec is None:
        return None
    sha256 = _check_sha256(sha256)
    if is_apple_weights(spec):
        return download_weights(apple_weights_url(variant, inference_mode), sha256)
    if isinstance(spec, str) and spec.startswith("hf-hub:"):
        return _hf_hub(spec, sha256)
    path = Path(os.fspath(spec)).expanduser()
    if not path.exists():
        text = os.fspath(spec)
        hint = ""
        if difflib.get_close_matches(text.strip().lower(), ["apple"], n=1, cutoff=0.6):
            hint = ' Did you mean "apple" (Apple\'s ImageNet weights, downloaded and cached)?'
        elif re.match(r"(?i)hf[-_ ]?hub[:/]|hf:", text) and not text.startswith("hf-hub:"):
            hint = ' Did you mean "hf-hub:<owner>/<repo>[/<filename>]"?'
        raise FileNotFoundError(
            f"weights file {text!r} does not exist. Pass a path to a weights file, \"apple\" for Apple's ImageNet "
            f"weights or \"hf-hub:<owner>/<repo>[/<filename>]\".{hint}"
        )
    if path.is_dir():
        raise IsADirectoryError(f"weights {os.fspath(spec)!r} is a folder; pass the weights file inside it")
    if sha256 is not None and (actual := _file_sha256(path)) != sha256:
        raise WeightsIntegrityError(f"the weights file {path} has SHA-256 {actual}, not the pinned {sha256}")
    return path
