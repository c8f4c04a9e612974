"""Backbone weights from a local file (``backbone.weights``): the state dict found inside common wrappers,
matched to the model by name and shape, with one message naming the file when it cannot be used."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
_PREFIXES = ("module.", "backbone.", "encoder.", "model.")


class WeightsError(RuntimeError):
    pass


@contextlib.contextmanager
def hub_offline(active: bool) -> Iterator[None]:
    """While ``active``: the Hugging Face Hub answers from its local cache only (timm's ``pretrained=True`` then
    fails at once instead of trying the network), for this call only. The hub reads ``HF_HUB_OFFLINE`` once, when
    it is imported (timm imports it), so setting the variable later does nothing in this process and would
    only leak into child processes: its module switch is set and restored instead."""
    if not active:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


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


def load_local_weights(
    model: nn.Module, path: str | os.PathLike,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, list[str]]:
    """Load a torchvision- or timm-format state dict from ``path`` (``.pth``/``.pt``/``.bin``, or ``.safetensors``)
    into ``model`` (non-strict); ``convert`` rewrites the unwrapped state dict first (ViT: timm's filter).

    Returns ``{"missing": [...], "unexpected": [...]}`` and logs both; the classifier (``fc.*``) of an
    ImageNet checkpoint is the usual unexpected entry. Fails when no tensor matched at all, or when a
    matched key has the wrong shape (a checkpoint of another architecture).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"backbone.weights: no such file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise WeightsError(f"backbone.weights: cannot read {path}: {exc}") from exc
    state = _unwrap_state_dict(raw, path)
    if convert is not None:
        state = convert(state)
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
