"""What a new user hit (issue 26): another dataset's result reported as theirs, a damaged checkpoint as a dead end,
backbones that crash on the default preset, store races, long tracebacks."""

from __future__ import annotations

import pytest

from dcc.engine import checkpoint
from dcc.engine.job import run, run_dir_for
from tests.conftest import compose_cfg
from tests.test_robust import _die_at_step_5, _Killed


# ------------------------------------------------------------------------------ a damaged checkpoint (item 2)
def _damaged_run(tiny_overrides, tmp_path, monkeypatch):
    cfg = compose_cfg(tiny_overrides)
    original = _die_at_step_5(monkeypatch)
    with pytest.raises(_Killed):
        run(cfg, launch_dir=tmp_path)
    monkeypatch.setattr("dcc.method.consistency.ConsistencyBranch.__call__", original)
    run_dir = run_dir_for(cfg, tmp_path)
    last = run_dir / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # a copy cut short, a disk that filled
    return run_dir, last


def test_a_damaged_checkpoint_says_how_to_start_over(tiny_overrides, tmp_path, monkeypatch):
    run_dir, last = _damaged_run(tiny_overrides, tmp_path, monkeypatch)
    with pytest.raises(checkpoint.CheckpointError) as err:
        run(compose_cfg(tiny_overrides), launch_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"the checkpoint {last} is damaged" in message
    assert "trainer.resume=restart" in message and ".replaced-" in message
    assert last.exists()  # nothing moved or deleted without being asked


def test_restart_works_on_a_damaged_checkpoint_and_keeps_it(tiny_overrides, tmp_path, monkeypatch, capsys):
    run_dir, last = _damaged_run(tiny_overrides, tmp_path, monkeypatch)
    damaged_bytes = last.read_bytes()
    capsys.readouterr()
    assert run(compose_cfg(tiny_overrides + ["trainer.resume=restart"]), launch_dir=tmp_path) > 0
    out = capsys.readouterr().out
    (aside,) = run_dir.parent.glob(run_dir.name + ".replaced-*")
    assert f"moved the previous run (damaged checkpoint last.pt) to {aside}" in out
    assert (aside / "last.pt").read_bytes() == damaged_bytes  # kept as it was
    assert checkpoint.load(last)["finished"]
