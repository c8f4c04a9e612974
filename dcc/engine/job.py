"""What ``run.py`` does with a composed config: check, then summarise, predict, or train and report.

Training: every check first (dcc/engine/preflight.py, then the data), then what the run directory holds decides
(dcc/engine/resume.py: continue, report a finished run, or start over), then the MLflow run and the directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dcc import distributed as ddp
from dcc.engine import checkpoint as ckpt, preflight, resume
from dcc.config import CheckpointLog, ConfigError, Method, choice, validate
from dcc.engine.tracking import (PARENT_RUN_ENV, PARENT_TAG, NullTracker, TrackingLost, flatten, git_commit,
                                 logging_off, make_tracker, open_client, tracking_uri)

from dcc.engine.metrics import percent
from dcc.engine.naming import plain_config, run_dir_for, run_name

log = logging.getLogger(__name__)

def summary(cfg: DictConfig) -> str:
    from dcc.method.models import build_model

    counts = build_model(cfg).param_counts()
    text = f"params: total={counts['total']} backbone={counts['backbone']} projector={counts['projector']}"
    return text + (f" weak_classifier={counts['weak_classifier']}" if counts["weak_classifier"] else "")


def _tags(cfg: DictConfig, launch_dir: Path) -> dict[str, str]:
    plain = plain_config(cfg)
    return {
        "dataset": plain["dataset"]["name"], "split": plain["split"]["name"], "segnet": plain["segnet"]["name"],
        "backbone": plain["backbone"]["name"], "loss": plain["loss"]["preset"], "method": plain["loss"]["method"],
        "seed": str(plain["trainer"]["seed"]), "git_commit": git_commit(launch_dir),
        "steps": str(plain["trainer"]["max_steps"]),  # the budget: a 40-step try and a 1,500-step run look different
    }


def run(cfg: DictConfig, launch_dir: Path | None = None) -> float:
    """Check ``cfg``; print the parameter summary, predict, or train. Returns the final validation mIoU.

    Everything checkable is checked before a run directory or an MLflow run exists (dcc/engine/preflight.py).
    """
    launch_dir = (launch_dir or Path.cwd()).resolve()
    task = str(cfg.task)
    if task in ("summary", "predict"):  # no ImageNet weights: counting needs none, a checkpoint has them all
        cfg.backbone.weights, cfg.backbone.pretrained = None, False
    preflight.check_resolves(cfg)
    validate(cfg)
    if task == "summary":
        print(summary(cfg), flush=True)
        return 0.0
    if task == "predict":
        from dcc.engine.predict import run_predict

        run_predict(cfg, launch_dir)
        return 0.0

    preflight.check(cfg, launch_dir, run_dir_for(cfg, launch_dir))
    if ddp.requested(cfg.trainer) > 1 and not ddp.launched():
        if cfg.trainer.nodes > 1:
            raise ConfigError(f"trainer.nodes={cfg.trainer.nodes} needs a launcher that starts the processes on every "
                              "machine: hydra/launcher=slurm, or torchrun on each node")
        from dcc.data.build import load_sources

        load_sources(cfg.dataset)  # the dataset layout, checked here once rather than in every process
        # One machine, no launcher: start trainer.devices processes, each of which runs this function.
        try:
            return ddp.spawn(run, cfg, launch_dir, nprocs=cfg.trainer.devices)
        except ddp.RankError:  # a process stopped while rank 0 wrote a checkpoint leaves its temporary file
            run_dir = run_dir_for(cfg, launch_dir)
            for tmp in run_dir.rglob("*.pt.*.tmp") if run_dir.is_dir() else ():
                tmp.unlink(missing_ok=True)
            raise
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    with ddp.process_group(cfg.trainer, ddp.resolve_device) as device:
        return _train(cfg, launch_dir, device)


def _adopt(cfg: DictConfig, launch_dir: Path, run_id: str | None) -> None:
    """A finished run met again inside a sweep joins that sweep's parent run (so its table is complete)."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent or not run_id or logging_off(cfg.logger):
        return
    try:
        open_client(tracking_uri(cfg.logger, launch_dir)).set_tag(run_id, PARENT_TAG, parent)
    except Exception as exc:  # noqa: BLE001 - grouping is a convenience
        log.warning("could not add the finished run %s to this sweep (%s)", run_id, exc)


def _job_command() -> str:
    """``python run.py <this job's overrides>`` (a sweep's job), else the command that continues this run."""
    try:
        import shlex

        from hydra.core.hydra_config import HydraConfig

        return shlex.join(["python", "run.py", *HydraConfig.get().overrides.task])
    except Exception:  # noqa: BLE001 - not under Hydra
        return resume.continue_command()


def _drop_if_empty(run_dir: Path, created: bool) -> None:
    """A run directory made by this attempt that holds no checkpoint yet is removed when the attempt fails."""
    if created and ddp.is_main() and run_dir.exists() and not any(run_dir.rglob("*.pt")):
        shutil.rmtree(run_dir, ignore_errors=True)


def _log_checkpoint(cfg: DictConfig, tracker: Any, run_dir: Path, model: torch.nn.Module) -> None:
    """``logger.log_checkpoint``: off, weights (the model's state dict, ``checkpoint/model.pt``) or full
    (``last.pt``)."""
    what = choice(cfg.logger.log_checkpoint, CheckpointLog)
    if what is CheckpointLog.full:
        tracker.log_artifact(run_dir / "last.pt", "checkpoint")
    elif what is CheckpointLog.weights and not isinstance(tracker, NullTracker):
        with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
            path = Path(tmp) / "model.pt"
            torch.save({"model": model.state_dict()}, path)
            tracker.log_artifact(path, "checkpoint")


_NOT_MEASURED = "not measured (the run finished before runs measured a test split; trainer.resume=restart measures it)"


def _test_text(test_miou: float | str | None) -> str:
    """The test mIoU as printed: its value, or why there is none."""
    if isinstance(test_miou, str):
        return test_miou
    return "n/a (no test split: results are on val)" if test_miou is None else f"{percent(test_miou):.2f}%"


def _train(cfg: DictConfig, launch_dir: Path, device: torch.device) -> float:
    from dcc.data.build import build_data

    data = build_data(cfg)  # fails on missing/unreadable data before a run directory or an MLflow run exists
    # The embedded dataset's pretrained backbone, built (announced, resumable) before the MLflow run is opened:
    # a run killed during it leaves no MLflow run RUNNING.
    from dcc.data.digits_pretrain import embedded_backbone_weights

    weights = embedded_backbone_weights(cfg.dataset, cfg.backbone)  # once: the trainer gets the file, not the recipe
    run_dir = run_dir_for(cfg, launch_dir)
    with contextlib.ExitStack() as stack:
        busy = None
        if ddp.is_main():
            try:
                stack.enter_context(resume.hold(run_dir))  # one process at a time trains this run directory
            except resume.RunDirBusy as exc:
                busy = str(exc)
        if ddp.any_rank(busy is not None, device):
            raise preflight.PreflightError(busy or f"{run_dir} is being trained by another process (see rank 0)")
        return _train_in(cfg, launch_dir, device, data, run_dir, weights)


def _train_in(cfg: DictConfig, launch_dir: Path, device: torch.device, data: Any, run_dir: Path,
              weights: str | None) -> float:
    """The run's life in its (held) directory: decide, then report a finished run or train and record the result."""
    decision = _decide(run_dir, resume.resume_mode(cfg.trainer))
    if decision.action == "finished":
        return _report_finished(cfg, launch_dir, decision, run_dir)
    tracker, created = _open_run(cfg, launch_dir, data, run_dir, resumed=decision.action == "resume")
    from dcc.engine.trial_link import TrialPruned

    try:
        result = _fit(cfg, data, device, tracker, run_dir, weights)
    except TrialPruned as pruned:  # the Optuna study stopped this trial: a clean end, its checkpoint kept
        tracker.set_tags({"pruned": "true", "pruned_at_step": str(pruned.step), "steps_trained": str(pruned.stopped)})
        tracker.finish("KILLED")  # like a preempted run: not in the tables; the same command continues it
        if ddp.is_main():
            print(f"{pruned}, val mIoU {pruned.value:.2f}%: checkpoint kept in {run_dir}; continue it with "
                  f"{_job_command()}", flush=True)
        return float(pruned.value)
    except BaseException as exc:
        _close_unfinished(tracker, run_dir, created, exc)
        raise
    return _record(cfg, tracker, run_dir, result)


def _close_unfinished(tracker: Any, run_dir: Path, created: bool, exc: BaseException) -> None:
    """A run that stops before its result: KILLED when preempted or interrupted (the same command, or a requeue,
    continues it), FAILED otherwise; a run directory made for it and still empty is removed."""
    tracker.finish("KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED")
    _drop_if_empty(run_dir, created)


def _decide(run_dir: Path, mode: str) -> resume.Decision:
    """Continue, report or start over (:func:`dcc.engine.resume.decide`); rank 0 applies it once every rank looked."""
    decision = resume.decide(run_dir, mode)
    ddp.barrier()  # every rank has looked before rank 0 moves anything
    if ddp.is_main():
        resume.apply(run_dir, decision)
        if decision.message:
            print(decision.message, flush=True)
    ddp.barrier()
    return decision


def _report_finished(cfg: DictConfig, launch_dir: Path, decision: resume.Decision, run_dir: Path) -> float:
    """A finished run is not trained again: its result is printed, its MLflow run joins the sweep's parent."""
    assert decision.result is not None
    if ddp.is_main():
        print(f"test mIoU: {_test_text(decision.result.get('test_miou', _NOT_MEASURED))}", flush=True)
        if ddp.world_size() > 1:
            print(f"(the run directory does not depend on the number of processes: {ddp.world_size()} processes "
                  "compute what one computes (docs/several-gpus.md), so this finished run is this config's "
                  "result; trainer.resume=restart trains it again)", flush=True)
        _adopt(cfg, launch_dir, decision.result.get("mlflow_run_id"))
        _report_to_trial(decision.result, run_dir, cfg.trainer.max_steps)
    return percent(float(decision.result["final_miou"]))  # the job's value (Optuna's objective): in %


def _report_to_trial(result: dict[str, Any], run_dir: Path, max_steps: int) -> None:
    """A job of an Optuna trial that meets a finished run gives the sweeper the run's validation curve, as if it had
    trained it now: the trial then takes part in the pruner's rungs (without it, a met baseline sets no bar)."""
    from dcc.engine.trial_link import TrialLink

    link = TrialLink.from_env()
    if link is None:
        return
    history = result.get("history")
    if history is None and (run_dir / "last.pt").exists():  # result.json of runs finished before it kept the curve
        try:
            history = ckpt.load(run_dir / "last.pt").get("history", [])
        except ckpt.CheckpointError as exc:
            log.warning("%s: the trial gets the final value only", exc)
    link.report(int(result["steps"]), [(int(s), percent(float(v))) for s, v in history or []], max_steps)


def _open_run(cfg: DictConfig, launch_dir: Path, data: Any, run_dir: Path, *,
              resumed: bool) -> tuple[NullTracker | Any, bool]:
    """The MLflow run (the previous one when continuing; only rank 0 talks to MLflow) and the run directory, with
    the split manifest; returns the tracker and whether the directory was created now."""
    from dcc.data.splits import manifest_params, split_manifest, write_split_manifest

    tracker = make_tracker(cfg, launch_dir) if ddp.is_main() else NullTracker()
    id_file = run_dir / "mlflow_run_id"
    previous = id_file.read_text().strip() if resumed and id_file.exists() else None
    manifest = split_manifest(cfg, data)
    tracker.start(
        run_id=previous, run_name=run_name(cfg), params=flatten(plain_config(cfg)) | manifest_params(manifest),
        tags=_tags(cfg, launch_dir), config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
    )
    created = not run_dir.exists()
    try:
        if ddp.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
        ddp.barrier()
        if tracker.run_id:
            id_file.write_text(tracker.run_id)
            if previous is None:
                for path in write_split_manifest(manifest, run_dir / "split"):
                    tracker.log_artifact(path, "split")
    except BaseException as exc:
        _close_unfinished(tracker, run_dir, created, exc)
        raise
    log.info("run directory %s; %d labeled / %d unlabeled training images, %d validation images, %s",
             run_dir, len(data.labeled), len(data.unlabeled), len(data.val),
             "no test split" if data.test is None else f"{len(data.test)} test images (evaluated once, at the end)")
    return tracker, created


def _fit(cfg: DictConfig, data: Any, device: torch.device, tracker: Any, run_dir: Path, weights: str | None) -> Any:
    """Train (self-training: teacher then student) and log the checkpoint as ``logger.log_checkpoint`` asks."""
    from dcc.engine.selftrain import self_train
    from dcc.engine.trainer import fit

    train = self_train if choice(cfg.loss.method, Method) is Method.st else fit
    result = train(cfg, data, device, tracker, run_dir, backbone_weights=weights)
    if ddp.is_main():
        _log_checkpoint(cfg, tracker, run_dir, result.model)
    return result


def _record(cfg: DictConfig, tracker: Any, run_dir: Path, result: Any) -> float:
    """The finished run: its MLflow description and status, ``result.json`` (what makes it finished) and the
    printed summary; the job's value in %."""
    if ddp.is_main():
        try:
            tracker.describe_result(f"**final val mIoU {percent(result.final_miou):.2f}%** (best "
                                    f"{percent(result.best_miou):.2f}%), test mIoU {_test_text(result.test_miou)}, "
                                    f"after {result.steps} of {cfg.trainer.max_steps} steps; "
                                    f"`{cfg.loss.preset}`, split {cfg.split.name}, seed {cfg.trainer.seed}, "
                                    f"{cfg.backbone.name}")
        except TrackingLost as exc:  # the training is done and its result is written below: only the note is lost
            log.warning("%s", exc)
    tracker.finish("FINISHED")
    if not ddp.is_main():
        return percent(result.final_miou)
    test = None if result.test_miou is None else float(result.test_miou)
    resume.write_result(run_dir, {"final_miou": float(result.final_miou), "best_miou": float(result.best_miou),
                                  "steps": int(result.steps), "mlflow_run_id": tracker.run_id, "test_miou": test,
                                  "history": [[int(s), float(v)] for s, v in result.history]})
    print(f"final val mIoU: {percent(result.final_miou):.2f}% (best {percent(result.best_miou):.2f}%) after "
          f"{result.steps} steps; test mIoU: {_test_text(test)}", flush=True)
    print(tracker.describe(), flush=True)
    print(f"run directory: {run_dir}", flush=True)
    return percent(result.final_miou)
