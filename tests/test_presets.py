"""Presets compose: a group chosen on the command line is never overruled by a preset (issue 24).

A preset (the digits dataset's demo settings, every conf/experiment file) chooses groups in its defaults list
(`override /optim: adamw`) and sets values; it never sets the key that names a group's option as a value
(`optim.name: adamw`), which would win over `optim=sgd` given on the command line.
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
