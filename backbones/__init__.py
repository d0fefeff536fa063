"""MobileOne backbone: network, reparameterization, checkpoint I/O and pretrained weights by name. Imports only torch."""

from backbones.atomic import atomic_write_dir, atomic_write_file
from backbones.checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    describe_state_dict,
    leave_out_unfitting_classifier,
    load_checkpoint,
    read_state_dict,
)
from backbones.export import coreml_op_types, fold_batchnorm_, fuse_for_deployment, save_mlpackage, to_coreml, to_onnx_bytes, to_torchscript
from backbones.factory import mobileone
from backbones.hub import (
    WeightsDownloadError,
    WeightsIntegrityError,
    apple_weights_url,
    download_weights,
    is_apple_weights,
    is_named_weights,
    resolve_weights,
    weights_cache_dir,
)
from backbones.network import (
    VARIANTS,
    FeatureInfo,
    MobileOne,
    MobileOneBlock,
    SEBlock,
    calibrate_from_fused_,
    mark_folded_batchnorms_,
    reparameterize_model,
)
from backbones.quantization import prepare_for_int8

__all__ = [
    "atomic_write_dir",
    "atomic_write_file",
    "CheckpointMismatchError",
    "LoadReport",
    "VARIANTS",
    "FeatureInfo",
    "MobileOne",
    "MobileOneBlock",
    "SEBlock",
    "calibrate_from_fused_",
    "coreml_op_types",
    "describe_state_dict",
    "fold_batchnorm_",
    "fuse_for_deployment",
    "leave_out_unfitting_classifier",
    "load_checkpoint",
    "mark_folded_batchnorms_",
    "mobileone",
    "prepare_for_int8",
    "read_state_dict",
    "reparameterize_model",
    "save_mlpackage",
    "to_coreml",
    "to_onnx_bytes",
    "to_torchscript",
    "WeightsDownloadError",
    "WeightsIntegrityError",
    "apple_weights_url",
    "download_weights",
    "is_apple_weights",
    "is_named_weights",
    "resolve_weights",
    "weights_cache_dir",
]
