"""Training throughput vs. raw environment stepping, measured in the same run.

For each setting, alternately (so that the machine's noise hits both alike):
  raw:   the same environments (scenario, number of envs) in a `SyncVectorEnv`, stepped with random actions by a
         single process, no learning: the simulator's limit on one core (SMAX and VMAS: the script's own batched
         adapter, random actions, same number of environments);
  train: the script itself with the setting's flags, its last logged `charts/SPS`
         (rollout, GAE and all updates included), and its median `perf/rollout_time` and `perf/update_time`.
  library: for MPE and MaMuJoCo, the environments as their library ships them, PettingZoo's parallel API
         (mpe2's and MaMuJoCo's `parallel_env`), `--num-envs` of them stepped in turn with random actions (drawn
         before the clock starts) by a single process: what stepping these simulators costs without our adapter.
The table reports the medians over --repeats and the ratios train / library and train / raw.

The settings are benchmark/run.py's; flags after `--` are added to each (a row is named by both):

    python benchmark/throughput.py --settings mpe-spread-n3 mpe-spread-n5 paper-mpe-spread-n3 --repeats 3
    python benchmark/throughput.py --settings smax-3m --steps 320000 --repeats 3
    python benchmark/throughput.py --plot     # the MPE rows against N, from the CSV
"""

import argparse
import csv
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import run
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIELDS = [
    "setting", "command", "library_sps", "raw_sps", "train_sps", "ratio_library", "ratio", "rollout_ms_per_step",
    "raw_ms_per_step", "update_ms", "raw_all", "train_all", "library_all",
]  # fmt: skip
SETTINGS = run.SETTINGS  # the launcher's settings; a measurement may add flags after `--`


def script_args(script: str, flags: list):
    module = __import__(Path(script).stem)
    return module, tyro.cli(module.Args, args=flags)


def raw_sps(script: str, flags: list, steps: int) -> float:
    """Joint steps per second of the script's environments in one process, driven by random actions."""
    module, args = script_args(script, flags)
    if hasattr(args, "backend"):  # SMAX: the script's own vmapped adapter, random available actions
        return raw_smax_sps(module, args, steps)
    if hasattr(args, "max_steps") and hasattr(module, "VMASEnvs"):  # VMAS: the script's adapter, random actions
        return raw_vmas_sps(module, args, steps)
    env_fns = [module.make_env(args) for _ in range(args.num_envs)]
    envs = gym.vector.SyncVectorEnv(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.reset(seed=0)
    envs.action_space.seed(0)
    single = envs.single_action_space
    rng = np.random.default_rng(0)
    start, done = time.perf_counter(), 0
    while done < steps:
        if isinstance(single, gym.spaces.Box):  # the padded box is unbounded: sample the agents' own bounds
            env = envs.envs[0]
            low, high = env.act_spaces[0].low[0], env.act_spaces[0].high[0]
            actions = rng.uniform(low, high, (args.num_envs,) + single.shape)
            actions = actions.astype(np.float32)
        else:
            actions = envs.action_space.sample()
        envs.step(actions)
        done += args.num_envs
    elapsed = time.perf_counter() - start
    envs.close()
    return done / elapsed


def library_sps(script: str, flags: list, steps: int) -> Optional[float]:
    """Joint steps per second of the setting's environments through PettingZoo's parallel API, `num_envs` of them in
    turn in one process, random actions; None for the batched simulators (SMAX, VMAS), which have no such API."""
    module, args = script_args(script, flags)
    if not hasattr(module, "MultiAgentArrays"):  # the scripts that wrap a PettingZoo env have this adapter
        return None
    if hasattr(args, "agent_conf"):  # MaMuJoCo: the parallel_env the script's adapter builds and wraps

        def make():
            return module.MultiAgentArrays(args).env
    else:  # MPE: the script's adapter drives mpe2's raw_env, so build mpe2's parallel_env here
        kwargs = {"N": args.num_agents or 3} if args.env_id == "simple_spread_v3" else {}
        mpe = importlib.import_module(f"mpe2.{args.env_id}")

        def make():
            return mpe.parallel_env(continuous_actions=args.continuous_actions, max_cycles=args.max_cycles, **kwargs)

    envs = [make() for _ in range(args.num_envs)]
    for i, env in enumerate(envs):
        env.reset(seed=i)
        for agent in env.possible_agents:
            env.action_space(agent).seed(i)
    pool = [{a: env.action_space(a).sample() for a in env.possible_agents} for env in envs for _ in range(8)]
    start, done = time.perf_counter(), 0
    while done < steps:
        for env in envs:
            env.step(pool[done % len(pool)])
            if not env.agents:
                env.reset()
            done += 1
    elapsed = time.perf_counter() - start
    for env in envs:
        env.close()
    return done / elapsed


def raw_smax_sps(module, args, steps: int) -> float:
    import torch

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # as the script sets them: one XLA thread on the CPU
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    torch.set_num_threads(1)
    envs = module.SMAXEnvs(args.env_id, args.num_envs, 0, torch.device("cpu"))  # compiled on construction
    out, generator = envs.reset(), torch.Generator().manual_seed(0)
    start, done = time.perf_counter(), 0
    while done < steps:
        out = envs.step(
            torch.multinomial(out["avail"].flatten(0, 1).float(), 1, generator=generator).view(args.num_envs, -1)
        )
        done += args.num_envs
    return done / (time.perf_counter() - start)


def raw_vmas_sps(module, args, steps: int) -> float:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # as the scripts
    cpu = torch.device("cpu")
    envs = module.VMASEnvs(args, args.num_envs, 0, cpu)
    envs.reset()
    shape, generator = (args.num_envs, len(envs.agents), max(envs.act_dims)), torch.Generator().manual_seed(0)
    start, done = time.perf_counter(), 0
    while done < steps:
        envs.step(torch.rand(shape, generator=generator) * 2 - 1)
        done += args.num_envs
    return done / (time.perf_counter() - start)


def train_sps(script: str, flags: list, steps: int) -> tuple:
    """The last charts/SPS the script logs in a run of `steps` joint steps, and its median seconds per iteration
    of rollout and of update."""
    with tempfile.TemporaryDirectory() as cwd:
        cmd = [sys.executable, str(ROOT / script), *flags, "--total-timesteps", str(steps), "--seed", "1"]
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        (run_dir,) = Path(cwd, "runs").iterdir()
        accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        accumulator.Reload()
        rollout = statistics.median(e.value for e in accumulator.Scalars("perf/rollout_time"))
        update = statistics.median(e.value for e in accumulator.Scalars("perf/update_time"))
        return accumulator.Scalars("charts/SPS")[-1].value, rollout, update


def plot_scaling(csv_path: str, png_path: str) -> None:
    """Per-iteration update time and per-step rollout time of lv_happo_mpe.py against N (mpe-spread-n2 to n8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = {row["setting"]: row for row in csv.DictReader(f)}
    points = [(n, rows[f"mpe-spread-n{n}"]) for n in (2, 3, 5, 8) if f"mpe-spread-n{n}" in rows]
    ns = [n for n, _ in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(ns, [float(r["update_ms"]) for _, r in points], "o-")
    left.set(xlabel="agents N", ylabel="update ms per iteration", title="update (1,000 samples)")
    right.plot(ns, [float(r["rollout_ms_per_step"]) for _, r in points], "o-", label="training rollout")
    right.plot(ns, [float(r["raw_ms_per_step"]) for _, r in points], "s--", label="raw stepping")
    right.set(xlabel="agents N", ylabel="ms per vector step (10 envs)", title="rollout")
    right.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100_000, help="joint steps per measurement")
    parser.add_argument("--out", default=str(ROOT / "benchmark" / "results" / "throughput.csv"))
    parser.add_argument("--plot", action="store_true", help="only draw the scaling in N from --out's CSV, to PNG")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags added to every setting")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    if args.plot:
        plot_scaling(args.out, str(Path(args.out).with_name("throughput_scaling.png")))
        return

    rows = []
    for setting in args.settings:
        script, flags = SETTINGS[setting]
        flags, name = [*flags, *extra], " ".join([setting, *extra])
        libraries, raws, trains, rollouts, updates = [], [], [], [], []
        for _ in range(args.repeats):
            libraries.append(library_sps(script, flags, args.steps))
            raws.append(raw_sps(script, flags, args.steps))
            sps, rollout, update = train_sps(script, flags, args.steps)
            trains.append(sps)
            rollouts.append(rollout)
            updates.append(update)
        raw, train = statistics.median(raws), statistics.median(trains)
        library = statistics.median(libraries) if libraries[0] is not None else None
        _, script_flags = script_args(script, flags)
        rows.append(
            {
                "setting": name,
                "command": f"python {script} {' '.join(flags)}",
                "library_sps": "" if library is None else round(library),
                "raw_sps": round(raw),
                "train_sps": round(train),
                "ratio_library": "" if library is None else round(train / library, 3),
                "ratio": round(train / raw, 3),
                "rollout_ms_per_step": round(1000 * statistics.median(rollouts) / script_flags.num_steps, 3),
                "raw_ms_per_step": round(1000 * script_flags.num_envs / raw, 3),
                "update_ms": round(1000 * statistics.median(updates), 1),
                "raw_all": " ".join(str(round(x)) for x in raws),
                "train_all": " ".join(str(round(x)) for x in trains),
                "library_all": "" if library is None else " ".join(str(round(x)) for x in libraries),
            }
        )
        print(f"{name}: {rows[-1]}", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if Path(args.out).exists():  # keep the other settings' rows from earlier runs
        with open(args.out, newline="") as f:
            measured = {row["setting"] for row in rows}
            rows = [row for row in csv.DictReader(f) if row["setting"] not in measured] + rows
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    print(
        "\n| setting | command | library SPS | raw SPS | train SPS | train / library | train / raw "
        "| rollout ms/step (raw) | update ms/iteration |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for row in rows:
        ratio_library = f"{float(row['ratio_library']):.2f}" if row.get("ratio_library") else "-"
        print(
            f"| {row['setting']} | `{row['command']}` | {row.get('library_sps') or '-'} | {row['raw_sps']} "
            f"| {row['train_sps']} | {ratio_library} | {float(row['ratio']):.2f} "
            f"| {float(row['rollout_ms_per_step']):.2f} ({float(row['raw_ms_per_step']):.2f}) "
            f"| {float(row['update_ms']):.0f} |"
        )


if __name__ == "__main__":
    main()
