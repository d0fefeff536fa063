# DeepLabV3-MobileOne (output stride 8) on Pascal VOC 2012 + SBD ("VOC-aug", 21 classes, 255 ignored),
# 512x512 crops, 4 GPUs x 4 images, 50 epochs = 33k iterations of 16 images over VOC-aug's 10,582.
# Data as mmseg keeps it (data/VOCdevkit/VOC2012 with JPEGImages, SegmentationClass and SBD's
# SegmentationClassAug + ImageSets/Segmentation/aug.txt from mmseg's tools/dataset_converters/voc_aug.py);
# elsewhere: --cfg-options train_dataloader.dataset.datasets.0.data_root=... (and .1., val_dataloader.dataset.data_root).
_base_ = [
    "./deeplabv3_mobileone-d8.py",
    "mmseg::_base_/datasets/pascal_voc12_aug.py",
    "mmseg::_base_/default_runtime.py",
]
crop_size = (512, 512)
model = dict(decode_head=dict(num_classes=21), auxiliary_head=dict(num_classes=21))

max_iters = 33000
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=3000)
param_scheduler = [dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)]
default_hooks = dict(checkpoint=dict(interval=3000))
