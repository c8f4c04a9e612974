"""Synchronized batch norm for any backend (gloo on CPU, NCCL on GPU) that knows the per-view groups.

Under several processes (``trainer.devices > 1``) every BN layer of the model becomes a
:class:`SyncGroupedBatchNorm` (:func:`convert_sync_batch_norm`). In training mode it normalises with the
statistics of the whole batch, i.e. of every rank's share, reduced with ordinary ``torch.distributed``
collectives, so the step of N processes with B/N crops each is the step of one process with B crops.

It knows the groups of :func:`dcc.method.models.grouped_bn.per_group_batch_norm` natively: with
``dcc_groups = G`` (``trainer.view_bn=per_view``: G = 2, the two views) the local batch is G equal chunks, and
chunk g of every rank forms group g, normalised with group g's statistics over all ranks, as if each view
were forwarded alone by one process with the whole batch (the authors' separate encoder calls). Per layer
and step there is exactly one collective in the forward pass (the stacked moments of all groups) and one
in the backward pass (the stacked ``sum(dy)``, ``sum(dy * xhat)`` of all groups), so the collectives of
all ranks pair up whatever the grouping. Running statistics are updated group after group, with the
unbiased variance over the group's global count, as G separate single-process calls would update them
(``num_batches_tracked`` grows by G).

Numerics: each rank computes its groups' means and centred sums of squares in two passes
(``torch.var_mean``), and the reduced quantities (count, sum, sum of squares about zero rebuilt from
them) are combined in float64, where the cancellation of ``E[x^2] - E[x]^2`` is harmless; the backward
sums are reduced in float32 like BN's own. Low-precision inputs are normalised in float32 and returned in
their dtype. With one process (no process group, or a group of one) it is a batch norm that skips the
collectives: the same module class loads and runs anywhere, and its state dict is that of
``nn.BatchNorm2d``, so checkpoints move between numbers of processes.

Only ``torch.distributed`` is used here (the default group unless ``process_group`` is given):
``dcc.method`` does not import ``dcc.engine`` for this.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncGroupedBatchNorm", "convert_sync_batch_norm"]


def _world(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_reduce(t: Tensor, group: Any) -> Tensor:
    """Sum over the ranks of ``group``, in place (no-op for one process)."""
    if _world(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _grouped(x: Tensor, groups: int) -> Tensor:
    """``x`` [G*n, C, *spatial] viewed as [G, n, C, *spatial] (a view for any memory format)."""
    if x.shape[0] % groups:
        raise ValueError(f"batch norm over {groups} groups needs a batch divisible by {groups}, got {x.shape[0]}")
    return x.unflatten(0, (groups, x.shape[0] // groups))


def _bcast(t: Tensor, ndim: int) -> Tensor:
    """Per-(group, channel) [G, C] -> broadcastable against the grouped input [G, n, C, *spatial]."""
    return t.reshape(t.shape[0], 1, t.shape[1], *([1] * (ndim - 3)))


class _SyncGroupedBN(torch.autograd.Function):
    """Training-mode batch norm with per-group statistics summed over the ranks of a process group.

    Returns the normalised output; ``stats`` receives each group's global mean and unbiased variance
    (``"mean"``, ``"var"``: [G, C], no gradient) for the running statistics.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, groups: int,
                group: Any, stats: dict[str, Tensor]) -> Tensor:
        xg = _grouped(x, groups)
        xf = xg if xg.dtype in (torch.float32, torch.float64) else xg.float()
        dims = (1, *range(3, xg.dim()))
        local = xg[0, :, 0].numel()  # elements per channel and group on this rank
        var, mean = torch.var_mean(xf, dim=dims, unbiased=False)  # [G, C], two passes
        # count, sum x, sum x^2 of each group (float64), all groups' moments stacked: one all_reduce
        m = mean.double()
        moments = torch.cat([torch.full_like(m[:, :1], local), local * m, local * (var.double() + m * m)], 1)
        _all_reduce(moments, group)
        c = mean.shape[1]
        count = moments[:, :1]
        gmean = moments[:, 1 : 1 + c] / count
        gvar = (moments[:, 1 + c :] / count - gmean * gmean).clamp_min(0.0)
        unbiased = gvar * count / (count - 1).clamp_min(1.0)
        invstd = (gvar + eps).rsqrt().to(xf.dtype)
        gmean = gmean.to(xf.dtype)
        scale = invstd if weight is None else invstd * weight.to(xf.dtype)
        shift = -gmean * scale if bias is None else bias.to(xf.dtype) - gmean * scale
        y = torch.empty_like(x)  # written through its grouped view: the output is no view (in-place ReLU follows)
        torch.addcmul(_bcast(shift, xg.dim()), xf, _bcast(scale, xg.dim()), out=_grouped(y, groups))
        ctx.save_for_backward(x, weight, gmean, invstd, count.to(xf.dtype))
        ctx.groups, ctx.group = groups, group
        stats["mean"], stats["var"] = gmean, unbiased
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        xg = _grouped(x, ctx.groups)
        dyg = _grouped(dy, ctx.groups)
        nd = xg.dim()
        dims = (1, *range(3, nd))
        xf = xg if xg.dtype in (torch.float32, torch.float64) else xg.float()
        dyf = dyg if dyg.dtype == xf.dtype else dyg.to(xf.dtype)
        xhat = (xf - _bcast(mean, nd)) * _bcast(invstd, nd)
        sum_dy = dyf.sum(dims)  # [G, C] on this rank
        sum_dy_xhat = (dyf * xhat).sum(dims)
        dx = dw = db = None
        if need_w and weight is not None:
            dw = sum_dy_xhat.sum(0).to(weight.dtype)  # this rank's share: gradients are averaged over ranks after
        if need_b:
            db = sum_dy.sum(0).to(weight.dtype if weight is not None else dy.dtype)
        if need_x:
            c = mean.shape[1]
            both = _all_reduce(torch.cat([sum_dy, sum_dy_xhat], 1), ctx.group)  # one all_reduce, all groups
            g_dy, g_dy_xhat = both[:, :c] / count, both[:, c:] / count
            scale = invstd if weight is None else invstd * weight.to(xf.dtype)
            dx = (dyf - _bcast(g_dy, nd) - xhat * _bcast(g_dy_xhat, nd)) * _bcast(scale, nd)
            dx = dx.to(x.dtype).flatten(0, 1)
        return dx, dw, db, None, None, None, None


class SyncGroupedBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span every rank of ``process_group`` (default: the world),
    per group of ``dcc_groups`` equal batch chunks (see the module docstring). Any input of 2+ dimensions."""

    handles_groups = True  # per_group_batch_norm sets dcc_groups and leaves the forward alone

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self.dcc_groups = 1

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        batch_stats = self.training or not self.track_running_stats
        if not batch_stats:  # eval with running statistics: nothing to synchronise
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        groups = int(getattr(self, "dcc_groups", 1))
        if _world(self.process_group) == 1 and input[:1, 0].numel() * input.shape[0] // groups <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got input size {list(input.shape)}")
        stats: dict[str, Tensor] = {}
        y = _SyncGroupedBN.apply(input, self.weight, self.bias, self.eps, groups, self.process_group, stats)
        if self.training and self.track_running_stats:
            self._update_running_stats(stats["mean"], stats["var"])
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor) -> None:
        """One update per group, in group order: what separate calls on each group would leave."""
        for g in range(mean.shape[0]):
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(mean[g].to(self.running_mean.dtype), factor)
            self.running_var.lerp_(var[g].to(self.running_var.dtype), factor)


def convert_sync_batch_norm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Every batch-norm layer of ``module`` (``nn.BatchNorm1d/2d/3d``, torch's ``SyncBatchNorm``) replaced by a
    :class:`SyncGroupedBatchNorm` that keeps its parameters (the same tensors), buffers, mode and groups."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncGroupedBatchNorm):
        new = SyncGroupedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats, process_group)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.training = module.training
        new.dcc_groups = getattr(module, "dcc_groups", 1)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batch_norm(child, process_group)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
