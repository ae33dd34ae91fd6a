"""Tests of lv_happo_mamujoco.py: the MaMuJoCo wrapper, episode ends, and the script run as a user runs it."""

import fcntl
import inspect
import threading

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import (
    assert_contract,
    assert_logged_and_finite,
    assert_one_line_error,
    flag_error,
    only_run_dir,
    parse,
    random_policy_returns,
    read_scalars,
    run_script,
)
from gymnasium_robotics import mamujoco_v1

import lv_happo_mamujoco as lv

SCRIPT = "lv_happo_mamujoco.py"
TINY = ("--total-timesteps", "400", "--num-envs", "2", "--num-steps", "100", "--update-epochs", "2")


def env(*flags: str, render_mode=None) -> "lv.MultiAgentArrays":
    return lv.MultiAgentArrays(parse(lv, *flags), render_mode)


def test_heterogeneous_partition_is_padded():
    humanoid = env("--env-id", "Humanoid", "--agent-conf", "9|8")
    assert humanoid.act_dims == [9, 8] and humanoid.obs_dims[0] != humanoid.obs_dims[1]
    obs, _ = humanoid.reset(seed=0)
    assert obs["obs"].shape == (2, max(humanoid.obs_dims)) and obs["state"].shape == (348,)
    small = int(np.argmin(humanoid.obs_dims))
    assert np.all(obs["obs"][small, humanoid.obs_dims[small] :] == 0)
    dims = zip(humanoid.obs_dims, humanoid.act_dims, strict=True)
    actors = torch.nn.ModuleList(lv.Actor(o, a, (16,)) for o, a in dims)
    action, logprob = lv.act(actors, torch.as_tensor(obs["obs"][None]))
    assert action.shape == (1, 2, 9) and torch.all(action[0, 1, 8:] == 0) and logprob.shape == (1, 2)
    dist = actors[1].distribution(torch.as_tensor(obs["obs"][None, 1]))
    torch.testing.assert_close(dist.log_prob(action[:, 1, :8]), logprob[:, 1])


def test_actors_of_one_shape_act_in_one_pass_with_the_loops_numbers():
    actors = [lv.Actor(30, 2, (16, 16)) for _ in range(5)]
    for actor in actors:  # distinct actors that differ in every parameter, the std included
        torch.nn.init.normal_(actor.std_param)
        torch.nn.init.normal_(actor.net[1].bias)
    obs, stacked = torch.randn(4, 5, 30), lv.stack_actors(actors)
    for deterministic in (False, True):
        torch.manual_seed(3)
        looped = lv.act(actors, obs, deterministic)
        torch.manual_seed(3)
        batched = lv.act(actors, obs, deterministic, stacked)
        for a, b in zip(looped, batched, strict=True):
            torch.testing.assert_close(a, b)
    for i, actor in enumerate(actors):  # the loop's log-probabilities are each actor's own
        torch.testing.assert_close(actor.distribution(obs[:, i]).log_prob(looped[0][:, i]), looped[1][:, i])
    torch.testing.assert_close(looped[0][:, 2], actors[2](obs[:, 2])[0])  # deterministic: the mean
    assert lv.stack_actors([actors[0]] * 3) is None  # a shared actor acts as one
    assert lv.stack_actors([actors[0], lv.Actor(30, 1, (16, 16))]) is None  # sizes differ


def test_global_obs_is_state_plus_one_hot_id():
    cheetah = env("--global-obs")
    obs, _ = cheetah.reset(seed=0)
    assert cheetah.obs_dims == [17 + 6] * 6 and obs["obs"].shape == (6, 23)
    for i in range(6):
        np.testing.assert_array_equal(obs["obs"][i, :17], obs["state"])
        np.testing.assert_array_equal(obs["obs"][i, 17:], np.eye(6)[i])


def test_standardized_obs_follow_the_papers_formula():
    # the paper's get_obs: x_i = (state, one-hot id of i), (x_i - mean(x_i)) / std(x_i); its get_state: the same of
    # the state alone; the final state of a truncated episode is standardized alike
    humanoid = env("--env-id", "Humanoid", "--agent-conf", "17x1", "--global-obs", "--standardize-obs")
    obs, _ = humanoid.reset(seed=0)
    for t in range(3):
        state = humanoid.env.single_agent_env.unwrapped._get_obs()  # float64, as MuJoCo gives it
        for i in range(17):
            x = np.concatenate([state, np.eye(17)[i]])
            np.testing.assert_allclose(obs["obs"][i], (x - np.mean(x)) / np.std(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(obs["state"], (state - np.mean(state)) / np.std(state), rtol=1e-5, atol=1e-6)
        obs, *_ = humanoid.step(np.full((17, 1), 0.1, np.float32))
    np.testing.assert_allclose(obs["obs"].mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(obs["obs"].std(1), 1, atol=1e-5)


def test_local_obs_follow_agent_obsk():
    # HalfCheetah 6x1: agent_obsk 0 sees its own joint only, 1 sees its neighbours too
    near, far = env("--agent-obsk", "0"), env("--agent-obsk", "1")
    assert all(a < b for a, b in zip(near.obs_dims, far.obs_dims, strict=True))
    assert far.obs_dims == [9, 9, 8, 9, 9, 8]


@pytest.mark.parametrize(
    "task, conf, flags",
    [("Humanoid", "9|8", ()), ("HalfCheetah", "6x1", ("--global-obs",)), ("Ant", "8x1", ("--global-obs",))],
)
def test_step_matches_mamujocos_own_step(task, conf, flags):
    # the wrapper steps the robot directly; MaMuJoCo's parallel_env on the same seed and actions gives the same
    # observations (or state), rewards and ends, with actions beyond the bounds clipped alike
    ours = env("--env-id", task, "--agent-conf", conf, *flags)
    parts, edges, globals_ = lv.partition(task, conf)
    factorization = {"partition": parts, "edges": edges, "globals": globals_}
    theirs = mamujoco_v1.parallel_env(task, conf, agent_obsk=1, agent_factorization=factorization)
    obs, _ = ours.reset(seed=3)
    their_obs, _ = theirs.reset(seed=3)
    rng = np.random.default_rng(0)
    for t in range(30):
        action = rng.normal(0, 1, ours.action_space.shape).astype(np.float32)  # often beyond Humanoid's 0.4
        obs, reward, terminated, truncated, _ = ours.step(action)
        their_actions = {
            a: np.clip(action[i, :d], theirs.action_space(a).low, theirs.action_space(a).high)
            for i, (a, d) in enumerate(zip(ours.agents, ours.act_dims, strict=True))
        }
        their_obs, rewards, terminations, truncations, _ = theirs.step(their_actions)
        assert (reward, terminated, truncated) == (rewards["agent_0"], terminations["agent_0"], truncations["agent_0"])
        np.testing.assert_array_equal(obs["state"], theirs.state().astype(np.float32))
        for i, agent in enumerate([] if "--global-obs" in flags else ours.agents):
            np.testing.assert_array_equal(obs["obs"][i, : ours.obs_dims[i]], their_obs[agent].astype(np.float32))


@pytest.mark.parametrize(
    "task, conf, agents, state_dim",
    [("Ant", "8x1", 8, 105), ("Walker2d", "6x1", 6, 17), ("Humanoid", "17x1", 17, 348)],
)
def test_single_joint_partitions(task, conf, agents, state_dim):
    robot = env("--env-id", task, "--agent-conf", conf)
    assert len(robot.agents) == agents and robot.act_dims == [1] * agents
    assert sorted(robot.joint_ids) == list(range(agents))  # every joint of the robot has one agent
    obs, _ = robot.reset(seed=0)
    assert obs["state"].shape == (state_dim,) and obs["obs"].shape == (agents, max(robot.obs_dims))
    obs, reward, _, _, _ = robot.step(np.full((agents, 1), 0.1, np.float32))
    assert np.isfinite(reward) and np.isfinite(obs["obs"]).all()


def test_environments_are_built_one_at_a_time_across_processes():
    # gymnasium-robotics builds a ManySegment task by writing its model to one file of its package and deleting it, so
    # two runs starting together (the benchmark's two workers) crashed on that file; the script holds a lock meanwhile
    built = []
    swimmer = ("--env-id", "ManySegmentSwimmer", "--agent-conf", "3x1")
    builder = threading.Thread(target=lambda: built.append(env(*swimmer)))
    with open(inspect.getfile(mamujoco_v1.parallel_env)) as lock:  # another process's build under way
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder.start()
        builder.join(timeout=3)
        assert builder.is_alive() and not built  # waits for it
    builder.join(timeout=60)
    assert len(built) == 1 and len(built[0].agents) == 3


def test_truncation_keeps_the_true_final_state():
    # a 5-step time limit: the vector env resets in the same step and hands over the final state
    envs = gym.vector.SyncVectorEnv(
        [lv.make_env(parse(lv, "--agent-conf", "2x3", "--max-episode-steps", "5"))],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    obs, _ = envs.reset(seed=0)
    for t in range(5):
        obs, _, terminated, truncated, infos = envs.step(np.full((1, 2, 3), 0.5, np.float32))
        assert not terminated[0] and truncated[0] == (t == 4)
    final_state = infos["final_obs"][0]["state"]
    assert not np.allclose(final_state, obs["state"][0])  # obs is already the next episode's first state
    assert np.abs(final_state[8:]).max() > 0.1  # the final state moved (velocities); a reset one is near zero


def test_gae_bootstraps_truncation_not_termination():
    # one env, 3 steps: a time-limit truncation after t=0 (final state worth 10), a fall after t=2; next_values as
    # the main block builds them: V of the state reached (the final one where truncated), 0 after a termination
    rewards, values = torch.tensor([[1.0], [1.0], [1.0]]), torch.tensor([[2.0], [3.0], [4.0]])
    next_values, dones = torch.tensor([[10.0], [4.0], [0.0]]), torch.tensor([[1.0], [0.0], [1.0]])
    adv = lv.compute_gae(rewards, values, next_values, dones, 0.5, 1.0)
    # t=2: 1 - 4 = -3 (no bootstrap after the fall); t=1: 1 + 0.5 * 4 - 3 + 0.5 * -3 = -1.5;
    # t=0: 1 + 0.5 * 10 - 2 = 4 (the final state's value, not V(s_1) = 3, and no GAE across the reset)
    torch.testing.assert_close(adv, torch.tensor([[4.0], [-1.5], [-3.0]]))


def test_falling_terminates_without_truncation():
    hopper = env("--env-id", "Hopper", "--agent-conf", "3x1")
    hopper.reset(seed=0)
    rng = np.random.default_rng(0)
    for t in range(1000):
        _, _, terminated, truncated, _ = hopper.step(rng.uniform(-1, 1, (3, 1)).astype(np.float32))
        if terminated or truncated:
            break
    assert terminated and not truncated and t < 999


def test_end_to_end_logs_the_contract(tmp_cwd):
    flags = ("--env-id", "Humanoid", "--agent-conf", "9|8", "--global-obs", "--max-episode-steps", "60")
    result = run_script(SCRIPT, *TINY, *flags, "--save-model", "--eval-episodes", "1", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    assert_contract(scalars, 2, [200, 400])
    assert_logged_and_finite(scalars, ["eval/episodic_return"])
    assert all(value <= 60 for _, value in scalars["charts/episodic_length"])  # the time limit, or a fall


def test_shared_actor_of_agents_of_different_sizes_is_refused_before_anything_is_written(tmp_cwd):
    result = run_script(SCRIPT, "--env-id", "Hopper", "--agent-conf", "3x1", "--share-actor", cwd=tmp_cwd)
    message = "--share-actor needs agents of one size: observations of [11, 12, 11], actions of [1, 1, 1] here"
    assert_one_line_error(result, message, tmp_cwd)


def test_capture_video_without_renderer_ends_before_training_in_one_line(tmp_cwd, monkeypatch):
    # GLFW needs a display, which CI has not: rendering fails, and the run says so before it trains
    monkeypatch.setenv("MUJOCO_GL", "glfw")
    monkeypatch.delenv("DISPLAY", raising=False)
    result = run_script(SCRIPT, *TINY, "--capture-video", "--eval-episodes", "1", cwd=tmp_cwd)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "global_step=" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]  # GLFW's own warnings come before it
    assert last.startswith("lv_happo_mamujoco.py: error: cannot build HalfCheetah 6x1 or render it"), result.stderr
    assert "OpenGL" in last  # MuJoCo's own reason: no GL context
    assert not list(tmp_cwd.rglob("*.mp4"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--env-id", "Nope"), "unknown --env-id 'Nope'"),
        (("--env-id", "HalfCheetah", "--agent-conf", "5x1"), "HalfCheetah has no partition --agent-conf '5x1'"),
        (("--env-id", "Ant", "--agent-conf", "9|8"), "Ant has no partition"),
        (("--env-id", "Ant", "--agent-conf", "7x1"), "Ant has no partition --agent-conf '7x1'"),
        (("--critic-learning-rate", "0"), "--critic-learning-rate must be a positive number"),
        (("--agent-obsk", "-1"), "--agent-obsk must be a finite number, not negative"),
        (("--max-episode-steps", "0"), "--max-episode-steps must be a positive number"),
        (("--clip-coef", "nan"), "--clip-coef must be a positive number, got nan"),
        (("--standardize-obs",), "--standardize-obs acts on --global-obs's vectors: add it"),
        (("--num-agents", "3"), "Unrecognized options: --num-agents"),
    ],
)
def test_bad_flags_are_refused(flags, message):
    assert message in flag_error(lv, *flags)


def test_short_learning_run_beats_random_policy(tmp_cwd):
    episode_steps = 200
    cheetah = env("--agent-conf", "2x3", "--max-episode-steps", str(episode_steps))
    random_returns = random_policy_returns(cheetah, 20, -1, 1)
    flags = ("--agent-conf", "2x3", "--max-episode-steps", str(episode_steps), "--total-timesteps", "100000")
    result = run_script(SCRIPT, *flags, "--seed", "1", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    returns = read_scalars(only_run_dir(tmp_cwd))["charts/episodic_return"]
    final = np.mean([value for step, value in returns if step > 80_000])
    assert final > np.mean(random_returns) + 3 * np.std(random_returns) + 20, (final, random_returns)
