"""The OpenMMLab integration: MobileOne in mmdet / mmseg, the configs under configs/openmmlab, end to end.

Needs mmcv, mmdet and mmsegmentation (``bash scripts/install_openmmlab.sh``). The module is skipped
when mmcv is absent, unless MOBILEONE_REQUIRE_OPENMMLAB=1 (set by CI), which turns that into a failure.
Data sets are generated in tmp_path in their real on-disk formats (COCO json + images, VOC 2012 with
SBD's SegmentationClassAug, ADE20K); nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

if os.environ.get("MOBILEONE_REQUIRE_OPENMMLAB") == "1":
    try:
        import mmcv  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "MOBILEONE_REQUIRE_OPENMMLAB=1 but mmcv does not import: the OpenMMLab tests must run here; "
            "install the stack with `bash scripts/install_openmmlab.sh`"
        ) from error
else:
    pytest.importorskip("mmcv", reason="OpenMMLab is not installed (bash scripts/install_openmmlab.sh)")

from mmdet.structures.bbox import bbox_overlaps  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from test_checkpoint import apple_state_dict  # noqa: E402  (Apple's key layout, written independently)

import backbones.openmmlab  # noqa: E402,F401  (registers MobileOne)
from backbones import VARIANTS, CheckpointMismatchError, MobileOne, mobileone, reparameterize_model  # noqa: E402
from backbones.network import STAGE_BASE_WIDTHS  # noqa: E402
from backbones.openmmlab import MobileOneBackbone  # noqa: E402
from backbones.testing import randomize_batchnorm, relative_error  # noqa: E402

pytestmark = [
    pytest.mark.openmmlab,
    # third-party noise: mmengine imports pkg_resources; mmseg's loss builder and CE defaults
    pytest.mark.filterwarnings("ignore:pkg_resources is deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:``build_loss`` would be deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:Default ``avg_non_ignore`` is False:UserWarning"),
    pytest.mark.filterwarnings("ignore:The draw is False:UserWarning"),
    pytest.mark.filterwarnings("ignore:`reduce_zero_label` will be deprecated:UserWarning"),
]

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "openmmlab"
DET_CONFIGS = {v: CONFIGS / "mmdet" / f"ssdlite_mobileone-{v}_8xb24-200e_coco.py" for v in VARIANTS}
SEG_CONFIGS = {
    (v, data): CONFIGS / "mmseg" / f"deeplabv3_mobileone-{v}-d8_4xb4-{iters}_{data}-512x512.py"
    for v in ("s1", "s4")
    for data, iters in (("voc12aug", "33k"), ("ade20k", "63k"))
}
# COCO 2017's category ids: 1..90 without the 10 unused ones (the 80 names come from mmdet's CocoDataset).
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def stage_widths(variant: str) -> list[int]:
    """Output channels of stages 1..4 of a variant, from backbones.VARIANTS."""
    return [int(b * w) for b, w in zip(STAGE_BASE_WIDTHS, VARIANTS[variant]["width_multipliers"])]


def det_model(cfg: Config):
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    return MODELS.build(cfg.model)


def seg_model(cfg: Config):
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    return revert_sync_batchnorm(MODELS.build(cfg.model))  # SyncBN heads -> BN off a cluster


def load_config(path: Path, scratch: bool = True) -> Config:
    cfg = Config.fromfile(str(path))
    if scratch:
        cfg.model.backbone.init_cfg = None
    return cfg


# ----------------------------------------------------------------------------------------------
# generated data in the real formats


def _shapes_image(rng: np.random.Generator, size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> Image.Image:
    h, w = size
    image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = rng.integers(120, 255, 3, dtype=np.uint8)
    return Image.fromarray(image)


def make_coco(root: Path, images: int = 4, size: int = 96, seed: int = 0) -> Path:
    """COCO 2017 layout: annotations/instances_{train,val}2017.json and {train,val}2017/*.jpg."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    from mmdet.datasets import CocoDataset

    names = CocoDataset.METAINFO["classes"]
    categories = [{"id": i, "name": name, "supercategory": "thing"} for i, name in zip(COCO_IDS, names, strict=True)]
    for split in ("train2017", "val2017"):
        (root / split).mkdir(exist_ok=True)
        records, annotations = [], []
        for index in range(images):
            boxes = []
            for _ in range(2):
                bw, bh = rng.integers(24, 48, 2)
                x0, y0 = rng.integers(0, size - bw), rng.integers(0, size - bh)
                boxes.append((int(x0), int(y0), int(x0 + bw), int(y0 + bh)))
            name = f"{index:012d}.jpg"
            _shapes_image(rng, (size, size), boxes).save(root / split / name, quality=95)
            image_id = index + 1
            records.append({"id": image_id, "file_name": name, "width": size, "height": size})
            for x0, y0, x1, y1 in boxes:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.choice([1, 3, 18])),
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                })
        content = {"images": records, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return root


def _voc_palette() -> list[int]:
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def _mask_and_image(rng: np.random.Generator, size: int, labels: list[int], ignore: int | None):
    mask = np.zeros((size, size), dtype=np.uint8)
    boxes = []
    for label in labels:
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = x0 + rng.integers(size // 4, size // 2), y0 + rng.integers(size // 4, size // 2)
        mask[y0:y1, x0:x1] = label
        if ignore is not None:  # VOC's 255 boundary band
            mask[y0, x0:x1] = ignore
        boxes.append((int(x0), int(y0), int(x1), int(y1)))
    return mask, _shapes_image(rng, (size, size), boxes)


def make_voc(root: Path, images: int = 4, size: int = 80, seed: int = 0) -> Path:
    """VOCdevkit/VOC2012 with JPEGImages, palette SegmentationClass, SBD's gray SegmentationClassAug and lists."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    names = [f"2007_{i:06d}" for i in range(images)]
    for name in names:
        mask, image = _mask_and_image(rng, size, [int(c) for c in rng.integers(1, 21, 2)], ignore=255)
        image.save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        palette = Image.fromarray(mask, mode="P")
        palette.putpalette(_voc_palette())
        palette.save(voc / "SegmentationClass" / f"{name}.png")
        Image.fromarray(mask, mode="L").save(voc / "SegmentationClassAug" / f"{name}.png")
    half = images // 2
    lists = {"train.txt": names[:half], "aug.txt": names[half:], "val.txt": names[:half]}
    for file, content in lists.items():
        (voc / "ImageSets" / "Segmentation" / file).write_text("\n".join(content) + "\n")
    return root / "VOCdevkit" / "VOC2012"


def make_ade20k(root: Path, images: int = 2, size: int = 80, seed: int = 0) -> Path:
    """ADEChallengeData2016/{images,annotations}/{training,validation}: labels 1..150, 0 = other."""
    rng = np.random.default_rng(seed)
    ade = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True, exist_ok=True)
        (ade / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for index in range(images):
            name = f"ADE_{split[:5]}_{index:08d}"
            mask, image = _mask_and_image(rng, size, [int(c) for c in rng.integers(1, 151, 2)], ignore=None)
            image.save(ade / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(ade / "annotations" / split / f"{name}.png")
    return ade


# ----------------------------------------------------------------------------------------------
# the backbone


def test_import_backbones_stays_free_of_openmmlab():
    code = "import sys, backbones; bad = [m for m in ('mmengine', 'mmcv', 'mmdet', 'mmseg') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_registered_in_mmdet_and_mmseg():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG

    assert backbones.openmmlab.REGISTERED_IN == ("mmdet", "mmseg")
    for registry in (DET, SEG):
        assert registry.get("MobileOne") is MobileOneBackbone
        model = registry.build(dict(type="MobileOne", arch="s0", out_indices=(1, 3)))
        assert isinstance(model, MobileOne) and model.feature_info.channels() == [48, 256]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_returns_tuple_of_out_indices(variant):
    model = MobileOneBackbone(variant, out_indices=(4, 1, 2)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    widths = stage_widths(variant)
    assert isinstance(out, tuple)
    assert [f.shape[1] for f in out] == [widths[3], widths[0], widths[1]]
    assert [f.shape[-1] for f in out] == [2, 16, 8]


def test_output_stride_dilates_and_arch_errors():
    model = MobileOneBackbone("s1", out_indices=(1, 2, 3, 4), output_stride=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in out] == [16, 8, 8, 8]
    assert (model.stage3[0].stride, model.stage3[0].dilation, model.stage3[2].dilation) == (1, 1, 2)
    assert (model.stage4[0].stride, model.stage4[0].dilation) == (1, 2)
    with pytest.raises(ValueError, match=r"unknown MobileOne arch 's9'; expected one of \['s0', 's1', 's2', 's3', 's4'\]"):
        MobileOneBackbone("s9")
    with pytest.raises(TypeError, match=r"unexpected arguments \['depth'\]"):
        MobileOneBackbone("s0", depth=50)
    custom = MobileOneBackbone(dict(width_multipliers=(1, 1, 1, 1), num_conv_branches=2), out_indices=(4,))
    assert custom.feature_info.channels() == [512] and len(custom.stage1[0].rbr_conv) == 2


def test_frozen_stages_and_norm_eval():
    model = MobileOneBackbone("s0", frozen_stages=2, norm_eval=False).train()
    for index, stage in enumerate(model.stages):
        frozen = index <= 2
        assert all(p.requires_grad != frozen for p in stage.parameters()), index
        assert all(m.training != frozen for m in stage.modules() if isinstance(m, torch.nn.BatchNorm2d)), index
    model = MobileOneBackbone("s0", norm_eval=True).train()
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.stage1[0].training  # only the norms stay in eval
    # frozen stages keep their BN statistics through a training step
    model = MobileOneBackbone("s0", frozen_stages=1).train()
    before = model.stage1[1].rbr_conv[0].bn.running_mean.clone()
    later = model.stage2[1].rbr_conv[0].bn.running_mean.clone()
    sum(f.sum() for f in model(torch.randn(2, 3, 64, 64))).backward()
    assert torch.equal(model.stage1[1].rbr_conv[0].bn.running_mean, before)
    assert not torch.equal(model.stage2[1].rbr_conv[0].bn.running_mean, later)
    assert model.stage1[1].rbr_conv[0].conv.weight.grad is None and model.stage2[1].rbr_conv[0].conv.weight.grad is not None


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_pretrained_init_cfg_loads_apple_checkpoint(tmp_path, fused):
    sd = apple_state_dict("s1", fused=fused)
    path = tmp_path / f"mobileone_s1{'' if fused else '_unfused'}.pth.tar"
    torch.save(sd, path)
    model = MobileOneBackbone(
        "s1", out_indices=(2, 3), inference_mode=fused, init_cfg=dict(type="Pretrained", checkpoint=str(path))
    )
    model.init_weights()
    state = model.state_dict()
    assert "stage4.0.reparam_conv.weight" not in state and "linear.weight" not in state  # stage 4 not built
    for key, value in state.items():
        assert torch.equal(value, sd[key]), key
    assert model._is_init


def test_pretrained_errors(tmp_path):
    missing = MobileOneBackbone("s0", init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "none.pth")))
    with pytest.raises(FileNotFoundError, match="none.pth.*does not exist.*init_cfg=None"):
        missing.init_weights()
    url = MobileOneBackbone("s0", init_cfg=dict(type="Pretrained", checkpoint="https://example.com/x.pth"))
    with pytest.raises(ValueError, match="is a URL"):
        url.init_weights()
    torch.save(apple_state_dict("s2", fused=False), tmp_path / "s2.pth.tar")
    wrong = MobileOneBackbone("s1", init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "s2.pth.tar")))
    with pytest.raises(CheckpointMismatchError, match="The file looks like: MobileOne-S2"):
        wrong.init_weights()


# ----------------------------------------------------------------------------------------------
# the configs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ssdlite_configs_build(variant):
    cfg = Config.fromfile(str(DET_CONFIGS[variant]))
    backbone = cfg.model.backbone
    assert backbone.type == "MobileOne" and backbone.arch == variant and tuple(backbone.out_indices) == (3, 4)
    assert backbone.init_cfg.checkpoint == f"checkpoints/mobileone_{variant}_unfused.pth.tar"
    c4, c5 = stage_widths(variant)[2:]
    assert tuple(cfg.model.neck.in_channels) == (c4, c5)
    assert tuple(cfg.model.neck.out_channels) == tuple(cfg.model.bbox_head.in_channels) == (c4, c5, 512, 256, 256, 128)
    assert cfg.train_cfg.max_epochs == 200 and cfg.model.bbox_head.anchor_generator.strides == [16, 32, 64, 107, 160, 320]
    assert "backbones.openmmlab" in cfg.custom_imports.imports
    cfg.model.backbone.init_cfg = None
    model = det_model(cfg).eval()
    with torch.no_grad():
        cls_scores, bbox_preds = model._forward(torch.zeros(1, 3, 320, 320))
    assert [s.shape[-1] for s in cls_scores] == [20, 10, 5, 3, 2, 1]
    assert cls_scores[0].shape[1] == 6 * 81 and bbox_preds[0].shape[1] == 6 * 4


@pytest.mark.parametrize("variant, data", sorted(SEG_CONFIGS))
def test_deeplabv3_configs_build(variant, data):
    cfg = Config.fromfile(str(SEG_CONFIGS[(variant, data)]))
    backbone = cfg.model.backbone
    assert backbone.type == "MobileOne" and backbone.arch == variant and backbone.output_stride == 8
    widths = stage_widths(variant)
    head, aux = cfg.model.decode_head, cfg.model.auxiliary_head
    assert (head.type, head.in_channels, head.in_index, tuple(head.dilations)) == ("ASPPHead", widths[3], 3, (1, 12, 24, 36))
    assert (aux.type, aux.in_channels, aux.in_index, aux.loss_decode.loss_weight) == ("FCNHead", widths[2], 2, 0.4)
    classes = {"voc12aug": 21, "ade20k": 150}[data]
    assert head.num_classes == aux.num_classes == classes
    assert tuple(cfg.crop_size) == (512, 512) and tuple(cfg.model.data_preprocessor.size) == (512, 512)
    epochs = cfg.train_cfg.max_iters * 16 / {"voc12aug": 10582, "ade20k": 20210}[data]
    assert 49 < epochs < 51  # the paper's 50 epochs at 16 images per step
    cfg.model.backbone.init_cfg = None
    model = seg_model(cfg).eval()
    with torch.no_grad():
        logits = model._forward(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, classes, 8, 8)


# ----------------------------------------------------------------------------------------------
# end to end: train steps, evaluation, reparameterization of the whole model


def _det_runner_cfg(cfg: Config, coco: Path, work_dir: Path) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(work_dir)
    cfg.log_level = "WARNING"
    cfg.default_hooks.logger.interval = 1
    for loader, split in ((cfg.train_dataloader, "train2017"), (cfg.val_dataloader, "val2017"), (cfg.test_dataloader, "val2017")):
        loader.batch_size = 2
        loader.num_workers = 0
        loader.persistent_workers = False
        loader.dataset.data_root = str(coco) + "/"
        loader.dataset.ann_file = f"annotations/instances_{split}.json"
        loader.dataset.data_prefix = dict(img=f"{split}/")
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        evaluator.ann_file = str(coco / "annotations" / "instances_val2017.json")
    cfg.train_cfg.max_epochs = 1
    cfg.train_cfg.val_interval = 1
    return cfg


def test_ssdlite_s0_trains_evaluates_and_fuses(tmp_path):
    coco = make_coco(tmp_path / "coco")
    # An ImageNet-like S0 file in Apple's layout (same keys as apple_state_dict), with weights whose
    # activations stay in a sane range (Apple-layout random weights grow to ~1e12 over 28 layers).
    checkpoint = tmp_path / "mobileone_s0_unfused.pth.tar"
    apple = randomize_batchnorm(mobileone("s0")).state_dict()
    assert set(apple) == set(apple_state_dict("s0", fused=False))
    torch.save(apple, checkpoint)
    cfg = Config.fromfile(str(DET_CONFIGS["s0"]))
    cfg.model.backbone.init_cfg.checkpoint = str(checkpoint)  # the config's own Pretrained init
    cfg = _det_runner_cfg(cfg, coco, tmp_path / "work")
    cfg.model.test_cfg.score_thr = 0.0  # an untrained head scores ~1/81 < 0.02 everywhere: keep its top 200

    runner = Runner.from_cfg(cfg)
    model = runner.model
    model.init_weights()
    assert torch.equal(model.backbone.stage2[3].rbr_conv[1].conv.weight, apple["stage2.3.rbr_conv.1.conv.weight"])

    # one real train step by hand: loss dict, backward, gradients in the backbone, optimizer step
    # a separate loader: iterating the runner's own would use up its InfiniteSampler's shared generator
    batch = next(iter(Runner.build_dataloader(copy.deepcopy(cfg.train_dataloader))))
    model.train()
    data = model.data_preprocessor(batch, True)
    assert data["inputs"].shape[-2:] == (320, 320)
    losses = model(**data, mode="loss")
    assert set(losses) == {"loss_cls", "loss_bbox"}
    loss, log_vars = model.parse_losses(losses)
    assert all(torch.isfinite(v) for v in log_vars.values()) and loss.item() > 0
    loss.backward()
    for name in ("stage0.rbr_conv.0.conv.weight", "stage1.0.rbr_conv.3.conv.weight", "stage4.1.rbr_conv.0.conv.weight"):
        grad = model.backbone.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all(), name
    model.zero_grad()

    # the config's whole loop (optimizer, schedules, hooks, COCO evaluation) for one epoch
    runner.train()
    metrics = runner.val()
    assert "coco/bbox_mAP" in metrics and 0 <= metrics["coco/bbox_mAP"] <= 1

    # fine-tuning from the detector checkpoint mmengine just wrote: its backbone, strictly
    saved = tmp_path / "work" / "epoch_1.pth"
    init = dict(type="Pretrained", checkpoint=str(saved), prefix="backbone.")
    with pytest.raises(ValueError, match="add weights_only=False to the init_cfg"):
        MobileOneBackbone("s0", out_indices=(3, 4), init_cfg=init).init_weights()
    reloaded = MobileOneBackbone("s0", out_indices=(3, 4), init_cfg=dict(init, weights_only=False))
    reloaded.init_weights()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, model.backbone.state_dict()[key]), key

    # Reparameterize the whole trained detector. float32: the same backbone features and detections.
    # float64 (fused from float64 weights): the same raw head outputs to float64 rounding. (float32
    # rounding of the backbone, ~1e-6, reaches the head amplified by the un-converged BN statistics
    # of the neck after two steps, so the tight comparison of the head is made in float64.)
    model.eval()
    val_batch = model.data_preprocessor(next(iter(runner.val_dataloader)), False)
    fused = reparameterize_model(model)
    assert isinstance(fused.backbone, MobileOneBackbone) and fused.backbone.inference_mode
    assert not any(hasattr(m, "rbr_conv") for m in fused.modules())
    inputs = val_batch["inputs"]
    with torch.no_grad():
        for a, b in zip(model.backbone(inputs), fused.backbone(inputs)):
            assert relative_error(b, a) < 2e-6
        results = model.predict(inputs, copy.deepcopy(val_batch["data_samples"]))
        results_fused = fused.predict(inputs, copy.deepcopy(val_batch["data_samples"]))
        model64 = copy.deepcopy(model).double()
        raw, raw_fused = model64._forward(inputs.double()), reparameterize_model(model64)._forward(inputs.double())
    for a, b in zip(sum(raw, []), sum(raw_fused, [])):
        assert relative_error(b, a) < 1e-10
    for r, f in zip(results, results_fused):
        assert len(r.pred_instances) == len(f.pred_instances) > 0
        iou = bbox_overlaps(f.pred_instances.bboxes, r.pred_instances.bboxes)
        same_label = f.pred_instances.labels[:, None] == r.pred_instances.labels[None, :]
        matched = ((iou > 0.999) & same_label).any(dim=1).float().mean().item()
        assert matched > 0.9  # near-tied scores of an untrained head may swap places at the top-200 cut


def test_ssdlite_fuses_exactly_with_random_bn_statistics():
    model = det_model(load_config(DET_CONFIGS["s0"]))
    randomize_batchnorm(model.backbone)
    model.eval()
    x = torch.randn(2, 3, 320, 320)
    with torch.no_grad():
        expected = model.double()._forward(x.double())
        fused = reparameterize_model(model)
        actual = fused._forward(x.double())
    for a, b in zip(sum(actual, []), sum(expected, [])):
        assert relative_error(a, b) < 1e-12
    # reparameterize_model leaves the original alone
    assert any(hasattr(m, "rbr_conv") for m in model.modules())


def _small_seg_pipelines(cfg: Config, size: int = 64) -> Config:
    """Shrink the config's 512 px pipeline to ``size`` px for a CPU test (types and order unchanged)."""
    cfg = copy.deepcopy(cfg)
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        datasets = loader.dataset.datasets if loader.dataset.type == "ConcatDataset" else [loader.dataset]
        for dataset in datasets:
            for step in dataset.pipeline:
                if step.type in ("RandomResize", "Resize"):
                    step.scale = (4 * size, size)
                if step.type == "RandomCrop":
                    step.crop_size = (size, size)
                if step.type == "Pad":
                    step.size = (size, size)
        loader.batch_size = 2
        loader.num_workers = 0
        loader.persistent_workers = False
    cfg.model.data_preprocessor.size = (size, size)
    return cfg


def test_deeplabv3_s1_voc_trains_evaluates_and_fuses(tmp_path):
    voc = make_voc(tmp_path / "data")
    cfg = load_config(SEG_CONFIGS[("s1", "voc12aug")])
    cfg = _small_seg_pipelines(cfg)
    cfg.work_dir = str(tmp_path / "work")
    cfg.log_level = "WARNING"
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        datasets = loader.dataset.datasets if loader.dataset.type == "ConcatDataset" else [loader.dataset]
        for dataset in datasets:
            dataset.data_root = str(voc)
    cfg.train_cfg.max_iters = 2
    cfg.train_cfg.val_interval = 2
    cfg.param_scheduler[0].end = 2
    cfg.default_hooks.checkpoint.interval = 2

    runner = Runner.from_cfg(cfg)
    model = runner.model
    # VOC-aug = VOC's train list + SBD's aug list
    assert len(runner.train_dataloader.dataset) == 4

    # a separate loader: iterating the runner's own would use up its InfiniteSampler's shared generator
    batch = next(iter(Runner.build_dataloader(copy.deepcopy(cfg.train_dataloader))))
    model.train()
    data = model.data_preprocessor(batch, True)
    assert data["inputs"].shape[-2:] == (64, 64)
    losses = model(**data, mode="loss")
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(losses)
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name in ("stage0.rbr_conv.0.conv.weight", "stage3.0.rbr_conv.0.conv.weight", "stage4.1.rbr_conv.0.conv.weight"):
        grad = model.backbone.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()

    runner.train()
    metrics = runner.val()
    assert "mIoU" in metrics

    # the whole trained segmentor, fused: features in float32, logits and masks in float64
    model.eval()
    val_batch = model.data_preprocessor(next(iter(runner.val_dataloader)), False)
    fused = reparameterize_model(model)
    assert not any(hasattr(m, "rbr_conv") for m in fused.modules())
    inputs = val_batch["inputs"]
    with torch.no_grad():
        for a, b in zip(model.backbone(inputs), fused.backbone(inputs)):
            assert relative_error(b, a) < 2e-6
        model.double()
        fused = reparameterize_model(model)
        logits, logits_fused = model._forward(inputs.double()), fused._forward(inputs.double())
        assert relative_error(logits_fused, logits) < 1e-10
        masks = model.predict(inputs.double(), copy.deepcopy(val_batch["data_samples"]))
        masks_fused = fused.predict(inputs.double(), copy.deepcopy(val_batch["data_samples"]))
    for m, f in zip(masks, masks_fused):
        assert torch.equal(m.pred_sem_seg.data, f.pred_sem_seg.data)


@pytest.mark.parametrize("variant", ["s1", "s4"])
def test_deeplabv3_fuses_exactly_with_random_bn_statistics(variant):
    model = seg_model(load_config(SEG_CONFIGS[(variant, "voc12aug")]))
    randomize_batchnorm(model.backbone)
    model.eval().double()
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = model._forward(x)
        actual = reparameterize_model(model)._forward(x)
    assert relative_error(actual, expected) < 1e-12


def test_ade20k_config_reads_the_ade_layout(tmp_path):
    ade = make_ade20k(tmp_path / "data")
    cfg = _small_seg_pipelines(load_config(SEG_CONFIGS[("s1", "ade20k")]))
    init_default_scope("mmseg")
    from mmseg.registry import DATASETS

    for loader, split in ((cfg.train_dataloader, "training"), (cfg.val_dataloader, "validation")):
        dataset_cfg = loader.dataset
        dataset_cfg.data_root = str(ade)
        dataset = DATASETS.build(dataset_cfg)
        assert len(dataset) == 2 and split in dataset[0]["data_samples"].img_path
        labels = dataset[0]["data_samples"].gt_sem_seg.data.unique()
        # reduce_zero_label: 0 ("other") -> 255 (ignored), 1..150 -> 0..149
        assert labels.max() == 255 and labels[labels != 255].max() < 150
