"""Tests of lv_happo_mpe.py: the math of its pieces, then the script run as a user runs it."""

import importlib
import importlib.util
import math

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

import lv_happo_mpe as lv
import lv_hatrpo_mpe as lv_hatrpo

SCRIPT = "lv_happo_mpe.py"
TINY = ("--total-timesteps", "400", "--num-envs", "2", "--num-steps", "50", "--update-epochs", "2")


# ---------------------------------------------------------------- GAE


def test_gae_hand_computed_with_termination_and_truncation():
    # env 0: terminated after t=1, truncated after t=2 (true final state worth 5.0); env 1: no episode end
    rewards = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 1.0]])
    values = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.5, 0.0], [2.0, 0.0]])
    terminations = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    truncations = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    final_values = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [0.0, 0.0]])
    next_value = torch.tensor([3.0, 10.0])
    adv = lv.compute_gae(rewards, values, next_value, terminations, truncations, final_values, 0.9, 0.8)
    # env 0, by hand (gamma 0.9, gamma * lambda 0.72):
    #   t=3: 4 + 0.9 * 3.0 - 2.0 = 4.7
    #   t=2: truncated, bootstraps from V(final) = 5.0: 3 + 0.9 * 5.0 - 1.5 = 6.0 (V(s_3) = 2.0 would give 3.3)
    #   t=1: terminated, no bootstrap: 2 - 1.0 = 1.0
    #   t=0: (1 + 0.9 * 1.0 - 0.5) + 0.72 * 1.0 = 2.12
    # env 1: t=3: 1 + 0.9 * 10 = 10, then 0.72 * 10 = 7.2, 5.184, 3.73248
    expected = torch.tensor([[2.12, 3.73248], [1.0, 5.184], [6.0, 7.2], [4.7, 10.0]])
    torch.testing.assert_close(adv, expected)


def test_gae_termination_wins_over_truncation():
    ones = torch.ones(1, 1)
    adv = lv.compute_gae(ones, 0 * ones, torch.tensor([7.0]), ones, ones, 100 * ones, 0.99, 0.95)
    torch.testing.assert_close(adv, ones)  # r only: a terminated episode never bootstraps


# ---------------------------------------------------------------- the factor


def test_factor_clipped_from_above_only():
    factor = torch.tensor([0.2, 0.9, 1.0, 1.7, 30.0])
    torch.testing.assert_close(lv.factor_used(factor, "clipped", 1.0), torch.tensor([0.2, 0.9, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(lv.factor_used(factor, "clipped", 2.0), torch.tensor([0.2, 0.9, 1.0, 1.7, 2.0]))
    torch.testing.assert_close(lv.factor_used(factor, "raw", 1.0), factor)  # plain HAPPO
    torch.testing.assert_close(lv.factor_used(factor, "none", 1.0), torch.ones(5))  # MAPPO-style


def test_factor_accumulates_unclipped_and_ignores_masked_samples():
    factor = torch.ones(3)
    old = torch.zeros(3)
    mask = torch.tensor([1.0, 1.0, 0.0])
    factor = lv.accumulate_factor(factor, torch.log(torch.tensor([2.0, 0.5, 3.0])), old, mask)
    torch.testing.assert_close(factor, torch.tensor([2.0, 0.5, 1.0]))  # the masked sample keeps M = 1
    factor = lv.accumulate_factor(factor, torch.log(torch.tensor([2.0, 2.0, 2.0])), old, torch.ones(3))
    torch.testing.assert_close(factor, torch.tensor([4.0, 1.0, 2.0]))  # the product is kept above 1
    torch.testing.assert_close(lv.factor_used(factor, "clipped", 1.0), torch.tensor([1.0, 1.0, 1.0]))


def test_actor_loss_weights_by_factor_and_ignores_masked_samples():
    newlogprob = torch.log(torch.tensor([1.1, 0.5, 1.0, 1.0]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -2.0, 3.0, 1000.0])
    factor = torch.tensor([0.5, 1.0, 2.0, 7.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    loss = lv.actor_loss(newlogprob, old, adv, factor, mask, 0.2)
    # min(r A, clip(r) A): 1.1 * 1 = 1.1; min(0.5 * -2, 0.8 * -2) = -1.6; 1 * 3 = 3; masked sample ignored
    expected = -(0.5 * 1.1 + 1.0 * -1.6 + 2.0 * 3.0) / 3
    assert loss.item() == pytest.approx(expected)
    # a masked sample gets no gradient either
    newlogprob = newlogprob.clone().requires_grad_()
    lv.actor_loss(newlogprob, old, adv, factor, mask, 0.2).backward()
    assert newlogprob.grad[3] == 0 and newlogprob.grad[0] != 0


def test_critic_loss_clipped_and_huber():
    new, old, ret = torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.5])
    # unclipped error 0.5 * 1.5^2 = 1.125; clipped prediction 0.2 has error 0.5 * 0.3^2 = 0.045; the max is kept
    assert lv.critic_loss(new, old, ret, 0.2, True, None).item() == pytest.approx(1.125)
    assert lv.critic_loss(new, old, ret, 0.2, False, None).item() == pytest.approx(1.125)
    # Huber with delta 1: 1 * (1.5 - 0.5) = 1.0
    assert lv.critic_loss(new, old, ret, 0.2, False, 1.0).item() == pytest.approx(1.0)
    new = torch.tensor([0.3])  # clipped to 0.2: errors 0.02 vs 0.045, the clipped one is larger
    assert lv.critic_loss(new, old, ret, 0.2, True, None).item() == pytest.approx(0.045)


def test_value_norm_tracks_mean_and_std():
    norm = lv.ValueNorm()
    torch.manual_seed(0)
    for _ in range(200):
        norm.update(torch.randn(1000) * 4.0 + 10.0)
    mean, var = norm.mean_var()
    assert mean.item() == pytest.approx(10.0, abs=0.05) and var.sqrt().item() == pytest.approx(4.0, rel=0.02)
    x = torch.tensor([3.0, -1.0, 12.0])
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x)
    assert torch.equal(lv.ValueNorm(enabled=False).normalize(x), x)


# ---------------------------------------------------------------- environment and networks


def test_heterogeneous_agents_are_padded_and_sliced():
    env = lv.MultiAgentArrays("simple_speaker_listener_v4", None, True, 25)
    assert env.obs_dims == [3, 11] and env.act_dims == [3, 5]
    obs, _ = env.reset(seed=0)
    assert obs["obs"].shape == (2, 11) and obs["state"].shape == (14,)
    assert np.all(obs["obs"][0, 3:] == 0)  # the speaker's 3 values, zero padding after
    obs2, reward, terminated, truncated, _ = env.step(np.full((2, 5), 9.0, np.float32))  # clipped to [0, 1]
    assert isinstance(reward, float) and not terminated and not truncated and obs2["active"].tolist() == [1, 1]
    actors = lv.build_actors(env, tyro_defaults())
    action, logprob = lv.BatchedActors(actors).act(torch.as_tensor(obs["obs"][None]))
    assert action.shape == (1, 2, 5) and torch.all(action[0, 0, 3:] == 0) and logprob.shape == (1, 2)
    # the padding entries of an action do not change its log-probability
    dist = actors[0].distribution(torch.as_tensor(obs["obs"][:1]))
    padded = action[:, 0] + torch.tensor([0, 0, 0, 5.0, 5.0])
    torch.testing.assert_close(actors[0].log_prob_entropy(dist, padded)[0], logprob[:, 0])


def test_discrete_actors_and_std_parametrisations():
    env = lv.MultiAgentArrays("simple_speaker_listener_v4", None, False, 25)
    assert env.act_dims == [3, 5]
    obs = torch.as_tensor(env.reset(seed=0)[0]["obs"])
    actors = lv.build_actors(env, tyro_defaults())
    action, logprob = lv.BatchedActors(actors).act(obs[None])
    assert action.dtype == torch.int64 and 0 <= action[0, 0].item() < 3 and 0 <= action[0, 1].item() < 5
    assert logprob[0, 1].item() == pytest.approx(-math.log(5), abs=0.05)  # output gain 0.01: nearly uniform at start
    gaussian = lv.Actor(4, 2, True, (8,), "sigmoid")
    std = gaussian.distribution(torch.zeros(1, 4)).stddev
    torch.testing.assert_close(std, torch.full((1, 2), 0.5 / (1 + math.exp(-1))))  # HARL: 0.5 * sigmoid(1)
    std = lv.Actor(4, 2, True, (8,), "log").distribution(torch.zeros(1, 4)).stddev
    torch.testing.assert_close(std, torch.ones(1, 2))


def tyro_defaults(*flags: str) -> lv.Args:
    return lv.parse_args(list(flags))


@pytest.mark.parametrize("env_id", ["simple_spread_v3", "simple_speaker_listener_v4"])
@pytest.mark.parametrize("continuous", [True, False])
@pytest.mark.parametrize("std_param", ["sigmoid", "log"])
def test_batched_actors_match_the_actor_modules(env_id, continuous, std_param):
    torch.manual_seed(0)
    env = lv.MultiAgentArrays(env_id, None, continuous, 25)
    actors = lv.build_actors(env, tyro_defaults("--std-param", std_param, "--hidden-sizes", "16", "8"))
    policy = lv.BatchedActors(actors)
    with torch.no_grad():  # weights away from their initial values, then copied in by load
        for p in actors.parameters():
            p += 0.3 * torch.randn_like(p)
    policy.load(actors)
    obs = torch.randn(64, len(actors), max(env.obs_dims))
    for i, actor in enumerate(actors):
        obs[:, i, actor.obs_dim :] = 0  # padding, as the wrapper writes it
    action, logprob = policy.act(obs)
    mode, _ = policy.act(obs, deterministic=True)
    for i, actor in enumerate(actors):
        dist = actor.distribution(obs[:, i])
        torch.testing.assert_close(actor.log_prob_entropy(dist, action[:, i])[0], logprob[:, i], atol=1e-4, rtol=1e-4)
        if continuous:
            torch.testing.assert_close(mode[:, i, : actor.act_dim], dist.mean, atol=1e-5, rtol=1e-5)
            assert torch.all(action[:, i, actor.act_dim :] == 0)
        else:
            assert torch.equal(mode[:, i], dist.probs.argmax(-1)) and torch.all(action[:, i] < actor.act_dim)


@pytest.mark.parametrize("script", [lv, lv_hatrpo])
@pytest.mark.parametrize("env_id", lv.ENV_IDS)
@pytest.mark.parametrize("continuous", [True, False])
def test_wrapper_steps_as_mpe2_parallel_env_does(script, env_id, continuous):
    # the wrapper drives mpe2's raw AEC env itself (no PettingZoo parallel conversion): the numbers must not change
    env = script.MultiAgentArrays(env_id, None, continuous, 7)
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
        assert np.array_equal(obs["state"], reference.state()) and obs["active"].tolist() == [1.0] * len(env.agents)
        assert reward == sum(ref_rewards.values())
        assert (terminated, truncated) == (any(ref_terminations.values()), any(ref_truncations.values()))
        if terminated or truncated:
            episode_ends += 1
            env.reset(seed=t)
            reference.reset(seed=t)
    assert episode_ends == 4  # episodes of 7 steps


def test_episode_truncates_at_max_cycles():
    env = lv.MultiAgentArrays("simple_spread_v3", 3, True, 5)
    env.reset(seed=1)
    flags = [env.step(np.zeros((3, 5), np.float32))[2:4] for _ in range(5)]
    assert flags == [(False, False)] * 4 + [(False, True)]


# ---------------------------------------------------------------- the script, end to end


@pytest.mark.parametrize(
    "flags, num_agents",
    [
        (("--num-agents", "1"), 1),
        (("--num-agents", "3", "--save-model"), 3),
        (("--env-id", "simple_speaker_listener_v4", "--vector-env", "async"), 2),
        (("--env-id", "simple_reference_v3", "--no-continuous-actions", "--factor", "raw"), 2),
    ],
)
def test_end_to_end_logs_the_contract(tmp_cwd, flags, num_agents):
    result = run_script(SCRIPT, *TINY, *flags, cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    expected = CONTRACT + [tag.format(k) for tag in PER_POSITION for k in range(num_agents)]
    if "--save-model" in flags:
        expected.append("eval/episodic_return")
    assert_logged_and_finite(scalars, expected)
    assert not any(tag.endswith(f"_{num_agents}") for tag in scalars if tag.startswith("lv/"))
    # the x-axis is the global joint step: 2 iterations of 2 envs x 50 steps
    assert [step for step, _ in scalars["charts/SPS"]] == [100, 200, 300, 400]
    # the first agent updated always sees M = 1; a later one sees the product of the earlier ratios
    assert all(value == 1.0 for _, value in scalars["lv/factor_max_0"])
    if num_agents > 1:
        assert any(value != 1.0 for _, value in scalars["lv/factor_max_1"])
    if "raw" not in flags:  # normalized advantages and min(M, 1) <= 1: no later position has more variance
        for k in range(1, num_agents):
            for (_, var0), (_, var_k) in zip(
                scalars["lv/adv_variance_0"], scalars[f"lv/adv_variance_{k}"], strict=True
            ):
                assert var_k <= var0 * (1 + 1e-5)
    assert "global_step=400" in result.stdout


def test_clipped_factor_bounds_the_advantage_variance(tmp_cwd):
    # advantages are normalized to variance 1; every agent's M_used <= c scales that variance by at most c^2
    result = run_script(SCRIPT, *TINY, "--factor-clip", "1e-3", "--seed", "3", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    for k in range(3):
        assert all(value <= 1e-6 * (1 + 1e-4) for _, value in scalars[f"lv/adv_variance_{k}"])
    assert any(value > 0 for _, value in scalars["lv/factor_clip_fraction_2"])


def test_same_seed_same_losses(tmp_path):
    logged = []
    for name in ("a", "b"):
        cwd = tmp_path / name
        cwd.mkdir()
        result = run_script(SCRIPT, *TINY, "--seed", "7", cwd=cwd)
        assert result.returncode == 0, result.stderr
        scalars = read_scalars(only_run_dir(cwd))
        logged.append({tag: values for tag, values in scalars.items() if not tag.startswith(("charts/SPS", "perf/"))})
    assert logged[0] == logged[1]


def test_capture_video_writes_evaluation_videos(tmp_cwd):
    pytest.importorskip("moviepy")
    result = run_script(SCRIPT, *TINY, "--capture-video", "--eval-episodes", "1", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    assert list((tmp_cwd / "videos").rglob("*.mp4")), "no video written"
    assert "eval/episodic_return" in read_scalars(only_run_dir(tmp_cwd))


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--num-agents", "0"), "--num-agents must be at least 1"),
        (("--env-id", "simple_nonsense_v9"), "unknown --env-id"),
        (("--learning-rate", "-0.001"), "--learning-rate must be positive"),
        (("--env-id", "simple_reference_v3", "--num-agents", "4"), "always has 2 agents"),
        (("--num-minibatches", "100000"), "exceeds the batch"),
        (("--num-envs", "two"), "--num-envs"),
        (("--no-such-flag",), "Unrecognized options"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_cwd, flags, message):
    assert_one_line_error(run_script(SCRIPT, *flags, cwd=tmp_cwd, timeout=60), message, tmp_cwd)


def test_short_learning_run_beats_random_policy(tmp_cwd):
    random_return = np.mean(random_policy_returns(lv.MultiAgentArrays("simple_spread_v3", 3, True, 25), 100, 0, 1))
    result = run_script(SCRIPT, "--num-agents", "3", "--total-timesteps", "200000", "--seed", "1", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    returns = read_scalars(only_run_dir(tmp_cwd))["charts/episodic_return"]
    final = np.mean([value for step, value in returns if step > 160_000])  # the last 40 iterations, 1600 episodes
    assert final > random_return + 8, (final, random_return)


def test_track_without_wandb_is_one_line(tmp_cwd):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: --track would start a real run")
    result = run_script(SCRIPT, *TINY, "--track", cwd=tmp_cwd, timeout=60)
    assert_one_line_error(result, "--track needs wandb: pip install wandb", tmp_cwd)
