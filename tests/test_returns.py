"""The estimator the update relies on, in every script that shares it: a truncated episode bootstraps from its true
final state, a terminated one from nothing, and the value normalization takes on each iteration's targets."""

import importlib

import numpy as np
import pytest
import torch
from conftest import parse
from torch import nn

SHARING = ["lv_happo_mpe", "lv_hatrpo_mpe", "lv_happo_mamujoco", "lv_happo_vmas"]
GYM = ["lv_happo_mpe", "lv_hatrpo_mpe", "lv_happo_mamujoco"]


class Constant(nn.Module):
    """A critic that values every state at 10."""

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.full((*states.shape[:-1], 1), 10.0)


def identity(value_norm: nn.Module) -> nn.Module:
    """Running statistics of mean 0 and std 1: values pass through unchanged."""
    value_norm.stats.copy_(torch.tensor([0.0, 1.0, 1.0]))
    return value_norm


@pytest.mark.parametrize("script", SHARING)
def test_truncation_bootstraps_and_termination_does_not(script):
    # 2 steps x 2 envs, reward 1, V = 10: env 0 truncated at step 0 (its final state is worth 10), env 1 terminated
    # at step 0 (worth 0); gamma 0.5, lambda 1; step 1 goes on in both, bootstrapping from the state it reached
    module = importlib.import_module(script)
    args = parse(module, "--gamma", "0.5", "--gae-lambda", "1")
    states = next_states = torch.zeros(2, 2, 3)
    rewards, terminations, dones = (
        torch.ones(2, 2),
        torch.tensor([[0.0, 1.0], [0, 0]]),
        torch.tensor([[1.0, 1], [0, 0]]),
    )
    rollout = (states, next_states, rewards, terminations, dones)
    advantages, returns, values = module.advantages_and_returns(Constant(), identity(module.ValueNorm()), rollout, args)
    # step 0: 1 + 0.5 * 10 - 10 = -4 (truncated, no GAE across the reset) and 1 - 10 = -9 (terminated)
    # step 1: 1 + 0.5 * 10 - 10 = -4 in both
    torch.testing.assert_close(advantages, torch.tensor([[-4.0, -9.0], [-4.0, -4.0]]))
    torch.testing.assert_close(returns, advantages + 10)
    torch.testing.assert_close(values, torch.full((2, 2), 10.0))


@pytest.mark.parametrize("script", SHARING)
def test_the_critics_outputs_are_normalized_values(script):
    # running mean 2 and std 3 (mean of squares 13): the critic's 10 is the value 10 * 3 + 2 = 32, also where a
    # truncated episode bootstraps; one step of reward 1, gamma 0.5: A = 1 + 0.5 * 32 - 32 = -15
    module = importlib.import_module(script)
    value_norm = module.ValueNorm()
    value_norm.stats.copy_(torch.tensor([2.0, 13.0, 1.0]))
    rollout = (torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1))
    args = parse(module, "--gamma", "0.5", "--gae-lambda", "1")
    advantages, _, values = module.advantages_and_returns(Constant(), value_norm, rollout, args)
    torch.testing.assert_close(values, torch.tensor([[32.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[-15.0]]))


@pytest.mark.parametrize("script", SHARING)
def test_value_normalization_takes_on_the_targets(script):
    module = importlib.import_module(script)
    value_norm = module.ValueNorm()
    rollout = (
        torch.zeros(3, 2, 4),
        torch.zeros(3, 2, 4),
        torch.full((3, 2), 5.0),
        torch.zeros(3, 2),
        torch.zeros(3, 2),
    )
    _, returns, _ = module.advantages_and_returns(Constant(), value_norm, rollout, parse(module))
    mean, _ = value_norm.mean_std()
    torch.testing.assert_close(mean, returns.mean(), rtol=1e-4, atol=1e-4)  # debiased: one update is its mean


@pytest.mark.parametrize("script", GYM)
def test_reached_states_are_the_final_ones_where_truncated(script):
    module = importlib.import_module(script)
    next_state = torch.tensor([[0.0, 0.0], [7.0, 8.0]])  # env 0 already reset: its next episode's first state
    infos = {"final_obs": np.array([{"state": np.array([1.0, 2.0])}, None], dtype=object)}
    reached = module.reached_states(next_state, np.array([True, False]), infos)
    torch.testing.assert_close(reached, torch.tensor([[1.0, 2.0], [7.0, 8.0]]))
    assert next_state[0].tolist() == [0.0, 0.0]  # the observation the next step acts on is left alone


@pytest.mark.parametrize("state_type", ["EP", "FP"])
def test_smac_values_each_agent_with_the_fp_state(state_type):
    # the same two steps as above, with 3 agents: EP gives one value per step (C = 1), FP one per agent (C = 3)
    module = importlib.import_module("lv_happo_smac")
    args = parse(module, "--gamma", "0.5", "--gae-lambda", "1", "--state-type", state_type)
    states, obs = torch.zeros(2, 2, 5), torch.zeros(2, 2, 3, 4)
    rewards, terminations, dones = torch.ones(2, 2), torch.tensor([[0.0, 1], [0, 0]]), torch.tensor([[1.0, 1], [0, 0]])
    rollout = (states, obs, states, obs, rewards, terminations, dones)
    in_dim = 5 if state_type == "EP" else 5 + 4 + 3
    critic = nn.Sequential(module.CriticInput(nn.LayerNorm(in_dim), nn.Linear(in_dim, 8), state_type), Constant())
    advantages, returns, values = module.advantages_and_returns(critic, identity(module.ValueNorm()), rollout, args)
    agents = 1 if state_type == "EP" else 3
    expected = torch.tensor([[-4.0, -9.0], [-4.0, -4.0]])[..., None].expand(2, 2, agents)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, advantages + 10)
