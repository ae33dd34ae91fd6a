"""Tests of lv_hatrpo_mpe.py: conjugate gradient, Fisher-vector products, the trust-region step, the script."""

import numpy as np
import pytest
import torch
from conftest import (
    CONTRACT,
    PER_POSITION,
    assert_logged_and_finite,
    assert_one_line_error,
    only_run_dir,
    random_policy_returns,
    read_scalars,
    run_script,
)
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

import lv_hatrpo_mpe as lv

SCRIPT = "lv_hatrpo_mpe.py"
TINY = ("--total-timesteps", "400", "--num-envs", "2", "--num-steps", "50", "--critic-epochs", "2")


def test_conjugate_gradient_solves_spd_system():
    torch.manual_seed(0)
    q = torch.randn(8, 8, dtype=torch.float64)
    a = q @ q.T + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    x = lv.conjugate_gradient(lambda v: a @ v, b, iters=10, residual_tol=1e-20)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), atol=1e-8, rtol=1e-8)
    assert torch.linalg.norm(a @ x - b) < 1e-8


def tiny_actor(continuous: bool, std_param: str = "sigmoid") -> lv.Actor:
    torch.manual_seed(1)
    actor = lv.Actor(3, 4, continuous, (5,), std_param).double()
    with torch.no_grad():
        for p in actor.parameters():
            p += 0.5 * torch.randn_like(p)
    return actor


def explicit_fisher(actor: lv.Actor, obs: torch.Tensor, continuous: bool) -> torch.Tensor:
    """The Fisher matrix of the tiny policy, built by autograd, without the code under test."""
    names = [name for name, _ in actor.named_parameters()]
    shapes = [p.shape for p in actor.parameters()]
    theta = parameters_to_vector(actor.parameters()).detach()

    def unflatten(flat: torch.Tensor) -> dict:
        out, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            out[name] = flat[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return out

    if not continuous:
        # F = E_s sum_a p(a|s) grad log p(a|s) grad log p(a|s)^T, enumerating the 4 actions
        fisher = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
        for s in range(obs.shape[0]):
            for a in range(4):

                def logp(flat: torch.Tensor, s: int = s, a: int = a) -> torch.Tensor:
                    logits = functional_call(actor, unflatten(flat), (obs[s : s + 1],), strict=True)
                    return torch.log_softmax(logits, -1)[0, a]

                grad = torch.autograd.functional.jacobian(logp, theta)
                fisher += logp(theta).exp() * torch.outer(grad, grad)
        return fisher / obs.shape[0]

    # Gaussian: F is the Hessian of the mean KL(pi_theta0 || pi_theta) at theta0
    with torch.no_grad():
        old = actor.distribution(obs)
        old = torch.distributions.Normal(old.loc.clone(), old.scale.clone())

    def kl(flat: torch.Tensor) -> torch.Tensor:
        params = unflatten(flat)
        loc = functional_call(actor, params, (obs,), strict=True)
        p = params["std_param"]
        std = 0.5 * torch.sigmoid(p) if actor.std_type == "sigmoid" else p.exp()
        return torch.distributions.kl_divergence(old, torch.distributions.Normal(loc, std)).sum(-1).mean()

    return torch.autograd.functional.hessian(kl, theta)


@pytest.mark.parametrize("continuous, std_param", [(True, "sigmoid"), (True, "log"), (False, "sigmoid")])
def test_fisher_vector_product_matches_explicit_fisher(continuous, std_param):
    actor = tiny_actor(continuous, std_param)
    # functional_call needs forward(): the policy's output layer (the mean or the logits)
    actor.forward = lambda obs: actor.head(actor.net(obs))
    obs = torch.randn(6, 3, dtype=torch.float64)
    fisher = explicit_fisher(actor, obs, continuous)
    old_dist = lv.detached(actor.distribution(obs))
    fvp = lv.fisher_vector_product(actor, obs, old_dist, torch.ones(6, dtype=torch.float64), damping=0.0)
    v = torch.randn(fisher.shape[0], dtype=torch.float64)
    torch.testing.assert_close(fvp(v), fisher @ v, atol=1e-8, rtol=1e-6)
    damped = lv.fisher_vector_product(actor, obs, old_dist, torch.ones(6, dtype=torch.float64), damping=0.1)
    torch.testing.assert_close(damped(v), fisher @ v + 0.1 * v, atol=1e-8, rtol=1e-6)


def step_batch(continuous: bool, seed: int = 0):
    torch.manual_seed(seed)
    actor = lv.Actor(6, 3, continuous, (16,), "sigmoid")
    obs = torch.randn(256, 6)
    with torch.no_grad():
        dist = actor.distribution(obs)
        actions = dist.sample()
        logprob = actor.log_prob_entropy(dist, actions)[0]
    advantages = torch.randn(256)
    factor = torch.rand(256) * 1.5
    mask = (torch.rand(256) > 0.1).float()
    return actor, obs, actions, logprob, advantages, factor, mask


@pytest.mark.parametrize("continuous", [True, False])
def test_trpo_step_stays_in_the_trust_region_and_improves(continuous):
    actor, obs, actions, logprob, advantages, factor, mask = step_batch(continuous)
    args = lv.parse_args([])
    old_dist = lv.detached(actor.distribution(obs))
    before = lv.surrogate(logprob, logprob, advantages, factor, mask).item()
    info = lv.trpo_step(actor, obs, actions, logprob, advantages, factor, mask, args)
    with torch.no_grad():
        new_dist = actor.distribution(obs)
        kl = lv.mean_kl(old_dist, new_dist, mask).item()
        after = lv.surrogate(actor.log_prob_entropy(new_dist, actions)[0], logprob, advantages, factor, mask).item()
    assert info["accepted"] == 1.0 and 1 <= info["line_search_steps"] <= args.ls_steps
    assert 0 < kl <= args.kl_threshold and info["kl"] == pytest.approx(kl, rel=1e-5)
    assert after > before and info["objective"] == pytest.approx(after, rel=1e-5)


@pytest.mark.parametrize("continuous", [True, False])
def test_trpo_step_without_improvement_keeps_the_parameters(continuous):
    actor, obs, actions, logprob, advantages, factor, mask = step_batch(continuous)
    before = parameters_to_vector(actor.parameters()).clone()
    # no signal: all advantages zero
    info = lv.trpo_step(actor, obs, actions, logprob, torch.zeros(256), factor, mask, lv.parse_args([]))
    assert info["accepted"] == 0.0 and torch.equal(parameters_to_vector(actor.parameters()), before)
    # a line search that accepts nothing (no step can improve by 1e9 times its linear prediction)
    args = lv.parse_args([])
    args.accept_ratio = 1e9
    info = lv.trpo_step(actor, obs, actions, logprob, advantages, factor, mask, args)
    assert info["accepted"] == 0.0 and info["line_search_steps"] == args.ls_steps
    assert torch.equal(parameters_to_vector(actor.parameters()), before)


TRUST_REGION = [
    "hatrpo/kl_{}",
    "hatrpo/line_search_steps_{}",
    "hatrpo/accepted_{}",
]


@pytest.mark.parametrize(
    "flags, num_agents",
    [
        (("--num-agents", "1", "--save-model"), 1),
        (("--num-agents", "3", "--factor", "raw"), 3),
        (("--env-id", "simple_speaker_listener_v4", "--no-continuous-actions"), 2),
    ],
)
def test_end_to_end_logs_the_contract(tmp_cwd, flags, num_agents):
    result = run_script(SCRIPT, *TINY, *flags, cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    expected = CONTRACT + [tag.format(k) for tag in PER_POSITION + TRUST_REGION for k in range(num_agents)]
    if "--save-model" in flags:
        expected.append("eval/episodic_return")
    assert_logged_and_finite(scalars, expected)
    assert [step for step, _ in scalars["charts/SPS"]] == [100, 200, 300, 400]
    for k in range(num_agents):
        assert all(value <= 0.005 for _, value in scalars[f"hatrpo/kl_{k}"])
    assert all(value == 1.0 for _, value in scalars["lv/factor_max_0"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--num-agents", "0"), "--num-agents must be at least 1"),
        (("--env-id", "simple_nonsense_v9"), "unknown --env-id"),
        (("--learning-rate", "-0.001"), "--learning-rate must be positive"),
        (("--kl-threshold", "0"), "--kl-threshold must be positive"),
        (("--backtrack-coef", "1.5"), "--backtrack-coef must lie in (0, 1)"),
        (("--update-epochs", "5"), "Unrecognized options"),  # a HAPPO flag, not accepted silently
        (("--ent-coef", "0.01"), "Unrecognized options"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_cwd, flags, message):
    assert_one_line_error(run_script(SCRIPT, *flags, cwd=tmp_cwd, timeout=60), message, tmp_cwd)


def test_short_learning_run_beats_random_policy(tmp_cwd):
    random_returns = random_policy_returns(lv.MultiAgentArrays("simple_spread_v3", 3, True, 25), 100, 0, 1)
    result = run_script(SCRIPT, "--num-agents", "3", "--total-timesteps", "200000", "--seed", "1", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    returns = read_scalars(only_run_dir(tmp_cwd))["charts/episodic_return"]
    final = np.mean([value for step, value in returns if step > 160_000])
    assert final > np.mean(random_returns) + 8, (final, np.mean(random_returns))
