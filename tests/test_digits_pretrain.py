"""The embedded benchmark's pretrained backbone: built once from the pretraining pool, cached by its
parameters, loaded through backbone.weights."""

from __future__ import annotations

import torch

from dcc.data import digits_pretrain
from dcc.method.models import build_model
from tests.conftest import compose_cfg

TINY_PRETRAIN = [
    "dataset.scenes.pretrain.steps=2",
    "dataset.scenes.pretrain.batch_size=8",
    "dataset.scenes.pretrain.num_images=32",
    "dataset.scenes.pretrain.image_size=32",
    "dataset.scenes.pretrain.digit_size=[16,28]",
]


def _groups(cfg):
    """The two groups the pretraining reads: the digits (its recipe) and the backbone."""
    return cfg.dataset, cfg.backbone


def _cfg(tmp_path, extra=()):
    return compose_cfg([f"dataset.root={tmp_path}", *TINY_PRETRAIN, *extra])


def test_built_once_then_reused_and_rebuilt_when_a_parameter_changes(tmp_path, monkeypatch):
    calls = []
    real = digits_pretrain.pretrain
    monkeypatch.setattr(digits_pretrain, "pretrain", lambda p, partial=None: calls.append(p) or real(p, partial))
    cfg = _cfg(tmp_path)
    path = digits_pretrain.ensure_pretrained_backbone(cfg.dataset, cfg.backbone)
    assert path.exists() and path.parent == tmp_path / "digits" and len(calls) == 1
    info = digits_pretrain.pretrained_info(cfg.dataset, cfg.backbone)
    assert 0.0 <= info["accuracy"] <= 1.0 and info["seconds"] > 0 and info["steps"] == 2
    assert digits_pretrain.ensure_pretrained_backbone(cfg.dataset, cfg.backbone) == path and len(calls) == 1  # cached
    other = digits_pretrain.ensure_pretrained_backbone(*_groups(_cfg(tmp_path, ["dataset.scenes.pretrain.lr=1e-3"])))
    assert other != path and len(calls) == 2  # keyed by its parameters
    digits_pretrain.ensure_pretrained_backbone(cfg.dataset, cfg.backbone, force=True)  # the rebuild command's path
    assert len(calls) == 3
    assert not list(path.parent.glob("*.tmp"))


def test_same_seed_same_weights(tmp_path):
    p = digits_pretrain.pretrain_params(*_groups(_cfg(tmp_path)))
    a, _ = digits_pretrain.pretrain(p)
    b, _ = digits_pretrain.pretrain(p)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_weights_do_not_depend_on_the_callers_threads(tmp_path):
    """A 2-thread `python run.py` and a 1-thread benchmark job build the same file (float sums on other threads
    gave other weights: 600 steps ended 1.5 points apart in digit accuracy)."""
    p = digits_pretrain.pretrain_params(*_groups(_cfg(tmp_path, ["dataset.scenes.pretrain.steps=4",
                                                                   "dataset.scenes.pretrain.batch_size=32"])))
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            weights.append(digits_pretrain.pretrain(p)[0])
            assert torch.get_num_threads() == threads  # the caller's count is given back
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert p["threads"] == 1  # in the cache key: files built on other threads by earlier releases are rebuilt


def test_segmentation_model_starts_from_the_cached_backbone(tmp_path):
    cfg = _cfg(tmp_path)
    state = torch.load(digits_pretrain.ensure_pretrained_backbone(cfg.dataset, cfg.backbone), weights_only=True)
    model = build_model(cfg, backbone_weights=digits_pretrain.embedded_backbone_weights(cfg.dataset, cfg.backbone))
    body = model.backbone.body.state_dict()
    shared = [k for k in state if k in body]
    assert len(shared) > 0.9 * len(body)  # everything but the classifier head transfers
    assert all(torch.equal(state[k], body[k]) for k in shared)


def test_off_without_steps_and_a_user_file_wins(tmp_path):
    assert digits_pretrain.embedded_backbone_weights(*_groups(_cfg(tmp_path, ["dataset.scenes.pretrain.steps=0"]))) is None
    mine = _cfg(tmp_path, ["backbone.weights=/w/mine.pth"])
    assert digits_pretrain.embedded_backbone_weights(*_groups(mine)) == "/w/mine.pth"
    assert not (tmp_path / "digits").exists()


def test_the_pretraining_never_sees_scene_digits(tmp_path, monkeypatch):
    seen = []
    real = digits_pretrain.render_scenes
    monkeypatch.setattr(digits_pretrain, "render_scenes", lambda rng, pool, **kw: seen.append(pool) or real(rng, pool, **kw))
    digits_pretrain.pretrain(digits_pretrain.pretrain_params(*_groups(_cfg(tmp_path))))
    pools = digits_pretrain.digit_pools(0)
    used = set(torch.cat([torch.as_tensor(p) for p in seen]).tolist())
    assert used <= set(pools["pretrain"].tolist())


def test_a_truncated_backbone_shares_the_full_classifiers_cache(tmp_path):
    """out_indices picks the stages the segmentation backbone taps (here: the last stage dropped), not the
    pretrained classifier: same cache file, and the kept stages load from it."""
    cfg = _cfg(tmp_path)
    truncated = _cfg(tmp_path, ["+backbone.kwargs.out_indices=[1,3]"])
    assert digits_pretrain.weights_path(*_groups(truncated)) == digits_pretrain.weights_path(*_groups(cfg))
    state = torch.load(digits_pretrain.ensure_pretrained_backbone(truncated.dataset, truncated.backbone), weights_only=True)
    model = build_model(truncated, backbone_weights=digits_pretrain.embedded_backbone_weights(*_groups(truncated)))
    body = model.backbone.body.state_dict()
    assert not any(k.startswith("layer4.") for k in body) and model.backbone.high_channels == 256
    assert all(torch.equal(state[k], body[k]) for k in body)
