# SSDLite-MobileOne-S3 on COCO 2017, 320x320, 200 epochs, 8 GPUs x 24 images (the paper's setup).
# C4 / C5 = stage-3 / stage-4 widths of MobileOne-S3: 768 / 2048 (backbones.VARIANTS).
#   python tools/train.py configs/openmmlab/mmdet/ssdlite_mobileone-s3_8xb24-200e_coco.py   (from an mmdetection checkout: give the full path)
#   mim train mmdet configs/openmmlab/mmdet/ssdlite_mobileone-s3_8xb24-200e_coco.py --gpus 8 --launcher pytorch
_base_ = "./_base_/ssdlite_mobileone_8xb24-200e_coco.py"

model = dict(
    backbone=dict(arch="s3", init_cfg=dict(checkpoint="checkpoints/mobileone_s3_unfused.pth.tar")),
    neck=dict(in_channels=(768, 2048), out_channels=(768, 2048, 512, 256, 256, 128)),
    bbox_head=dict(in_channels=(768, 2048, 512, 256, 256, 128)),
)
