"""timm backbones as multi-scale feature extractors, with local weight loading (nothing is downloaded)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
from torch import nn

from dcc.models.vgg import dilate_vgg, is_vgg

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")


class WeightsError(RuntimeError):
    pass


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj), None)
        if inner is None:
            raise WeightsError(f"{path}: no state dict found (top-level keys: {sorted(obj)[:10]})")
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def load_local_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load a torchvision- or timm-format state dict from ``path`` into ``model`` (non-strict).

    Returns ``{"missing": [...], "unexpected": [...]}`` and logs both; the classifier (``fc.*``) of an
    ImageNet checkpoint is the usual unexpected entry. Fails when no tensor matched at all, or when a
    matched key has the wrong shape (a checkpoint of another architecture).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"backbone.weights: no such file {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise WeightsError(f"backbone.weights: cannot read {path}: {exc}") from exc
    state = _unwrap_state_dict(raw, path)
    own = model.state_dict()
    # timm's features_only wrapper flattens a top-level Sequential: VGG's features.0.weight is features_0.weight there
    state = {k if k in own or k.replace(".", "_", 1) not in own else k.replace(".", "_", 1): v for k, v in state.items()}
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if shape_errors:
        raise WeightsError(f"{path}: shape mismatch for {len(shape_errors)} tensors, e.g. {shape_errors[:3]}")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if len(missing) == len([k for k in own if not k.endswith("num_batches_tracked")]):
        raise WeightsError(f"{path}: none of its {len(state)} tensors match the backbone (wrong architecture?)")
    log.info(
        "loaded %s: %d tensors, missing %d %s, unexpected %d %s",
        path, len(state) - len(result.unexpected_keys), len(missing), missing[:5],
        len(result.unexpected_keys), list(result.unexpected_keys)[:5],
    )
    return {"missing": missing, "unexpected": list(result.unexpected_keys)}


def _apply_multi_grid(model: nn.Module, multi_grid: Sequence[int], output_stride: int) -> None:
    """DeepLab multi-grid: the 3x3 convs of the last stage get dilation (32 / output_stride) x (1, 2, 4).

    ResNet family only (timm names the stage ``layer4``); other backbones are left as they are.
    """
    stage = getattr(model, "layer4", None)
    if stage is None or all(g == 1 for g in multi_grid):
        return
    for block, grid in zip(stage, multi_grid):
        conv = getattr(block, "conv2", None)
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3):
            continue
        base = max(32 // output_stride, 1)
        conv.dilation = (base * grid, base * grid)
        conv.padding = (base * grid, base * grid)


class Backbone(nn.Module):
    """A timm model with ``features_only`` at a given output stride (VGG: dilated, see :mod:`dcc.models.vgg`).

    ``forward`` returns ``(low, high)``: the stride-4 features (for the DeepLabv3+ decoder) and the
    last stage's features at ``output_stride``.
    """

    def __init__(
        self,
        name: str,
        *,
        output_stride: int,
        multi_grid: Sequence[int] = (1, 1, 1),
        weights: str | None = None,
        pretrained: bool = False,
        allow_download: bool = False,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pretrained and not allow_download:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        extra = dict(kwargs or {})
        vgg = is_vgg(name)
        if vgg:  # timm's VGG has no output_stride: stride-4 tap and the last map, dilated below
            extra.setdefault("out_indices", (2, 5))
        elif output_stride != 32:
            extra["output_stride"] = output_stride
        try:
            self.body = timm.create_model(name, features_only=True, pretrained=pretrained, **extra)
        except RuntimeError as exc:
            if pretrained:
                raise WeightsError(
                    f"backbone.pretrained=true: timm could not load {name!r} weights from its local cache "
                    f"({exc}); set backbone.weights=PATH to a local file, or backbone.allow_download=true"
                ) from exc
            raise
        _apply_multi_grid(self.body, multi_grid, output_stride)
        reached = dilate_vgg(self.body, output_stride) if vgg else None
        if weights:
            self.weights_report = load_local_weights(self.body, weights)
        reductions = self.body.feature_info.reduction()
        channels = self.body.feature_info.channels()
        low = [i for i, r in enumerate(reductions) if r == 4]
        self.low_index = low[0] if low else 0
        self.high_index = len(reductions) - 1
        self.low_channels = channels[self.low_index]
        self.high_channels = channels[self.high_index]
        self.output_stride = reached or reductions[self.high_index]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        return feats[self.low_index], feats[self.high_index]
