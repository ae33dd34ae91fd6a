"""Tests of benchmark/: the launcher's grid, skip logic and Slurm script; the reader's numbers on synthetic runs."""

import importlib
import shlex
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, parse
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(ROOT / "benchmark"))
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
        assert module.check_args(parse(module, *flags, *variant, "--seed", "1")) is None


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


def test_a_grid_whose_runs_fail_exits_non_zero(tmp_path, monkeypatch, capsys):
    stub = tmp_path / "python"  # a stand-in for python that fails every run
    stub.write_text("#!/bin/bash\nexit 3\n")
    stub.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stub))
    grid = tmp_path / "grid"
    with pytest.raises(SystemExit) as exit_:
        run.main(["--settings", "mpe-spread-n3", "--variants", "lv", "--seeds", "1", "2", "--out", str(grid)])
    assert "2 of 2 runs failed" in str(exit_.value) and not list(grid.rglob("done"))


@pytest.mark.parametrize("main", [run.main, report.main])
def test_out_of_an_existing_file_is_refused_in_one_line(tmp_path, main, capsys):
    (tmp_path / "file").write_text("")
    flags = ["--settings", "mpe-spread-n3", "--dry-run"] if main is run.main else []
    with pytest.raises(SystemExit) as exit_:
        main([*flags, "--out", str(tmp_path / "file")])
    assert exit_.value.code == 2 and "is a file" in capsys.readouterr().err


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


def test_slurm_task_resumes_a_cut_run_and_appends_to_its_log(tmp_path, monkeypatch):
    # a stand-in for python: records its arguments, then exits with $STATUS, as a run cut by the time limit (143)
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\necho "ran with: $*"\nexit "$STATUS"\n')
    stub.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stub))
    script, grid = tmp_path / "array.sh", tmp_path / "grid"
    run.main(
        ["--settings", "mpe-spread-n3", "--variants", "lv", "--seeds", "1", "--out", str(grid), "--slurm", str(script)]
    )
    folder = grid / "mpe-spread-n3" / "lv" / "seed1"

    def task(status: int) -> None:
        env = {"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "0", "STATUS": str(status)}
        subprocess.run(["bash", str(script)], env=env, check=False)

    task(143)  # cut: no `done`, and the run left a checkpoint
    assert not (folder / "done").exists()
    (folder / "runs" / "x__1").mkdir(parents=True)
    (folder / "runs" / "x__1" / "checkpoint.pt").write_bytes(b"")
    task(0)  # sbatch again: the task goes on from the checkpoint and finishes
    log = (folder / "log.txt").read_text().splitlines()
    assert len(log) == 2 and "--resume" not in log[0] and log[1].endswith("--resume runs/x__1/checkpoint.pt")
    assert (folder / "done").exists()
    task(0)  # once done, a task runs nothing
    assert len((folder / "log.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "setting", ["mpe-spread-n2", "mamujoco-halfcheetah-6x1", "hatrpo-mpe-spread-n3", "smax-3m", "vmas-spread-n3"]
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


@pytest.mark.parametrize("setting", ["mpe-spread-n2", "paper-mamujoco-ant-8x1", "vmas-spread-n3"])
def test_throughput_raw_stepping(setting):
    script, flags = throughput.SETTINGS[setting]
    assert throughput.raw_sps(script, flags, 64) > 0


def test_reference_controller_beats_random_actions():
    positions, landmarks = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]), np.array([[1.1, 1.0], [2.0, 0.1], [0, 0.2]])
    assert reference.greedy_assignment(positions, landmarks) == [2, 0, 1]
    random, controller = (np.mean(reference.episode_returns(3, 5, policy)) for policy in ("random", "controller"))
    assert controller > random + 30  # about -20 against -78 over 100 episodes


def test_vmas_reference_controller_beats_random_actions():
    random, controller = (np.mean(reference.vmas_episode_returns(3, 64, policy)) for policy in ("random", "controller"))
    assert controller > random + 30  # about -82 against -145 over 1,000 episodes


def write_run(grid, setting, variant, seed, steps, level, done=True, positions=3):
    """A run folder as benchmark/run.py leaves it: event files (evaluations level + seed + step / 1000, a training
    return per step, Var[M A] growing with k for HAPPO) and `done` when the run finished."""
    folder = grid / setting / variant / f"seed{seed}"
    writer = SummaryWriter(str(folder / "runs" / f"x__{variant}__{seed}__0"))
    for step in steps:
        writer.add_scalar("charts/SPS", 100.0, step)
        writer.add_scalar("charts/episodic_return", level + seed, step)
        writer.add_scalar("eval/episodic_return", level + seed + step / 1000, step)
        for k in range(positions):
            writer.add_scalar(f"lv/adv_variance_{k}", 2.0**k if variant == "happo" else 1.0, step)
            writer.add_scalar(f"lv/factor_max_{k}", 1.0 + k, step)
            writer.add_scalar(f"lv/factor_clip_fraction_{k}", 0.1, step)
    writer.close()
    if done:
        (folder / "done").write_text("ok\n")


def test_reader_tables_paired_differences_and_kept_runs(tmp_path):
    grid, out, steps = tmp_path / "grid", tmp_path / "out", [1000 * i for i in range(1, 11)]
    for seed in (1, 2, 3):
        write_run(grid, "toy", "lv", seed, steps, -50.0)
        write_run(grid, "toy", "happo", seed, steps if seed < 3 else steps[:4], -60.0 + seed, done=seed < 3)
    report.main(["--grid", str(grid), "--out", str(out)])
    runs = {(r["variant"], r["seed"]): r for r in report.read_csv(out / "runs.csv")}
    assert runs[("happo", 3)]["complete"] == 0 and runs[("happo", 3)]["last_step"] == 4000
    final = {r["variant"]: r for r in report.read_csv(out / "final.csv")}
    lv, happo = final["lv"], final["happo"]
    # the last evaluation, -50 + seed + 10, for LV-HAPPO; HAPPO's unfinished seed 3 is left out of the numbers
    assert (lv["metric"], lv["runs"], lv["per_seed"], lv["budget"]) == ("eval/episodic_return", 3, "-39 -38 -37", 10000)
    assert lv["mean"] == pytest.approx(-38.0) and lv["center_low"] <= lv["center"] <= lv["center_high"]
    assert lv["center_is"] == "mean" and lv["center"] == pytest.approx(-38.0)  # below 4 seeds, the IQM is the mean
    assert (happo["runs"], happo["seeds"], happo["partial"]) == (2, "1 2", "seed 3 at 4,000")
    # LV-HAPPO minus HAPPO on seeds 1 and 2: (-50 + s) - (-60 + 2 s) = 10 - s
    assert happo["lv_minus_this_per_seed"] == "9 8" and happo["lv_minus_this"] == pytest.approx(8.5)
    assert happo["lv_minus_this_low"] <= 8.5 <= happo["lv_minus_this_high"] and lv["lv_minus_this_per_seed"] == ""
    # both seeds favour LV-HAPPO; of the 4 sign assignments of (9, 8), 2 reach |sum| 17: p = 0.5
    assert (happo["lv_minus_this_lv_ahead"], happo["lv_minus_this_this_ahead"], happo["lv_minus_this_p"]) == (2, 0, 0.5)
    # the tail, the evaluations over the last 10 % of steps: here the last one alone (the evaluations are 10 % apart)
    assert (lv["tail_per_seed"], happo["lv_minus_this_tail"]) == ("-39 -38 -37", pytest.approx(8.5))
    # the area, the mean over every evaluation of the run: (-50 + s + 5.5) - (-60 + 2 s + 5.5) = 10 - s again
    assert happo["lv_minus_this_area"] == pytest.approx(8.5) and happo["lv_minus_this_area_low"] == pytest.approx(8)
    assert happo["adv_variance_last"] == pytest.approx(4.0) and lv["factor_max_last"] == pytest.approx(3.0)
    row = "| toy | HAPPO | 1 2 3 / 1 2 | mean -38 [-39, -37] | mean -47 [-48, -46] | +9, +8 "
    row += "| +8.5 [+8, +9]; 2 / 0; p = 0.5 " * 3 + "| 1 [1-1] / 4 [4-4] |"
    assert row in (out / "table.md").read_text()  # LV-HAPPO's mean over seeds 1-3, HAPPO's over 1-2
    for name in ("toy.png", "variance.png", "curves.csv", "positions.csv"):
        assert (out / name).stat().st_size > 0, name

    # a later session: the grid holds HAPPO's seed 3 only, now finished; the others come from --out's files
    write_run(tmp_path / "grid2", "toy", "happo", 3, steps, -57.0)
    report.main(["--grid", str(tmp_path / "grid2"), "--out", str(out)])
    happo = {r["variant"]: r for r in report.read_csv(out / "final.csv")}["happo"]
    assert (happo["runs"], happo["partial"], happo["lv_minus_this_per_seed"]) == (3, "", "9 8 7")
    # from the per-run files alone, the table is the same, byte for byte
    table = (out / "final.csv").read_text()
    report.main(["--out", str(out)])
    assert (out / "final.csv").read_text() == table


def test_sign_flip_p_by_hand():
    # (1, 2, 3): of the 8 sums +-1 +-2 +-3 (6, 0, 2, -4, 4, -2, 0, -6), 2 reach |6|
    assert report.sign_flip_p([1, 2, 3]) == 0.25
    # (3, -1, 1), sum 3: the |sums| are 3, 1, 5, 3, 3, 5, 1, 3: 6 of 8 reach 3
    assert report.sign_flip_p([3, -1, 1]) == 0.75
    assert report.sign_flip_p([5, 1, 2, 4, 3]) == 2 / 32  # five of five one way: the smallest p that 5 pairs give
    assert report.sign_flip_p([0.1, 0.2, 0.3]) == 0.25  # ties with the observed sum count despite rounding
    assert np.isnan(report.sign_flip_p([]))
    assert report.paired([4.0, -1.0, 2.0])["_lv_ahead"] == 2 and report.paired([4.0, -1.0, 0.0])["_this_ahead"] == 1


def test_variance_is_summarised_by_the_median_and_range():
    # one seed's Var[M A] 300 would make the mean 101: the median 2 and the range 1 to 300 say what the seeds show
    runs = [{"setting": "t", "variant": "happo", "seed": s, "complete": 1, "last_step": 10} for s in (1, 2, 3)]
    point = {"setting": "t", "variant": "happo", "tag": "eval/episodic_return", "step": 10, "value": 1.0}
    curves = [point | {"seed": s} for s in (1, 2, 3)]
    positions = [{"setting": "t", "variant": "happo", "seed": s, "k": 1} for s in (1, 2, 3)]
    positions = [p | {"adv_variance": v, "factor_max": v} for p, v in zip(positions, (1.0, 300.0, 2.0), strict=True)]
    (row,) = report.summarise(curves, runs, positions)
    assert (row["adv_variance_last"], row["adv_variance_last_min"], row["adv_variance_last_max"]) == (2.0, 1.0, 300.0)
    assert row["factor_max_last"] == 2.0


def test_tail_is_the_mean_over_the_last_tenth_of_steps():
    points = [(1000 * i, float(i)) for i in range(1, 21)]  # a value every 1,000 steps up to 20,000
    assert report.tail_mean(points, 20_000) == pytest.approx(19.5)  # the values at 19,000 and 20,000
    assert report.final_value(points, 20_000, "eval/episodic_return") == 20.0  # the last evaluation
    assert report.final_value(points, 20_000, "charts/episodic_return") == pytest.approx(19.5)


def test_reader_milestones_training_metric_and_team_sizes(tmp_path, capsys):
    grid, out = tmp_path / "grid", tmp_path / "out"
    steps = list(range(500_000, 2_000_001, 500_000))
    for n in (2, 3):
        for variant, level in (("lv", -40.0), ("happo", -50.0)):
            write_run(grid, f"scaling-toy-n{n}", variant, 1, steps, level * n, positions=n)
    (tmp_path / "reference.txt").write_text(
        "".join(f"simple_spread N={n} {policy}: mean return {value * n} over 9 episodes\n"
                for n in (2, 3) for policy, value in (("random", -60), ("controller", 0)))
    )  # fmt: skip
    report.main(["--grid", str(grid), "--out", str(out), "--x", "n", "--reference", str(tmp_path / "reference.txt")])
    final = {(r["setting"], r["variant"]): r for r in report.read_csv(out / "final.csv")}
    row = final[("scaling-toy-n3", "lv")]
    assert row["at_1M"] == pytest.approx(-120 + 1 + 1000) and row["at_2M"] == pytest.approx(-120 + 1 + 2000)
    assert np.isnan(row["at_5M"])  # no run got there
    assert row["score"] == pytest.approx((-120 + 1 + 2000 + 180) / 180) and row["adv_variance_last"] == 1.0
    assert final[("scaling-toy-n3", "happo")]["adv_variance_last"] == pytest.approx(4.0)  # k = N - 1 = 2
    assert (out / "final_vs_n.png").stat().st_size > 0 and "LV-HAPPO minus this" in capsys.readouterr().out

    # without evaluations the metric is the training return of the last 10 % of steps
    folder = tmp_path / "train"
    writer = SummaryWriter(str(folder / "toy" / "lv" / "seed1" / "runs" / "x"))
    for step in range(100, 10_001, 100):
        writer.add_scalar("charts/SPS", 1.0, step)
        writer.add_scalar("charts/episodic_return", 1.0 if step <= 9000 else 5.0, step)
    writer.close()
    (folder / "toy" / "lv" / "seed1" / "done").write_text("ok\n")
    report.main(["--grid", str(folder), "--out", str(tmp_path / "train_out")])
    (row,) = report.read_csv(tmp_path / "train_out" / "final.csv")
    assert (row["metric"], row["mean"]) == ("charts/episodic_return", 5.0)


def test_reader_refuses_an_empty_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmark" / "report.py"), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "no runs under None and no runs.csv" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_finished_run_without_evaluations_gives_nan_differences():
    curves = [{"setting": "t", "variant": "lv", "seed": 1, "tag": "eval/episodic_return", "step": 1000, "value": 1.0}]
    runs = [{"setting": "t", "variant": v, "seed": 1, "complete": 1, "last_step": 1000} for v in ("lv", "happo")]
    happo = next(row for row in report.summarise(curves, runs, []) if row["variant"] == "happo")
    assert np.isnan(happo["lv_minus_this_tail"]) and np.isnan(happo["lv_minus_this_area"])
