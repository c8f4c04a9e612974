"""``task=predict``: colour-palette PNG masks of a checkpoint's predictions over a folder or the validation set.

    python run.py task=predict experiment=voc_deeplabv3plus_r50 predict.checkpoint=runs/.../last.pt \
        predict.input=/photos predict.output=masks        # or without predict.input: the val set

The model is built from the composed config (segnet, backbone, dataset.num_classes must be the run's)
and predicts with the ``eval`` group's mode (whole or slide). Each PNG is a palette image whose pixel
values are the class indices (VOC colours), so it reads back as indices like the VOC labels.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from dcc.data.files import DataError, read_image
from dcc.distributed import resolve_device
from dcc.engine.evaluate import eval_options, predict
from dcc.engine.visualize import dataset_palette, palette

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def save_palette_png(mask: np.ndarray, path: Path, pal: np.ndarray | None = None) -> Path:
    """Write class indices ``[H, W]`` uint8 as a palette PNG (colours ``pal`` [256, 3], default the VOC colour map)."""
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    im.putpalette((palette() if pal is None else pal).reshape(-1).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def load_model(cfg: Any, checkpoint: str | Path, device: torch.device) -> torch.nn.Module:
    """The configured model with the checkpoint's weights (no ImageNet weights are read: the checkpoint has all)."""
    from dcc.engine.checkpoint import CheckpointError, load
    from dcc.method.models import build_model

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"predict.checkpoint: no such file {path}")
    cfg = copy.deepcopy(cfg)
    cfg.backbone.weights, cfg.backbone.pretrained = None, False
    model = build_model(cfg)
    state = load(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    # Training-only heads (the projector Phi, the image-level classifier C_w) play no part in a prediction:
    # a checkpoint and a config may differ in them (e.g. a weakly run's checkpoint with the default loss).
    aux = ("projector.", "weak_classifier.")
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(aux)}
    state |= {k: v for k, v in own.items() if k.startswith(aux) and k not in state}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path} does not fit the configured model (segnet={cfg.segnet.name}, backbone={cfg.backbone.name}, "
            f"dataset.num_classes={cfg.dataset.num_classes}; use the run's config): {str(exc)[:500]}"
        ) from exc
    return model.to(device).eval()


def _folder_items(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"predict.input: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    for p in paths:
        yield str(p.relative_to(folder).with_suffix("")), read_image(p)


def _val_items(cfg: Any) -> Iterator[tuple[str, np.ndarray]]:
    from dcc.data.build import load_sources

    _, val = load_sources(cfg.dataset)
    ids = getattr(val, "ids", None)
    for i in range(len(val)):
        image = val.read_image(i) if hasattr(val, "read_image") else val.load(i)[0]
        yield (ids[i] if ids is not None else f"{i:06d}"), image


def run_predict(cfg: Any, launch_dir: Path | None = None) -> list[Path]:
    """Predict every image of ``predict.input`` (or the validation set) and write ``<output>/<name>.png``."""
    pc = cfg.predict
    if pc.checkpoint is None:
        raise ValueError("task=predict needs predict.checkpoint=PATH (a run's last.pt)")
    launch_dir = (launch_dir or Path.cwd()).resolve()
    out = Path(pc.output).expanduser()
    out = out if out.is_absolute() else launch_dir / out
    device = resolve_device(str(cfg.trainer.device))
    model = load_model(cfg, pc.checkpoint, device)
    options = eval_options(cfg.eval)
    mean = torch.tensor(list(cfg.dataset.mean), device=device).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.dataset.std), device=device).view(1, 3, 1, 1)
    if pc.input:
        folder = Path(pc.input).expanduser()
        if not folder.is_dir():
            raise DataError(f"predict.input: no such folder {folder}")
        items = _folder_items(folder)
    else:
        items = _val_items(cfg)
    written, pal = [], dataset_palette(cfg.dataset)
    with torch.no_grad():
        for name, image in items:
            x = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float().div(255.0)
            pred = predict(model, (x - mean) / std, **options).argmax(1)[0]
            written.append(save_palette_png(pred.to(torch.uint8).cpu().numpy(), out / f"{name}.png", pal))
    log.info("wrote %d masks to %s", len(written), out)
    print(f"wrote {len(written)} palette masks to {out} ({options['mode']} mode)", flush=True)
    return written
