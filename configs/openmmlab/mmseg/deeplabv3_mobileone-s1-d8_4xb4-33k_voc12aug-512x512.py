# DeepLabV3-MobileOne-S1, output stride 8, on Pascal VOC 2012 + SBD, 512x512, 50 epochs. Paper: about 77.3 mIoU (derived from the paper).
# Stage-3 / stage-4 widths of MobileOne-S1: 512 / 1280 (backbones.VARIANTS).
#   python tools/train.py configs/openmmlab/mmseg/deeplabv3_mobileone-s1-d8_4xb4-33k_voc12aug-512x512.py   (from an mmsegmentation checkout: give the full path)
#   mim train mmseg configs/openmmlab/mmseg/deeplabv3_mobileone-s1-d8_4xb4-33k_voc12aug-512x512.py --gpus 4 --launcher pytorch
_base_ = "./_base_/deeplabv3_mobileone-d8_voc12aug.py"

model = dict(
    backbone=dict(arch="s1", init_cfg=dict(checkpoint="checkpoints/mobileone_s1_unfused.pth.tar")),
    decode_head=dict(in_channels=1280),
    auxiliary_head=dict(in_channels=512),
)
