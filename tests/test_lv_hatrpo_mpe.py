"""Tests of lv_hatrpo_mpe.py: the trust-region step, then the script run as a user runs it (what it shares with
lv_happo_mpe.py, textually the same, is tested there)."""

import numpy as np
import pytest
import torch
from conftest import assert_contract, flag_error, only_run_dir, parse, random_policy_returns, read_scalars, run_script
from torch.distributions import kl_divergence
from torch.nn.utils import parameters_to_vector

import lv_hatrpo_mpe as lv

SCRIPT = "lv_hatrpo_mpe.py"
TINY = ("--total-timesteps", "200", "--num-envs", "2", "--num-steps", "50")


def step_batch(continuous: bool, seed: int = 0) -> tuple:
    torch.manual_seed(seed)
    actor = lv.Actor(6, 3, continuous, (16,))
    obs = torch.randn(256, 6)
    with torch.no_grad():
        dist = actor.distribution(obs)
        actions = dist.sample()
        logprob = dist.log_prob(actions)
    return actor, obs, actions, logprob, torch.randn(256), torch.rand(256) * 1.5


@pytest.mark.parametrize("continuous", [True, False])
def test_trpo_step_stays_in_the_trust_region_and_improves(continuous):
    actor, obs, actions, logprob, advantages, factor = step_batch(continuous)
    args = parse(lv)
    with torch.no_grad():
        old_dist = actor.distribution(obs)
    before = lv.surrogate(logprob, logprob, advantages, factor).item()
    kl_logged, line_search_steps, accepted = lv.trpo_step(actor, obs, actions, logprob, advantages, factor, args)
    with torch.no_grad():
        new_dist = actor.distribution(obs)
        kl = kl_divergence(old_dist, new_dist).mean().item()
        after = lv.surrogate(new_dist.log_prob(actions), logprob, advantages, factor).item()
    assert accepted == 1.0 and 1 <= line_search_steps <= args.ls_steps
    assert 0 < kl <= args.kl_threshold and kl_logged == pytest.approx(kl, rel=1e-5)
    assert after > before


def test_conjugate_gradient_solves_a_known_system():
    # [[4, 1], [1, 3]] x = [1, 2]: x = [1/11, 7/11], reached in 2 steps (the system's size)
    matrix, g = torch.tensor([[4.0, 1.0], [1.0, 3.0]]), torch.tensor([1.0, 2.0])
    x = lv.conjugate_gradient(lambda v: matrix @ v, g, iters=10)
    torch.testing.assert_close(x, torch.tensor([1 / 11, 7 / 11]))
    assert not torch.allclose(lv.conjugate_gradient(lambda v: matrix @ v, g, iters=1), x)  # one step is not enough


@pytest.mark.parametrize("continuous", [True, False])
def test_full_step_meets_the_kl_bound_to_second_order(continuous):
    # the first trial, coef 1, is scaled so that the quadratic model's KL is delta: with a small delta and little
    # damping the true KL is close to it (a full step without the factor 2 gives delta / 2, without the root far off)
    actor, obs, actions, logprob, advantages, factor = step_batch(continuous)
    args = parse(lv, "--kl-threshold", "1e-4", "--cg-damping", "1e-3", "--accept-ratio", "1e9")
    trials = []
    search = lv.line_search
    with torch.no_grad():
        old_dist = actor.distribution(obs)

    def record(trial, expected_improve, args):
        trials.append(trial(1.0)[0].item())  # the KL of the full step
        return search(trial, expected_improve, args)

    lv.line_search = record
    try:
        lv.trpo_step(actor, obs, actions, logprob, advantages, factor, args)
    finally:
        lv.line_search = search
    assert trials and trials[0] == pytest.approx(1e-4, rel=0.05)  # 0.998 and 0.984 of it here
    with torch.no_grad():  # nothing accepted (accept ratio 1e9): the old parameters are back
        assert kl_divergence(old_dist, actor.distribution(obs)).mean().item() == 0.0


def test_line_search_rejects_steps_over_the_bound_or_without_improvement_and_backs_off():
    args = parse(lv, "--kl-threshold", "0.01", "--backtrack-coef", "0.8", "--ls-steps", "10", "--accept-ratio", "0.5")
    tried = []

    def over_the_bound(coef):  # KL 0.02 coef: under 0.01 from coef 0.5 down; improvement as predicted
        tried.append(coef)
        return torch.tensor(0.02 * coef), torch.tensor(coef)

    coef, steps, kl = lv.line_search(over_the_bound, torch.tensor(1.0), args)
    assert tried == pytest.approx([1.0, 0.8, 0.64, 0.512, 0.4096])  # backed off by 0.8 each time
    assert (coef, steps, kl) == (pytest.approx(0.4096), 5, pytest.approx(0.008192))
    # under the bound but never improving, or improving by less than half the prediction: nothing accepted
    assert lv.line_search(lambda c: (torch.tensor(0.0), torch.tensor(-1.0)), torch.tensor(1.0), args) == (0.0, 10, 0.0)
    assert lv.line_search(lambda c: (torch.tensor(0.0), torch.tensor(0.4 * c)), torch.tensor(1.0), args)[0] == 0.0


@pytest.mark.parametrize("continuous", [True, False])
def test_trpo_step_without_improvement_keeps_the_parameters(continuous):
    actor, obs, actions, logprob, advantages, factor = step_batch(continuous)
    before = parameters_to_vector(actor.parameters()).clone()
    # no signal: all advantages zero
    result = lv.trpo_step(actor, obs, actions, logprob, torch.zeros(256), factor, parse(lv))
    assert result[2] == 0.0 and torch.equal(parameters_to_vector(actor.parameters()), before)
    # a line search that accepts nothing (no step improves by 1e9 times its linear prediction)
    args = parse(lv, "--accept-ratio", "1e9")
    assert lv.trpo_step(actor, obs, actions, logprob, advantages, factor, args) == (0.0, args.ls_steps, 0.0)
    assert torch.equal(parameters_to_vector(actor.parameters()), before)
    # a non-finite surrogate is no step at all
    assert lv.trpo_step(actor, obs, actions, logprob, advantages * np.nan, factor, parse(lv)) is None
    assert torch.equal(parameters_to_vector(actor.parameters()), before)


def test_end_to_end_logs_the_contract_and_the_trust_region(tmp_cwd):
    flags = ("--env-id", "simple_speaker_listener_v4", "--no-continuous-actions", "--factor", "raw", "--save-model")
    result = run_script(SCRIPT, *TINY, *flags, "--eval-episodes", "2", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    assert_contract(scalars, 2, [100, 200])
    for k in range(2):
        assert all(0 <= value <= 0.005 for _, value in scalars[f"hatrpo/kl_{k}"])
        assert all(value in (0.0, 1.0) for _, value in scalars[f"hatrpo/accepted_{k}"])
        assert all(1 <= value <= 10 for _, value in scalars[f"hatrpo/line_search_steps_{k}"])
    assert "eval/episodic_return" in scalars


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--kl-threshold", "0"), "--kl-threshold must be a positive number"),
        (("--kl-threshold", "nan"), "--kl-threshold must be a positive number, got nan"),
        (("--cg-iters", "0"), "--cg-iters must be a positive number"),
        (("--cg-damping", "inf"), "--cg-damping must be a finite number"),
        (("--backtrack-coef", "1.5"), "--accept-ratio and --backtrack-coef must lie in [0, 1]"),
        (("--accept-ratio", "-0.5"), "--accept-ratio must be a finite number, not negative"),
        (("--update-epochs", "5"), "Unrecognized options: --update-epochs"),  # a HAPPO flag is not accepted silently
        (("--ent-coef", "0.01"), "Unrecognized options: --ent-coef"),
        (("--seed", "-3"), "--seed must be"),
    ],
)
def test_bad_flags_are_refused(flags, message):
    assert message in flag_error(lv, *flags)


def test_short_learning_run_beats_random_policy(tmp_cwd):
    random_returns = random_policy_returns(lv.MultiAgentArrays(parse(lv, "--num-agents", "3")), 100, 0, 1)
    result = run_script(SCRIPT, "--num-agents", "3", "--total-timesteps", "100000", "--seed", "1", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    returns = read_scalars(only_run_dir(tmp_cwd))["charts/episodic_return"]
    final = np.mean([value for step, value in returns if step > 90_000])  # 400 episodes: a standard error near 1
    # about -68 against -78: the trust region moves slower than HAPPO's epochs at first
    assert final > np.mean(random_returns) + 5, (final, np.mean(random_returns))
