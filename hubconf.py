"""torch.hub entry points: ``torch.hub.load("<this repo>", "mobileone_s0", pretrained=True)``.

``pretrained=True`` loads Apple's ImageNet weights (train form; with ``inference_mode=True`` the
fused ones), downloaded once into the weights cache (``$MOBILEONE_WEIGHTS_DIR``, else torch's hub
cache) and checked against their SHA-256 on every use. Other keyword arguments go to
``backbones.mobileone`` (``num_classes``, ``out_indices``, ``weights="/path/to/file"``, ...).
"""

from backbones import mobileone as _mobileone

dependencies = ["torch"]


def mobileone_s0(pretrained: bool = False, **kwargs):
    """MobileOne-S0 (2.1 M parameters fused; 71.4 % ImageNet top-1 in the paper), Apple's weights if ``pretrained``."""
    return _mobileone("s0", pretrained=pretrained, **kwargs)


def mobileone_s1(pretrained: bool = False, **kwargs):
    """MobileOne-S1 (4.8 M parameters fused; 75.9 % ImageNet top-1 in the paper), Apple's weights if ``pretrained``."""
    return _mobileone("s1", pretrained=pretrained, **kwargs)


def mobileone_s2(pretrained: bool = False, **kwargs):
    """MobileOne-S2 (7.8 M parameters fused; 77.4 % ImageNet top-1 in the paper), Apple's weights if ``pretrained``."""
    return _mobileone("s2", pretrained=pretrained, **kwargs)


def mobileone_s3(pretrained: bool = False, **kwargs):
    """MobileOne-S3 (10.1 M parameters fused; 78.1 % ImageNet top-1 in the paper), Apple's weights if ``pretrained``."""
    return _mobileone("s3", pretrained=pretrained, **kwargs)


def mobileone_s4(pretrained: bool = False, **kwargs):
    """MobileOne-S4 (14.8 M parameters fused; 79.4 % ImageNet top-1 in the paper), Apple's weights if ``pretrained``."""
    return _mobileone("s4", pretrained=pretrained, **kwargs)
