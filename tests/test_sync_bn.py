"""The project's synchronized batch norm (``dcc.method.models.sync_bn``) against ``torch.nn.BatchNorm2d``:
on one process, and over 2 gloo processes (CPU) each holding half of every per-view group."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dcc import distributed as ddp
from dcc.method.models.grouped_bn import per_group_batch_norm
from dcc.method.models.sync_bn import SyncGroupedBatchNorm, convert_sync_batch_norm
from tests.conftest import compose_cfg


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))


def _bn(momentum: float | None = 0.1) -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, 6, 7, generator=g) * 3 + 5  # a mean far from 0: the variance must not cancel
    x[n // 2 :] = x[n // 2 :] * 0.5 - 2  # the second group (view) has other statistics
    return x, torch.randn(n, 5, 6, 7, generator=g)


def _reference(bn: nn.Module, x: torch.Tensor, w: torch.Tensor, groups: int) -> dict[str, torch.Tensor]:
    """``groups`` separate calls of torch's BN, one per chunk (the authors' separate view calls)."""
    x = x.clone().requires_grad_()
    y = torch.cat([bn(c) for c in x.chunk(groups)])
    (y * w).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "mean": bn.running_mean.clone(), "var": bn.running_var.clone()}


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_batchnorm2d_on_one_process(groups, momentum):
    """Outputs, gradients wrt input / weight / bias, running mean and (unbiased) variance, num_batches_tracked,
    eval mode; with 2 groups, against 2 separate calls; channels_last input too."""
    ref_bn = _bn(momentum)
    sync = convert_sync_batch_norm(copy.deepcopy(ref_bn))
    assert type(sync) is SyncGroupedBatchNorm
    x, w = _data()
    ref = _reference(ref_bn, x, w, groups)
    for fmt in (torch.contiguous_format, torch.channels_last):
        bn = copy.deepcopy(sync)
        xs = x.clone().to(memory_format=fmt).requires_grad_()
        with per_group_batch_norm(bn, groups):
            y = bn(xs)
        (y * w).sum().backward()
        got = {"y": y, "dx": xs.grad, "dw": bn.weight.grad, "db": bn.bias.grad, "mean": bn.running_mean,
               "var": bn.running_var}
        for k in ref:
            assert _rel(got[k], ref[k]) < 1e-6, (k, fmt, _rel(got[k], ref[k]))
        assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == groups
        bn.eval()
        ref_bn.eval()
        assert _rel(bn(x), ref_bn(x)) < 1e-7
        ref_bn.train()


def test_conversion_keeps_parameters_buffers_and_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), _bn(), nn.Sequential(nn.BatchNorm1d(4)))
    weight = model[1].weight
    keys = model.state_dict().keys()
    model.eval()
    convert_sync_batch_norm(model)
    assert type(model[1]) is SyncGroupedBatchNorm and type(model[2][0]) is SyncGroupedBatchNorm
    assert model[1].weight is weight and not model[1].training  # the same parameters: an optimiser keeps working
    assert model.state_dict().keys() == keys  # checkpoints load between 1 and N processes
    with per_group_batch_norm(model, 2):
        assert model[1].dcc_groups == 2 and "forward" not in model[1].__dict__  # grouped natively, one call


def test_one_value_per_channel_is_refused_on_one_process():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        SyncGroupedBatchNorm(3)(torch.randn(1, 3, 1, 1))


def _two_ranks(groups: int) -> dict[str, torch.Tensor]:
    """In each of 2 gloo processes: rank r holds half of every group of the batch of ``_data``."""
    with ddp.process_group(compose_cfg(["trainer.devices=2", "trainer.device=cpu"]).trainer, torch.device):
        torch.set_num_threads(1)
        r = ddp.rank()
        x, w = _data()
        # group g of the whole batch is x.chunk(groups)[g]; rank r takes the r-th half of each group
        take = lambda t: torch.cat([c.chunk(2)[r] for c in t.chunk(groups)])  # noqa: E731
        bn = convert_sync_batch_norm(_bn())
        xs = take(x).requires_grad_()
        with per_group_batch_norm(bn, groups):
            y = bn(xs)
        (y * take(w)).sum().backward()
        grads = torch.cat([bn.weight.grad, bn.bias.grad])
        ddp.sum_over_ranks(grads)  # the trainer averages gradients over ranks; the loss here is a plain sum
        ys, dxs = zip(*ddp.gather_objects((y.detach(), xs.grad)))  # each rank's (y, dx), in rank order
        # back to the whole batch's order: group-major, rank-minor
        y_all = torch.cat([torch.cat([ys[q].chunk(groups)[g] for q in range(2)]) for g in range(groups)])
        dx_all = torch.cat([torch.cat([dxs[q].chunk(groups)[g] for q in range(2)]) for g in range(groups)])
        return {"y": y_all, "dx": dx_all, "dw": grads[:5], "db": grads[5:], "mean": bn.running_mean,
                "var": bn.running_var, "tracked": bn.num_batches_tracked}


@pytest.mark.parametrize("groups", [1, 2])
def test_two_gloo_processes_with_half_of_each_group_match_one_process(groups):
    """2 processes with half of each group each = torch's BN on the whole batch, one call per group (to float
    rounding); and far from what a BN that pooled the groups or kept each rank's statistics would give."""
    got = ddp.spawn(_two_ranks, groups, nprocs=2)
    x, w = _data()
    ref = _reference(_bn(), x, w, groups)
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-6, (k, _rel(got[k], ref[k]))
    assert int(got["tracked"]) == groups
    # what the mistakes would give: the groups pooled (one call on the whole batch); each rank its own half
    pooled = _reference(_bn(), x, w, 1)
    per_rank = _reference(_bn(), x, w, 2 * groups)
    for wrong in ([pooled] if groups > 1 else []) + [per_rank]:
        assert _rel(got["y"], wrong["y"]) > 1e-2 and _rel(got["dx"], wrong["dx"]) > 1e-2
