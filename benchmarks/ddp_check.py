"""Several processes take the step of one: the check of tests/test_distributed.py, on a GPU or on the CPU.

    python benchmarks/ddp_check.py --device cuda                 # 2 ranks: NCCL on 2 GPUs, else gloo on one GPU
    python benchmarks/ddp_check.py --device cuda --backend gloo  # 2 ranks on one GPU over gloo
    python benchmarks/ddp_check.py --device cpu                  # the same on the CPU (gloo)

With BN in training mode (the project's synchronized batch norm, ``dcc.method.models.sync_bn``, on the N ranks;
torch's ``BatchNorm2d`` on one process) it trains, through the engine's own ``fit``, one step of a tiny
DeepLabv3+ (ResNet-18) on the embedded digits scenes, once on one process with the whole batch and once on
``--nprocs`` processes with 1/N of it each, for three cases:

* ``supervised``: SupOnly, from the seed's initial weights;
* ``cac_per_view`` / ``cac_shared``: the full method (ablation row VIII: directional contrastive loss,
  negative sampling, positive filtering, the negative bank gathered over ranks) with ``trainer.view_bn=per_view``
  (each view normalised with its own statistics over all ranks) and ``shared``, from one checkpoint of
  ``--pre`` single-process steps.

Dropout is off, TF32 is off and ``loss.selected_num`` covers every cell, so nothing random differs. It prints,
per case, the norm-relative differences ``||a - b|| / ||b||`` of the loss terms, of every parameter's gradient
(the worst one named) and of the BN running statistics, the agreement between ranks, and PASS / FAIL against the
tolerances of the tests (losses 1e-5, gradients 1e-4, running statistics 1e-5); ``ALL PASS`` at the end when
every case passes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcc import distributed as ddp  # noqa: E402

CASES = ("supervised", "cac_per_view", "cac_shared")
TOL = {"loss": 1e-5, "grads": 1e-4, "running": 1e-5}
TINY = [  # tests/conftest.py's tiny set-up, with the overrides of tests/test_distributed.py
    "backbone=resnet18", "segnet.channels=32", "segnet.low_level_channels=16", "dataset.scenes.num_train=48",
    "dataset.scenes.num_val=6", "dataset.scenes.image_size=48", "dataset.scenes.pretrain.steps=0",
    "dataset.base_size=48", "dataset.crop_size=32", "dataset.unlabeled_scale=[1.0,1.25]", "dataset.labeled_scale=[0.5,1.0]",
    "trainer.batch_size=4", "trainer.unlabeled_batch_size=4", "trainer.log_every=1", "trainer.eval_every=1000",
    "trainer.checkpoint_every=1000", "trainer.eval_batch_size=6", "trainer.progress=false", "trainer.num_vis=0",
    "trainer.resume=true", "trainer.num_workers=0", "split=1_4", "logger=none",
    "segnet.dropout=0", "segnet.classifier_dropout=0", "loss.start_step=0", "loss.selected_num=64", "loss.bank_steps=1",
    "optim.name=sgd", "optim.poly_power=0",
]


def overrides(case: str, steps: int, data_root: str, device: str) -> list[str]:
    common = TINY + [f"dataset.root={data_root}", f"trainer.max_steps={steps}", f"trainer.device={device}"]
    if case == "supervised":
        return common + ["loss=suponly", "optim.lr=0.2"]
    # lr 0.01 keeps the young model's pseudo-labels diverse (negative sampling keeps negatives); gamma 0 keeps anchors
    return common + ["loss=ablation_viii", "optim.lr=0.01", "loss.pos_threshold=0.0",
                     f"trainer.view_bn={case.removeprefix('cac_')}"]


def compose(over: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dcc.cli import quote_split_overrides
    from dcc.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=quote_split_overrides(over))


class _Recorder:
    run_id = None

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, *args: Any, **kwargs: Any) -> None:
        pass


def fit_recording(cfg: Any, device: torch.device, state_dir: Path, record: Path | None) -> dict[str, float]:
    """``fit`` (resuming from ``state_dir/last.pt``); with ``record``, this rank's gradients of the last step (after
    the average over ranks) and BN buffers right after its forward passes go to ``record/rank<r>.pt``."""
    from dcc.data.build import build_data
    from dcc.engine.trainer import fit

    average = ddp.average_gradients

    def recording_average(model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        average(model, *args, **kwargs)
        if record is not None:
            torch.save({"grads": {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None},
                        "buffers": {n: b.detach().cpu().clone() for n, b in model.named_buffers()},
                        "bn": sorted({type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__})},
                       record / f"rank{ddp.rank()}.pt")

    ddp.average_gradients = recording_average
    try:
        tracker = _Recorder()
        fit(cfg, build_data(cfg), device, tracker, state_dir)
        return tracker.metrics
    finally:
        ddp.average_gradients = average


def no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def worker(work: str, data_root: str, device_type: str, backend: str, pre: int) -> dict[str, dict[str, float]]:
    """In each spawned rank: the N-process run of every case (one process group for all of them)."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    no_tf32()
    if device_type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if backend == "nccl" else None)
    try:
        out = {}
        for case in CASES:
            steps = 1 if case == "supervised" else pre + 1
            cfg = compose(overrides(case, steps, data_root, device_type) + [f"trainer.devices={world}"])
            out[case] = fit_recording(cfg, device, Path(work) / case / "many", Path(work) / case / "rec_many")
        return out
    finally:
        dist.destroy_process_group()


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if float(b.norm()) > 0 else float((a - b).norm())


def compare(one: Path, many: Path, nprocs: int) -> dict[str, tuple[float, str]]:
    """Worst norm-relative differences of rank 0 against the single process (gradients, running statistics) and
    of every other rank against rank 0 (gradients and buffers: they should be identical)."""
    a = torch.load(one / "rank0.pt", weights_only=False)
    ranks = [torch.load(many / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]
    b = ranks[0]
    if set(a["grads"]) != set(b["grads"]):
        return {"grads": (float("inf"), "parameter sets differ")}
    running = [n for n in a["buffers"] if "running_" in n]
    tracked = [n for n in a["buffers"] if n.endswith("num_batches_tracked")]
    return {
        "grads": max((_norm_rel(b["grads"][n], a["grads"][n]), n) for n in a["grads"]),
        "running": max((_norm_rel(b["buffers"][n], a["buffers"][n]), n) for n in running),
        "ranks": max([(_norm_rel(o[p][n], b[p][n]), n) for o in ranks[1:] for p in ("grads", "buffers") for n in b[p]],
                     default=(0.0, "")),
        "tracked": (float(any(int(a["buffers"][n]) != int(b["buffers"][n]) for n in tracked)), ""),
        "bn": (0.0, f"{a['bn']} vs {b['bn']}"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--backend", default="auto", help="auto: nccl with a GPU per rank, else gloo")
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--pre", type=int, default=2, help="single-process CAC steps before the compared one")
    p.add_argument("--work", default=None, help="folder for data and checkpoints (default: a temporary one)")
    args = p.parse_args()
    no_tf32()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible (use --device cpu)")
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if cuda and torch.cuda.device_count() >= args.nprocs else "gloo"
    where = (f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}" if cuda else "CPU")
    print(f"{where}; torch {torch.__version__}; backend {backend}, {args.nprocs} processes", flush=True)
    if not cuda:
        torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="ddp_check-"))
    data_root = str(work / "data")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    t0 = time.perf_counter()
    # one process, whole batch; the CAC cases start from one checkpoint of --pre single-process steps
    pre_dir = work / "pre"
    fit_recording(compose(overrides("cac_per_view", args.pre, data_root, args.device)), device, pre_dir, None)
    ref = {}
    for case in CASES:
        for d in ("one", "many", "rec_one", "rec_many"):
            (work / case / d).mkdir(parents=True, exist_ok=True)
        if case != "supervised":
            for d in ("one", "many"):
                shutil.copy(pre_dir / "last.pt", work / case / d / "last.pt")
        steps = 1 if case == "supervised" else args.pre + 1
        ref[case] = fit_recording(compose(overrides(case, steps, data_root, args.device)), device,
                                  work / case / "one", work / case / "rec_one")
    try:
        got = ddp.spawn(worker, str(work), data_root, args.device, backend, args.pre, nprocs=args.nprocs)
    except ddp.RankError as exc:  # e.g. NCCL refusing two ranks on one GPU
        print(f"the {args.nprocs}-process run failed: {exc}")
        print("SOME CHECKS FAILED")
        raise SystemExit(1) from None
    print(f"ran in {time.perf_counter() - t0:.1f} s; work folder {work}")
    ok = True
    for case in CASES:
        keys = [k for k in ("train/loss", "train/loss_ce", "train/loss_u") if k in ref[case]]
        loss = max((abs(got[case][k] - ref[case][k]) / max(abs(ref[case][k]), 1e-12), k) for k in keys)
        d = compare(work / case / "rec_one", work / case / "rec_many", args.nprocs)
        passed = (loss[0] <= TOL["loss"] and d["grads"][0] <= TOL["grads"] and d["running"][0] <= TOL["running"]
                  and d["ranks"][0] <= TOL["running"] and d["tracked"][0] == 0)
        ok &= passed
        values = ", ".join(f"{k}={ref[case][k]:.6f}" for k in keys)
        print(f"{case}: {values}\n"
              f"  loss terms: largest relative difference {loss[0]:.2e} ({loss[1]})\n"
              f"  gradients: largest norm-relative difference {d['grads'][0]:.2e} ({d['grads'][1]})\n"
              f"  BN running statistics: largest norm-relative difference {d['running'][0]:.2e} ({d['running'][1]})\n"
              f"  ranks against rank 0: {d['ranks'][0]:.2e}; num_batches_tracked "
              f"{'equal' if d['tracked'][0] == 0 else 'DIFFER'}; BN layers {d['bn'][1]}\n"
              f"  -> {'PASS' if passed else 'FAIL'}", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print("ALL PASS" if ok else "SOME CHECKS FAILED")


if __name__ == "__main__":
    main()
