"""Reads the scaling study (benchmark/run.py's `scaling-vmas-spread-n*` settings): does clipping the factor help as
teams grow? LV-HAPPO (`lv`), HAPPO (`happo`) and the MAPPO-style update (`mappo`) from lv_happo_vmas.py, the same
budget at every N.

    python benchmark/scaling.py --grid benchmark/grids/scaling --out benchmark/results/scaling

Writes to --out:
- `curves.csv`: N, variant, seed, step, eval_return (every deterministic evaluation the runs logged);
- `final.csv`: per N and variant, over the finished runs, the final evaluation return (the run's last evaluation):
  its interquartile mean with a 95 % percentile-bootstrap interval, mean, std and the per-seed values; with
  `--reference`, the same for the normalised score (R - random) / (controller - random), 0 for uniformly random
  actions and 1 for the greedy controller at that N (returns grow about as N^2, scores compare across N); for HAPPO
  and MAPPO, LV-HAPPO's final return minus theirs on the same seed (the seed fixes the layouts every variant meets:
  `lv_minus_this`, its mean, and the per-seed values); and, from the same runs, the mean over the run of
  `lv/adv_variance_k` and `lv/factor_max_k` at the last position k = N - 1;
- `variance.csv`: per N, variant and position k, the mean over the run and the seeds of `lv/adv_variance_k`,
  `lv/factor_max_k` and `lv/factor_clip_fraction_k`;
- `final_vs_n.png` (final score, or return without `--reference`, against N per variant, with the intervals, and
  the reference policies), `curves.png` (a panel per N: mean evaluation curve per variant, each seed thin) and
  `variance.png` (Var[M_used A] and max M against k, a line per N and variant, log scale).
Runs without a `done` file are named, with the step they reached, and left out of the numbers.
"""

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper import write_csv  # noqa: E402
from report import iqm_with_ci, load_grid  # noqa: E402

SETTING = re.compile(r"scaling-.*-n(\d+)$")
VARIANTS = ("lv", "happo", "mappo")
STYLE = {"lv": ("C0", "LV-HAPPO (clipped M)"), "happo": ("C3", "HAPPO (raw M)"), "mappo": ("C2", "MAPPO-style (M = 1)")}


def team_size(setting: str) -> int | None:
    match = SETTING.match(setting)
    return int(match.group(1)) if match else None


def final_return(run: dict) -> float:
    return run["scalars"]["eval/episodic_return"][-1][1]


def run_mean(run: dict, tag: str) -> float:
    points = run["scalars"].get(tag, [])
    return float(np.mean([value for _, value in points])) if points else float("nan")


def score(value: float, n: int, reference: dict) -> float:
    """(value - random) / (controller - random) at N: 0 for uniformly random actions, 1 for the greedy controller."""
    random, controller = reference.get(("random", n)), reference.get(("controller", n))
    return float("nan") if random is None or controller is None else (value - random) / (controller - random)


def curve_rows(runs: list) -> list:
    return [
        {"n": team_size(r["setting"]), "variant": r["variant"], "seed": r["seed"], "step": step, "eval_return": value}
        for r in runs
        for step, value in r["scalars"].get("eval/episodic_return", [])
    ]


def final_rows(runs: list, reference: dict) -> list:
    rows = []
    for n in sorted({team_size(r["setting"]) for r in runs}):
        # the seed fixes the layouts every variant meets: LV-HAPPO minus each other variant, seed by seed
        lv = {
            r["seed"]: final_return(r)
            for r in runs
            if r["complete"] and (team_size(r["setting"]), r["variant"]) == (n, "lv")
        }
        for variant in [v for v in VARIANTS if any(r["variant"] == v for r in runs)]:
            group = [r for r in runs if team_size(r["setting"]) == n and r["variant"] == variant]
            done = sorted((r for r in group if r["complete"]), key=lambda r: r["seed"])
            finals = [final_return(r) for r in done]
            iqm, low, high = iqm_with_ci(finals) if finals else (float("nan"),) * 3
            scores = [score(x, n, reference) for x in finals]
            scores = iqm_with_ci(scores) if scores and np.isfinite(scores).all() else (float("nan"),) * 3
            partial = "; ".join(f"seed {r['seed']} at {r['last_step']:,}" for r in group if not r["complete"])
            pairs = zip(done, finals, strict=True)
            paired = [lv[r["seed"]] - x for r, x in pairs if r["seed"] in lv] if variant != "lv" else []
            paired_mean = float(np.mean(paired)) if paired else float("nan")
            rows.append(
                {"n": n, "variant": variant, "runs": len(done), "iqm": iqm, "ci_low": low, "ci_high": high}
                | {"mean": float(np.mean(finals)) if finals else float("nan")}
                | {"std": float(np.std(finals, ddof=1)) if len(finals) > 1 else float("nan")}
                | {"per_seed": " ".join(f"{x:.1f}" for x in finals), "seeds": " ".join(str(r["seed"]) for r in done)}
                | dict(zip(("score_iqm", "score_low", "score_high"), scores, strict=True))
                | {"lv_minus_this": paired_mean, "lv_minus_this_per_seed": " ".join(f"{x:.1f}" for x in paired)}
                | {"budget": max((r["last_step"] for r in done), default=0), "partial": partial}
                | {"adv_variance_last": float(np.mean([run_mean(r, f"lv/adv_variance_{n - 1}") for r in done]))}
                | {"factor_max_last": float(np.mean([run_mean(r, f"lv/factor_max_{n - 1}") for r in done]))}
            )
    return rows


def variance_rows(runs: list) -> list:
    rows = []
    for n in sorted({team_size(r["setting"]) for r in runs}):
        for variant in VARIANTS:
            done = [r for r in runs if team_size(r["setting"]) == n and r["variant"] == variant and r["complete"]]
            for k in range(n) if done else []:
                tags = ("adv_variance", "factor_max", "factor_clip_fraction")
                means = {tag: float(np.mean([run_mean(r, f"lv/{tag}_{k}") for r in done])) for tag in tags}
                rows.append({"n": n, "variant": variant, "k": k, "runs": len(done)} | means)
    return rows


def plot(final: list, curves: list, variance: list, reference: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({row["n"] for row in final})
    scored = all(np.isfinite(row["score_iqm"]) for row in final if row["runs"])
    middle, low, high = ("score_iqm", "score_low", "score_high") if scored else ("iqm", "ci_low", "ci_high")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, variant in enumerate(v for v in VARIANTS if any(row["variant"] == v for row in final)):
        rows = [row for row in final if row["variant"] == variant and row["runs"]]
        x = np.array([row["n"] for row in rows]) + (i - 1) * 0.12  # side by side at each N
        iqm = np.array([row[middle] for row in rows])
        errors = [iqm - [row[low] for row in rows], [row[high] for row in rows] - iqm]
        color, label = STYLE[variant]
        ax.errorbar(x, iqm, yerr=errors, marker="o", capsize=3, color=color, label=label)
    for name, style in (("controller", "k--"), ("nearest", "k-."), ("fixed", "k:"), ("random", "k-")):
        points = [(n, reference[(name, n)]) for n in sizes if (name, n) in reference]
        points = [(n, score(value, n, reference) if scored else value) for n, value in points]
        if points:
            ax.plot(*zip(*points, strict=True), style, linewidth=0.8, label=f"{name} (benchmark/reference.py)")
    ylabel = "final score: 0 random, 1 greedy controller" if scored else "final evaluation return"
    ax.set(xlabel="number of agents N", ylabel=f"{ylabel} (IQM, 95 % CI)", xticks=sizes)
    ax.set_title("VMAS simple_spread: final " + ("score" if scored else "return") + " against team size", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "final_vs_n.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes), 3.2), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        for variant in VARIANTS:
            rows = [row for row in curves if row["n"] == n and row["variant"] == variant]
            seeds = sorted({row["seed"] for row in rows})
            if not seeds:
                continue
            color, label = STYLE[variant]
            per_seed = [[(row["step"], row["eval_return"]) for row in rows if row["seed"] == s] for s in seeds]
            for points in per_seed:
                ax.plot(*zip(*points, strict=True), color=color, alpha=0.25, linewidth=0.7)
            length = min(len(points) for points in per_seed)
            steps = [step for step, _ in per_seed[0][:length]]
            ax.plot(steps, np.mean([[v for _, v in p[:length]] for p in per_seed], 0), color=color, label=label)
        ax.set(title=f"N = {n}", xlabel="environment steps")
    axes[0][0].set_ylabel("evaluation return")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for n in sizes:
        for variant, style in (("happo", "--"), ("lv", "-")):
            points = sorted(
                (r["k"], r["adv_variance"], r["factor_max"]) for r in variance if (r["n"], r["variant"]) == (n, variant)
            )
            if points:
                k, adv_variance, factor_max = zip(*points, strict=True)
                color = plt.cm.viridis(sizes.index(n) / max(1, len(sizes) - 1))
                axes[0].plot(k, adv_variance, style, marker=".", color=color, label=f"N = {n} {variant}")
                axes[1].plot(k, factor_max, style, marker=".", color=color, label=f"N = {n} {variant}")
    axes[0].set(yscale="log", xlabel="position k in the update order", ylabel="Var[M_used * A] (mean over the run)")
    axes[1].set(
        yscale="log", xlabel="position k in the update order", ylabel="max M over the batch (mean over the run)"
    )
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "variance.png", dpi=110)
    plt.close(fig)


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="the grid's folder (benchmark/run.py --out)")
    parser.add_argument("--out", default="benchmark/results/scaling")
    parser.add_argument("--reference", default=None, help="benchmark/reference.py --vmas output, drawn beside")
    args = parser.parse_args(argv)
    runs = [r for r in load_grid(Path(args.grid)) if team_size(r["setting"]) is not None]
    if not runs:
        parser.exit(1, f"scaling.py: error: no scaling-*-n<N> runs under {args.grid} (run benchmark/run.py first)\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = {}
    if args.reference:  # lines "simple_spread N=3 controller: mean return -82.4 over 1000 episodes"
        for line in Path(args.reference).read_text().splitlines():
            if match := re.match(r"simple_spread N=(\d+) (\w+): mean return (-?[\d.]+)", line):
                reference[(match.group(2), int(match.group(1)))] = float(match.group(3))
    final, curves, variance = final_rows(runs, reference), curve_rows(runs), variance_rows(runs)
    write_csv(final, out / "final.csv")
    write_csv(curves, out / "curves.csv")
    if variance:
        write_csv(variance, out / "variance.csv")
    plot(final, curves, variance, reference, out)
    for row in final:
        print(
            f"N={row['n']:>2} {row['variant']:>5}: IQM {row['iqm']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]"
            f" over {row['runs']} runs ({row['per_seed']}); score {row['score_iqm']:.2f}"
            f" [{row['score_low']:.2f}, {row['score_high']:.2f}]; Var[M A] at k=N-1 {row['adv_variance_last']:.3g}"
            + (f"; LV-HAPPO minus this, same seeds: {row['lv_minus_this_per_seed']}" if row["variant"] != "lv" else "")
            + (f"; partial: {row['partial']}" if row["partial"] else "")
        )


if __name__ == "__main__":
    main()
