"""What ``run.py`` does with a composed config: validate, then summarise or train and report."""

from __future__ import annotations

import hashlib
import json
import logging
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dcc import distributed as ddp
from dcc.config import Method, validate
from dcc.preemption import requeued
from dcc.tracking import NullTracker, flatten, git_commit, make_tracker

log = logging.getLogger(__name__)

# Keys that do not change what a run computes: left out of the run directory's hash.
VOLATILE_KEYS = (
    "task", "predict", "logger", "dataset/root", "trainer/resume", "trainer/num_workers", "trainer/progress",
    "trainer/log_every", "trainer/checkpoint_every", "trainer/eval_every", "trainer/eval_batch_size",
    "trainer/num_vis", "trainer/device", "trainer/runs_root", "trainer/threads",
    # The number of processes does not change what is computed, by design: the total batch, the data stream
    # and its augmentation, the loss normalisation and the negative bank are those of one process (see
    # dcc/distributed.py), so a run may resume on another number of GPUs from the same directory.
    "trainer/devices", "trainer/nodes", "trainer/dist_backend",
)


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


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.loss.preset}-{cfg.split.name}-s{cfg.trainer.seed}"


def run_dir_for(cfg: DictConfig, launch_dir: Path) -> Path:
    """``<runs_root>/<experiment>/<preset>-<split>-s<seed>-<hash of the config without volatile keys>``."""
    flat = {k: v for k, v in flatten(plain_config(cfg)).items()
            if not any(k == p or k.startswith(p + "/") for p in VOLATILE_KEYS)}
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:10]
    root = Path(cfg.trainer.runs_root)
    root = root if root.is_absolute() else launch_dir / root
    return root / str(cfg.logger.experiment) / f"{run_name(cfg)}-{digest}"


def summary(cfg: DictConfig) -> str:
    from dcc.models import build_model

    counts = build_model(cfg).param_counts()
    text = f"params: total={counts['total']} backbone={counts['backbone']} projector={counts['projector']}"
    return text + (f" weak_classifier={counts['weak_classifier']}" if counts["weak_classifier"] else "")


def _tags(cfg: DictConfig, launch_dir: Path) -> dict[str, str]:
    plain = plain_config(cfg)
    return {
        "dataset": plain["dataset"]["name"], "split": plain["split"]["name"], "segnet": plain["segnet"]["name"],
        "backbone": plain["backbone"]["name"], "loss": plain["loss"]["preset"], "method": plain["loss"]["method"],
        "seed": str(plain["trainer"]["seed"]), "git_commit": git_commit(launch_dir),
    }


def run(cfg: DictConfig, launch_dir: Path | None = None) -> float:
    """Validate ``cfg``; print the parameter summary or train. Returns the final validation mIoU."""
    validate(cfg)
    launch_dir = (launch_dir or Path.cwd()).resolve()
    if str(cfg.task) == "summary":
        print(summary(cfg), flush=True)
        return 0.0
    if str(cfg.task) == "predict":
        from dcc.predict import run_predict

        run_predict(cfg, launch_dir)
        return 0.0

    from dcc.train import resolve_device

    if ddp.requested(cfg) > 1 and not ddp.launched():
        if cfg.trainer.nodes > 1:
            raise ValueError(f"trainer.nodes={cfg.trainer.nodes} needs a launcher that starts the processes on every "
                             "machine: hydra/launcher=slurm, or torchrun on each node")
        # One machine, no launcher: start trainer.devices processes, each of which runs this function.
        return ddp.spawn(run, cfg, launch_dir, nprocs=cfg.trainer.devices)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    with ddp.process_group(cfg, resolve_device) as device:
        return _train(cfg, launch_dir, device)


def _train(cfg: DictConfig, launch_dir: Path, device: torch.device) -> float:
    from dcc.data.build import build_data
    from dcc.data.splits import manifest_params, split_manifest, write_split_manifest
    from dcc.selftrain import self_train
    from dcc.train import fit

    run_dir = run_dir_for(cfg, launch_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = build_data(cfg)  # fails on missing/unreadable data before an MLflow run is created
    tracker = make_tracker(cfg, launch_dir) if ddp.is_main() else NullTracker()  # only rank 0 talks to MLflow
    id_file = run_dir / "mlflow_run_id"
    if requeued() and not cfg.trainer.resume:
        log.info("SLURM requeued this job: resuming from its last checkpoint")
        cfg.trainer.resume = True
    previous = id_file.read_text().strip() if cfg.trainer.resume and id_file.exists() else None
    manifest = split_manifest(cfg, data)
    tracker.start(
        run_id=previous, run_name=run_name(cfg), params=flatten(plain_config(cfg)) | manifest_params(manifest),
        tags=_tags(cfg, launch_dir), config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
    )
    if tracker.run_id:
        id_file.write_text(tracker.run_id)
        if previous is None:
            for path in write_split_manifest(manifest, run_dir / "split"):
                tracker.log_artifact(path, "split")
    log.info("run directory %s; %d labeled / %d unlabeled training images, %d validation images",
             run_dir, len(data.labeled), len(data.unlabeled), len(data.val))
    try:
        method = cfg.loss.method if isinstance(cfg.loss.method, Method) else Method[str(cfg.loss.method)]
        if method is Method.st:
            result = self_train(cfg, data, device, tracker, run_dir)
        else:
            result = fit(cfg, data, device, tracker, run_dir)
        if cfg.logger.log_checkpoint:
            tracker.log_artifact(run_dir / "last.pt", "checkpoint")
    except (KeyboardInterrupt, SystemExit):
        tracker.finish("KILLED")  # preempted or interrupted: trainer.resume=true (or a requeue) continues it
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    if not ddp.is_main():
        return float(result.final_miou)
    print(f"final val mIoU: {result.final_miou:.4f} (best {result.best_miou:.4f}) after {result.steps} steps", flush=True)
    print(tracker.describe(), flush=True)
    print(f"run directory: {run_dir}", flush=True)
    return float(result.final_miou)
