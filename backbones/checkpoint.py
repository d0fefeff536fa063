"""Loading MobileOne weights: Apple's releases (both forms), timm's state dicts (both forms), wrapped files,
DDP and Lightning checkpoints."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from backbones.network import VARIANTS, MobileOne, MobileOneBlock, variant_config

__all__ = ["CheckpointMismatchError", "LoadReport", "describe_state_dict", "leave_out_unfitting_classifier", "load_checkpoint",
           "read_state_dict"]

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model")
_MAX_LISTED = 12


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did besides loading: the stripped prefix and the keys it left out."""

    source: str
    prefix: str = ""
    dropped: list[str] = field(default_factory=list)
    classifier_reinitialized: bool = False  # the file's classifier had another class count (see load_checkpoint)
    from_fused: int = 0  # train-form layers built from a fused file's convolutions (see load_checkpoint)


def _read(source: str | os.PathLike | Mapping, weights_only: bool) -> tuple[Mapping, str]:
    if isinstance(source, Mapping):
        return source, "<state dict>"
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only), path
    except Exception as error:  # torch raises several types for corrupt / non-torch files
        hint = (
            " If the file is one you trust that stores Python objects besides tensors, pass weights_only=False."
            if weights_only and "weights_only" in str(error)
            else ""
        )
        raise ValueError(f"cannot read checkpoint {path!r}: {error}.{hint}") from error


def _unwrap(checkpoint: Mapping, source: str) -> dict[str, torch.Tensor]:
    while True:
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if wrapper is None:
            break
        checkpoint = checkpoint[wrapper]
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise ValueError(
            f"checkpoint {source} holds no tensors at its top level nor under {list(_WRAPPER_KEYS)}; "
            f"its top-level keys are {sorted(map(str, checkpoint))[:_MAX_LISTED]}"
        )
    return state_dict


# timm's names inside one MobileOneBlock -> ours (Apple's); reparam_conv is the same in both.
_TIMM_BLOCK_PARTS = (
    ("conv_kxk.", "rbr_conv."),
    ("conv_scale.", "rbr_scale."),
    ("identity.", "rbr_skip."),
    ("attn.fc1.", "se.reduce."),
    ("attn.fc2.", "se.expand."),
)
# A MobileOne stem in timm's layout, behind an optional prefix (DDP's module., a task's model., ...).
_TIMM_STEM = re.compile(r"((?:.+\.)?)stem\.(?:conv_kxk\.\d+\.conv|reparam_conv)\.weight")
_TIMM_LAYER = re.compile(r"(?:stem|stages[._](\d+)\.(\d+))\.(.+)")


def _timm_key(key: str) -> str:
    """One key, relative to the network, from timm's layout to ours; keys it does not know pass unchanged."""
    if key in ("head.fc.weight", "head.fc.bias"):
        return "linear." + key.rsplit(".", 1)[1]
    match = _TIMM_LAYER.fullmatch(key)
    if match is None:
        return key
    stage, layer, rest = match.groups()
    for theirs, ours in _TIMM_BLOCK_PARTS:
        if rest.startswith(theirs):
            rest = ours + rest[len(theirs):]
            break
    return f"stage0.{rest}" if stage is None else f"stage{int(stage) + 1}.{layer}.{rest}"


def _from_timm_layout(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Rename a state dict in timm's MobileOne layout to ours (Apple's); (state dict, whether it was timm's).

    timm (``timm.create_model("mobileone_sX")``, a ``ByobNet`` of ``MobileOneBlock``) names the stem
    ``stem.*``, the layers of stage N (1..4) ``stages.{N-1}.{i}.*`` (``stages_{N-1}.{i}.*`` in its
    ``features_only`` form) and the classifier ``head.fc.*``; ours are ``stage0.*``, ``stageN.{i}.*``
    and ``linear.*``. Both list a stage's depthwise and pointwise layers alternately in one sequence,
    so ``i`` is the same. Inside a layer timm's ``conv_kxk`` / ``conv_scale`` / ``identity`` (a
    BatchNorm) / ``attn.fc1`` / ``attn.fc2`` are our ``rbr_conv`` / ``rbr_scale`` / ``rbr_skip`` /
    ``se.reduce`` / ``se.expand``; the fused ``reparam_conv`` is named alike. The layout is recognised
    by a MobileOne stem (``stem.conv_kxk.0.conv.weight`` or ``stem.reparam_conv.weight``); keys under
    the prefix found in front of it are renamed, all other keys are kept as they are.
    """
    prefixes = sorted(
        {match.group(1) for key in state_dict if (match := _TIMM_STEM.fullmatch(key))}, key=len, reverse=True
    )
    if not prefixes:
        return dict(state_dict), False
    renamed = {}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        renamed[key if prefix is None else prefix + _timm_key(key[len(prefix):])] = value
    return renamed, True


def _strip_prefix(state_dict: dict[str, torch.Tensor], source: str, prefix: str | None) -> tuple[dict, str]:
    state_dict = {re.sub(r"^(module\.)+", "", k): v for k, v in state_dict.items()}
    if prefix is None:
        found = sorted({k[: k.index("stage0.")] for k in state_dict if re.search(r"(^|\.)stage0\.", k)})
        if not found:
            return state_dict, ""
        if len(found) > 1:
            raise ValueError(
                f"checkpoint {source} holds several MobileOne networks, under the prefixes {found}; "
                "pass prefix=... to say which one to load"
            )
        prefix = found[0]
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ValueError(f"checkpoint {source} has no keys under the prefix {prefix!r}")
    return state_dict, prefix


def _read_state_dict(
    checkpoint: str | os.PathLike | Mapping, prefix: str | None, weights_only: bool
) -> tuple[dict[str, torch.Tensor], str, str, bool]:
    """(state dict, stripped prefix, a name of the source for messages, whether it was in timm's layout)."""
    raw, source = _read(checkpoint, weights_only)
    state_dict, from_timm = _from_timm_layout(_unwrap(raw, source))
    return (*_strip_prefix(state_dict, source, prefix), source, from_timm)


def read_state_dict(
    checkpoint: str | os.PathLike | Mapping, prefix: str | None = None, weights_only: bool = True
) -> dict[str, torch.Tensor]:
    """The MobileOne state dict in ``checkpoint`` (a path or a loaded object), with Apple's key names.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}``, renames timm's layout to Apple's, strips
    DDP's ``module.`` and a task prefix in front of ``stage0.`` (or ``prefix``), as
    :func:`load_checkpoint` does.
    """
    return _read_state_dict(checkpoint, prefix, weights_only)[0]


@functools.cache
def _reference_shapes(variant: str, inference_mode: bool) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MobileOne(**{**variant_config(variant), "inference_mode": inference_mode})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _comparable(key: str) -> bool:
    return not key.endswith("num_batches_tracked") and not key.startswith("linear.")


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Say which MobileOne variant and form a state dict looks like (or the closest one)."""
    state_dict, from_timm = _from_timm_layout(state_dict)
    if from_timm:
        return describe_state_dict(state_dict) + ", in timm's layout"
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if _comparable(k)}
    if not any(k.startswith("stage0.") for k in shapes):
        if any(k.startswith("stages.") for k in shapes) and any(k.startswith("stem.") for k in shapes):
            return "a timm-style layout (stem.*, stages.*), but not timm's MobileOne (no stem.conv_kxk.* / stem.reparam_conv.*)"
        return "not a MobileOne state dict in Apple's layout (no 'stage0.*' keys)"
    train = any(".rbr_conv." in k for k in shapes)
    inference = any(".reparam_conv." in k for k in shapes)
    if train and inference:
        form = "a mix of train form (rbr_*) and inference form (reparam_conv) keys"
    else:
        form = "inference form (fused, like mobileone_sX.pth.tar)" if inference else "train form (unfused, like mobileone_sX_unfused.pth.tar)"
    classes = state_dict["linear.weight"].shape[0] if "linear.weight" in state_dict else None
    head = f", {classes}-class classifier" if classes is not None else ", no classifier"

    best, best_diff = None, None
    for variant in VARIANTS:
        reference = {k: s for k, s in _reference_shapes(variant, inference and not train).items() if _comparable(k)}
        diff = len(set(reference) ^ set(shapes)) + sum(reference[k] != s for k, s in shapes.items() if k in reference)
        if best_diff is None or diff < best_diff:
            best, best_diff = variant, diff
    if best_diff == 0:
        return f"MobileOne-{best.upper()}, {form}{head}"
    # A feature extractor stops early: exact on a prefix of the stages is still a clear answer.
    return f"closest to MobileOne-{best.upper()} ({best_diff} keys differ), {form}{head}"


def leave_out_unfitting_classifier(
    state_dict: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], head: str, source: str
) -> tuple[list[str], str | None]:
    """The one rule for a checkpoint's classifier, for MobileOne (``head="linear."``) and the baselines
    (torchvision's ``"classifier."``): the keys under ``head`` that the model does not have (it builds
    no classifier: a feature extractor) or has with another leading dimension (another class count)
    are removed from ``state_dict`` (in place): the model keeps its own for them. A classifier of the
    same class count stays (a wrong width is left to the caller's shape check).

    Returns the keys left out and, when the model has a classifier of another class count, the
    warning to log once the load has succeeded.
    """
    dropped = [k for k in state_dict if k.startswith(head) and (k not in expected or state_dict[k].shape[:1] != expected[k].shape[:1])]
    weight = next((k for k in dropped if k in expected and k.endswith("weight")), None)
    warning = None if weight is None else (
        f"weights {source} have a {state_dict[weight].shape[0]}-class classifier, the model has "
        f"{expected[weight].shape[0]} classes: the classifier is re-initialized")
    for key in dropped:
        del state_dict[key]
    return dropped, warning


def _format_keys(keys: list[str]) -> str:
    listed = ", ".join(keys[:_MAX_LISTED])
    return listed + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping,
    prefix: str | None = None,
    ignore_classifier: bool | None = None,
    weights_only: bool = True,
) -> LoadReport:
    """Load MobileOne weights into ``model`` (strictly, after the adjustments below).

    Accepts a path or an already loaded object: a plain state dict (Apple's
    ``mobileone_sX_unfused.pth.tar`` / ``mobileone_sX.pth.tar``, or timm's ``mobileone_sX`` in train
    or reparameterized form, whose keys are renamed to Apple's first), one wrapped as
    ``{"state_dict": ...}`` or ``{"model": ...}``, keys with DDP's ``module.`` prefix, and
    Lightning ``.ckpt`` files, whose task prefix (``model.``, ``model.backbone.``, ...) in front of
    ``stage0.`` is found and stripped (or given as ``prefix``); keys outside it are ignored.

    The classifier (``linear.*``): by default (``ignore_classifier=None``) it loads when the model
    has one of the same class count and is left out otherwise (a feature extractor has none; one of
    another class count keeps its fresh initialization, a warning says so and the report's
    ``classifier_reinitialized`` is set): :func:`leave_out_unfitting_classifier`. ``True`` always
    leaves it out, ``False`` loads it strictly. Stages a feature extractor did not build are left
    out too. Anything else that does not fit raises :class:`CheckpointMismatchError` listing missing,
    unexpected and wrongly shaped keys and saying which variant and form the file looks like.

    A fused (inference-form) file loads into a train-form model too, for fine-tuning: each layer's
    fused conv becomes its first conv branch behind a pass-through BatchNorm, the other branches
    start at zero scale (``MobileOneBlock.train_form_state_from_fused``), so the model computes the
    file's function exactly in eval mode. Those layers are marked ``from_fused``: before training,
    ``calibrate_from_fused_`` gives their BatchNorms the statistics of real images (the tasks do it
    at the start of ``fit``); fused again, the model reproduces the file's tensors.
    """
    state_dict, prefix, source, from_timm = _read_state_dict(checkpoint, prefix, weights_only)
    from_fused = _train_form_from_fused(model, state_dict)

    expected = model.state_dict()
    as_read = dict(state_dict)  # for the error message: the classifier may be left out below
    dropped, warning = [], None
    if ignore_classifier is None:
        dropped, warning = leave_out_unfitting_classifier(state_dict, expected, "linear.", source)
    for key in list(state_dict):
        root = key.split(".", 1)[0]
        unbuilt_stage = re.fullmatch(r"stage\d", root) is not None and not hasattr(model, root)
        if (ignore_classifier and root == "linear") or (isinstance(model, MobileOne) and unbuilt_stage):
            dropped.append(key)
            del state_dict[key]
    # BatchNorm's step counter is bookkeeping; files saved without it still load.
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = expected[key]
    own = {k for k in expected if k.startswith("linear.") and (ignore_classifier or k in dropped)}  # the model's classifier kept

    missing = sorted(set(expected) - set(state_dict) - own)
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint {source} does not fit {type(model).__name__}."]
        layout = ", in timm's layout" if from_timm else ""
        lines.append(f"  The file looks like: {describe_state_dict(as_read)}{layout}.")
        lines.append(f"  The model looks like: {describe_state_dict(expected)}.")
        file_fused = any(".reparam_conv." in k for k in state_dict)
        model_fused = any(".reparam_conv." in k for k in expected)
        if file_fused and not model_fused:
            lines.append("  Hint: a fused file loads into mobileone(..., inference_mode=True).")
        elif model_fused and not file_fused:
            lines.append(
                "  Hint: load a train-form file into a train-form model and fuse it with reparameterize_model()."
            )
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_format_keys(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_format_keys(unexpected)}")
        if wrong_shape:
            lines.append(f"  {len(wrong_shape)} keys with wrong shapes: {_format_keys(wrong_shape)}")
        if from_timm:
            lines.append("  (keys are listed with Apple's names, renamed from timm's)")
        if prefix:
            lines.append(f"  (keys were read under the prefix {prefix!r})")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict({**state_dict, **{k: expected[k] for k in own}}, strict=True)
    for layer in from_fused:
        layer.from_fused = True
    if warning:
        log.warning(warning)
    return LoadReport(source=source, prefix=prefix, dropped=sorted(dropped), classifier_reinitialized=warning is not None,
                      from_fused=len(from_fused))


def _train_form_from_fused(model: nn.Module, state_dict: dict) -> list[MobileOneBlock]:
    """In ``state_dict``, in place: replace the ``<layer>.reparam_conv.*`` entries of the layers
    that are in train form in ``model`` by their train-form state; return those layers."""
    converted = []
    for name, module in model.named_modules():
        weight_key, bias_key = f"{name}.reparam_conv.weight", f"{name}.reparam_conv.bias"
        if not isinstance(module, MobileOneBlock) or module.inference_mode or weight_key not in state_dict:
            continue
        if bias_key not in state_dict:
            continue  # left to the mismatch report
        try:
            layer_state = module.train_form_state_from_fused(state_dict[weight_key], state_dict[bias_key])
        except ValueError:
            continue  # a shape mismatch: reported with the other keys
        del state_dict[weight_key], state_dict[bias_key]
        state_dict.update({f"{name}.{key}": value for key, value in layer_state.items()})
        converted.append(module)
    return converted
