"""Reads the grids benchmark/run.py writes, for every study: curves, milestones, final tables with intervals, LV-HAPPO
minus each other variant seed by seed, and the variance of M * A by position in the update order.

    python benchmark/report.py --grid ~/lv-grids/paper-pairs --out benchmark/results/pairs
    python benchmark/report.py --out benchmark/results/pairs      # again, from the per-run files alone
    python benchmark/report.py --grid G --out O --x n --reference benchmark/results/scaling/reference.txt

Per run (a grid's runs, and the runs of --out's earlier per-run files that the grid does not hold: event files stay on
the machine that ran them, these files are committed), to --out:
- `curves.csv` (setting, variant, seed, tag, step, value): every evaluation, `eval/episodic_return` and
  `eval/win_rate`, and the training return `charts/episodic_return` averaged into 50 bins of steps;
- `runs.csv` (setting, variant, seed, complete, last_step): complete when the run's `done` file exists;
- `positions.csv` (setting, variant, seed, k, adv_variance, factor_max, factor_clip_fraction): the run's means of
  `lv/adv_variance_k`, `lv/factor_max_k` and `lv/factor_clip_fraction_k`.
From those alone, per setting and variant, `final.csv`: the metric (the evaluation win rate where logged, else the
evaluation return, else the training return of the last 10 % of steps), its mean at 1M, 2M, 5M and 10M steps over the
runs that reached them, and over the complete runs the final value per seed, mean, std, the centre (`center_is`: the
interquartile mean from 4 seeds, the mean below) with its 95 % percentile-bootstrap interval; LV-HAPPO minus this
variant on the same seeds, for the final value, for the tail (the mean of the values logged after 90 % of a run's
steps: with an evaluation every 50k steps, the 10 of a 5M run, 4.55M to 5M) and for the area (the mean of every
value: the area under the curve, how fast it learned): per seed, the mean with its bootstrap interval (a
description: over 3 to 5 seeds it under-covers, at 3 it is [min, max]), how many seeds favour each method and the
exact two-sided sign-flip permutation p-value; Var[M A] and max M at the last position, the median over seeds and
their range (heavy-tailed: one seed can hold most of a mean); the published anchor at 10M and, with --reference
(benchmark/reference.py's returns at N), the score (R - random) / (greedy controller - random); `table.md`, the
comparisons with LV-HAPPO as a Markdown table. Figures: `{setting}.png` (every seed thin, the mean over complete runs
with its 95 % bootstrap band, the published curve), `variance.png` (Var[M A] against the position k on a log scale,
the median over runs and their range, a panel per setting, partial runs too) and, with `--x n`, `final_vs_n.png`
(the final centre, or score, against the team size N read from the setting's name, `...-n{N}`).
"""

import argparse
import csv
import itertools
import re
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
MILESTONES = (1_000_000, 2_000_000, 5_000_000, 10_000_000)
TRAIN_BINS = 50
POSITION_TAGS = ("adv_variance", "factor_max", "factor_clip_fraction")
VARIANT_NAMES = {"lv": "LV-HAPPO", "happo": "HAPPO", "mappo": "MAPPO-style"}
COLOURS = {"lv": "C0", "happo": "C3", "mappo": "C2"}
# the published curves to draw beside ours: HARL's HAPPO read off its figures (MPE in mpe2 units), Kuba et
# al. 2022 for HalfCheetah 6x1, SMAX MAPPO's final win rates
HARL_SPREAD = ("HARL HAPPO", {1e6: -51.5, 2e6: -45.5, 5e6: -34.5, 10e6: -28.0})
ANCHORS = {
    "paper-mpe-spread-n3": HARL_SPREAD,
    "paper-mpe-spread-n3-ent40": HARL_SPREAD,
    "paper-mamujoco-halfcheetah-2x3": ("HARL HAPPO", {1e6: 2900, 2e6: 4500, 5e6: 6000, 10e6: 7000}),
    "paper-mamujoco-halfcheetah-6x1": ("HAPPO, Kuba et al. 2022", {1e6: 1300, 2e6: 2600, 5e6: 4100, 10e6: 4400}),
    "paper-mamujoco-ant-4x2": ("HARL HAPPO (its tuned settings)", {1e6: 1900, 2e6: 2900, 5e6: 5250, 10e6: 5850}),
    "paper-mamujoco-humanoid-17x1": ("HARL HAPPO", {4e6: 1000, 10e6: 6700}),
    "paper-smax-3s5z": ("MAPPO, JaxMARL", {10e6: 0.70}),
    "paper-smax-6h_vs_8z": ("MAPPO, JaxMARL", {10e6: 0.20}),
}


def read_scalars(run_dir: Path) -> dict:
    """{tag: [(step, value), ...]} of every scalar in a TensorBoard run directory."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def six(value: float) -> float:
    """The value to 6 significant digits, as the CSV files keep it: numbers read from a grid or from them agree."""
    return float(f"{value:.6g}")


def read_grid(grid: Path) -> tuple[list, list, list]:
    """The per-run rows (curves, runs, positions) of every run folder `{setting}/{variant}/seed{n}` of a grid."""
    curves, runs, positions = [], [], []
    for folder in sorted(grid.glob("*/*/seed*")):
        run_dirs = sorted((folder / "runs").glob("*"))
        scalars = read_scalars(run_dirs[-1]) if run_dirs else {}
        key = {"setting": folder.parts[-3], "variant": folder.parts[-2], "seed": int(folder.name[len("seed") :])}
        last_step = max((step for step, _ in scalars.get("charts/SPS", [])), default=0)
        runs.append(key | {"complete": int((folder / "done").exists()), "last_step": last_step})
        for tag in ("eval/episodic_return", "eval/win_rate"):
            curves += [key | {"tag": tag, "step": step, "value": six(value)} for step, value in scalars.get(tag, [])]
        train = np.array(scalars.get("charts/episodic_return", []), float).reshape(-1, 2)
        bins = np.clip(np.ceil(train[:, 0] * TRAIN_BINS / max(last_step, 1)) - 1, 0, TRAIN_BINS - 1).astype(int)
        for b in np.unique(bins):  # each bin's mean return, at the bin's end: bin b holds the steps in (b, b + 1] / 50
            step, value = round((b + 1) * last_step / TRAIN_BINS), train[bins == b, 1].mean()
            curves.append(key | {"tag": "charts/episodic_return", "step": step, "value": six(value)})
        for k in range(sum(tag.startswith("lv/adv_variance_") for tag in scalars)):
            means = {name: six(np.mean([v for _, v in scalars[f"lv/{name}_{k}"]])) for name in POSITION_TAGS}
            positions.append(key | {"k": k} | means)
    return curves, runs, positions


def read_csv(path: Path) -> list:
    """The rows of a CSV file this script wrote, numbers as numbers ([] when there is no such file)."""

    def parse(text: str) -> int | float | str:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(open(path))] if path.exists() else []


def write_csv(rows: list, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)


def bootstrap(values: list, statistic, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """statistic(values) and its 95 % percentile-bootstrap interval over the values (NaN for none)."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    boot = [statistic(rng.choice(values, len(values))) for _ in range(resamples)]
    return float(statistic(values)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle half (all values below 4: then it is the mean)."""
    values, cut = np.sort(values), len(values) // 4
    return float(values[cut : len(values) - cut].mean())


def sign_flip_p(differences: list) -> float:
    """The exact two-sided p-value of the paired sign-flip permutation test: the share of the 2^n assignments of
    signs to the per-seed differences whose |sum| reaches the observed |sum| (with 5 pairs at least 2/32 = 0.0625)."""
    differences = np.asarray(differences, float)
    if len(differences) == 0:
        return float("nan")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(differences))))  # (2^n, n)
    observed, tolerance = abs(differences.sum()), 1e-9 * (1 + np.abs(differences).sum())
    return float(np.mean(np.abs(signs @ differences) >= observed - tolerance))


def paired(differences: list) -> dict:
    """LV-HAPPO minus a variant, seed by seed: the differences, their mean with its 95 % percentile-bootstrap interval
    (a description, not a test: over 3 to 5 seeds it under-covers, at 3 it is [min, max]), how many seeds favour
    each method, and the exact sign-flip p-value."""
    mean, low, high = bootstrap(differences, np.mean)
    return {
        "_per_seed": " ".join(f"{value:.4g}" for value in differences),
        "": mean,
        "_low": low,
        "_high": high,
        "_lv_ahead": sum(value > 0 for value in differences),
        "_this_ahead": sum(value < 0 for value in differences),
        "_p": sign_flip_p(differences),
    }


def value_at(points: list, step: float) -> float:
    """The value logged nearest the step (within half the logging interval), NaN if the run did not get there."""
    if not points or step > points[-1][0] + 1:
        return float("nan")
    steps = np.array([s for s, _ in points], float)
    i = int(np.argmin(np.abs(steps - step)))
    interval = np.median(np.diff(steps)) if len(steps) > 1 else step
    return points[i][1] if abs(steps[i] - step) <= interval / 2 else float("nan")


def metric_of(curves: list) -> str:
    """The tag a setting is judged by: evaluation win rate, else evaluation return, else training return."""
    tags = {row["tag"] for row in curves}
    return next(
        t for t in ("eval/win_rate", "eval/episodic_return", "charts/episodic_return", "") if t in tags or not t
    )


def points_of(curves: list, setting: str, variant: str, seed: int, tag: str) -> list:
    """[(step, value), ...] of one run's tag, in order of steps."""
    key = (setting, variant, seed, tag)
    return sorted(
        (r["step"], r["value"]) for r in curves if (r["setting"], r["variant"], int(r["seed"]), r["tag"]) == key
    )


def tail_mean(points: list, last_step: float) -> float:
    """The mean of a run's values logged after 90 % of its steps."""
    return float(np.mean([v for s, v in points if s > 0.9 * last_step])) if points else float("nan")


def final_value(points: list, last_step: float, metric: str) -> float:
    """A run's final value: its last evaluation, or its mean training return over the last 10 % of steps."""
    if metric.startswith("eval/"):
        return points[-1][1] if points else float("nan")
    return tail_mean(points, last_step)


def lv_minus(by_run: dict, variant: str, seeds: list) -> list:
    """LV-HAPPO's value minus the variant's, seed by seed, on the seeds both have ((variant, seed) -> value; none for
    LV-HAPPO itself)."""
    return [by_run[("lv", s)] - by_run[(variant, s)] for s in seeds if ("lv", s) in by_run and variant != "lv"]


def summarise(curves: list, runs: list, positions: list, reference: dict | None = None) -> list:
    """The rows of final.csv, one per setting and variant; with the reference returns of random actions and the
    greedy controller at the setting's N, also the score (R - random) / (controller - random), comparable across N."""
    rows = []
    for setting in sorted({run["setting"] for run in runs}):
        metric = metric_of([row for row in curves if row["setting"] == setting])
        group = {}  # (variant, seed) -> (run, the points of its metric)
        for run in (run for run in runs if run["setting"] == setting):
            key = (run["variant"], int(run["seed"]))
            group[key] = (run, points_of(curves, setting, *key, metric))
        complete = {key: (run, points) for key, (run, points) in group.items() if run["complete"]}
        finals = {key: final_value(points, run["last_step"], metric) for key, (run, points) in complete.items()}
        tails = {key: tail_mean(points, run["last_step"]) for key, (run, points) in complete.items()}
        areas = {
            key: float(np.mean([v for _, v in points])) if points else float("nan")
            for key, (_, points) in complete.items()
        }
        variants = sorted({variant for variant, _ in group}, key=lambda v: (v not in VARIANT_NAMES, v))
        for variant in variants:
            seeds = sorted(seed for v, seed in finals if v == variant)
            values = [finals[(variant, seed)] for seed in seeds]
            mine = [(run, points) for (v, _), (run, points) in group.items() if v == variant]
            partial = [
                f"seed {int(run['seed'])} at {int(run['last_step']):,}" for run, _ in mine if not run["complete"]
            ]
            row = {"setting": setting, "variant": variant, "metric": metric, "runs": len(values)}
            row |= {"seeds": " ".join(map(str, seeds)), "partial": "; ".join(sorted(partial))}
            row["budget"] = int(min((run["last_step"] for run, _ in mine if run["complete"]), default=0))
            for milestone in MILESTONES:
                reached = [value_at(points, milestone) for _, points in mine]
                reached = [value for value in reached if np.isfinite(value)]
                row[f"at_{milestone // 1_000_000}M"] = float(np.mean(reached)) if reached else float("nan")
            row["per_seed"] = " ".join(f"{value:.4g}" for value in values)
            row["mean"] = float(np.mean(values)) if values else float("nan")
            row["std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            row["center_is"] = "IQM" if len(values) >= 4 else "mean"  # the IQM of 3 values is their mean
            row["center"], row["center_low"], row["center_high"] = bootstrap(values, iqm)
            if reference is not None:
                n = team_size(setting)
                low, high = reference.get(("random", n), float("nan")), reference.get(("controller", n), float("nan"))
                scores = [(value - low) / (high - low) for value in values]
                row["score"], row["score_low"], row["score_high"] = bootstrap(scores, iqm)
            row["tail_per_seed"] = " ".join(f"{tails[(variant, seed)]:.4g}" for seed in seeds)
            comparisons = {"lv_minus_this": finals, "lv_minus_this_tail": tails, "lv_minus_this_area": areas}
            for name, by_run in comparisons.items():
                row |= {name + suffix: value for suffix, value in paired(lv_minus(by_run, variant, seeds)).items()}
            mine_positions = [p for p in positions if (p["setting"], p["variant"]) == (setting, variant)]
            mine_positions = [p for p in mine_positions if (variant, int(p["seed"])) in finals]
            last = max((int(p["k"]) for p in mine_positions), default=None)
            for name in ("adv_variance", "factor_max"):  # heavy-tailed over seeds: the median and the range
                at_last = [p[name] for p in mine_positions if p["k"] == last]
                row[f"{name}_last"] = float(np.median(at_last)) if at_last else float("nan")
                row[f"{name}_last_min"] = float(min(at_last, default=float("nan")))
                row[f"{name}_last_max"] = float(max(at_last, default=float("nan")))
            row["anchor_10M"] = ANCHORS.get(setting, ("", {}))[1].get(10e6, float("nan"))
            rows.append(row)
    return rows


def comparison_table(final: list) -> str:
    """final.csv's comparisons as a Markdown table (`table.md`): per setting and variant, both final values' centre
    (IQM from 4 seeds, the mean below) with its bootstrap interval; LV-HAPPO minus the variant seed by seed at the
    last evaluation, over the evaluations after 90 % of the steps (the tail) and over the whole run (the area under
    the curve), each with its mean [bootstrap interval], the seeds favouring LV-HAPPO / the variant and the exact
    sign-flip p; Var[M A] at the last position, the median over seeds [their range]."""

    def number(x: float, sign: str = "") -> str:  # sign "+": differences
        if not np.isfinite(x):
            return "n/a"
        return f"{x:{sign},.0f}" if abs(x) >= 100 else f"{x:{sign}.3g}"

    def interval(row: dict, name: str, sign: str = "") -> str:
        return f"{number(row[name], sign)} [{number(row[f'{name}_low'], sign)}, {number(row[f'{name}_high'], sign)}]"

    def comparison(row: dict, name: str) -> str:
        ahead = f"{row[f'{name}_lv_ahead']} / {row[f'{name}_this_ahead']}"
        return f"{interval(row, name, '+')}; {ahead}; p = {row[f'{name}_p']:.3g}"

    def variance(row: dict) -> str:
        if not np.isfinite(row["adv_variance_last"]):
            return "n/a"
        spread = f"{number(row['adv_variance_last_min'])}-{number(row['adv_variance_last_max'])}"
        return f"{number(row['adv_variance_last'])} [{spread}]"

    lines = [
        "| setting | variant | seeds | LV-HAPPO: centre [bootstrap] | variant: centre [bootstrap] "
        "| LV-HAPPO minus variant at the end, per seed | at the end: mean [bootstrap]; seeds LV-HAPPO / variant "
        "ahead; exact p | the same over the tail | the same over the whole run "
        "| Var[M A] last, median [range]: LV-HAPPO / variant |",
        "| --- " * 10 + "|",
    ]
    lv = {row["setting"]: row for row in final if row["variant"] == "lv"}
    for row in (row for row in final if row["lv_minus_this_per_seed"] and row["setting"] in lv):
        mine, differences = lv[row["setting"]], row["lv_minus_this_per_seed"].split()
        seeds = row["seeds"] if mine["seeds"] == row["seeds"] else f"{mine['seeds']} / {row['seeds']}"
        cells = [row["setting"], VARIANT_NAMES.get(row["variant"], row["variant"]), seeds]
        cells += [f"{r['center_is']} {interval(r, 'center')}" for r in (mine, row)]
        cells += [", ".join(number(float(x), "+") for x in differences)]
        cells += [comparison(row, name) for name in ("lv_minus_this", "lv_minus_this_tail", "lv_minus_this_area")]
        cells += [f"{variance(mine)} / {variance(row)}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_setting(setting: str, curves: list, runs: list, path: Path) -> None:
    """Every seed thin, the mean over the complete runs with its 95 % bootstrap band, the published curve."""
    plt, metric = pyplot(), metric_of([row for row in curves if row["setting"] == setting])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mine = [run for run in runs if run["setting"] == setting]
    for i, variant in enumerate(sorted({run["variant"] for run in mine})):
        colour, complete = COLOURS.get(variant, f"C{i + 4}"), []
        for j, run in enumerate(run for run in mine if run["variant"] == variant):
            points = points_of(curves, setting, variant, int(run["seed"]), metric)
            if points:
                label = f"{VARIANT_NAMES.get(variant, variant)}, each seed" if j == 0 else None
                ax.plot(*zip(*points, strict=True), color=colour, alpha=0.3, linewidth=0.7, label=label)
                complete += [points] if run["complete"] else []
        if complete:
            steps = [step for step, _ in min(complete, key=len)]
            values = np.array([[value_at(points, step) for step in steps] for points in complete])  # (runs, steps)
            rng = np.random.default_rng(0)
            boot = values[rng.integers(0, len(values), (2000, len(values)))].mean(1)  # (resamples, steps)
            low, high = np.percentile(boot, [2.5, 97.5], axis=0)
            label = f"{VARIANT_NAMES.get(variant, variant)} (mean of {len(complete)})"
            ax.plot(steps, values.mean(0), color=colour, linewidth=2, label=label)
            ax.fill_between(steps, low, high, color=colour, alpha=0.2)
    label, anchor = ANCHORS.get(setting, ("", {}))
    steps = [step for step in sorted(anchor) if step <= 1.05 * max(run["last_step"] for run in mine)]  # within ours
    if steps:
        ax.plot(steps, [anchor[step] for step in steps], "k--o", label=f"{label} (published)")
    ax.set(title=setting, xlabel="environment steps", ylabel=metric.replace("charts/", "training ").replace("/", ": "))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_variance(positions: list, path: Path) -> None:
    """Var[M_used A] against the position k: the median over the runs (a partial one's so far) and their range, on
    a log scale, a panel per setting."""
    plt = pyplot()
    settings = sorted({p["setting"] for p in positions})
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.5), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for variant, colour in COLOURS.items():
            mine = [p for p in positions if (p["setting"], p["variant"]) == (setting, variant)]
            ks = sorted({int(p["k"]) for p in mine})
            at_k = [[p["adv_variance"] for p in mine if p["k"] == k] for k in ks]
            if ks:
                label = f"{VARIANT_NAMES[variant]} (median, range of {max(map(len, at_k))} runs)"
                ax.plot(ks, [np.median(values) for values in at_k], marker="o", color=colour, label=label)
                ax.fill_between(ks, [min(v) for v in at_k], [max(v) for v in at_k], color=colour, alpha=0.2)
        ax.set(title=setting, yscale="log", xlabel="position k in the update order")
    axes[0][0].set_ylabel("Var[M_used A] (each run's mean over its updates)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_against_n(final: list, reference: dict, path: Path) -> None:
    """The final IQM (the mean below 4 seeds) and its interval against the team size N (settings named `...-n{N}`),
    reference lines."""
    plt, name = pyplot(), "score" if "score" in final[0] else "center"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, variant in enumerate(sorted({row["variant"] for row in final})):
        rows = sorted(
            ((team_size(r["setting"]), r) for r in final if r["variant"] == variant and r["runs"]),
            key=lambda pair: pair[0],
        )
        if rows:
            x, iqms = np.array([n for n, _ in rows]) + (i - 1) * 0.12, np.array([r[f"{name}"] for _, r in rows])
            errors = [iqms - [r[f"{name}_low"] for _, r in rows], [r[f"{name}_high"] for _, r in rows] - iqms]
            style = {"color": COLOURS.get(variant, f"C{i + 4}"), "label": VARIANT_NAMES.get(variant, variant)}
            ax.errorbar(x, iqms, yerr=errors, marker="o", capsize=3, **style)
    for style, policy in zip(("k-", "k:", "k-.", "k--"), sorted({policy for policy, _ in reference}), strict=False):
        points = sorted((n, value) for (other, n), value in reference.items() if other == policy)
        if name == "score":
            points = [
                (n, (v - reference[("random", n)]) / (reference[("controller", n)] - reference[("random", n)]))
                for n, v in points
            ]
        ax.plot(*zip(*points, strict=True), style, linewidth=0.8, label=f"{policy} (benchmark/reference.py)")
    ylabel = "score: 0 random, 1 controller" if name == "score" else "final value"
    ax.set(xlabel="number of agents N", ylabel=f"{ylabel} (IQM, or the mean below 4 seeds; bootstrap)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def team_size(setting: str) -> int:
    return int(re.search(r"-n(\d+)$", setting).group(1))


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default=None, help="the grid's folder (benchmark/run.py --out); none: --out's files")
    parser.add_argument("--out", required=True, help="where the per-run files, the table and the figures go")
    parser.add_argument("--x", choices=["steps", "n"], default="steps", help="n: also the final value against N")
    parser.add_argument("--reference", default=None, help="benchmark/reference.py's output: scores, and lines at N")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file: give a folder for the per-run files, the table and the figures")
    curves, runs, positions = read_grid(Path(args.grid)) if args.grid else ([], [], [])
    fresh = {(r["setting"], r["variant"], int(r["seed"])) for r in runs}
    for name, rows in (("curves", curves), ("runs", runs), ("positions", positions)):  # the runs the grid lacks
        rows += [r for r in read_csv(out / f"{name}.csv") if (r["setting"], r["variant"], int(r["seed"])) not in fresh]
        rows.sort(
            key=lambda r: (r["setting"], r["variant"], int(r["seed"]), r.get("tag", ""), r.get("step", r.get("k")))
        )
    if not runs:
        parser.error(f"no runs under {args.grid} and no runs.csv in {out}: run benchmark/run.py first")
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("curves", curves), ("runs", runs), ("positions", positions)):
        if rows:
            write_csv(rows, out / f"{name}.csv")
    lines = Path(args.reference).read_text().splitlines() if args.reference else []
    found = [re.match(r".* N=(\d+) (\w+): mean return (-?[\d.]+)", line) for line in lines]  # reference.py's lines
    reference = {(m[2], int(m[1])): float(m[3]) for m in found if m} if args.reference else None
    final = summarise(curves, runs, positions, reference)
    write_csv(final, out / "final.csv")
    (out / "table.md").write_text(comparison_table(final))
    for setting in sorted({run["setting"] for run in runs}):
        plot_setting(setting, curves, runs, out / f"{setting}.png")
    if positions:
        plot_variance(positions, out / "variance.png")
    if args.x == "n":
        plot_against_n(final, reference or {}, out / "final_vs_n.png")
    for row in final:
        print(
            f"{row['setting']} {row['variant']}: {row['runs']} runs, {row['metric']} {row['center_is']} "
            f"{row['center']:.4g} [{row['center_low']:.4g}, {row['center_high']:.4g}] ({row['per_seed']})"
            + (
                f"; LV-HAPPO minus this {row['lv_minus_this']:.4g} ({row['lv_minus_this_per_seed']}; "
                f"{row['lv_minus_this_lv_ahead']} / {row['lv_minus_this_this_ahead']} seeds, p = "
                f"{row['lv_minus_this_p']:.3g}), over the tail {row['lv_minus_this_tail']:.4g} "
                f"(p = {row['lv_minus_this_tail_p']:.3g})"
                if row["lv_minus_this_per_seed"]
                else ""
            )
            + f"; Var[M A] at the last position, median {row['adv_variance_last']:.3g}"
            + (f"; partial: {row['partial']}" if row["partial"] else "")
        )


if __name__ == "__main__":
    main()
