"""``mobileone()``: a MobileOne variant built and, if asked, loaded with weights (a local file,
Apple's release by name, or a Hugging Face Hub file). Kept apart from the network's module so
that the network, the checkpoint reader and the weights cache do not import each other."""

from __future__ import annotations

import os
from typing import Any

from backbones.checkpoint import load_checkpoint
from backbones.hub import resolve_weights
from backbones.network import DEFAULT_BLOCKS_PER_STAGE, MobileOne, variant_config


def mobileone(
    variant: str,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    weights_sha256: str | None = None,
    **kwargs: Any,
) -> MobileOne:
    """Build MobileOne ``variant`` ("s0" .. "s4", or "mobileone_s0" ..).

    Keyword arguments go to :class:`MobileOne` and override the variant's table entry, e.g.
    ``mobileone("s1", num_conv_branches=2)``. ``use_se=True`` / ``False`` switches the paper's SE
    placement (last 5 blocks of stage 3 and the last block of stage 4) on or off.

    ``pretrained=True`` loads Apple's ImageNet weights (train form; the fused file when
    ``inference_mode=True``), downloaded once and cached (see :mod:`backbones.hub`); ``weights``
    loads a local file, ``"apple"`` or ``"hf-hub:<owner>/<repo>[/<file>]"`` instead, strictly but for
    the classifier (see :func:`backbones.checkpoint.load_checkpoint`): it is left out for a feature
    extractor (``out_indices``) and re-initialized for another ``num_classes``. ``weights_sha256`` pins
    the file's SHA-256.
    """
    name = variant.lower().removeprefix("mobileone_")
    config = variant_config(variant)
    if pretrained and weights is not None:
        raise ValueError(f"pass either pretrained=True (Apple's weights) or weights={weights!r}, not both")
    use_se = kwargs.pop("use_se", None)
    if use_se is not None:
        blocks = kwargs.get("num_blocks_per_stage", DEFAULT_BLOCKS_PER_STAGE)
        config["num_se_blocks"] = (0, 0, blocks[2] // 2, blocks[3]) if use_se else (0, 0, 0, 0)
    config.update(kwargs)
    model = MobileOne(**config)
    spec = "apple" if pretrained else weights
    if spec is not None:
        load_checkpoint(model, resolve_weights(spec, name, inference_mode=model.inference_mode, sha256=weights_sha256))
    return model
