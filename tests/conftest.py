"""Shared helpers of the test suite: run a script as a user would and read back what it logged."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_script(script: str, *flags: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python script flags...` in cwd (where runs/ and videos/ land) on the CPU, without a display."""
    env = dict(os.environ, SDL_VIDEODRIVER="dummy", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, str(ROOT / script), *flags],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_scalars(run_dir: Path) -> dict:
    """{tag: [(step, value), ...]} of every scalar in the TensorBoard run directory."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def only_run_dir(cwd: Path) -> Path:
    run_dirs = list((cwd / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    return run_dirs[0]


@pytest.fixture
def tmp_cwd(tmp_path: Path) -> Path:
    return tmp_path
