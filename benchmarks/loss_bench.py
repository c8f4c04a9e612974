"""Benchmark: streaming directional contrastive loss vs. the authors' chunk-of-8,000 strategy.

Run from the repository root:

    python benchmarks/loss_bench.py            # N=3200, M=12800, C=128, 2 threads

Prints, for both strategies, forward+backward time (median of ``--repeats`` runs, the two
strategies interleaved so that load from other processes hits both alike), the peak extra memory
of one forward+backward, the loss values and their relative difference.

Memory method. ``tracemalloc`` does not see torch's allocations, so each strategy is measured in a
fresh child process from the kernel's resident-set high-water mark: the child builds the inputs,
runs a small warm-up, resets the high-water mark (``echo 5 > /proc/self/clear_refs``), runs one
forward+backward and reports ``VmHWM - VmRSS(before)``. This is done twice:

* ``default malloc``: glibc as configured; includes allocator caching/fragmentation.
* ``mmap malloc``: ``MALLOC_MMAP_THRESHOLD_=65536`` so every tensor buffer over 64 KiB is its own
  mapping, unmapped on free; the high-water mark then tracks the peak of live tensor bytes.

Linux only (needs ``/proc/self/status`` and ``/proc/self/clear_refs``).

On a GPU (``--device cuda``) the timings synchronise the device around each run and the memory figure is
``torch.cuda.max_memory_allocated`` minus the memory allocated before the run (in this process: the caching
allocator's counters are exact, no child process is needed).

    python benchmarks/loss_bench.py --device cuda --n 6400 --m 12800      # VOC size: 8 images x 40 x 40 cells
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcc.method.losses import directional_contrastive_loss  # noqa: E402
from benchmarks.losses_chunked import chunked_directional_contrastive_loss  # noqa: E402

STRATEGIES: dict[str, Callable[..., torch.Tensor]] = {
    "authors_chunk8000_ckpt": chunked_directional_contrastive_loss,
    "streaming": directional_contrastive_loss,
}
STREAM_CHUNK: dict[str, int] = {"chunk_size": 4096}  # set from --chunk-size


def streaming(*args: torch.Tensor, **kwargs) -> torch.Tensor:
    """The streaming loss with the chunk size given on the command line."""
    return directional_contrastive_loss(*args, **kwargs, **STREAM_CHUNK)


STRATEGIES["streaming"] = streaming
BOOL_FLAGS = ("directional", "negative_sampling", "positive_filtering")
FLAGS: dict = dict(temperature=0.1, pos_threshold=0.75, directional=True, negative_sampling=True, positive_filtering=True)


def make_inputs(n: int, m: int, c: int, classes: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random unit features, uniform [0, 1) confidences and uniform pseudo-labels (float32)."""
    g = torch.Generator().manual_seed(seed)
    f1 = F.normalize(torch.randn(n, c, generator=g), dim=1)
    f2 = F.normalize(f1 + torch.randn(n, c, generator=g), dim=1)
    conf1, conf2 = torch.rand(n, generator=g), torch.rand(n, generator=g)
    label1 = torch.randint(0, classes, (n,), generator=g)
    label2 = torch.randint(0, classes, (n,), generator=g)
    neg = F.normalize(torch.randn(m, c, generator=g), dim=1)
    neg_label = torch.randint(0, classes, (m,), generator=g)
    return f1, f2, conf1, conf2, label1, label2, neg, neg_label


def cuda_peak_mib(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> float:
    """Peak extra GPU memory (MiB) of one forward+backward, from the caching allocator's counters."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward(fn, inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def forward_backward(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One forward+backward; returns the loss value and the gradients w.r.t. feat1 and feat2."""
    f1 = inputs[0].clone().requires_grad_(True)
    f2 = inputs[1].clone().requires_grad_(True)
    loss = fn(f1, f2, *inputs[2:], **FLAGS)
    loss.backward()
    return float(loss.detach()), f1.grad, f2.grad


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure_memory_child(strategy: str, args: argparse.Namespace) -> None:
    """Child-process entry: print the peak extra RSS (MiB) of one forward+backward as JSON."""
    torch.set_num_threads(args.threads)
    fn = STRATEGIES[strategy]
    forward_backward(fn, make_inputs(64, 256, args.c, args.classes, seed=1))  # warm-up / lazy init
    inputs = make_inputs(args.n, args.m, args.c, args.classes, args.seed)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    forward_backward(fn, inputs)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_extra_mib": (peak - before) / 1024}))


def measure_memory(strategy: str, args: argparse.Namespace, mmap_malloc: bool) -> float:
    """Median over ``args.memory_runs`` fresh child processes of the peak extra RSS, MiB."""
    env = dict(os.environ)
    if mmap_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--child-memory", strategy] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("n", "m", "c", "classes", "seed", "threads", "chunk_size")
    ] + [f"--{'' if FLAGS[k] else 'no-'}{k.replace('_', '-')}" for k in BOOL_FLAGS]
    peaks = []
    for _ in range(args.memory_runs):
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak_extra_mib"])
    return statistics.median(peaks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3200, help="overlap pixels (anchors per direction)")
    p.add_argument("--m", type=int, default=12800, help="negatives")
    p.add_argument("--c", type=int, default=128, help="feature dim")
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=4096, help="negatives per block of the streaming loss")
    p.add_argument("--repeats", type=int, default=7, help="timed forward+backward runs per strategy")
    p.add_argument("--memory-runs", type=int, default=3, help="child processes per memory figure (median)")
    for k in BOOL_FLAGS:
        p.add_argument(f"--{k.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--child-memory", choices=sorted(STRATEGIES), help=argparse.SUPPRESS)
    args = p.parse_args()
    FLAGS.update({k: getattr(args, k) for k in BOOL_FLAGS})
    STREAM_CHUNK["chunk_size"] = args.chunk_size
    if args.child_memory:
        measure_memory_child(args.child_memory, args)
        return

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    inputs = tuple(t.to(device) for t in make_inputs(args.n, args.m, args.c, args.classes, args.seed))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    conf1, conf2 = inputs[2], inputs[3]
    pf = FLAGS["positive_filtering"]
    k12 = int((((conf1 < conf2) | (not args.directional)) & ((conf2 > FLAGS["pos_threshold"]) | (not pf))).sum())
    k21 = int((((conf2 < conf1) | (not args.directional)) & ((conf1 > FLAGS["pos_threshold"]) | (not pf))).sum())
    print(f"N={args.n} M={args.m} C={args.c} classes={args.classes} threads={torch.get_num_threads()} "
          f"streaming chunk={args.chunk_size} device={device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''} flags={FLAGS}")
    print(f"anchors passing the masks: l12 {k12}, l21 {k21} (of {args.n} each)")

    results = {name: forward_backward(fn, inputs) for name, fn in STRATEGIES.items()}  # warm-up + values
    times: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    for _ in range(args.repeats):
        for name, fn in STRATEGIES.items():
            sync()
            t0 = time.perf_counter()
            forward_backward(fn, inputs)
            sync()
            times[name].append(time.perf_counter() - t0)

    base, ours = "authors_chunk8000_ckpt", "streaming"
    if device.type == "cuda":  # one exact figure, reported in both columns
        mem = {name: (cuda_peak_mib(fn, inputs),) * 2 for name, fn in STRATEGIES.items()}
        heads = ("peak MiB (CUDA allocator)", "(same)")
    else:
        mem = {name: (measure_memory(name, args, False), measure_memory(name, args, True)) for name in STRATEGIES}
        heads = ("peak MiB (default malloc)", "peak MiB (mmap malloc)")
    print(f"{'strategy':<24} {'median s':>9} {'min s':>7} {'max s':>7} {heads[0]:>26} {heads[1]:>23} {'loss':>12}")
    for name in STRATEGIES:
        t = times[name]
        print(f"{name:<24} {statistics.median(t):>9.3f} {min(t):>7.3f} {max(t):>7.3f} {mem[name][0]:>26.1f} "
              f"{mem[name][1]:>23.1f} {results[name][0]:>12.6f}")
    rel = abs(results[ours][0] - results[base][0]) / abs(results[base][0])
    g1 = (results[ours][1] - results[base][1]).abs().max().item()
    g2 = (results[ours][2] - results[base][2]).abs().max().item()
    print(f"time ratio streaming/authors (median): {statistics.median(times[ours]) / statistics.median(times[base]):.3f}")
    print(f"peak-memory ratio streaming/authors: {heads[0]} {mem[ours][0] / mem[base][0]:.3f}, "
          f"{heads[1]} {mem[ours][1] / mem[base][1]:.3f}")
    print(f"loss relative difference: {rel:.2e}; max |grad diff| feat1 {g1:.2e}, feat2 {g2:.2e}")


if __name__ == "__main__":
    main()
