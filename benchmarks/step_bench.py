"""Training-step breakdown on the demo config: data, forward, loss, backward, optimizer; semi / supervised ratio.

    python benchmarks/step_bench.py [--steps 20] [--threads 2] [--repeats 3] [--profile] [hydra overrides ...]

Three trainers step in turn, one step each per round (so that a change of machine load hits them alike): a
supervised-only step and a CAC step (row VIII) in both ways of normalising the unlabeled views
(``trainer.view_bn``): ``per_view`` (each view its own BN statistics, the authors' step, the default) and
``shared`` (statistics over both views). Prints per-phase medians (wall seconds), the semi / supervised ratio
of each CAC mode from wall time and from this process's CPU time (steadier on a loaded machine), per repeat
and as median and spread over the repeats; with --profile the top operators of one CAC step of each mode.

On a GPU (``--device cuda``) it times whole steps of the engine's own ``Trainer.step`` (what ``run.py`` runs:
autocast, channels_last, torch.compile, the per-view BN) for each ``--variants`` entry, a supervised-only and a
CAC (row VIII, from step 0) trainer each, on batches prepared beforehand by the real loaders and kept on the
device (so the figures are the step's, not the data pipeline's). Prints images per second (labeled images, and
all images the networks see: labeled + two views of each unlabeled image), the peak GPU memory and the
semi / supervised ratio, per repeat, and a JSON line per variant. ``--synthetic-voc`` trains on random
VOC-sized images (375 x 500, 21 classes) through the VOC preset's transforms, so no dataset is needed:

    python benchmarks/step_bench.py --device cuda --synthetic-voc --variants fp32,bf16,bf16_cl,bf16_cl_compile \
        experiment=voc_deeplabv3plus_r50 backbone.weights=null
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
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
from dcc.data.build import DataBundle  # noqa: E402
from dcc.data.datasets import ArraySource  # noqa: E402

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
        self.optimizer = build_optimizer(cfg.optim, self.model)
        self.branch = ConsistencyBranch(cfg.loss, shared_bn=bool(shared_bn))
        self.lab = iter(labeled_loader(cfg.dataset, cfg.trainer, data.train, data.labeled, start_step=0, device=device))
        self.unl = iter(unlabeled_loader(cfg.dataset, cfg.trainer, data.train, data.unlabeled, stride=cfg.segnet.consistency_stride, context=cfg.loss.context, start_step=0, device=device))
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


VARIANTS = {  # name -> trainer.precision, trainer.channels_last, trainer.compile
    "fp32": ("fp32", False, False), "fp32_cl": ("fp32", True, False), "bf16": ("bf16", False, False),
    "bf16_cl": ("bf16", True, False), "bf16_cl_compile": ("bf16", True, True), "fp32_compile": ("fp32", False, True),
}


def synthetic_voc(num: int = 48, seed: int = 0) -> DataBundle:
    """Random VOC-sized images (375 x 500) with blocky 21-class masks; half labeled, half unlabeled."""
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, (num, 375, 500, 3), dtype=np.uint8)
    blocks = g.integers(0, 21, (num, 375 // 25 + 1, 500 // 25 + 1), dtype=np.uint8)
    masks = np.ascontiguousarray(blocks.repeat(25, 1).repeat(25, 2)[:, :375, :500])
    half = np.arange(num // 2)
    return DataBundle(train=ArraySource(images, masks), val=ArraySource(images[:2], masks[:2]),
                      labeled=half, unlabeled=half + num // 2)


def throughput(args: argparse.Namespace, cfg, data: DataBundle) -> None:
    """Whole engine steps on the GPU per variant: images/s, peak memory, semi / supervised (see the docstring)."""
    from omegaconf import OmegaConf

    from dcc.engine.trainer import Trainer as EngineTrainer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, "
          f"batch {cfg.trainer.batch_size}+{cfg.trainer.unlabeled_batch_size}, crop {cfg.dataset.crop_size}, "
          f"backbone {cfg.backbone.name}, segnet {cfg.segnet.name}")
    lab = list(itertools.islice(labeled_loader(cfg.dataset, cfg.trainer, data.train, data.labeled, start_step=0, device=device), args.batches))
    unl = list(itertools.islice(unlabeled_loader(cfg.dataset, cfg.trainer, data.train, data.unlabeled, stride=cfg.segnet.consistency_stride, context=cfg.loss.context, start_step=0, device=device), args.batches))
    lab = [(x.to(device), y.to(device)) for x, y in lab]
    unl = [{k: v.to(device) for k, v in b.items()} for b in unl]
    per_step_images = cfg.trainer.batch_size, cfg.trainer.batch_size + 2 * cfg.trainer.unlabeled_batch_size
    for name in args.variants.split(","):
        precision, channels_last, compiled = VARIANTS[name]
        results: dict[str, dict[str, float]] = {}
        for method in ("suponly", "cac"):
            c = OmegaConf.merge(cfg, {"trainer": {"precision": precision, "channels_last": channels_last,
                                                  "compile": compiled}, "loss": {"method": method, "start_step": 0}})
            if cuda:
                torch.cuda.empty_cache()
            t_build = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                trainer = EngineTrainer(c, data, device, None, Path(tmp))
                batches = itertools.cycle(unl)
                trainer._unlabeled_batch = lambda: next(batches)  # prepared pairs, already on the device
                stream = itertools.cycle(lab)
                for _ in range(args.warmup):
                    trainer.step(*next(stream))
                sync()
                warm_s = time.perf_counter() - t_build
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for _ in range(args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        terms = trainer.step(*next(stream))
                    sync()
                    times.append((time.perf_counter() - t0) / args.steps)
                loss = float(terms["loss"].detach())
            step_s = statistics.median(times)
            n_img = per_step_images[method == "cac"]
            results[method] = dict(step_s=step_s, step_min=min(times), step_max=max(times),
                                   labeled_img_s=cfg.trainer.batch_size / step_s, all_img_s=n_img / step_s,
                                   peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
                                   warmup_s=warm_s, loss=loss)
            del trainer
        ratio = results["cac"]["step_s"] / results["suponly"]["step_s"]
        for method, r in results.items():
            print(f"{name:<16} {method:<8} step {r['step_s'] * 1e3:7.1f} ms (min {r['step_min'] * 1e3:.1f}, "
                  f"max {r['step_max'] * 1e3:.1f}, {args.repeats}x{args.steps} steps)  labeled img/s "
                  f"{r['labeled_img_s']:7.1f}  all img/s {r['all_img_s']:7.1f}  peak {r['peak_gib']:6.2f} GiB  "
                  f"build+warm-up {r['warmup_s']:5.1f} s  loss {r['loss']:.3f}", flush=True)
        print(f"{name:<16} semi / supervised (step time) {ratio:.2f}", flush=True)
        print(json.dumps({"variant": name, "semi_over_sup": ratio, **{f"{m}_{k}": v for m, res in results.items()
                                                                       for k, v in res.items()}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu: phase breakdown (unless --throughput); cuda: throughput")
    parser.add_argument("--throughput", action="store_true", help="whole engine steps per variant (default on a GPU)")
    parser.add_argument("--variants", default="fp32,bf16,bf16_cl,bf16_cl_compile", help=f"GPU: of {sorted(VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=5, help="GPU: untimed steps per trainer")
    parser.add_argument("--batches", type=int, default=4, help="GPU: prepared batches, cycled")
    parser.add_argument("--synthetic-voc", action="store_true", help="random VOC-sized images instead of dataset.*")
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=quote_split_overrides(["logger=none", *overrides]))
    data = synthetic_voc() if args.synthetic_voc else build_data(cfg)
    if args.throughput or args.device != "cpu":
        throughput(args, cfg, data)
        return
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
