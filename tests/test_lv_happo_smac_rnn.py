"""Tests of lv_happo_smac_rnn.py: the recurrent pieces (resets, chunks, the whole-rollout pass), then the script as a
user runs it. What it shares with lv_happo_smac.py is tested there and kept identical by test_siblings.py; its
checkpoints, resume and --eval-model (trained with a shared actor) are tested in test_long_runs.py."""

import re

import pytest
import torch
from conftest import (
    assert_contract,
    assert_logged_and_finite,
    flag_error,
    only_run_dir,
    parse,
    read_scalars,
    run_script,
)

import lv_happo_smac_rnn as lv

SCRIPT = "lv_happo_smac_rnn.py"
TINY = ("--total-timesteps", "640", "--num-envs", "8", "--num-steps", "40", "--update-epochs", "2")


def rollout(steps: int = 12, envs: int = 3, obs_dim: int = 6, num_actions: int = 5, seed: int = 0) -> tuple:
    """Random observations, available actions (no-op always) and episode starts (one inside a chunk)."""
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randn(steps, envs, obs_dim, generator=generator)
    avail = torch.rand(steps, envs, num_actions, generator=generator) > 0.3
    avail[..., 0] = True
    starts = torch.zeros(steps, envs)
    starts[0], starts[6, 1], starts[9, 2] = 1.0, 1.0, 1.0
    return obs, avail, starts


def test_the_hidden_state_resets_at_an_episode_start_inside_a_chunk():
    torch.manual_seed(0)
    net = lv.RecurrentNet(6, (8, 8), 2, 1.0)
    obs, _, starts = rollout()
    h0 = torch.randn(3, 8)
    with torch.no_grad():
        out, _ = net(obs, h0, starts)
        changed = obs.clone()
        changed[:6, 1] = torch.randn(6, 6)  # env 1's earlier episode only: a new one begins at step 6
        again, _ = net(changed, torch.randn(3, 8), starts)
    torch.testing.assert_close(again[6:, 1], out[6:, 1])
    assert not torch.allclose(again[:6, 1], out[:6, 1])
    torch.testing.assert_close(again[:, 0], out[:, 0])  # env 0 began at step 0: h0 is never read


def test_acting_step_by_step_equals_the_whole_rollout_and_its_chunks():
    # acting stores each step's log-probability and the hidden state entering it; before any update the pass over
    # the whole rollout from its first hidden state gives every agent a ratio of 1 (to float rounding), and chunks
    # run from the stored hidden states (one as long as the rollout, or several) give the same log-probabilities
    torch.manual_seed(1)
    actors = [lv.Actor(6, 5, (8, 8)) for _ in range(2)]
    obs, avail, starts = rollout()
    obs, avail = torch.stack([obs, obs.flip(-1)], 2), torch.stack([avail, avail], 2)  # (T, E, N, ...)
    h = torch.zeros(3, 2, 8)
    hidden, actions, logprobs = [], [], []
    for t in range(12):
        hidden.append(h)
        action, logprob, h = lv.act(actors, obs[t], avail[t], h, starts[t])
        actions.append(action)
        logprobs.append(logprob)
    hidden, actions, logprobs = torch.stack(hidden), torch.stack(actions), torch.stack(logprobs)
    alive = torch.ones(12, 3)
    for agent, actor in enumerate(actors):
        whole = [
            obs[:, :, agent],
            avail[:, :, agent],
            actions[:, :, agent],
            logprobs[:, :, agent],
            alive,
            alive,
            starts,
        ]
        logratio = lv.agent_logratio(actor, agent, whole, hidden[0, :, agent])
        torch.testing.assert_close(logratio, torch.zeros(12, 3), rtol=0, atol=1e-6)  # float rounding only
        for length in (12, 4):
            chunked = [lv.chunks(x, length) for x in whole]
            with torch.no_grad():
                dist, _ = actor.distribution(*chunked[:2], agent, lv.chunks(hidden[:, :, agent], length)[0], chunked[6])
            torch.testing.assert_close(dist.log_prob(chunked[2]), chunked[3], rtol=0, atol=1e-6)


@pytest.mark.parametrize("state_type", ["FP", "EP"])
def test_the_critics_chunks_reproduce_its_values_from_the_stored_hidden_states(state_type, monkeypatch):
    # the critic's pass over the rollout stores the hidden state entering each step; every chunk of its update (two
    # minibatches, two epochs, parameters unchanged) starts from it and gives the values of that pass: the columns
    # of states, observations, hidden states, starts and values line up (C = 3 agents with FP, 1 with EP)
    torch.manual_seed(2)
    args = parse(lv, "--num-steps", "12", "--num-envs", "3", "--num-minibatches", "2", "--update-epochs", "2")
    args.data_chunk_length, args.state_type = 3, state_type  # 12 chunks, 6 a minibatch
    obs, _, starts = rollout()
    obs, states = torch.stack([obs, obs.flip(-1), -obs], 2), torch.randn(12, 3, 5)  # (T, E, N, 6), (T, E, 5)
    columns, in_dim = (3, 5 + 6 + 3) if state_type == "FP" else (1, 5)
    critic = lv.RecurrentNet(in_dim, (8, 8), 1, 1.0)
    critic.base = torch.nn.Sequential(lv.CriticInput(*critic.base[:2], state_type), *critic.base[2:])
    value_norm = lv.ValueNorm(beta=1.0)  # mean 0, std 1, kept: the values pass through unchanged
    value_norm.stats.copy_(torch.tensor([0.0, 1.0, 1.0]))
    ends = torch.zeros(12, 3)
    h0 = torch.randn(3 * columns, 8)  # env 0 begins an episode at step 0, the others go on from h0
    run = (states, obs, states, obs, ends, ends, ends, starts, h0)
    _, returns, values, critic_h, _ = lv.advantages_and_returns(critic, value_norm, run, args)
    seen = []
    monkeypatch.setattr(lv, "critic_loss", lambda new, old, ret, clip: seen.append((new.detach(), old)) or new - new)
    batch = (states, obs, critic_h, starts, returns, values, torch.ones(12, 3, columns))
    logs = {"value_loss": [], "skipped_steps": []}
    lv.update_critic(critic, torch.optim.SGD(critic.parameters(), lr=0.0), value_norm, batch, args, logs)
    assert len(seen) == 4 and all(new.shape == (3, 6, columns) for new, _ in seen)
    for new, old in seen:
        torch.testing.assert_close(new, old, rtol=0, atol=1e-5)


def test_chunks_are_columns_of_consecutive_steps():
    x = torch.arange(12 * 3).reshape(12, 3)  # step t of env e is 3 t + e
    c = lv.chunks(x, 4)
    assert c.shape == (4, 9)
    assert c[:, 0].tolist() == [0, 3, 6, 9] and c[:, 4].tolist() == [13, 16, 19, 22]  # chunk 1 of env 1


def test_end_to_end_logs_the_contract(tmp_cwd):
    flags = ("--env-id", "2s3z", "--state-type", "EP", "--eval-every", "1", "--save-model", "--data-chunk-length", "8")
    result = run_script(SCRIPT, *TINY, *flags, "--eval-episodes", "4", "--num-minibatches", "2", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    assert_contract(scalars, 5, [320, 640])
    assert_logged_and_finite(scalars, ["charts/win_rate", "eval/episodic_return", "eval/win_rate"])
    assert re.search(
        r"^eval: episodic_return -?[\d.]+ ± [\d.]+ \(mean ± std of 4 episodes\), win rate", result.stdout, re.M
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--num-steps", "40", "--data-chunk-length", "15"), "--data-chunk-length must divide --num-steps"),
        (("--data-chunk-length", "0"), "--data-chunk-length must be a positive number"),
        (("--num-envs", "2", "--num-steps", "10", "--num-minibatches", "3"), "--num-minibatches exceeds the chunks"),
        (("--env-id", "4m"), "unknown smax map --env-id '4m'"),
    ],
)
def test_bad_flags_are_refused(flags, message):
    assert message in flag_error(lv, *flags)
