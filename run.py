"""Entry point: ``python run.py [group=option ...] [key=value ...]``; ``-m`` for sweeps."""

import sys

import hydra
from omegaconf import DictConfig

from dcc.cli import quote_split_overrides
from dcc.config import register_configs

register_configs()
sys.argv = quote_split_overrides(sys.argv)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from dcc.engine.job import run
    from dcc.engine.errors import one_message

    return one_message(run, cfg)  # project errors: one message, no traceback (HYDRA_FULL_ERROR=1 shows it)


if __name__ == "__main__":
    main()
