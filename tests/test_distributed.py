"""Data-parallel training on CPU (gloo): 2 processes with B/2 images each take the step 1 process takes with B.

The processes are started with ``dcc.distributed.spawn`` (torch.multiprocessing, spawn, a free port), the
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
from mlflow.tracking import MlflowClient

from dcc.engine import checkpoint
from dcc import distributed as ddp
from dcc.config import ConfigError, validate
from dcc.data.build import StepSampler, build_data, labeled_loader
from tests.conftest import ROOT, compose_cfg


class _Recorder:
    """A tracker that keeps the logged metrics."""

    run_id = None

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics, step):  # noqa: ANN001
        self.metrics.update(metrics)

    def log_artifact(self, *args, **kwargs):  # noqa: ANN002, ANN003
        pass


def _one_step(cfg, state_dir: str, record: str | None = None) -> dict[str, float]:
    """In each spawned process (or in this one, for one process): ``fit`` (resuming from ``state_dir/last.pt`` if
    there), BN in training mode; returns rank 0's logged metrics. With ``record``, each rank writes
    ``record/rank<r>.pt``: the gradients of the last step (after the average over ranks) and the BN buffers
    right after that step's forward passes (before any averaging of buffers)."""
    from dcc.distributed import resolve_device
    from dcc.engine.trainer import fit

    average = ddp.average_gradients

    def recording_average(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        average(model, *args, **kwargs)
        if record:
            torch.save({"grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        "buffers": {n: b.clone() for n, b in model.named_buffers()},
                        "bn": sorted({type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__})},
                       Path(record) / f"rank{ddp.rank()}.pt")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ddp.average_gradients = recording_average
    try:
        with ddp.process_group(cfg.trainer, resolve_device) as device:
            tracker = _Recorder()
            fit(cfg, build_data(cfg), device, tracker, Path(state_dir))
            return tracker.metrics
    finally:
        ddp.average_gradients = average
        torch.set_num_threads(threads)


PRE = 2  # single-process steps before the compared one (written to the checkpoint both runs start from)


def _step_overrides(tiny_overrides: list[str], loss: str, steps: int, lr: float = 0.2) -> list[str]:
    return tiny_overrides + [
        f"loss={loss}", f"trainer.max_steps={steps}", "trainer.resume=true", "trainer.device=cpu", "trainer.num_workers=0",
        "segnet.dropout=0", "segnet.classifier_dropout=0",  # no RNG-drawn masks, which differ per process
        "dataset.labeled_scale=[0.5,1.0]",  # crops padded with ignore_index: unequal valid pixels per rank
        "loss.start_step=0",  # the consistency loss in the first step
        "loss.selected_num=64",  # every cell of the 4 x (4 x 4) per view: the bank is a function of the batch
        "optim.name=sgd", f"optim.lr={lr}",  # plain gradient steps (Adam's first step is sign(grad), ill-conditioned near 0)
        "optim.poly_power=0",  # a constant learning rate (the checkpoint of step PRE would hold the poly schedule's 0)
    ]


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (float64; ||a - b|| itself when b is 0)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if float(b.norm()) > 0 else float((a - b).norm())


def compare_records(one: Path, two: Path) -> dict[str, tuple[float, str]]:
    """Worst norm-relative differences (value, tensor name) between the 1-process record and rank 0 of the
    2-process record: ``grads``, ``running`` (BN running means and variances), and between the two ranks."""
    a, b, b1 = (torch.load(p, weights_only=False) for p in (one / "rank0.pt", two / "rank0.pt", two / "rank1.pt"))
    out = {}
    for key, names in (("grads", a["grads"]), ("running", [n for n in a["buffers"] if "running_" in n])):
        part = "grads" if key == "grads" else "buffers"
        assert set(a[part]) == set(b[part]), key
        out[key] = max((_norm_rel(b[part][n], a[part][n]), n) for n in names)
    out["ranks"] = max((_norm_rel(b1[p][n], b[p][n]), n) for p in ("grads", "buffers") for n in b[p])
    tracked = [n for n in a["buffers"] if n.endswith("num_batches_tracked")]
    assert tracked and all(int(a["buffers"][n]) == int(b["buffers"][n]) for n in tracked)
    assert b["bn"] == ["SyncGroupedBatchNorm"] and a["bn"] == ["BatchNorm2d"], (a["bn"], b["bn"])
    return out


def _check_equal(ref: dict, got: dict, one: Path, two: Path, keys: list[str]) -> dict:
    assert set(keys) <= set(ref)
    for k in keys:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    diffs = compare_records(one, two)
    print({k: f"{abs(got[k] - ref[k]) / abs(ref[k]):.2e}" for k in keys}, {k: f"{v:.2e} ({n})" for k, (v, n) in diffs.items()})
    assert diffs["grads"][0] < 1e-4, diffs["grads"]
    assert diffs["running"][0] < 1e-5, diffs["running"]
    assert diffs["ranks"][0] == 0.0, diffs["ranks"]  # every rank holds the same gradients and BN statistics
    return diffs


def test_two_processes_take_the_single_process_supervised_step(tiny_overrides, tmp_path):
    """Supervised step, BN in training mode (the synchronized batch norm on the 2 processes, torch's on one),
    both from the seed's initial weights: the loss, every parameter's gradient and the BN running statistics
    agree; the labeled halves hold different numbers of valid pixels (checked here), so a per-rank mean would
    not. Then the 2-process checkpoint continues on 1 process."""
    over = _step_overrides(tiny_overrides, "suponly", 1)
    single, double = compose_cfg(over), compose_cfg(over + ["trainer.devices=2"])
    data = build_data(single)
    batch = next(iter(labeled_loader(single.dataset, single.trainer, data.train, data.labeled, start_step=0, device=torch.device("cpu"))))[1]
    valid = (batch != 255).flatten(1).sum(1)
    assert valid[:2].sum() != valid[2:].sum(), "the test needs halves with different numbers of valid pixels"
    for d in ("one", "two", "rec1", "rec2"):
        (tmp_path / d).mkdir()
    ref = _one_step(single, str(tmp_path / "one"), str(tmp_path / "rec1"))  # same seed: same initial weights
    got = ddp.spawn(_one_step, double, str(tmp_path / "two"), str(tmp_path / "rec2"), nprocs=2)
    _check_equal(ref, got, tmp_path / "rec1", tmp_path / "rec2", ["train/loss", "train/loss_ce"])
    a = checkpoint.load(tmp_path / "one" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "two" / "last.pt")["model"]
    assert a.keys() == b.keys()  # the synchronized BN keeps BatchNorm2d's state dict: N-process checkpoints load on M
    assert max(_norm_rel(b[k], a[k]) for k in a if a[k].is_floating_point()) < 1e-5
    # the checkpoint of 2 processes resumes on 1 (the CAC tests resume 1 -> 2): its next step is the 1-process one
    more = compose_cfg(_step_overrides(tiny_overrides, "suponly", 2))
    after_one = _one_step(more, str(tmp_path / "one"))
    after_two = _one_step(more, str(tmp_path / "two"))
    assert after_two["train/loss"] == pytest.approx(after_one["train/loss"], rel=1e-5)
    assert [s for s, _ in checkpoint.load(tmp_path / "two" / "last.pt")["history"]] == [1, 2]  # resumed at step 1


@pytest.fixture(scope="module")
def cac_checkpoint(tmp_path_factory, data_root):
    """``last.pt`` after PRE single-process CAC steps (per_view), the start of both CAC comparisons."""
    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("cac-pre")
    over = TINY + [f"dataset.root={data_root}", f"trainer.runs_root={tmp / 'runs'}", "logger=none"]
    _one_step(compose_cfg(_cac_overrides(over, PRE)), str(tmp / "pre"))
    return tmp / "pre" / "last.pt"


def _cac_overrides(tiny_overrides: list[str], steps: int) -> list[str]:
    # A small learning rate keeps the young model's pseudo-labels diverse (at lr 0.2 every cell is background after
    # 2 steps and negative sampling would drop every negative); gamma 0 keeps anchors although it is not confident.
    return _step_overrides(tiny_overrides, "ablation_viii", steps, lr=0.01) + ["loss.pos_threshold=0.0"]


@pytest.mark.parametrize("view_bn", ["per_view", "shared"])
def test_two_processes_take_the_single_process_cac_step(tiny_overrides, tmp_path, cac_checkpoint, view_bn):
    """CAC step (full method: directional contrastive loss with negative sampling and positive filtering, the
    negative bank gathered over ranks), BN in training mode, ``trainer.view_bn=per_view`` (each view normalised
    with its own statistics over both ranks) and ``shared``: from one checkpoint written by one process, loss
    terms, every parameter's gradient and the BN running statistics of 2 processes with B/2 each agree with
    one process with B."""
    over = _cac_overrides(tiny_overrides, PRE + 1) + [f"trainer.view_bn={view_bn}"]
    single, double = compose_cfg(over), compose_cfg(over + ["trainer.devices=2"])
    for d in ("one", "two", "rec1", "rec2"):
        (tmp_path / d).mkdir()
        if d in ("one", "two"):
            shutil.copy(cac_checkpoint, tmp_path / d / "last.pt")
    ref = _one_step(single, str(tmp_path / "one"), str(tmp_path / "rec1"))
    got = ddp.spawn(_one_step, double, str(tmp_path / "two"), str(tmp_path / "rec2"), nprocs=2)
    _check_equal(ref, got, tmp_path / "rec1", tmp_path / "rec2", ["train/loss", "train/loss_ce", "train/loss_u"])
    assert got["train/loss_u"] > 0.01, got["train/loss_u"]
    bank_a = checkpoint.load(tmp_path / "one" / "last.pt")["bank"]["entries"][-1]
    bank_b = checkpoint.load(tmp_path / "two" / "last.pt")["bank"]["entries"][-1]
    assert bank_a[0].shape == bank_b[0].shape == (2 * 64, 128)  # both views, every cell of the batch
    # the gathered bank holds every rank's negatives (rank-major) and more than one pseudo-label: some are used
    assert torch.allclose(bank_a[0].sort(0).values, bank_b[0].sort(0).values, atol=1e-5)
    assert bank_a[1].unique().numel() > 1, bank_a[1].unique()


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


def _fails_on_rank_1(_: int) -> int:
    if ddp.rank() == 1 or os.environ.get("RANK") == "1":
        raise ValueError("injected failure\non two lines")
    return 0


def test_a_failing_child_is_one_line_naming_its_rank():
    with pytest.raises(ddp.RankError) as info:
        ddp.spawn(_fails_on_rank_1, 0, nprocs=2)
    assert str(info.value) == "rank 1 of 2 failed: ValueError: injected failure on two lines"


# run.py whose rank 1 fails at step 3 (after the checkpoint of step 2). Spawned processes import the main script
# again as __mp_main__, so the patch below is in every rank.
_FAILING_RUN = """
import sys
sys.path.insert(0, {root!r})
import hydra
import dcc.engine.trainer as trainer
from dcc.cli import quote_split_overrides
from dcc.config import register_configs
from dcc import distributed as ddp

step = trainer.Trainer.step

def failing_step(self, x, y):
    if ddp.rank() == 1 and self.progress.step == 2:
        raise RuntimeError("injected failure in rank 1")
    return step(self, x, y)

trainer.Trainer.step = failing_step
register_configs()

@hydra.main(version_base="1.3", config_path={conf!r}, config_name="config")
def main(cfg):  # run.py's main
    from dcc.engine.errors import one_message
    from dcc.engine.job import run
    return one_message(run, cfg)

if __name__ == "__main__":
    sys.argv = quote_split_overrides(sys.argv)
    main()
"""


@pytest.mark.slow
def test_a_failing_rank_of_run_py_prints_one_line_and_keeps_the_checkpoint(tiny_overrides, tmp_path):
    """``run.py trainer.devices=2`` whose rank 1 raises at step 3: one line ``error: rank 1 of 2 failed: ...`` on
    stderr, no traceback, exit status 1; the checkpoint of step 2 is intact and no temporary file is left."""
    script = tmp_path / "failing_run.py"
    script.write_text(_FAILING_RUN.format(root=str(ROOT), conf=str(ROOT / "conf")))
    cmd = [sys.executable, str(script), *tiny_overrides, "trainer.devices=2", "trainer.device=cpu",
           "trainer.num_workers=0", "trainer.max_steps=4", "trainer.eval_every=4", "trainer.checkpoint_every=2",
           "logger=none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 of 2 failed: RuntimeError: injected failure in rank 1"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    (last,) = (tmp_path / "runs").rglob("last.pt")
    assert checkpoint.load(last)["step"] == 2
    assert not list((tmp_path / "runs").rglob("*.tmp"))
