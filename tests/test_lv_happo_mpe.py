"""Tests of lv_happo_mpe.py: the math of its pieces, then the script run as a user runs it."""

import importlib
import math
import typing

import numpy as np
import pytest
import torch
from conftest import (
    assert_contract,
    assert_one_line_error,
    flag_error,
    only_run_dir,
    parse,
    random_policy_returns,
    read_scalars,
    run_script,
)

import lv_happo_mpe as lv

SCRIPT = "lv_happo_mpe.py"
TINY = ("--total-timesteps", "200", "--num-envs", "2", "--num-steps", "50", "--update-epochs", "2")
ENV_IDS = typing.get_args(typing.get_type_hints(lv.Args)["env_id"])


# ---------------------------------------------------------------- GAE, the factor, the losses


def test_gae_hand_computed_with_termination_and_truncation():
    # env 0: terminated after t=1, truncated after t=2 (its final state worth 5.0); env 1: no episode end. As the main
    # block builds them, next_values hold V of the state each step reached (the final state where an episode was
    # truncated) and 0 after a termination
    rewards = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 1.0]])
    values = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.5, 0.0], [2.0, 0.0]])
    next_values = torch.tensor([[1.0, 0.0], [0.0, 0.0], [5.0, 0.0], [3.0, 10.0]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    adv = lv.compute_gae(rewards, values, next_values, dones, 0.9, 0.8)
    # env 0, by hand (gamma 0.9, gamma * lambda 0.72):
    #   t=3: 4 + 0.9 * 3.0 - 2.0 = 4.7
    #   t=2: truncated, bootstraps from V(final) = 5.0: 3 + 0.9 * 5.0 - 1.5 = 6.0, and no GAE across the reset
    #   t=1: terminated, no bootstrap: 2 - 1.0 = 1.0
    #   t=0: (1 + 0.9 * 1.0 - 0.5) + 0.72 * 1.0 = 2.12
    # env 1: t=3: 1 + 0.9 * 10 = 10, then 0.72 * 10 = 7.2, 5.184, 3.73248
    expected = torch.tensor([[2.12, 3.73248], [1.0, 5.184], [6.0, 7.2], [4.7, 10.0]])
    torch.testing.assert_close(adv, expected)


def test_factor_clipped_from_above_only():
    factor = torch.tensor([0.2, 0.9, 1.0, 1.7, 30.0])
    torch.testing.assert_close(lv.factor_used(factor, "clipped", 1.0), torch.tensor([0.2, 0.9, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(lv.factor_used(factor, "clipped", 2.0), torch.tensor([0.2, 0.9, 1.0, 1.7, 2.0]))
    torch.testing.assert_close(lv.factor_used(factor, "raw", 1.0), factor)  # plain HAPPO
    torch.testing.assert_close(lv.factor_used(factor, "none", 1.0), torch.ones(5))  # MAPPO-style


class FixedRatios(torch.nn.Module):
    """An actor whose log-probabilities are a parameter (one per sample) and whose entropy is zero."""

    def __init__(self, ratios: list):
        super().__init__()
        self.logprob = torch.nn.Parameter(torch.log(torch.tensor(ratios)))

    def distribution(self, obs: torch.Tensor) -> "FixedRatios":
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return self.logprob

    def entropy(self) -> torch.Tensor:
        return torch.zeros_like(self.logprob)


def test_agent_step_weights_the_clipped_surrogate_by_the_factor():
    actor, adv = FixedRatios([1.1, 0.5, 1.0, 1.5]), torch.tensor([1.0, -2.0, 3.0, 2.0])
    m_used = torch.tensor([0.5, 1.0, 2.0, 1.0])
    logs = {name: [] for name in ("policy_loss", "entropy", "skipped_steps")}
    samples = [torch.zeros(4, 1), torch.zeros(4), torch.zeros(4), adv, m_used]
    optimizer = torch.optim.SGD(actor.parameters(), lr=0.1)
    lv.agent_step(actor, optimizer, samples, lv.Args(clip_coef=0.2, ent_coef=0.0), logs)
    # min(r A, clip(r) A): 1.1; min(0.5 * -2, 0.8 * -2) = -1.6; 3; min(1.5 * 2, 1.2 * 2) = 2.4
    assert logs["policy_loss"] == [pytest.approx(-(0.5 * 1.1 + 1.0 * -1.6 + 2.0 * 3.0 + 1.0 * 2.4) / 4)]
    # the gradient flows through the unclipped ratios only (samples 0 and 2), each scaled by m_used * A / 4
    torch.testing.assert_close(actor.logprob.grad, torch.tensor([-0.5 * 1.1, 0.0, -2.0 * 3.0, 0.0]) / 4)


def test_critic_loss_per_sample_clipped_and_huber():
    new, old, ret = torch.tensor([2.0, 0.3]), torch.tensor([0.0, 0.0]), torch.tensor([0.5, 0.5])
    # sample 0: unclipped 0.5 * 1.5^2 = 1.125, clipped to 0.2: 0.045, the worse is kept; sample 1: 0.02 vs 0.045
    torch.testing.assert_close(lv.critic_loss(new, old, ret, 0.2), torch.tensor([1.125, 0.045]))
    # an error beyond delta = 10 is linear: 10 * (|20 - 0.5| - 5) = 145 (clipped to 0.2: 0.045)
    new = torch.tensor([20.0, 0.3])
    torch.testing.assert_close(lv.critic_loss(new, old, ret, 0.2), torch.tensor([145.0, 0.045]))


def test_value_norm_tracks_mean_and_std_and_ignores_non_finite_batches():
    norm = lv.ValueNorm()
    torch.manual_seed(0)
    for _ in range(200):
        norm.update(torch.randn(1000) * 4.0 + 10.0)
    mean, std = norm.mean_std()
    assert mean.item() == pytest.approx(10.0, abs=0.05) and std.item() == pytest.approx(4.0, rel=0.02)
    stats = norm.stats.clone()
    norm.update(torch.tensor([1.0, float("nan")]))
    assert torch.equal(norm.stats, stats)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gradient_step_skips_a_non_finite_loss_or_gradient(bad):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    logs = {"skipped_steps": []}
    lv.gradient_step(optimizer, net(torch.ones(1, 3)).sum(), net.parameters(), 10.0, logs)
    weights, state = net.weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[net.weight].items()}
    lv.gradient_step(optimizer, net(torch.full((1, 3), bad)).sum(), net.parameters(), 10.0, logs)
    assert logs["skipped_steps"] == [1]  # counted
    assert torch.equal(net.weight, weights)  # neither the parameters nor Adam's moments moved
    assert all(torch.equal(v, optimizer.state[net.weight][k]) for k, v in state.items())
    lv.gradient_step(optimizer, net(torch.ones(1, 3)).sum(), net.parameters(), 10.0, logs)
    assert logs["skipped_steps"] == [1] and not torch.equal(net.weight, weights)  # and training goes on


# ---------------------------------------------------------------- environment and actors


def test_heterogeneous_agents_are_padded_and_sliced():
    env = lv.MultiAgentArrays(parse(lv, "--env-id", "simple_speaker_listener_v4"))
    assert env.obs_dims == [3, 11] and env.act_dims == [3, 5]
    obs, _ = env.reset(seed=0)
    assert obs["obs"].shape == (2, 11) and obs["state"].shape == (14,)
    assert np.all(obs["obs"][0, 3:] == 0)  # the speaker's 3 values, zero padding after
    obs2, reward, terminated, truncated, _ = env.step(np.full((2, 5), 9.0, np.float32))  # clipped to [0, 1]
    assert isinstance(reward, float) and not terminated and not truncated
    actors = torch.nn.ModuleList([lv.Actor(3, 3, True, (16,)), lv.Actor(11, 5, True, (16,))])
    action, logprob = lv.act(actors, torch.as_tensor(obs["obs"][None]))
    assert action.shape == (1, 2, 5) and torch.all(action[0, 0, 3:] == 0) and logprob.shape == (1, 2)
    # each actor reads its own slice of the observation and of the action: the padding changes nothing
    padded_obs = torch.as_tensor(obs["obs"][None, 0]) + torch.tensor([0, 0, 0] + [7.0] * 8)
    dist = actors[0].distribution(padded_obs)
    torch.testing.assert_close(dist.log_prob(action[:, 0, :3]), logprob[:, 0])


def test_act_samples_each_actor_and_its_mode():
    torch.manual_seed(0)
    obs = torch.randn(64, 2, 11)
    continuous = torch.nn.ModuleList([lv.Actor(11, 2, True, (8,)), lv.Actor(11, 2, True, (8,))])
    action, logprob = lv.act(continuous, obs)
    mode, _ = lv.act(continuous, obs, deterministic=True)
    for i, actor in enumerate(continuous):
        dist = actor.distribution(obs[:, i])
        torch.testing.assert_close(dist.log_prob(action[:, i]), logprob[:, i])
        torch.testing.assert_close(mode[:, i], dist.mean)
    # HARL's std is 0.5 * sigmoid(1) at the start
    torch.testing.assert_close(
        continuous[0].distribution(obs[:1, 0]).stddev, torch.full((1, 2), 0.5 / (1 + math.e**-1))
    )
    discrete = torch.nn.ModuleList([lv.Actor(11, 3, False, (8,)), lv.Actor(11, 5, False, (8,))])
    action, logprob = lv.act(discrete, obs)
    assert action.dtype == torch.int64 and (action[:, 0] < 3).all() and (action[:, 1] < 5).all()
    assert logprob[:, 1].mean().item() == pytest.approx(-math.log(5), abs=0.05)  # output gain 0.01: nearly uniform


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("continuous", [True, False])
def test_wrapper_steps_as_mpe2_parallel_env_does(env_id, continuous):
    # the wrapper drives mpe2's raw AEC env itself (no PettingZoo parallel conversion): the numbers must not change
    env = lv.MultiAgentArrays(
        parse(lv, "--env-id", env_id, "--max-cycles", "7", *([] if continuous else ["--no-continuous-actions"]))
    )
    reference = importlib.import_module(f"mpe2.{env_id}").parallel_env(continuous_actions=continuous, max_cycles=7)
    rng, episode_ends = np.random.default_rng(0), 0
    obs, _ = env.reset(seed=5)
    reference.reset(seed=5)
    for t in range(30):
        if continuous:  # out of bounds on purpose: both clip to the agents' [0, 1]
            action = rng.uniform(-0.5, 1.5, env.action_space.shape).astype(np.float32)
            ref_action = {a: np.clip(action[i, : env.act_dims[i]], 0, 1) for i, a in enumerate(env.agents)}
        else:
            action = np.array([rng.integers(n) for n in env.act_dims])
            ref_action = {a: int(action[i]) for i, a in enumerate(env.agents)}
        obs, reward, terminated, truncated, _ = env.step(action)
        ref_obs, ref_rewards, ref_terminations, ref_truncations, _ = reference.step(ref_action)
        for i, agent in enumerate(env.agents):
            assert np.array_equal(obs["obs"][i, : env.obs_dims[i]], ref_obs[agent])
            assert np.all(obs["obs"][i, env.obs_dims[i] :] == 0)
        assert np.array_equal(obs["state"], reference.state()) and reward == sum(ref_rewards.values())
        assert (terminated, truncated) == (any(ref_terminations.values()), any(ref_truncations.values()))
        if terminated or truncated:
            episode_ends += 1
            env.reset(seed=t)
            reference.reset(seed=t)
    assert episode_ends == 4  # episodes of 7 steps, truncated, never terminated


# ---------------------------------------------------------------- the script, end to end


def test_end_to_end_logs_the_contract_and_the_clipped_factor_bounds_the_variance(tmp_cwd):
    # a tiny clip c: M_used <= c, so with normalized advantages Var[M_used * A] <= c^2 at every position
    flags = ("--num-agents", "3", "--factor-clip", "1e-3", "--seed", "3", "--eval-every", "1", "--eval-episodes", "2")
    result = run_script(SCRIPT, *TINY, *flags, cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    assert_contract(scalars, 3, [100, 200])
    assert any(value != 1.0 for _, value in scalars["lv/factor_max_1"])  # later agents see earlier ratios
    for k in range(3):
        assert all(value <= 1e-6 * (1 + 1e-4) for _, value in scalars[f"lv/adv_variance_{k}"])
    assert any(value > 0 for _, value in scalars["lv/factor_clip_fraction_2"])
    assert [step for step, _ in scalars["eval/episodic_return"]] == [100, 200]  # every iteration and at the end
    assert "global_step=200" in result.stdout


def test_heterogeneous_discrete_raw_factor_with_saved_model_and_video(tmp_cwd):
    pytest.importorskip("moviepy")
    flags = ("--env-id", "simple_speaker_listener_v4", "--no-continuous-actions")
    flags += ("--factor", "raw", "--save-model", "--capture-video", "--eval-episodes", "1")
    result = run_script(SCRIPT, *TINY, *flags, cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_cwd)
    scalars = read_scalars(run_dir)
    assert_contract(scalars, 2, [100, 200])
    assert [step for step, _ in scalars["eval/episodic_return"]] == [200]
    assert (run_dir / "lv_happo_mpe.cleanrl_model").exists() and list((tmp_cwd / "videos").rglob("*.mp4"))
    # the model's run recorded videos; its evaluation records one only when asked here
    videos = sorted((tmp_cwd / "videos").iterdir())
    result = run_script(SCRIPT, "--eval-model", str(run_dir / "lv_happo_mpe.cleanrl_model"), cwd=tmp_cwd)
    assert result.returncode == 0 and sorted((tmp_cwd / "videos").iterdir()) == videos, result.stderr


def test_same_seed_same_losses(tmp_path):
    logged = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        result = run_script(SCRIPT, *TINY, "--seed", "7", cwd=tmp_path / name)
        assert result.returncode == 0, result.stderr
        scalars = read_scalars(only_run_dir(tmp_path / name))
        logged.append({tag: values for tag, values in scalars.items() if not tag.startswith(("charts/SPS", "perf/"))})
    assert logged[0] == logged[1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--num-agents", "0"), "--num-agents must be a positive number, got 0"),
        (("--env-id", "simple_nonsense_v9"), "invalid choice 'simple_nonsense_v9' for argument '--env-id'"),
        (("--env-id", "simple_reference_v3", "--num-agents", "4"), "always has 2 agents"),
        (("--learning-rate", "-0.001"), "--learning-rate must be a positive number"),
        (("--learning-rate", "inf"), "--learning-rate must be a positive number, got inf"),
        (("--ent-coef", "nan"), "--ent-coef must be a finite number, not negative, got nan"),
        (("--max-grad-norm", "nan"), "--max-grad-norm must be a positive number, got nan"),
        (("--clip-coef", "nan"), "--clip-coef must be a positive number, got nan"),
        (("--gamma", "1.5"), "--gamma and --gae-lambda must lie in [0, 1]"),
        (("--seed", "-1"), "--seed must be a finite number, not negative, got -1"),
        (("--seed", "99999999999"), "--seed must be below 2**32"),
        (("--hidden-sizes", "0"), "--hidden-sizes needs positive sizes"),
        (("--num-minibatches", "100000"), "--num-minibatches exceeds the batch"),
        (("--num-envs", "two"), "--num-envs"),
        (("--no-such-flag",), "Unrecognized options: --no-such-flag"),
    ],
)
def test_bad_flags_are_refused(flags, message):
    assert message in flag_error(lv, *flags)


def test_bad_input_ends_before_anything_starts(tmp_cwd):
    # a value the parser cannot read: tyro's own report, without a traceback; a value it reads but we refuse: one line
    result = run_script(SCRIPT, "--num-envs", "two", cwd=tmp_cwd, timeout=120)
    assert result.returncode == 2 and "--num-envs" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_cwd / "runs").exists()
    assert_one_line_error(run_script(SCRIPT, "--seed", "-1", cwd=tmp_cwd, timeout=120), "--seed must be", tmp_cwd)
    result = run_script(SCRIPT, "--resume", "no/such/checkpoint.pt", cwd=tmp_cwd, timeout=120)
    assert_one_line_error(result, "--resume no/such/checkpoint.pt: no such file", tmp_cwd)
    if importlib.util.find_spec("wandb") is None:
        result = run_script(SCRIPT, *TINY, "--track", cwd=tmp_cwd, timeout=120)
        assert_one_line_error(result, "--track needs wandb: pip install wandb", tmp_cwd)


@pytest.mark.parametrize("share", [(), ("--share-actor",)], ids=["separate", "shared"])
def test_short_learning_run_beats_random_policy(tmp_cwd, share):
    random_return = np.mean(random_policy_returns(lv.MultiAgentArrays(parse(lv, "--num-agents", "3")), 100, 0, 1))
    result = run_script(SCRIPT, "--num-agents", "3", "--total-timesteps", "60000", "--seed", "1", *share, cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    returns = read_scalars(only_run_dir(tmp_cwd))["charts/episodic_return"]
    final = np.mean([value for step, value in returns if step > 50_000])  # the last 10 iterations, 400 episodes
    assert final > random_return + 8, (final, random_return)


def test_shared_actor_is_one_network_that_every_agent_uses(tmp_cwd):
    flags = (*TINY, "--share-actor", "--checkpoint-every", "2", "--save-model", "--eval-episodes", "1")
    result = run_script(SCRIPT, *flags, "--num-minibatches", "2", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_cwd)
    assert_contract(read_scalars(run_dir), 3, [100, 200])  # the factor at 3 positions, 1 for the first
    model = torch.load(run_dir / "lv_happo_mpe.cleanrl_model", weights_only=True)["actors"]
    assert {name.split(".")[0] for name in model} == {"0"} and model["0.net.0.weight"].shape == (18 + 3,)  # + id
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert [name for name in checkpoint if name.startswith("actor_optimizer")] == ["actor_optimizer_0"]
    env = lv.MultiAgentArrays(parse(lv, "--share-actor"))
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs["obs"][:, -3:], np.eye(3))  # each agent's observation ends in its id
    assert "differ in size" in flag_error(lv, "--share-actor", "--env-id", "simple_speaker_listener_v4")


def test_a_real_actors_log_ratio_against_its_behaviour_log_probabilities():
    # an actor's log-ratio on its samples is log pi_now - log pi_behaviour; the product of two ratios 2 and 1/4 is
    # 1/2, weighted min(M, 1) (LV-HAPPO) or M (HAPPO); the update's KL estimate and clip fraction are logged per agent
    torch.manual_seed(0)
    actor = lv.Actor(4, 2, True, (8,))
    obs, logs = torch.randn(5, 4), {"approx_kl": [], "clipfrac": []}
    actions = actor.distribution(obs).sample()
    now = actor.distribution(obs).log_prob(actions)
    behaviour_a, behaviour_b = now - torch.log(torch.tensor(2.0)), now + torch.log(torch.tensor(4.0))  # r 2, 1/4
    logratio_a = lv.agent_logratio(actor, (obs, actions, behaviour_a))
    factor = torch.ones(5) * logratio_a.exp()
    torch.testing.assert_close(lv.factor_used(factor, "clipped", 1.0), torch.ones(5))
    torch.testing.assert_close(lv.factor_used(factor, "raw", 1.0), torch.full((5,), 2.0))
    logratio_b = lv.agent_logratio(actor, (obs, actions, behaviour_b))
    torch.testing.assert_close(factor * logratio_b.exp(), torch.full((5,), 0.5))
    lv.log_update(logratio_a, 0.2, logs)
    lv.log_update(logratio_b, 0.2, logs)
    assert logs["clipfrac"] == [1.0, 1.0]
    assert logs["approx_kl"] == pytest.approx([(2 - 1) - math.log(2), (0.25 - 1) - math.log(0.25)])


def test_load_run_gives_the_runs_flags_with_those_set_here_that_may_change(tmp_path):
    run = parse(
        lv, "--num-agents", "4", "--learning-rate", "1e-3", "--total-timesteps", "500", "--checkpoint-every", "2"
    )
    path = str(tmp_path / "lv_happo_mpe.cleanrl_model")
    torch.save({"args": vars(run), "script": "lv_happo_mpe.py", "actors": {}}, path)
    # flags not set here are the run's; those set here that may change (budget, evaluation count) are these
    _, merged = lv.load_run(path, parse(lv, "--eval-model", path, "--eval-episodes", "3", "--total-timesteps", "900"))
    assert (merged.num_agents, merged.learning_rate, merged.checkpoint_every) == (4, 1e-3, 2)
    assert (merged.eval_model, merged.eval_episodes, merged.total_timesteps) == (path, 3, 900)
    # one set here that the run did not have is refused, and so is the file of another script
    with pytest.raises(SystemExit, match="was trained with --num-agents 4: drop the flag or give that"):
        lv.load_run(path, parse(lv, "--eval-model", path, "--num-agents", "5"))
    torch.save({"args": vars(run), "script": "lv_hatrpo_mpe.py", "actors": {}}, path)
    with pytest.raises(SystemExit, match="was written by lv_hatrpo_mpe.py, not lv_happo_mpe.py: use that one"):
        lv.load_run(path, parse(lv, "--resume", path))
