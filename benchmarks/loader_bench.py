"""Samples per second of the paired-crop (unlabeled) loader and the labeled loader, per worker count.

    python benchmarks/loader_bench.py [--batches 50] [--workers 0 1 2] [hydra overrides ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402

from dcc.cli import quote_split_overrides  # noqa: E402
from dcc.config import register_configs  # noqa: E402
from dcc.data.build import build_data, labeled_loader, unlabeled_loader  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(1)
    register_configs()
    for workers in args.workers:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=quote_split_overrides(
                ["logger=none", f"trainer.num_workers={workers}", *overrides]))
        data = build_data(cfg)
        for name, make, per_batch in (
            ("paired (unlabeled)", unlabeled_loader, cfg.trainer.unlabeled_batch_size),
            ("labeled", labeled_loader, cfg.trainer.batch_size),
        ):
            indices = data.unlabeled if make is unlabeled_loader else data.labeled
            it = iter(make(cfg, data.train, indices, start_step=0, device=torch.device("cpu")))
            next(it)  # worker start-up
            t = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            rate = args.batches * per_batch / (time.perf_counter() - t)
            print(f"workers={workers} {name:<20} {rate:8.1f} samples/s (crop {cfg.dataset.crop_size})")


if __name__ == "__main__":
    main()
