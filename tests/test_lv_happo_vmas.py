"""Tests of lv_happo_vmas.py: the batched adapter, its resets and bootstrapping, the loss against the MPE script's,
then the script run as a user runs it."""

import numpy as np
import pytest
import torch
from conftest import (
    CONTRACT,
    PER_POSITION,
    assert_logged_and_finite,
    assert_one_line_error,
    only_run_dir,
    read_scalars,
    run_script,
)

import lv_happo_mpe
import lv_happo_vmas as lv

SCRIPT = "lv_happo_vmas.py"
TINY = ("--total-timesteps", "1600", "--num-envs", "32", "--num-steps", "25")
CPU = torch.device("cpu")


@pytest.mark.parametrize("env_id", lv.SHARED_REWARD + ("navigation", "dispersion"))
def test_team_reward_is_the_shared_reward_or_the_sum(env_id):
    envs = lv.VMASEnvs(env_id, None, True, 16, 30, 0, CPU)
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
    envs = lv.VMASEnvs("simple_adversary", None, True, 4, None, 0, CPU)  # agents of different observation sizes
    obs, state = envs.reset()
    assert envs.obs_dims == [8, 10, 10] and obs.shape == (4, 3, 10) and state.shape == (4, 28)
    assert (obs[:, 0, 8:] == 0).all()
    torch.testing.assert_close(state, torch.cat([obs[:, 0, :8], obs[:, 1], obs[:, 2]], -1))


def test_environments_reset_on_their_own_and_bootstrap_exactly():
    gamma, lam = 0.9, 0.8
    envs = lv.VMASEnvs("simple_spread", 3, True, 3, 4, 0, CPU)  # episodes of 4 steps
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
    adv = lv.compute_gae(
        rewards, value(states), value(state), torch.zeros_like(truncs), truncs, value(finals), gamma, lam
    )
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


@pytest.mark.parametrize("continuous", [True, False])
def test_one_agent_update_loss_equals_the_mpe_scripts(continuous):
    torch.manual_seed(0)
    obs, logprob_old = torch.randn(64, 14), torch.randn(64) * 0.1 - 1.0
    actions = torch.randn(64, 2) if continuous else torch.randint(0, 5, (64,))
    adv, factor, mask = torch.randn(64), torch.rand(64) * 2, (torch.rand(64) > 0.1).float()
    losses = []
    for module in (lv, lv_happo_mpe):
        torch.manual_seed(1)
        actor = module.Actor(14, 2 if continuous else 5, continuous, (32, 32), "sigmoid")
        newlogprob, entropy = actor.log_prob_entropy(actor.distribution(obs), actions)
        m_used = module.factor_used(factor, "clipped", 1.0)
        loss = module.actor_loss(newlogprob, logprob_old, adv, m_used, mask, 0.2) - 0.01 * module.masked_mean(
            entropy, mask
        )
        loss.backward()
        losses.append((loss.item(), [p.grad.clone() for p in actor.parameters()]))
    assert losses[0][0] == losses[1][0]
    for grad_vmas, grad_mpe in zip(losses[0][1], losses[1][1], strict=True):
        torch.testing.assert_close(grad_vmas, grad_mpe, rtol=0, atol=0)


@pytest.mark.parametrize(
    "env_id, flags, num_agents",
    [
        ("simple_spread", ("--num-agents", "3", "--save-model", "--eval-episodes", "4"), 3),
        ("balance", ("--factor", "raw"), 3),
        ("simple_spread", ("--num-agents", "2", "--no-continuous-actions"), 2),
    ],
)
def test_end_to_end_logs_the_contract(tmp_cwd, env_id, flags, num_agents):
    result = run_script(SCRIPT, "--env-id", env_id, *TINY, *flags, cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    per_position = [tag.format(k) for tag in PER_POSITION for k in range(num_agents)]
    assert_logged_and_finite(scalars, CONTRACT + per_position)
    assert [step for step, _ in scalars["charts/SPS"]] == [800, 1600]
    if env_id == "simple_spread":  # every episode is truncated at 25 steps, all 32 environments at once
        assert [value for _, value in scalars["charts/episodic_length"]] == [25.0] * 64
    if "--save-model" in flags:
        assert len(scalars["eval/episodic_return"]) == 4
        assert "eval: mean episodic_return=" in result.stdout


def test_capture_video_writes_a_video(tmp_cwd):
    result = run_script(SCRIPT, *TINY, "--capture-video", "--eval-episodes", "2", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    assert list((tmp_cwd / "videos").rglob("*.mp4"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--env-id", "simple_spreadd"), "unknown VMAS scenario --env-id 'simple_spreadd'"),
        (("--env-id", "simple_speaker_listener", "--num-agents", "4"), "simple_speaker_listener refuses"),
        (("--num-agents", "0"), "--num-agents must be at least 1"),
        (("--max-steps", "0"), "--max-steps must be at least 1"),
        (("--learning-rate", "-1"), "--learning-rate must be positive"),
        (("--num-minibatches", "100000000"), "exceeds the batch"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_cwd, flags, message):
    assert_one_line_error(run_script(SCRIPT, *flags, cwd=tmp_cwd), message, tmp_cwd)


def test_short_learning_run_beats_random_policy(tmp_cwd):
    envs = lv.VMASEnvs("simple_spread", 3, True, 200, None, 0, CPU)
    envs.reset()
    torch.manual_seed(0)
    random_return = torch.zeros(200)
    for _ in range(25):
        random_return += envs.step(torch.rand(200, 3, 2) * 2 - 1)[2]
    random_return = random_return.mean().item()

    result = run_script(SCRIPT, "--num-agents", "3", "--total-timesteps", "1024000", cwd=tmp_cwd, timeout=900)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    last = [value for step, value in scalars["charts/episodic_return"] if step > 1024000 - 25600 * 4]
    # about -129 against -142 here: 40 iterations are early days on VMAS's scale, but ten standard errors clear
    assert np.mean(last) > random_return + 0.05 * abs(random_return), (np.mean(last), random_return)
