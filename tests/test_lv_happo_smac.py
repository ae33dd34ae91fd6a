"""Tests of lv_happo_smac.py: masks, the SMAX and StarCraft II adapters, then the script run as a user runs it."""

import math
import re
import sys
import types

import numpy as np
import pytest
import torch
from conftest import assert_contract, assert_logged_and_finite, flag_error, only_run_dir, read_scalars, run_script

import lv_happo_smac as lv

SCRIPT = "lv_happo_smac.py"
TINY = ("--total-timesteps", "640", "--num-envs", "8", "--num-steps", "40", "--update-epochs", "2")


@pytest.fixture(scope="module")
def smax_3m() -> "lv.SMAXEnvs":
    return lv.SMAXEnvs("3m", num_envs=16, seed=0, device=torch.device("cpu"))


# ---------------------------------------------------------------- masks


def test_masked_categorical_matches_hand_computation():
    actor = lv.Actor(3, 4, (8,))
    with torch.no_grad():  # logits 1, 2, 3, 4 whatever the observation
        actor.net[-1].weight.zero_()
        actor.net[-1].bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    dist = actor.distribution(torch.randn(1, 3), torch.tensor([[True, False, True, False]]), 0)
    # only actions 0 and 2: p = softmax([1, 3]) = [1, e^2] / (1 + e^2)
    p0, p2 = 1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)
    torch.testing.assert_close(dist.probs, torch.tensor([[p0, 0.0, p2, 0.0]]))
    torch.testing.assert_close(dist.log_prob(torch.tensor([2])), torch.tensor([math.log(p2)]))
    torch.testing.assert_close(dist.entropy(), torch.tensor([-(p0 * math.log(p0) + p2 * math.log(p2))]))


def test_acting_chooses_available_actions_only():
    torch.manual_seed(0)
    actors = torch.nn.ModuleList([lv.Actor(6, 5, (16,)), lv.Actor(6, 5, (16,))])
    obs, avail = torch.randn(2000, 2, 6), torch.rand(2000, 2, 5) < 0.4
    avail[torch.arange(2000), :, torch.randint(0, 5, (2000,))] = True  # at least one available action per agent
    actions, logprobs = lv.act(actors, obs, avail)
    greedy, _ = lv.act(actors, obs, avail, deterministic=True)
    assert avail.gather(-1, actions.unsqueeze(-1)).all() and avail.gather(-1, greedy.unsqueeze(-1)).all()
    for i, actor in enumerate(actors):
        dist = actor.distribution(obs[:, i], avail[:, i], i)
        torch.testing.assert_close(logprobs[:, i], dist.log_prob(actions[:, i]))
        assert torch.equal(greedy[:, i], dist.probs.argmax(-1))


def test_dead_agents_contribute_zero_actor_loss():
    newlogprob = torch.log(torch.tensor([1.1, 0.95, 0.9, 1.0])).requires_grad_()  # inside the clip range
    old, factor = torch.zeros(4), torch.ones(4)
    alive = torch.tensor([1.0, 1.0, 1.0, 0.0])
    adv = torch.tensor([1.0, -2.0, 3.0, 5.0])
    loss = lv.actor_loss(newlogprob, old, adv, factor, alive, 0.2)
    loss.backward()
    assert newlogprob.grad[3] == 0 and (newlogprob.grad[:3] != 0).all()
    changed = lv.actor_loss(newlogprob, old, adv * torch.tensor([1, 1, 1, -1e6]), factor, alive, 0.2)
    assert changed.item() == loss.item()  # the dead agent's sample changes nothing, and the mean is over 3


@pytest.mark.parametrize("state_type", ["EP", "FP"])
def test_critic_input_is_the_two_layers_on_the_state_or_on_every_agents_fp_input(state_type):
    # EP: LayerNorm then Linear of the state; FP: of [state, o_i, one-hot i] for every agent i, computed from the parts
    torch.manual_seed(0)
    state, obs = torch.randn(5, 4, 10) * 3 + 1, torch.randn(5, 4, 3, 6)  # (T, E, state_dim), (T, E, N, obs_dim)
    fp_x = torch.cat([state[..., None, :].expand(5, 4, 3, 10), obs, torch.eye(3).expand(5, 4, 3, 3)], -1)
    x = state[..., None, :] if state_type == "EP" else fp_x  # (T, E, C, D)
    norm, linear = torch.nn.LayerNorm(x.shape[-1]), torch.nn.Linear(x.shape[-1], 8)
    with torch.no_grad():  # a gain and bias of the LayerNorm's own, not 1 and 0
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    weights = torch.randn(5, 4, x.shape[-2], 8)
    outputs, grads = [], []
    for layer in (torch.nn.Sequential(norm, linear), lv.CriticInput(norm, linear, state_type)):
        outputs.append(layer(x if isinstance(layer, torch.nn.Sequential) else (state, obs)))
        norm.zero_grad(), linear.zero_grad()
        (outputs[-1] * weights).sum().backward()
        grads.append([p.grad.clone() for p in (*norm.parameters(), *linear.parameters())])
    assert outputs[1].shape == (5, 4, 1 if state_type == "EP" else 3, 8)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for factored, plain in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(factored, plain, atol=1e-4, rtol=1e-4)


def test_critic_loss_ignores_dead_agents_values():
    new, old, ret = torch.tensor([[1.0, 5.0]]), torch.tensor([[1.0, 5.0]]), torch.tensor([[2.0, -100.0]])
    loss = lv.masked_mean(lv.critic_loss(new, old, ret, 0.2), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(loss, torch.tensor(0.5))


# ---------------------------------------------------------------- SMAX adapter


def test_smax_shapes_masks_and_episode_ends(smax_3m):
    envs = smax_3m
    assert (envs.num_agents, envs.obs_dim, envs.num_actions, envs.state_dim) == (3, 75, 8, 72)
    out = envs.reset()
    assert out["obs"].shape == (16, 3, 75) and out["state"].shape == (16, 72) and out["avail"].dtype == torch.bool
    torch.manual_seed(0)
    ends = {"terminated": 0, "truncated": 0, "won": 0}
    for _ in range(120):  # longer than an episode (100 steps): every environment ends at least once
        actions = torch.distributions.Categorical(probs=out["avail"].float()).sample()
        before = out["obs"]
        out = envs.step(actions)
        dead = out["active"] == 0
        # a dead agent can only stop (SMAX's action 4); the stop action is always available
        assert (
            out["avail"][..., 4].all() and not out["avail"][dead][:, :4].any() and not out["avail"][dead][:, 5:].any()
        )
        assert not (out["terminated"] & out["truncated"]).any() and not (out["won"] & ~out["terminated"]).any()
        done = out["terminated"] | out["truncated"]
        # a finished game's final observation is returned beside the next game's first one
        assert not torch.equal(out["final_obs"][done], out["obs"][done]) or not done.any()
        torch.testing.assert_close(out["final_obs"][~done], out["obs"][~done])
        assert (out["active"][done] == 1).all()  # the new game starts with everyone alive
        for key in ends:
            ends[key] += int(out[key].sum())
        assert before.shape == out["obs"].shape
    assert ends["terminated"] >= 16  # random play loses: wins are checked by the learning run


def test_smax_time_limit_is_a_truncation_with_the_final_state():
    envs = lv.SMAXEnvs("3m", num_envs=4, seed=0, device=torch.device("cpu"), max_steps=5)  # ends at step 6
    out = envs.reset()
    stop = torch.full((4, 3), 4)  # nobody moves or shoots: no side is wiped out in 6 steps
    for t in range(1, 7):
        states = out["state"]
        out = envs.step(stop)
        assert not out["terminated"].any() and out["truncated"].all() == (t == 6)
    torch.testing.assert_close(out["final_state"][:, :3], states[:, :3], atol=0.2, rtol=0)  # the old game's end
    assert not torch.equal(out["final_state"], out["state"])  # beside the new game's start


def test_smax_replay_steps_reproduce_game_0_for_the_visualizer(smax_3m):
    """--capture-video's GIF: JaxMARL's visualizer re-plays each recorded (key, state, actions) with env.step's key
    split; that must land on the state game 0 actually reached, or the drawing would show another game."""
    envs, jax = smax_3m, smax_3m.jax
    out = envs.reset(seed=3)
    torch.manual_seed(0)
    replay = []
    for _ in range(6):
        actions = torch.distributions.Categorical(probs=out["avail"].float()).sample()
        replay.append(envs.replay_step(actions))
        out = envs.step(actions)
    for (key, state, action), (_, reached, _) in zip(replay[:-1], replay[1:], strict=True):
        replayed = envs.env.step_env(jax.random.split(key)[0], state, action)[1]
        np.testing.assert_allclose(replayed.state.unit_positions, reached.state.unit_positions)
        np.testing.assert_allclose(replayed.state.unit_health, reached.state.unit_health)
    assert not np.allclose(replay[0][1].state.unit_positions, replay[-1][1].state.unit_positions)  # they moved


# ---------------------------------------------------------------- StarCraft II adapter, driven by a stand-in


class StandInStarCraft2Env:
    """Has smac's StarCraft2Env methods and return shapes; its episodes and crashes follow a script.

    Agent 1 dies at step 2. Episodes end at step 4: won (info battle_won) or, with episode_limit 4, at the limit.
    `smac_restart_at` returns what smac's step returns after it restarted a crashed game: (0, True, {}).
    """

    instances = 0

    def __init__(self, episode_limit: int = 10, smac_restart_at: int = -1):
        StandInStarCraft2Env.instances += 1
        self.episode_limit, self.smac_restart_at = episode_limit, smac_restart_at
        self.t, self.total_steps, self.closed = 0, 0, False

    def get_env_info(self) -> dict:
        return {"n_agents": 3, "n_actions": 6, "obs_shape": 5, "state_shape": 7, "episode_limit": self.episode_limit}

    def reset(self):
        self.t = 0
        return self.get_obs(), self.get_state()

    def get_obs(self) -> list:
        return [np.full(5, 10 * self.t + i, np.float32) for i in range(3)]

    def get_state(self) -> np.ndarray:
        return np.full(7, self.t, np.float32)

    def get_avail_actions(self) -> list:
        alive = [[0, 1, 1, 1, 1, 1]] * 3
        if self.t >= 2:
            alive[1] = [1, 0, 0, 0, 0, 0]
        return alive

    def step(self, actions: list):
        assert len(actions) == 3
        self.total_steps += 1
        if self.total_steps == self.smac_restart_at:
            return 0, True, {}
        self.t += 1
        if self.t == min(4, self.episode_limit):
            if self.episode_limit == 4:
                return 1.0, True, {"battle_won": False, "episode_limit": True}
            return 2.0, True, {"battle_won": True, "dead_allies": 1, "dead_enemies": 3}
        return 0.5, False, {"battle_won": False}

    def close(self):
        self.closed = True


def test_sc2_adapter_shapes_episode_ends_and_dead_agents():
    envs = lv.SC2Envs([StandInStarCraft2Env(10), StandInStarCraft2Env(4)], torch.device("cpu"))
    out = envs.reset()
    assert out["obs"].shape == (2, 3, 5) and out["state"].shape == (2, 7) and out["avail"].shape == (2, 3, 6)
    actions = torch.ones(2, 3, dtype=torch.long)
    for t in range(1, 5):
        out = envs.step(actions)
        if t < 4:
            assert not (out["terminated"] | out["truncated"]).any()
            torch.testing.assert_close(out["reward"], torch.tensor([0.5, 0.5]))
        assert out["active"][:, 1].tolist() == ([False, False] if t in (2, 3) else [True, True])
    # game 0 won at step 4 (terminated), game 1 hit its limit (truncated): both reset, final state kept
    assert out["terminated"].tolist() == [True, False] and out["truncated"].tolist() == [False, True]
    assert out["won"].tolist() == [True, False] and not out["restarted"].any()
    torch.testing.assert_close(out["final_state"], torch.full((2, 7), 4.0))
    torch.testing.assert_close(out["state"], torch.zeros(2, 7))


def test_sc2_games_report_their_time_limits(monkeypatch):
    """smac puts `episode_limit` in a step's info only with continuing_episode=True; without it a time limit would
    read as a defeat (terminated, not bootstrapped)."""
    made = []

    def starcraft2env(**options) -> StandInStarCraft2Env:
        made.append(options)
        return StandInStarCraft2Env()

    monkeypatch.setitem(sys.modules, "smac.env", types.SimpleNamespace(StarCraft2Env=starcraft2env))
    args = lv.Args(backend="sc2", env_id="3m")
    envs = lv.make_env(args, 2, 5, torch.device("cpu"), replay_dir="videos/x")
    assert envs.num_envs == 2 and [o["seed"] for o in made] == [5, 6]
    assert all(o["continuing_episode"] and o["map_name"] == "3m" and o["replay_dir"] == "videos/x" for o in made)


def test_sc2_adapter_loses_the_episode_of_a_game_that_smac_restarted():
    envs = lv.SC2Envs([StandInStarCraft2Env(smac_restart_at=2), StandInStarCraft2Env()], torch.device("cpu"))
    envs.reset()
    actions = torch.zeros(2, 3, dtype=torch.long)
    envs.step(actions)
    out = envs.step(actions)  # smac restarted game 0 after its process crashed: (0, True, {})
    assert out["restarted"].tolist() == [True, False] and out["truncated"].tolist() == [True, False]
    assert not out["terminated"].any() and out["reward"][0] == 0
    torch.testing.assert_close(out["final_state"][0], torch.full((7,), 1.0))  # the last state seen before the crash
    torch.testing.assert_close(out["state"][0], torch.zeros(7))  # the game starts afresh
    out = envs.step(actions)  # and training goes on in both games
    assert not out["restarted"].any() and out["obs"].shape == (2, 3, 5)


# ---------------------------------------------------------------- end to end


def test_end_to_end_logs_the_contract(tmp_cwd):
    flags = ("--env-id", "2s3z", "--state-type", "EP", "--factor", "raw", "--eval-every", "1", "--save-model")
    result = run_script(SCRIPT, *TINY, *flags, "--eval-episodes", "4", cwd=tmp_cwd)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    assert_contract(scalars, 5, [320, 640])
    assert_logged_and_finite(scalars, ["charts/win_rate", "eval/episodic_return", "eval/win_rate"])
    assert all(0 <= value <= 1 for _, value in scalars["charts/win_rate"])
    assert [step for step, _ in scalars["eval/win_rate"]] == [320, 640]
    assert re.search(
        r"^eval: episodic_return -?[\d.]+ ± [\d.]+ \(mean ± std of 4 episodes\), win rate [\d.]+$", result.stdout, re.M
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--env-id", "4m"), "unknown smax map --env-id '4m'"),
        (("--backend", "starcraft"), "invalid choice 'starcraft' for argument '--backend'"),
        (("--backend", "sc2"), "pip install git+https://github.com/oxwhirl/smac.git"),
        (("--backend", "sc2", "--max-steps", "50"), "--max-steps: SMAX only"),
        (("--state-type", "XP"), "invalid choice 'XP'"),
        (("--num-envs", "0"), "--num-envs must be a positive number"),
        (("--gae-lambda", "nan"), "--gae-lambda must be a finite number, not negative, got nan"),
        (("--num-minibatches", "100000"), "exceeds the batch"),
        (("--continuous-actions",), "Unrecognized options: --continuous-actions"),
    ],
)
def test_bad_flags_are_refused(flags, message):
    assert message in flag_error(lv, *flags)


def test_short_learning_run_beats_random_policy(tmp_cwd, smax_3m):
    # a uniformly random policy over the available actions, on the same map
    envs, returns = smax_3m, []
    out, episode_returns = envs.reset(), torch.zeros(16)
    torch.manual_seed(0)
    while len(returns) < 100:
        out = envs.step(torch.distributions.Categorical(probs=out["avail"].float()).sample())
        episode_returns += out["reward"]
        done = out["terminated"] | out["truncated"]
        returns += episode_returns[done].tolist()
        episode_returns *= ~done
    random_return = float(np.mean(returns))

    result = run_script(SCRIPT, "--total-timesteps", "96000", "--seed", "1", cwd=tmp_cwd, timeout=900)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_cwd))
    last = [value for step, value in scalars["charts/episodic_return"] if step > 96000 - 3200 * 5]
    assert np.mean(last) > random_return + 0.3, (np.mean(last), random_return)


def test_smac_marine_map_that_smax_lacks():
    # 8m_vs_9m, a map of the paper's shared-parameter runs: 8 marines against 9, built from SMAX's marine
    envs = lv.SMAXEnvs("8m_vs_9m", num_envs=2, seed=0, device=torch.device("cpu"))
    out = envs.step(envs.reset()["avail"].float().argmax(-1))
    assert envs.num_agents == 8 and out["obs"].shape[:2] == (2, 8) and out["avail"].shape[1] == 8
    assert envs.env.num_enemies == 9
    assert flag_error(lv, "--env-id", "8m_vs_9m") == ""


def test_a_shared_actor_reads_the_agents_one_hot_id():
    torch.manual_seed(0)
    actor = lv.Actor(5, 4, (8,), num_ids=3)
    obs, avail = torch.randn(2, 5), torch.tensor([[True, True, False, True]] * 2)
    dist = actor.distribution(obs, avail, 2)
    logits = actor.net(torch.cat([obs, torch.tensor([[0.0, 0.0, 1.0]] * 2)], -1)).masked_fill(~avail, -torch.inf)
    torch.testing.assert_close(dist.probs, torch.softmax(logits, -1))
    assert not torch.allclose(dist.probs, actor.distribution(obs, avail, 0).probs)  # another agent, another policy
