"""Pretrained weights by name (backbones.hub), offline: a local HTTP server plays Apple's file server."""

import collections
import hashlib
import io
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from backbones import (
    MobileOne,
    WeightsDownloadError,
    WeightsIntegrityError,
    apple_weights_url,
    download_weights,
    hub,
    mobileone,
    reparameterize_model,
    resolve_weights,
    weights_cache_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_FILE = "mobileone_s0_unfused.pth.tar"
FUSED_FILE = "mobileone_s0.pth.tar"


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (kind, body)``: "ok", "truncated" (full Content-Length, half
    the body), "stall" (headers and 1000 bytes, then silence) or "silent" (no answer at all); unknown paths get a 404."""

    def do_GET(self) -> None:
        self.server.requests[self.path] += 1
        kind, body = self.server.routes.get(self.path, (None, b""))
        if kind is None:
            self.send_error(404, "Not Found")
            return
        if kind == "silent":
            self.server.release.wait(10)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "ok":
            self.wfile.write(body)
        elif kind == "truncated":
            self.wfile.write(body[: len(body) // 2])
        elif kind == "stall":
            self.wfile.write(body[:1000])
            self.wfile.flush()
            self.server.release.wait(10)

    def log_message(self, format: str, *args) -> None:  # keep the test output clean
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients that hang up are expected here
            super().handle_error(request, client_address)


def _to_bytes(state_dict: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served() -> dict:
    """Apple-layout S0 files (train and fused form) made from a model with random BN statistics."""
    torch.manual_seed(1234)
    model = mobileone("s0")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    train = {k: v.clone() for k, v in model.state_dict().items()}
    fused = {k: v.clone() for k, v in reparameterize_model(model).state_dict().items()}
    return {
        TRAIN_FILE: (train, _to_bytes(train)),
        FUSED_FILE: (fused, _to_bytes(fused)),
    }


@pytest.fixture(scope="module")
def server(served):
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.requests = collections.Counter()
    httpd.routes = {}
    httpd.release = threading.Event()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}/mobileone/"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch, server, served) -> Path:
    """An empty weights cache and Apple's base URL pointed at the local server, which serves both S0 files."""
    monkeypatch.setenv("MOBILEONE_WEIGHTS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "APPLE_WEIGHTS_BASE", server.base)
    server.requests.clear()
    server.routes = {f"/mobileone/{name}": ("ok", data) for name, (_, data) in served.items()}
    server.release.clear()
    return tmp_path / "cache"


def _path(name: str) -> str:
    return f"/mobileone/{name}"


def _listing(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def _assert_clean(cache: Path, expected: list[str] = ()) -> None:
    """The cache holds exactly ``expected``: no temporary or partial file."""
    assert _listing(cache) == sorted(expected)


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _assert_offline_advice(message: str, url: str, cache: Path, name: str = TRAIN_FILE) -> None:
    assert url in message
    assert str(cache / name) in message
    assert f'mobileone("s0", weights="/path/to/{name}")' in message


def test_urls_and_cache_dir(monkeypatch, tmp_path):
    assert apple_weights_url("s0") == (
        "https://docs-assets.developer.apple.com/ml-research/datasets/mobileone/mobileone_s0_unfused.pth.tar"
    )
    assert apple_weights_url("MobileOne_S3", inference_mode=True).endswith("/mobileone/mobileone_s3.pth.tar")
    with pytest.raises(ValueError, match=r"'s9'.*\['s0', 's1', 's2', 's3', 's4'\]"):
        apple_weights_url("s9")
    monkeypatch.setenv("MOBILEONE_WEIGHTS_DIR", str(tmp_path / "mine"))
    assert weights_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MOBILEONE_WEIGHTS_DIR")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert weights_cache_dir() == Path(torch.hub.get_dir()) / "checkpoints" == tmp_path / "torch" / "hub" / "checkpoints"


def test_first_download_writes_file_and_hash_and_loads(cache, server, served):
    state, data = served[TRAIN_FILE]
    model = mobileone("s0", pretrained=True)
    assert server.requests[_path(TRAIN_FILE)] == 1
    _assert_clean(cache, [TRAIN_FILE, TRAIN_FILE + ".sha256"])
    assert (cache / TRAIN_FILE).read_bytes() == data
    digest = hashlib.sha256(data).hexdigest()
    assert (cache / (TRAIN_FILE + ".sha256")).read_text().split() == [digest, TRAIN_FILE]
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_cache_hit_makes_no_request(cache, server, served):
    first = resolve_weights("apple", "s0")
    second = resolve_weights("apple", "mobileone_s0")
    mobileone("s0", pretrained=True)
    assert first == second == cache / TRAIN_FILE
    assert server.requests[_path(TRAIN_FILE)] == 1
    _assert_clean(cache, [TRAIN_FILE, TRAIN_FILE + ".sha256"])


def test_pretrained_fused_feature_extractor_and_new_head(cache, server, served):
    fused_state, _ = served[FUSED_FILE]
    fused = mobileone("s0", pretrained=True, inference_mode=True)
    assert server.requests == {_path(FUSED_FILE): 1}
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in fused_state.items())
    train_state, _ = served[TRAIN_FILE]
    features = mobileone("s0", pretrained=True, out_indices=(3, 4))
    assert torch.equal(features.stage4[0].rbr_conv[0].conv.weight, train_state["stage4.0.rbr_conv.0.conv.weight"])
    assert not hasattr(features, "linear")
    head = mobileone("s0", pretrained=True, num_classes=10)  # ImageNet classifier left out, backbone loaded
    assert head.linear.out_features == 10
    assert torch.equal(head.stage1[0].rbr_conv[0].conv.weight, train_state["stage1.0.rbr_conv.0.conv.weight"])
    assert server.requests[_path(TRAIN_FILE)] == 1
    _assert_clean(cache, [FUSED_FILE, FUSED_FILE + ".sha256", TRAIN_FILE, TRAIN_FILE + ".sha256"])
    with pytest.raises(ValueError, match="either pretrained=True"):
        mobileone("s0", pretrained=True, weights="x.pth")


def test_file_placed_by_hand_is_used_without_a_request(cache, server, served):
    cache.mkdir()
    (cache / TRAIN_FILE).write_bytes(served[TRAIN_FILE][1])
    server.routes.clear()
    assert resolve_weights("apple", "s0") == cache / TRAIN_FILE
    assert sum(server.requests.values()) == 0
    _assert_clean(cache, [TRAIN_FILE, TRAIN_FILE + ".sha256"])  # its hash is recorded from now on


def test_truncated_body_is_an_error_and_nothing_is_kept(cache, server, served):
    data = served[TRAIN_FILE][1]
    server.routes[_path(TRAIN_FILE)] = ("truncated", data)
    url = apple_weights_url("s0")
    with pytest.raises(WeightsDownloadError, match=rf"cut short: received {len(data) // 2} of {len(data)} bytes") as error:
        download_weights(url, progress=False)
    print(error.value)
    _assert_offline_advice(str(error.value), url, cache)
    _assert_clean(cache)


def test_wrong_pinned_sha256_keeps_nothing(cache, server, served):
    data = served[TRAIN_FILE][1]
    actual = hashlib.sha256(data).hexdigest()
    pinned = "ab" * 32
    with pytest.raises(WeightsIntegrityError) as error:
        resolve_weights("apple", "s0", sha256=pinned)
    print(error.value)
    assert actual in str(error.value) and pinned in str(error.value)
    assert "was not saved" in str(error.value)
    _assert_clean(cache)
    # the right pin downloads; a different pin on the cached file is refused without a request
    assert resolve_weights("apple", "s0", sha256=actual.upper()) == cache / TRAIN_FILE
    with pytest.raises(WeightsIntegrityError, match=rf"{actual}, not the pinned {pinned}"):
        mobileone("s0", pretrained=True, weights_sha256=pinned)
    assert server.requests[_path(TRAIN_FILE)] == 2  # the refused download and the good one
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        resolve_weights("apple", "s0", sha256="abc")


def test_corrupted_cached_file_is_detected_and_deleting_it_redownloads(cache, server, served):
    path = resolve_weights("apple", "s0")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError) as error:
        mobileone("s0", pretrained=True)
    print(error.value)
    message = str(error.value)
    assert "is corrupt or was changed after it was downloaded" in message
    assert f"Delete {path} to download it again" in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert server.requests[_path(TRAIN_FILE)] == 1
    path.unlink()
    mobileone("s0", pretrained=True)
    assert server.requests[_path(TRAIN_FILE)] == 2
    _assert_clean(cache, [TRAIN_FILE, TRAIN_FILE + ".sha256"])


def test_server_down_says_where_to_put_the_file(cache, monkeypatch):
    monkeypatch.setattr(hub, "APPLE_WEIGHTS_BASE", f"http://127.0.0.1:{_free_port()}/mobileone/")
    url = apple_weights_url("s0")
    with pytest.raises(WeightsDownloadError, match="Connection refused") as error:
        mobileone("s0", pretrained=True)
    print(error.value)
    assert isinstance(error.value, RuntimeError)
    _assert_offline_advice(str(error.value), url, cache)
    _assert_clean(cache)


def test_http_404_names_the_status(cache, server):
    server.routes.clear()
    url = apple_weights_url("s0", inference_mode=True)
    with pytest.raises(WeightsDownloadError, match="HTTP 404 Not Found") as error:
        resolve_weights("apple", "s0", inference_mode=True)
    print(error.value)
    _assert_offline_advice(str(error.value), url, cache, FUSED_FILE)
    assert server.requests[_path(FUSED_FILE)] == 1
    _assert_clean(cache)


@pytest.mark.parametrize(
    "kind, reason", [("stall", "the server sent nothing for 0.5 s after 1000 bytes"), ("silent", "no answer within 0.5 s")]
)
def test_stalled_server_times_out(cache, server, served, kind, reason):
    server.routes[_path(TRAIN_FILE)] = (kind, served[TRAIN_FILE][1])
    start = time.monotonic()
    with pytest.raises(WeightsDownloadError, match=reason) as error:
        download_weights(apple_weights_url("s0"), timeout=0.5, progress=False)
    server.release.set()
    print(error.value)
    assert time.monotonic() - start < 5
    _assert_clean(cache)


def test_interrupted_download_leaves_nothing(cache, monkeypatch):
    class Interrupting:
        def update(self, count):
            raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(hub, "_progress_bar", lambda total, name, enabled: Interrupting())
    with pytest.raises(KeyboardInterrupt):
        download_weights(apple_weights_url("s0"))
    _assert_clean(cache)


def test_progress_without_tqdm_is_a_percentage_line(cache, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were not installed
    download_weights(apple_weights_url("s0", inference_mode=True))
    err = capsys.readouterr().err
    assert "Downloading http://127.0.0.1:" in err and f"{FUSED_FILE}: 100% of" in err


def test_local_paths(tmp_path, served):
    path = tmp_path / TRAIN_FILE
    path.write_bytes(served[TRAIN_FILE][1])
    assert resolve_weights(None, "s0") is None
    assert resolve_weights(path, "s0") == path
    assert resolve_weights(str(path), "s0", sha256=hashlib.sha256(served[TRAIN_FILE][1]).hexdigest()) == path
    model = mobileone("s0", weights=str(path))
    assert torch.equal(model.linear.weight, served[TRAIN_FILE][0]["linear.weight"])
    missing = tmp_path / "nope.pth.tar"
    with pytest.raises(FileNotFoundError, match=f"weights file '{missing}' does not exist") as error:
        resolve_weights(missing, "s0")
    assert "Did you mean" not in str(error.value)
    with pytest.raises(FileNotFoundError, match='Did you mean "apple"') as error:
        resolve_weights("appel", "s0")
    print(error.value)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        resolve_weights(tmp_path, "s0")


def test_torch_hub_load_local():
    model = torch.hub.load(str(REPO_ROOT), "mobileone_s0", source="local", pretrained=False)
    assert isinstance(model, MobileOne) and model.linear.in_features == 1024
    fused = torch.hub.load(str(REPO_ROOT), "mobileone_s4", source="local", inference_mode=True, num_classes=5)
    assert fused.inference_mode and fused.linear.out_features == 5


def test_hf_hub_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match="pip install huggingface_hub") as error:
        resolve_weights("hf-hub:timm/mobileone_s0.apple_in1k", "s0")
    print(error.value)


def test_hf_hub_with_huggingface_hub(monkeypatch, tmp_path, served):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    local = tmp_path / "pytorch_model.bin"
    local.write_bytes(served[TRAIN_FILE][1])
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_weights("hf-hub:timm/mobileone_s0.apple_in1k", "s0") == local
    assert resolve_weights("hf-hub:me/weights/sub/s0.pth", "s0") == local
    assert calls == [("timm/mobileone_s0.apple_in1k", "pytorch_model.bin"), ("me/weights", "sub/s0.pth")]
    model = mobileone("s0", weights="hf-hub:timm/mobileone_s0.apple_in1k")
    assert torch.equal(model.linear.weight, served[TRAIN_FILE][0]["linear.weight"])
    with pytest.raises(ValueError, match="hf-hub:<owner>/<repo>"):
        resolve_weights("hf-hub:timm", "s0")

    def offline(repo_id, filename, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsDownloadError, match="could not get pytorch_model.bin from the Hugging Face repository"):
        resolve_weights("hf-hub:timm/mobileone_s0.apple_in1k", "s0")
