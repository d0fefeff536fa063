# SSDLite-MobileOne on COCO 2017 at 320x320: the paper's detection setup, i.e. mmdetection's SSDLite
# recipe (configs/ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py) with MobileOne C4 (stage 3,
# stride 16) and C5 (stage 4, stride 32) in place of MobileNetV2, trained for 200 epochs.
# This base is MobileOne-S0; ssdlite_mobileone-s{0..4}_8xb24-200e_coco.py set the variant and the
# C4 / C5 widths (backbones.VARIANTS: stage-3 and stage-4 widths).
#
# The backbone starts from Apple's ImageNet weights, read from disk (nothing is downloaded):
#   checkpoints/mobileone_sX_unfused.pth.tar (https://github.com/apple/ml-mobileone), or
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/file, or
#   --cfg-options model.backbone.init_cfg=None to train from scratch.
_base_ = [
    "mmdet::_base_/datasets/coco_detection.py",
    "mmdet::_base_/schedules/schedule_1x.py",
    "mmdet::_base_/default_runtime.py",
]

# Registers type="MobileOne" in mmdet's MODELS (pip install -e . of this repository).
custom_imports = dict(imports=["backbones.openmmlab"], allow_failed_imports=False)

# BN of the neck and head: eps 1e-3, momentum 0.03 (TensorFlow's 0.97 decay), as in SSDLite.
norm_cfg = dict(type="BN", eps=0.001, momentum=0.03)

data_preprocessor = dict(
    type="DetDataPreprocessor",
    mean=[123.675, 116.28, 103.53],  # ImageNet statistics in RGB, as Apple's weights were trained
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_size_divisor=1,
)
model = dict(
    type="SingleStageDetector",
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type="MobileOne",
        arch="s0",
        out_indices=(3, 4),  # C4 (stride 16), C5 (stride 32)
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=dict(type="Pretrained", checkpoint="checkpoints/mobileone_s0_unfused.pth.tar"),
    ),
    neck=dict(
        type="SSDNeck",
        in_channels=(256, 1024),
        out_channels=(256, 1024, 512, 256, 256, 128),  # C4, C5, then four depthwise-separable extra levels
        level_strides=(2, 2, 2, 2),
        level_paddings=(1, 1, 1, 1),
        l2_norm_scale=None,
        use_depthwise=True,
        norm_cfg=norm_cfg,
        act_cfg=dict(type="ReLU6"),
        init_cfg=dict(type="TruncNormal", layer="Conv2d", std=0.03),
    ),
    bbox_head=dict(
        type="FixedSSDHead",  # mmdet's SSDHead with its 3.3.0 inference bug fixed (backbones/openmmlab.py)
        in_channels=(256, 1024, 512, 256, 256, 128),
        num_classes=80,
        use_depthwise=True,
        norm_cfg=norm_cfg,
        act_cfg=dict(type="ReLU6"),
        init_cfg=dict(type="Normal", layer="Conv2d", std=0.001),
        # SSDLite's anchors at 320 px: 6 per location (ratios 2 and 3), 3234 in all.
        anchor_generator=dict(
            type="SSDAnchorGenerator",
            scale_major=False,
            strides=[16, 32, 64, 107, 160, 320],
            ratios=[[2, 3], [2, 3], [2, 3], [2, 3], [2, 3], [2, 3]],
            min_sizes=[48, 100, 150, 202, 253, 304],
            max_sizes=[100, 150, 202, 253, 304, 320],
        ),
        bbox_coder=dict(
            type="DeltaXYWHBBoxCoder",
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[0.1, 0.1, 0.2, 0.2],
        ),
    ),
    train_cfg=dict(
        assigner=dict(
            type="MaxIoUAssigner",
            pos_iou_thr=0.5,
            neg_iou_thr=0.5,
            min_pos_iou=0.0,
            ignore_iof_thr=-1,
            gt_max_assign_all=False,
        ),
        sampler=dict(type="PseudoSampler"),
        smoothl1_beta=1.0,
        allowed_border=-1,
        pos_weight=-1,
        neg_pos_ratio=3,  # hard negatives 3:1
        debug=False,
    ),
    test_cfg=dict(
        nms_pre=1000,
        nms=dict(type="nms", iou_threshold=0.45),
        min_bbox_size=0,
        score_thr=0.02,
        max_per_img=200,
    ),
)
env_cfg = dict(cudnn_benchmark=True)

# Data: SSD augmentation (expand 1-4x, min-IoU crop, resize to 320x320, flip, photometric distortion).
input_size = 320
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Expand", mean=data_preprocessor["mean"], to_rgb=data_preprocessor["bgr_to_rgb"], ratio_range=(1, 4)),
    dict(type="MinIoURandomCrop", min_ious=(0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size=0.3),
    dict(type="Resize", scale=(input_size, input_size), keep_ratio=False),
    dict(type="RandomFlip", prob=0.5),
    dict(
        type="PhotoMetricDistortion",
        brightness_delta=32,
        contrast_range=(0.5, 1.5),
        saturation_range=(0.5, 1.5),
        hue_delta=18,
    ),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(input_size, input_size), keep_ratio=False),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=24,  # per GPU; 8 GPUs x 24 = 192 images per step
    num_workers=4,
    batch_sampler=None,
    dataset=dict(
        _delete_=True,
        type={{_base_.dataset_type}},
        data_root={{_base_.data_root}},
        ann_file="annotations/instances_train2017.json",
        data_prefix=dict(img="train2017/"),
        filter_cfg=dict(filter_empty_gt=True, min_size=32),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(batch_size=8, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# Schedule: 200 epochs, SGD lr 0.015 per 192 images, momentum 0.9, weight decay 4e-5,
# 500-iteration linear warm-up, cosine to 0 (per epoch).
max_epochs = 200
train_cfg = dict(max_epochs=max_epochs, val_interval=10)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type="CosineAnnealingLR", begin=0, T_max=max_epochs, end=max_epochs, by_epoch=True, eta_min=0),
]
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=0.015, momentum=0.9, weight_decay=4.0e-5),
)
default_hooks = dict(checkpoint=dict(type="CheckpointHook", interval=10, max_keep_ckpts=3, save_best="coco/bbox_mAP"))
custom_hooks = [
    dict(type="NumClassCheckHook"),
    dict(type="CheckInvalidLossHook", interval=50, priority="VERY_LOW"),
]
# lr 0.015 is for 8 GPUs x 24 images; `tools/train.py --auto-scale-lr` scales it to your batch.
auto_scale_lr = dict(base_batch_size=192)
