"""The training loop: supervised cross-entropy plus, for CAC, lambda x the consistency loss.

One call of :func:`fit` trains one model for ``trainer.max_steps`` steps, evaluating, logging and
checkpointing as configured, and resuming from ``<state_dir>/last.pt`` when it exists (unless
``trainer.resume=restart``; see :mod:`dcc.engine.resume`). It reads in four named pieces of :class:`Trainer`:

* ``__init__`` (set-up: seeds, model, optimiser, the consistency branch) and :meth:`Trainer.restore`
  (the checkpoint: weights, optimiser, bank, per-rank RNG streams);
* :meth:`Trainer.step`: one update, ``L = L_ce + lambda L_dc (+ lambda_w L_w)``;
* :meth:`Trainer.after_step`: the interval hooks (log, evaluate, checkpoint, stop on a signal);
* :meth:`Trainer.finish`: the final evaluation, per-class IoU and the prediction grid; then, once, the held-out
  test split (``test/...``; nothing during training reads it, so no choice can depend on it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
import torch
from tqdm import tqdm

from dcc.engine import checkpoint as ckpt
from dcc import distributed as ddp
from dcc.config import Method, Precision, TrainerConfig, ViewBN, choice
from dcc.method.consistency import ConsistencyBranch
from dcc.data.build import DataBundle, eval_loader, labeled_loader, unlabeled_loader
from dcc.engine.evaluate import eval_options, evaluate
from dcc.engine.metrics import percent
from dcc.method.losses import cross_entropy
from dcc.method.models import Segmentor, build_model
from dcc.method.models.sync_bn import convert_sync_batch_norm
from dcc.engine.optim import build_optimizer, poly_scheduler
from dcc.engine.preemption import PreemptionGuard
from dcc.engine.resume import continue_command, damaged, resume_mode
from dcc.engine.tracking import TrackingLost, logging_off
from dcc.engine.trial_link import TrialLink, TrialPruned
from dcc.engine.visualize import dataset_palette, save_prediction_grid

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass



def sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Under several processes, every BN layer becomes the project's synchronized batch norm
    (:class:`dcc.method.models.sync_bn.SyncGroupedBatchNorm`): training statistics over the whole batch of all
    ranks, per view with ``trainer.view_bn=per_view``, reduced with ordinary collectives, so on gloo (CPU) as on
    NCCL (GPU). One process: the model is returned unchanged."""
    return module if ddp.world_size() == 1 else convert_sync_batch_norm(module)

@dataclass
class FitResult:
    final_miou: float
    best_miou: float
    model: Segmentor
    steps: int
    test_miou: float | None = None  # the held-out test split, evaluated once in finish (None: no test split)
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, val mIoU) of every evaluation


def _autocast(trainer: TrainerConfig, device: torch.device) -> Callable[[], Any] | None:
    p = choice(trainer.precision, Precision)
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


@dataclass
class _Progress:
    """What a checkpoint holds besides the modules' states."""

    step: int = 0  # steps are counted from 1: "step s" is the state after s updates
    best: float = -1.0
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, val mIoU) of every evaluation
    final: dict[str, Any] = field(default_factory=dict)  # the evaluation at max_steps, once reached
    # (fractions of 1 in the checkpoint, as every checkpoint before; in % wherever they leave the run)

    def history_percent(self) -> list[tuple[int, float]]:
        return [(s, percent(v)) for s, v in self.history]


class Trainer:
    """One model's training: set-up, restore, step, interval hooks, finish (see the module docstring).

    method: overrides ``loss.method`` (self-training trains its teacher and its student with ``suponly``).
    extra_labeled: ``(source, indices)`` of pseudo-labeled images, batched ``trainer.unlabeled_batch_size``
    per step beside the labeled batch (self-training's student).
    prefix: prepended to metric names (``teacher/``).
    test: evaluate ``data.test`` (if any) at the end, under ``test/`` (false: a model that is not the run's result,
    e.g. self-training's teacher).
    backbone_weights: the backbone's initial weights (a local file) when they are not ``backbone.weights``: the
    embedded dataset's pretrained backbone, resolved once where the run is set up (``dcc.engine.job``).
    """

    def __init__(self, cfg: Any, data: DataBundle, device: torch.device, tracker: Any, state_dir: Path, *,
                 prefix: str = "", method: Method | None = None,
                 extra_labeled: tuple[Any, np.ndarray] | None = None, test: bool = True,
                 backbone_weights: str | None = None) -> None:
        self.cfg, self.tc, self.data, self.device, self.tracker = cfg, cfg.trainer, data, device, tracker
        self.test = test
        self.state_dir, self.last, self.prefix, self.extra_labeled = state_dir, state_dir / "last.pt", prefix, extra_labeled
        self.ignore = cfg.dataset.ignore_index
        tc = self.tc
        method = method or choice(cfg.loss.method, Method)
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed % (2**32))
        model = build_model(cfg, backbone_weights=backbone_weights).to(device)
        model = sync_batchnorm(model)  # several processes: BN statistics over the whole batch (per view)
        ddp.seed_rank(tc.seed)  # same initial weights on every rank, then distinct dropout / sampling streams
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if tc.compile:  # in place, so state-dict keys stay those of the eager model
            model.backbone.compile()
            model.head.compile()
        self.model = model
        self.optimizer = build_optimizer(cfg.optim, model)
        self.scheduler = poly_scheduler(self.optimizer, tc.max_steps, cfg.optim.poly_power)
        # no cost when nothing is logged; decided from the config, so that every rank computes the same terms
        diagnostics = bool(tc.diagnostics) and not logging_off(cfg.logger)
        self.branch = ConsistencyBranch(
            cfg.loss, shared_bn=choice(tc.view_bn, ViewBN) is ViewBN.shared, diagnostics=diagnostics,
            num_classes=cfg.dataset.num_classes, ignore_index=self.ignore,
        ) if method is Method.cac else None
        if self.branch is not None and not self.branch.shared_bn and ddp.world_size() > 1 and device.type == "cuda":
            log.warning("%strainer.view_bn=per_view over %d GPU processes is verified on CPU (gloo) only: "
                        "benchmarks/ddp_check.py has not passed on a GPU yet (docs/several-gpus.md); "
                        "trainer.view_bn=shared avoids the question", self.prefix, ddp.world_size())
        self.autocast = _autocast(cfg.trainer, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast is not None
                                           and choice(tc.precision, Precision) is Precision.fp16)
        self.progress = _Progress()
        self.meter = _Meter()
        self.unlabeled: Iterator[dict[str, torch.Tensor]] | None = None  # opened at loss.start_step
        self.trial = None if prefix else TrialLink.from_env()  # a job of an Optuna trial: its link to the sweeper
        # opened by train(): the validation loader, the progress bar, the signal guard (preemption, time limit)
        self.val: Any = None
        self.bar: Any = None
        self.guard: PreemptionGuard | None = None

    # ------------------------------------------------------------------------------------- restore
    def restore(self) -> None:
        """Continue from ``last.pt`` (unless ``trainer.resume=restart``); every rank ends with rank 0's weights.

        A restart is :mod:`dcc.engine.resume`'s alone: the job sets the whole previous run aside before training,
        so a ``last.pt`` found here under ``restart`` would be overwritten: refused instead."""
        last = self.last
        self.state_dir.mkdir(parents=True, exist_ok=True)
        mode = resume_mode(self.cfg.trainer)
        if mode == "restart" and last.exists():
            raise ckpt.CheckpointError(f"trainer.resume=restart with {last} present: python run.py (dcc.engine.job) "
                                       "sets a previous run aside before training; a direct caller of fit() must "
                                       "move it itself")
        if ddp.is_main():
            ckpt.remove_stale_tmp(last)  # left by a write that was killed; last.pt itself is intact
        ddp.barrier()
        if mode != "restart" and last.exists():
            try:
                state = ckpt.load(last)
            except ckpt.CheckpointError as exc:
                raise damaged(last, exc) from exc
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.branch is not None and state.get("bank") is not None:
                self.branch.bank.load_state_dict(state["bank"], self.device)
            _restore_rng(state, self.tc.seed)
            self.progress = _Progress(state["step"], state["best_miou"], state["history"], state.get("final", {}))
            log.info("%sresumed from %s at step %d", self.prefix, last, self.progress.step)
        ddp.broadcast_module(self.model)

    # ---------------------------------------------------------------------------------------- step
    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One update on a labeled batch (and, for CAC from ``loss.start_step``, an unlabeled pair batch):

        ``L = L_ce + lambda L_dc (+ lambda_w L_w)`` (paper Eq. 8 and Eq. 10; lambda = ``loss.weight``,
        lambda_w = ``loss.weak_weight``; ``loss_u`` is L_dc, or the L2 alignment of ablation row I).
        """
        loss_cfg = self.cfg.loss
        with self._autocast():
            terms = {"loss_ce": cross_entropy(self.model(x).float(), y, self.ignore)}
            loss = terms["loss_ce"]
            if self.branch is not None and self.progress.step >= loss_cfg.start_step:
                terms.update({k: v.float() for k, v in self.branch(self.model, self._unlabeled_batch()).items()})
                loss = loss + loss_cfg.weight * terms["loss_u"]  # + lambda * L_dc
                if "loss_w" in terms:  # Eq. 10: + lambda_w * L_w
                    loss = loss + loss_cfg.weak_weight * terms["loss_w"]
        terms["loss"] = loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        ddp.average_gradients(self.model)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return terms

    def _autocast(self) -> ContextManager[Any]:
        return self.autocast() if self.autocast else contextlib.nullcontext()

    def _unlabeled_batch(self) -> dict[str, torch.Tensor]:
        if self.unlabeled is None:
            start = self.progress.step - self.cfg.loss.start_step
            cfg = self.cfg
            self.unlabeled = iter(unlabeled_loader(cfg.dataset, cfg.trainer, self.data.train, self.data.unlabeled,
                                                   stride=cfg.segnet.consistency_stride, context=bool(cfg.loss.context),
                                                   start_step=start, device=self.device, image_labels=self.data.image_labels,
                                                   with_masks=self.branch is not None and self.branch.diagnostics))
        return {k: v.to(self.device, non_blocking=True) for k, v in next(self.unlabeled).items()}

    def _labeled_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The labeled stream (with self-training's pseudo-labeled stream appended to each batch), on the device."""
        cfg, data, device, start = self.cfg, self.data, self.device, self.progress.step
        lab = iter(labeled_loader(cfg.dataset, cfg.trainer, data.train, data.labeled, start_step=start, device=device))
        extra = (
            iter(labeled_loader(cfg.dataset, cfg.trainer, self.extra_labeled[0], self.extra_labeled[1], start_step=start, device=device,
                                stream="pseudo", batch_size=self.tc.unlabeled_batch_size,
                                unlabeled_aug=bool(cfg.loss.get("st_unlabeled_aug"))))
            if self.extra_labeled is not None else None
        )

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            while True:
                x, y = next(lab)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if extra is not None:
                    xp, yp = next(extra)
                    x, y = torch.cat([x, xp.to(device)]), torch.cat([y, yp.to(device)])
                yield x, y

        return batches()

    # ------------------------------------------------------------------------------------ the loop
    def train(self) -> FitResult:
        tc, p = self.tc, self.progress
        self.val = eval_loader(self.cfg.dataset, self.cfg.trainer, self.data.val, self.device)
        batches = self._labeled_batches()
        self.bar = tqdm(total=tc.max_steps, initial=p.step, disable=not tc.progress or not ddp.is_main(),
                        desc=f"{self.prefix}train", mininterval=2.0, dynamic_ncols=True)
        self.model.train()
        with PreemptionGuard() as self.guard:
            while p.step < tc.max_steps:
                terms = self.step(*next(batches))
                p.step += 1
                self.meter.add(p.step, terms)
                self.bar.update(1)
                self.after_step()
        self.bar.close()
        return self.finish()

    # ------------------------------------------------------------------------------ interval hooks
    def after_step(self) -> None:
        """Log at ``log_every``, evaluate at ``eval_every``, checkpoint at ``checkpoint_every`` (all three at the
        last step); on a signal (preemption, time limit) log, checkpoint and hand the signal on."""
        tc, step = self.tc, self.progress.step
        is_last = step == tc.max_steps
        stop = self.guard.requested  # preemption / time limit: log and checkpoint now, then let the launcher requeue
        pruned = self.trial is not None and self.trial.stop_requested()  # the Optuna study pruned this trial
        if ddp.world_size() > 1:  # every rank must stop at the same step: agreed at log intervals
            stop = step % tc.log_every == 0 and ddp.any_rank(stop, self.device)
            pruned = step % tc.log_every == 0 and ddp.any_rank(pruned, self.device)
        try:
            if step % tc.log_every == 0 or step % tc.checkpoint_every == 0 or step % tc.eval_every == 0 or is_last \
                    or stop or pruned:
                self.log_losses()
            if step % tc.eval_every == 0 or is_last:
                self.validate(is_last)
        except TrackingLost as exc:  # the store is gone: keep the training done so far, then stop in one line
            raise self._tracking_lost(exc) from exc
        if step % tc.checkpoint_every == 0 or is_last or stop or pruned:
            self.save(finished=is_last)
        if pruned and not is_last:  # checkpoint kept (the same command continues it); the job ends cleanly
            if self.trial is not None and ddp.is_main():
                self.trial.report(step, self.progress.history_percent(), tc.max_steps, pruned=True)
            self.bar.close()
            at = self.trial.pruned_at(step) if self.trial is not None else step
            raise TrialPruned(at, percent(self.progress.history[-1][1]) if self.progress.history else float("nan"), step)
        if stop:
            if ddp.is_main():
                self.bar.write(f"{self.prefix}{signal.Signals(self.guard.signum).name}: checkpoint written at step "
                               f"{step} to {self.last}; continue with: {continue_command()}")
            self.bar.close()
            self.guard.hand_on()

    def _tracking_lost(self, exc: TrackingLost) -> TrackingLost:
        """Checkpoint at this step (one process: the others would wait in the collectives of a save) and say how
        to go on; the metrics of this step are not in MLflow."""
        step = self.progress.step
        if ddp.world_size() == 1:
            self.save(finished=False)
            kept = f"checkpoint of step {step} written to {self.last}"
        else:
            kept = f"the last checkpoint ({self.last}, every {self.tc.checkpoint_every} steps) is kept"
        self.bar.close()
        return TrackingLost(f"{exc} at step {step}; {kept} (this step's metrics are not in MLflow); when the store "
                            f"answers again, continue with: {continue_command()}")

    def log_losses(self) -> None:
        scalars = self.meter.flush()  # raises on a non-finite loss before anything is saved
        if scalars:
            scalars["lr"] = next(g["lr"] for g in self.optimizer.param_groups if g.get("name") == "head")  # not the backbone's
            self.tracker.log_metrics({f"{self.prefix}{'' if k.startswith('diag/') else 'train/'}{k}": v
                                      for k, v in scalars.items()}, self.progress.step)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in scalars.items() if k.startswith("loss")}, refresh=False)

    def _evaluate(self, keep: int, loader: Any = None) -> dict[str, Any]:
        ddp.average_buffers(self.model)
        return evaluate(self.model, self.val if loader is None else loader, self.cfg.dataset.num_classes, self.device,
                        ignore_index=self.ignore, autocast=self.autocast, **eval_options(self.cfg.eval), keep=keep)

    def validate(self, is_last: bool) -> None:
        p, pre = self.progress, self.prefix
        res = self._evaluate(self.tc.num_vis if is_last else 0)
        p.best = max(p.best, res["miou"])
        p.history.append((p.step, res["miou"]))
        if self.trial is not None and ddp.is_main():  # the sweeper reports it to the study as an intermediate value
            self.trial.report(p.step, p.history_percent(), self.tc.max_steps)
        self.tracker.log_metrics(
            {f"{pre}val/miou": percent(res["miou"]), f"{pre}val/pixel_acc": percent(res["pixel_acc"]),
             f"{pre}val/best_miou": percent(p.best)}
            | ({f"{pre}val/weak_map": percent(res["weak_map"])} if "weak_map" in res else {}), p.step,
        )
        if ddp.is_main():
            weak = f" weak mAP {percent(res['weak_map']):.2f}%" if "weak_map" in res else ""
            self.bar.write(f"{pre}step {p.step}: val mIoU {percent(res['miou']):.2f}% (best {percent(p.best):.2f}%) "
                           f"pixel acc {percent(res['pixel_acc']):.2f}%{weak}")
        if is_last:
            p.final = res

    def save(self, finished: bool = False) -> None:
        p = self.progress
        ddp.average_buffers(self.model)
        rngs = ddp.gather_objects(ckpt.rng_state())  # every rank's stream, so that each resumes its own
        if ddp.is_main():
            ckpt.save_atomic(
                {
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                    "bank": self.branch.bank.state_dict() if self.branch is not None else None,
                    "rng": rngs[0], "rng_ranks": rngs if len(rngs) > 1 else None, "step": p.step, "best_miou": p.best,
                    "history": p.history, "final": p.final, "finished": finished,
                },
                self.last,
            )
        ddp.barrier()  # no rank goes on (or exits on a signal) before the checkpoint is written

    # -------------------------------------------------------------------------------------- finish
    def finish(self) -> FitResult:
        """Per-class IoU, final and best mIoU, and the prediction grid of the final evaluation; then the test split."""
        cfg, p, pre = self.cfg, self.progress, self.prefix
        final = p.final or self._evaluate(self.tc.num_vis)  # none: resumed from a finished checkpoint
        names = list(cfg.dataset.class_names) or [str(i) for i in range(cfg.dataset.num_classes)]
        self.tracker.log_metrics(
            {f"{pre}val/iou/{n}": percent(v) for n, v in zip(names, final["iou"]) if not math.isnan(v)}
            | {f"{pre}val/final_miou": percent(final["miou"]), f"{pre}val/best_miou": percent(p.best)},
            p.step,
        )
        if final.get("samples") and ddp.is_main():
            grid = save_prediction_grid(final["samples"], list(cfg.dataset.mean), list(cfg.dataset.std),
                                        self.state_dir / "predictions.png",
                                        class_names=list(cfg.dataset.class_names) or None,
                                        ignore_index=cfg.dataset.ignore_index, pal=dataset_palette(cfg.dataset))
            self.tracker.log_artifact(grid, f"{pre}predictions".rstrip("/"))
        test = self.evaluate_test(names)
        return FitResult(final_miou=final["miou"], best_miou=p.best, model=self.model, steps=p.step,
                         test_miou=None if test is None else test["miou"], history=list(p.history))

    def evaluate_test(self, names: list[str]) -> dict[str, Any] | None:
        """The held-out test split, with the validation protocol, once, after the final validation evaluation:
        ``test/miou``, ``test/pixel_acc`` and ``test/iou/<class>`` (no prefix: it measures the run's result)."""
        if not self.test or self.data.test is None:
            return None
        res = self._evaluate(0, eval_loader(self.cfg.dataset, self.cfg.trainer, self.data.test, self.device))
        self.tracker.log_metrics(
            {f"test/iou/{n}": percent(v) for n, v in zip(names, res["iou"]) if not math.isnan(v)}
            | {"test/miou": percent(res["miou"]), "test/pixel_acc": percent(res["pixel_acc"])},
            self.progress.step,
        )
        if ddp.is_main():
            log.info("step %d: test mIoU %.2f%% pixel acc %.2f%% (%d held-out images, evaluated once)",
                     self.progress.step, percent(res["miou"]), percent(res["pixel_acc"]), len(self.data.test))
        return res


def fit(cfg: Any, data: DataBundle, device: torch.device, tracker: Any, state_dir: Path, *, prefix: str = "",
        method: Method | None = None, extra_labeled: tuple[Any, np.ndarray] | None = None, test: bool = True,
        backbone_weights: str | None = None) -> FitResult:
    """Train one model (see :class:`Trainer` for the keyword arguments)."""
    trainer = Trainer(cfg, data, device, tracker, state_dir, prefix=prefix, method=method, extra_labeled=extra_labeled,
                      test=test, backbone_weights=backbone_weights)
    trainer.restore()
    return trainer.train()
