"""Data-parallel training on CPU (gloo): 2 processes with B/2 images each take the step 1 process takes with B.

The processes are started with ``dcc.engine.distributed.spawn`` (torch.multiprocessing, spawn, a free port), the
spawner ``run.py trainer.devices=2`` uses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from dcc.engine import checkpoint
from dcc.engine import distributed as ddp
from dcc.config import ConfigError, validate
from dcc.data.build import StepSampler, build_data, labeled_loader
from tests.conftest import ROOT, compose_cfg


class _FrozenBN(nn.BatchNorm2d):
    """Normalises with its running statistics (affine still trained): no batch statistics, which differ
    between a batch and its halves because torch's SyncBatchNorm does not run on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class _Recorder:
    """A tracker that keeps the logged metrics."""

    run_id = None

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics, step):  # noqa: ANN001
        self.metrics.update(metrics)

    def log_artifact(self, *args, **kwargs):  # noqa: ANN002, ANN003
        pass


def _one_step(cfg, state_dir: str) -> dict[str, float]:
    """In each spawned process: ``fit`` (resuming from ``state_dir/last.pt`` if there) with frozen BN; rank 0's
    logged metrics."""
    import dcc.engine.trainer
    from dcc.engine.trainer import fit
    from dcc.engine.distributed import resolve_device

    build = dcc.engine.trainer.build_model

    def frozen_bn_model(c, **kwargs):  # noqa: ANN001, ANN003, ANN202
        model = build(c, **kwargs)
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = _FrozenBN
        return model

    dcc.engine.trainer.build_model = frozen_bn_model
    torch.set_num_threads(1)
    with ddp.process_group(cfg, resolve_device) as device:
        tracker = _Recorder()
        fit(cfg, build_data(cfg), device, tracker, Path(state_dir))
        return tracker.metrics


PRE = 6  # steps before the compared one


def _step_overrides(tiny_overrides: list[str], loss: str) -> list[str]:
    return tiny_overrides + [
        f"loss={loss}", f"trainer.max_steps={PRE + 1}", "trainer.resume=true", "trainer.device=cpu", "trainer.num_workers=0",
        "segnet.dropout=0", "segnet.classifier_dropout=0",  # no RNG-drawn masks, which differ per process
        "dataset.labeled_scale=[0.5,1.0]",  # crops padded with ignore_index: unequal valid pixels per rank
        "loss.start_step=0",  # the consistency loss in the first step
        "loss.selected_num=64",  # every cell of the 4 x (4 x 4) per view: the bank is a function of the batch
        "optim.name=sgd", "optim.lr=0.2",  # plain gradient steps (Adam's first step is sign(grad), ill-conditioned near 0)
        "optim.poly_power=0",  # a constant learning rate (the checkpoint of step PRE would hold the poly schedule's 0)
    ]


@pytest.mark.parametrize("loss", ["suponly", "ablation_viii"])
def test_two_processes_with_half_batches_take_the_single_process_step(tiny_overrides, tmp_path, loss):
    """Supervised step and CAC step (directional contrastive loss with positive filtering, the negative bank
    gathered over ranks; negative sampling off, see below).

    BN is controlled by freezing it (``_FrozenBN``: running statistics, affine trained) in both runs, since
    SyncBatchNorm refuses CPU tensors (see ``test_syncbatchnorm_refuses_cpu``); dropout is off and every
    cell is a negative, so nothing random differs. Loss, logged scalars and weights must then agree to float
    tolerance: the labeled halves hold different numbers of valid pixels (checked here), so a per-rank mean
    would not.
    """
    over = _step_overrides(tiny_overrides, loss)
    if loss != "suponly":  # after PRE steps every pseudo-label is background: negative sampling would leave no
        over += ["loss.ns=false", "loss.pos_threshold=0.3"]  # negative (loss 0); a low gamma keeps anchors
    single, double = compose_cfg(over), compose_cfg(over + ["trainer.devices=2"])
    batch = next(iter(labeled_loader(single, build_data(single).train, build_data(single).labeled, start_step=0,
                                     device=torch.device("cpu"))))[1]
    valid = (batch != 255).flatten(1).sum(1)
    assert valid[:2].sum() != valid[2:].sum(), "the test needs halves with different numbers of valid pixels"

    # Both start from one checkpoint of a few single-process steps (at initialisation the model is not
    # confident anywhere and the masked consistency loss is an exact 0), then take step PRE + 1.
    ddp.spawn(_one_step, compose_cfg(over + [f"trainer.max_steps={PRE}"]), str(tmp_path / "pre"), nprocs=1)
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        shutil.copy(tmp_path / "pre" / "last.pt", tmp_path / d / "last.pt")
    ref = ddp.spawn(_one_step, single, str(tmp_path / "one"), nprocs=1)
    got = ddp.spawn(_one_step, double, str(tmp_path / "two"), nprocs=2)

    keys = ["train/loss", "train/loss_ce"] + (["train/loss_u"] if loss != "suponly" else [])
    assert set(keys) <= set(ref)
    for k in keys:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
    assert got["val/miou"] == pytest.approx(ref["val/miou"], abs=1e-9)
    a = checkpoint.load(tmp_path / "one" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "two" / "last.pt")["model"]
    assert a.keys() == b.keys()
    init = checkpoint.load(tmp_path / "pre" / "last.pt")["model"]
    floats = [k for k in a if a[k].is_floating_point()]
    worst = max((a[k] - b[k]).abs().max().item() for k in floats)
    update = max((a[k] - init[k]).abs().max().item() for k in floats)
    assert worst < 1e-6 and update > 1e-2, (worst, update)
    if loss != "suponly":  # the gathered bank holds every rank's negatives: the single process's, rank-major
        bank_a = checkpoint.load(tmp_path / "one" / "last.pt")["bank"]["entries"][-1][0]
        bank_b = checkpoint.load(tmp_path / "two" / "last.pt")["bank"]["entries"][-1][0]
        assert bank_a.shape == bank_b.shape == (2 * 64, 128)  # both views, every cell of the batch
        assert torch.allclose(bank_a.sort(0).values, bank_b.sort(0).values, atol=1e-6)  # same rows, other order
        assert got["train/loss_u"] > 0.01, got["train/loss_u"]


def _syncbn_on_cpu(_: int) -> str:
    with ddp.process_group(compose_cfg(["trainer.devices=2", "trainer.device=cpu"]), torch.device) as _device:
        bn = nn.SyncBatchNorm(4)
        try:
            bn(torch.randn(2, 4, 3, 3))
        except ValueError as exc:
            return str(exc)
        return "ran"


def test_syncbatchnorm_refuses_cpu():
    """The finding behind keeping per-process BN on CPU: torch's SyncBatchNorm needs GPU (or XPU) tensors
    under a gloo process group. If this starts to fail, SyncBatchNorm runs on CPU: convert there too."""
    message = ddp.spawn(_syncbn_on_cpu, 0, nprocs=2)
    assert "expected input tensor to be on GPU" in message


def test_rank_shares_of_a_step_are_the_single_process_batch():
    one = StepSampler(10, seed=3, stream="labeled", start=4 * 6, batch=6)
    parts = [StepSampler(10, seed=3, stream="labeled", start=4 * 6, batch=6, part=(r, 3)) for r in range(3)]
    it1, its = iter(one), [iter(p) for p in parts]
    for _ in range(5):  # steps 4 .. 8, crossing epochs
        step = [next(it1) for _ in range(6)]
        assert [x for it in its for x in (next(it), next(it))] == step


def test_batch_must_split_evenly_over_processes():
    with pytest.raises(ConfigError, match=r"trainer.batch_size=4 .* divisible by trainer.devices x trainer.nodes = 3"):
        validate(compose_cfg(["trainer.batch_size=4", "trainer.unlabeled_batch_size=6", "trainer.devices=3"]))
    with pytest.raises(ConfigError, match=r"trainer.unlabeled_batch_size=3 .* = 2"):
        validate(compose_cfg(["trainer.batch_size=4", "trainer.unlabeled_batch_size=3", "trainer.nodes=2"]))
    with pytest.raises(ConfigError, match=r"trainer.devices must be >= 1"):
        validate(compose_cfg(["trainer.devices=0"]))


def test_slurm_preset_takes_tasks_and_gpus_from_trainer_devices():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "trainer.devices=4", "trainer.nodes=2"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)


@pytest.mark.slow
def test_local_run_with_two_processes_makes_one_mlflow_run(tiny_overrides, tmp_path):
    """``run.py trainer.devices=2 trainer.device=cpu``: the processes are spawned by run.py itself, rank 0
    alone logs to MLflow and writes the checkpoint."""
    cmd = [sys.executable, str(ROOT / "run.py"), *tiny_overrides, "trainer.devices=2", "trainer.device=cpu",
           "trainer.num_workers=0", "trainer.max_steps=4", "trainer.eval_every=4", "trainer.checkpoint_every=4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final val mIoU") == 1
    uri = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("logger.tracking_uri="))
    client = MlflowClient(tracking_uri=uri)
    (r,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert r.info.status == "FINISHED" and r.data.params["trainer/devices"] == "2"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val/miou")] == [4]
    assert "train/loss_u" in r.data.metrics
    assert not dist.is_initialized()
