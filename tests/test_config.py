"""Every preset composes, Table 3's ticks are exact, and wrong options fail at start naming the key."""

from __future__ import annotations


import pytest

from dcc.cli import quote_split_overrides
from dcc.config import ConfigError, Method, validate
from tests.conftest import ROOT, compose_cfg

# Table 3 of the paper: Proj, Context, CL, Dir, NS, PF.
TABLE3 = {
    "suponly": (Method.suponly, "------"),
    "st": (Method.st, "------"),
    "ablation_i": (Method.cac, "PC----"),
    "ablation_ii": (Method.cac, "PCL---"),
    "ablation_iii": (Method.cac, "PCLD--"),
    "ablation_iv": (Method.cac, "PCLDN-"),
    "ablation_v": (Method.cac, "PCL-NF"),
    "ablation_vi": (Method.cac, "P-LDNF"),
    "ablation_vii": (Method.cac, "-CLDNF"),
    "ablation_viii": (Method.cac, "PCLDNF"),
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def test_loss_presets_are_exactly_table3():
    assert options("loss") == sorted([*TABLE3, "weakly"])  # weakly: Table 5 (tests/test_weak.py)
    for preset, (method, ticks) in TABLE3.items():
        cfg = compose_cfg([f"loss={preset}"])
        got = "".join(
            letter if cfg.loss[key] else "-"
            for key, letter in zip(("proj", "context", "cl", "dir", "ns", "pf"), "PCLDNF")
        )
        assert (cfg.loss.method, got, cfg.loss.preset) == (method, ticks, preset)
        validate(cfg)


@pytest.mark.parametrize("segnet", ["deeplabv3plus", "pspnet"])
@pytest.mark.parametrize("split", ["'1_16'", "'1_8'", "'1_4'", "full"])
def test_every_group_option_composes_and_validates(segnet, split):
    for backbone in options("backbone"):
        cfg = compose_cfg([f"segnet={segnet}", f"split={split}", f"backbone={backbone}"])
        validate(cfg)
    assert cfg.split.name == split.strip("'")


def test_split_fractions_and_defaults():
    fractions = {n: compose_cfg([f"split='{n}'" if n != "full" else "split=full"]).split.fraction for n in options("split")}
    assert fractions == {"1_16": 1 / 16, "1_8": 1 / 8, "1_4": 1 / 4, "full": 1.0}
    cfg = compose_cfg()
    assert (cfg.loss.preset, cfg.split.name, cfg.dataset.name.name, cfg.backbone.name) == (
        "ablation_viii", "1_8", "digits", "resnet10t")  # the digits preset picks the small pretrained backbone
    assert compose_cfg(["backbone=resnet18"]).backbone.name == "resnet18"  # the command line still wins


def test_demo_budget_comes_from_the_dataset_preset_and_the_command_line_wins():
    cfg = compose_cfg()
    assert cfg.trainer.max_steps < 92560 and cfg.optim.name.name == "adamw"
    assert compose_cfg(["trainer.max_steps=7"]).trainer.max_steps == 7


def test_split_names_on_the_command_line_are_quoted():
    argv = ["run.py", "-m", "loss=ablation_iv,ablation_viii", "split=1_8", "split.seed=3"]
    assert quote_split_overrides(argv) == ["run.py", "-m", "loss=ablation_iv,ablation_viii", "split='1_8'", "split.seed=3"]
    assert quote_split_overrides(["split=1_16,1_8,full"]) == ["split='1_16','1_8',full"]


@pytest.mark.parametrize(
    "override, key",
    [("segnet.name=unet", "segnet.name"), ("loss.method=foo", "loss.method"), ("trainer.precision=fp8", "trainer.precision"),
     ("optim.name=lamb", "optim.name"), ("loss.weight=abc", "loss.weight")],
)
def test_wrong_values_fail_naming_key_and_allowed_values(override, key):
    with pytest.raises(Exception) as err:
        compose_cfg([override])
    text = f"{err.value} {err.value.__cause__}"  # Hydra wraps OmegaConf's message
    assert key in text
    if "name" in key or "method" in key or "precision" in key:
        assert "expected one of" in text


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["loss=suponly", "loss.ns=true"], "loss.ns=true means nothing"),
        (["loss=st", "loss.proj=true"], "loss.proj=true"),
        (["loss=ablation_i", "loss.dir=true"], "loss.dir=true needs the contrastive loss"),
        (["loss.cl=false"], "loss.dir=true needs the contrastive loss"),
        (["loss.temperature=0"], "loss.temperature"),
        (["loss.pos_threshold=1.5"], "loss.pos_threshold"),
        (["dataset.crop_size=50"], "dataset.crop_size=50 must be a multiple"),
        (["backbone.name=not_a_model"], "backbone.name='not_a_model'"),
        (["segnet=pspnet", "segnet.consistency_stride=16"], "segnet.consistency_stride"),
    ],
)
def test_meaningless_combinations_fail_at_start(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        validate(compose_cfg(overrides))
    assert fragment in str(err.value)


def test_ablation_sweep_runs_every_row_of_table3():
    text = (ROOT / "sweeps" / "ablation.sh").read_text()
    listed = text.split("loss=")[1].split()[0].split(",")
    assert sorted(listed) == sorted(TABLE3)
