"""The defaults study of lv_happo_mpe.py: one benchmark/run.py grid per configuration, read side by side.

    python benchmark/defaults.py --grids benchmark/grids/defaults --out benchmark/results/defaults

Each folder under --grids is one configuration (named after the flags it adds to the script's defaults) holding a
grid of `mpe-spread-n*` settings. Writes to --out: `final.csv` and `final.md` (per setting and configuration: the
training return at the end, the mean over the last 10 % of steps, as mean ± std over the finished seeds, and each
seed's value) and `{setting}.png` (the mean training curve of every configuration, with uniformly random actions
and benchmark/reference.py's two controllers drawn for scale).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper import write_csv  # noqa: E402
from reference import episode_returns  # noqa: E402
from report import aggregate_curves, final_return, load_grid  # noqa: E402


def load_configurations(grids: Path) -> list:
    """Every finished run of every configuration, its `variant` replaced by the configuration's name."""
    runs = []
    for folder in sorted(path for path in grids.iterdir() if path.is_dir()):
        runs += [run | {"variant": folder.name} for run in load_grid(folder) if run["complete"]]
    return runs


def table(runs: list) -> list:
    rows = []
    for setting in sorted({run["setting"] for run in runs}):
        for config in sorted({run["variant"] for run in runs if run["setting"] == setting}):
            group = sorted(
                (r for r in runs if r["setting"] == setting and r["variant"] == config), key=lambda r: r["seed"]
            )
            finals = [final_return(run) for run in group]
            rows.append(
                {"setting": setting, "configuration": config, "seeds": " ".join(str(r["seed"]) for r in group)}
                | {"mean": np.mean(finals), "std": np.std(finals, ddof=1) if len(finals) > 1 else float("nan")}
                | {"per_seed": " ".join(f"{value:.1f}" for value in finals)}
            )
    return rows


def plot(setting: str, runs: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_agents = int(setting.rsplit("-n", 1)[1])
    centres, curves = aggregate_curves(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config, (mean, half) in curves.items():
        seeds = len({run["seed"] for run in runs if run["variant"] == config})
        ax.plot(centres, mean, label=f"{config} ({seeds} seed{'s' * (seeds > 1)})")
        ax.fill_between(centres, mean - half, mean + half, alpha=0.2)
    for policy, style in (("random", ":"), ("nearest", "-."), ("controller", "--")):
        ax.axhline(np.mean(episode_returns(num_agents, 100, policy)), color="k", linestyle=style, label=policy)
    ax.set(title=f"lv_happo_mpe.py, simple_spread N = {num_agents}", xlabel="environment steps")
    ax.set(ylabel="training episodic return")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", default="benchmark/grids/defaults", help="one benchmark/run.py grid per folder")
    parser.add_argument("--out", default="benchmark/results/defaults", help="where the table and figures go")
    args = parser.parse_args(argv)
    runs = load_configurations(Path(args.grids)) if Path(args.grids).is_dir() else []
    if not runs:
        parser.error(f"no finished runs under {args.grids}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = table(runs)
    write_csv(rows, out / "final.csv")
    lines = ["| setting | configuration | seeds | final return (mean ± std) | per seed |", "| --- " * 5 + "|"]
    for r in rows:
        std = "" if np.isnan(r["std"]) else f" ± {r['std']:.1f}"
        lines.append(
            f"| {r['setting']} | {r['configuration']} | {r['seeds']} | {r['mean']:.1f}{std} | {r['per_seed']} |"
        )
    (out / "final.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for setting in sorted({run["setting"] for run in runs}):
        plot(setting, [run for run in runs if run["setting"] == setting], out / f"{setting}.png")


if __name__ == "__main__":
    main()
