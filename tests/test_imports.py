"""The wings import one way (config <- data <- method <- engine <- sweeps): import-linter's contracts in
pyproject.toml, checked here so that a wrong-way import fails the suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _lint(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "importlinter.cli"]
    return subprocess.run(cmd + ["--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def test_a_wrong_way_import_breaks_them(tmp_path):
    """The contract is not vacuous: the data wing importing the engine (as it once did for a file lock) fails."""
    shutil.copytree(ROOT / "dcc", tmp_path / "dcc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    build = tmp_path / "dcc" / "data" / "build.py"
    build.write_text(build.read_text() + "\nfrom dcc.engine.tracking import open_client  # noqa: E402,F401\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert "dcc.data is not allowed to import dcc.engine" in proc.stdout
    assert "dcc.data.build -> dcc.engine.tracking" in proc.stdout
