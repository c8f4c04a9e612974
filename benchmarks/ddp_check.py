"""The multi-GPU path on one machine: NCCL process group, SyncBatchNorm, gradient averaging, per-view BN.

    python benchmarks/ddp_check.py [--backend nccl] [--nprocs 2] [--steps 20]

Two processes (``--nprocs``) join one process group through the engine's own helpers
(:func:`dcc.engine.distributed.spawn`, ``sync_batchnorm``, ``broadcast_module``, ``average_gradients``), each
with its share of one batch, on ``cuda:LOCAL_RANK`` (or all on ``cuda:0`` when the machine has fewer GPUs than
processes: NCCL may refuse that, which this script reports). It checks against one process on the whole batch
with plain BatchNorm:

* labeled step: gradients and BN running statistics after one supervised step;
* per-view BN (``trainer.view_bn=per_view``): two views in one pass under ``per_group_batch_norm`` with
  SyncBatchNorm equal two separate whole-batch forwards (the authors' two encoder calls);
* the same two views as two plain SyncBatchNorm calls (no grouping): when ``view_grads`` fails, this says
  whether the grouping or SyncBatchNorm itself is at fault;

and times ``--steps`` synchronised training steps (images/s over all ranks). Prints the largest relative
differences and a PASS / FAIL line per check. TF32 and dropout are off so that the comparisons are exact up to float32 rounding.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcc.engine import distributed as ddp  # noqa: E402
from dcc.method.models.grouped_bn import per_group_batch_norm  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")
CHECKS = ("sup_grads", "sup_stats", "view_grads", "view_grads_two_calls")
TOL = 1e-3  # largest relative difference accepted (float32, different reduction orders)


def _model(device: torch.device):
    from hydra import compose, initialize_config_dir

    from dcc.config import register_configs
    from dcc.method.models import build_model

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", "backbone=resnet18", "dataset.scenes.pretrain.steps=0",
                                               "segnet.dropout=0", "segnet.classifier_dropout=0"])
    torch.manual_seed(0)
    return build_model(cfg).to(device).train()


def _batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 96, 96, generator=g)
    y = torch.randint(0, 11, (4, 96, 96), generator=g)
    v1, v2 = torch.randn(4, 3, 96, 96, generator=g), torch.randn(4, 3, 96, 96, generator=g)
    return x.to(device), y.to(device), v1.to(device), v2.to(device)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _stats(model) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}


def _views_loss(model, v1: torch.Tensor, v2: torch.Tensor, grouped: bool) -> torch.Tensor:
    if grouped:
        with per_group_batch_norm(model, 2):
            out = model(torch.cat([v1, v2]))
        o1, o2 = out.chunk(2)
    else:
        o1, o2 = model(v1), model(v2)
    return o1.pow(2).mean() + (o2 * 0.5).pow(2).mean()


def reference(device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """One process, whole batch, plain BN: labeled step (grads, stats) and the two-call per-view forward (grads)."""
    x, y, v1, v2 = _batch(device)
    model = _model(device)
    F.cross_entropy(model(x), y).backward()
    out = {"sup_grads": _grads(model), "sup_stats": _stats(model)}
    model = _model(device)
    _views_loss(model, v1, v2, grouped=False).backward()
    out["view_grads"] = _grads(model)
    return out


def no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(backend: str, steps: int, device_type: str) -> dict:
    """Runs in each spawned process; rank 0's return value comes back to the parent."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    no_tf32()  # a spawned process starts with torch's defaults (cuDNN convolutions in TF32)
    if device_type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:  # plumbing dry run: no SyncBatchNorm on CPU, so the BN-dependent checks are expected to differ
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if backend == "nccl" else None)
    try:
        x, y, v1, v2 = _batch(device)
        share = slice(rank * 4 // world, (rank + 1) * 4 // world)
        model = ddp.sync_batchnorm(_model(device), device)
        kinds = sorted({type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__})
        ddp.broadcast_module(model)
        F.cross_entropy(model(x[share]), y[share]).backward()
        ddp.average_gradients(model)
        out = {"bn_layers": kinds, "sup_grads": _grads(model), "sup_stats": _stats(model)}
        model = ddp.sync_batchnorm(_model(device), device)
        _views_loss(model, v1[share], v2[share], grouped=True).backward()
        ddp.average_gradients(model)
        out["view_grads"] = _grads(model)
        model = ddp.sync_batchnorm(_model(device), device)  # the same without grouping: SyncBN on two calls
        _views_loss(model, v1[share], v2[share], grouped=False).backward()
        ddp.average_gradients(model)
        out["view_grads_two_calls"] = _grads(model)
        # throughput of plain synchronised steps (SGD), per rank 4 images of 96 px
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        xb, yb = x.repeat(2, 1, 1, 1), y.repeat(2, 1, 1)
        for i in range(steps + 3):
            if i == 3:
                _sync(device)
                dist.barrier()
                t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            ddp.average_gradients(model)
            opt.step()
        _sync(device)
        out["img_s"] = steps * xb.shape[0] * world / (time.perf_counter() - t0)
        if rank != 0:
            return {}
        # compared here: the result travels through a pipe that the parent reads only after every process ended
        ref = reference(device)
        ref["view_grads_two_calls"] = ref["view_grads"]
        for key in CHECKS:
            out[f"{key}_norm"] = norm_rel(out[key], ref[key]) if set(out[key]) == set(ref[key]) else (float("inf"), "")
            out[key] = max_rel(out[key], ref[key]) if set(out[key]) == set(ref[key]) else (float("inf"), "parameter sets")
        return out
    finally:
        dist.destroy_process_group()


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, name = 0.0, ""
    for n in a:
        d = ((a[n].float() - b[n].float()).abs().max() / b[n].float().abs().max().clamp_min(1e-12)).item()
        if d > worst:
            worst, name = d, n
    return worst, name


def norm_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest ||a - b|| / ||b|| over tensors: less sensitive than max_rel to one tiny entry's rounding."""
    worst, name = 0.0, ""
    for n in a:
        d = ((a[n].double() - b[n].double()).norm() / b[n].double().norm().clamp_min(1e-30)).item()
        if d > worst:
            worst, name = d, n
    return worst, name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="nccl")
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the plumbing (gloo, no SyncBatchNorm)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    no_tf32()
    if cuda:
        print(f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}; torch {torch.__version__}, "
              f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}; backend {args.backend}, {args.nprocs} processes")
    t0 = time.perf_counter()
    got = ddp.spawn(worker, args.backend, args.steps, args.device, nprocs=args.nprocs)
    print(f"process group ran in {time.perf_counter() - t0:.1f} s; BN layers: {got['bn_layers']}; "
          f"{args.steps} synchronised steps: {got['img_s']:.1f} images/s over all ranks")
    ok = True
    for key in CHECKS:
        worst, name = got[key]
        passed = worst <= TOL
        ok &= passed
        print(f"{key}: largest relative difference {worst:.2e} ({name}); largest relative norm difference "
              f"{got[key + '_norm'][0]:.2e} ({got[key + '_norm'][1]}) -> {'PASS' if passed else 'FAIL'}")
    print("ALL PASS" if ok else "SOME CHECKS FAILED")


if __name__ == "__main__":
    main()
