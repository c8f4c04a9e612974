"""Evaluation modes: whole and slide against hand-computed confusion matrices, window averaging, DDP sums."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from dcc.data.build import shard
from dcc.engine.evaluate import eval_options, evaluate, predict_slide, predict_whole, window_starts
from tests.conftest import compose_cfg

K = 3


class ClassMap(nn.Module):
    """Pointwise model: predicts the class written in input channel 0 (so the prediction is known exactly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = getattr(self, "seen", []) + [tuple(x.shape)]
        return nn.functional.one_hot(x[:, 0].round().long().clamp(0, K - 1), K).permute(0, 3, 1, 2).float()


def _encode(pred: torch.Tensor) -> torch.Tensor:
    """An 'image' [1, 3, H, W] whose channel 0 is the class map ``pred`` [H, W]."""
    return torch.stack([pred.float(), torch.zeros_like(pred, dtype=torch.float), torch.zeros_like(pred, dtype=torch.float)])[None]


# Two images of different sizes; predictions written into the images, targets by hand (255 = ignore).
PRED_A = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 2, 2], [0, 0, 0, 2, 2]])
TARGET_A = torch.tensor([[0, 0, 1, 2, 2], [0, 1, 1, 2, 255], [1, 0, 0, 2, 2]])
PRED_B = torch.tensor([[2, 2, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [2, 2, 2, 2]])
TARGET_B = torch.tensor([[2, 2, 1, 0], [1, 1, 0, 0], [255, 255, 0, 0], [2, 1, 2, 2]])
# rows = ground truth, columns = prediction, counted by hand over both images
#   A: gt0: pred0 x5;            gt1: pred0 x1, pred1 x3;  gt2: pred1 x1, pred2 x4      (1 ignored)
#   B: gt0: pred0 x4, pred1 x1;  gt1: pred1 x3, pred2 x1;  gt2: pred2 x5                (2 ignored)
EXPECTED = torch.tensor([[9, 1, 0], [1, 6, 1], [0, 1, 9]])


def _loader():
    return [(_encode(PRED_A), TARGET_A[None]), (_encode(PRED_B), TARGET_B[None])]


def _expected_scores():
    iou = [9 / (10 + 10 - 9), 6 / (8 + 8 - 6), 9 / (10 + 10 - 9)]
    return sum(iou) / 3, iou


@pytest.mark.parametrize("options", [
    {"mode": "whole", "pad_multiple": 8},
    {"mode": "slide", "crop_size": 4, "stride": 2},
    {"mode": "slide", "crop_size": 8, "stride": 8},  # one window larger than both images: padded
])
def test_both_modes_against_a_hand_computed_confusion_matrix(options):
    res = evaluate(ClassMap(), _loader(), K, torch.device("cpu"), **options)
    assert torch.equal(res["confusion"], EXPECTED)
    miou, iou = _expected_scores()
    assert math.isclose(res["miou"], miou) and all(math.isclose(a, b) for a, b in zip(res["iou"], iou))
    assert math.isclose(res["pixel_acc"], 24 / 28)
    assert res["mode"] == options["mode"]
    if options["mode"] == "slide":
        assert (res["crop_size"], res["stride"]) == (options["crop_size"], options["stride"])


def test_window_starts_cover_the_image_and_end_flush():
    assert window_starts(37, 16, 10) == [0, 10, 20, 21]
    assert window_starts(36, 16, 10) == [0, 10, 20]
    assert window_starts(16, 16, 10) == [0] and window_starts(5, 16, 10) == [0]


def test_slide_averages_the_windows_covering_each_pixel():
    # a context-dependent model: every output pixel of a window holds the window's top-left value of channel 0
    def corner(x):
        return x[:, :1, :1, :1].expand(-1, 2, x.shape[2], x.shape[3]) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)

    h, w, crop, stride = 7, 9, 4, 3
    image = torch.arange(h * w, dtype=torch.float).view(1, 1, h, w).expand(1, 3, h, w).contiguous()
    out = predict_slide(corner, image, crop, stride, batch=2)
    ys, xs = window_starts(h, crop, stride), window_starts(w, crop, stride)
    assert ys == [0, 3] and xs == [0, 3, 5]
    for y in range(h):
        for x in range(w):
            values = [image[0, 0, wy, wx] for wy in ys for wx in xs if wy <= y < wy + crop and wx <= x < wx + crop]
            assert math.isclose(float(out[0, 0, y, x]), float(sum(values) / len(values)), rel_tol=1e-6)
    assert torch.equal(out[:, 1], -out[:, 0])


def test_whole_pads_to_the_stride_multiple_and_slide_feeds_full_windows():
    model = ClassMap()
    image = _encode(torch.zeros(6, 7, dtype=torch.long))
    predict_whole(model, image, multiple=8)
    predict_slide(model, image, 4, 2, batch=4)
    assert model.seen[0] == (1, 3, 8, 8)
    assert all(shape[1:] == (3, 4, 4) for shape in model.seen[1:])  # y in [0, 2] x x in [0, 2, 3]: 6 windows
    assert [s[0] for s in model.seen[1:]] == [4, 2]  # in chunks of 4


def test_eval_group_options():
    assert eval_options(compose_cfg([]).eval) == {"mode": "whole", "pad_multiple": 8, "crop_size": 512, "stride": 341}
    cfg = compose_cfg(["eval=slide", "eval.crop_size=320", "eval.stride=160"])
    assert eval_options(cfg.eval) == {"mode": "slide", "pad_multiple": 8, "crop_size": 320, "stride": 160}


def _rank_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    items = _loader() * 3  # 6 images: rank 0 gets 0, 2, 4 and rank 1 gets 1, 3, 5
    mine = [items[i] for i in shard(len(items))]
    res = evaluate(ClassMap(), mine, K, torch.device("cpu"), mode="slide", crop_size=4, stride=2)
    torch.save({"indices": shard(len(items)), "confusion": res["confusion"], "miou": res["miou"]}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_shards_are_disjoint_and_confusion_is_summed(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    assert results[0]["indices"] == [0, 2, 4] and results[1]["indices"] == [1, 3, 5]
    for r in results:  # every rank ends with the matrix of the whole set, not of its shard
        assert torch.equal(r["confusion"], 3 * EXPECTED)
        assert math.isclose(r["miou"], _expected_scores()[0])


def test_eval_config_errors_name_the_key():
    from dcc.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"eval.crop_size=100 must be a positive multiple of eval.pad_multiple=8"):
        validate(compose_cfg(["eval=slide", "eval.crop_size=100"]))
    with pytest.raises(ConfigError, match=r"eval.stride=600 must be in \(0, eval.crop_size=512\]"):
        validate(compose_cfg(["eval=slide", "eval.stride=600"]))
    validate(compose_cfg(["eval=whole", "eval.stride=600"]))  # slide keys mean nothing in whole mode
