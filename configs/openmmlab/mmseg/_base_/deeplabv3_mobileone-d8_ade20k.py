# DeepLabV3-MobileOne (output stride 8) on ADE20K (150 classes; label 0 "other" is ignored),
# 512x512 crops, 4 GPUs x 4 images, 50 epochs = 63k iterations of 16 images over its 20,210.
# Data as mmseg keeps it: data/ade/ADEChallengeData2016/{images,annotations}/{training,validation};
# elsewhere: --cfg-options train_dataloader.dataset.data_root=... val_dataloader.dataset.data_root=...
_base_ = [
    "./deeplabv3_mobileone-d8.py",
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
]
crop_size = (512, 512)
model = dict(decode_head=dict(num_classes=150), auxiliary_head=dict(num_classes=150))

max_iters = 63000
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=6000)
param_scheduler = [dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)]
default_hooks = dict(checkpoint=dict(interval=6000))
