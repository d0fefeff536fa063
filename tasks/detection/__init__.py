"""Object detection (COCO, any COCO-format set) with SSDLite on MobileOne."""
