"""Tests of benchmark/: the runner's grid, skip logic and Slurm script; the reader's numbers on synthetic runs."""

import csv
import importlib
import shlex
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(ROOT / "benchmark"))
import defaults  # noqa: E402
import reference  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import throughput  # noqa: E402


def test_grid_expansion_and_commands():
    runs = run.expand(["mpe-spread-n3", "smax-3m"], ["lv", "happo", "mappo"], [1, 2], 5000, ["--num-envs", "4"])
    assert len(runs) == 2 * 3 * 2
    assert len({r["dir"] for r in runs}) == 12
    first = runs[0]
    assert first["dir"] == "mpe-spread-n3/lv/seed1"
    assert first["command"][1].endswith("lv_happo_mpe.py")
    assert first["command"][2:] == [
        "--num-agents", "3", "--factor", "clipped", "--seed", "1", "--total-timesteps", "5000", "--num-envs", "4"
    ]  # fmt: skip
    factors = {r["variant"]: r["command"][r["command"].index("--factor") + 1] for r in runs}
    assert factors == {"lv": "clipped", "happo": "raw", "mappo": "none"}


@pytest.mark.parametrize("setting", sorted(run.SETTINGS))
def test_every_setting_is_accepted_by_its_script(setting):
    script, flags = run.SETTINGS[setting]
    module = importlib.import_module(script[: -len(".py")])
    for variant in run.VARIANTS.values():
        assert module.check_args(module.parse_args([*flags, *variant, "--seed", "1"])) is None


def test_existing_runs_are_skipped(tmp_path, capsys):
    runs = run.expand(["mpe-spread-n3"], ["lv", "happo"], [1, 2], 1000, [])
    (tmp_path / "mpe-spread-n3/lv/seed2").mkdir(parents=True)
    (tmp_path / "mpe-spread-n3/lv/seed2/done").write_text("python ...\n")
    (tmp_path / "mpe-spread-n3/happo/seed1").mkdir(parents=True)  # started, never finished: run again
    assert [r["dir"] for r in run.pending(runs, tmp_path)] == [
        "mpe-spread-n3/lv/seed1",
        "mpe-spread-n3/happo/seed1",
        "mpe-spread-n3/happo/seed2",
    ]
    run.main(
        [
            "--settings",
            "mpe-spread-n3",
            "--variants",
            "lv",
            "happo",
            "--seeds",
            "1",
            "2",
            "--out",
            str(tmp_path),
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert "4 runs in the grid, 1 already done, 3 to go" in out and "lv/seed2" not in out


def test_slurm_script_is_a_job_array_of_the_pending_runs(tmp_path):
    script = tmp_path / "array.sh"
    run.main(
        [
            "--settings",
            "smax-3m",
            "--seeds",
            "1",
            "2",
            "--out",
            str(tmp_path / "grid"),
            "--slurm",
            str(script),
            "--",
            "--num-envs",
            "8",
        ]
    )
    text = script.read_text()
    assert "#SBATCH --array=0-5" in text  # 3 variants x 2 seeds
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # valid bash, not executed
    commands = text.split("COMMANDS=(\n")[1].split("\n)")[0].splitlines()
    folders = text.split("FOLDERS=(\n")[1].split("\n)")[0].splitlines()
    assert len(commands) == len(folders) == 6
    parsed = shlex.split(shlex.split(commands[0])[0])
    assert parsed[1].endswith("lv_happo_smac.py") and parsed[-2:] == ["--num-envs", "8"] and "--seed" in parsed
    assert shlex.split(folders[-1])[0].endswith("grid/smax-3m/mappo/seed2")
    assert not (tmp_path / "grid").exists()  # nothing ran


def write_run(out, setting, variant, seed, returns, done=True):
    """A run folder as benchmark/run.py leaves it: runs/<name>/ event files, and `done` when finished."""
    folder = out / setting / variant / f"seed{seed}"
    writer = SummaryWriter(str(folder / "runs" / f"x__{variant}__{seed}__0"))
    for step, value in returns:
        writer.add_scalar("charts/episodic_return", value, step)
    for step in sorted({step for step, _ in returns}):
        writer.add_scalar("charts/SPS", 100.0, step)
        for k in range(3):
            writer.add_scalar(f"lv/adv_variance_{k}", (1.0 + k) * (3.0 if variant == "happo" else 1.0), step)
    writer.close()
    if done:
        (folder / "done").write_text("ok\n")


def test_reader_aggregates_seeds_and_reports_partial_and_missing_runs(tmp_path):
    steps = [100 * i for i in range(1, 11)]  # 10 iterations of 100 steps
    for seed, offset in ((1, 0.0), (2, 2.0), (3, 4.0)):
        write_run(tmp_path, "toy", "lv", seed, [(s, s / 100 + offset) for s in steps])
    write_run(tmp_path, "toy", "happo", 1, [(s, 1.0) for s in steps])
    write_run(tmp_path, "toy", "happo", 2, [(s, 5.0) for s in steps[:4]], done=False)  # cut short at step 400
    runs = report.load_grid(tmp_path)
    assert len(runs) == 5 and sum(r["complete"] for r in runs) == 4

    rows = {r["variant"]: r for r in report.final_table(runs, expected_seeds=[1, 2, 3])}
    # lv: the final return is the mean over the last 10 % of steps (step 1000 only): 10, 12, 14
    assert (
        rows["lv"]["n"] == 3 and rows["lv"]["mean"] == pytest.approx(12.0) and rows["lv"]["std"] == pytest.approx(2.0)
    )
    assert rows["lv"]["notes"] == ""
    assert rows["happo"]["n"] == 1 and rows["happo"]["mean"] == pytest.approx(1.0)
    assert rows["happo"]["notes"] == "seed 2 partial (400 steps); seed 3 missing"
    table = report.markdown(list(rows.values()))
    assert "| toy | lv | 3 | 12.00 ± 2.00 |" in table and "seed 3 missing" in table

    centres, curves = report.aggregate_curves([r for r in runs if r["complete"] and r["variant"] == "lv"])
    mean, half = curves["lv"]
    assert len(centres) == report.CURVE_POINTS
    valid = ~np.isnan(mean)
    # every bin holds one point per seed: mean = s/100 + 2, band = 1.96 * std(0, 2, 4) / sqrt(3)
    bins = np.digitize(np.array(steps, float), np.linspace(0, 1000, report.CURVE_POINTS + 1)[1:-1])
    np.testing.assert_allclose(mean[bins], np.array(steps) / 100 + 2.0)
    np.testing.assert_allclose(half[valid], 1.96 * 2.0 / np.sqrt(3))


def test_iqm_and_bootstrap_interval():
    iqm, low, high = report.iqm_with_ci([1.0, 2.0, 3.0, 4.0, 100.0, -50.0, 2.5, 3.5])
    assert iqm == pytest.approx(np.mean([2.0, 2.5, 3.0, 3.5]))  # the outliers are cut
    assert low <= iqm <= high


def test_variance_study_and_report_files(tmp_path):
    steps = [100, 200]
    for variant in ("lv", "happo"):
        write_run(tmp_path, "mpe-spread-n3", variant, 1, [(s, -50.0) for s in steps])
    report.main(["--out", str(tmp_path), "--variance", "mpe-spread-n3"])
    study = {(r["variant"], r["k"]): r["variance"] for r in report.variance_study(report.load_grid(tmp_path))}
    assert study[("happo", 2)] == pytest.approx(9.0) and study[("lv", 2)] == pytest.approx(3.0)
    for name in ("final.md", "final.csv", "mpe-spread-n3.png", "variance.png", "variance.csv"):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.parametrize(
    "setting", ["mpe-n2", "mamujoco-halfcheetah-6x1", "hatrpo-mpe-n3", "mpe-n3-paper", "smax-3m", "vmas-n3"]
)
def test_throughput_library_baseline(setting):
    # the library column steps PettingZoo's parallel API (mpe2, MaMuJoCo); the batched simulators have none
    script, flags = throughput.SETTINGS[setting]
    sps = throughput.library_sps(script, flags, 60)
    if setting.startswith(("smax", "vmas")):
        assert sps is None
    else:
        assert np.isfinite(sps) and sps > 0


def test_a_cut_short_run_goes_on_from_its_checkpoint(tmp_path, capsys):
    folder = tmp_path / "paper-mpe-spread-n3/lv/seed1"
    (folder / "runs/simple_spread_v3_n3__lv_happo_mpe__1__7").mkdir(parents=True)
    (folder / "runs/simple_spread_v3_n3__lv_happo_mpe__1__7/checkpoint.pt").write_bytes(b"")
    assert run.resume_flags(folder) == ["--resume", "runs/simple_spread_v3_n3__lv_happo_mpe__1__7/checkpoint.pt"]
    assert run.resume_flags(tmp_path / "elsewhere") == []
    run.main(
        ["--settings", "paper-mpe-spread-n3", "--variants", "lv", "--seeds", "1", "--out", str(tmp_path), "--dry-run"]
    )
    out = capsys.readouterr().out
    assert "--eval-every 25 --checkpoint-every 25" in out and "--resume runs/" in out


@pytest.mark.parametrize("setting", ["mpe-n2", "mamujoco-halfcheetah-6x1", "vmas-n3"])
def test_throughput_raw_stepping(setting):
    script, flags = throughput.SETTINGS[setting]
    assert throughput.raw_sps(script, flags, 64) > 0


def test_paper_reader_milestones_anchors_and_partial_runs(tmp_path):
    import paper

    grid, out = tmp_path / "grid", tmp_path / "out"
    evals = [(step, -60.0 + step / 500_000) for step in range(500_000, 10_000_001, 500_000)]  # -59 at 0.5M ... -40
    for seed, done in ((1, True), (2, True), (3, False)):
        folder = grid / "paper-mpe-spread-n3" / "lv" / f"seed{seed}"
        writer = SummaryWriter(str(folder / "runs" / f"x__lv__{seed}__0"))
        for step, value in evals if done else evals[:4]:  # seed 3 stopped at 2M
            writer.add_scalar("eval/episodic_return", value + seed, step)
            writer.add_scalar("charts/SPS", 100.0, step)
        writer.close()
        if done:
            (folder / "done").write_text("ok\n")
    paper.main(["--grid", str(grid), "--out", str(out)])
    (row,) = list(csv.DictReader(open(out / "final.csv")))
    assert (row["seeds"], row["complete"], row["partial"]) == ("3", "2", "seed 3 at 2,000,000")
    assert float(row["mean_2M"]) == pytest.approx(-56.0 + 2.0)  # seeds 1 to 3 reached 2M: -56 + (1, 2, 3)
    assert float(row["mean_10M"]) == pytest.approx(-40.0 + 1.5)  # the finished seeds only
    assert float(row["anchor_10M"]) == -28.0 and (out / "paper-mpe-spread-n3.png").stat().st_size > 0
    assert len(list(csv.DictReader(open(out / "curves.csv")))) == 20 + 20 + 4

    # a later session's grid holds seed 3 only, now finished: seeds 1 and 2 are read back from the committed CSVs
    folder = tmp_path / "grid2" / "paper-mpe-spread-n3" / "lv" / "seed3"
    writer = SummaryWriter(str(folder / "runs" / "x__lv__3__1"))
    for step, value in evals:
        writer.add_scalar("eval/episodic_return", value + 3, step)
        writer.add_scalar("charts/SPS", 100.0, step)
    writer.close()
    (folder / "done").write_text("ok\n")
    paper.main(["--grid", str(tmp_path / "grid2"), "--out", str(out)])
    (row,) = list(csv.DictReader(open(out / "final.csv")))
    assert (row["seeds"], row["complete"], row["partial"]) == ("3", "3", "")
    assert float(row["mean_10M"]) == pytest.approx(-40.0 + 2.0)  # seeds 1, 2 (kept) and 3 (new)
    assert len(list(csv.DictReader(open(out / "curves.csv")))) == 3 * 20


def test_reference_controller_beats_random_actions():
    positions, landmarks = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]), np.array([[1.1, 1.0], [2.0, 0.1], [0, 0.2]])
    assert reference.greedy_assignment(positions, landmarks) == [2, 0, 1]
    random, controller = (np.mean(reference.episode_returns(3, 5, policy)) for policy in ("random", "controller"))
    assert controller > random + 30  # about -20 against -78 over 100 episodes


def test_defaults_study_reads_one_grid_per_configuration(tmp_path):
    steps = [100 * i for i in range(1, 11)]
    for seed in (1, 2):
        write_run(tmp_path / "grids" / "ent0.1", "mpe-spread-n3", "lv", seed, [(s, -50.0 - seed) for s in steps])
    write_run(tmp_path / "grids" / "ent0.01", "mpe-spread-n3", "lv", 1, [(s, -60.0) for s in steps])
    write_run(tmp_path / "grids" / "ent0.01", "mpe-spread-n3", "lv", 2, [(s, -70.0) for s in steps], done=False)
    defaults.main(["--grids", str(tmp_path / "grids"), "--out", str(tmp_path / "out")])
    rows = list(csv.DictReader(open(tmp_path / "out" / "final.csv")))
    assert [(r["configuration"], r["seeds"], r["per_seed"]) for r in rows] == [
        ("ent0.01", "1", "-60.0"),  # the unfinished seed 2 is left out
        ("ent0.1", "1 2", "-51.0 -52.0"),
    ]
    assert float(rows[1]["mean"]) == pytest.approx(-51.5) and (tmp_path / "out" / "mpe-spread-n3.png").stat().st_size


def test_vmas_reference_controller_beats_random_actions():
    random, controller = (np.mean(reference.vmas_episode_returns(3, 64, policy)) for policy in ("random", "controller"))
    assert controller > random + 30  # about -82 against -145 over 1,000 episodes


def test_scaling_reader_intervals_variance_and_partial_runs(tmp_path):
    import scaling

    grid, out = tmp_path / "grid", tmp_path / "out"
    for n in (2, 3):
        for variant, level in (("lv", -50.0), ("happo", -60.0)):
            for seed in (1, 2, 3):
                folder = grid / f"scaling-vmas-spread-n{n}" / variant / f"seed{seed}"
                writer = SummaryWriter(str(folder / "runs" / f"x__{variant}__{seed}__0"))
                last = 3 if (n, variant, seed) != (3, "happo", 3) else 1  # that run stopped early
                for step in range(1, last + 1):
                    writer.add_scalar("eval/episodic_return", level * n + seed + step, 1000 * step)
                    writer.add_scalar("charts/SPS", 100.0, 1000 * step)
                    for k in range(n):
                        growth = 10.0**k if variant == "happo" else 0.5
                        writer.add_scalar(f"lv/adv_variance_{k}", growth, 1000 * step)
                        writer.add_scalar(f"lv/factor_max_{k}", 2.0 * growth, 1000 * step)
                        writer.add_scalar(f"lv/factor_clip_fraction_{k}", 0.1, 1000 * step)
                writer.close()
                if last == 3:
                    (folder / "done").write_text("ok\n")
    reference = "simple_spread N={} {}: mean return {} over 1000 episodes\n"  # scores at N = 3 only
    (tmp_path / "reference.txt").write_text(
        reference.format(3, "controller", -80) + reference.format(3, "random", -180)
    )
    scaling.main(["--grid", str(grid), "--out", str(out), "--reference", str(tmp_path / "reference.txt")])
    final = {(int(r["n"]), r["variant"]): r for r in csv.DictReader(open(out / "final.csv"))}
    row = final[(2, "lv")]  # the last evaluations: -100 + seed + 3 = -96, -95, -94
    assert row["runs"] == "3" and row["per_seed"] == "-96.0 -95.0 -94.0" and float(row["iqm"]) == pytest.approx(-95.0)
    assert float(row["ci_low"]) <= -95.0 <= float(row["ci_high"]) and int(row["budget"]) == 3000
    assert final[(3, "happo")]["runs"] == "2" and final[(3, "happo")]["partial"] == "seed 3 at 1,000"
    assert float(final[(3, "lv")]["score_iqm"]) == pytest.approx(((-150 + 2 + 3) + 180) / 100)  # (R - random) / 100
    assert row["score_iqm"] == "nan"  # no reference at N = 2
    assert float(final[(2, "happo")]["lv_minus_this"]) == pytest.approx(20.0) and row["lv_minus_this"] == "nan"
    assert final[(3, "happo")]["lv_minus_this_per_seed"] == "30.0 30.0"  # seed 3 of HAPPO did not finish
    assert float(final[(3, "happo")]["adv_variance_last"]) == pytest.approx(100.0)  # k = N - 1 = 2
    variance = {(int(r["n"]), r["variant"], int(r["k"])): r for r in csv.DictReader(open(out / "variance.csv"))}
    assert float(variance[(3, "happo", 1)]["factor_max"]) == pytest.approx(20.0)
    assert float(variance[(3, "lv", 2)]["adv_variance"]) == pytest.approx(0.5)
    assert len(list(csv.DictReader(open(out / "curves.csv")))) == 2 * 2 * 3 * 3 - 2
    for name in ("final_vs_n.png", "curves.png", "variance.png"):
        assert (out / name).stat().st_size > 0, name
