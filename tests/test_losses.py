"""Tests of dcc.method.losses against a plain dense reference written from Eq. (1)-(7) of the paper."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dcc.method.losses import directional_contrastive_loss, l2_alignment_loss
from benchmarks.losses_chunked import chunked_directional_contrastive_loss

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These inputs are tiny: one intra-op thread is faster on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FLAGS = list(itertools.product([False, True], repeat=3))  # (directional, ns, pf)
FLAG_IDS = [f"dir{int(d)}-ns{int(n)}-pf{int(p)}" for d, n, p in FLAGS]


def reference_direction(a, p, conf_a, conf_p, label_a, neg, neg_label, tau, gamma, directional, ns, pf):
    """l(a -> p) with explicit float masks and direct exponentials (only safe in float64)."""
    if directional:
        p = p.detach()
    neg = neg.detach()
    mask = torch.ones_like(conf_a)
    if directional:
        mask = mask * (conf_a < conf_p).to(a.dtype)
    if pf:
        mask = mask * (conf_p > gamma).to(a.dtype)
    r_pos = torch.exp((a * p).sum(1) / tau)  # [N]
    r_neg = torch.exp(a @ neg.t() / tau)  # [N, M]
    neg_mask = torch.ones_like(r_neg)
    if ns:
        neg_mask = (label_a[:, None] != neg_label[None, :]).to(a.dtype)
    denom = r_pos + (neg_mask * r_neg).sum(1)
    per_pixel = -torch.log(r_pos / denom)
    count = mask.sum()
    if count == 0:
        return (mask * per_pixel).sum()
    return (mask * per_pixel).sum() / count


def reference_loss(f1, f2, c1, c2, l1, l2, neg, nl, tau, gamma, directional, ns, pf):
    args = (tau, gamma, directional, ns, pf)
    return reference_direction(f1, f2, c1, c2, l1, neg, nl, *args) + reference_direction(
        f2, f1, c2, c1, l2, neg, nl, *args
    )


def make_inputs(n=50, m=200, c=16, classes=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    f1 = F.normalize(torch.randn(n, c, generator=g, dtype=dtype), dim=1)
    f2 = F.normalize(f1 + 0.5 * torch.randn(n, c, generator=g, dtype=dtype), dim=1)
    c1 = torch.rand(n, generator=g, dtype=dtype)
    c2 = torch.rand(n, generator=g, dtype=dtype)
    l1 = torch.randint(0, classes, (n,), generator=g)
    l2 = torch.randint(0, classes, (n,), generator=g)
    neg = F.normalize(torch.randn(m, c, generator=g, dtype=dtype), dim=1)
    nl = torch.randint(0, classes, (m,), generator=g)
    return f1, f2, c1, c2, l1, l2, neg, nl


def value_and_grads(fn, f1, f2, *rest):
    f1 = f1.clone().requires_grad_(True)
    f2 = f2.clone().requires_grad_(True)
    loss = fn(f1, f2, *rest)
    loss.backward()
    return loss.detach(), f1.grad, f2.grad


def ours(**kw):
    def fn(f1, f2, c1, c2, l1, l2, neg, nl):
        return directional_contrastive_loss(f1, f2, c1, c2, l1, l2, neg, nl, **kw)

    return fn


def ref(tau, gamma, directional, ns, pf):
    def fn(f1, f2, c1, c2, l1, l2, neg, nl):
        return reference_loss(f1, f2, c1, c2, l1, l2, neg, nl, tau, gamma, directional, ns, pf)

    return fn


@pytest.mark.parametrize("directional,ns,pf", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("tau,chunk_size", [(0.1, 4096), (0.5, 37), (0.1, 1)])
def test_matches_reference_values_and_grads(directional, ns, pf, tau, chunk_size):
    """Streaming loss == dense reference; chunk 4096 is one block, 37 leaves a ragged last block,
    1 gives blocks made only of same-label (-inf) negatives."""
    inputs = make_inputs()
    gamma = 0.6
    kw = dict(temperature=tau, pos_threshold=gamma, directional=directional, negative_sampling=ns, positive_filtering=pf,
              chunk_size=chunk_size)
    v, g1, g2 = value_and_grads(ours(**kw), *inputs)
    rv, rg1, rg2 = value_and_grads(ref(tau, gamma, directional, ns, pf), *inputs)
    assert v.item() > 0
    torch.testing.assert_close(v, rv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, rg1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2, rg2, rtol=1e-9, atol=1e-12)
    assert g1.abs().sum() > 0 and g2.abs().sum() > 0


def test_flags_change_the_value():
    """Each flag matters on these inputs, so the 8-combination test is not vacuous."""
    inputs = make_inputs()
    values = set()
    for d, ns, pf in FLAGS:
        kw = dict(temperature=0.1, pos_threshold=0.6, directional=d, negative_sampling=ns, positive_filtering=pf)
        values.add(round(ours(**kw)(*inputs).item(), 9))
    assert len(values) == 8


def test_normalised_by_masked_count_not_n():
    """Averaging is over the pixels passing the mask: duplicating unmasked pixels changes nothing."""
    f1, f2, c1, c2, l1, l2, neg, nl = make_inputs(n=20)
    kw = dict(temperature=0.2, pos_threshold=0.5, directional=True, negative_sampling=True, positive_filtering=True)
    base = directional_contrastive_loss(f1, f2, c1, c2, l1, l2, neg, nl, **kw)
    # Extra pixels with equal confidences in both views pass neither directional mask.
    k = 30
    ext = [torch.cat([t, t[:1].expand(k, *t.shape[1:])]) for t in (f1, f2)]
    same_conf = torch.full((k,), 0.9, dtype=c1.dtype)
    c1e, c2e = torch.cat([c1, same_conf]), torch.cat([c2, same_conf])
    l1e, l2e = torch.cat([l1, l1[:1].expand(k)]), torch.cat([l2, l2[:1].expand(k)])
    extended = directional_contrastive_loss(ext[0], ext[1], c1e, c2e, l1e, l2e, neg, nl, **kw)
    torch.testing.assert_close(extended, base, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [0, 10])
def test_empty_mask_gives_exact_zero_and_zero_grads(n):
    f1, f2, c1, c2, l1, l2, neg, nl = make_inputs(n=max(n, 1))
    f1, f2, l1, l2 = f1[:n], f2[:n], l1[:n], l2[:n]
    conf = torch.full((n,), 0.5, dtype=f1.dtype)  # equal confidences: the directional mask is empty
    f1 = f1.clone().requires_grad_(True)
    f2 = f2.clone().requires_grad_(True)
    neg = neg.clone().requires_grad_(True)
    loss = directional_contrastive_loss(
        f1, f2, conf, conf.clone(), l1, l2, neg, nl,
        temperature=0.1, pos_threshold=0.75, directional=True, negative_sampling=True, positive_filtering=True,
    )
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(f1.grad, torch.zeros_like(f1))
    assert torch.equal(f2.grad, torch.zeros_like(f2))
    assert neg.grad is None


def test_positive_filtering_can_empty_the_mask():
    f1, f2, c1, c2, l1, l2, neg, nl = make_inputs(n=10)
    f1.requires_grad_(True)
    low = torch.full((10,), 0.3, dtype=f1.dtype)
    loss = directional_contrastive_loss(
        f1, f2, low, low, l1, l2, neg, nl,
        temperature=0.1, pos_threshold=0.75, directional=False, negative_sampling=False, positive_filtering=True,
    )
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(f1.grad, torch.zeros_like(f1))


@pytest.mark.parametrize("directional", [False, True])
def test_negatives_and_constants_get_no_grad(directional):
    f1, f2, c1, c2, l1, l2, neg, nl = make_inputs()
    f1.requires_grad_(True)
    neg.requires_grad_(True)
    c1.requires_grad_(True)
    c2.requires_grad_(True)
    loss = directional_contrastive_loss(
        f1, f2, c1, c2, l1, l2, neg, nl,
        temperature=0.1, pos_threshold=0.6, directional=directional, negative_sampling=True, positive_filtering=True,
    )
    loss.backward()
    assert neg.grad is None and c1.grad is None and c2.grad is None
    assert f1.grad.abs().sum() > 0


def test_directional_stops_gradient_to_the_positive():
    """conf1 < conf2 everywhere: only l(1 -> 2) has pixels, so feat2 is only ever a detached positive."""
    f1, f2, _, _, l1, l2, neg, nl = make_inputs()
    n = f1.shape[0]
    c1 = torch.full((n,), 0.2, dtype=f1.dtype)
    c2 = torch.full((n,), 0.9, dtype=f1.dtype)
    kw = dict(temperature=0.1, pos_threshold=0.75, negative_sampling=True, positive_filtering=True)
    _, g1, g2 = value_and_grads(ours(directional=True, **kw), f1, f2, c1, c2, l1, l2, neg, nl)
    assert g1.abs().sum() > 0
    assert torch.equal(g2, torch.zeros_like(g2))
    # Without the directional mask the positive is not detached and feat2 does receive gradient.
    _, _, g2_nodir = value_and_grads(ours(directional=False, **kw), f1, f2, c1, c2, l1, l2, neg, nl)
    assert g2_nodir.abs().sum() > 0


def test_float32_stable_at_low_temperature_with_many_negatives():
    f1, f2, c1, c2, l1, l2, neg, nl = make_inputs(n=64, m=50_000, c=16, classes=5, seed=3)
    # Make some negatives nearly identical to anchors so the largest logits are ~1/tau = 20.
    neg[:64] = F.normalize(f1 + 1e-3 * torch.randn_like(f1), dim=1)
    kw = dict(temperature=0.05, pos_threshold=0.5, directional=True, negative_sampling=True, positive_filtering=True)
    args64 = (f1, f2, c1, c2, l1, l2, neg, nl)
    args32 = tuple(t.float() if t.is_floating_point() else t for t in args64)
    v32, g1_32, g2_32 = value_and_grads(ours(**kw), *args32)
    v64, g1_64, g2_64 = value_and_grads(ref(0.05, 0.5, True, True, True), *args64)
    assert torch.isfinite(v32) and torch.isfinite(g1_32).all() and torch.isfinite(g2_32).all()
    assert abs(v32.double().item() - v64.item()) <= 1e-4 * abs(v64.item())
    torch.testing.assert_close(g1_32.double(), g1_64, rtol=1e-3, atol=1e-4)


def test_float32_finite_where_naive_exp_overflows():
    """At tau = 0.01 exp(1/tau) = e^100 overflows float32; the log-sum-exp form must not."""
    f1, f2, c1, c2, l1, l2, neg, nl = make_inputs(n=32, m=500, dtype=torch.float32, seed=4)
    f2 = f1.clone()  # positive similarity 1 -> logit 100
    loss = directional_contrastive_loss(
        f1, f2, c1, c2, l1, l2, neg, nl,
        temperature=0.01, pos_threshold=0.0, directional=True, negative_sampling=False, positive_filtering=False,
    )
    assert torch.isfinite(loss)
    assert 0.0 <= loss.item() < 1e-3  # positive dominates every negative by far


def test_l2_alignment_loss_value_and_grads():
    g = torch.Generator().manual_seed(1)
    f1 = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = l2_alignment_loss(f1, f2)
    expected = sum(((f1[i] - f2[i]) ** 2).sum() for i in range(7)) / 7
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(f1.grad, 2 * (f1 - f2).detach() / 7)
    torch.testing.assert_close(f2.grad, -2 * (f1 - f2).detach() / 7)


def test_l2_alignment_loss_empty():
    f1 = torch.zeros(0, 5, requires_grad=True)
    f2 = torch.zeros(0, 5, requires_grad=True)
    loss = l2_alignment_loss(f1, f2)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert f1.grad.shape == (0, 5) and f2.grad.shape == (0, 5)


# ---------------------------------------------------------------- phase 2: streaming vs. baseline


@pytest.mark.parametrize("directional,ns,pf", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("chunk_size", [64, 8000])
def test_authors_chunked_baseline_matches_reference(directional, ns, pf, chunk_size):
    inputs = make_inputs()
    kw = dict(temperature=0.1, pos_threshold=0.6, directional=directional, negative_sampling=ns, positive_filtering=pf)

    def base(*args):
        return chunked_directional_contrastive_loss(*args, chunk_size=chunk_size, **kw)

    v, g1, g2 = value_and_grads(base, *inputs)
    rv, rg1, rg2 = value_and_grads(ref(0.1, 0.6, directional, ns, pf), *inputs)
    torch.testing.assert_close(v, rv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, rg1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2, rg2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("directional", [False, True])
def test_streaming_matches_authors_baseline_float32(directional):
    """The benchmark's claim on a smaller problem: same value (1e-5 rel) and gradients in float32."""
    args = tuple(t.float() if t.is_floating_point() else t for t in make_inputs(n=300, m=3000, c=32, classes=21))
    kw = dict(temperature=0.1, pos_threshold=0.75, directional=directional, negative_sampling=True, positive_filtering=True)
    v, g1, g2 = value_and_grads(ours(chunk_size=512, **kw), *args)
    bv, bg1, bg2 = value_and_grads(lambda *a: chunked_directional_contrastive_loss(*a, chunk_size=1000, **kw), *args)
    assert abs(v.item() - bv.item()) <= 1e-5 * abs(bv.item())
    torch.testing.assert_close(g1, bg1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g2, bg2, rtol=1e-4, atol=1e-6)


def test_streaming_gradcheck_both_views():
    """Finite differences on the custom backward, with gradient to anchor and positive (no Dir)."""
    f1, f2, c1, c2, l1, l2, neg, nl = make_inputs(n=8, m=30, c=5, classes=3)
    f1.requires_grad_(True)
    f2.requires_grad_(True)

    def fn(a, b):
        return directional_contrastive_loss(
            a, b, c1, c2, l1, l2, neg, nl, temperature=0.3, pos_threshold=0.2,
            directional=False, negative_sampling=True, positive_filtering=True, chunk_size=7,
        )

    assert torch.autograd.gradcheck(fn, (f1, f2))


def test_masked_out_pixels_are_never_compared():
    """Pixels no mask selects are dropped before any similarity: NaN features there are harmless
    (the authors' multiply-by-mask-afterwards strategy would turn them into a NaN loss)."""
    f1, f2, c1, c2, l1, l2, neg, nl = make_inputs(n=40)
    kw = dict(temperature=0.1, pos_threshold=0.6, directional=True, negative_sampling=True, positive_filtering=True)
    c2 = c2.clone()
    c2[:10] = c1[:10]  # equal confidences: rows 0-9 pass neither directional mask
    clean = directional_contrastive_loss(f1[10:], f2[10:], c1[10:], c2[10:], l1[10:], l2[10:], neg, nl, **kw)
    f1n, f2n = f1.clone(), f2.clone()
    f1n[:10] = float("nan")
    f2n[:10] = float("nan")
    f1n.requires_grad_(True)
    loss = directional_contrastive_loss(f1n, f2n, c1, c2, l1, l2, neg, nl, **kw)
    torch.testing.assert_close(loss, clean, rtol=1e-12, atol=0)
    loss.backward()
    assert torch.isfinite(f1n.grad).all() and torch.equal(f1n.grad[:10], torch.zeros_like(f1n.grad[:10]))
    assert torch.isnan(chunked_directional_contrastive_loss(f1n, f2n, c1, c2, l1, l2, neg, nl, **kw))


def test_streaming_keeps_no_anchor_by_negative_tensor():
    """Everything autograd saves for backward is O((N + M) C): no [K, M] similarity block."""
    n, m, c = 64, 1000, 8
    f1, f2, c1, c2, l1, l2, neg, nl = make_inputs(n=n, m=m, c=c)
    f1.requires_grad_(True)
    f2.requires_grad_(True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = directional_contrastive_loss(
            f1, f2, c1, c2, l1, l2, neg, nl, temperature=0.1, pos_threshold=0.0,
            directional=False, negative_sampling=True, positive_filtering=False, chunk_size=128,
        )
    loss.backward()
    assert saved, "the hook saw nothing"
    assert max(saved) <= max(n, m) * c  # neg_feat itself is the largest saved tensor
    # Sanity check of the check: the dense reference does save [N, M] blocks.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference_loss(f1, f2, c1, c2, l1, l2, neg, nl, 0.1, 0.0, False, True, False)
    assert max(saved) >= n * m
