"""One CAC training step as the paper and the authors' released code define it (issue 10).

* BN statistics: the authors forward the labeled batch, view 1 and view 2 in separate calls, so in training mode
  each view's features (and gradients, and the BN running statistics) are those of the view forwarded alone.
* A reference of the whole step written from the paper (Eq. 1-8) and ``shared/paper/authors-code-facts.md``,
  independently of ``dcc.method.overlap`` / ``dcc.method.losses`` / ``dcc.method.consistency``: cell correspondences by brute force
  from image coordinates, the loss dense over every (anchor, negative) pair in float64. The step's CE, L_dc and
  gradients must equal it.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcc.method.consistency import ConsistencyBranch
from dcc.method.models import build_model
from tests.conftest import compose_cfg

SMALL = ["backbone=resnet18", "segnet.channels=16", "segnet.low_level_channels=8"]
NO_DROPOUT = ["segnet.dropout=0", "segnet.classifier_dropout=0"]
STRIDE, CROP = 8, 48


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _views(batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"view1": torch.randn(batch, 3, CROP, CROP, generator=g),
            "view2": torch.randn(batch, 3, CROP, CROP, generator=g) * 2 + 1}  # other statistics than view 1


def _bn_state(model) -> list[torch.Tensor]:
    return [t.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var)]


def test_views_forwarded_the_authors_way_have_their_own_bn_statistics():
    """Training mode, BN live: the branch's features, projections and logits of each view, the gradients of a loss
    on them and the BN running statistics after the pass equal those of the authors' separate calls (view 1 alone,
    then view 2 alone). ``trainer.view_bn=shared`` (statistics over both views) gives other features."""
    loss_cfg = compose_cfg(SMALL).loss
    batch = _views()
    torch.manual_seed(0)
    model = build_model(compose_cfg(SMALL + NO_DROPOUT)).train()
    start = copy.deepcopy(model.state_dict())

    alone = [model.features(batch["view1"]), model.features(batch["view2"])]
    sum(((i + 1) * f).square().mean() for i, f in enumerate(alone)).backward()
    grads_alone = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    running_alone = _bn_state(model)

    model.load_state_dict(start)
    model.zero_grad()
    ours = ConsistencyBranch(loss_cfg).view_outputs(model, batch)
    sum(((i + 1) * v.feats).square().mean() for i, v in enumerate(ours)).backward()
    grads_ours = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for v, a in zip(ours, alone):
        torch.testing.assert_close(v.feats, a, rtol=1e-5, atol=1e-6)
        phi, logits = model.consistency_outputs(a)
        torch.testing.assert_close(v.phi, phi, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.logits, logits, rtol=1e-5, atol=1e-6)
    assert len(grads_ours) == len(grads_alone) > 50
    for a, b in zip(grads_ours, grads_alone):  # float rounding of convolutions over 3 vs 6 images
        assert (a - b).abs().max() <= 2e-5 * b.abs().max(), (a - b).abs().max() / b.abs().max()
    for a, b in zip(_bn_state(model), running_alone):  # updated view after view, as two calls do
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    with torch.no_grad():
        shared = ConsistencyBranch(loss_cfg, shared_bn=True).view_outputs(model, batch)
        for v, a in zip(shared, alone):
            assert (v.feats - a).abs().max() > 1e-2  # statistics over both views: not the authors' step
        model.eval()  # with BN frozen (no batch statistics) the two agree
        for a, b in zip(ConsistencyBranch(loss_cfg).view_outputs(model, batch),
                        ConsistencyBranch(loss_cfg, shared_bn=True).view_outputs(model, batch)):
            torch.testing.assert_close(a.feats, b.feats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("view_bn, sizes", [("per_view", {4}), ("shared", {4, 8})])
def test_training_normalises_labeled_batch_and_each_view_alone(tiny_overrides, tmp_path, monkeypatch, view_bn, sizes):
    """In ``fit`` (the real training loop: 4 labeled images, 4 pairs) no batch-norm layer computes statistics over
    more than one batch of 4: the labeled batch, view 1 and view 2 each alone; ``trainer.view_bn=shared`` normalises
    the 8 crops of both views together."""
    from dcc.data.build import build_data
    from dcc.engine.trainer import fit

    seen: set[int] = set()
    original = F.batch_norm

    def spy(x, running_mean, running_var, weight=None, bias=None, training=False, *args, **kwargs):  # noqa: ANN001, ANN202
        if training:
            seen.add(x.shape[0])
        return original(x, running_mean, running_var, weight, bias, training, *args, **kwargs)

    monkeypatch.setattr(F, "batch_norm", spy)
    assert str(compose_cfg(tiny_overrides).trainer.view_bn) == "per_view"  # the default (digits and paper presets)
    cfg = compose_cfg(tiny_overrides + ["loss.start_step=0", "trainer.max_steps=1", "trainer.eval_every=1",
                                        f"trainer.view_bn={view_bn}"])

    class _NoTracker:
        def log_metrics(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
            pass

        def log_artifact(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
            pass

    fit(cfg, build_data(cfg), torch.device("cpu"), _NoTracker(), Path(tmp_path / "state"))
    assert seen == sizes


# ---------------------------------------------------------------- reference step


class _FrozenBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # running statistics, affine trained
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _reference_step(model, x, y, batch, *, tau, gamma, weight, ignore=255):
    """CE + weight * L_dc written from the paper and the authors' code facts, dense and in float64.

    Supervised: logits upsampled bilinearly with align_corners=True to the crop, mean CE over non-ignored pixels.
    Unsupervised, each view forwarded alone: decoder features average-pooled 2x2 to stride 8, phi = L2-normalised
    projector output, pseudo-label and confidence = argmax / max softmax of the classifier on the pooled features
    (no gradient). Overlap cells by brute force: a view's cell covers image pixels (oy + 8i, ox + 8j), j counted
    in the unflipped crop; a pair of cells is an anchor pair when both views cover the same cell and it lies fully
    inside the real image. Negatives: every cell of both views (padding included), no gradient. Per direction
    a -> p: mask = conf_p > gamma and conf_a < conf_p; loss_k = -log(e^{a.p/tau} / (e^{a.p/tau} +
    sum_{n: label_n != label_a} e^{a.n/tau})), p detached; averaged over the masked anchors of the batch.
    """
    logits = model.classifier(model.features(x))
    up = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True).double()
    logp = up.log_softmax(1)
    valid = y != ignore
    ce = -logp.permute(0, 2, 3, 1)[valid].gather(1, y[valid].unsqueeze(1)).mean()

    phis, labels, confs = [], [], []
    for key in ("view1", "view2"):
        pooled = F.avg_pool2d(model.features(batch[key]), 2)
        phis.append(F.normalize(model.projector(pooled).double(), dim=1))
        with torch.no_grad():
            prob = model.classifier(pooled).double().softmax(1)
        confs.append(prob.max(1).values)
        labels.append(prob.argmax(1))
    cells = phis[0].shape[-1]

    def cell_map(b: int, v: int) -> dict[tuple[int, int], tuple[int, int]]:
        """image corner of each content cell -> (row, column) of the map the network computed."""
        oy, ox = batch[f"offset{v + 1}"][b].tolist()
        eh, ew = batch[f"extent{v + 1}"][b].tolist()  # rows/columns of the crop that are image
        out = {}
        for i in range(cells):
            for j in range(cells):
                if (i + 1) * STRIDE <= eh and (j + 1) * STRIDE <= ew:
                    col = cells - 1 - j if bool(batch[f"flip{v + 1}"][b]) else j
                    out[(oy + STRIDE * i, ox + STRIDE * j)] = (i, col)
        return out

    a_idx, b_idx = [], []
    for b in range(batch["view1"].shape[0]):
        m1, m2 = cell_map(b, 0), cell_map(b, 1)
        for corner in sorted(m1.keys() & m2.keys()):
            a_idx.append((b, *m1[corner]))
            b_idx.append((b, *m2[corner]))
    pick = lambda t, idx: torch.stack([t[b, ..., i, j] for b, i, j in idx])  # noqa: E731
    f1, f2 = pick(phis[0], a_idx), pick(phis[1], b_idx)
    c1, c2 = pick(confs[0], a_idx), pick(confs[1], b_idx)
    l1, l2 = pick(labels[0], a_idx), pick(labels[1], b_idx)
    neg = torch.cat([p.detach().permute(0, 2, 3, 1).reshape(-1, p.shape[1]) for p in phis])
    neg_label = torch.cat([lab.reshape(-1) for lab in labels])

    def direction(fa, fp, ca, cp, la):
        mask = (cp > gamma) & (ca < cp)
        pos = torch.exp((fa * fp.detach()).sum(1) / tau)
        sims = torch.exp(fa @ neg.t() / tau) * (la.unsqueeze(1) != neg_label.unsqueeze(0))
        per = -torch.log(pos / (pos + sims.sum(1)))
        return (per * mask).sum() / mask.sum().clamp(min=1), int(mask.sum())

    l12, k12 = direction(f1, f2, c1, c2, l1)
    l21, k21 = direction(f2, f1, c2, c1, l2)
    ldc = l12 + l21
    info = {"anchor_pairs": len(a_idx), "k12": k12, "k21": k21, "excluded": int((l1.unsqueeze(1) == neg_label).sum())}
    return ce, ldc, ce + weight * ldc, info


class _GradRecorder:
    """Stands in for the optimiser: records the gradients Trainer.step produced, applies nothing."""

    def __init__(self, params):
        self.params, self.grads = params, None

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]


def _trainer_step(cfg, model, x, y, unlabeled, params):
    """``dcc.engine.trainer.Trainer.step`` (unchanged) on a minimal trainer: the model, the CAC branch of the config,
    the step past ``loss.start_step``, fp32, one process."""
    from types import SimpleNamespace

    from dcc.engine.trainer import Trainer

    recorder = _GradRecorder(params)
    trainer = SimpleNamespace(
        cfg=cfg, model=model, branch=ConsistencyBranch(cfg.loss), ignore=255, optimizer=recorder,
        scaler=torch.amp.GradScaler("cpu", enabled=False), scheduler=SimpleNamespace(step=lambda: None),
        progress=SimpleNamespace(step=cfg.loss.start_step), _autocast=lambda: contextlib.nullcontext(),
        _unlabeled_batch=lambda: unlabeled)
    terms = Trainer.step(trainer, x, y)
    assert recorder.grads is not None, "Trainer.step did not step its optimiser"
    return terms, recorder.grads


def test_one_cac_step_equals_an_independent_recomputation():
    """Small model, BN frozen, dropout off, every cell a negative; two pairs with known offsets: pair 0 a padded
    image (40 x 72 scaled, padded to 48 rows) with a horizontal shift and view 2 flipped, pair 1 an unpadded image
    with a diagonal shift and view 1 flipped. The step's CE, L_dc and every gradient equal the reference."""
    cfg = compose_cfg(SMALL + NO_DROPOUT + ["loss.selected_num=100000", "loss.bank_steps=0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = _FrozenBN

    g = torch.Generator().manual_seed(1)
    image0 = torch.randn(3, 40, 72, generator=g)
    # bottom padding to the 48-px crop; filled with noise (not the mean colour) so that padded cells would pass
    # the masks if they were taken as anchors
    padded0 = torch.cat([image0, torch.randn(3, 8, 72, generator=g)], 1)
    image1 = torch.randn(3, 64, 64, generator=g)
    offsets1, offsets2 = [[0, 0], [16, 0]], [[0, 16], [0, 8]]
    flips1, flips2 = [False, True], [True, False]
    images = [padded0, image1]

    def crop(b, off, flip):
        v = images[b][:, off[0]:off[0] + CROP, off[1]:off[1] + CROP]
        return v.flip(-1) if flip else v

    batch = {
        "view1": torch.stack([crop(b, offsets1[b], flips1[b]) for b in range(2)]),
        "view2": torch.stack([crop(b, offsets2[b], flips2[b]) for b in range(2)]),
        "offset1": torch.tensor(offsets1), "offset2": torch.tensor(offsets2),
        "flip1": torch.tensor(flips1), "flip2": torch.tensor(flips2),
        "extent1": torch.tensor([[40, 48], [48, 48]]), "extent2": torch.tensor([[40, 48], [48, 48]]),
    }
    with torch.no_grad():  # a confident classifier centred on these views: masks keep anchors, labels differ
        feats = F.avg_pool2d(model.features(torch.cat([batch["view1"], batch["view2"]])), 2)
        model.classifier.weight.mul_(1000.0)
        model.classifier.bias.copy_(-model.classifier.weight[:, :, 0, 0] @ feats.mean((0, 2, 3)))
    model.train()
    x = torch.randn(2, 3, CROP, CROP, generator=g)
    y = torch.randint(0, cfg.dataset.num_classes, (2, CROP, CROP), generator=g)
    y[0, :, :10] = 255  # ignored pixels
    params = [p for p in model.parameters() if p.requires_grad]

    # the project's step itself: Trainer.step on this model, this labeled batch and this unlabeled pair batch, the
    # gradients taken where its optimiser would apply them
    terms, grads = _trainer_step(cfg, model, x, y, batch, params)
    ce, loss_u = terms["loss_ce"], terms["loss_u"]

    ref_ce, ref_ldc, ref_total, info = _reference_step(model, x, y, batch, tau=cfg.loss.temperature,
                                                       gamma=cfg.loss.pos_threshold, weight=cfg.loss.weight)
    ref_grads = torch.autograd.grad(ref_total, params, allow_unused=True)

    # the test means something: anchors in both directions, padded cells left out, negatives filtered by label
    assert info["anchor_pairs"] == 5 * 4 + 4 * 5  # pair 0: 5 image rows x 4 shared columns; pair 1: 4 x 5 shift
    assert info["k12"] > 3 and info["k21"] > 3 and info["excluded"] > 0, info
    assert float(ref_ldc.detach()) > 0.1
    torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_u.double(), ref_ldc, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the padded cells, taken as anchors, would change L_dc
        unbounded = ConsistencyBranch(cfg.loss)(model, {k: v for k, v in batch.items() if "extent" not in k})
    assert abs(float(unbounded["loss_u"]) - float(loss_u.detach())) > 1e-3
    checked = 0
    for p, a, b in zip(params, grads, ref_grads):
        if b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6 * max(1.0, float(b.abs().max())))
        checked += 1
    assert checked == len(params)
