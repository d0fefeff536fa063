# DeepLabV3 on MobileOne at output stride 8: the paper's segmentation setup (as the repository's
# Lightning recipes configs/segmentation/deeplabv3_mobileone_s{1,4}_{voc,ade20k}.yaml), in mmseg.
# Model and optimizer only; the data bases (deeplabv3_mobileone-d8_4xb4-*.py) add the data set,
# the runtime and the number of iterations, and the files one level up pick the variant.
#
# - backbone: MobileOne stages 1-4 (out_indices 1..4), the strided layers of stages 3 and 4 turned
#   into dilated ones (output stride 8; exactly reparameterizable), ImageNet weights from disk;
# - decode head: ASPP (rates 12/24/36 plus the 1x1 and image-pooling branches) on stage 4, width
#   256 (mmseg's ResNet DeepLabV3 uses 512: set model.decode_head.channels=512);
# - auxiliary FCN head on stage 3, loss weight 0.4;
# - SGD momentum 0.9, lr 0.01 for the heads and 0.001 (lr_mult 0.1) for the backbone per 16 images,
#   weight decay 1e-4 (none on norms and biases), "poly" decay (power 0.9) to 0.
custom_imports = dict(imports=["backbones.openmmlab"], allow_failed_imports=False)

norm_cfg = dict(type="SyncBN", requires_grad=True)  # of the heads; reverted to BN when not distributed
# Distributed training: mmengine's runner turns every BatchNorm, the backbone's too, into SyncBatchNorm
# (4 GPUs x 4 images: per-GPU statistics of 4 crops would be noisy).
sync_bn = "torch"
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512),
)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type="MobileOne",
        arch="s1",
        out_indices=(1, 2, 3, 4),
        output_stride=8,
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=dict(type="Pretrained", checkpoint="checkpoints/mobileone_s1_unfused.pth.tar"),
    ),
    decode_head=dict(
        type="ASPPHead",
        in_channels=1280,  # stage-4 width
        in_index=3,
        channels=256,
        dilations=(1, 12, 24, 36),
        dropout_ratio=0.1,
        num_classes=21,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=512,  # stage-3 width
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=21,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)

optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=1e-4),
    paramwise_cfg=dict(custom_keys={"backbone": dict(lr_mult=0.1)}, norm_decay_mult=0.0, bias_decay_mult=0.0),
    clip_grad=None,
)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=4000, max_keep_ckpts=3, save_best="mIoU"),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
