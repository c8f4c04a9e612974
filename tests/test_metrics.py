"""mIoU from a confusion matrix accumulated over a whole set, checked against hand-computed values."""

from __future__ import annotations

import math

import torch

from dcc.engine.evaluate import predict_whole
from dcc.engine.metrics import confusion_matrix, scores


def test_confusion_matrix_and_scores_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, target, 4)
    expected = torch.tensor([[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(conf, expected)
    s = scores(conf)
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3, class 1: 3 / (3 + 4 - 3) = 3/4, class 2: 1 / (2 + 1 - 1) = 1/2; class 3 absent
    assert math.isclose(s["miou"], (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert math.isclose(s["pixel_acc"], 5 / 7)
    assert math.isnan(s["iou"][3])


def test_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    pred, target = torch.randint(0, 5, (4, 9, 9)), torch.randint(0, 5, (4, 9, 9))
    total = sum(confusion_matrix(p, t, 5) for p, t in zip(pred, target))
    assert torch.equal(total, confusion_matrix(pred, target, 5))


def test_whole_image_prediction_pads_and_crops_back():
    seen = {}

    def model(x):
        seen["shape"] = tuple(x.shape)
        return x[:, :2] * 2

    image = torch.randn(1, 3, 37, 50)
    out = predict_whole(model, image, multiple=8)
    assert seen["shape"] == (1, 3, 40, 56) and out.shape == (1, 2, 37, 50)
    assert torch.equal(out, image[:, :2] * 2)  # bottom-right padding leaves the original pixels in place
