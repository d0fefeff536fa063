# DeepLabV3-MobileOne-S4, output stride 8, on Pascal VOC 2012 + SBD, 512x512, 50 epochs. Paper: 80.1 mIoU (the paper).
# Stage-3 / stage-4 widths of MobileOne-S4: 896 / 2048 (backbones.VARIANTS).
#   python tools/train.py configs/openmmlab/mmseg/deeplabv3_mobileone-s4-d8_4xb4-33k_voc12aug-512x512.py   (from an mmsegmentation checkout: give the full path)
#   mim train mmseg configs/openmmlab/mmseg/deeplabv3_mobileone-s4-d8_4xb4-33k_voc12aug-512x512.py --gpus 4 --launcher pytorch
_base_ = "./_base_/deeplabv3_mobileone-d8_voc12aug.py"

model = dict(
    backbone=dict(arch="s4", init_cfg=dict(checkpoint="checkpoints/mobileone_s4_unfused.pth.tar")),
    decode_head=dict(in_channels=2048),
    auxiliary_head=dict(in_channels=896),
)
