"""``--model.weights apple`` / ``--model.backbone_weights apple`` in the tasks, offline."""

import socket
from pathlib import Path

import pytest
import torch

import backbones.hub
from backbones import WeightsDownloadError
from tasks.classification.__main__ import main as classification_main
from tasks.classification.data import make_demo_dataset
from tasks.common.backbones import feature_extractor, resolve_backbone_weights

CONFIG = str(Path(__file__).parent / "configs" / "classification.yaml")


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """An empty weights cache and Apple's address pointing at a port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(backbones.hub, "APPLE_WEIGHTS_BASE", f"http://127.0.0.1:{port}/mobileone")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOBILEONE_WEIGHTS_DIR", str(cache))
    return cache


def test_apple_weights_offline_name_url_cache_path_and_local_option(offline):
    with pytest.raises(WeightsDownloadError) as error:
        resolve_backbone_weights("mobileone_s1", "apple")
    message = str(error.value)
    assert "mobileone_s1_unfused.pth.tar" in message and str(offline / "mobileone_s1_unfused.pth.tar") in message
    assert "--model.weights /path/to/" in message
    assert not offline.exists() or not any(offline.iterdir())


def test_apple_weights_from_the_cache_load_into_a_feature_extractor(apple_weights_cache):
    apple_weights_cache("s0")
    extractor = feature_extractor("mobileone_s0", 32, "apple")
    cached = Path(backbones.hub.weights_cache_dir()) / "mobileone_s0_unfused.pth.tar"
    expected = torch.load(cached, weights_only=True)
    loaded = extractor.state_dict()
    assert all(torch.equal(loaded[key], expected[key]) for key in loaded)


def test_apple_weights_are_mobileones_only():
    with pytest.raises(ValueError, match="mobilenet_v2 takes a local file"):
        resolve_backbone_weights("mobilenet_v2", "apple")


def test_a_checkpoint_trained_from_apple_weights_needs_no_download_later(apple_weights_cache, tmp_path, monkeypatch):
    """fit with --model.weights apple; later validate / export with --ckpt_path work offline with an empty cache."""
    root = make_demo_dataset(tmp_path / "shapes", train_per_class=2, val_per_class=1, size=40)
    apple_weights_cache("s0")
    classification_main(["fit", "--config", CONFIG, f"--data.root={root}", f"--trainer.default_root_dir={tmp_path}",
                         "--model.weights=apple"])
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["weights"] == "apple"
    monkeypatch.setenv("MOBILEONE_WEIGHTS_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(backbones.hub, "APPLE_WEIGHTS_BASE", "http://127.0.0.1:9/unreachable")
    classification_main(["validate", "--config", CONFIG, f"--data.root={root}", f"--trainer.default_root_dir={tmp_path}",
                         f"--ckpt_path={checkpoint}"])
