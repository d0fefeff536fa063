"""Semantic segmentation (Pascal VOC, ADE20K, any image/mask folder) with DeepLabV3 on MobileOne."""
