"""timm's MobileOne state dicts (train and reparameterized form) load into our model and give timm's outputs.

timm (``timm.create_model("mobileone_sX")``, as ``timm/mobileone_sX.apple_in1k`` on the Hugging Face
Hub) names its layers ``stem.*`` / ``stages.N.i.*`` / ``head.fc.*``; ``load_checkpoint`` renames them
to Apple's layout. Every BatchNorm gets random statistics and affine parameters so that a branch
mapped to the wrong place changes the logits.
"""

import pytest
import timm
import torch
from timm.utils.model import reparameterize_model as timm_reparameterize_model

from backbones import CheckpointMismatchError, describe_state_dict, load_checkpoint, mobileone, read_state_dict
from backbones.testing import randomize_batchnorm, relative_error

VARIANTS = ["s0", "s1", "s2", "s3", "s4"]
TOLERANCE = 1e-5


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MobileOne layers in order: timm's (stem, stages.0..3) or ours (stage0, stage1..4)."""
    if hasattr(model, "stem"):
        return [model.stem, *[layer for stage in model.stages for layer in stage]]
    return [model.stage0, *[layer for stage in model.stages[1:] for layer in stage]]


def assert_layers_agree(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    """Each layer on its own random input; returns the largest relative error.

    In the whole network random BN statistics blow activations up (logits ~1e5), so S4's
    squeeze-excitation gates saturate to 0/1 there; on unit-scale inputs they do not, so this
    checks the SE weights numerically too.
    """
    worst = 0.0
    for index, (layer, timm_layer) in enumerate(zip(_layers(ours), _layers(theirs), strict=True)):
        x = torch.randn(2, layer.in_channels, 8, 8)
        error = relative_error(layer(x), timm_layer(x))
        assert error <= TOLERANCE, (index, error)
        worst = max(worst, error)
    return worst


@pytest.fixture(scope="module", params=VARIANTS)
def timm_pair(request) -> tuple[str, torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(variant, timm's train-form model, timm's reparameterized model, an input), built once per variant."""
    torch.manual_seed(0)
    train = randomize_batchnorm(timm.create_model(f"mobileone_{request.param}"), seed=1).eval()
    fused = timm_reparameterize_model(train)  # a fused copy; ``train`` keeps its branches
    return request.param, train, fused, torch.randn(2, 3, 64, 64)


@torch.no_grad()
def test_timm_train_form_gives_timms_logits(timm_pair):
    variant, train, _, x = timm_pair
    state_dict = train.state_dict()
    assert "stem.conv_kxk.0.conv.weight" in state_dict and "head.fc.weight" in state_dict
    model = mobileone(variant)
    load_checkpoint(model, state_dict)
    error = relative_error(model.eval()(x), train(x))
    assert error <= TOLERANCE, (variant, error)
    assert_layers_agree(model, train)
    assert describe_state_dict(state_dict) == (
        f"MobileOne-{variant.upper()}, train form (unfused, like mobileone_sX_unfused.pth.tar), "
        "1000-class classifier, in timm's layout"
    )


@torch.no_grad()
def test_timm_reparameterized_form_gives_timms_logits(timm_pair):
    variant, train, fused, x = timm_pair
    state_dict = fused.state_dict()
    assert "stem.reparam_conv.weight" in state_dict and not any(".conv_kxk." in k for k in state_dict)
    model = mobileone(variant, inference_mode=True)
    load_checkpoint(model, state_dict)
    expected = fused(x)
    assert relative_error(expected, train(x)) < 1e-4  # timm's own fusion, for scale
    error = relative_error(model.eval()(x), expected)
    assert error <= TOLERANCE, (variant, error)
    assert_layers_agree(model, fused)
    assert describe_state_dict(state_dict).startswith(f"MobileOne-{variant.upper()}, inference form")

    rebuilt = mobileone(variant)  # the train form built from the fused file, for fine-tuning
    assert load_checkpoint(rebuilt, state_dict).from_fused > 0
    assert relative_error(rebuilt.eval()(x), expected) <= 1e-4, variant


def test_timm_files_load_by_path_and_wrapped(tmp_path):
    torch.manual_seed(0)
    timm_model = randomize_batchnorm(timm.create_model("mobileone_s0"), seed=2).eval()
    state_dict = timm_model.state_dict()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = timm_model(x)
    files = {
        "mobileone_s0.pth": state_dict,
        "ddp.pth": {"model": {f"module.{k}": v for k, v in state_dict.items()}},
        "task.ckpt": {
            "state_dict": {**{f"model.backbone.{k}": v for k, v in state_dict.items()}, "model.head.weight": torch.zeros(3)}
        },
    }
    for name, content in files.items():
        path = tmp_path / name
        torch.save(content, path)
        model = mobileone("s0")
        report = load_checkpoint(model, path)
        assert report.source == str(path)
        with torch.no_grad():
            assert relative_error(model.eval()(x), expected) <= TOLERANCE, name
    assert load_checkpoint(mobileone("s0"), tmp_path / "task.ckpt").prefix == "model.backbone."
    assert set(read_state_dict(tmp_path / "mobileone_s0.pth")) == set(mobileone("s0").state_dict())


@torch.no_grad()
def test_timm_state_dict_into_feature_extractor():
    torch.manual_seed(0)
    timm_model = randomize_batchnorm(timm.create_model("mobileone_s0"), seed=3).eval()
    features = mobileone("s0", out_indices=(1, 2, 3)).eval()
    report = load_checkpoint(features, timm_model.state_dict())
    assert "linear.weight" in report.dropped and all(k.startswith(("linear.", "stage4.")) for k in report.dropped)
    x = torch.randn(1, 3, 64, 64)
    expected = timm_model.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
    for ours, theirs in zip(features(x), expected, strict=True):
        assert relative_error(ours, theirs) <= TOLERANCE

    # timm's own features_only form names its stages stages_N
    timm_features = randomize_batchnorm(
        timm.create_model("mobileone_s0", features_only=True, out_indices=(1, 3)), seed=4
    ).eval()
    assert any(k.startswith("stages_2.") for k in timm_features.state_dict())
    features = mobileone("s0", out_indices=(1, 3)).eval()
    load_checkpoint(features, timm_features.state_dict())
    for ours, theirs in zip(features(x), timm_features(x), strict=True):
        assert relative_error(ours, theirs) <= TOLERANCE


def test_timm_file_of_another_variant_is_named():
    with torch.device("meta"):
        state_dict = timm.create_model("mobileone_s0").state_dict()
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(mobileone("s1"), state_dict)
    message = str(info.value)
    assert "The file looks like: MobileOne-S0, train form" in message and "timm's layout" in message
    assert "The model looks like: MobileOne-S1, train form" in message
    assert "stage1.0.rbr_conv.1.conv.weight" in message  # Apple's names, not timm's conv_kxk
