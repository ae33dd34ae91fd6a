# lv_happo_smac.py: LV-HAPPO on SMAC, with SMAX (JaxMARL) or StarCraft II (smac). Docs: docs/lv_happo_smac.md
import importlib.util
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch import Tensor
from torch.distributions import Categorical
from torch.utils.tensorboard import SummaryWriter

SC2_INSTALL = "the sc2 backend needs StarCraft II and smac: unzip SC2.4.10.zip from github.com/Blizzard/s2client-proto,"
SC2_INSTALL += " set SC2PATH, copy SMAC_Maps into StarCraftII/Maps, pip install git+https://github.com/oxwhirl/smac.git"


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = False
    """if toggled, train on the GPU (SMAX steps there too when jax has a GPU backend); CPU with a warning if none"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "lv-marl"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """if toggled, record evaluation episodes under `videos/{run_name}`: a GIF (smax) or StarCraft II replays (sc2)"""
    save_model: bool = False
    """if toggled, save the model to `runs/{run_name}` and evaluate it from that file"""
    eval_model: Optional[str] = None
    """evaluate this model (--save-model's) or checkpoint with its run's flags in --eval-episodes episodes"""
    checkpoint_every: int = 0
    """write `runs/{run_name}/checkpoint.pt` every this many iterations and at the end (0: only on an interrupt)"""
    resume: Optional[str] = None
    """continue from this checkpoint with its run's flags (a larger --total-timesteps goes further)"""

    # Algorithm specific arguments
    env_id: str = "3m"
    """the map: a SMAX map (3m, 2s3z, 3s5z, 5m_vs_6m, 3s5z_vs_3s6z, 27m_vs_30m, 6h_vs_8z, ...) or a SMAC map (sc2)"""
    backend: Literal["smax", "sc2"] = "smax"
    """`smax`: JaxMARL's SMAX, jit-compiled and vmapped over the environments; `sc2`: StarCraft II via smac"""
    max_steps: Optional[int] = None
    """the time limit of a SMAX game in steps (SMAX's 100 on every map when not given; SMAC maps set their own)"""
    state_type: Literal["FP", "EP"] = "FP"
    """the critic's input: `FP` state, agent's observation and id (a value, an advantage per agent); `EP` the state"""
    total_timesteps: int = 2_000_000
    """total joint environment steps of the experiment"""
    learning_rate: float = 5e-4
    """the learning rate of the actors' optimizers (and of the critic's, without --critic-learning-rate)"""
    critic_learning_rate: Optional[float] = None
    """the learning rate of the critic's optimizer (default: --learning-rate)"""
    num_envs: int = 32
    """the number of parallel environments (SMAX: vmapped in one call; sc2: one StarCraft II process each)"""
    num_steps: int = 100
    """the number of steps to run in each environment per policy rollout"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 1
    """the number of mini-batches per epoch (actors and critic)"""
    update_epochs: int = 5
    """the number of epochs of each actor's update and of the critic's"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient (also clips the value loss)"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus (a mean over the batch; the paper's code summed it, see README)"""
    max_grad_norm: float = 10.0
    """the maximum norm for the gradient clipping"""
    hidden_sizes: tuple[int, ...] = (64, 64, 64)
    """the hidden layer sizes of the actors and the critic"""
    factor: Literal["clipped", "raw", "none"] = "clipped"
    """the factor M of a later agent's advantage: `clipped` min(M, c) LV-HAPPO, `raw` HAPPO, `none` (M = 1) MAPPO"""
    factor_clip: float = 1.0
    """the upper bound c of the clipped factor"""
    fixed_order: bool = False
    """if toggled, update the agents in their fixed order instead of a random permutation per iteration"""
    share_actor: bool = False
    """if toggled, one actor for all agents (their observation and a one-hot id), updated as in the paper's code"""
    eval_every: int = 0
    """evaluate every this many iterations and at the end, logged as `eval/episodic_return` (0: never)"""
    eval_episodes: int = 32
    """the number of deterministic evaluation episodes (--eval-every, --eval-model, --save-model, --capture-video)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


def smax_maps() -> dict:
    """SMAX's scenarios by map name, with SMAC's 8m_vs_9m that it lacks (8 marines, unit type 0, against 9)."""
    import jax.numpy as jnp
    from jaxmarl.environments.smax import smax_env

    smax_env.register_scenario("8m_vs_9m", smax_env.Scenario(jnp.zeros(17, jnp.uint8), 8, 9, False, False))
    return smax_env.MAP_NAME_TO_SCENARIO


RESET_KEYS = ("obs", "state", "avail", "active")  # what both backends' reset() returns; step() adds the rest
STEP_KEYS = RESET_KEYS + ("reward", "terminated", "truncated", "won", "final_obs", "final_state", "restarted")


class SMAXEnvs:
    """`num_envs` SMAX games (JaxMARL's HeuristicEnemySMAX) stepped by one jitted, vmapped function, arrays passed
    to torch by DLPack. Both backends return dicts of tensors: `obs` (E, N, obs_dim), `state`, `avail` (E, N, A),
    `active` (E, N) 1 for living agents; `step` adds `reward`, `terminated` (a side is wiped out), `truncated` (time
    limit), `won`, `restarted` (E,), and `final_obs`, `final_state` before a finished game restarts in place."""

    def __init__(self, map_name: str, num_envs: int, seed: int, device: torch.device, max_steps: Optional[int] = None):
        import jax
        import jax.numpy as jnp
        from jaxmarl import make

        self.jax, self.jnp, self.device, self.num_envs = jax, jnp, device, num_envs
        limit = {} if max_steps is None else {"max_steps": max_steps}  # SMAX's own (100 steps) otherwise
        self.env = env = make("HeuristicEnemySMAX", scenario=smax_maps()[map_name], **limit)
        self.num_agents = n = env.num_agents
        self.obs_dim = env.observation_spaces[env.agents[0]].shape[0]
        self.num_actions = int(env.action_spaces[env.agents[0]].n)

        def observe(state) -> tuple:
            obs, avail = env.get_obs(state), env.get_avail_actions(state)
            obs, avail = jnp.stack([obs[a] for a in env.agents]), jnp.stack([avail[a] for a in env.agents]).astype(bool)
            return obs, env.get_world_state(state), avail, state.state.unit_alive[:n].astype(jnp.float32)

        def reset(key):
            state = env.reset(key)[1]
            return state, observe(state)

        def step(key, state, action):
            key_step, key_reset = jax.random.split(key)
            _, state, rewards, dones, _ = env.step_env(key_step, state, dict(zip(env.agents, action, strict=True)))
            allies_alive, enemies_alive = state.state.unit_alive[:n].any(), state.state.unit_alive[n:].any()
            terminated = ~(allies_alive & enemies_alive)
            final_obs, final_state = observe(state)[:2]
            reset_state = env.reset(key_reset)[1]  # a finished game restarts in the same step
            state = jax.tree.map(lambda r, s: jnp.where(dones["__all__"], r, s), reset_state, state)
            ends = (terminated, dones["__all__"] & ~terminated, allies_alive & ~enemies_alive)
            restarted = jnp.zeros((), bool)  # only a StarCraft II process crashes
            return state, (*observe(state), rewards[env.agents[0]], *ends, final_obs, final_state, restarted)

        def env_keys(key) -> jax.Array:  # the games' keys in the call made with `key` (and in the GIF's replay)
            return jax.random.split(jax.random.split(key)[1], num_envs)

        def many(fn: Callable) -> Callable:  # vmapped over environments, each with its own key; returns the next key
            return jax.jit(lambda key, *xs: (jax.random.split(key)[0], *jax.vmap(fn)(env_keys(key), *xs)))

        self._reset, self._step, self.env_keys = many(reset), many(step), env_keys
        self.state_dim = env.state_size
        self.step(self.reset(seed)["avail"].float().argmax(-1))  # compiles both now, not inside the first iteration

    def _to_torch(self, arrays: tuple, names: tuple) -> dict:
        return {name: torch.from_dlpack(x).to(self.device) for name, x in zip(names, arrays, strict=True)}

    def reset(self, seed: Optional[int] = None) -> dict:
        self.key = self.key if seed is None else self.jax.random.PRNGKey(seed)
        self.key, self.states, arrays = self._reset(self.key)
        return self._to_torch(arrays, RESET_KEYS)

    def step(self, actions: Tensor) -> dict:
        action = self.jnp.asarray(actions.cpu().numpy())  # a few bytes: through host memory, whatever the devices
        self.key, self.states, arrays = self._step(self.key, self.states, action)
        return self._to_torch(arrays, STEP_KEYS)

    def replay_step(self, actions: Tensor) -> tuple:
        """Game 0's coming step as JaxMARL's visualizer replays it: the game's key, state and actions."""
        key = self.env_keys(self.key)[0]
        action = dict(zip(self.env.agents, self.jnp.asarray(actions[0].cpu().numpy()), strict=True))
        return key, self.jax.tree.map(lambda x: x[0], self.states), action

    def close(self) -> None:
        pass


class SC2Envs:
    """StarCraft II games (smac's StarCraft2Env, or stand-ins), stepped in turn, with the interface of SMAXEnvs. smac
    starts a game whose process crashed again: its episode is lost (a truncation, not counted as an episode)."""

    def __init__(self, games: list, device: torch.device):
        self.games, self.device, self.num_envs = games, device, len(games)
        info = self.games[0].get_env_info()
        self.num_agents, self.num_actions = info["n_agents"], info["n_actions"]
        self.obs_dim, self.state_dim = info["obs_shape"], info["state_shape"]

    def _observe(self, i: int) -> tuple:
        game = self.games[i]
        avail = np.array(game.get_avail_actions(), dtype=bool)
        alive = ~(avail[:, 0] & (avail.sum(-1) == 1))  # smac: the no-op (action 0) is a dead agent's only action
        return np.array(game.get_obs(), np.float32), np.array(game.get_state(), np.float32), avail, alive

    def _batch(self, rows: list, names: tuple) -> dict:
        columns = [torch.as_tensor(np.stack(column), device=self.device) for column in zip(*rows, strict=True)]
        return dict(zip(names, columns, strict=True))

    def reset(self, seed: Optional[int] = None) -> dict:  # StarCraft II takes its seeds when a game starts
        for game in self.games:
            game.reset()
        self.last = [self._observe(i) for i in range(len(self.games))]
        return self._batch(self.last, RESET_KEYS)

    def step(self, actions: Tensor) -> dict:
        rows = []
        for i, action in enumerate(actions.cpu().numpy()):
            reward, done, info = self.games[i].step(action.tolist())
            restarted = done and not info  # smac restarts a crashed game itself, returning (0, True, {})
            truncated = done and (restarted or info.get("episode_limit", False))
            final = self.last[i] if restarted else self._observe(i)  # a lost episode ends at the last state seen
            if done:
                self.games[i].reset()
            self.last[i] = self._observe(i)
            ends = (np.float32(reward), done and not truncated, truncated, info.get("battle_won", False))
            rows.append((*self.last[i], *ends, *final[:2], restarted))
        return self._batch(rows, STEP_KEYS)

    def close(self) -> None:
        for game in self.games:
            game.close()


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(in_dim: int, hidden_sizes: tuple[int, ...], out_dim: int, out_std: float) -> nn.Sequential:
    """LayerNorm on the input, Linear-ReLU-LayerNorm blocks (HARL's MLP base), then a linear output layer."""
    layers = [nn.LayerNorm(in_dim)]
    for size in hidden_sizes:
        layers += [layer_init(nn.Linear(in_dim, size)), nn.ReLU(), nn.LayerNorm(size)]
        in_dim = size
    return nn.Sequential(*layers, layer_init(nn.Linear(in_dim, out_dim), std=out_std))


class Actor(nn.Module):
    """An agent's categorical policy over its local observation, restricted to its available actions; one actor
    shared by num_ids agents reads the observation with the agent's one-hot id appended."""

    def __init__(self, obs_dim: int, num_actions: int, hidden_sizes: tuple[int, ...], num_ids: int = 0):
        super().__init__()
        self.num_ids, self.net = num_ids, mlp(obs_dim + num_ids, hidden_sizes, num_actions, out_std=0.01)

    def distribution(self, obs: Tensor, avail: Tensor, agent: int) -> Categorical:
        """The categorical over the available actions only: unavailable ones get probability zero."""
        if self.num_ids:
            obs = torch.cat([obs, F.one_hot(torch.tensor(agent), self.num_ids).to(obs).expand(*obs.shape[:-1], -1)], -1)
        return Categorical(logits=self.net(obs).masked_fill(~avail, -torch.inf))


@torch.no_grad()
def act(actors: nn.ModuleList, obs: Tensor, avail: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor]:
    """obs (E, N, obs_dim), avail (E, N, A) -> actions (E, N), log-probabilities (E, N)."""
    actions, logprobs = [], []
    for i, actor in enumerate(actors):  # each agent acts on its own observation, among its available actions
        dist = actor.distribution(obs[:, i], avail[:, i], i)
        actions.append(dist.mode if deterministic else dist.sample())
        logprobs.append(dist.log_prob(actions[-1]))
    return torch.stack(actions, 1), torch.stack(logprobs, 1)


class CriticInput(nn.Module):
    """The critic's input LayerNorm and first Linear (given), on the state (..., S) and the observations (..., N, O):
    EP on the state (..., 1, H); FP on x_i = [state, o_i, one-hot i] of every agent i (..., N, H), from the parts:
    W LN(x_i) + c = (W g x_i - mean(x_i) W g) / std(x_i) + W b + c, the state's share of W g x_i (most of x_i) computed
    once per step rather than N times; the same numbers as the two layers on x_i, up to rounding (the variance is
    taken as E[x^2] - mean^2, as accurate as LayerNorm's where the mean is small against the spread, as in SMAC)."""

    def __init__(self, norm: nn.LayerNorm, linear: nn.Linear, state_type: str):
        super().__init__()
        self.norm, self.linear, self.state_type = norm, linear, state_type

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        state, obs = inputs
        if self.state_type == "EP":
            return self.linear(self.norm(state)).unsqueeze(-2)
        w = self.linear.weight * self.norm.weight  # W g
        w_state, w_obs, w_id = w.split([state.shape[-1], obs.shape[-1], obs.shape[-2]], dim=1)
        mean = (state.sum(-1, keepdim=True) + obs.sum(-1) + 1) / w.shape[1]  # (..., N): a one-hot sums to 1
        var = (state.norm(dim=-1, keepdim=True) ** 2 + obs.norm(dim=-1) ** 2 + 1) / w.shape[1] - mean**2
        wx = (state @ w_state.T).unsqueeze(-2) + obs @ w_obs.T + w_id.T  # (..., N, H)
        scale = (var + self.norm.eps).rsqrt().unsqueeze(-1)
        return (wx - mean.unsqueeze(-1) * w.sum(1)) * scale + self.linear(self.norm.bias)


class ValueNorm(nn.Module):
    """Running mean and variance of the value targets (debiased exponential averages, as in MAPPO and HARL)."""

    def __init__(self, beta: float = 0.99999, epsilon: float = 1e-5):
        super().__init__()
        self.beta, self.epsilon = beta, epsilon
        self.register_buffer("stats", torch.zeros(3))  # running mean, running mean of squares, debiasing term

    def mean_std(self) -> tuple[Tensor, Tensor]:
        mean, mean_sq = self.stats[:2] / self.stats[2].clamp(min=self.epsilon)
        return mean, (mean_sq - mean**2).clamp(min=1e-2).sqrt()

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        if torch.isfinite(x).all():  # a non-finite return would spoil the statistics for good
            self.stats.mul_(self.beta).add_(torch.stack([x.mean(), (x**2).mean(), x.new_ones(())]) * (1 - self.beta))


def compute_gae(
    rewards: Tensor, values: Tensor, next_values: Tensor, dones: Tensor, gamma: float, gae_lambda: float
) -> Tensor:
    """GAE(gamma, lambda) over (num_steps, num_envs): delta_t = r_t + gamma * V_next_t - V(s_t) and
    A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}, where V_next_t is the value of the state that step t
    reached (the final state where an episode ended), 0 after a termination."""
    advantages = torch.zeros_like(values)
    lastgaelam = torch.zeros_like(values[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * (1.0 - dones[t]) * lastgaelam
    return advantages


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the samples where mask is 1 (masked samples, e.g. dead agents, count for nothing)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def advantages_and_returns(critic: nn.Module, value_norm: ValueNorm, rollout: tuple, args: Args) -> tuple:
    """GAE advantages, value targets (advantages + values) and values, each (T, E, C) with C = N agents (FP) or 1
    (EP), from the rollout's states and observations, the ones its steps reached, rewards, terminations and dones: a
    state reached by a termination is worth 0, a truncated episode bootstraps from its final state. The value
    normalization takes on the new targets."""
    states, obs, final_states, final_obs, rewards, terminations, dones = rollout
    mean, std = value_norm.mean_std()
    values = critic((states, obs)).squeeze(-1) * std + mean  # the critic's outputs are normalized values
    next_values = (critic((final_states, final_obs)).squeeze(-1) * std + mean) * (1.0 - terminations[..., None])
    advantages = compute_gae(rewards[..., None], values, next_values, dones[..., None], args.gamma, args.gae_lambda)
    returns = advantages + values
    value_norm.update(returns)
    return advantages, returns, values


def factor_used(factor: Tensor, mode: str, factor_clip: float) -> Tensor:
    """The factor that weights agent i_k's advantage: min(M, c) (LV-HAPPO), M (HAPPO) or 1 (MAPPO-style)."""
    if mode == "none":
        return torch.ones_like(factor)
    return factor.clamp(max=factor_clip) if mode == "clipped" else factor


def actor_loss(
    newlogprob: Tensor, oldlogprob: Tensor, advantages: Tensor, factor: Tensor, mask: Tensor, clip_coef: float
) -> Tensor:
    """-E[M * min(r A, clip(r, 1 - eps, 1 + eps) A)] over the samples where mask is 1."""
    ratio = (newlogprob - oldlogprob).exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)
    return -masked_mean(factor * surrogate, mask)


def agent_step(actor: nn.Module, optimizer, agent: int, samples: list, args: Args, logs: dict) -> None:
    """One step on -E[M * clipped surrogate] - ent_coef * entropy over the living samples in a minibatch of the agent's
    (a dead agent's forced no-op teaches nothing)."""
    obs, avail, actions, oldlogprob, advantages, mask, factor = samples
    dist = actor.distribution(obs, avail, agent)
    newlogprob, entropy_loss = dist.log_prob(actions), masked_mean(dist.entropy(), mask)
    pg_loss = actor_loss(newlogprob, oldlogprob, advantages, factor, mask, args.clip_coef)
    logs["policy_loss"].append(pg_loss.item())
    logs["entropy"].append(entropy_loss.item())
    gradient_step(optimizer, pg_loss - args.ent_coef * entropy_loss, actor.parameters(), args.max_grad_norm, logs)


@torch.no_grad()
def agent_logratio(actor: nn.Module, agent: int, samples: list) -> Tensor:
    """log(pi_now / pi_behaviour) of the agent's actions on every sample, 0 where it is dead (its forced no-op)."""
    obs, avail, actions, oldlogprob, _, mask = samples[:6]
    logratio = actor.distribution(obs, avail, agent).log_prob(actions) - oldlogprob
    return torch.where(mask > 0, logratio, torch.zeros_like(logratio))


def log_update(logratio: Tensor, mask: Tensor, clip_coef: float, logs: dict) -> None:
    """An agent's update, measured on its living samples: the approximate KL(old || new) and the clip fraction."""
    ratio = logratio.exp()
    logs["approx_kl"].append(masked_mean((ratio - 1) - logratio, mask).item())
    logs["clipfrac"].append(masked_mean(((ratio - 1.0).abs() > clip_coef).float(), mask).item())


def log_factor(writer: SummaryWriter, k: int, factor: Tensor, weighted: Tensor, factor_clip: float, step: int) -> None:
    """The factor M seen at position k of the order, and the variance of m_used * A (the README's `lv/` tags)."""
    writer.add_scalar(f"lv/factor_mean_{k}", factor.mean().item(), step)
    writer.add_scalar(f"lv/factor_max_{k}", factor.max().item(), step)
    writer.add_scalar(f"lv/factor_clip_fraction_{k}", (factor > factor_clip).float().mean(), step)
    writer.add_scalar(f"lv/adv_variance_{k}", weighted.var().nan_to_num().item(), step)


def critic_loss(newvalue: Tensor, oldvalue: Tensor, returns: Tensor, clip_coef: float) -> Tensor:
    """Per sample: the Huber error (HARL's delta, 10) of the normalized value, the worse of clipped and not."""
    v_clipped = oldvalue + (newvalue - oldvalue).clamp(-clip_coef, clip_coef)
    v_loss_unclipped = F.huber_loss(newvalue, returns, reduction="none", delta=10.0)
    return torch.max(v_loss_unclipped, F.huber_loss(v_clipped, returns, reduction="none", delta=10.0))


def gradient_step(optimizer: torch.optim.Optimizer, loss: Tensor, params, max_grad_norm: float, logs: dict) -> None:
    """A step on the clipped gradient; a non-finite loss or gradient skips it (counted in logs["skipped_steps"])."""
    optimizer.zero_grad()
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
        optimizer.step()
    else:  # nothing non-finite is kept
        logs["skipped_steps"].append(1)


def update_actors(actors: list, optimizers: list, batch: tuple, args: Args, writer, step: int, logs: dict) -> None:
    """LV-HAPPO's sequential update of separate actors. In a random order i_1, ..., i_n, agent i_k goes through all
    its epochs on

        L(i_k) = -E[ m_used * min(r A, clip(r, 1 - eps, 1 + eps) A) ] - ent_coef * entropy,
        m_used = min(M, c),   M = prod_{j < k} r^{i_j}   (HAPPO: m_used = M; MAPPO-style: m_used = 1),

    over its living samples, r being its ratio pi_new / pi_behaviour; then its ratio on every sample (1 where it was
    dead) multiplies the unclipped M that the next agent sees. batch: obs (B, N, obs_dim), available actions
    (B, N, num_actions), actions (B, N), behaviour log-probabilities (B, N), advantages (B, N: each agent's own with
    the FP state, the team's with EP) and alive masks (B, N)."""
    batch_size, num_agents = batch[3].shape
    factor = torch.ones(batch_size, device=batch[3].device)  # M: 1 for the first agent of the order
    order = list(range(num_agents)) if args.fixed_order else torch.randperm(num_agents).tolist()  # fresh each call
    for k, agent in enumerate(order):
        actor, optimizer = actors[agent], optimizers[agent]
        m_used = factor_used(factor, args.factor, args.factor_clip)
        samples = [x[:, agent] for x in batch] + [m_used]  # obs, avail, actions, logp, adv, alive, m_used
        log_factor(writer, k, factor, (m_used * samples[4])[samples[5] > 0], args.factor_clip, step)
        for epoch in range(args.update_epochs):
            for mb in torch.randperm(batch_size).tensor_split(args.num_minibatches):  # near-equal minibatches
                agent_step(actor, optimizer, agent, [x[mb] for x in samples], args, logs)
        logratio = agent_logratio(actor, agent, samples)
        log_update(logratio, samples[5], args.clip_coef, logs)
        factor = factor * logratio.exp()  # the carry: the unclipped M times agent i_k's new ratio


def update_shared_actor(actor: nn.Module, optimizer, batch: tuple, args: Args, writer, step: int, logs: dict) -> None:
    """The paper's update of one actor shared by all agents: in each epoch M restarts at 1; for each minibatch, every
    agent of the order takes one step on its samples of it, weighted as in update_actors, and its ratio on every sample
    then multiplies M. The last epoch's first pass is logged. The batch as in update_actors."""
    batch_size, num_agents = batch[3].shape
    order = list(range(num_agents)) if args.fixed_order else torch.randperm(num_agents).tolist()
    for epoch in range(args.update_epochs):
        factor = torch.ones(batch_size, device=batch[3].device)
        for mb_index, mb in enumerate(torch.randperm(batch_size).tensor_split(args.num_minibatches)):
            for k, agent in enumerate(order):
                m_used = factor_used(factor, args.factor, args.factor_clip)
                samples = [x[:, agent] for x in batch] + [m_used]
                if epoch == args.update_epochs - 1 and mb_index == 0:
                    log_factor(writer, k, factor, (m_used * samples[4])[samples[5] > 0], args.factor_clip, step)
                agent_step(actor, optimizer, agent, [x[mb] for x in samples], args, logs)
                logratio = agent_logratio(actor, agent, samples)
                log_update(logratio, samples[5], args.clip_coef, logs)
                factor = factor * logratio.exp()  # the carry, as in update_actors


def fail(message: str) -> None:  # one line on stderr that says what to do, and exit status 1
    sys.exit(f"{os.path.basename(__file__)}: error: {message}")


def check_args(args: Args) -> Optional[str]:
    """What is wrong with the flags, as one line that says what to do, or None."""
    positive = "total_timesteps num_envs num_steps num_minibatches max_steps eval_episodes learning_rate"
    positive = (positive + " clip_coef max_grad_norm factor_clip critic_learning_rate").split()
    for name, value in vars(args).items():
        wrong = isinstance(value, (int, float)) and not (value > 0 if name in positive else value >= 0)
        if wrong or (isinstance(value, float) and not math.isfinite(value)):
            words = "a positive number" if name in positive else "a finite number, not negative"
            return f"--{name.replace('_', '-')} must be {words}, got {value}"
    problems = [
        (args.max_steps is not None and args.backend == "sc2", "--max-steps: SMAX only (SMAC maps set their own)"),
        (args.seed >= 2**32, f"--seed must be below 2**32, got {args.seed}"),  # the environments' seeding
        (max(args.gamma, args.gae_lambda) > 1, "--gamma and --gae-lambda must lie in [0, 1]"),
        (not args.hidden_sizes or min(args.hidden_sizes) < 1, "--hidden-sizes needs positive sizes, e.g. 64 64 64"),
        (args.num_minibatches > args.num_envs * args.num_steps, "--num-minibatches exceeds the batch's samples"),
        (args.eval_model and not os.path.isfile(args.eval_model), f"--eval-model {args.eval_model}: no such file"),
        (args.resume and not os.path.isfile(args.resume), f"--resume {args.resume}: no such file"),
        (args.eval_model and (args.resume or args.save_model), "with --eval-model, drop --resume and --save-model"),
        (args.track and not importlib.util.find_spec("wandb"), "--track needs wandb: pip install wandb"),
    ]
    if (problem := next((message for wrong, message in problems if wrong), None)) is not None:
        return problem
    if args.backend == "sc2" and importlib.util.find_spec("smac") is None:
        return SC2_INSTALL
    if args.backend == "smax":  # the maps the backend knows, last: importing jaxmarl takes seconds
        maps = smax_maps()
    else:
        maps = importlib.import_module("smac.env.starcraft2.maps.smac_maps").get_smac_map_registry()
    if args.env_id not in maps:
        return f"unknown {args.backend} map --env-id {args.env_id!r}: choose one of {', '.join(maps)}"


def make_env(args: Args, num_envs: int, seed: int, device: torch.device, replay_dir: str = "") -> Any:
    if args.backend == "smax":
        return SMAXEnvs(args.env_id, num_envs, seed, device, args.max_steps)
    game = importlib.import_module("smac.env").StarCraft2Env
    options = {"map_name": args.env_id, "replay_dir": replay_dir, "continuing_episode": True}  # reports time limits
    return SC2Envs([game(seed=seed + i, **options) for i in range(num_envs)], device)


def start_env(args: Args, num_envs: int, seed: int, device: torch.device, replay_dir: str = "") -> tuple:
    """Environments and their first observations, or one line that says how to install a missing StarCraft II."""
    try:  # smac launches StarCraft II at a game's first reset
        envs = make_env(args, num_envs, seed, device, replay_dir)
        return envs, envs.reset()
    except Exception as error:  # StarCraft II missing or broken (SMAX's own errors keep their traceback)
        if args.backend == "sc2":
            fail(f"StarCraft II did not start ({error!r:.200}); {SC2_INSTALL}")
        raise


def evaluate(actors: nn.ModuleList, envs, args: Args, video_folder: Optional[str] = None) -> tuple:
    """The mean team return and win rate of deterministic episodes on evaluation envs (SMAX: one per game; sc2: all
    in one game), printed; with video_folder, a GIF of the first SMAX game's episode or StarCraft II's replays."""
    returns, wins, replay = [], [], []
    episodes = np.zeros(envs.num_envs, int)  # per game, up to ceil(eval_episodes / num_envs) each
    episode_returns = torch.zeros(envs.num_envs, device=envs.device)
    next_ = envs.reset(seed=args.seed + 10_000)
    while len(returns) < args.eval_episodes:
        action, _ = act(actors, next_["obs"], next_["avail"], deterministic=True)
        if video_folder is not None and args.backend == "smax" and episodes[0] == 0:
            replay.append(envs.replay_step(action))
        next_ = envs.step(action)
        episode_returns += next_["reward"]
        done = next_["terminated"] | next_["truncated"]
        counted = (done & ~next_["restarted"]).cpu().numpy()  # a game lost to a crash is no episode
        for i in np.flatnonzero(counted & (episodes < -(-args.eval_episodes // len(episodes)))):
            returns.append(episode_returns[i].item())
            wins.append(next_["won"][i].item())
            episodes[i] += 1
        episode_returns *= ~done
    if video_folder is not None:
        os.makedirs(video_folder, exist_ok=True)
        if args.backend == "smax":  # JaxMARL's visualizer re-plays the steps between decisions
            from jaxmarl.viz.visualizer import SMAXVisualizer

            SMAXVisualizer(envs.env, replay).animate(
                save_fname=os.path.join(video_folder, f"{args.env_id}.gif"), view=False
            )
        else:
            envs.games[0].save_replay()
    returns, win_rate = returns[: args.eval_episodes], float(np.mean(wins[: args.eval_episodes]))
    mean, std, n = float(np.mean(returns)), np.std(returns), len(returns)
    print(f"eval: episodic_return {mean:.2f} ± {std:.2f} (mean ± std of {n} episodes), win rate {win_rate:.2f}")
    return mean, win_rate


def make_actors(args: Args, envs, device: torch.device) -> tuple[nn.ModuleList, list]:
    """The actors (one per agent, or one for all with --share-actor, told the agents' ids) and the one each agent
    acts with."""
    num_ids = envs.num_agents if args.share_actor else 0
    sizes = (envs.obs_dim, envs.num_actions, args.hidden_sizes, num_ids)
    actors = nn.ModuleList(Actor(*sizes) for _ in range(1 if num_ids else envs.num_agents)).to(device)
    return actors, [actors[0]] * envs.num_agents if args.share_actor else list(actors)


def evaluate_saved_model(args: Args) -> None:
    """--eval-model: the actors of the file, built with the flags of the run that saved them, in --eval-episodes
    deterministic episodes (a GIF or StarCraft II's replays with --capture-video), their returns and win rate printed;
    nothing is trained or written."""
    video_folder = f"videos/{os.path.basename(args.eval_model)}" if args.capture_video else None  # asked for here
    saved, args = load_run(args.eval_model, args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    num_envs = args.eval_episodes if args.backend == "smax" else 1
    envs = start_env(args, num_envs, args.seed + 10_000, device, video_folder or "")[0]
    actors, policies = make_actors(args, envs, device)
    restore(saved, {"actors": actors})
    evaluate(policies, envs, args, video_folder)
    envs.close()
    sys.exit(0)


def load_run(path: str, args: Args) -> tuple[dict, Args]:
    """A checkpoint or model (one format, read as weights only) and its run's flags, into which the flags set here go
    where they may change; a one-line exit when this script did not write it or a flag set here differs."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = f"not a checkpoint or model ({type(error).__name__})"
        fail(f"cannot read {path}: {'the file is empty' if os.path.getsize(path) == 0 else reason}")
    written_by = saved.get("script") if isinstance(saved, dict) else None
    script = os.path.basename(__file__)
    if written_by != script:
        fail(f"{path} was written by {written_by or 'another program'}, not {script}: use that one")
    may_change = "total_timesteps num_iterations resume eval_model eval_episodes checkpoint_every cuda track"
    may_change = (may_change + " wandb_project_name wandb_entity capture_video save_model").split()  # others: the run's
    defaults, theirs = vars(Args()), saved["args"]
    given = {name: value for name, value in vars(args).items() if value != defaults[name]}  # the flags set here
    for name, value in given.items():
        if name not in may_change and theirs.get(name, value) != value:
            fail(f"{path} was trained with --{name.replace('_', '-')} {theirs[name]}: drop the flag or give that")
    return saved, Args(**{name: value for name, value in theirs.items() if name in defaults} | given)


def restore(saved: dict, stateful: dict) -> tuple[int, int]:
    """Loads a saved run's state dicts and random streams; returns the global step and the first iteration to run."""
    try:
        for name, module in stateful.items():
            module.load_state_dict(saved[name])
    except (KeyError, RuntimeError, ValueError) as error:
        fail(f"{name} in the file does not fit this script's ({type(error).__name__}): use the one that wrote it")
    torch.set_rng_state(saved["rng"][0])
    torch.cuda.set_rng_state_all(saved["rng"][1:])
    return saved["global_step"], saved["iteration"] + 1


def save_checkpoint(path: str, stateful: dict, progress: dict) -> None:
    """The state dicts, random streams, progress and script's name (another script refuses them), written to a
    temporary file renamed over the last one, so that a crash mid-write leaves that one whole."""
    rng = [torch.get_rng_state(), *torch.cuda.get_rng_state_all()]  # only torch's: numpy's global one is unused
    state = {name: module.state_dict() for name, module in stateful.items()}
    torch.save(state | progress | {"rng": rng, "script": os.path.basename(__file__)}, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def catch_interrupts() -> list:
    """SIGINT and SIGTERM land in the list returned: the run stops after the iteration; Ctrl-C again stops at once."""
    interrupted = []

    def on_signal(signum: int, frame) -> None:
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"{signal.Signals(signum).name}: stopping after this iteration (Ctrl-C again: now)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return interrupted


if __name__ == "__main__":
    args = tyro.cli(Args)
    # read by XLA when jax is first imported: GPU memory left to torch; on the CPU, one thread beside torch's
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not (args.cuda and torch.cuda.is_available()):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    if (problem := check_args(args)) is not None:
        fail(problem)
    if args.eval_model:  # evaluate a saved model instead of training, and exit
        evaluate_saved_model(args)
    checkpoint, args = (None, args) if args.resume is None else load_run(args.resume, args)  # the run's own flags
    args.batch_size = int(args.num_envs * args.num_steps)
    args.critic_learning_rate = args.critic_learning_rate or args.learning_rate
    args.num_iterations = max(1, args.total_timesteps // args.batch_size)
    run_name = f"{args.env_id}_{args.backend}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = run_name if checkpoint is None else checkpoint["run_name"]  # a resumed run goes on in its own folder

    # TRY NOT TO MODIFY: seeding
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.distributions.Distribution.set_default_validate_args(False)  # argument checks cost more than the math
    if args.cuda and not torch.cuda.is_available():
        print("warning: --cuda given but no GPU is available; training on the CPU", file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # small networks gain little from more

    # env setup: SMAX compiles its step here; StarCraft II starts one game per environment
    envs, next_ = start_env(args, args.num_envs, args.seed, device)
    # evaluation environments of their own, built once (SMAX compiles once): all episodes at once, or one game (sc2)
    if args.eval_every or args.save_model or args.capture_video:
        replays = f"videos/{run_name}" if args.capture_video else ""  # StarCraft II writes its replays there
        eval_envs = make_env(
            args, args.eval_episodes if args.backend == "smax" else 1, args.seed + 10_000, device, replays
        )
    num_agents, num_actions, obs_dim = envs.num_agents, envs.num_actions, envs.obs_dim
    critic_dim = envs.state_dim + (obs_dim + num_agents if args.state_type == "FP" else 0)  # [s, o_i, one-hot i]

    actors, policies = make_actors(args, envs, device)  # agent i acts with policies[i]
    critic = mlp(critic_dim, args.hidden_sizes, 1, out_std=1.0)  # V(s) (EP) or V(s, o_i, i) (FP) from (s, o)
    critic = nn.Sequential(CriticInput(*critic[:2], args.state_type), *critic[2:]).to(device)
    value_norm = ValueNorm().to(device)
    actor_optimizers = [torch.optim.Adam(a.parameters(), lr=args.learning_rate, eps=1e-5, fused=True) for a in actors]
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate, eps=1e-5, fused=True)

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs, num_agents, obs_dim), device=device)  # (T, E, N, obs_dim)
    states = torch.zeros((args.num_steps, args.num_envs, envs.state_dim), device=device)  # (T, E, state_dim)
    final_obs, final_states = torch.zeros_like(obs), torch.zeros_like(states)  # what step t reached, before a reset
    avails = torch.zeros((args.num_steps, args.num_envs, num_agents, num_actions), dtype=torch.bool, device=device)
    actions = torch.zeros((args.num_steps, args.num_envs, num_agents), dtype=torch.long, device=device)  # (T, E, N)
    logprobs = torch.zeros((args.num_steps, args.num_envs, num_agents), device=device)  # (T, E, N)
    active_masks = torch.zeros((args.num_steps, args.num_envs, num_agents), device=device)  # (T, E, N): alive
    rewards, terminations, dones = torch.zeros((3, args.num_steps, args.num_envs), device=device)  # (T, E) each

    # TRY NOT TO MODIFY: checkpoints hold these state dicts, the random streams and the progress
    stateful = {"actors": actors, "critic": critic, "value_norm": value_norm, "critic_optimizer": critic_optimizer}
    stateful |= {f"actor_optimizer_{i}": optimizer for i, optimizer in enumerate(actor_optimizers)}
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"
    run = {"run_name": run_name, "args": vars(args)}  # what every checkpoint says of its run
    global_step, start_iteration = (0, 1) if checkpoint is None else restore(checkpoint, stateful)
    if args.track:
        import wandb

        wandb_run = dict(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, config=vars(args))
        wandb.init(**wandb_run, sync_tensorboard=True)
    # on resume, events a crashed run logged after its checkpoint are purged, so no step appears twice
    writer = SummaryWriter(f"runs/{run_name}", purge_step=None if checkpoint is None else checkpoint["global_step"] + 1)
    hyperparameters = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{hyperparameters}")
    interrupted = catch_interrupts()  # SIGINT or SIGTERM: stop after this iteration and save

    # TRY NOT TO MODIFY: start the game
    start_time, start_step = time.time(), global_step
    episode_returns, episode_lengths = torch.zeros((2, args.num_envs), device=device)
    recent_returns, recent_wins, mean_return, win_rate = [], [], float("nan"), float("nan")

    for iteration in range(start_iteration, args.num_iterations + 1):
        if iteration == start_iteration or (args.checkpoint_every and (iteration - 1) % args.checkpoint_every == 0):
            # new episodes, seeded by the iteration: a run resumed from a checkpoint continues exactly
            next_ = envs.reset(seed=args.seed + iteration - 1)
            episode_returns.zero_(), episode_lengths.zero_()

        rollout_start = time.time()
        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step], states[step], avails[step] = next_["obs"], next_["state"], next_["avail"]
            active_masks[step] = next_["active"]

            # ALGO LOGIC: each agent acts on its own observation, among its available actions
            actions[step], logprobs[step] = act(policies, next_["obs"], next_["avail"])

            # TRY NOT TO MODIFY: execute the game and log data.
            next_ = envs.step(actions[step])
            rewards[step], terminations[step] = next_["reward"], next_["terminated"]
            dones[step] = done = next_["terminated"] | next_["truncated"]
            final_obs[step], final_states[step] = next_["final_obs"], next_["final_state"]
            episode_returns, episode_lengths = episode_returns + next_["reward"], episode_lengths + 1
            if (ended := done & ~next_["restarted"]).any():  # a game lost to a crash is no episode
                ended_episodes = torch.stack([episode_returns, episode_lengths, next_["won"].float()], 1)[ended]
                for episodic_return, episodic_length, won in ended_episodes.tolist():
                    recent_returns.append(episodic_return)
                    recent_wins.append(won)
                    writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                    writer.add_scalar("charts/episodic_length", episodic_length, global_step)
            episode_returns, episode_lengths = episode_returns * ~done, episode_lengths * ~done

        # bootstrap value if not done
        update_start = time.time()
        rollout = (states, obs, final_states, final_obs, rewards, terminations, dones)
        advantages, returns, values = advantages_and_returns(critic, value_norm, rollout, args)

        b_obs, b_avail, b_actions, b_logprobs = (x.flatten(0, 1) for x in (obs, avails, actions, logprobs))
        b_active, b_states = active_masks.flatten(0, 1), states.flatten(0, 1)
        mean, std = value_norm.mean_std()
        b_returns, b_values = (returns.flatten(0, 1) - mean) / std, (values.flatten(0, 1) - mean) / std  # normalized
        b_value_mask = b_active if args.state_type == "FP" else torch.ones_like(b_values)  # the living agents' values
        adv_mean = masked_mean(advantages.flatten(0, 1), b_value_mask)
        adv_std = masked_mean((advantages.flatten(0, 1) - adv_mean) ** 2, b_value_mask).sqrt()
        b_advantages = (advantages.flatten(0, 1) - adv_mean) / (adv_std + 1e-8)  # normalized over living agents

        # ALGO LOGIC: sequential actor updates in a random order, each agent's advantage weighted by min(M, c)
        logs = {name: [] for name in ("policy_loss", "entropy", "approx_kl", "clipfrac", "value_loss", "skipped_steps")}
        b_agent_advantages = b_advantages.expand_as(b_active)  # (B, N): FP its own per agent, EP the team's for all
        batch = (b_obs, b_avail, b_actions, b_logprobs, b_agent_advantages, b_active)
        if args.share_actor:
            update_shared_actor(actors[0], actor_optimizers[0], batch, args, writer, global_step, logs)
        else:
            update_actors(actors, actor_optimizers, batch, args, writer, global_step, logs)

        # ALGO LOGIC: critic update on the normalized returns
        for epoch in range(args.update_epochs):
            for mb_inds in torch.randperm(args.batch_size).tensor_split(args.num_minibatches):
                newvalue = critic((b_states[mb_inds], b_obs[mb_inds])).squeeze(-1)
                errors = critic_loss(newvalue, b_values[mb_inds], b_returns[mb_inds], args.clip_coef)
                v_loss = masked_mean(errors, b_value_mask[mb_inds])  # FP: the living agents' values only
                gradient_step(critic_optimizer, v_loss, critic.parameters(), args.max_grad_norm, logs)
                logs["value_loss"].append(v_loss.item())

        # TRY NOT TO MODIFY: a non-finite loss or gradient skips its step: nothing non-finite is kept
        if skipped := len(logs.pop("skipped_steps")):
            writer.add_scalar("charts/skipped_steps", skipped, global_step)
            print(f"warning: iteration {iteration}: {skipped} non-finite steps skipped", file=sys.stderr)

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        writer.add_scalar("perf/rollout_time", update_start - rollout_start, global_step)
        writer.add_scalar("perf/update_time", time.time() - update_start, global_step)
        sps = int((global_step - start_step) / (time.time() - start_time))
        writer.add_scalar("charts/SPS", sps, global_step)
        for name, values in logs.items():  # means over agents, epochs and minibatches
            writer.add_scalar(f"losses/{name}", np.mean(values) if values else 0.0, global_step)
        if recent_returns:
            writer.add_scalar("charts/win_rate", np.mean(recent_wins), global_step)
            mean_return, win_rate, recent_returns, recent_wins = np.mean(recent_returns), np.mean(recent_wins), [], []
        if args.eval_every and iteration % args.eval_every == 0 and iteration < args.num_iterations:
            for name, value in zip(("episodic_return", "win_rate"), evaluate(policies, eval_envs, args), strict=True):
                writer.add_scalar(f"eval/{name}", value, global_step)
        line = f"global_step={global_step}, episodic_return={mean_return:.2f}, win_rate={win_rate:.2f}, SPS={sps}"
        print(line, flush=True)
        due = args.checkpoint_every and (iteration % args.checkpoint_every == 0 or iteration == args.num_iterations)
        if interrupted or due:
            writer.flush()  # the events up to the checkpoint reach the disk before it: a crash after it loses none
            save_checkpoint(checkpoint_path, stateful, run | {"global_step": global_step, "iteration": iteration})
        if interrupted:  # the checkpoint holds what was learned: say how to go on, exit 130 (SIGINT) or 143 (SIGTERM)
            writer.close()
            print(f"interrupted; resume with: python {sys.argv[0]} --resume {checkpoint_path}")
            sys.exit(128 + interrupted[0])

    envs.close()
    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"  # a checkpoint by another name: it resumes too
        save_checkpoint(model_path, stateful, run | {"global_step": global_step, "iteration": args.num_iterations})
        print(f"model saved to {model_path}")
        actors.load_state_dict(torch.load(model_path, weights_only=True)["actors"])  # evaluated from the file
    if args.eval_every or args.save_model or args.capture_video:
        results = evaluate(policies, eval_envs, args, f"videos/{run_name}" if args.capture_video else None)
        for name, value in zip(("episodic_return", "win_rate"), results, strict=True):
            writer.add_scalar(f"eval/{name}", value, global_step)
        eval_envs.close()

    writer.close()
