"""Tests of lv_happo_vmas.py: the batched adapter, its resets and bootstrapping, then the script run as a user runs
it (what it shares with lv_happo_mpe.py, textually the same, is tested there)."""

import os

import numpy as np
import pytest
import torch
from conftest import assert_contract, assert_one_line_error, flag_error, only_run_dir, parse, read_scalars, run_script

import lv_happo_vmas as lv

SCRIPT = "lv_happo_vmas.py"
TINY = ("--total-timesteps", "1600", "--num-envs", "32", "--num-steps", "25")
CPU = torch.device("cpu")


def vmas_envs(*flags: str, num_envs: int) -> "lv.VMASEnvs":
    return lv.VMASEnvs(parse(lv, *flags), num_envs, 0, CPU)


@pytest.mark.parametrize("env_id", lv.SHARED_REWARD + ("navigation", "dispersion"))
def test_team_reward_is_the_shared_reward_or_the_sum(env_id):
    envs = vmas_envs("--env-id", env_id, "--max-steps", "30", num_envs=16)
    envs.reset()
    torch.manual_seed(0)
    differ = False
    for _ in range(30):
        actions = torch.rand(16, len(envs.agents), max(envs.act_dims)) * 2 - 1
        agent_actions = [actions[:, i, :dim] for i, dim in enumerate(envs.act_dims)]
        _, rewards, _, _, _ = envs.env.step(agent_actions)
        rewards = torch.stack([r.reshape(16) for r in rewards], 1)
        differ |= bool((rewards != rewards[:, :1]).any())
    assert differ == (env_id not in lv.SHARED_REWARD)  # the table says which scenarios share one reward


def test_padded_observations_and_joined_state():
    envs = vmas_envs("--env-id", "simple_adversary", num_envs=4)  # agents of different observation sizes
    obs, state = envs.reset()
    assert envs.obs_dims == [8, 10, 10] and obs.shape == (4, 3, 10) and state.shape == (4, 28)
    assert (obs[:, 0, 8:] == 0).all()
    torch.testing.assert_close(state, torch.cat([obs[:, 0, :8], obs[:, 1], obs[:, 2]], -1))


def test_environments_reset_on_their_own_and_bootstrap_exactly():
    gamma, lam = 0.9, 0.8
    envs = vmas_envs("--num-agents", "3", "--max-steps", "4", num_envs=3)  # episodes of 4 steps
    _, state = envs.reset()
    envs.env.steps[1], envs.env.steps[2] = 1, 2  # environments 1 and 2 start into their episodes
    torch.manual_seed(0)
    states, rewards, truncs, finals = [], [], [], []
    for _ in range(6):
        states.append(state)
        _, state, reward, terminated, truncated, final_state = envs.step(torch.rand(3, 3, 2) * 2 - 1)
        assert not terminated.any()
        rewards.append(reward)
        truncs.append(truncated)
        finals.append(final_state)
    truncs = torch.stack(truncs).float()
    assert truncs.T.tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 1]]  # ends at own steps
    for t, env_idx in truncs.nonzero().tolist():  # the final state is not the next episode's first state
        assert not torch.equal(finals[t][env_idx], states[t + 1][env_idx] if t + 1 < 6 else state[env_idx])

    def value(s: torch.Tensor) -> torch.Tensor:  # any fixed function of the state will do
        return s.sum(-1) / 10

    states, rewards, finals = torch.stack(states), torch.stack(rewards), torch.stack(finals)
    adv = lv.compute_gae(rewards, value(states), value(finals), truncs, gamma, lam)  # finals: the states reached
    for env_idx in range(3):  # by hand: walk back through each environment's own episodes
        expected, running = [0.0] * 6, 0.0
        for t in reversed(range(6)):
            if truncs[t, env_idx]:
                next_v, running = value(finals[t, env_idx]).item(), 0.0  # bootstrap from the true final state
            else:
                next_v = value(states[t + 1, env_idx] if t + 1 < 6 else state[env_idx]).item()
            delta = rewards[t, env_idx].item() + gamma * next_v - value(states[t, env_idx]).item()
            running = delta + gamma * lam * running
            expected[t] = running
        torch.testing.assert_close(adv[:, env_idx], torch.tensor(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "env_id, flags, num_agents",
    [
        ("simple_spread", ("--num-agents", "3", "--save-model", "--eval-every", "1", "--eval-episodes", "4"), 3),
        ("balance", ("--factor", "raw", "--no-continuous-actions"), 3),
    ],
)
def test_end_to_end_logs_the_contract(tmp_cwd, env_id, flags, num_agents):
    result = run_script(SCRIPT, "--env-id", env_id, *TINY, *flags, cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    assert_contract(scalars, num_agents, [800, 1600])
    if env_id == "simple_spread":  # every episode is truncated at 25 steps, all 32 environments at once
        assert [value for _, value in scalars["charts/episodic_length"]] == [25.0] * 64
        assert [step for step, _ in scalars["eval/episodic_return"]] == [800, 1600]
        assert "eval: episodic_return " in result.stdout


def test_trains_without_moviepy(tmp_cwd, monkeypatch):
    fake = tmp_cwd / "fake" / "moviepy"  # a moviepy that cannot be imported, first on the path
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no moviepy here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))
    result = run_script(SCRIPT, *TINY, cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr  # only --capture-video imports it


def test_capture_video_writes_a_video(tmp_cwd):
    result = run_script(SCRIPT, *TINY, "--capture-video", "--eval-episodes", "2", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    assert list((tmp_cwd / "videos").rglob("*.mp4"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--env-id", "simple_spreadd"), "unknown VMAS scenario --env-id 'simple_spreadd'"),
        (("--num-agents", "0"), "--num-agents must be a positive number"),
        (("--max-steps", "0"), "--max-steps must be a positive number"),
        (("--factor-clip", "inf"), "--factor-clip must be a positive number, got inf"),
        (("--num-minibatches", "100000000"), "exceeds the batch"),
        (("--vector-env", "async"), "Unrecognized options: --vector-env"),
    ],
)
def test_bad_flags_are_refused(flags, message):
    assert message in flag_error(lv, *flags)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ("--num-agents", "4"),
            "simple_speaker_listener refuses these settings (it always has 2 agents): try another --num-agents",
        ),
        (("--share-actor",), "--share-actor needs agents of one size: observations of [5, 13], actions of [5, 2]"),
    ],
)
def test_settings_the_scenario_refuses_end_in_one_line_before_anything_is_written(tmp_cwd, flags, message):
    result = run_script(SCRIPT, "--env-id", "simple_speaker_listener", *flags, cwd=tmp_cwd, timeout=120)
    assert_one_line_error(result, message, tmp_cwd)
    assert not list(tmp_cwd.iterdir())


def test_short_learning_run_beats_random_policy(tmp_cwd):
    envs = vmas_envs("--num-agents", "3", num_envs=200)
    envs.reset()
    torch.manual_seed(0)
    random_return = torch.zeros(200)
    for _ in range(25):
        random_return += envs.step(torch.rand(200, 3, 2) * 2 - 1)[2]
    random_return = random_return.mean().item()

    result = run_script(SCRIPT, "--num-agents", "3", "--total-timesteps", "614400", cwd=tmp_cwd, timeout=900)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    last = [value for step, value in scalars["charts/episodic_return"] if step > 614400 - 25600 * 4]
    # about -134 against -142 here (standard error 0.7): 24 iterations are early days on VMAS's scale
    assert np.mean(last) > random_return + 4, (np.mean(last), random_return)


def test_evaluation_during_training_leaves_training_untouched(tmp_path):
    # VMAS keeps one random state for all its environments: the evaluation batch must not move training's resets
    flags = ("--num-envs", "16", "--num-steps", "25", "--max-steps", "10", "--total-timesteps", "1600", "--seed", "3")
    logged = []
    for name, extra in (("plain", ()), ("evaluated", ("--eval-every", "1", "--eval-episodes", "4"))):
        (tmp_path / name).mkdir()
        result = run_script(SCRIPT, *flags, *extra, cwd=tmp_path / name)
        assert result.returncode == 0, result.stderr
        scalars = read_scalars(only_run_dir(tmp_path / name))
        logged.append([scalars[tag] for tag in ("charts/episodic_return", "losses/policy_loss", "losses/value_loss")])
    assert logged[0] == logged[1]
