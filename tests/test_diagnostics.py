"""The diag/ figures on a hand-made batch whose masks and labels are known."""

import torch

from dcc.method.diagnostics import cell_labels, consistency_diagnostics


def _batch():
    # 4 overlap cells. View 2 is confident on cells 0, 1 (0.9) and unsure on 2, 3; view 1 the reverse on 2.
    conf1 = torch.tensor([0.5, 0.95, 0.8, 0.3])
    conf2 = torch.tensor([0.9, 0.9, 0.6, 0.4])
    label1 = torch.tensor([0, 3, 3, 2])
    label2 = torch.tensor([1, 3, 0, 2])
    feat1 = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]), dim=1)
    feat2 = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=1)
    neg_label = torch.tensor([0, 0, 0, 1, 3, 3])  # 6 negatives: three of class 0, one of 1, two of 3
    return feat1, feat2, conf1, conf2, label1, label2, neg_label


def test_masks_negatives_and_similarity_per_direction():
    d = consistency_diagnostics(*_batch(), pos_threshold=0.75, directional=True, positive_filtering=True,
                                negative_sampling=True, num_classes=4)
    # 1 -> 2: dir conf1 < conf2 on cells 0, 3; pf conf2 > 0.75 on cells 0, 1; anchors: cell 0 only
    assert d["dir_pass_12"] == 0.5 and d["pf_pass_12"] == 0.5 and d["anchor_share_12"] == 0.25
    assert d["anchor_fg_12"] == 1.0  # the positive's label at cell 0 is 1 (foreground)
    assert d["negatives_per_anchor_12"] == 3.0  # anchor label 0: the three class-0 negatives are dropped
    assert torch.isclose(d["pos_cos_12"], torch.tensor(1.0))
    # 2 -> 1: dir conf2 < conf1 on cells 1, 2; pf conf1 > 0.75 on cells 1, 2; anchors: cells 1, 2
    assert d["dir_pass_21"] == 0.5 and d["pf_pass_21"] == 0.5 and d["anchor_share_21"] == 0.5
    assert d["anchor_fg_21"] == 1.0  # positives' labels 3 and 3
    assert d["negatives_per_anchor_21"] == 3.5  # anchor labels 3 (keeps 4) and 0 (keeps 3)
    assert torch.isclose(d["pos_cos_21"], torch.tensor(0.5))  # cos 0 (cell 1) and 1 (cell 2)
    assert "pseudo_acc" not in d


def test_without_masks_every_cell_is_an_anchor_and_keeps_the_whole_bank():
    d = consistency_diagnostics(*_batch(), pos_threshold=0.75, directional=False, positive_filtering=False,
                                negative_sampling=False, num_classes=4)
    assert d["anchor_share_12"] == 1.0 and d["negatives_per_anchor_12"] == 6.0
    assert d["anchor_fg_12"] == 0.75  # label2 = 1, 3, 0, 2


def test_pseudo_label_accuracy_against_ground_truth():
    gt = torch.tensor([1, 3, 255, 0])
    d = consistency_diagnostics(*_batch(), pos_threshold=0.75, directional=True, positive_filtering=True,
                                negative_sampling=True, num_classes=4, gt1=gt, gt2=gt)
    # view 1 right on cell 1 only (of 3 known), view 2 right on cells 0, 1: 3 of 6
    assert d["pseudo_acc"] == 0.5
    assert d["anchor_target_acc_12"] == 1.0  # cell 0: positive label 1 == gt 1
    assert d["anchor_target_acc_21"] == 1.0  # cell 1: label 3 == 3; cell 2 ignored


def test_empty_anchor_set_gives_zero_not_nan():
    feat1, feat2, conf1, conf2, label1, label2, neg = _batch()
    d = consistency_diagnostics(feat1, feat2, conf1, conf2, label1, label2, neg, pos_threshold=0.99,
                                directional=True, positive_filtering=True, negative_sampling=True, num_classes=4)
    assert d["anchor_share_12"] == 0 and d["pos_cos_12"] == 0 and d["negatives_per_anchor_12"] == 0


def test_cell_labels_take_the_majority_and_ignore_mostly_unlabeled_cells():
    mask = torch.zeros(1, 4, 8, dtype=torch.long)
    mask[0, :, :2] = 5  # left cell: 8 of 16 pixels class 5, 8 class 0 -> tie broken to the lower class 0
    mask[0, :3, :3] = 5  # now 9 of 16 are 5
    mask[0, :, 4:] = 255  # right cell: all ignored
    mask[0, 0, 4:7] = 2  # 3 of 16 labeled: still ignored
    out = cell_labels(mask, 4, 6, 255)
    assert out.tolist() == [[[5, 255]]]


def test_no_diagnostics_and_no_view_masks_without_a_logger(tiny_overrides, tmp_path, monkeypatch):
    """logger=none: the branch computes no diag/ figures and the loader reads no ground truth."""
    import dcc.engine.trainer
    from dcc.engine.job import run
    from tests.conftest import compose_cfg

    seen = []
    real = dcc.engine.trainer.ConsistencyBranch.__call__

    def spy(self, model, batch):
        out = real(self, model, batch)
        seen.append((self.diagnostics, "mask1" in batch, sorted(out)))
        return out

    monkeypatch.setattr(dcc.engine.trainer.ConsistencyBranch, "__call__", spy)
    run(compose_cfg(tiny_overrides + ["logger=none"]), launch_dir=tmp_path)
    assert seen and all(s == (False, False, ["loss_u"]) for s in seen)


def test_view_masks_follow_the_views(tmp_path):
    """mask1/mask2 are the ground truth cropped and flipped like the views, and do not change the views."""
    import numpy as np

    from dcc.data.datasets import ArraySource, UnlabeledPairDataset

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1, 40, 56, 3), dtype=np.uint8)
    mask = (np.arange(56)[None, None, :] % 7 + 10 * (np.arange(40)[None, :, None] % 3)).astype(np.uint8).repeat(1, 0)
    kw = dict(crop_size=32, base_size=56, scale_range=(1.0, 1.0), stride=8, mean=[0.5] * 3, std=[0.5] * 3,
              color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    plain = UnlabeledPairDataset(ArraySource(image, mask), [0], **kw)
    truth = UnlabeledPairDataset(ArraySource(image, mask), [0], with_masks=True, **kw)
    for seed in range(6):
        torch.manual_seed(seed)
        a = plain[0]
        torch.manual_seed(seed)
        b = truth[0]
        assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
        for k in ("1", "2"):
            y, x = b["offset" + k].tolist()
            want = torch.from_numpy(mask[0, y : y + 32, x : x + 32]).long()
            assert torch.equal(b["mask" + k], want.flip(-1) if b["flip" + k] else want)
