"""How a run is named: its MLflow run name and its directory (the hash of the config that decides its result)."""

from __future__ import annotations

import hashlib
import json
import os
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dcc.config import LossConfig, Method, choice, result_neutral
from dcc.engine.tracking import SWEPT_KEYS_ENV, flatten


# read by self-training only (dcc/engine/selftrain.py)
ST_ONLY_KEYS = ("teacher_checkpoint", "st_threshold", "st_unlabeled_aug")


def short(value: str) -> str:
    """A swept value for display: long floats (Optuna's) to 4 significant digits."""
    try:
        return f"{float(value):.4g}" if len(value) > 6 and "." in value else value
    except ValueError:
        return value


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python (enums as their names)."""
    def conv(v: Any) -> Any:
        if isinstance(v, Enum):
            return v.name
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return conv(OmegaConf.to_container(cfg, resolve=True))


def _dir_stem(cfg: DictConfig) -> str:
    return f"{cfg.loss.preset}-{cfg.split.name}-s{cfg.trainer.seed}"


def swept_values(cfg: DictConfig) -> list[tuple[str, str]]:
    """``(key, value)`` of this job's overrides that its sweep varies (keys from :data:`SWEPT_KEYS_ENV`, set by
    the sweep callback); empty outside a sweep."""
    keys = [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k]
    if not keys:
        return []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not under Hydra
        return []
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in keys and key not in _NAMED_KEYS:
            out.append((key, value.strip("'\"")))
    return out


_NAMED_KEYS = ("loss", "loss.preset", "split", "split.name", "backbone", "backbone.name", "trainer.seed")


def run_name(cfg: DictConfig) -> str:
    """The MLflow run name: preset, split, backbone, seed and the values the sweep varies
    (``ablation_viii-1_8-resnet50-s42-weight=0.3``)."""
    name = f"{cfg.loss.preset}-{cfg.split.name}-{cfg.backbone.name}-s{cfg.trainer.seed}"
    for key, value in swept_values(cfg):
        group = "." not in key  # a config group (segnet=pspnet): its option says it all
        name += f"-{short(value)}" if group else f"-{key.rsplit('.', 1)[-1]}={short(value)}"
    return name


def run_dir_for(cfg: DictConfig, launch_dir: Path) -> Path:
    """``<runs_root>/<experiment>/<preset>-<split>-s<seed>-<hash of the config without the result-neutral keys>``.

    The keys of :data:`dcc.config.RESULT_NEUTRAL_KEYS` (logging, workers, devices, ...) are left out of the hash;
    self-training's own keys (:data:`ST_ONLY_KEYS`) count as their defaults in any other method's hash, so that a
    sweep ``loss=suponly,st loss.st_threshold=0.7`` meets the SupOnly run it already has.
    ``dataset.root`` is one of them (VOC mounted elsewhere is the same data), except where the root *is* the
    data: for ``dataset=folder`` the hash takes the data's identity (:func:`dcc.data.folder.fingerprint`)."""
    flat = {k: v for k, v in flatten(plain_config(cfg)).items() if not result_neutral(k)}
    if choice(cfg.loss.method, Method) is not Method.st:  # keys only self-training reads: hashed as their defaults
        defaults = LossConfig()
        for key in ST_ONLY_KEYS:
            if f"loss/{key}" in flat:
                flat[f"loss/{key}"] = getattr(defaults, key)
    identity = data_identity(cfg)
    if identity is not None:
        flat["dataset/identity"] = identity
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:10]
    root = Path(cfg.trainer.runs_root)
    root = root if root.is_absolute() else launch_dir / root
    return root / str(cfg.logger.experiment) / f"{_dir_stem(cfg)}-{digest}"


def data_identity(cfg: DictConfig) -> str | None:
    """What identifies the data beyond the hashed config: a folder dataset's fingerprint (root and file lists);
    None where the config says it all (the embedded scenes: their parameters; VOC/Cityscapes: the same data
    wherever they are mounted)."""
    if str(cfg.dataset.name) != "folder" or cfg.dataset.root in (None, ""):
        return None
    from dcc.data.folder import fingerprint

    return fingerprint(cfg.dataset.root)
