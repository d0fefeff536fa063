# SSDLite-MobileOne-S4 on COCO 2017, 320x320, 200 epochs, 8 GPUs x 24 images (the paper's setup).
# Reference point: about 29.4 mAP for S4 (derived from the paper's claims; MobileNetV2 SSDLite: 21.3).
# C4 / C5 = stage-3 / stage-4 widths of MobileOne-S4: 896 / 2048 (backbones.VARIANTS).
#   python tools/train.py configs/openmmlab/mmdet/ssdlite_mobileone-s4_8xb24-200e_coco.py   (from an mmdetection checkout: give the full path)
#   mim train mmdet configs/openmmlab/mmdet/ssdlite_mobileone-s4_8xb24-200e_coco.py --gpus 8 --launcher pytorch
_base_ = "./_base_/ssdlite_mobileone_8xb24-200e_coco.py"

model = dict(
    backbone=dict(arch="s4", init_cfg=dict(checkpoint="checkpoints/mobileone_s4_unfused.pth.tar")),
    neck=dict(in_channels=(896, 2048), out_channels=(896, 2048, 512, 256, 256, 128)),
    bbox_head=dict(in_channels=(896, 2048, 512, 256, 256, 128)),
)
