"""Shared fixtures: composing run.py's config with Hydra, and a tiny, fast training setup."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dcc.cli import quote_split_overrides
from dcc.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

register_configs()
torch.set_num_threads(2)

# A model and data small enough for a few CPU steps per second.
TINY = [
    "backbone=resnet18",
    "segnet.channels=32",
    "segnet.low_level_channels=16",
    "dataset.scenes.num_train=48",
    "dataset.scenes.num_val=6",
    "dataset.scenes.num_test=8",
    "dataset.scenes.image_size=48",
    "dataset.scenes.pretrain.steps=0",
    "dataset.base_size=48",
    "dataset.crop_size=32",
    "dataset.unlabeled_scale=[1.0,1.25]",
    "trainer.batch_size=4",
    "trainer.unlabeled_batch_size=4",
    "trainer.max_steps=6",
    "trainer.eval_every=3",
    "trainer.log_every=2",
    "trainer.checkpoint_every=3",
    "trainer.eval_batch_size=6",
    "trainer.progress=false",
    "trainer.num_vis=2",
    "loss.start_step=2",
    "loss.selected_num=32",
    "loss.bank_steps=1",
    "split=1_4",
]


def compose_cfg(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=quote_split_overrides(list(overrides or [])))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One digits cache for the whole session (generation is deterministic)."""
    return tmp_path_factory.mktemp("dcc-data")


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty MLflow store made once per session: creating one (its schema migrations) takes about 3 s, which
    most tests would pay in every process they start."""
    from dcc.engine.tracking import open_client

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    open_client(f"sqlite:///{path}")
    return path


@pytest.fixture
def tiny_overrides(data_root, tmp_path, store_template, request) -> list[str]:
    """The tiny setup with its own runs directory and MLflow store (a copy of the empty template; a test marked
    ``new_store`` starts without one, e.g. to check that a failed start creates none)."""
    if request.node.get_closest_marker("new_store") is None:
        shutil.copy(store_template, tmp_path / "mlflow.db")
    return TINY + [
        f"dataset.root={data_root}",
        f"trainer.runs_root={tmp_path / 'runs'}",
        f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
