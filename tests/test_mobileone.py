"""The network: sizes, features, dilation, fine-tuning knobs, gradients."""

import pytest
import torch
from conftest import VARIANT_NAMES
from torch import nn

from backbones import VARIANTS, MobileOne, MobileOneBlock, mobileone

PAPER_PARAMS_M = {"s0": 2.08, "s1": 4.76, "s2": 7.81, "s3": 10.08, "s4": 14.84}
STAGE_CHANNELS = {
    "s0": [48, 48, 128, 256, 1024],
    "s1": [64, 96, 192, 512, 1280],
    "s2": [64, 96, 256, 640, 2048],
    "s3": [64, 128, 320, 768, 2048],
    "s4": [64, 192, 448, 896, 2048],
}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_inference_form_parameter_count_matches_paper(variant):
    params = count(mobileone(variant, num_classes=1000, inference_mode=True)) / 1e6
    assert abs(params - PAPER_PARAMS_M[variant]) / PAPER_PARAMS_M[variant] < 0.005, params


def test_variant_structure():
    s0 = mobileone("s0")
    assert len(s0.stage0.rbr_conv) == 1, "Apple's stem has one conv branch in every variant"
    assert all(len(m.rbr_conv) == 4 for name, m in s0.named_modules() if isinstance(m, MobileOneBlock) and name != "stage0")
    assert not any(isinstance(m.se, nn.Module) and not isinstance(m.se, nn.Identity) for m in s0.modules() if isinstance(m, MobileOneBlock))
    s4 = mobileone("s4")
    se_layers = [name for name, m in s4.named_modules() if isinstance(m, MobileOneBlock) and not isinstance(m.se, nn.Identity)]
    # last 5 blocks (10 layers) of stage 3 and the single block (2 layers) of stage 4
    assert se_layers == [f"stage3.{i}" for i in range(10, 20)] + ["stage4.0", "stage4.1"]
    assert [len(getattr(s4, f"stage{i}")) for i in range(1, 5)] == [4, 16, 20, 2]


def test_knobs_override_the_variant_table():
    model = mobileone("s1", num_conv_branches=3, num_blocks_per_stage=(1, 2, 3, 1), use_se=True, num_classes=10)
    assert [len(getattr(model, f"stage{i}")) for i in range(1, 5)] == [2, 4, 6, 2]
    assert len(model.stage2[0].rbr_conv) == 3
    assert isinstance(model.stage3[-1].se, nn.Module) and not isinstance(model.stage3[-1].se, nn.Identity)
    assert isinstance(model.stage3[1].se, nn.Identity)  # only the last 3 // 2 = 1 block of stage 3
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert VARIANTS["s1"]["num_conv_branches"] == 1, "overrides must not change the shared table"
    custom = MobileOne(width_multipliers=(0.5, 0.5, 0.5, 0.5), num_classes=3)
    assert custom.linear.in_features == 256


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"output_stride": 12}, "output_stride"),
        ({"out_indices": (1, 5)}, "out_indices"),
        ({"frozen_stages": 7}, "frozen_stages"),
        ({"num_blocks_per_stage": (2, 8, 10)}, "one value per stage"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mobileone("s0", **kwargs)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"s5.*\['s0', 's1', 's2', 's3', 's4'\]"):
        mobileone("s5")
    assert isinstance(mobileone("MobileOne_S0"), MobileOne)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_feature_shapes_and_feature_info(variant, output_stride):
    model = mobileone(variant, out_indices=(0, 1, 2, 3, 4), output_stride=output_stride).eval()
    with torch.no_grad():
        features = model(torch.randn(2, 3, 64, 96))
    reductions = [min(r, output_stride) for r in (2, 4, 8, 16, 32)]
    assert model.feature_info.channels() == STAGE_CHANNELS[variant]
    assert model.feature_info.reduction() == reductions
    assert model.feature_info.module_name() == [f"stage{i}" for i in range(5)]
    assert [f.shape for f in features] == [
        (2, c, 64 // r, 96 // r) for c, r in zip(STAGE_CHANNELS[variant], reductions)
    ]


def test_out_indices_order_and_pruning():
    model = mobileone("s0", out_indices=(3, 1))
    assert not hasattr(model, "stage4") and not hasattr(model, "linear"), "unused stages and the head are not built"
    features = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [256, 48] == model.feature_info.channels()


def test_classifier_feature_info_lists_all_stages():
    model = mobileone("s1", num_classes=5)
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert model.num_features == 1280


@pytest.mark.parametrize("output_stride, dilations", [(32, [1, 1]), (16, [1, 1]), (8, [1, 2])])
def test_dilation_follows_torchvision_convention(output_stride, dilations):
    model = mobileone("s2", out_indices=(4,), output_stride=output_stride)
    depthwise = [m for m in model.modules() if isinstance(m, MobileOneBlock) and m.kernel_size == 3]
    stage3 = [m for m in model.stage3 if m.kernel_size == 3]
    stage4 = [m for m in model.stage4 if m.kernel_size == 3]
    assert [stage3[0].stride, stage4[0].stride] == [2 if output_stride >= 16 else 1, 2 if output_stride == 32 else 1]
    # the first layer of a dilated stage keeps the previous dilation, later 3x3 layers get the new one
    assert [stage3[0].dilation, stage4[0].dilation] == dilations
    if output_stride == 8:
        assert {m.dilation for m in stage3[1:]} == {2}
    for layer in depthwise:
        assert layer.padding == layer.dilation
        for branch in layer.rbr_conv:
            assert branch.conv.dilation == (layer.dilation, layer.dilation)
            assert branch.conv.stride == (layer.stride, layer.stride)
        assert layer.rbr_scale.conv.stride == (layer.stride, layer.stride)


def test_dilated_model_keeps_the_checkpoint_keys_of_the_strided_one():
    reference = mobileone("s1").state_dict()
    dilated = mobileone("s1", output_stride=8).state_dict()
    assert {k: v.shape for k, v in dilated.items()} == {k: v.shape for k, v in reference.items()}


def test_frozen_stages_and_norm_eval():
    model = mobileone("s0", out_indices=(2, 3), frozen_stages=1, norm_eval=False)
    model.train()
    for name, param in model.named_parameters():
        assert param.requires_grad == (not name.startswith(("stage0.", "stage1."))), name
    assert not model.stage1.training and model.stage2.training
    frozen_bn = model.stage1[0].rbr_conv[0].bn
    mean_before = frozen_bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(frozen_bn.running_mean, mean_before), "frozen stages must not update BN statistics"

    normeval = mobileone("s0", out_indices=(4,), norm_eval=True).train()
    assert all(not m.training for m in normeval.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.training for m in normeval.modules() if isinstance(m, nn.Conv2d))
    assert all(p.requires_grad for p in normeval.parameters())


@pytest.mark.parametrize("variant", ["s0", "s4"])
def test_gradient_reaches_every_branch(variant):
    model = mobileone(variant, num_classes=7).train()
    model(torch.randn(2, 3, 64, 64)).square().sum().backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert without_grad == []
    names = {n for n, _ in model.named_parameters()}
    assert any(".rbr_skip." in n for n in names) and any(".rbr_scale." in n for n in names)
    assert any(".rbr_conv.3." in n for n in names) == (variant == "s0")
    assert any(".se." in n for n in names) == (variant == "s4")


def test_classifier_flattens_with_torch_flatten():
    """CoreML's converter needs torch.flatten in the head, not view(batch, -1)."""
    model = mobileone("s0", num_classes=4, inference_mode=True).eval()
    graph = torch.jit.trace(model, torch.randn(1, 3, 64, 64)).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::flatten" in kinds and "aten::view" not in kinds


def test_num_classes_zero_returns_pooled_features():
    model = mobileone("s0", num_classes=0).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1024)
