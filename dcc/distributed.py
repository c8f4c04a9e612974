"""Data-parallel training over several processes: the process group, rank helpers, collectives, a local spawner.

Where the processes come from (``trainer.devices`` x ``trainer.nodes`` of them, one per GPU):

* ``torchrun`` (or any launcher) exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* a SLURM job with several tasks (``hydra/launcher=slurm``: ``tasks_per_node=${trainer.devices}``,
  ``nodes=${trainer.nodes}``): ``submitit.helpers.TorchDistributedEnvironment`` exports them from SLURM's;
* neither (one machine, ``python run.py trainer.devices=2``): :func:`spawn` starts the processes itself
  (``torch.multiprocessing``, a free local port), each of which runs the job with the variables set.

Backend: NCCL on GPUs, gloo on CPU (``trainer.dist_backend``). Without an initialised process group every
helper below is the identity / a no-op, so single-process training runs exactly the code it ran before.

What is exchanged and when (see ``docs/several-gpus.md``): gradients are averaged over ranks after
each backward (:func:`average_gradients`, bucketed all_reduce); the supervised and consistency losses are
normalised by counts summed over ranks (:func:`global_mean`); the negative bank is all-gathered
(``dcc.method.bank``); logged scalars are averaged once per log interval (:func:`mean_over_ranks`); BN buffers
are averaged before evaluation and checkpoints (:func:`average_buffers`; with the synchronized batch norm of
:func:`dcc.engine.trainer.sync_batchnorm` they already agree, so this only guards against drift).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import socket
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dcc.config import TrainerConfig

log = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_failed_at: float | None = None  # when an error left this process's process group (see spawn)


# ----------------------------------------------------------------------------------------------- ranks
def resolve_device(name: str) -> torch.device:
    """``trainer.device``: ``auto`` is CUDA when available, else CPU; anything else is taken as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def is_main() -> bool:
    """Rank 0: the only process that talks to MLflow and writes checkpoints."""
    return rank() == 0


def share(total: int, key: str) -> int:
    """This rank's part of a total per-step count (``trainer.batch_size``, ...): ``total / world_size``."""
    world = world_size()
    if total % world:
        raise ValueError(f"{key}={total} is the total over all processes and must be divisible by their number "
                         f"({world} = trainer.devices x trainer.nodes)")
    return total // world


# ------------------------------------------------------------------------------------------ start / stop
def _slurm_tasks() -> int:
    """Tasks of this SLURM job step (srun sets it; a batch script's own step counts as one task)."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)


def launched() -> bool:
    """True when an outside launcher started this process as one of several (torchrun's variables, or a
    SLURM job with several tasks)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or _slurm_tasks() > 1


def requested(trainer: TrainerConfig) -> int:
    """Number of processes the config asks for: ``trainer.devices x trainer.nodes``."""
    return int(trainer.devices) * int(trainer.nodes)


def _export_slurm_env() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT of this SLURM task (unless already set)."""
    if all(k in os.environ for k in _ENV):
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def _backend(trainer: TrainerConfig, device: torch.device) -> str:
    name = str(getattr(trainer.dist_backend, "name", trainer.dist_backend))
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return name


@contextlib.contextmanager
def process_group(trainer: TrainerConfig, resolve_device: Callable[[str], torch.device]) -> Iterator[torch.device]:
    """Join the process group this process was started in (if any) and yield its device.

    ``cuda`` / ``auto`` become ``cuda:LOCAL_RANK``. On CPU the torch threads are split between the
    processes of this machine unless ``trainer.threads`` is set.
    """
    device = resolve_device(trainer.device)
    if not launched():
        if requested(trainer) > 1:
            raise RuntimeError("trainer.devices x trainer.nodes > 1 but this process was not started as one of "
                               "several (no WORLD_SIZE / SLURM tasks): use run.py, torchrun or hydra/launcher=slurm")
        yield device
        return
    if _slurm_tasks() > 1:
        _export_slurm_env()
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    if world != requested(trainer):
        raise RuntimeError(f"{world} processes were started but trainer.devices={trainer.devices} x "
                           f"trainer.nodes={trainer.nodes} = {requested(trainer)}: set them to match the launcher")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif trainer.threads is None:
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_machine))
    backend = _backend(trainer, device)
    dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=world)
    log.info("rank %d of %d (%s, %s)", rank(), world, backend, device)
    try:
        yield device
    except BaseException:
        global _failed_at
        _failed_at = time.time()  # before the group goes: the other ranks fail after this, on the closed connections
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(RuntimeError):
    """A process of a spawned group failed; the message names its rank and its error, on one line."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _worker(local_rank: int, fn: Callable[..., Any], args: tuple, world: int, port: int, results: Any,
            errors: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(local_rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(world)})
    if local_rank == 0:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    else:  # rank 0 prints what one process would print; errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        out = fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line, then this process exits
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            import traceback

            traceback.print_exc()
        errors.put((_failed_at or time.time(), local_rank, _one_line(exc)))
        raise SystemExit(1) from None  # not an Exception: torch's wrapper writes no traceback for the parent
    if local_rank == 0:  # plain pickle: tensors are copied (torch's queue would share memory of a process that ends)
        results.put(pickle.dumps(out))


def spawn(fn: Callable[..., Any], *args: Any, nprocs: int) -> Any:
    """Run ``fn(*args)`` in ``nprocs`` new processes (spawn) of one process group on this machine;
    returns rank 0's result. A failing process stops all of them and raises :class:`RankError` here, whose
    one-line message names the rank that failed first and its error (no traceback; ``HYDRA_FULL_ERROR=1``
    prints the children's). The others usually fail next on their collectives ("Connection reset by peer"):
    each rank reports when its error left its process group, and the earliest is the one named."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    ctx = mp.get_context("spawn")
    results, errors = ctx.SimpleQueue(), ctx.SimpleQueue()
    quiet = logging.getLogger("torch.multiprocessing.spawn")  # "Terminating process ... via SIGTERM"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        procs = mp.start_processes(_worker, args=(fn, args, nprocs, free_port(), results, errors), nprocs=nprocs,
                                   start_method="spawn", join=False)
        while not procs.join():
            pass
    except ProcessException as exc:
        reported = []
        while not errors.empty():
            reported.append(errors.get())
        if reported:  # the earliest error: a rank's failure makes the others fail on their collectives after it
            _, first, text = min(reported)
        else:  # killed without a Python error (a signal, the OOM killer)
            first, code = exc.error_index, getattr(exc, "exit_code", None)
            how = f"signal {exc.signal_name}" if getattr(exc, "signal_name", None) else f"exit code {code}"
            text = f"the process ended ({how})"
        raise RankError(f"rank {first} of {nprocs} failed: {text}") from None
    finally:
        quiet.setLevel(level)
    return pickle.loads(results.get())


# ----------------------------------------------------------------------------------------- collectives
def average_gradients(module: nn.Module, bucket_bytes: int = 1 << 26) -> None:
    """Replace every gradient by its mean over ranks (bucketed all_reduce): DDP's gradient averaging.

    Done explicitly after backward rather than with ``DistributedDataParallel``, whose reducer needs every
    parameter to receive a gradient in every step or ``find_unused_parameters``, which only follows the
    outputs of the wrapper's ``forward``: the consistency branch calls the segmentor's methods directly
    and the projector has no gradient before ``loss.start_step``. Parameters without a gradient (the same
    ones on every rank) are skipped, as a single process's optimiser skips them.
    """
    world = world_size()
    if world == 1:
        return
    bucket: list[Tensor] = []

    def reduce(grads: list[Tensor]) -> None:
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, avg in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(avg)

    size = 0
    for p in module.parameters():
        g = p.grad
        if g is None:
            continue
        if bucket and (g.dtype != bucket[0].dtype or size + g.numel() * g.element_size() > bucket_bytes):
            reduce(bucket)
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    if bucket:
        reduce(bucket)


def global_mean(totals: Tensor, counts: Sequence[int] | Tensor, *, min_count: int = 0) -> Tensor:
    """``totals / counts`` (elementwise) where the counts are summed over ranks, times the world size.

    ``totals`` is this rank's sum of per-item losses. Since gradients are averaged over ranks, the
    gradient of the returned value averaged over ranks is that of ``sum over ranks of totals / sum of
    counts``: the single-process mean over the whole batch, whatever the per-rank counts (pixels that
    are not ``ignore_index``, anchors that pass a mask). The mean over ranks of the returned values is
    that single-process value too. Counts carry no gradient; ``min_count`` floors the summed count.
    """
    counts = torch.as_tensor(counts, device=totals.device)
    world = world_size()
    if world > 1:
        counts = counts.clone()
        dist.all_reduce(counts)
        totals = totals * world
    return totals / counts.clamp_min(min_count)


def all_gather_cat(tensor: Tensor) -> Tensor:
    """The rows of ``tensor`` of every rank, concatenated in rank order (no gradient; same shape on every rank)."""
    world = world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


def gather_rows(tensor: Tensor) -> Tensor:
    """The rows of ``tensor`` of every rank, concatenated in rank order, on the CPU; the row counts may differ
    between ranks (one object gather)."""
    return torch.cat([t for t in gather_objects(tensor.cpu())])


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over ranks, in place (one all_reduce); unchanged for one process."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def rank_items(num_items: int) -> list[int]:
    """This rank's share of ``range(num_items)``: every item exactly once over all ranks (unlike
    DistributedSampler, which pads with repeats); everything for one process."""
    return list(range(rank(), num_items, world_size()))


def mean_over_ranks(values: Tensor) -> Tensor:
    """Elementwise mean over ranks (one all_reduce)."""
    world = world_size()
    if world == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any (one all_reduce, a host sync)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (they should already agree: same seed, same checkpoint)."""
    if world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, 0)


def average_buffers(module: nn.Module) -> None:
    """Floating-point buffers (BN running statistics) averaged over ranks. With the synchronized batch norm
    (:func:`dcc.engine.trainer.sync_batchnorm`) every rank updates them from the same reduced statistics, so they already agree;
    this keeps them identical to the last bit before evaluation and checkpoints."""
    if world_size() == 1:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if bufs:
        flat = torch._utils._flatten_dense_tensors([b.data for b in bufs])
        dist.all_reduce(flat)
        flat.div_(world_size())
        for b, avg in zip(bufs, torch._utils._unflatten_dense_tensors(flat, [b.data for b in bufs])):
            b.data.copy_(avg)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` for one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------------ model
def seed_rank(seed: int) -> None:
    """Distinct torch RNG streams per rank (dropout, negative sampling) after a common model init."""
    if world_size() > 1:
        digest = hashlib.blake2b(f"{seed}/rank{rank()}".encode(), digest_size=8).digest()
        torch.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
