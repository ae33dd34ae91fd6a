"""Long runs that survive, in every script: checkpoints, exact resume, interrupts, non-finite steps."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, only_run_dir, read_scalars, run_script

# tiny settings per script: 2 iterations of `batch` joint steps each, episodes that cross iteration boundaries
TINY = {
    "lv_happo_mpe.py": (["--num-envs", "2", "--num-steps", "40", "--update-epochs", "2"], 80),
    "lv_hatrpo_mpe.py": (["--num-envs", "2", "--num-steps", "40"], 80),
    "lv_happo_mamujoco.py": (
        ["--agent-conf", "2x3", "--max-episode-steps", "30", "--num-envs", "2", "--num-steps", "40"],
        80,
    ),
    "lv_happo_smac.py": (["--num-envs", "4", "--num-steps", "20", "--update-epochs", "2"], 80),
    "lv_happo_smac_rnn.py": (
        ["--num-envs", "4", "--num-steps", "20", "--update-epochs", "2", "--data-chunk-length", "5"],
        80,
    ),
    "lv_happo_vmas.py": (["--max-steps", "8", "--num-envs", "8", "--num-steps", "10", "--update-epochs", "2"], 80),
}
COMPARED = [
    "losses/policy_loss",
    "losses/value_loss",
    "losses/approx_kl",
    "lv/adv_variance_1",
    "charts/episodic_return",
]
MPE_FLAGS, MPE_BATCH = TINY["lv_happo_mpe.py"]


@pytest.mark.parametrize("script", list(TINY))
def test_resumed_run_is_the_continued_run(tmp_path, script):
    # killed just after its checkpoint of iteration 2, resumed: it logs what the run never stopped logs (MaMuJoCo's,
    # with the learning rates annealed alike: the critic's own rate, the actors' --learning-rate 5e-4)
    flags, batch = TINY[script]
    flags = [*flags, "--seed", "5", "--checkpoint-every", "2", "--total-timesteps", str(4 * batch)]
    flags += ["--anneal-lr", "--critic-learning-rate", "1e-3"] if "mamujoco" in script else []
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir()
    stopped.mkdir()
    result = run_script(script, *flags, cwd=straight)
    assert result.returncode == 0, result.stderr
    result = run_wrapped(stopped, script, *flags, kill_after_checkpoint=1)
    assert result.returncode == -signal.SIGKILL, result.stderr
    checkpoint = only_run_dir(stopped) / "checkpoint.pt"
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["iteration"] == 2
    if "mamujoco" in script:  # iteration 2 of 4 trains at 3/4 of the initial rates
        assert saved["critic_optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.75e-3)
        actor_lrs = [state["param_groups"][0]["lr"] for name, state in saved.items() if name.startswith("actor_optim")]
        assert actor_lrs == pytest.approx([3.75e-4] * len(actor_lrs)) and actor_lrs
    result = run_script(script, *flags, "--resume", str(checkpoint), cwd=stopped)
    assert result.returncode == 0, result.stderr
    a, b = read_scalars(only_run_dir(straight)), read_scalars(only_run_dir(stopped))  # one run directory each
    for tag in COMPARED:
        assert a[tag] == b[tag], tag  # every logged value, at the same steps, none twice
    assert [step for step, _ in b["charts/SPS"]] == [batch, 2 * batch, 3 * batch, 4 * batch]


@pytest.mark.parametrize("script", list(TINY))
def test_a_saved_model_is_evaluated_without_training(tmp_path, script):
    # a shared actor where the script has one (LV-HATRPO keeps one actor per agent): saved as one, evaluated as one
    flags, batch = TINY[script]
    flags = [*flags, "--eval-episodes", "2", *([] if "hatrpo" in script else ["--share-actor"])]
    saving = ["--total-timesteps", str(batch), "--save-model", "--checkpoint-every", "1"]
    result = run_script(script, *flags, *saving, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (model,) = (tmp_path / "runs").glob("*/*.cleanrl_model")
    actors = {name.split(".")[0] for name in torch.load(model, weights_only=True)["actors"]}
    assert (actors == {"0"}) == ("--share-actor" in flags)
    runs_before = sorted((tmp_path / "runs").iterdir())
    # the file carries its run's flags: --eval-model alone builds the actors the run trained
    result = run_script(script, "--eval-model", str(model), "--eval-episodes", "3", cwd=tmp_path)
    assert result.returncode == 0 and "global_step" not in result.stdout, result.stderr  # no iteration ran
    assert sorted((tmp_path / "runs").iterdir()) == runs_before  # evaluated before any set-up: no run folder, no events
    assert re.search(r"^eval: episodic_return -?[\d.]+ ± [\d.]+", result.stdout, re.M), result.stdout
    assert ("win rate" in result.stdout) == script.startswith("lv_happo_smac")
    # the last checkpoint is the model by another name: it evaluates the same
    (checkpoint,) = (tmp_path / "runs").glob("*/checkpoint.pt")
    from_checkpoint = run_script(script, "--eval-model", str(checkpoint), "--eval-episodes", "3", cwd=tmp_path)
    assert from_checkpoint.returncode == 0 and from_checkpoint.stdout == result.stdout, from_checkpoint.stderr
    # a flag set here that the run did not have, an empty file, one that is not torch's, and a model whose actors do
    # not fit the ones built (as from another version of the script): one line each
    (tmp_path / "empty.cleanrl_model").write_bytes(b"")
    (tmp_path / "notes.cleanrl_model").write_text("not a model")
    saved = torch.load(model, weights_only=True)
    first = next(iter(saved["actors"]))
    torch.save(saved | {"actors": saved["actors"] | {first: torch.zeros(3, 3)}}, tmp_path / "wider.cleanrl_model")
    cases = [
        (["--hidden-sizes", "8", "--eval-model", str(model)], f"{model} was trained with --hidden-sizes "),
        (["--eval-model", str(tmp_path / "empty.cleanrl_model")], "the file is empty"),
        (["--eval-model", str(tmp_path / "notes.cleanrl_model")], f"cannot read {tmp_path / 'notes.cleanrl_model'}: "),
        (["--eval-model", str(tmp_path / "wider.cleanrl_model")], "actors in the file does not fit this script's ("),
    ]
    for given, message in cases:
        result = run_script(script, *given, cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted((tmp_path / "runs").iterdir()) == runs_before


def test_resume_appends_without_duplicated_steps_after_a_crash(tmp_path):
    """A run killed after its checkpoint logged iterations that its resumed run logs again: those are purged."""
    flags = [*MPE_FLAGS, "--checkpoint-every", "2"]
    assert run_script("lv_happo_mpe.py", *flags, "--total-timesteps", str(2 * MPE_BATCH), cwd=tmp_path).returncode == 0
    run_dir = only_run_dir(tmp_path)
    kept = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    # a third iteration logged by a run that then died before its next checkpoint, then the resumed run
    for iterations in (3, 4):
        resume = ["--total-timesteps", str(iterations * MPE_BATCH), "--resume", str(run_dir / "checkpoint.pt")]
        result = run_script("lv_happo_mpe.py", *flags, *resume, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        torch.save(kept, run_dir / "checkpoint.pt")  # back to the checkpoint of iteration 2, as after a crash
    steps = [step for step, _ in read_scalars(run_dir)["charts/SPS"]]
    assert steps == [MPE_BATCH, 2 * MPE_BATCH, 3 * MPE_BATCH, 4 * MPE_BATCH]


# runs a script with torch.save, os.replace and gradient clipping instrumented: NaN gradients on some clipping calls,
# a process killed in the middle of a checkpoint write (DIE_ON_SAVE) or just after one (KILL_AFTER_CHECKPOINT)
WRAPPER = """
import os, runpy, signal, sys, torch
calls, saves, nan_from, nan_to = [0], [0], int(os.environ["NAN_FROM"]), int(os.environ["NAN_TO"])
real_clip, real_save, real_replace = torch.nn.utils.clip_grad_norm_, torch.save, os.replace

def clip_with_nan(parameters, *args, **kwargs):
    parameters = list(parameters)
    calls[0] += 1
    if nan_from <= calls[0] < nan_to:
        for p in parameters:
            p.grad.fill_(float("nan"))
    return real_clip(parameters, *args, **kwargs)

def save(obj, f, *args, **kwargs):
    saves[0] += 1
    if os.environ.get("DIE_ON_SAVE") == str(saves[0]):
        with open(f, "wb") as out:
            out.write(b"PK\\x03\\x04 half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)

def replace(src, dst):
    real_replace(src, dst)
    if dst.endswith("checkpoint.pt") and os.environ.get("KILL_AFTER_CHECKPOINT") == str(saves[0]):
        os.kill(os.getpid(), signal.SIGKILL)

torch.nn.utils.clip_grad_norm_, torch.save, os.replace = clip_with_nan, save, replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_wrapped(tmp_path, script: str, *flags: str, nan_from=0, nan_to=0, die_on_save=0, kill_after_checkpoint=0):
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    env = dict(os.environ, NAN_FROM=str(nan_from), NAN_TO=str(nan_to), DIE_ON_SAVE=str(die_on_save))
    env |= {"KILL_AFTER_CHECKPOINT": str(kill_after_checkpoint), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(tmp_path / "wrapper.py"), str(ROOT / script), *flags]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


def test_checkpoint_killed_mid_write_leaves_the_previous_one(tmp_path):
    flags = ("--total-timesteps", str(3 * MPE_BATCH), "--checkpoint-every", "1")
    result = run_wrapped(
        tmp_path, "lv_happo_mpe.py", *MPE_FLAGS, *flags, die_on_save=2
    )  # killed while writing iteration 2's checkpoint
    assert result.returncode == -signal.SIGKILL
    run_dir = only_run_dir(tmp_path)
    assert (run_dir / "checkpoint.pt.tmp").exists()  # the torn write
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["iteration"] == 1  # the previous one, whole


def test_non_finite_gradient_skips_its_step_and_training_goes_on(tmp_path):
    # an iteration makes 3 agents x 2 epochs + 2 critic epochs = 8 clipping calls: NaN on 2 steps of iteration 2
    result = run_wrapped(
        tmp_path,
        "lv_happo_mpe.py",
        *MPE_FLAGS,
        "--total-timesteps",
        str(3 * MPE_BATCH),
        "--save-model",
        nan_from=14,
        nan_to=16,
    )
    assert result.returncode == 0, result.stderr
    assert "warning: iteration 2: 2 non-finite steps skipped" in result.stderr
    run_dir = only_run_dir(tmp_path)
    scalars = read_scalars(run_dir)
    assert scalars["charts/skipped_steps"] == [(2 * MPE_BATCH, 2.0)]
    assert [step for step, _ in scalars["charts/SPS"]] == [MPE_BATCH, 2 * MPE_BATCH, 3 * MPE_BATCH]
    model = torch.load(run_dir / "lv_happo_mpe.cleanrl_model", weights_only=False)
    networks = [model[name] for name in ("actors", "critic", "value_norm")]
    assert all(torch.isfinite(t).all() for part in networks for t in part.values())


def test_steps_non_finite_in_every_iteration_are_all_skipped_and_nothing_non_finite_is_kept(tmp_path):
    flags = ("--total-timesteps", str(4 * MPE_BATCH), "--checkpoint-every", "1")
    result = run_wrapped(tmp_path, "lv_happo_mpe.py", *MPE_FLAGS, *flags, nan_from=12, nan_to=10**9)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert all(f"warning: iteration {i}: 8 non-finite steps skipped" in result.stderr for i in (3, 4))
    checkpoint = torch.load(only_run_dir(tmp_path) / "checkpoint.pt", weights_only=False)
    assert checkpoint["iteration"] == 4
    assert all(torch.isfinite(t).all() for name in ("actors", "critic") for t in checkpoint[name].values())


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_writes_a_checkpoint_that_resumes(tmp_path, signum, code):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "lv_happo_mpe.py"), *MPE_FLAGS],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
        start_new_session=True,
    )
    assert process.stdout.readline().startswith("global_step=")  # training is under way
    os.killpg(process.pid, signum)  # to the whole process group, as a terminal's Ctrl-C
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code and "Traceback" not in stderr, stderr
    assert "stopping after this iteration" in stderr
    command = re.search(r"resume with: python (.*)", stdout).group(1).split()
    checkpoint = torch.load(tmp_path / command[-1], weights_only=False)
    assert checkpoint["global_step"] == checkpoint["iteration"] * MPE_BATCH >= MPE_BATCH
    # the printed command resumes (here with a total a little past the checkpoint)
    total = ["--total-timesteps", str(checkpoint["global_step"] + MPE_BATCH)]
    result = subprocess.run([sys.executable, *command, *total], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    steps = [step for step, _ in read_scalars(only_run_dir(tmp_path))["charts/SPS"]]
    assert steps[-1] == checkpoint["global_step"] + MPE_BATCH and len(steps) == len(set(steps))


def test_resume_with_other_flags_is_refused_in_one_line(tmp_path):
    flags = [*MPE_FLAGS, "--total-timesteps", str(MPE_BATCH), "--checkpoint-every", "1"]
    assert run_script("lv_happo_mpe.py", *flags, cwd=tmp_path).returncode == 0
    checkpoint = str(only_run_dir(tmp_path) / "checkpoint.pt")
    result = run_script("lv_happo_mpe.py", *flags, "--num-agents", "4", "--resume", checkpoint, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = f"{checkpoint} was trained with --num-agents None: drop the flag or give that"
    assert result.stderr.strip().splitlines() == [f"lv_happo_mpe.py: error: {message}"]


def test_resume_of_another_scripts_checkpoint_writes_nothing_and_a_model_goes_on(tmp_path):
    # LV-HATRPO given an LV-HAPPO checkpoint or model with that run's own flags (down to --exp-name), and LV-HAPPO given
    # its checkpoint with the critic's parameters renamed (as by another version of the script), refuse it in one
    # line, and the run's folder is as it was; the model is a checkpoint by another name, from which the run goes on
    flags = [*MPE_FLAGS, "--total-timesteps", str(MPE_BATCH), "--checkpoint-every", "1", "--save-model"]
    assert run_script("lv_happo_mpe.py", *flags, cwd=tmp_path).returncode == 0
    run_dir = only_run_dir(tmp_path)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    renamed = {f"base.{key}": value for key, value in saved["critic"].items()}
    torch.save(saved | {"critic": renamed}, tmp_path / "old.pt")
    before = sorted((path.name, path.stat().st_mtime_ns) for path in run_dir.iterdir())
    hatrpo_flags = ["--num-envs", "2", "--num-steps", "40", "--total-timesteps", str(MPE_BATCH), "--exp-name"]
    for path in (run_dir / "checkpoint.pt", run_dir / "lv_happo_mpe.cleanrl_model"):
        result = run_script("lv_hatrpo_mpe.py", *hatrpo_flags, "lv_happo_mpe", "--resume", str(path), cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        message = "was written by lv_happo_mpe.py, not lv_hatrpo_mpe.py: use that one"
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    result = run_script("lv_happo_mpe.py", "--resume", str(tmp_path / "old.pt"), cwd=tmp_path)
    message = "lv_happo_mpe.py: error: critic in the file does not fit this script's (RuntimeError): use the one that"
    assert result.returncode == 1 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted((path.name, path.stat().st_mtime_ns) for path in run_dir.iterdir()) == before
    assert len(list((tmp_path / "runs").iterdir())) == 1  # no new run folder either
    longer = ["--total-timesteps", str(2 * MPE_BATCH), "--resume", str(run_dir / "lv_happo_mpe.cleanrl_model")]
    result = run_script("lv_happo_mpe.py", *MPE_FLAGS, *longer, cwd=tmp_path)
    assert result.returncode == 0 and f"global_step={2 * MPE_BATCH}," in result.stdout, result.stderr
    assert f"global_step={MPE_BATCH}," not in result.stdout  # it went on from the model's step
