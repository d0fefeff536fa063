"""Checkpoint I/O against Apple's key layout, written here independently of ``backbones``.

``apple_layers`` lists the layers of Apple's MobileOne (ml-mobileone's ``mobileone.py``) from the
paper's table; ``apple_state_dict`` builds a random state dict with exactly Apple's key names and
shapes; ``apple_forward`` computes the logits from such a state dict with functional ops, the way
Apple's ``MobileOneBlock.forward`` does. Our model must load these dicts strictly and agree.
"""

import logging
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from backbones import CheckpointMismatchError, describe_state_dict, load_checkpoint, mobileone, reparameterize_model
from backbones.testing import relative_error

WIDTHS = {
    "s0": (0.75, 1.0, 1.0, 2.0),
    "s1": (1.5, 1.5, 2.0, 2.5),
    "s2": (1.5, 2.0, 2.5, 4.0),
    "s3": (2.0, 2.5, 3.0, 4.0),
    "s4": (3.0, 3.5, 3.5, 4.0),
}


@dataclass
class Layer:
    name: str
    cin: int
    cout: int
    kernel: int
    stride: int
    groups: int
    branches: int
    se: bool

    @property
    def skip(self) -> bool:
        return self.cin == self.cout and self.stride == 1


def apple_layers(variant: str) -> list[Layer]:
    widths = WIDTHS[variant]
    k = 4 if variant == "s0" else 1
    se_blocks = (0, 0, 5, 1) if variant == "s4" else (0, 0, 0, 0)
    cin = min(64, int(64 * widths[0]))
    layers = [Layer("stage0", 3, cin, 3, 2, 1, 1, False)]
    for stage, (base, blocks) in enumerate(zip((64, 128, 256, 512), (2, 8, 10, 1)), start=1):
        cout = int(base * widths[stage - 1])
        for block in range(blocks):
            se = block >= blocks - se_blocks[stage - 1]
            stride = 2 if block == 0 else 1
            layers.append(Layer(f"stage{stage}.{2 * block}", cin, cin, 3, stride, cin, k, se))
            layers.append(Layer(f"stage{stage}.{2 * block + 1}", cin, cout, 1, 1, 1, k, se))
            cin = cout
    return layers


def _bn(prefix: str, channels: int, out: dict) -> None:
    out[f"{prefix}.weight"] = torch.rand(channels) + 0.5
    out[f"{prefix}.bias"] = torch.rand(channels) - 0.5
    out[f"{prefix}.running_mean"] = torch.rand(channels) - 0.5
    out[f"{prefix}.running_var"] = torch.rand(channels) + 0.5
    out[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)


def apple_state_dict(variant: str, fused: bool, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for layer in apple_layers(variant):
        cin_g = layer.cin // layer.groups
        scale = (cin_g * layer.kernel**2) ** -0.5
        if fused:
            out[f"{layer.name}.reparam_conv.weight"] = torch.randn(layer.cout, cin_g, layer.kernel, layer.kernel) * scale
            out[f"{layer.name}.reparam_conv.bias"] = torch.randn(layer.cout) * 0.1
        else:
            if layer.skip:
                _bn(f"{layer.name}.rbr_skip", layer.cin, out)
            for i in range(layer.branches):
                out[f"{layer.name}.rbr_conv.{i}.conv.weight"] = torch.randn(layer.cout, cin_g, layer.kernel, layer.kernel) * scale
                _bn(f"{layer.name}.rbr_conv.{i}.bn", layer.cout, out)
            if layer.kernel > 1:
                out[f"{layer.name}.rbr_scale.conv.weight"] = torch.randn(layer.cout, cin_g, 1, 1) * cin_g**-0.5
                _bn(f"{layer.name}.rbr_scale.bn", layer.cout, out)
        if layer.se:
            hidden = int(layer.cout * 0.0625)
            out[f"{layer.name}.se.reduce.weight"] = torch.randn(hidden, layer.cout, 1, 1) * layer.cout**-0.5
            out[f"{layer.name}.se.reduce.bias"] = torch.randn(hidden) * 0.1
            out[f"{layer.name}.se.expand.weight"] = torch.randn(layer.cout, hidden, 1, 1) * hidden**-0.5
            out[f"{layer.name}.se.expand.bias"] = torch.randn(layer.cout) * 0.1
    last = apple_layers(variant)[-1].cout
    out["linear.weight"] = torch.randn(num_classes, last) * last**-0.5
    out["linear.bias"] = torch.zeros(num_classes)
    return out


def apple_forward(variant: str, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, 1e-5)

    for layer in apple_layers(variant):
        n, pad = layer.name, layer.kernel // 2
        if f"{n}.reparam_conv.weight" in sd:
            out = F.conv2d(x, sd[f"{n}.reparam_conv.weight"], sd[f"{n}.reparam_conv.bias"], layer.stride, pad, 1, layer.groups)
        else:
            out = 0
            if layer.skip:
                out = bn(x, f"{n}.rbr_skip")
            if layer.kernel > 1:
                out = out + bn(F.conv2d(x, sd[f"{n}.rbr_scale.conv.weight"], None, layer.stride, 0, 1, layer.groups), f"{n}.rbr_scale.bn")
            for i in range(layer.branches):
                conv = F.conv2d(x, sd[f"{n}.rbr_conv.{i}.conv.weight"], None, layer.stride, pad, 1, layer.groups)
                out = out + bn(conv, f"{n}.rbr_conv.{i}.bn")
        if layer.se:
            s = F.avg_pool2d(out, kernel_size=list(out.shape[2:]))
            s = F.relu(F.conv2d(s, sd[f"{n}.se.reduce.weight"], sd[f"{n}.se.reduce.bias"]))
            s = F.conv2d(s, sd[f"{n}.se.expand.weight"], sd[f"{n}.se.expand.bias"])
            out = out * torch.sigmoid(s)
        x = F.relu(out)
    return F.linear(x.mean((2, 3)), sd["linear.weight"], sd["linear.bias"])


@pytest.mark.parametrize("variant", ["s0", "s1", "s2", "s3", "s4"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_apple_layout_loads_strictly_and_gives_apples_logits(variant, fused):
    sd = apple_state_dict(variant, fused)
    model = mobileone(variant, inference_mode=fused)
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = apple_forward(variant, sd, x)
        assert relative_error(model.eval()(x), expected) < 1e-5
        # Apple's fused file matches our own fusion of Apple's unfused file
        if not fused:
            assert relative_error(reparameterize_model(model)(x), expected) < 1e-5
    assert describe_state_dict(sd).startswith(f"MobileOne-{variant.upper()}, {'inference' if fused else 'train'} form")


def test_wrappers_and_prefixes(tmp_path):
    sd = apple_state_dict("s1", fused=False)
    reference = mobileone("s1")
    reference.load_state_dict(sd)
    x = torch.randn(1, 3, 64, 64)
    expected = reference.eval()(x)
    variants = {
        "plain.pth.tar": sd,
        "wrapped_state_dict.pth": {"state_dict": sd, "epoch": 3},
        "wrapped_model.pth": {"model": {f"module.{k}": v for k, v in sd.items()}},
        # Lightning: the task stores the backbone under its own attribute names, next to a head
        "task.ckpt": {
            "epoch": 7,
            "global_step": 100,
            "pytorch-lightning_version": "2.5.0",
            "state_dict": {**{f"model.backbone.{k}": v for k, v in sd.items()}, "model.head.weight": torch.zeros(3)},
            "optimizer_states": [],
        },
    }
    for name, content in variants.items():
        path = tmp_path / name
        torch.save(content, path)
        model = mobileone("s1")
        report = load_checkpoint(model, path)
        assert report.source == str(path)
        with torch.no_grad():
            assert torch.equal(model.eval()(x), expected), name
    assert load_checkpoint(mobileone("s1"), variants["task.ckpt"]).prefix == "model.backbone."


def test_feature_extractor_drops_classifier_and_unbuilt_stages():
    sd = apple_state_dict("s2", fused=False, num_classes=21)
    features = mobileone("s2", out_indices=(1, 2, 3), output_stride=8)
    report = load_checkpoint(features, sd)
    assert "linear.weight" in report.dropped and all(k.startswith(("linear.", "stage4.")) for k in report.dropped)
    assert torch.equal(features.stage3[5].rbr_conv[0].conv.weight, sd["stage3.5.rbr_conv.0.conv.weight"])

    assert not report.classifier_reinitialized, "a feature extractor has no classifier to re-initialize"

    classifier = mobileone("s2", num_classes=10)
    own_head = classifier.linear.weight.clone()
    load_checkpoint(classifier, sd, ignore_classifier=True)
    assert torch.equal(classifier.linear.weight, own_head)
    with pytest.raises(CheckpointMismatchError, match=r"linear.weight \(file \(21, 2048\), model \(10, 2048\)\)"):
        load_checkpoint(mobileone("s2", num_classes=10), sd, ignore_classifier=False)


def test_classifier_rule_keeps_same_class_count_and_reinitializes_another(caplog):
    """One rule (load_checkpoint's default): the file's classifier loads into one of the same class
    count, another class count keeps the model's own with a warning, and a wrong width is an error."""
    sd = apple_state_dict("s0", fused=False, num_classes=21)
    same = mobileone("s0", num_classes=21)
    assert not load_checkpoint(same, sd).classifier_reinitialized
    assert torch.equal(same.linear.weight, sd["linear.weight"])

    other = mobileone("s0", num_classes=10)
    own_head = other.linear.weight.clone()
    with caplog.at_level(logging.WARNING, logger="backbones.checkpoint"):
        report = load_checkpoint(other, sd)
    assert report.classifier_reinitialized and report.dropped == ["linear.bias", "linear.weight"]
    assert torch.equal(other.linear.weight, own_head)
    assert torch.equal(other.stage4[0].rbr_conv[0].conv.weight, sd["stage4.0.rbr_conv.0.conv.weight"])
    assert "have a 21-class classifier, the model has 10 classes: the classifier is re-initialized" in caplog.text

    wrong_width = {**sd, "linear.weight": torch.zeros(21, 512)}
    with pytest.raises(CheckpointMismatchError, match=r"linear.weight \(file \(21, 512\), model \(21, 1024\)\)"):
        load_checkpoint(mobileone("s0", num_classes=21), wrong_width)


def test_file_without_num_batches_tracked_loads():
    sd = {k: v for k, v in apple_state_dict("s0", fused=False).items() if not k.endswith("num_batches_tracked")}
    load_checkpoint(mobileone("s0"), sd)


def test_wrong_variant_error_names_both_variants_and_keys():
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(mobileone("s1"), apple_state_dict("s2", fused=False))
    message = str(info.value)
    assert "The file looks like: MobileOne-S2, train form" in message
    assert "The model looks like: MobileOne-S1, train form" in message
    assert "stage1.0.rbr_conv.0.conv.weight (file (96, 1, 3, 3), model (96, 1, 3, 3))" not in message
    assert "keys with wrong shapes: " in message and "stage2.1.rbr_conv.0.conv.weight (file (256, 96, 1, 1), model (192, 96, 1, 1))" in message


def test_wrong_form_error_says_how_to_fix():
    """A train-form file does not fit an inference-form model (the other way round it loads: see
    tests/test_fused_start.py)."""
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(mobileone("s0", inference_mode=True), apple_state_dict("s0", fused=False))
    message = str(info.value)
    assert "The file looks like: MobileOne-S0, train form" in message
    assert "reparameterize_model()" in message
    assert "missing keys: stage0.reparam_conv.bias" in message
    assert "unexpected keys: stage0.rbr_conv.0.bn.bias" in message
    assert load_checkpoint(mobileone("s0"), apple_state_dict("s0", fused=True)).from_fused == 43


def test_unreadable_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(mobileone("s0"), tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_checkpoint(mobileone("s0"), garbage)
    with pytest.raises(ValueError, match=r"no tensors.*\['epoch'\]"):
        load_checkpoint(mobileone("s0"), {"epoch": 3})
    sd = apple_state_dict("s0", fused=True)
    two_networks = {**{f"model.{k}": v * 0 for k, v in sd.items()}, **{f"ema.{k}": v for k, v in sd.items()}}
    with pytest.raises(ValueError, match=r"several MobileOne networks.*\['ema.', 'model.'\].*prefix="):
        load_checkpoint(mobileone("s0", inference_mode=True), two_networks)
    model = mobileone("s0", inference_mode=True)
    load_checkpoint(model, two_networks, prefix="ema.")
    assert torch.equal(model.stage0.reparam_conv.weight, sd["stage0.reparam_conv.weight"])
    assert "timm" in describe_state_dict({"stem.conv.weight": torch.zeros(1), "stages.0.weight": torch.zeros(1)})
