"""Reads a grid written by benchmark/run.py: learning curves, a final-performance table, the variance study.

    python benchmark/report.py --out benchmark/results/grid                  # every setting in the grid
    python benchmark/report.py --out benchmark/results/grid --variance mpe-spread-n2 mpe-spread-n3 mpe-spread-n5

Writes, next to the grid: `{setting}.png` (mean episodic return over seeds against environment steps, with a 95 %
confidence band of the mean), `final.md` and `final.csv` (per setting and variant: mean +- std over seeds of the
final return, the mean over the last 10 % of steps; with 5 runs or more, the interquartile mean and its 95 %
bootstrap interval), and with --variance `variance.png`, `variance.csv` (the logged variance of M * A at each
position k of the update order, averaged over a run, for HAPPO and LV-HAPPO). Runs without a `done` file are
reported as partial (with the step they reached) and left out of the numbers; missing seeds are named.
"""

import argparse
import csv
import math
import warnings
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
CURVE_POINTS = 50


def read_scalars(run_dir: Path) -> dict:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def load_grid(out: Path) -> list:
    """Every run folder `{setting}/{variant}/seed{n}` of the grid: its scalars, and whether it finished."""
    runs = []
    for folder in sorted(out.glob("*/*/seed*")):
        run_dirs = sorted((folder / "runs").glob("*")) if (folder / "runs").exists() else []
        scalars = read_scalars(run_dirs[-1]) if run_dirs else {}
        steps = [step for step, _ in scalars.get("charts/SPS", [])]
        runs.append(
            {
                "setting": folder.parts[-3],
                "variant": folder.parts[-2],
                "seed": int(folder.name[len("seed") :]),
                "complete": (folder / "done").exists(),
                "last_step": max(steps, default=0),
                "scalars": scalars,
            }
        )
    return runs


def binned_curve(points: list, edges: np.ndarray) -> np.ndarray:
    """Mean of the values whose step falls in each bin (NaN where a bin has none)."""
    steps, values = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    index = np.digitize(steps, edges[1:-1])
    return np.array([values[index == i].mean() if (index == i).any() else np.nan for i in range(len(edges) - 1)])


def aggregate_curves(runs: list, tag: str = "charts/episodic_return") -> tuple:
    """Bin centres, and per variant the mean over seeds and the half-width of its 95 % confidence band."""
    end = max(run["last_step"] for run in runs)
    edges = np.linspace(0, end, CURVE_POINTS + 1)
    centres, curves = (edges[:-1] + edges[1:]) / 2, {}
    for variant in sorted({run["variant"] for run in runs}):
        rows = np.array([binned_curve(r["scalars"][tag], edges) for r in runs if r["variant"] == variant])
        n = np.sum(~np.isnan(rows), axis=0)
        with warnings.catch_warnings():  # bins without episodes stay NaN, as gaps in the plot
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(rows, axis=0)
            std = np.nanstd(rows, axis=0, ddof=1) if len(rows) > 1 else np.zeros_like(mean)
        curves[variant] = (mean, 1.96 * np.nan_to_num(std) / np.sqrt(np.maximum(n, 1)))
    return centres, curves


def final_return(run: dict, fraction: float = 0.1) -> float:
    """Mean episodic return over the last `fraction` of the run's steps."""
    points = run["scalars"]["charts/episodic_return"]
    start = run["last_step"] * (1 - fraction)
    return float(np.mean([value for step, value in points if step > start]))


def iqm_with_ci(values: list, resamples: int = 2000, seed: int = 0) -> tuple:
    """Interquartile mean and its 95 % percentile-bootstrap interval over runs."""

    def iqm(x: np.ndarray) -> float:
        x = np.sort(x)
        cut = int(math.floor(len(x) * 0.25))
        return float(x[cut : len(x) - cut].mean())

    rng, values = np.random.default_rng(seed), np.asarray(values, float)
    boot = [iqm(rng.choice(values, len(values))) for _ in range(resamples)]
    return iqm(values), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def final_table(runs: list, expected_seeds: list | None = None) -> tuple:
    """Rows (setting, variant, n, mean, std, iqm, ci, notes) over the complete runs; notes name the partial and
    the missing ones."""
    rows = []
    for setting in sorted({r["setting"] for r in runs}):
        for variant in sorted({r["variant"] for r in runs if r["setting"] == setting}):
            group = [r for r in runs if r["setting"] == setting and r["variant"] == variant]
            complete = [r for r in group if r["complete"]]
            finals = [final_return(r) for r in complete]
            notes = [f"seed {r['seed']} partial ({r['last_step']:,} steps)" for r in group if not r["complete"]]
            missing = sorted(set(expected_seeds or []) - {r["seed"] for r in group})
            notes += [f"seed {seed} missing" for seed in missing]
            row = {"setting": setting, "variant": variant, "n": len(finals), "notes": "; ".join(notes)}
            row["mean"] = float(np.mean(finals)) if finals else math.nan
            row["std"] = float(np.std(finals, ddof=1)) if len(finals) > 1 else math.nan
            row["iqm"], row["ci_low"], row["ci_high"] = iqm_with_ci(finals) if len(finals) >= 5 else (math.nan,) * 3
            rows.append(row)
    return rows


def markdown(rows: list) -> str:
    lines = ["| setting | variant | runs | final return (mean ± std) | IQM [95 % CI] | notes |", "| --- " * 6 + "|"]
    for r in rows:
        iqm = "" if math.isnan(r["iqm"]) else f"{r['iqm']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        mean = "" if math.isnan(r["mean"]) else f"{r['mean']:.2f} ± {0.0 if math.isnan(r['std']) else r['std']:.2f}"
        lines.append(f"| {r['setting']} | {r['variant']} | {r['n']} | {mean} | {iqm} | {r['notes']} |")
    return "\n".join(lines) + "\n"


def variance_study(runs: list) -> list:
    """Per (setting, variant, k): the mean over complete runs of the run-averaged lv/adv_variance_k."""
    rows = []
    for r in runs:
        if not r["complete"]:
            continue
        for tag, points in r["scalars"].items():
            if tag.startswith("lv/adv_variance_"):
                k = int(tag.rsplit("_", 1)[1])
                rows.append(
                    {
                        "setting": r["setting"],
                        "variant": r["variant"],
                        "k": k,
                        "variance": np.mean([v for _, v in points]),
                    }
                )
    merged = {}
    for row in rows:
        merged.setdefault((row["setting"], row["variant"], row["k"]), []).append(row["variance"])
    return [
        {"setting": s, "variant": v, "k": k, "variance": float(np.mean(x)), "runs": len(x)}
        for (s, v, k), x in sorted(merged.items())
    ]


def plot_curves(setting: str, runs: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres, curves = aggregate_curves(runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, (mean, half) in curves.items():
        ax.plot(centres, mean, label=variant)
        ax.fill_between(centres, mean - half, mean + half, alpha=0.25)
    ax.set(title=setting, xlabel="environment steps", ylabel="episodic return")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variance(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in sorted({r["setting"] for r in rows}):
        for variant, style in (("happo", "--"), ("lv", "-")):
            points = sorted(
                (r["k"], r["variance"]) for r in rows if r["setting"] == setting and r["variant"] == variant
            )
            if points:
                ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{setting} {variant}")
    ax.set(yscale="log", xlabel="position k in the update order", ylabel="Var[M_used * A] (mean over the run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmark" / "results" / "grid"), help="the grid's folder")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="the seeds expected (names missing ones)")
    parser.add_argument("--variance", nargs="+", default=[], help="settings of the variance study")
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs = load_grid(out)
    if not runs:
        parser.exit(1, f"report.py: error: no runs under {out} (run benchmark/run.py first)\n")
    rows = final_table(runs, args.seeds)
    (out / "final.md").write_text(markdown(rows))
    with open(out / "final.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows))
    for setting in sorted({r["setting"] for r in runs}):
        complete = [r for r in runs if r["setting"] == setting and r["complete"]]
        if complete:
            plot_curves(setting, complete, out / f"{setting}.png")
    if args.variance:
        study = variance_study([r for r in runs if r["setting"] in args.variance and r["variant"] in ("lv", "happo")])
        with open(out / "variance.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["setting", "variant", "k", "variance", "runs"])
            writer.writeheader()
            writer.writerows(study)
        plot_variance(study, out / "variance.png")
        for row in study:
            print(f"{row['setting']} {row['variant']} k={row['k']}: {row['variance']:.3f} ({row['runs']} runs)")


if __name__ == "__main__":
    main()
