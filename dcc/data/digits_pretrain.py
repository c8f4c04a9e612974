"""The embedded dataset's "ImageNet": a backbone pretrained on digit classification.

The paper's backbones start from ImageNet weights and train at a tenth of the head's learning rate. The
embedded benchmark has the same shape: before its first run, the timm backbone named by ``backbone.name``
learns 10-way digit classification on single-digit images rendered (with the scene generator's
backgrounds, bold strokes and colours) from the **pretraining pool** of MNIST samples only
(:func:`dcc.data.digits.digit_pools`), so no digit that appears in a training or validation scene is ever
seen here. The classifier's weights (timm format, head removed) are cached next to the scenes, keyed by
every parameter below and the backbone, and loaded through the ordinary local-weights path
(``backbone.weights``). Accuracy is measured on images of held-out pretraining-pool digits.

Rebuild (or build ahead of time) with ``python -m dcc.data.digits_pretrain [--force] [overrides...]``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dcc.config import BackboneConfig, DatasetConfig, plain
from dcc.data.digits import cache_path, digit_pools, load_mnist, render_scenes
from dcc.locks import file_lock

log = logging.getLogger(__name__)

# timm's feature-extraction options: they pick which stages the segmentation backbone taps (out_indices=[1, 3]
# drops the last stage), not the classifier that is pretrained, so they neither reach it nor key its cache.
_FEATURE_KWARGS = ("out_indices", "feature_cls", "feature_cfg", "output_stride")
_HOLDOUT = 200  # pretraining-pool digits kept out of training, for the accuracy figure
_TEST_IMAGES = 1000
_PARTIAL_EVERY = 50  # steps between saves of an unfinished pretraining (a killed run continues from there)
# The weights depend on torch's thread count (the order of float sums; 600 steps turn that into different weights):
# the pretraining always runs on one thread, so that the cached file is the same whichever process builds it (a
# 2-thread `python run.py` or a 1-thread benchmark job). One thread: the file every documented benchmark used.
_THREADS = 1


def pretrain_params(ds: DatasetConfig, bb: BackboneConfig) -> dict[str, Any]:
    """Everything the cached weights depend on: the digits' pretraining recipe and the backbone."""
    pc, sc = ds.scenes.pretrain, ds.scenes
    return {
        "backbone": str(bb.name), "kwargs": {str(k): v for k, v in plain(bb.kwargs).items() if k not in _FEATURE_KWARGS},
        "steps": int(pc.steps), "batch_size": int(pc.batch_size), "lr": float(pc.lr),
        "num_images": int(pc.num_images), "image_size": int(pc.image_size),
        "digit_size": [int(v) for v in pc.digit_size], "stroke": int(sc.stroke), "seed": int(sc.seed),
        "mean": [float(v) for v in ds.mean], "std": [float(v) for v in ds.std],
        "threads": _THREADS,  # in the key, so that a file an earlier release built on other threads is rebuilt
    }


def weights_path(ds: DatasetConfig, bb: BackboneConfig) -> Path:
    return cache_path(Path(ds.root).expanduser() / "digits", "pretrained_backbone", pretrain_params(ds, bb), ".pt")


def _render(rng: np.random.Generator, pool: np.ndarray, count: int, p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    images, _, ids = render_scenes(rng, pool, num_scenes=count, image_size=p["image_size"], digits_per_image=(1, 1),
                                   digit_size=tuple(p["digit_size"]), stroke=p["stroke"], max_overlap=1.0)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = torch.tensor(p["mean"]).view(1, 3, 1, 1), torch.tensor(p["std"]).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(load_mnist()[1][ids])


def _classifier(name: str, kwargs: dict[str, Any], seed: int) -> torch.nn.Module:
    """timm model ``name`` with a 10-way head. Models with a fixed input size (ViTs: 224 px) are asked for a
    dynamic one, as the segmentation backbone builds them, and to pad images to whole patches (DINOv2's 14-px
    patches do not divide 48 px), so that they take the pretraining's small images and their weights (position
    embeddings included) load into that backbone unchanged."""
    import timm

    torch.manual_seed(seed)
    try:
        return timm.create_model(name, num_classes=10, **({"dynamic_img_size": True, "dynamic_img_pad": True} | kwargs))
    except TypeError:  # a model without the option (CNNs): their input size is free anyway
        torch.manual_seed(seed)
        return timm.create_model(name, num_classes=10, **kwargs)


def _save_atomic(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed over it: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_partial(path: Path | None, p: dict[str, Any]) -> dict[str, Any] | None:
    """The state of an interrupted pretraining with the same parameters, or None."""
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - a damaged partial file: start over (it is only a cache)
        return None
    return state if state.get("params") == p else None


def _eta(done: int, total: int, seconds: float) -> str:
    left = seconds / max(done, 1) * (total - done)
    return f"about {left / 60:.1f} min left" if left >= 90 else f"about {left:.0f} s left"


def pretrain(p: dict[str, Any], partial: Path | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the classifier; returns (backbone state dict without the head, {"accuracy", "seconds"}).

    With ``partial``, the state is saved there every :data:`_PARTIAL_EVERY` steps and an interrupted pretraining
    with the same parameters continues from it (the same result as an uninterrupted one). It runs on
    ``p["threads"]`` torch threads, whatever the caller's, and gives the caller's back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(p["threads"])
    try:
        return _pretrain(p, partial)
    finally:
        torch.set_num_threads(threads)


def _pretrain(p: dict[str, Any], partial: Path | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    start = time.perf_counter()
    pool = digit_pools(p["seed"])["pretrain"]
    train_seq, test_seq, init_seq = np.random.SeedSequence([p["seed"], 0x7072]).spawn(3)
    x, y = _render(np.random.default_rng(train_seq), pool[_HOLDOUT:], p["num_images"], p)
    xt, yt = _render(np.random.default_rng(test_seq), pool[:_HOLDOUT], min(_TEST_IMAGES, p["num_images"]), p)  # tiny test budgets: as many as trained on
    gen = torch.Generator().manual_seed(int(init_seq.generate_state(1)[0]))
    with torch.random.fork_rng():
        model = _classifier(p["backbone"], p["kwargs"], int(init_seq.generate_state(2)[1]))
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p["lr"], total_steps=max(p["steps"], 1))
    first, spent = 0, 0.0
    if (state := _load_partial(partial, p)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        first, spent = int(state["step"]), float(state["seconds"])
        print(f"pretraining: continuing from step {first} of {p['steps']} ({partial})", file=sys.stderr, flush=True)
    model.train()
    loop_start = time.perf_counter()
    for step in range(first + 1, p["steps"] + 1):
        idx = torch.randint(len(x), (p["batch_size"],), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step - first == 10 or step % 100 == 0 and step < p["steps"]:
            print(f"pretraining: step {step} of {p['steps']}, "
                  f"{_eta(step - first, p['steps'] - first, time.perf_counter() - loop_start)}",
                  file=sys.stderr, flush=True)
        if partial is not None and step % _PARTIAL_EVERY == 0 and step < p["steps"]:
            _save_atomic(partial, {"params": p, "step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                                    "sched": sched.state_dict(), "gen": gen.get_state(),
                                    "seconds": spent + time.perf_counter() - start})
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in xt.split(250)])
    accuracy = float((pred == yt).float().mean())
    model.reset_classifier(0)
    return model.state_dict(), {"accuracy": accuracy, "seconds": spent + time.perf_counter() - start}


def ensure_pretrained_backbone(ds: DatasetConfig, bb: BackboneConfig, *, force: bool = False) -> Path:
    """The cached weights file of this backbone on these digits, trained first if missing (or if ``force``)."""
    path = weights_path(ds, bb)
    if path.exists() and not force:
        return path
    with file_lock(path.with_suffix(".lock")):  # several processes of one run, or parallel sweep jobs: one builds
        if path.exists() and not force:
            return path
        return _build(pretrain_params(ds, bb), path)


def _build(p: dict[str, Any], path: Path) -> Path:
    print(f"pretraining {p['backbone']} on digit classification, once for this backbone ({p['steps']} steps, "
          f"pretraining pool only; cached in {path}; a killed run continues it). Shorter: "
          f"dataset.scenes.pretrain.steps=N; none: dataset.scenes.pretrain.steps=0 (random init) or "
          "backbone.weights=PATH", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    state, info = pretrain(p, partial)
    _save_atomic(path, state)
    path.with_suffix(".json").write_text(json.dumps(p | info, indent=1))
    partial.unlink(missing_ok=True)  # the finished weights replace it
    print(f"pretrained backbone: held-out digit accuracy {100 * info['accuracy']:.1f}% in {info['seconds']:.0f} s",
          file=sys.stderr, flush=True)
    return path


def pretrained_info(ds: DatasetConfig, bb: BackboneConfig) -> dict[str, Any] | None:
    """Accuracy and time recorded when the cached weights were built (None when not built)."""
    meta = weights_path(ds, bb).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.exists() else None


def embedded_backbone_weights(ds: DatasetConfig, bb: BackboneConfig) -> str | None:
    """``backbone.weights`` for this run: the user's file if given, else (embedded dataset with
    ``dataset.scenes.pretrain.steps > 0``) the cached digit-pretrained backbone, built on first use."""
    if bb.weights or str(ds.name) != "digits" or ds.scenes.pretrain.steps <= 0:
        return bb.weights
    return str(ensure_pretrained_backbone(ds, bb))


def main(argv: list[str] | None = None) -> None:
    """``python -m dcc.data.digits_pretrain [--force] [overrides...]``: build (or rebuild) the cached backbone."""
    from hydra import compose, initialize_config_dir

    from dcc.config import quote_split_overrides, register_configs

    args = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in args
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=quote_split_overrides([a for a in args if a != "--force"]))
    path = ensure_pretrained_backbone(cfg.dataset, cfg.backbone, force=force)
    info = pretrained_info(cfg.dataset, cfg.backbone) or {}
    print(f"{path}\nheld-out accuracy {100 * info.get('accuracy', math.nan):.1f}%, built in {info.get('seconds', math.nan):.0f} s")


if __name__ == "__main__":
    main()
