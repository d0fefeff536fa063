"""Reparameterization: exact in float64, within fp32 rounding in float32, at every output stride."""

import copy

import pytest
import torch
from conftest import VARIANT_NAMES
from torch import nn

from backbones import MobileOne, MobileOneBlock, mobileone, reparameterize_model
from backbones.testing import randomize_batchnorm, relative_error


def fused_layers(model: nn.Module) -> list[MobileOneBlock]:
    return [m for m in model.modules() if isinstance(m, MobileOneBlock)]


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_classifier_fp32_relative_error_below_1e6(variant):
    model = randomize_batchnorm(mobileone(variant, num_classes=1000)).eval()
    x = torch.randn(2, 3, 96, 96)
    fused = reparameterize_model(model)
    with torch.no_grad():
        error = relative_error(fused(x), model(x))
    assert error <= 1e-6, error


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_features_fuse_exactly_in_float64(variant, output_stride):
    """The fused network is the same function: float64 leaves only float64 rounding (~1e-15)."""
    model = mobileone(variant, out_indices=(0, 1, 2, 3, 4), output_stride=output_stride)
    model = randomize_batchnorm(model).double().eval()
    fused = reparameterize_model(model)
    assert all(layer.inference_mode for layer in fused_layers(fused))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        for actual, expected in zip(fused(x), model(x)):
            assert relative_error(actual, expected) < 1e-12


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_features_fp32_error_is_fp32_rounding(variant, output_stride):
    """In float32 both forms carry float32 rounding, which grows with depth: the fused features stay
    within 3e-6 of the unfused ones and of the exact (float64) function, 20+ layers deep. (Stage 1,
    a few layers deep, is held to 1e-6.) A fusion bug shows up as errors of 1e-3 and more."""
    model = randomize_batchnorm(mobileone(variant, out_indices=(1, 2, 3, 4), output_stride=output_stride)).eval()
    exact_model = copy.deepcopy(model).double()
    fused = reparameterize_model(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        unfused_out, fused_out, exact_out = model(x), fused(x), exact_model(x.double())
    for stage, (unfused, fused_map, exact) in enumerate(zip(unfused_out, fused_out, exact_out), start=1):
        assert fused_map.dtype == torch.float32
        assert relative_error(fused_map, unfused) < 3e-6, stage
        assert relative_error(fused_map, exact) < 3e-6, stage
    assert relative_error(fused_out[0], unfused_out[0]) < 1e-6


def test_fusing_is_idempotent_and_leaves_the_original_alone():
    model = randomize_batchnorm(mobileone("s0", num_classes=10)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = reparameterize_model(model)
    assert model.training and not fused.training, "the copy is returned in eval mode, the original keeps its mode"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(".rbr_conv." in k for k in model.state_dict())
    assert fused.inference_mode and not any(".rbr_" in k for k in fused.state_dict())

    twice = reparameterize_model(fused)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(twice(x), fused(x))
    assert twice.state_dict().keys() == fused.state_dict().keys()


def test_training_mode_model_is_fused_from_running_statistics():
    """Fusing a model left in training mode must use running statistics, not batch statistics."""
    model = randomize_batchnorm(mobileone("s1", num_classes=10)).train()
    fused = reparameterize_model(model)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        eval_out = copy.deepcopy(model).eval()(x)
        train_out = copy.deepcopy(model).train()(x)
        fused_out = fused(x)
    assert relative_error(fused_out, eval_out) < 1e-6
    assert relative_error(fused_out, train_out) > 1e-2


def test_fused_model_equals_inference_form_architecture():
    fused = reparameterize_model(mobileone("s4", output_stride=8))
    built = mobileone("s4", output_stride=8, inference_mode=True)
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    built.load_state_dict(fused.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(built.eval()(x), fused(x))


class TinyDetector(nn.Module):
    """A wrapper in the shape of a detector: a backbone plus a head with its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = mobileone("s0", out_indices=(3, 4), output_stride=16)
        self.head = nn.Sequential(nn.Conv2d(1024, 8, 1), nn.BatchNorm2d(8))
        self.extra = MobileOneBlock(256, 256, 3, num_conv_branches=2)

    def forward(self, x):
        c4, c5 = self.backbone(x)
        return self.head(c5) + self.extra(c4).mean()


def test_reparameterize_whole_model_containing_mobileone_layers():
    model = randomize_batchnorm(TinyDetector()).eval()
    fused = reparameterize_model(model)
    assert isinstance(fused.backbone, MobileOne) and fused.backbone.inference_mode
    assert fused.extra.inference_mode and isinstance(fused.head[1], nn.BatchNorm2d)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) < 1e-6


@pytest.mark.parametrize("dilation, stride, groups", [(1, 1, 1), (2, 1, 8), (3, 2, 1), (4, 1, 16)])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_single_layer_fuses_exactly_for_any_dilation_stride_groups(kernel_size, dilation, stride, groups):
    layer = MobileOneBlock(16, 16, kernel_size, stride=stride, dilation=dilation, groups=groups, num_conv_branches=3)
    layer = randomize_batchnorm(layer).double().eval()
    assert (layer.rbr_skip is not None) == (stride == 1)
    x = torch.randn(2, 16, 19, 23, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        layer.reparameterize()
        actual = layer(x)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-12


def test_batchnorm_without_running_statistics_is_refused():
    layer = MobileOneBlock(8, 8, 3)
    layer.rbr_skip = nn.BatchNorm2d(8, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        reparameterize_model(layer)


def test_fusing_keeps_dtype_and_device():
    model = randomize_batchnorm(mobileone("s0", num_classes=3)).to(torch.bfloat16)
    fused = reparameterize_model(model)
    assert {p.dtype for p in fused.parameters()} == {torch.bfloat16}
