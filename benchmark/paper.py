"""Reads the paper-scale grid (benchmark/run.py's `paper-*` settings) beside the published curves.

    python benchmark/paper.py --grid benchmark/grids/paper --out benchmark/results/paper

Writes to --out: `curves.csv` (setting, variant, seed, step, eval_return, eval_win_rate: every deterministic
evaluation the runs logged), `final.csv` (per setting and variant: the evaluation return at 1M, 2M, 5M and 10M steps,
mean and std over the seeds that reached them; the last evaluation's mean, std, IQM and its bootstrap interval over
the finished runs; the published anchor at 10M) and a figure per setting, `{setting}.png`: every seed's evaluation
curve, the mean per variant, and the published anchors. Runs that have not finished (no `done` file) are drawn and
listed with the step they reached. Event files stay out of the repository, so runs made in an earlier session
live on only in the committed `curves.csv` and `final.csv`: with `--keep` (the default), every run of those files
that the grid does not hold again is read back from them (its evaluations, and whether it finished) and reported
beside the grid's runs.
"""

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import iqm_with_ci, load_grid  # noqa: E402

MILESTONES = (1_000_000, 2_000_000, 5_000_000, 10_000_000)
# the published numbers to compare against (SPEC.md): HARL's HAPPO curves read off its figures (MPE in mpe2 units,
# its pettingzoo 1.22 counted self-collisions: -37.5 per episode at N = 3), SMAX MAPPO final win rates
ANCHORS = {
    "paper-mpe-spread-n3": ("HARL HAPPO", "return", {1e6: -51.5, 2e6: -45.5, 5e6: -34.5, 10e6: -28.0}),
    "paper-mpe-spread-n3-ent40": ("HARL HAPPO", "return", {1e6: -51.5, 2e6: -45.5, 5e6: -34.5, 10e6: -28.0}),
    "paper-mamujoco-halfcheetah-2x3": ("HARL HAPPO", "return", {1e6: 2900, 2e6: 4500, 5e6: 6000, 10e6: 7000}),
    "paper-smax-3s5z": ("MAPPO: JaxMARL 70 %, Mava 98 %", "win_rate", {10e6: 0.70}),
    "paper-smax-6h_vs_8z": ("MAPPO: JaxMARL 20 %, Mava 100 %", "win_rate", {10e6: 0.20}),
}
SECOND_ANCHOR = {"paper-smax-3s5z": 0.98, "paper-smax-6h_vs_8z": 1.00}


def evaluations(run: dict, name: str) -> list:
    return run["scalars"].get(f"eval/{name}", [])


def value_at(points: list, step: float) -> float:
    """The evaluation logged at the given step (within half an evaluation interval), NaN if the run has none."""
    if not points or step > points[-1][0] + 1:
        return float("nan")
    steps = np.array([s for s, _ in points], float)
    i = int(np.argmin(np.abs(steps - step)))
    interval = np.median(np.diff(steps)) if len(steps) > 1 else step
    return points[i][1] if abs(steps[i] - step) <= interval / 2 else float("nan")


def curve_rows(runs: list) -> list:
    rows = []
    for run in runs:
        wins = dict(evaluations(run, "win_rate"))
        for step, value in evaluations(run, "episodic_return"):
            rows.append(
                {"setting": run["setting"], "variant": run["variant"], "seed": run["seed"], "step": step}
                | {"eval_return": value, "eval_win_rate": wins.get(step, "")}
            )
    return rows


def kept_runs(out: Path) -> list:
    """The runs of an earlier `curves.csv` in out as load_grid gives them (evaluations only): unfinished where that
    folder's `final.csv` names them as partial ("seed 1 at 4,576,000")."""
    if not (out / "curves.csv").exists():
        return []
    partial = {}
    for row in csv.DictReader(open(out / "final.csv")) if (out / "final.csv").exists() else []:
        for seed, step in re.findall(r"seed (\d+) at ([\d,]+)", row["partial"]):
            partial[(row["setting"], row["variant"], int(seed))] = int(step.replace(",", ""))
    runs = {}
    for row in csv.DictReader(open(out / "curves.csv")):
        key = (row["setting"], row["variant"], int(row["seed"]))
        run = runs.setdefault(key, dict(zip(("setting", "variant", "seed"), key, strict=True)) | {"scalars": {}})
        run["scalars"].setdefault("eval/episodic_return", []).append((int(row["step"]), float(row["eval_return"])))
        if row["eval_win_rate"] != "":
            run["scalars"].setdefault("eval/win_rate", []).append((int(row["step"]), float(row["eval_win_rate"])))
    for key, run in runs.items():
        run["complete"] = key not in partial  # a partial run keeps the step it reached, not its last evaluation's
        run["last_step"] = partial.get(key, run["scalars"]["eval/episodic_return"][-1][0])
    return list(runs.values())


def final_rows(runs: list) -> list:
    rows = []
    for setting in sorted({run["setting"] for run in runs}):
        name = ANCHORS.get(setting, ("", "return", {}))[1]
        metric = "episodic_return" if name == "return" else "win_rate"
        for variant in sorted({run["variant"] for run in runs if run["setting"] == setting}):
            group = [run for run in runs if run["setting"] == setting and run["variant"] == variant]
            partial = [f"seed {run['seed']} at {run['last_step']:,}" for run in group if not run["complete"]]
            row = {"setting": setting, "variant": variant, "metric": metric, "seeds": len(group)}
            row["complete"] = sum(run["complete"] for run in group)
            row["partial"] = "; ".join(partial)
            for milestone in MILESTONES:
                values = [value_at(evaluations(run, metric), milestone) for run in group]
                values = [v for v in values if np.isfinite(v)]
                row[f"mean_{milestone // 1_000_000}M"] = np.mean(values) if values else float("nan")
                row[f"std_{milestone // 1_000_000}M"] = np.std(values, ddof=1) if len(values) > 1 else float("nan")
            last = [evaluations(run, metric)[-1][1] for run in group if run["complete"] and evaluations(run, metric)]
            row["last_mean"] = np.mean(last) if last else float("nan")
            row["last_std"] = np.std(last, ddof=1) if len(last) > 1 else float("nan")
            row["last_iqm"], row["iqm_low"], row["iqm_high"] = iqm_with_ci(last) if len(last) >= 3 else (np.nan,) * 3
            row["anchor_10M"] = ANCHORS.get(setting, ("", "", {}))[2].get(10e6, float("nan"))
            rows.append(row)
    return rows


def plot(setting: str, runs: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, name, anchor = ANCHORS.get(setting, ("", "return", {}))
    metric = "episodic_return" if name == "return" else "win_rate"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, variant in zip(
        ("tab:blue", "tab:orange", "tab:green"), sorted({r["variant"] for r in runs}), strict=False
    ):
        group = [run for run in runs if run["variant"] == variant and evaluations(run, metric)]
        for run in group:  # every seed, a partial one too
            steps, values = zip(*evaluations(run, metric), strict=True)
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        finished = [run for run in group if run["complete"]] or group  # the mean over the finished runs
        if finished:
            end = min(evaluations(run, metric)[-1][0] for run in finished)
            grid = np.array([s for s, _ in evaluations(finished[0], metric) if s <= end])
            mean = np.mean([[value_at(evaluations(run, metric), s) for s in grid] for run in finished], axis=0)
            ax.plot(grid, mean, color=colour, linewidth=2, label=f"{variant} (ours, {runs_label(len(finished))})")
    if anchor:
        steps = sorted(anchor)
        ax.plot(steps, [anchor[s] for s in steps], "k--o", label=label)
    if setting in SECOND_ANCHOR:
        ax.axhline(SECOND_ANCHOR[setting], color="grey", linestyle=":", label="Mava (10M)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"deterministic evaluation: {metric.replace('_', ' ')}")
    ax.set_title(setting)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def runs_label(n: int) -> str:
    return "1 run" if n == 1 else f"mean of {n} runs"


def write_csv(rows: list, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="benchmark/grids/paper", help="the grid folder benchmark/run.py wrote")
    parser.add_argument("--out", default="benchmark/results/paper", help="where the tables and figures go")
    parser.add_argument("--no-keep", dest="keep", action="store_false", help="forget the runs of --out's CSV files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs = [run for run in load_grid(Path(args.grid)) if run["setting"].startswith("paper-")]
    grid_keys = {(run["setting"], run["variant"], run["seed"]) for run in runs}
    if args.keep:
        runs += [run for run in kept_runs(out) if (run["setting"], run["variant"], run["seed"]) not in grid_keys]
    if not runs:
        parser.error(f"no paper-* runs under {args.grid}")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(curve_rows(runs), out / "curves.csv")
    rows = final_rows(runs)
    write_csv(rows, out / "final.csv")
    for setting in sorted({run["setting"] for run in runs}):
        plot(setting, [run for run in runs if run["setting"] == setting], out / f"{setting}.png")
    for row in rows:
        print(", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
