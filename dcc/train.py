"""The training loop: supervised cross-entropy plus, for CAC, lambda x the consistency loss.

One call of :func:`fit` trains one model for ``trainer.max_steps`` steps, evaluating, logging and
checkpointing as configured, and resuming from ``<state_dir>/last.pt`` when it exists (unless
``trainer.resume=restart``; see :mod:`dcc.resume`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from dcc import checkpoint as ckpt
from dcc import distributed as ddp
from dcc.config import Method, Precision, ViewBN
from dcc.consistency import ConsistencyBranch
from dcc.data.build import DataBundle, eval_loader, labeled_loader, unlabeled_loader
from dcc.data.digits_pretrain import embedded_backbone_weights
from dcc.evaluate import eval_options, evaluate
from dcc.losses import cross_entropy
from dcc.models import Segmentor, build_model
from dcc.optim import build_optimizer, poly_scheduler
from dcc.preemption import PreemptionGuard
from dcc.resume import continue_command, resume_mode
from dcc.tracking import NullTracker
from dcc.visualize import dataset_palette, save_prediction_grid

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class FitResult:
    final_miou: float
    best_miou: float
    final: dict[str, Any]
    model: Segmentor
    state_dir: Path
    steps: int
    history: list[tuple[int, float]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _method(cfg: Any) -> Method:
    m = cfg.loss.method
    return m if isinstance(m, Method) else Method[str(m)]


def _autocast(cfg: Any, device: torch.device) -> Callable[[], Any] | None:
    p = cfg.trainer.precision
    p = p if isinstance(p, Precision) else Precision[str(p)]
    if p is Precision.fp32:
        return None
    dtype = torch.bfloat16 if p is Precision.bf16 else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


class _Meter:
    """Keeps per-step loss tensors on the device; one sync per log interval, where non-finite values are caught."""

    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}
        self.steps: list[int] = []

    def add(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        self.steps.append(step)
        for k, v in terms.items():
            self.values.setdefault(k, []).append(v.detach().float())

    def flush(self) -> dict[str, float]:
        out = {}
        names = list(self.values)
        # one transfer for all terms; under several processes one all_reduce: the mean over ranks
        flat = torch.cat([torch.stack(self.values[n]) for n in names]) if names else torch.zeros(0)
        per_name = ddp.mean_over_ranks(flat).cpu().split([len(self.values[n]) for n in names])
        for name, vals, stacked in zip(names, self.values.values(), per_name):
            bad = ~torch.isfinite(stacked)
            if bool(bad.any()):
                first = self.steps[-len(vals):][int(bad.nonzero()[0, 0])]
                raise NonFiniteLossError(
                    f"non-finite {name} ({float(stacked[bad][0])}) at step {first}; "
                    "the last good checkpoint is kept (lower the learning rate or loss.weight, or use trainer.precision=fp32)"
                )
            out[name] = float(stacked.mean())
        self.values.clear()
        self.steps.clear()
        return out


def _restore_rng(state: dict[str, Any], seed: int) -> None:
    """This rank's RNG state from a checkpoint; one written by another number of processes gives rank 0's
    state, then distinct streams per rank."""
    states = state.get("rng_ranks") or [state["rng"]]
    if len(states) == ddp.world_size():
        ckpt.set_rng_state(states[ddp.rank()])
    else:
        ckpt.set_rng_state(state["rng"])
        ddp.seed_rank(seed + state["step"])


def fit(
    cfg: Any,
    data: DataBundle,
    device: torch.device,
    tracker: Any,
    state_dir: Path,
    *,
    prefix: str = "",
    method: Method | None = None,
    extra_labeled: tuple[Any, np.ndarray] | None = None,
    class_names: list[str] | None = None,
) -> FitResult:
    """Train one model.

    method: overrides ``loss.method`` (self-training trains its teacher with ``suponly``).
    extra_labeled: ``(source, indices)`` of pseudo-labeled images, batched ``trainer.unlabeled_batch_size``
    per step beside the labeled batch (self-training's student).
    prefix: prepended to metric names (``teacher/``).
    """
    tc = cfg.trainer
    method = method or _method(cfg)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed % (2**32))
    model = build_model(cfg, backbone_weights=embedded_backbone_weights(cfg)).to(device)
    if method is not Method.cac and model.projector is not None:
        model.projector = None
    model = ddp.sync_batchnorm(model, device)  # several processes on GPUs: BN statistics over the whole batch
    ddp.seed_rank(tc.seed)  # same initial weights on every rank, then distinct dropout / sampling streams
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tc.compile:  # in place, so state-dict keys stay those of the eager model
        model.backbone.compile()
        model.head.compile()
    optimizer = build_optimizer(cfg, model)
    scheduler = poly_scheduler(optimizer, tc.max_steps, cfg.optim.poly_power)
    diagnostics = bool(tc.diagnostics) and not isinstance(tracker, NullTracker)  # no cost when nothing is logged
    branch = ConsistencyBranch(
        cfg.loss, shared_bn=ViewBN[str(tc.view_bn)] is ViewBN.shared, diagnostics=diagnostics,
        num_classes=cfg.dataset.num_classes, ignore_index=cfg.dataset.ignore_index,
    ) if method is Method.cac else None
    autocast = _autocast(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast is not None and str(tc.precision).endswith("fp16"))

    state_dir.mkdir(parents=True, exist_ok=True)
    last = state_dir / "last.pt"
    step, best, history = 0, -1.0, []
    final: dict[str, Any] = {}
    mode = resume_mode(cfg)
    if ddp.is_main():
        ckpt.remove_stale_tmp(last)  # left by a write that was killed; last.pt itself is intact
        if mode == "restart" and last.exists():  # dcc.app moves a whole run aside first; this is for direct callers
            aside = last.with_name(f"last.pt.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            last.rename(aside)
            log.warning("trainer.resume=restart: moved %s to %s", last, aside)
    ddp.barrier()
    if mode != "restart" and last.exists():
        state = ckpt.load(last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if branch is not None and state.get("bank") is not None:
            branch.bank.load_state_dict(state["bank"], device)
        _restore_rng(state, tc.seed)
        step, best, history = state["step"], state["best_miou"], state["history"]
        final = state.get("final", {})
        log.info("%sresumed from %s at step %d", prefix, last, step)
    ddp.broadcast_module(model)

    ignore = cfg.dataset.ignore_index
    val = eval_loader(cfg, data.val, device)
    lab = iter(labeled_loader(cfg, data.train, data.labeled, start_step=step, device=device))
    extra = (
        iter(labeled_loader(cfg, extra_labeled[0], extra_labeled[1], start_step=step, device=device,
                            stream="pseudo", batch_size=tc.unlabeled_batch_size))
        if extra_labeled is not None else None
    )
    unl = None
    start_u = cfg.loss.start_step
    meter = _Meter()
    bar = tqdm(total=tc.max_steps, initial=step, disable=not tc.progress or not ddp.is_main(), desc=f"{prefix}train", mininterval=2.0,
               dynamic_ncols=True)
    model.train()
    guard = PreemptionGuard().__enter__()

    def save(finished: bool = False) -> None:
        ddp.average_buffers(model)
        rngs = ddp.gather_objects(ckpt.rng_state())  # every rank's stream, so that each resumes its own
        if ddp.is_main():
            ckpt.save_atomic(
                {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "bank": branch.bank.state_dict() if branch is not None else None,
                    "rng": rngs[0], "rng_ranks": rngs if len(rngs) > 1 else None, "step": step, "best_miou": best,
                    "history": history, "final": final, "finished": finished,
                },
                last,
            )
        ddp.barrier()  # no rank goes on (or exits on a signal) before the checkpoint is written

    try:
        while step < tc.max_steps:
            x, y = next(lab)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if extra is not None:
                xp, yp = next(extra)
                x, y = torch.cat([x, xp.to(device)]), torch.cat([y, yp.to(device)])
            with autocast() if autocast else contextlib.nullcontext():
                terms = {"loss_ce": cross_entropy(model(x).float(), y, ignore)}
                total = terms["loss_ce"]
                if branch is not None and step >= start_u:
                    if unl is None:
                        unl = iter(unlabeled_loader(cfg, data.train, data.unlabeled, start_step=step - start_u,
                                                    device=device, image_labels=data.image_labels,
                                                    with_masks=branch.diagnostics))
                    batch = {k: v.to(device, non_blocking=True) for k, v in next(unl).items()}
                    terms.update({k: v.float() for k, v in branch(model, batch).items()})
                    total = total + cfg.loss.weight * terms["loss_u"]
                    if "loss_w" in terms:  # Eq. 10: + lambda_w * L_w
                        total = total + cfg.loss.weak_weight * terms["loss_w"]
            terms["loss"] = total
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            ddp.average_gradients(model)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1  # steps are counted from 1: "step s" is the state after s updates
            meter.add(step, terms)
            bar.update(1)

            is_last = step == tc.max_steps
            stop = guard.requested  # preemption / time limit: log and checkpoint now, then let the launcher requeue
            if ddp.world_size() > 1:  # every rank must stop at the same step: agreed at log intervals
                stop = step % tc.log_every == 0 and ddp.any_rank(stop, device)
            if step % tc.log_every == 0 or step % tc.checkpoint_every == 0 or step % tc.eval_every == 0 or is_last or stop:
                scalars = meter.flush()  # raises on a non-finite loss before anything is saved
                if scalars:
                    scalars["lr"] = optimizer.param_groups[1]["lr"]
                    tracker.log_metrics({f"{prefix}{'' if k.startswith('diag/') else 'train/'}{k}": v
                                         for k, v in scalars.items()}, step)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in scalars.items() if k.startswith("loss")}, refresh=False)
            if step % tc.eval_every == 0 or is_last:
                ddp.average_buffers(model)
                res = evaluate(model, val, cfg.dataset.num_classes, device, ignore_index=ignore, autocast=autocast, **eval_options(cfg),
                               keep=tc.num_vis if is_last else 0)
                best = max(best, res["miou"])
                history.append((step, res["miou"]))
                tracker.log_metrics(
                    {f"{prefix}val/miou": res["miou"], f"{prefix}val/pixel_acc": res["pixel_acc"],
                     f"{prefix}val/best_miou": best}
                    | ({f"{prefix}val/weak_map": res["weak_map"]} if "weak_map" in res else {}), step,
                )
                if ddp.is_main():
                    weak = f" weak mAP {res['weak_map']:.4f}" if "weak_map" in res else ""
                    bar.write(f"{prefix}step {step}: val mIoU {res['miou']:.4f} (best {best:.4f}) "
                              f"pixel acc {res['pixel_acc']:.4f}{weak}")
                if is_last:
                    final = res
            if step % tc.checkpoint_every == 0 or is_last or stop:
                save(finished=is_last)
            if stop:
                if ddp.is_main():
                    bar.write(f"{prefix}{signal.Signals(guard.signum).name}: checkpoint written at step {step} to {last}; "
                              f"continue with: {continue_command()}")
                bar.close()
                guard.hand_on()
    finally:
        guard.__exit__()
    bar.close()

    if not final:  # resumed from a finished checkpoint
        ddp.average_buffers(model)
        final = evaluate(model, val, cfg.dataset.num_classes, device, ignore_index=ignore, autocast=autocast, **eval_options(cfg),
                         keep=tc.num_vis)
    names = class_names or list(cfg.dataset.class_names) or [str(i) for i in range(cfg.dataset.num_classes)]
    tracker.log_metrics(
        {f"{prefix}val/iou/{n}": v for n, v in zip(names, final["iou"]) if not math.isnan(v)}
        | {f"{prefix}val/final_miou": final["miou"], f"{prefix}val/best_miou": best},
        step,
    )
    if final.get("samples") and ddp.is_main():
        grid = save_prediction_grid(final["samples"], list(cfg.dataset.mean), list(cfg.dataset.std),
                                    state_dir / "predictions.png",
                                    class_names=class_names or list(cfg.dataset.class_names) or None,
                                    ignore_index=cfg.dataset.ignore_index, pal=dataset_palette(cfg))
        tracker.log_artifact(grid, f"{prefix}predictions".rstrip("/"))
    return FitResult(final_miou=final["miou"], best_miou=best, final=final, model=model, state_dir=state_dir,
                     steps=step, history=history)
