"""Presets compose: a group chosen on the command line is never overruled by a preset (issue 24).

An experiment preset (conf/experiment: digits_cpu, the default CPU demo, and the paper's settings) chooses groups
in its defaults list (`override /optim: sgd`) and sets values; it never sets the key that names a group's option as
a value (`optim.name: adamw`), which would win over `optim=adamw` given on the command line. Dataset files hold the
data (and how it is loaded), nothing of the network, the optimiser, the loss or the budget.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import CONF, ROOT, compose_cfg

# the key that says which option of a group a config holds
IDENTITY = {"backbone": "name", "segnet": "name", "optim": "name", "eval": "mode", "loss": "preset"}
PRESETS = [None] + sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))
ENV = {"DCC_RESNET50_WEIGHTS": "/w/r50.pth", "DCC_RESNET101_WEIGHTS": "/w/r101.pth", "DCC_VGG16_WEIGHTS": "/w/vgg.pth",
       "DCC_DINOV2_S_WEIGHTS": "/w/dino.pth", "DCC_RESNET50_DEEP_WEIGHTS": "/w/r50d.pth"}


def _options(group: str) -> dict[str, object]:
    """Each option of a group with the identity its own file gives it."""
    return {p.stem: yaml.safe_load(p.read_text())[IDENTITY[group]] for p in sorted((Path(CONF) / group).glob("*.yaml"))}


def _value(x) -> object:
    """An enum member of the structured config as the plain value a YAML file holds."""
    return getattr(x, "value", x)


@pytest.fixture(autouse=True)
def _weights_env(monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p or "default")
@pytest.mark.parametrize("group", sorted(IDENTITY))
def test_a_group_on_the_command_line_wins_over_the_preset(preset, group):
    base = [f"experiment={preset}"] if preset else []
    chosen = _value(compose_cfg(base)[group][IDENTITY[group]])
    # an option other than the preset's own: the preset must not turn it back
    option, identity = next((o, i) for o, i in _options(group).items() if i != chosen)
    got = _value(compose_cfg(base + [f"{group}={option}"])[group][IDENTITY[group]])
    assert got == identity, f"{group}={option} on {preset or 'the default preset'} gave {IDENTITY[group]}={got}"


def test_the_reported_cases():
    """The cases found: AdamW trained after `optim=sgd`, ResNet-50 after `backbone=resnet101` on the R50 preset."""
    sgd = compose_cfg(["optim=sgd"]).optim
    assert _value(sgd.name) == "sgd" and sgd.momentum == 0.9
    r50 = ["experiment=voc_deeplabv3plus_r50"]
    assert compose_cfg(r50 + ["backbone=resnet101"]).backbone.name == "resnet101"
    assert _value(compose_cfg(r50 + ["eval=slide"]).eval.mode) == "slide"
    assert _value(compose_cfg(r50 + ["optim=adamw"]).optim.name) == "adamw"


@pytest.mark.parametrize("path", sorted(Path(CONF).glob("dataset/*.yaml")) + sorted(Path(CONF).glob("experiment/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_no_preset_names_a_group_option_as_a_value(path):
    """The rule itself, for groups the test above cannot reach: choose groups in the defaults list."""
    body = yaml.safe_load(path.read_text()) or {}
    for group, key in IDENTITY.items():
        assert key not in (body.get(group) or {}), (
            f"{path.name} sets {group}.{key}; choose the option in its defaults list (override /{group}: ...)")


# what the sweep scripts passed on the command line before the budgets became the group conf/profile/: the same
# config (so the same run directories: runs made before continue and count as done)
PROFILE_AS_OVERRIDES = {
    "try": ["trainer.max_steps=40", "trainer.eval_every=20", "trainer.checkpoint_every=20", "loss.start_step=10"],
    "bench": ["trainer.max_steps=1500", "trainer.eval_every=150", "trainer.checkpoint_every=150", "loss.start_step=300",
              "trainer.channels_last=true", "trainer.progress=false"],
}


@pytest.mark.parametrize("profile", sorted(PROFILE_AS_OVERRIDES))
@pytest.mark.parametrize("preset", [[], ["loss=suponly", "split=full", "trainer.seed=1"], ["backbone=resnet18"]],
                         ids=["default", "ceiling", "resnet18"])
def test_a_profile_is_the_overrides_it_replaced(profile, preset):
    from omegaconf import OmegaConf

    from dcc.engine.job import run_dir_for

    by_group = compose_cfg(preset + [f"profile={profile}"])
    by_hand = compose_cfg(preset + PROFILE_AS_OVERRIDES[profile])
    assert OmegaConf.to_container(by_group) == OmegaConf.to_container(by_hand)
    assert run_dir_for(by_group, ROOT) == run_dir_for(by_hand, ROOT)
    # a later override still wins over the profile
    assert compose_cfg(preset + [f"profile={profile}", "trainer.max_steps=7"]).trainer.max_steps == 7


def test_the_bench_profile_runs_one_thread_jobs_on_the_local_launcher():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        hydra_cfg = compose("config", overrides=["profile=bench"], return_hydra_config=True).hydra
        assert hydra_cfg.launcher._target_.endswith("LocalLauncher") and hydra_cfg.launcher.cpus_per_task == 1
        # the user's launcher wins (a SLURM sweep of the bench budget)
        slurm = compose("config", overrides=["profile=bench", "hydra/launcher=slurm"], return_hydra_config=True).hydra
        assert "Slurm" in slurm.launcher._target_


def _entry_defaults() -> dict[str, str]:
    """The group options conf/config.yaml names (``{"backbone": "resnet10t_l3", ...}``)."""
    entries = yaml.safe_load((Path(CONF) / "config.yaml").read_text())["defaults"]
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items()
            if "/" not in k and not k.startswith("override") and v is not None}


def test_the_entry_config_names_the_groups_the_default_run_uses():
    """`python run.py` trains with the options conf/config.yaml lists, not options a preset swaps in behind it."""
    named = _entry_defaults()
    assert named["experiment"] == "digits_cpu" and named["dataset"] == "digits"
    default = compose_cfg([])
    for group, key in IDENTITY.items():
        assert _value(default[group][key]) == _options(group)[named[group]], f"{group}: config.yaml names {named[group]}"
    assert default.preset == "digits_cpu"
    demo = yaml.safe_load((Path(CONF) / "experiment" / "digits_cpu.yaml").read_text())
    assert "defaults" not in demo, "the demo preset sets values only: its groups are the entry config's"


@pytest.mark.parametrize("path", sorted(Path(CONF).glob("dataset/*.yaml")), ids=lambda p: p.stem)
def test_a_dataset_file_holds_data_only(path):
    body = yaml.safe_load(path.read_text()) or {}
    assert "defaults" not in body, f"{path.name} chooses groups: that is a preset's job (conf/experiment)"
    loading = {"num_workers", "eval_batch_size"}  # how the data is read: a dataset's own concern
    assert set(body) <= {"dataset", "trainer", "logger"}, f"{path.name} sets {sorted(set(body) - {'dataset'})}"
    assert set(body.get("trainer") or {}) <= loading, f"{path.name} sets a budget: {body['trainer']}"


@pytest.mark.parametrize("dataset", ["voc", "cityscapes", "folder"])
def test_another_dataset_under_the_demo_preset_fails_at_start_in_one_line(dataset, tmp_path):
    from dcc.config import ConfigError, validate

    root = [f"dataset.root={tmp_path}"] if dataset == "folder" else []
    if dataset == "folder":
        (tmp_path / "classes.txt").write_text("background\nthing\n")
    with pytest.raises(ConfigError, match=f"dataset={dataset} with experiment=digits_cpu .* add experiment=none") as e:
        validate(compose_cfg([f"dataset={dataset}", *root]))
    assert "\n" not in str(e.value)
    plain = compose_cfg(["experiment=none", f"dataset={dataset}", *root])
    validate(plain)
    assert plain.preset == "none" and plain.trainer.max_steps == compose_cfg(["experiment=none"]).trainer.max_steps
    # the rule is the preset's own declaration (preset_for), not a name in the code
    with pytest.raises(ConfigError, match=f"dataset={dataset} with experiment=none .*made for dataset=digits,voc2"):
        validate(compose_cfg(["experiment=none", f"dataset={dataset}", *root, "preset_for=[digits,voc2]"]))


def test_the_preset_name_is_shown_but_not_hashed():
    from dcc.engine.job import run_dir_for

    demo = compose_cfg([])
    assert demo.preset == "digits_cpu"
    renamed = compose_cfg(["preset=other", "preset_for=[digits,voc]"])
    assert run_dir_for(demo, ROOT) == run_dir_for(renamed, ROOT)
