"""Shared helpers of the test suite: run a script as a user would and read back what it logged."""

import contextlib
import io
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# as lv_happo_smac.py sets them before jax is first imported: jax on the CPU, one XLA thread
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache() -> None:
    """SMAX compiles the same programs in many test processes: jax's persistent cache keeps them, one folder per
    xdist worker, so that no two processes write one entry at once."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")  # set in each worker before its first test
    folder = os.path.join(tempfile.gettempdir(), f"lv-marl-jax-cache-{worker}")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", folder)


def run_script(script: str, *flags: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python script flags...` in cwd (where runs/ and videos/ land) on the CPU, without a display."""
    env = dict(os.environ, SDL_VIDEODRIVER="dummy", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, str(ROOT / script), *flags], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
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


# the logging contract (the README's table of logged tags): every script logs these, and these per position k of
# the update order
CONTRACT = [
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/SPS",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clipfrac",
]
PER_POSITION = ["lv/factor_mean_{}", "lv/factor_max_{}", "lv/factor_clip_fraction_{}", "lv/adv_variance_{}"]


def assert_logged_and_finite(scalars: dict, tags: list) -> None:
    for tag in tags:
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
        assert all(math.isfinite(value) for _, value in scalars[tag]), tag


def assert_contract(scalars: dict, num_agents: int, steps: list) -> None:
    """The logging contract, per position k < num_agents and no further, at these global steps; the first agent
    updated always sees M = 1, and with the clipped factor no later position has a larger M * A variance."""
    assert_logged_and_finite(scalars, CONTRACT + [tag.format(k) for tag in PER_POSITION for k in range(num_agents)])
    assert not any(tag.endswith(f"_{num_agents}") for tag in scalars if tag.startswith("lv/"))
    assert [step for step, _ in scalars["charts/SPS"]] == steps
    assert all(value == 1.0 for _, value in scalars["lv/factor_max_0"])


def assert_one_line_error(result: subprocess.CompletedProcess, message: str, cwd: Path) -> None:
    """A non-zero exit with one line on stderr that contains message, no traceback, and nothing started."""
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (cwd / "runs").exists()


def parse(module, *flags: str):
    """The script's Args for these flags, as its command line parses them."""
    return tyro.cli(module.Args, args=list(flags))


def flag_error(module, *flags: str) -> str:
    """What a script says of these flags: tyro's report (its box drawn away, on one line) when they do not parse,
    else the one-line error of its checks, or '' if it accepts them."""
    report = io.StringIO()
    try:
        with contextlib.redirect_stderr(report):
            args = parse(module, *flags)
    except SystemExit:
        return " ".join(re.sub(r"[│╭╮╰╯─]", " ", report.getvalue()).split())
    return module.check_args(args) or ""


def random_policy_returns(env, episodes: int, low: float, high: float) -> list:
    """Team returns of uniformly random actions in [low, high] on a script's MultiAgentArrays env."""
    rng = np.random.default_rng(0)
    returns = []
    for episode in range(episodes):
        env.reset(seed=episode)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(rng.uniform(low, high, env.action_space.shape))
            total += reward
            done = terminated or truncated
        returns.append(total)
    return returns
