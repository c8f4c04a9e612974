"""Training-step breakdown on the demo config: data, forward, loss, backward, optimizer; semi / supervised ratio.

    python benchmarks/step_bench.py [--steps 20] [--threads 2] [--repeats 3] [--profile] [hydra overrides ...]

Prints per-phase medians (seconds) for a supervised-only step and a CAC step (row VIII) in both ways of
normalising the unlabeled views (``trainer.view_bn``): ``per_view`` (each view its own BN statistics, the
authors' step, the default) and ``shared`` (statistics over both views); the semi / supervised ratio of each, per repeat
(the three measurements of a repeat are interleaved, so that load changes hit them alike) and their
median and spread; with --profile the top operators of one CAC step (torch.profiler).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402

from dcc.cli import quote_split_overrides  # noqa: E402
from dcc.config import register_configs  # noqa: E402
from dcc.consistency import ConsistencyBranch  # noqa: E402
from dcc.data.build import build_data, labeled_loader, unlabeled_loader  # noqa: E402
from dcc.models import build_model  # noqa: E402
from dcc.optim import build_optimizer  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def measure(cfg, semi: bool, steps: int, profile: bool = False, shared_bn: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    device = torch.device("cpu")
    data = build_data(cfg)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    branch = ConsistencyBranch(cfg.loss, shared_bn=shared_bn)
    lab = iter(labeled_loader(cfg, data.train, data.labeled, start_step=0, device=device))
    unl = iter(unlabeled_loader(cfg, data.train, data.unlabeled, start_step=0, device=device))
    phases: dict[str, list[float]] = {k: [] for k in ("data", "forward_sup", "forward_unsup_and_loss", "backward", "optimizer")}
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        x, y = next(lab)
        batch = next(unl) if semi else None
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), y, ignore_index=255)
        t2 = time.perf_counter()
        if semi:
            loss = loss + cfg.loss.weight * branch(model, batch)["loss_u"]
        t3 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t4 = time.perf_counter()
        optimizer.step()
        t5 = time.perf_counter()
        if i >= 2:
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[k].append(v)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            x, y = next(lab)
            batch = next(unl)
            loss = F.cross_entropy(model(x), y, ignore_index=255) + cfg.loss.weight * branch(model, batch)["loss_u"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    out = {k: statistics.median(v) for k, v in phases.items()}
    out["total"] = sum(out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=quote_split_overrides(["logger=none", *overrides]))
    modes = {"per_view": False, "shared": True}  # trainer.view_bn
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    print(f"threads={args.threads} steps={args.steps} repeats={args.repeats} overrides={overrides}")
    for r in range(args.repeats):
        sup = measure(cfg, semi=False, steps=args.steps)
        semi = {m: measure(cfg, semi=True, steps=args.steps, shared_bn=p, profile=args.profile and r == 0)
                for m, p in modes.items()}
        print(f"repeat {r + 1}")
        print(f"{'phase':<24}{'supervised s':>14}" + "".join(f"{'CAC ' + m + ' s':>18}" for m in modes))
        for k in sup:
            print(f"{k:<24}{sup[k]:>14.4f}" + "".join(f"{semi[m][k]:>18.4f}" for m in modes))
        for m in modes:
            ratios[m].append(semi[m]["total"] / sup["total"])
        print("semi / supervised step time: " + ", ".join(f"{m} {ratios[m][-1]:.2f}" for m in modes))
    for m in modes:
        vals = ratios[m]
        print(f"{m}: semi / supervised median {statistics.median(vals):.2f} (min {min(vals):.2f}, max {max(vals):.2f}, "
              f"{len(vals)} repeats)")


if __name__ == "__main__":
    main()
