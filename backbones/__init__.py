"""MobileOne backbone: network, reparameterization and checkpoint I/O. Imports only torch."""

from backbones.checkpoint import CheckpointMismatchError, LoadReport, describe_state_dict, load_checkpoint
from backbones.network import (
    VARIANTS,
    FeatureInfo,
    MobileOne,
    MobileOneBlock,
    SEBlock,
    mobileone,
    reparameterize_model,
)

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "VARIANTS",
    "FeatureInfo",
    "MobileOne",
    "MobileOneBlock",
    "SEBlock",
    "describe_state_dict",
    "load_checkpoint",
    "mobileone",
    "reparameterize_model",
]
