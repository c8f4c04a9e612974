"""Training-step breakdown on the demo config: data, forward, loss, backward, optimizer; semi / supervised ratio.

    python benchmarks/step_bench.py [--steps 20] [--threads 2] [--repeats 3] [--profile] [hydra overrides ...]

Three trainers step in turn, one step each per round (so that a change of machine load hits them alike): a
supervised-only step and a CAC step (row VIII) in both ways of normalising the unlabeled views
(``trainer.view_bn``): ``per_view`` (each view its own BN statistics, the authors' step, the default) and
``shared`` (statistics over both views). Prints per-phase medians (wall seconds), the semi / supervised ratio
of each CAC mode from wall time and from this process's CPU time (steadier on a loaded machine), per repeat
and as median and spread over the repeats; with --profile the top operators of one CAC step of each mode.
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
from dcc.method.consistency import ConsistencyBranch  # noqa: E402
from dcc.data.build import build_data, labeled_loader, unlabeled_loader  # noqa: E402
from dcc.method.models import build_model  # noqa: E402
from dcc.engine.optim import build_optimizer  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")
PHASES = ("data", "forward_sup", "forward_unsup_and_loss", "backward", "optimizer")
MODES = {"supervised": None, "per_view": False, "shared": True}  # CAC modes: trainer.view_bn -> shared BN


class Trainer:
    """One model, optimizer and data stream; :meth:`step` times the phases of one training step."""

    def __init__(self, cfg, data, shared_bn: bool | None) -> None:
        torch.manual_seed(0)
        device = torch.device("cpu")
        self.cfg, self.semi = cfg, shared_bn is not None
        self.model = build_model(cfg).train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.branch = ConsistencyBranch(cfg.loss, shared_bn=bool(shared_bn))
        self.lab = iter(labeled_loader(cfg, data.train, data.labeled, start_step=0, device=device))
        self.unl = iter(unlabeled_loader(cfg, data.train, data.unlabeled, start_step=0, device=device))
        self.times: dict[str, list[float]] = {k: [] for k in (*PHASES, "cpu")}

    def step(self, record: bool = True) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        x, y = next(self.lab)
        batch = next(self.unl) if self.semi else None
        t1 = time.perf_counter()
        loss = F.cross_entropy(self.model(x), y, ignore_index=255)
        t2 = time.perf_counter()
        if self.semi:
            loss = loss + self.cfg.loss.weight * self.branch(self.model, batch)["loss_u"]
        t3 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t4 = time.perf_counter()
        self.optimizer.step()
        t5, c5 = time.perf_counter(), time.process_time()
        if record:
            for k, v in zip((*PHASES, "cpu"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, c5 - c0)):
                self.times[k].append(v)

    def medians(self) -> dict[str, float]:
        out = {k: statistics.median(v) for k, v in self.times.items()}
        out["total"] = sum(out[k] for k in PHASES)
        return out

    def profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as p:
            self.step(record=False)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


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
    data = build_data(cfg)
    semi_modes = [m for m in MODES if MODES[m] is not None]
    ratios: dict[str, list[float]] = {f"{m} {kind}": [] for m in semi_modes for kind in ("wall", "cpu")}
    print(f"threads={args.threads} steps={args.steps} repeats={args.repeats} overrides={overrides}")
    for r in range(args.repeats):
        trainers = {m: Trainer(cfg, data, shared) for m, shared in MODES.items()}
        for i in range(args.steps + 2):  # two warm-up rounds
            for t in trainers.values():
                t.step(record=i >= 2)
        med = {m: t.medians() for m, t in trainers.items()}
        print(f"repeat {r + 1}: median seconds per step")
        print(f"{'phase':<24}" + "".join(f"{m:>14}" for m in MODES))
        for k in (*PHASES, "total", "cpu"):
            print(f"{k:<24}" + "".join(f"{med[m][k]:>14.4f}" for m in MODES))
        for m in semi_modes:
            ratios[f"{m} wall"].append(med[m]["total"] / med["supervised"]["total"])
            ratios[f"{m} cpu"].append(med[m]["cpu"] / med["supervised"]["cpu"])
        print("semi / supervised: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in ratios.items()))
        if args.profile and r == 0:
            for m in semi_modes:
                print(f"profile of one CAC step, view_bn={m}")
                trainers[m].profile()
    for k, v in ratios.items():
        print(f"{k}: semi / supervised median {statistics.median(v):.2f} (min {min(v):.2f}, max {max(v):.2f}, "
              f"{len(v)} repeats)")


if __name__ == "__main__":
    main()
