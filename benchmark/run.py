"""Runs grids of (setting, variant, seed): locally on a pool of workers, or as a Slurm job array.

Each run lives in its own folder, `{out}/{setting}/{variant}/seed{seed}/`, where the script writes `runs/...` and
the runner a `done` file once the script exits 0; a run whose `done` file exists is skipped, so a grid can be
launched again after a crash or with more seeds, and a run that left a checkpoint (`--checkpoint-every`, or an
interrupt) goes on from it with `--resume`. Variants come from the same script: `lv` (--factor clipped),
`happo` (--factor raw: plain HAPPO, or HATRPO with lv_hatrpo_mpe.py) and `mappo` (--factor none).

    python benchmark/run.py --settings mpe-spread-n3 --variants lv happo mappo --seeds 1 2 3 --total-timesteps 2000000
    python benchmark/run.py --settings smax-3m --seeds 1 2 3 --slurm benchmark/results/slurm_smax.sh  # write, don't run
    python benchmark/report.py --out benchmark/results/grid                                         # then read it
"""

import argparse
import concurrent.futures
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# setting: (script, the setting's flags); the variant, seed and budget flags are appended per run
SETTINGS = {
    "mpe-spread-n2": ("lv_happo_mpe.py", ["--num-agents", "2"]),
    "mpe-spread-n3": ("lv_happo_mpe.py", ["--num-agents", "3"]),
    "mpe-spread-n5": ("lv_happo_mpe.py", ["--num-agents", "5"]),
    "mpe-spread-n8": ("lv_happo_mpe.py", ["--num-agents", "8"]),
    "hatrpo-mpe-spread-n3": ("lv_hatrpo_mpe.py", ["--num-agents", "3"]),
    "mamujoco-halfcheetah-6x1": ("lv_happo_mamujoco.py", ["--agent-conf", "6x1"]),
    "mamujoco-manyswimmer-8x2": ("lv_happo_mamujoco.py", ["--env-id", "ManySegmentSwimmer", "--agent-conf", "8x2"]),
    "smax-3m": ("lv_happo_smac.py", ["--env-id", "3m"]),
    "smax-2s3z": ("lv_happo_smac.py", ["--env-id", "2s3z"]),
    "vmas-spread-n3": ("lv_happo_vmas.py", ["--num-agents", "3"]),
    "vmas-spread-n8": ("lv_happo_vmas.py", ["--num-agents", "8"]),
}
# the paper's published configurations (its run_config files), every hyperparameter spelled out so that later
# changes of the scripts' defaults leave them alone; deterministic evaluation and a checkpoint every 100k steps
PAPER_COMMON = ["--gamma", "0.99", "--gae-lambda", "0.95", "--learning-rate", "5e-4", "--ent-coef", "0.01"]
PAPER_COMMON += ["--max-grad-norm", "10", "--num-minibatches", "1", "--num-envs", "20"]
PAPER_COMMON += ["--eval-every", "25", "--checkpoint-every", "25"]
SETTINGS |= {
    "paper-mpe-spread-n3": (
        "lv_happo_mpe.py",
        ["--num-agents", "3", "--num-steps", "200", "--update-epochs", "5"]
        + ["--clip-coef", "0.2", "--hidden-sizes", "128", "128", "--eval-episodes", "50", *PAPER_COMMON],
    ),
    "paper-mamujoco-halfcheetah-2x3": (
        "lv_happo_mamujoco.py",
        ["--agent-conf", "2x3", "--global-obs", "--num-steps", "200", "--update-epochs", "15"]
        + ["--clip-coef", "0.05", "--hidden-sizes", "128", "128", "128", "--eval-episodes", "10", *PAPER_COMMON],
    ),
    "paper-smax-3s5z": (
        "lv_happo_smac.py",
        ["--env-id", "3s5z", "--state-type", "FP", "--num-steps", "160", "--update-epochs", "5"]
        + ["--clip-coef", "0.2", "--hidden-sizes", "64", "64", "64", "--eval-episodes", "32", *PAPER_COMMON],
    ),
    "paper-smax-6h_vs_8z": (
        "lv_happo_smac.py",
        ["--env-id", "6h_vs_8z", "--state-type", "FP", "--num-steps", "160", "--update-epochs", "5"]
        + ["--clip-coef", "0.2", "--hidden-sizes", "64", "64", "64", "--eval-episodes", "32"]
        + PAPER_COMMON,
    ),
    "paper-smax-27m_vs_30m": (  # recurrent, gamma 0.95, clip 0.05: 27 agents updated one after another
        "lv_happo_smac_rnn.py",
        ["--env-id", "27m_vs_30m", "--state-type", "FP", "--num-steps", "160", "--update-epochs", "5"]
        + ["--clip-coef", "0.05", "--hidden-sizes", "64", "64", "64", "--eval-episodes", "32"]
        + ["--data-chunk-length", "10", "--gamma", "0.95", *PAPER_COMMON[2:]],
    ),
}
# the paper's other recurrent SMAC runs: 3s5z_vs_3s6z as 27m_vs_30m but clip 0.2 and 2 minibatches; 8m_vs_9m with one
# actor shared by all agents (actor lr 1e-4, critic 5e-4), the EP state, 10 epochs, clip 0.1 (5M steps in the paper)
RNN_3S5Z = SETTINGS["paper-smax-27m_vs_30m"][1].copy()
RNN_3S5Z[RNN_3S5Z.index("--env-id") + 1], RNN_3S5Z[RNN_3S5Z.index("--clip-coef") + 1] = "3s5z_vs_3s6z", "0.2"
RNN_3S5Z[RNN_3S5Z.index("--num-minibatches") + 1] = "2"
SETTINGS["paper-smax-3s5z_vs_3s6z"] = ("lv_happo_smac_rnn.py", RNN_3S5Z)
RNN_8M = SETTINGS["paper-smax-27m_vs_30m"][1].copy()
RNN_8M[RNN_8M.index("--env-id") + 1], RNN_8M[RNN_8M.index("--state-type") + 1] = "8m_vs_9m", "EP"
RNN_8M[RNN_8M.index("--update-epochs") + 1], RNN_8M[RNN_8M.index("--clip-coef") + 1] = "10", "0.1"
RNN_8M[RNN_8M.index("--learning-rate") + 1] = "1e-4"
SETTINGS["paper-smax-8m_vs_9m-shared"] = (
    "lv_happo_smac_rnn.py",
    [*RNN_8M, "--share-actor", "--critic-learning-rate", "5e-4"],
)
# the paper's HAPPO / LV-HAPPO pairs on MaMuJoCo (its mamujoco_10thread configurations): 10 x 200, every agent sees
# the state and its id, one joint per agent but Ant 4x2; deterministic evaluation of 10 episodes and a checkpoint every
# 25 iterations
PAIRS = ["--global-obs", "--agent-obsk", "0", "--num-envs", "10", "--num-steps", "200", "--num-minibatches", "1"]
PAIRS += ["--gamma", "0.99", "--gae-lambda", "0.95", "--hidden-sizes", "128", "128", "128", "--max-grad-norm", "10"]
PAIRS += ["--max-episode-steps", "1000", "--eval-every", "25", "--eval-episodes", "10"]
PAIRS += ["--checkpoint-every", "25"]
PAIR_TASKS = {  # task: (env_id, agent_conf, epochs, clip, actor lr, critic lr, anneal, entropy)
    "halfcheetah-6x1": ("HalfCheetah", "6x1", 15, 0.05, 5e-4, 5e-4, False, 0.01),
    "ant-8x1": ("Ant", "8x1", 5, 0.1, 5e-4, 5e-4, False, 0.0),
    "ant-4x2": ("Ant", "4x2", 5, 0.1, 5e-4, 5e-4, False, 0.0),
    "humanoid-17x1": ("Humanoid", "17x1", 5, 0.1, 2.5e-4, 5e-4, True, 0.0),
    "walker2d-6x1": ("Walker2d", "6x1", 5, 0.1, 5e-4, 5e-4, False, 0.01),  # HAPPO's settings for both variants
}
for task, (env_id, conf, epochs, clip, lr, critic_lr, anneal, ent) in PAIR_TASKS.items():
    flags = ["--env-id", env_id, "--agent-conf", conf, "--update-epochs", str(epochs)]
    flags += ["--clip-coef", str(clip), "--learning-rate", str(lr), "--critic-learning-rate", str(critic_lr)]
    flags += ["--ent-coef", str(ent), *PAIRS] + (["--anneal-lr"] if anneal else [])
    SETTINGS[f"paper-mamujoco-{task}"] = ("lv_happo_mamujoco.py", flags)
# the paper's largest teams with its observations (state and one-hot id, each vector standardized): Humanoid 17x1 as
# its pair above plus --standardize-obs (the 2M runs of paper-mamujoco-humanoid-17x1 saw the raw state), and
# ManySegmentSwimmer 20x1 with its LV-HAPPO configuration, which HAPPO runs too (the paper publishes none for HAPPO)
HUMANOID = SETTINGS["paper-mamujoco-humanoid-17x1"][1]
SETTINGS["paper-mamujoco-humanoid-17x1-standardized"] = ("lv_happo_mamujoco.py", [*HUMANOID, "--standardize-obs"])
SWIMMER = ["--env-id", "ManySegmentSwimmer", "--agent-conf", "20x1", "--standardize-obs", *PAIRS]
SWIMMER[SWIMMER.index("--num-envs") + 1] = "20"
SWIMMER[SWIMMER.index("--hidden-sizes") + 1 : SWIMMER.index("--hidden-sizes") + 4] = ["256", "256"]
SWIMMER += ["--learning-rate", "1e-4", "--critic-learning-rate", "1e-4", "--clip-coef", "0.1", "--ent-coef", "1e-5"]
SWIMMER += ["--update-epochs", "5"]
SETTINGS["paper-mamujoco-swimmer-20x1"] = ("lv_happo_mamujoco.py", SWIMMER)
# the paper's shared-parameter SMAC run without a recurrent actor: one actor at lr 1e-4, the critic at 5e-4
SHARED_6H = SETTINGS["paper-smax-6h_vs_8z"][1].copy()
SHARED_6H[SHARED_6H.index("--learning-rate") + 1] = "1e-4"
SETTINGS["paper-smax-6h_vs_8z-shared"] = (
    "lv_happo_smac.py",
    [*SHARED_6H, "--share-actor", "--critic-learning-rate", "5e-4"],
)
# the same with the entropy bonus the paper's code applied to continuous actions: its sum over the 4,000-sample batch
# of the coefficient 0.01 made an effective 40 on the mean (HARL issue #52; the README's entropy note)
ENT40 = SETTINGS["paper-mpe-spread-n3"][1].copy()
ENT40[ENT40.index("--ent-coef") + 1] = "40"
SETTINGS["paper-mpe-spread-n3-ent40"] = ("lv_happo_mpe.py", ENT40)
# the team-size study (benchmark/scaling.py): VMAS simple_spread at N = 2 to 12, one budget for every N, the batch
# shape, epochs and discount that learned best at N = 3 (benchmark/results/scaling/README.md), 200 evaluation
# episodes every 128k steps (20 iterations of 256 x 25) and a checkpoint as often
SCALING = ["--num-envs", "256", "--num-steps", "25", "--update-epochs", "5", "--gamma", "0.95"]
SCALING += ["--num-minibatches", "4", "--eval-every", "20", "--eval-episodes", "200", "--checkpoint-every", "20"]
SETTINGS |= {
    f"scaling-vmas-spread-n{n}": ("lv_happo_vmas.py", ["--num-agents", str(n), *SCALING]) for n in (2, 3, 5, 8, 12)
}
VARIANTS = {"lv": ["--factor", "clipped"], "happo": ["--factor", "raw"], "mappo": ["--factor", "none"]}


def expand(settings: list, variants: list, seeds: list, total_timesteps: int | None, extra: list) -> list:
    """Every (setting, variant, seed) as a dict with its folder (relative to out) and its command line."""
    runs = []
    for setting in settings:
        script, flags = SETTINGS[setting]
        for variant in variants:
            for seed in seeds:
                command = [sys.executable, str(ROOT / script), *flags, *VARIANTS[variant], "--seed", str(seed)]
                if total_timesteps is not None:
                    command += ["--total-timesteps", str(total_timesteps)]
                command += extra
                runs.append(
                    {"setting": setting, "variant": variant, "seed": seed, "dir": f"{setting}/{variant}/seed{seed}"}
                    | {"command": command}
                )
    return runs


def pending(runs: list, out: Path) -> list:
    """The runs whose `done` file is missing (never started, failed or cut short)."""
    return [run for run in runs if not (out / run["dir"] / "done").exists()]


def resume_flags(folder: Path) -> list:
    """`--resume` with the checkpoint a cut-short run left in folder, or nothing."""
    checkpoints = sorted((folder / "runs").glob("*/checkpoint.pt"))
    return ["--resume", str(checkpoints[-1].relative_to(folder))] if checkpoints else []


def run_one(run: dict, out: Path) -> int:
    folder = out / run["dir"]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "a") as log:
        command = run["command"] + resume_flags(folder)
        code = subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT).returncode
    if code == 0:
        (folder / "done").write_text(" ".join(shlex.quote(part) for part in run["command"]) + "\n")
    return code


def slurm_script(runs: list, out: Path, hours: int, cpus: int) -> str:
    """A job-array script: task i runs the i-th run in its folder, as the local pool does: skipped once `done`,
    resumed from the checkpoint a cut run left, its output appended to `log.txt`; sbatch it again after a cut."""
    commands = "\n".join(f"  {shlex.quote(' '.join(shlex.quote(p) for p in run['command']))}" for run in runs)
    folders = "\n".join(f"  {shlex.quote(str(out.resolve() / run['dir']))}" for run in runs)
    return f"""#!/bin/bash
#SBATCH --job-name=lv-marl
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={hours}:00:00
#SBATCH --output={out.resolve()}/slurm-%A_%a.out
FOLDERS=(
{folders}
)
COMMANDS=(
{commands}
)
mkdir -p "${{FOLDERS[$SLURM_ARRAY_TASK_ID]}}" && cd "${{FOLDERS[$SLURM_ARRAY_TASK_ID]}}" || exit 1
[ -e done ] && exit 0
checkpoint=$(ls runs/*/checkpoint.pt 2>/dev/null | sort | tail -n 1)
eval "${{COMMANDS[$SLURM_ARRAY_TASK_ID]}}" ${{checkpoint:+--resume "$checkpoint"}} >> log.txt 2>&1 \\
  && echo "${{COMMANDS[$SLURM_ARRAY_TASK_ID]}}" > done
"""


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", required=True, choices=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--total-timesteps", type=int, default=None, help="the budget of every run (script default)")
    parser.add_argument("--out", default=str(ROOT / "benchmark" / "results" / "grid"), help="the grid's folder")
    parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="runs at once (1 core each)")
    parser.add_argument("--slurm", default=None, help="write a Slurm job-array script here instead of running")
    parser.add_argument("--slurm-hours", type=int, default=12)
    parser.add_argument("--slurm-cpus", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="print the pending commands, run nothing")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags added to every run")
    args = parser.parse_args(argv)
    if args.workers < 1 or any(seed < 0 for seed in args.seeds):
        parser.error("--workers must be at least 1 and seeds not negative")
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file: give the grid's folder")
    runs = expand(args.settings, args.variants, args.seeds, args.total_timesteps, extra)
    todo = pending(runs, out)
    print(f"{len(runs)} runs in the grid, {len(runs) - len(todo)} already done, {len(todo)} to go")
    if args.dry_run or not todo:
        for run in todo:
            command = run["command"] + resume_flags(out / run["dir"])
            print(f"{run['dir']}: {' '.join(shlex.quote(part) for part in command)}")
        return
    if args.slurm:
        Path(args.slurm).parent.mkdir(parents=True, exist_ok=True)
        Path(args.slurm).write_text(slurm_script(todo, out, args.slurm_hours, args.slurm_cpus))
        print(f"wrote {args.slurm}: sbatch {args.slurm}")
        return
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(run_one, run, out): run for run in todo}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            log = out / run["dir"] / "log.txt"
            failed += future.result() != 0
            print(f"{run['dir']}: " + ("done" if future.result() == 0 else f"failed, see {log}"))
    if failed:
        sys.exit(f"run.py: {failed} of {len(todo)} runs failed (their log.txt says why); launch again to retry them")


if __name__ == "__main__":
    main()
