# SSDLite-MobileOne-S1 on COCO 2017, 320x320, 200 epochs, 8 GPUs x 24 images (the paper's setup).
# C4 / C5 = stage-3 / stage-4 widths of MobileOne-S1: 512 / 1280 (backbones.VARIANTS).
#   python tools/train.py configs/openmmlab/mmdet/ssdlite_mobileone-s1_8xb24-200e_coco.py   (from an mmdetection checkout: give the full path)
#   mim train mmdet configs/openmmlab/mmdet/ssdlite_mobileone-s1_8xb24-200e_coco.py --gpus 8 --launcher pytorch
_base_ = "./_base_/ssdlite_mobileone_8xb24-200e_coco.py"

model = dict(
    backbone=dict(arch="s1", init_cfg=dict(checkpoint="checkpoints/mobileone_s1_unfused.pth.tar")),
    neck=dict(in_channels=(512, 1280), out_channels=(512, 1280, 512, 256, 256, 128)),
    bbox_head=dict(in_channels=(512, 1280, 512, 256, 256, 128)),
)
