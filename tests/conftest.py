import os

import pytest
import torch

# pytest -n N (pytest-xdist): one intra-op thread per worker process, so that N workers share the
# cores instead of each running as many threads as there are cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

VARIANT_NAMES = ["s0", "s1", "s2", "s3", "s4"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _apple_weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights_cache")


@pytest.fixture
def apple_weights_cache(_apple_weights_dir, monkeypatch):
    """Point the weights cache at a folder and return ``place(variant)``, which puts a generated
    Apple-layout ``mobileone_<variant>_unfused.pth.tar`` there, as a user without network would:
    configs asking for ``weights: apple`` then load it without a download."""
    from backbones import mobileone

    monkeypatch.setenv("MOBILEONE_WEIGHTS_DIR", str(_apple_weights_dir))

    def place(variant: str) -> None:
        path = _apple_weights_dir / f"mobileone_{variant}_unfused.pth.tar"
        if not path.exists():
            torch.save(mobileone(variant).state_dict(), path)

    return place


def load_config(path):
    """A shipped config as LightningCLI reads it, as a dict: the config its ``config:`` key names
    (relative to it) first, then its own keys, a dotted key (``model.backbone``) setting one value."""
    from pathlib import Path

    import yaml

    path = Path(path)
    own = yaml.safe_load(path.read_text()) or {}
    base = own.pop("config", None)
    config = load_config(path.parent / base) if base else {}
    for key, value in own.items():
        *groups, name = key.split(".")
        node = config
        for group in groups:
            node = node.setdefault(group, {})
        node[name] = value
    return config
