"""Long runs that survive, in every script: checkpoints, exact resume, interrupts, non-finite updates, bad flags."""

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, assert_one_line_error, only_run_dir, read_scalars, run_script

import lv_happo_mpe

# tiny settings per script: 2 iterations of `batch` joint steps each, episodes that cross iteration boundaries
TINY = {
    "lv_happo_mpe.py": (["--num-envs", "2", "--num-steps", "40", "--update-epochs", "2"], 80),
    "lv_hatrpo_mpe.py": (["--num-envs", "2", "--num-steps", "40"], 80),
    "lv_happo_mamujoco.py": (
        [
            "--agent-conf",
            "2x3",
            "--max-episode-steps",
            "30",
            "--num-envs",
            "2",
            "--num-steps",
            "40",
            "--update-epochs",
            "2",
        ],
        80,
    ),
    "lv_happo_smac.py": (["--num-envs", "4", "--num-steps", "20", "--update-epochs", "2"], 80),
    "lv_happo_vmas.py": (["--max-steps", "8", "--num-envs", "8", "--num-steps", "10", "--update-epochs", "2"], 80),
}
COMPARED = [
    "losses/policy_loss",
    "losses/value_loss",
    "losses/approx_kl",
    "lv/adv_variance_1",
    "charts/episodic_return",
]


@pytest.mark.parametrize("script", list(TINY))
def test_resumed_run_is_the_continued_run(tmp_path, script):
    flags, batch = TINY[script]
    flags = [*flags, "--seed", "5", "--checkpoint-every", "2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir()
    stopped.mkdir()
    result = run_script(script, *flags, "--total-timesteps", str(4 * batch), cwd=straight)
    assert result.returncode == 0, result.stderr
    result = run_script(script, *flags, "--total-timesteps", str(2 * batch), cwd=stopped)
    assert result.returncode == 0, result.stderr
    checkpoint = only_run_dir(stopped) / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=False)["iteration"] == 2
    result = run_script(script, *flags, "--total-timesteps", str(4 * batch), "--resume", str(checkpoint), cwd=stopped)
    assert result.returncode == 0, result.stderr
    a, b = read_scalars(only_run_dir(straight)), read_scalars(only_run_dir(stopped))  # one run directory each
    for tag in COMPARED:
        assert a[tag] == b[tag], tag  # every logged value, at the same steps, none twice
    assert [step for step, _ in b["charts/SPS"]] == [batch, 2 * batch, 3 * batch, 4 * batch]


def test_resume_appends_without_duplicated_steps_after_a_crash(tmp_path):
    """A run killed after its checkpoint logged iterations that its resumed run logs again: those are purged."""
    flags, batch = TINY["lv_happo_mpe.py"]
    flags = [*flags, "--checkpoint-every", "2"]
    assert run_script("lv_happo_mpe.py", *flags, "--total-timesteps", str(2 * batch), cwd=tmp_path).returncode == 0
    run_dir = only_run_dir(tmp_path)
    kept = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    # a third iteration logged by a run that then died before its next checkpoint, then the resumed run
    for iterations in (3, 4):
        resume = ["--total-timesteps", str(iterations * batch), "--resume", str(run_dir / "checkpoint.pt")]
        result = run_script("lv_happo_mpe.py", *flags, *resume, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        torch.save(kept, run_dir / "checkpoint.pt")  # back to the checkpoint of iteration 2, as after a crash
    steps = [step for step, _ in read_scalars(run_dir)["charts/SPS"]]
    assert steps == [batch, 2 * batch, 3 * batch, 4 * batch]


def test_checkpoint_killed_mid_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    child = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        import lv_happo_mpe as lv
        lv.save_checkpoint({str(path)!r}, {{"iteration": 1}})
        real_save = torch.save
        def dying_save(obj, f, *args, **kwargs):  # writes part of the file, then the process is killed
            with open(f, "wb") as out:
                out.write(b"PK\\x03\\x04 half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        lv.save_checkpoint({str(path)!r}, {{"iteration": 2, "weights": torch.zeros(1000)}})
        """
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoint.pt.tmp").exists()  # the torn write
    assert torch.load(path, weights_only=False) == {"iteration": 1}  # the previous checkpoint, whole


@pytest.mark.parametrize(
    "signum, code, vector_env",
    [
        (signal.SIGINT, 130, "sync"),
        (signal.SIGTERM, 143, "sync"),
        (signal.SIGINT, 130, "async"),
        (signal.SIGTERM, 143, "async"),
    ],
)
def test_interrupt_writes_a_checkpoint_that_resumes(tmp_path, signum, code, vector_env):
    flags, batch = TINY["lv_happo_mpe.py"]
    flags = [*flags, "--vector-env", vector_env]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "lv_happo_mpe.py"), *flags, "--total-timesteps", "10000000"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
        start_new_session=True,
    )
    assert process.stdout.readline().startswith("global_step=")  # training is under way
    os.killpg(process.pid, signum)  # to the whole process group, as a terminal's Ctrl-C (async workers included)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code and "Traceback" not in stderr, stderr
    assert "stopping after this iteration" in stderr
    command = re.search(r"resume with: python (.*)", stdout).group(1).split()
    checkpoint = torch.load(tmp_path / command[-1], weights_only=False)
    assert checkpoint["global_step"] == checkpoint["iteration"] * batch >= batch
    # the printed command resumes (here with a total a little past the checkpoint)
    total = ["--total-timesteps", str(checkpoint["global_step"] + batch)]
    result = subprocess.run(
        [sys.executable, *command, *total], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    steps = [step for step, _ in read_scalars(only_run_dir(tmp_path))["charts/SPS"]]
    assert steps[-1] == checkpoint["global_step"] + batch and len(steps) == len(set(steps))


NAN_WRAPPER = """
import os, runpy, sys, torch
calls, nan_from, nan_to = [0], int(os.environ["NAN_FROM"]), int(os.environ["NAN_TO"])
real_clip, real_save = torch.nn.utils.clip_grad_norm_, torch.save

def clip_with_nan(parameters, *args, **kwargs):  # gradient clipping that sees NaN gradients on some calls
    parameters = list(parameters)
    calls[0] += 1
    if nan_from <= calls[0] < nan_to:
        for p in parameters:
            p.grad.fill_(float("nan"))
    return real_clip(parameters, *args, **kwargs)

def save_and_keep(obj, f, *args, **kwargs):  # keeps every checkpoint, numbered, beside the latest
    real_save(obj, f, *args, **kwargs)
    if str(f).endswith("checkpoint.pt.tmp"):
        real_save(obj, str(f).replace("checkpoint.pt.tmp", f"kept_{obj['iteration']}.pt"))

torch.nn.utils.clip_grad_norm_, torch.save = clip_with_nan, save_and_keep
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_with_nan(tmp_path, nan_from: int, nan_to: int, *flags: str) -> subprocess.CompletedProcess:
    (tmp_path / "wrapper.py").write_text(NAN_WRAPPER)
    return subprocess.run(
        [sys.executable, str(tmp_path / "wrapper.py"), str(ROOT / "lv_happo_mpe.py"), *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, NAN_FROM=str(nan_from), NAN_TO=str(nan_to), CUDA_VISIBLE_DEVICES=""),
    )


def test_non_finite_gradient_skips_the_update_and_keeps_the_parameters(tmp_path):
    flags, batch = TINY["lv_happo_mpe.py"]
    # iteration 1 makes 3 agents x 2 epochs + 5 critic epochs = 11 clipping calls; NaN on the 2nd agent of iteration 2
    result = run_with_nan(
        tmp_path, 14, 15, *flags, "--total-timesteps", str(2 * batch), "--checkpoint-every", "1", "--save-model"
    )
    assert result.returncode == 0, result.stderr
    assert "iteration 2: non-finite loss or gradient of agent" in result.stderr
    run_dir = only_run_dir(tmp_path)
    assert [step for step, _ in read_scalars(run_dir)["charts/skipped_update"]] == [2 * batch]
    before = torch.load(run_dir / "kept_1.pt", weights_only=False)  # the checkpoint of iteration 1
    after = torch.load(run_dir / "lv_happo_mpe.cleanrl_model", weights_only=False)  # the model after iteration 2
    for key in ("actors", "critic", "value_norm"):  # the first agent's finished update was undone too
        for name, tensor in before[key].items():
            assert torch.equal(tensor, after[key][name]), (key, name)
    assert not (run_dir / "kept_2.pt").exists()  # a skipped iteration writes no checkpoint


def test_non_finite_updates_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    flags, batch = TINY["lv_happo_mpe.py"]
    result = run_with_nan(tmp_path, 12, 10**9, *flags, "--total-timesteps", str(10 * batch), "--checkpoint-every", "1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "3 updates in a row met non-finite values" in last and "checkpoint.pt" in last
    assert torch.load(only_run_dir(tmp_path) / "checkpoint.pt", weights_only=False)["iteration"] == 1


def test_resume_with_other_flags_is_refused(tmp_path):
    flags, batch = TINY["lv_happo_mpe.py"]
    assert (
        run_script(
            "lv_happo_mpe.py", *flags, "--total-timesteps", str(batch), "--checkpoint-every", "1", cwd=tmp_path
        ).returncode
        == 0
    )
    checkpoint = str(only_run_dir(tmp_path) / "checkpoint.pt")
    result = run_script("lv_happo_mpe.py", *flags, "--num-agents", "4", "--resume", checkpoint, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = f"{checkpoint} was trained with --num-agents None, not 4: resume with the run's own flags"
    assert result.stderr.strip().splitlines() == [f"lv_happo_mpe.py: error: {message}"]


BAD_FLAGS = [
    ("--checkpoint-every", "-1"),
    ("--max-bad-updates", "0"),
    ("--resume", "no/such/checkpoint.pt"),
]
BAD_FLAG_MESSAGES = [
    "--checkpoint-every must not be negative",
    "--max-bad-updates must be at least 1",
    "--resume no/such/checkpoint.pt: no such file",
]
# flags of another script or method, and combinations that make no sense for this one
FOREIGN_FLAGS = {
    "lv_happo_mpe.py": [(("--kl-threshold", "0.01"), "Unrecognized options: --kl-threshold")],
    "lv_hatrpo_mpe.py": [
        (("--update-epochs", "5"), "Unrecognized options: --update-epochs"),
        (("--cg-iters", "0"), "--cg-iters"),
    ],
    "lv_happo_mamujoco.py": [
        (("--num-agents", "3"), "Unrecognized options: --num-agents"),
        (("--agent-conf", "7x1"), "7x1"),
    ],
    "lv_happo_smac.py": [
        (("--backend", "sc2", "--max-steps", "50"), "SMAC maps set their own"),
        (("--continuous-actions",), "Unrecognized options: --continuous-actions"),
    ],
    "lv_happo_vmas.py": [
        (("--env-id", "balance", "--num-agents", "0"), "--num-agents must be at least 1"),
        (("--backend", "smax"), "Unrecognized options: --backend"),
    ],
}
TABLE = [
    (script, flags, message)
    for script in TINY
    for flags, message in list(zip(BAD_FLAGS, BAD_FLAG_MESSAGES, strict=True)) + FOREIGN_FLAGS[script]
]


@pytest.mark.parametrize("script, flags, message", TABLE)
def test_bad_flags_are_one_line_errors_in_every_script(tmp_cwd, script, flags, message):
    assert_one_line_error(run_script(script, *flags, cwd=tmp_cwd), message, tmp_cwd)


def test_lv_happo_mpe_helpers_round_trip_the_random_streams():
    states = lv_happo_mpe.rng_states()
    first = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    lv_happo_mpe.set_rng_states(states)
    again = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
