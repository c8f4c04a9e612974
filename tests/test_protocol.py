"""The evaluation protocol: a held-out test split read once at the end of a run, and replicates that vary the
labeled subset with the training seed while every arm of a comparison sees the same subset and initial weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from dcc.data import digits
from dcc.data.build import build_data
from dcc.engine import trainer as trainer_mod
from dcc.engine.job import run, run_dir_for
from dcc.engine.resume import read_result
from dcc.engine.tracking import NullTracker
from tests.conftest import compose_cfg

SMALL = dict(num_train=30, num_val=20, image_size=32, digits_per_image=(1, 3), digit_size=(14, 20), stroke=3,
             max_overlap=0.25)


# ------------------------------------------------------------------------------------------------ the test split
def test_test_pool_is_disjoint_from_the_other_three_and_leaves_train_and_val_unchanged() -> None:
    with_test = digits.generate_digit_scenes(seed=0, num_test=25, **SMALL)
    without = digits.generate_digit_scenes(seed=0, **SMALL)
    pools = {k: set(v.tolist()) for k, v in digits.digit_pools(0).items()}
    test_pool = set(with_test["test_pool"].tolist())
    val_digits = set(with_test["val_digit_ids"].tolist())
    assert test_pool and not test_pool & pools["pretrain"] and not test_pool & pools["train"]
    assert not test_pool & val_digits  # no digit of a validation scene is in the test pool
    assert test_pool | val_digits <= pools["val"]  # both come from the held-out pool
    assert set(with_test["test_digit_ids"].tolist()) <= test_pool
    assert with_test["test_images"].shape == (25, 32, 32, 3) and with_test["test_masks"].shape == (25, 32, 32)
    for key in without:  # adding the test split changes no training or validation scene
        np.testing.assert_array_equal(with_test[key], without[key])
    assert "test_images" not in without


def test_the_presets_test_pool_is_larger_than_the_validation_digits() -> None:
    """With the preset's 300 validation scenes (64 px) the test pool keeps over half the held-out digits, every class."""
    pools = digits.digit_pools(0)
    _, _, val_ids = digits.render_scenes(np.random.default_rng(np.random.SeedSequence(0).spawn(2)[1]), pools["val"],
                                         num_scenes=300, image_size=64, digits_per_image=(1, 3), digit_size=(24, 40),
                                         stroke=3, max_overlap=0.25)
    pool = digits.test_pool(pools["val"], val_ids)
    assert len(pool) > len(np.unique(val_ids)) and len(pool) > 500
    assert np.bincount(digits.load_mnist()[1][pool], minlength=10).min() >= 30


def test_too_many_validation_scenes_leave_too_few_test_digits() -> None:
    with pytest.raises(ValueError, match=r"dataset.scenes.num_val=2000 pastes all but \d+ of the 1000"):
        digits.generate_digit_scenes(seed=0, num_test=5, **{**SMALL, "num_val": 2000, "image_size": 16,
                                                            "digit_size": (8, 8)})


class _Spy:
    """A source that records every read in ``events``."""

    def __init__(self, base, events: list[str]) -> None:
        self.base, self.events = base, events

    def __len__(self) -> int:
        return len(self.base)

    def load(self, i: int):
        self.events.append("test")
        return self.base.load(i)


class _Recorder(NullTracker):
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics, step: int) -> None:
        self.metrics.update(metrics)


def test_no_evaluation_during_training_reads_the_test_split(tiny_overrides, tmp_path, monkeypatch):
    cfg = compose_cfg(tiny_overrides + ["logger=none"])
    data = build_data(cfg)
    assert data.test is not None and len(data.test) == 8
    events: list[str] = []
    data.test = _Spy(data.test, events)
    validate = trainer_mod.Trainer.validate

    def spy_validate(self, is_last):
        events.append(f"val@{self.progress.step}")
        return validate(self, is_last)

    monkeypatch.setattr(trainer_mod.Trainer, "validate", spy_validate)
    tracker = _Recorder()
    result = trainer_mod.fit(cfg, data, torch.device("cpu"), tracker, tmp_path / "state")
    vals = [e for e in events if e.startswith("val@")]
    assert vals == ["val@3", "val@6"]
    assert events.index("test") > events.index("val@6")  # read only after the final validation evaluation
    assert events.count("test") == 8  # each test image once: one evaluation
    assert tracker.metrics["test/miou"] == pytest.approx(100 * result.test_miou)  # logged in %, kept as a fraction
    assert 0.0 <= result.test_miou <= 1.0 and "test/iou/background" in tracker.metrics
    assert "test/pixel_acc" in tracker.metrics and tracker.metrics["val/final_miou"] == pytest.approx(100 * result.final_miou)


def test_test_miou_is_logged_and_in_the_result_file(tiny_overrides, tmp_path, capsys):
    cfg = compose_cfg(tiny_overrides)
    val_miou = run(cfg, launch_dir=tmp_path)
    result = read_result(run_dir_for(cfg, tmp_path))
    assert result is not None and 0.0 <= result["test_miou"] <= 1.0 and 100 * result["final_miou"] == pytest.approx(val_miou)
    uri = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("logger.tracking_uri="))
    client = MlflowClient(tracking_uri=uri)
    (r,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert r.data.metrics["test/miou"] == pytest.approx(100 * result["test_miou"]) and r.data.tags["dcc.unit"] == "percent"
    assert "test/iou/background" in r.data.metrics and "val/final_miou" in r.data.metrics
    assert [m.step for m in client.get_metric_history(r.info.run_id, "test/miou")] == [6]  # once, at the end
    out = capsys.readouterr().out
    assert f"final val mIoU: {val_miou:.2f}%" in out and f"; test mIoU: {100 * result['test_miou']:.2f}%" in out
    run(cfg, launch_dir=tmp_path)  # met again: reports the stored test mIoU
    out = capsys.readouterr().out
    assert "already finished" in out and f"test mIoU: {100 * result['test_miou']:.2f}%" in out


def test_self_training_measures_the_student_on_test_not_the_teacher(tiny_overrides, tmp_path):
    cfg = compose_cfg(tiny_overrides + ["loss=st", "trainer.max_steps=3", "logger=none"])
    data = build_data(cfg)
    events: list[str] = []
    data.test = _Spy(data.test, events)
    from dcc.engine.selftrain import self_train

    tracker = _Recorder()
    result = self_train(cfg, data, torch.device("cpu"), tracker, tmp_path / "st")
    assert events.count("test") == 8 and result.test_miou is not None
    assert "test/miou" in tracker.metrics and not any(k.startswith("teacher/test") for k in tracker.metrics)


def test_no_test_split_gives_null_in_the_result_file(tiny_overrides, tmp_path, capsys):
    cfg = compose_cfg(tiny_overrides + ["dataset.scenes.num_test=0", "logger=none"])
    run(cfg, launch_dir=tmp_path)
    assert read_result(run_dir_for(cfg, tmp_path))["test_miou"] is None
    assert "test mIoU: n/a (no test split: results are on val)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ replicates
def test_split_seed_follows_the_training_seed_and_the_default_run_keeps_its_directory():
    default = compose_cfg([])
    assert default.split.seed == 42 == default.trainer.seed
    literal = compose_cfg(["split.seed=42"])  # the value before split.seed followed trainer.seed
    assert run_dir_for(default, Path("/x")) == run_dir_for(literal, Path("/x"))
    assert compose_cfg(["trainer.seed=3"]).split.seed == 3
    assert compose_cfg(["trainer.seed=3", "split.seed=7"]).split.seed == 7  # an explicit value still wins


def _labeled(overrides: list[str]) -> np.ndarray:
    return build_data(compose_cfg(overrides)).labeled


def test_replicate_r_gives_every_arm_the_same_labeled_subset_and_other_r_another(tiny_overrides):
    over = tiny_overrides + ["split=1_8"]
    by_arm = {arm: _labeled(over + [f"loss={arm}", "trainer.seed=1"]) for arm in ("suponly", "ablation_viii", "st")}
    np.testing.assert_array_equal(by_arm["suponly"], by_arm["ablation_viii"])
    np.testing.assert_array_equal(by_arm["suponly"], by_arm["st"])
    other = _labeled(over + ["loss=suponly", "trainer.seed=2"])
    assert len(other) == len(by_arm["suponly"]) and not np.array_equal(other, by_arm["suponly"])


def test_a_fixed_labeled_list_keeps_the_subset_across_replicates(tiny_overrides, tmp_path, caplog):
    listed = tmp_path / "labeled.txt"
    listed.write_text("3\n11\n20\n")
    over = tiny_overrides + [f"split.labeled_list={listed}"]
    with caplog.at_level("INFO", logger="dcc.data.splits"):
        one, two = _labeled(over + ["trainer.seed=1"]), _labeled(over + ["trainer.seed=2"])
    np.testing.assert_array_equal(one, [3, 11, 20])
    np.testing.assert_array_equal(one, two)
    assert "the labeled subset is fixed by split.labeled_list" in caplog.text


def _initial_state(overrides: list[str]) -> dict[str, torch.Tensor]:
    cfg = compose_cfg(overrides + ["logger=none"])
    t = trainer_mod.Trainer(cfg, build_data(cfg), torch.device("cpu"), NullTracker(), Path("unused"))
    return {k: v.clone() for k, v in t.model.state_dict().items() if not k.startswith("projector.")}


def test_every_arm_of_replicate_r_starts_from_the_same_backbone_and_head(tiny_overrides):
    """The projector (CAC only) draws from a forked RNG: backbone, head and classifier are those of SupOnly."""
    sup = _initial_state(tiny_overrides + ["loss=suponly", "trainer.seed=1"])
    cac = _initial_state(tiny_overrides + ["loss=ablation_viii", "trainer.seed=1"])
    other = _initial_state(tiny_overrides + ["loss=suponly", "trainer.seed=2"])
    assert sup.keys() == cac.keys() and any(k.startswith("head.") for k in sup)
    for k in sup:
        assert torch.equal(sup[k], cac[k]), k
    assert any(not torch.equal(sup[k], other[k]) for k in sup if k.startswith("head."))


# ------------------------------------------------------------------------------------------ self-training baseline
class _FixedLogits(torch.nn.Module):
    """Logits whose softmax confidence is 0.95 on the left half of every image (class 2) and 0.6 on the right (class 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        logits = torch.zeros(b, 3, h, w)
        left, right = slice(0, w // 2), slice(w // 2, w)
        # softmax of (a, 0, 0) = e^a / (e^a + 2): 0.95 at a = ln 38, 0.6 at a = ln 3
        logits[:, 2, :, left] = float(np.log(38.0))
        logits[:, 1, :, right] = float(np.log(3.0))
        return logits


@pytest.mark.parametrize("threshold, right", [(0.0, 1), (0.5, 1), (0.7, 255), (0.9, 255)])
def test_st_threshold_turns_low_confidence_pixels_into_ignore(tiny_overrides, threshold, right):
    from dcc.engine.selftrain import pseudo_label

    cfg = compose_cfg(tiny_overrides + ["loss=st", f"loss.st_threshold={threshold}"])
    data = build_data(cfg)
    pseudo = pseudo_label(_FixedLogits(), cfg, data, torch.device("cpu"))
    assert len(pseudo) == len(data.unlabeled)
    _, mask = pseudo.load(0)
    w = mask.shape[1]
    assert (mask[:, : w // 2] == 2).all() and (mask[:, w // 2:] == right).all()
    assert pseudo.kept == pytest.approx(1.0 if right == 1 else (w // 2) / w)


def test_the_unlabeled_views_augmentation_reaches_the_pseudo_labeled_images(tiny_overrides):
    """With loss.st_unlabeled_aug the pseudo-labeled stream is colour-jittered / grayscaled / blurred like CAC's
    unlabeled views; without it (and for the labeled stream) a flat-colour image stays flat and unchanged."""
    from dcc.data.build import labeled_loader
    from dcc.data.datasets import ArraySource

    cfg = compose_cfg(tiny_overrides + ["loss=st", "dataset.base_size=32", "dataset.labeled_scale=[1.0,1.0]"])
    flat = np.empty((8, 32, 32, 3), dtype=np.uint8)
    flat[...] = (40, 160, 220)
    source = ArraySource(flat, np.zeros((8, 32, 32), dtype=np.uint8))

    def batch(aug: bool) -> torch.Tensor:
        loader = labeled_loader(cfg.dataset, cfg.trainer, source, np.arange(8), start_step=0, device=torch.device("cpu"), stream="pseudo",
                                batch_size=8, unlabeled_aug=aug)
        return next(iter(loader))[0]

    plain, augmented = batch(False), batch(True)
    assert torch.allclose(plain, plain[:1, :, :1, :1].expand_as(plain))  # every pixel of every image: the same colour
    changed = (augmented - plain).abs().amax(dim=(1, 2, 3)) > 0.05
    assert changed.sum() >= 4  # p = 0.8 jitter, 0.2 grayscale, 0.5 blur: most of 8 images change


def test_the_trainer_asks_for_the_unlabeled_augmentation_on_the_pseudo_stream_only(tiny_overrides, monkeypatch):
    calls: list[tuple[str, bool]] = []
    real = trainer_mod.labeled_loader

    def spy(*args, **kwargs):
        calls.append((kwargs.get("stream", "labeled"), kwargs.get("unlabeled_aug", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "labeled_loader", spy)
    for aug in (True, False):
        cfg = compose_cfg(tiny_overrides + ["loss=st", f"loss.st_unlabeled_aug={aug}", "logger=none"])
        data = build_data(cfg)
        t = trainer_mod.Trainer(cfg, data, torch.device("cpu"), NullTracker(), Path("unused"),
                                extra_labeled=(data.train, data.unlabeled))
        next(t._labeled_batches())
    assert calls == [("labeled", False), ("pseudo", True), ("labeled", False), ("pseudo", False)]
    assert compose_cfg(["loss=st"]).loss.st_unlabeled_aug is True  # the preset runs ST with it


def test_self_training_keys_leave_the_other_arms_run_directories_alone(tmp_path):
    """`loss=suponly,st loss.st_threshold=0.7 loss.teacher_checkpoint=...`: the SupOnly run is the one already made
    (it does not read them); ST's directory is its own per threshold."""
    st_keys = ["loss.st_threshold=0.7", "loss.st_unlabeled_aug=false", "loss.teacher_checkpoint=/t/s${trainer.seed}.pt"]
    for preset in ("suponly", "ablation_viii"):
        plain = compose_cfg([f"loss={preset}", "trainer.seed=1"])
        assert run_dir_for(compose_cfg([f"loss={preset}", "trainer.seed=1"] + st_keys), tmp_path) == \
            run_dir_for(plain, tmp_path)
    st = [run_dir_for(compose_cfg(["loss=st", "trainer.seed=1", f"loss.st_threshold={v}"]), tmp_path) for v in (0, 0.7)]
    assert st[0] != st[1]
