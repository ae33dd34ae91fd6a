# lv_happo_mamujoco.py: LV-HAPPO on Multi-Agent MuJoCo (gymnasium-robotics). Docs: docs/lv_happo_mamujoco.md
import contextlib
import copy
import importlib.util
import inspect
import io
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch import Tensor
from torch.distributions import Independent, Normal
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.tensorboard import SummaryWriter

try:  # POSIX: environments are built one process at a time (MultiAgentArrays)
    import fcntl
except ImportError:  # Windows
    fcntl = None

with contextlib.redirect_stderr(io.StringIO()):  # gymnasium-robotics prints a notice about Adroit tasks at import
    from gymnasium_robotics import mamujoco_v1
    from gymnasium_robotics.envs.multiagent_mujoco.obsk import get_parts_and_edges

# the scenarios that gymnasium_robotics.mamujoco_v1 partitions
ENV_IDS = ("HalfCheetah", "Ant", "Hopper", "Humanoid", "HumanoidStandup", "Reacher", "Pusher", "Swimmer", "Walker2d")
ENV_IDS += ("CoupledHalfCheetah", "ManySegmentSwimmer", "ManySegmentAnt")


def mujoco_warning(message: str) -> None:
    """MuJoCo's warnings, less the deprecation notice that gymnasium's HalfCheetah model raises at every build."""
    if "is deprecated" not in message:
        print(f"MuJoCo warning: {message}", file=sys.stderr)


mujoco.set_mju_user_warning(mujoco_warning)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = False
    """if toggled, train on the GPU (falls back to the CPU with a warning when there is none)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "lv-marl"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """if toggled, record the final evaluation episodes as videos under `videos/{run_name}` (MUJOCO_GL=egl)"""
    save_model: bool = False
    """if toggled, save the model to `runs/{run_name}` and evaluate it from that file"""
    eval_model: Optional[str] = None
    """evaluate this model (--save-model's) or checkpoint with its run's flags in --eval-episodes episodes"""
    checkpoint_every: int = 0
    """write `runs/{run_name}/checkpoint.pt` every this many iterations and at the end (0: only on an interrupt)"""
    resume: Optional[str] = None
    """continue from this checkpoint with its run's flags (a larger --total-timesteps goes further)"""

    # Algorithm specific arguments
    env_id: str = "HalfCheetah"
    """the MuJoCo task (a MaMuJoCo scenario): HalfCheetah, Ant, Walker2d, Hopper, Humanoid, Swimmer, ..."""
    agent_conf: str = "6x1"
    """the joints' partition among agents: 6x1, 2x3 (HalfCheetah), 8x1, 4x2 (Ant), 6x1 (Walker2d), 17x1 (Humanoid)"""
    agent_obsk: int = 1
    """each agent observes its own joints and those within this many hops of them (gymnasium-robotics' agent_obsk)"""
    global_obs: bool = False
    """if toggled, every agent observes the full state plus a one-hot agent id (HARL's setting, for its numbers)"""
    standardize_obs: bool = False
    """with --global-obs: each agent's vector and the critic's state standardized by their own mean and std (paper)"""
    max_episode_steps: int = 1000
    """episodes are truncated after this many steps (the robot falling terminates them earlier)"""
    total_timesteps: int = 1_000_000
    """total joint environment steps of the experiment"""
    learning_rate: float = 5e-4
    """the learning rate of the actors' optimizers (and of the critic's, without --critic-learning-rate)"""
    critic_learning_rate: Optional[float] = None
    """the learning rate of the critic's optimizer (default: --learning-rate)"""
    anneal_lr: bool = False
    """Toggle learning rate annealing: every learning rate decays linearly to 0 over the run (as CleanRL's PPO)"""
    num_envs: int = 10
    """the number of parallel environments"""
    num_steps: int = 200
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
    hidden_sizes: tuple[int, ...] = (128, 128)
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
    eval_episodes: int = 10
    """the number of deterministic evaluation episodes (--eval-every, --eval-model, --save-model, --capture-video)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


# Nx1 partitions MaMuJoCo does not name: each joint of one of its partitions an agent (its agent_factorization)
SPLIT_INTO_JOINTS = {"Ant": "4x2", "Walker2d": "2x3", "Humanoid": "9|8", "HumanoidStandup": "9|8"}


def partition(env_id: str, agent_conf: str) -> tuple[list, list, list]:
    """MaMuJoCo's (parts, edges, globals) of the partition; `Nx1` with N the robot's joints: one joint per agent."""
    try:
        return get_parts_and_edges(env_id, agent_conf)
    except Exception:
        parts, edges, globals_ = get_parts_and_edges(env_id, SPLIT_INTO_JOINTS.get(env_id, agent_conf))
        if agent_conf != f"{sum(map(len, parts))}x1":
            raise
        return [(joint,) for part in parts for joint in part], edges, globals_


class MultiAgentArrays(gym.Env):
    """One MaMuJoCo parallel env as a gymnasium Env of arrays, for gymnasium's vector API: observation `obs`
    (num_agents, max_obs_dim), each agent's local observation (its joints and those within agent_obsk hops,
    zero-padded) or, with global_obs, the full state and a one-hot agent id (standardized per vector with
    standardize_obs, as the critic's state then), and `state`, the global state; action
    (num_agents, max_act_dim), each agent reading its first act_dim entries; reward the task's reward, which MaMuJoCo
    gives every agent alike (the team reward is that reward, not a sum)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, args: Args, render_mode: Optional[str] = None):
        parts, edges, globals_ = partition(args.env_id, args.agent_conf)
        with open(inspect.getfile(mamujoco_v1.parallel_env)) as lock:  # gymnasium-robotics writes a ManySegment task's
            if fcntl is not None:  # model to one file beside this one and deletes it: one build at a time
                fcntl.flock(lock, fcntl.LOCK_EX)
            self.env = mamujoco_v1.parallel_env(
                args.env_id,
                args.agent_conf,
                agent_obsk=args.agent_obsk,
                agent_factorization={"partition": parts, "edges": edges, "globals": globals_},
                render_mode=render_mode,
                max_episode_steps=args.max_episode_steps,
            )
        self.render_mode, self.global_obs, self.standardize_obs = render_mode, args.global_obs, args.standardize_obs
        self.agents = list(self.env.possible_agents)
        self.act_spaces = [self.env.action_space(a) for a in self.agents]
        n, state_dim = len(self.agents), self.env.single_agent_env.observation_space.shape[0]  # env.state()'s size
        local_dims = [self.env.observation_space(a).shape[0] for a in self.agents]
        self.share_actor = args.share_actor and not args.global_obs  # global_obs: the state has the id already
        self.obs_dims = [state_dim + n] * n if args.global_obs else [d + n * self.share_actor for d in local_dims]
        self.act_dims = [s.shape[0] for s in self.act_spaces]
        self.joint_ids = np.array([joint.act_ids for part in parts for joint in part])  # agent order -> robot's order
        self.act_mask = np.arange(max(self.act_dims)) < np.array(self.act_dims)[:, None]  # the unpadded entries
        self.low, self.high = self.act_spaces[0].low[0], self.act_spaces[0].high[0]  # MaMuJoCo's bounds: one pair
        obs_space = gym.spaces.Box(-np.inf, np.inf, (n, max(self.obs_dims)), np.float32)
        state_space = gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float32)
        self.observation_space = gym.spaces.Dict({"obs": obs_space, "state": state_space})
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (n, max(self.act_dims)), np.float32)

    def _arrays(self, state: np.ndarray) -> dict:
        n = len(self.agents)
        if self.global_obs:
            obs = np.concatenate([np.tile(state, (n, 1)), np.eye(n)], 1)
            if self.standardize_obs:  # the paper's get_obs and get_state: each vector by its own mean and std
                obs = (obs - obs.mean(1, keepdims=True)) / obs.std(1, keepdims=True)
                state = (state - state.mean()) / state.std()
            return {"obs": obs.astype(np.float32), "state": state.astype(np.float32)}
        state = state.astype(np.float32)
        padded = np.zeros(self.observation_space["obs"].shape, np.float32)
        for i in range(n):
            agent_obs = self.env._get_obs_agent(i)
            padded[i, : len(agent_obs)] = agent_obs
        if self.share_actor:  # a shared actor tells the agents apart by a one-hot id after the observation
            padded[:, -n:] = np.eye(n)
        return {"obs": padded, "state": state}

    def reset(self, seed: Optional[int] = None, options: Optional[dict] = None):
        state, _ = self.env.single_agent_env.reset(seed=seed, options=options)
        return self._arrays(state), {}

    def step(self, action: np.ndarray):
        # MaMuJoCo's step, less the local observations it builds even when the agents observe the state: the
        # agents' actions, clipped to the bounds (here only, not in their stored log-probs), make the robot's action
        robot_action = np.empty(len(self.joint_ids))
        robot_action[self.joint_ids] = np.clip(action[self.act_mask], self.low, self.high)
        state, reward, terminated, truncated, _ = self.env.single_agent_env.step(robot_action)
        return self._arrays(state), float(reward), bool(terminated), bool(truncated), {}

    def render(self):
        return self.env.render()


def make_env(args: Args, render_mode: Optional[str] = None):
    return lambda: MultiAgentArrays(args, render_mode)  # a thunk for the vector API


def reached_states(next_state: Tensor, truncated: np.ndarray, infos: dict) -> Tensor:
    """The states a vector step reached (E, state_dim): next_state, but the true final state where an episode was
    truncated (SAME_STEP autoreset puts it in infos and the next episode's first in next_state)."""
    reached = next_state.clone()
    for env_idx in np.flatnonzero(truncated):  # after a termination the value is 0 in any case
        reached[env_idx] = torch.as_tensor(infos["final_obs"][env_idx]["state"], device=next_state.device)
    return reached


def check_env(args: Args) -> None:
    """One environment built (and rendered, for --capture-video) before anything starts, or a one-line exit:
    gymnasium-robotics fails on some tasks (CoupledHalfCheetah with mujoco 4), videos need MuJoCo's off-screen
    rendering, and a shared actor agents of one size."""
    try:
        env = make_env(args, "rgb_array")()
        if args.capture_video:
            env.reset(seed=args.seed)
            env.render()
        env.close()
    except Exception as error:
        fail(f"cannot build {args.env_id} {args.agent_conf} or render it (videos: see the docs page): {error!r:.200}")
    if env.share_actor and len(set(zip(env.obs_dims, env.act_dims, strict=True))) > 1:
        fail(f"--share-actor needs agents of one size: observations of {env.obs_dims}, actions of {env.act_dims} here")


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
    """One agent's Gaussian policy over its local observation, with a state-independent std."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.net = mlp(obs_dim, hidden_sizes, act_dim, out_std=0.01)
        self.std_param = nn.Parameter(torch.ones(act_dim))  # HARL's std: 0.5 * sigmoid(p), p = 1 at start (0.37)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """The Gaussian's mean and std given padded observations (..., max_obs_dim)."""
        out = self.net(obs[..., : self.obs_dim])
        return out, (0.5 * torch.sigmoid(self.std_param)).expand_as(out)

    def distribution(self, obs: Tensor) -> Independent:
        """The Gaussian given padded observations; its log-probability sums over the dimensions."""
        return Independent(Normal(*self(obs)), 1)


def stack_actors(actors: list) -> Optional[tuple]:
    """The actors' parameters stacked for act's one vmapped pass, or None where their sizes differ or one actor is
    shared; made once per rollout (at 17 agents it pays: docs page)."""
    if len({(actor.obs_dim, actor.act_dim) for actor in actors}) > 1 or len(set(map(id, actors))) < len(actors):
        return None
    params, buffers = stack_module_state(actors)
    return params, buffers, copy.deepcopy(actors[0]).to("meta")


@torch.inference_mode()
def act(
    actors: list, obs: Tensor, deterministic: bool = False, stacked: Optional[tuple] = None
) -> tuple[Tensor, Tensor]:
    """obs (E, N, max_obs_dim) -> actions (E, N, max_act_dim), zero-padded, and log-probabilities (E, N): each agent
    acts on its own observation with its own actor, in a loop or, given stack_actors', in one pass (same numbers)."""
    max_act_dim = max(actor.act_dim for actor in actors)
    noise = torch.randn(obs.shape[:2] + (max_act_dim,), device=obs.device) * (not deterministic)  # (E, N, max_act)
    if stacked is not None:
        params, buffers, base = stacked
        mean, std = vmap(functional_call, in_dims=(None, 0, 1), out_dims=1)(base, (params, buffers), obs)
        action = mean + std * noise
        return action, Normal(mean, std).log_prob(action).sum(-1)
    actions, logprobs = [], []
    for i, actor in enumerate(actors):
        mean, std = actor(obs[:, i])
        action = mean + std * noise[:, i, : actor.act_dim]
        logprobs.append(Normal(mean, std).log_prob(action).sum(-1))
        actions.append(F.pad(action, (0, max_act_dim - actor.act_dim)))
    return torch.stack(actions, 1), torch.stack(logprobs, 1)


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


@torch.no_grad()
def advantages_and_returns(critic: nn.Module, value_norm: ValueNorm, rollout: tuple, args: Args) -> tuple:
    """GAE advantages, value targets (advantages + values) and values, each (T, E), from the rollout's states, the
    states its steps reached, rewards, terminations and dones; the value normalization takes on the new targets."""
    states, next_states, rewards, terminations, dones = rollout
    mean, std = value_norm.mean_std()
    values = critic(states).squeeze(-1) * std + mean  # the critic's outputs are normalized values
    next_values = (critic(next_states).squeeze(-1) * std + mean) * (1.0 - terminations)
    advantages = compute_gae(rewards, values, next_values, dones, args.gamma, args.gae_lambda)
    returns = advantages + values
    value_norm.update(returns)
    return advantages, returns, values


def factor_used(factor: Tensor, mode: str, factor_clip: float) -> Tensor:
    """The factor that weights agent i_k's advantage: min(M, c) (LV-HAPPO), M (HAPPO) or 1 (MAPPO-style)."""
    if mode == "none":
        return torch.ones_like(factor)
    return factor.clamp(max=factor_clip) if mode == "clipped" else factor


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


def agent_step(actor: nn.Module, optimizer, samples: list, args: Args, logs: dict) -> None:
    """One step on -E[m_used * min(r A, clip(r, 1 - eps, 1 + eps) A)] - ent_coef * entropy over a minibatch of an
    agent's samples (obs, actions, behaviour log-probabilities, advantages, m_used)."""
    obs, actions, oldlogprob, advantages, m_used = samples
    dist = actor.distribution(obs)
    ratio = (dist.log_prob(actions) - oldlogprob).exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * advantages)
    pg_loss = -(m_used * surrogate).mean()
    entropy_loss = dist.entropy().mean()
    logs["policy_loss"].append(pg_loss.item())
    logs["entropy"].append(entropy_loss.item())
    gradient_step(optimizer, pg_loss - args.ent_coef * entropy_loss, actor.parameters(), args.max_grad_norm, logs)


@torch.no_grad()
def agent_logratio(actor: nn.Module, samples: tuple) -> Tensor:
    """log(pi_now / pi_behaviour) of the agent's actions on every sample (obs, actions, behaviour log-probabilities)."""
    obs, actions, oldlogprob = samples[:3]
    return actor.distribution(obs).log_prob(actions) - oldlogprob


def log_update(logratio: Tensor, clip_coef: float, logs: dict) -> None:
    """An agent's update, measured on its whole batch: the approximate KL(old || new) and the clip fraction."""
    ratio = logratio.exp()
    logs["approx_kl"].append(((ratio - 1) - logratio).mean().item())
    logs["clipfrac"].append(((ratio - 1.0).abs() > clip_coef).float().mean().item())


def log_factor(writer: SummaryWriter, k: int, factor: Tensor, weighted: Tensor, factor_clip: float, step: int) -> None:
    """The factor M seen at position k of the order, and the variance of m_used * A (the README's `lv/` tags)."""
    writer.add_scalar(f"lv/factor_mean_{k}", factor.mean().item(), step)
    writer.add_scalar(f"lv/factor_max_{k}", factor.max().item(), step)
    writer.add_scalar(f"lv/factor_clip_fraction_{k}", (factor > factor_clip).float().mean(), step)
    writer.add_scalar(f"lv/adv_variance_{k}", weighted.var().nan_to_num().item(), step)


def update_actors(actors: list, optimizers: list, batch: tuple, args: Args, writer, step: int, logs: dict) -> None:
    """LV-HAPPO's sequential update of separate actors. In a random order i_1, ..., i_n, agent i_k goes through all
    its epochs on

        L(i_k) = -E[ m_used * min(r A, clip(r, 1 - eps, 1 + eps) A) ] - ent_coef * entropy,
        m_used = min(M, c),   M = prod_{j < k} r^{i_j}   (HAPPO: m_used = M; MAPPO-style: m_used = 1),

    r being the agent's ratio pi_new / pi_behaviour; then its ratio on every sample multiplies the unclipped M that
    the next agent sees. batch: obs (B, N, max_obs_dim), actions (B, N[, max_act_dim]), behaviour log-probabilities
    (B, N), advantages (B,)."""
    b_obs, b_actions, b_logprobs, b_advantages = batch
    batch_size, num_agents = b_logprobs.shape
    factor = torch.ones(batch_size, device=b_advantages.device)  # M: 1 for the first agent of the order
    order = list(range(num_agents)) if args.fixed_order else torch.randperm(num_agents).tolist()  # fresh each call
    for k, agent in enumerate(order):
        actor, optimizer = actors[agent], optimizers[agent]
        m_used = factor_used(factor, args.factor, args.factor_clip)
        log_factor(writer, k, factor, m_used * b_advantages, args.factor_clip, step)
        actions = b_actions[:, agent, : actor.act_dim] if b_actions.dim() > 2 else b_actions[:, agent]  # unpadded
        samples = (b_obs[:, agent], actions, b_logprobs[:, agent], b_advantages, m_used)
        for epoch in range(args.update_epochs):
            for mb in torch.randperm(batch_size).tensor_split(args.num_minibatches):  # near-equal minibatches
                agent_step(actor, optimizer, [x[mb] for x in samples], args, logs)
        logratio = agent_logratio(actor, samples)
        log_update(logratio, args.clip_coef, logs)
        factor = factor * logratio.exp()  # the carry: the unclipped M times agent i_k's new ratio


def update_shared_actor(actor: nn.Module, optimizer, batch: tuple, args: Args, writer, step: int, logs: dict) -> None:
    """The paper's update of one actor shared by all agents: in each epoch M restarts at 1; for each minibatch, every
    agent of the order takes one step on its samples of it, weighted as in update_actors, and its ratio on every sample
    then multiplies M. The last epoch's first pass is logged. The batch as in update_actors."""
    b_obs, b_actions, b_logprobs, b_advantages = batch
    batch_size, num_agents = b_logprobs.shape
    order = list(range(num_agents)) if args.fixed_order else torch.randperm(num_agents).tolist()
    for epoch in range(args.update_epochs):
        factor = torch.ones(batch_size, device=b_advantages.device)
        for mb_index, mb in enumerate(torch.randperm(batch_size).tensor_split(args.num_minibatches)):
            for k, agent in enumerate(order):
                m_used = factor_used(factor, args.factor, args.factor_clip)
                if epoch == args.update_epochs - 1 and mb_index == 0:
                    log_factor(writer, k, factor, m_used * b_advantages, args.factor_clip, step)
                actions = b_actions[:, agent, : actor.act_dim] if b_actions.dim() > 2 else b_actions[:, agent]
                samples = (b_obs[:, agent], actions, b_logprobs[:, agent], b_advantages, m_used)
                agent_step(actor, optimizer, [x[mb] for x in samples], args, logs)
                logratio = agent_logratio(actor, samples)
                log_update(logratio, args.clip_coef, logs)
                factor = factor * logratio.exp()  # the carry, as in update_actors


def fail(message: str) -> None:  # one line on stderr that says what to do, and exit status 1
    sys.exit(f"{os.path.basename(__file__)}: error: {message}")


def check_args(args: Args) -> Optional[str]:
    """What is wrong with the flags, as one line that says what to do, or None."""
    positive = "total_timesteps num_envs num_steps num_minibatches max_episode_steps eval_episodes learning_rate"
    positive = (positive + " clip_coef max_grad_norm factor_clip critic_learning_rate").split()
    for name, value in vars(args).items():
        wrong = isinstance(value, (int, float)) and not (value > 0 if name in positive else value >= 0)
        if wrong or (isinstance(value, float) and not math.isfinite(value)):
            words = "a positive number" if name in positive else "a finite number, not negative"
            return f"--{name.replace('_', '-')} must be {words}, got {value}"
    problems = [
        (args.env_id not in ENV_IDS, f"unknown --env-id {args.env_id!r}: choose one of {', '.join(ENV_IDS)}"),
        (args.seed >= 2**32, f"--seed must be below 2**32, got {args.seed}"),  # the environments' seeding
        (max(args.gamma, args.gae_lambda) > 1, "--gamma and --gae-lambda must lie in [0, 1]"),
        (not args.hidden_sizes or min(args.hidden_sizes) < 1, "--hidden-sizes needs positive sizes, e.g. 128 128"),
        (args.num_minibatches > args.num_envs * args.num_steps, "--num-minibatches exceeds the batch's samples"),
        (args.standardize_obs and not args.global_obs, "--standardize-obs acts on --global-obs's vectors: add it"),
        (args.eval_model and not os.path.isfile(args.eval_model), f"--eval-model {args.eval_model}: no such file"),
        (args.resume and not os.path.isfile(args.resume), f"--resume {args.resume}: no such file"),
        (args.eval_model and (args.resume or args.save_model), "with --eval-model, drop --resume and --save-model"),
        (args.capture_video and not importlib.util.find_spec("moviepy"), "--capture-video needs: pip install moviepy"),
        (args.track and not importlib.util.find_spec("wandb"), "--track needs wandb: pip install wandb"),
    ]
    if (problem := next((message for wrong, message in problems if wrong), None)) is not None:
        return problem
    try:  # MaMuJoCo's partitions of the task, checked without building the robot
        partition(args.env_id, args.agent_conf)
    except Exception as error:
        return f"{args.env_id} has no partition --agent-conf {args.agent_conf!r} ({error}): see the README's list"


def evaluate(actors: nn.ModuleList, args: Args, device: torch.device, video_folder: Optional[str] = None) -> float:
    """The mean team return of deterministic episodes on an environment of their own (seeded apart from training's),
    printed with its spread."""
    env = make_env(args, "rgb_array")()
    if video_folder is not None:
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda _: True, disable_logger=True)
    returns, stacked = [], stack_actors(actors)
    for episode in range(args.eval_episodes):
        next_obs, _ = env.reset(seed=args.seed + 10_000 + episode)
        done, episodic_return = False, 0.0
        while not done:
            obs = torch.as_tensor(next_obs["obs"], device=device).unsqueeze(0)
            action, _ = act(actors, obs, deterministic=True, stacked=stacked)
            next_obs, reward, terminated, truncated, _ = env.step(action[0].cpu().numpy())
            episodic_return, done = episodic_return + reward, terminated or truncated
        returns.append(episodic_return)
    env.close()
    mean, std = np.mean(returns), np.std(returns)
    print(f"eval: episodic_return {mean:.2f} ± {std:.2f} (mean ± std of {len(returns)} episodes)")
    return float(mean)


def make_actors(args: Args, obs_dims: list, act_dims: list, device: torch.device) -> tuple[nn.ModuleList, list]:
    """The actors (one per agent, or one for all with --share-actor) and the one each agent acts with."""
    sizes = list(zip(obs_dims, act_dims, strict=True))[: 1 if args.share_actor else None]
    actors = nn.ModuleList(Actor(o, a, args.hidden_sizes) for o, a in sizes)
    return actors.to(device), [actors[0]] * len(obs_dims) if args.share_actor else list(actors)


def evaluate_saved_model(args: Args) -> None:
    """--eval-model: the actors of the file, built with the flags of the run that saved them, in --eval-episodes
    deterministic episodes (recorded with --capture-video), their returns printed; nothing is trained or written."""
    video_folder = f"videos/{os.path.basename(args.eval_model)}" if args.capture_video else None  # asked for here
    saved, args = load_run(args.eval_model, args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    env = make_env(args)()
    actors, policies = make_actors(args, env.obs_dims, env.act_dims, device)
    env.close()
    restore(saved, {"actors": actors})
    evaluate(policies, args, device, video_folder)
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
    if (problem := check_args(args)) is not None:
        fail(problem)
    os.environ.setdefault("MUJOCO_GL", "egl")  # MuJoCo renders off-screen for --capture-video
    check_env(args)
    if args.eval_model:  # evaluate a saved model instead of training, and exit
        evaluate_saved_model(args)
    checkpoint, args = (None, args) if args.resume is None else load_run(args.resume, args)  # the run's own flags
    args.batch_size = int(args.num_envs * args.num_steps)
    args.critic_learning_rate = args.critic_learning_rate or args.learning_rate
    args.num_iterations = max(1, args.total_timesteps // args.batch_size)
    run_name = f"{args.env_id}_{args.agent_conf}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = run_name if checkpoint is None else checkpoint["run_name"]  # a resumed run goes on in its own folder

    # TRY NOT TO MODIFY: seeding
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.distributions.Distribution.set_default_validate_args(False)  # argument checks cost more than the math
    if args.cuda and not torch.cuda.is_available():
        print("warning: --cuda given but no GPU is available; training on the CPU", file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # small networks gain little from more

    # env setup: SAME_STEP autoreset puts an episode's final state, which the critic bootstraps, in infos
    envs = gym.vector.SyncVectorEnv([make_env(args)] * args.num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs_dims, act_dims = envs.get_attr("obs_dims")[0], envs.get_attr("act_dims")[0]  # each agent's own sizes
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    num_agents = len(obs_dims)
    obs_shape = envs.single_observation_space["obs"].shape  # (num_agents, max_obs_dim)
    state_dim = envs.single_observation_space["state"].shape[0]
    action_shape = envs.single_action_space.shape  # (num_agents, max_act_dim)

    actors, policies = make_actors(args, obs_dims, act_dims, device)  # agent i acts with policies[i]
    critic = mlp(state_dim, args.hidden_sizes, 1, out_std=1.0).to(device)  # the centralized critic V(s)
    value_norm = ValueNorm().to(device)
    actor_optimizers = [torch.optim.Adam(a.parameters(), lr=args.learning_rate, eps=1e-5, fused=True) for a in actors]
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate, eps=1e-5, fused=True)

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs) + obs_shape, device=device)  # (T, E, N, max_obs_dim)
    states = torch.zeros((args.num_steps, args.num_envs, state_dim), device=device)  # (T, E, state_dim)
    next_states = torch.zeros_like(states)  # the state step t reached: the final one where an episode was truncated
    actions = torch.zeros((args.num_steps, args.num_envs) + action_shape, device=device)  # (T, E, N, max_act_dim)
    logprobs = torch.zeros((args.num_steps, args.num_envs, num_agents), device=device)  # (T, E, N)
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
    recent_returns, mean_return = [], float("nan")

    for iteration in range(start_iteration, args.num_iterations + 1):
        if args.anneal_lr:  # every learning rate decays linearly from its initial value to 0 over the run
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            for optimizer in [*actor_optimizers, critic_optimizer]:
                optimizer.param_groups[0]["lr"] = frac * optimizer.defaults["lr"]
        if iteration == start_iteration or (args.checkpoint_every and (iteration - 1) % args.checkpoint_every == 0):
            # new episodes, seeded by the iteration: a run resumed from a checkpoint continues exactly
            next_obs_np, _ = envs.reset(seed=args.seed + iteration - 1)
            next_obs, next_state = (torch.as_tensor(next_obs_np[key], device=device) for key in ("obs", "state"))

        rollout_start, stacked = time.time(), stack_actors(policies)
        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step], states[step] = next_obs, next_state

            # ALGO LOGIC: each agent acts on its own observation with its own actor
            actions[step], logprobs[step] = act(policies, next_obs, stacked=stacked)

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs_np, reward, terminated, truncated, infos = envs.step(actions[step].cpu().numpy())
            for buffer, value in ((rewards, reward), (terminations, terminated), (dones, terminated | truncated)):
                buffer[step] = torch.as_tensor(value, device=device)
            next_obs, next_state = (torch.as_tensor(next_obs_np[key], device=device) for key in ("obs", "state"))
            next_states[step] = reached_states(next_state, truncated, infos)
            for env_idx in np.flatnonzero(infos.get("_episode", [])):
                recent_returns.append(float(infos["episode"]["r"][env_idx]))
                writer.add_scalar("charts/episodic_return", recent_returns[-1], global_step)
                writer.add_scalar("charts/episodic_length", infos["episode"]["l"][env_idx], global_step)

        # bootstrap value if not done
        update_start = time.time()
        rollout = (states, next_states, rewards, terminations, dones)
        advantages, returns, values = advantages_and_returns(critic, value_norm, rollout, args)  # (T, E) each

        b_obs, b_states, b_actions, b_logprobs = (x.flatten(0, 1) for x in (obs, states, actions, logprobs))
        mean, std = value_norm.mean_std()
        b_returns, b_values = (returns.flatten() - mean) / std, (values.flatten() - mean) / std  # normalized
        b_advantages = (advantages.flatten() - advantages.mean()) / (advantages.std() + 1e-8)  # normalized

        # ALGO LOGIC: sequential actor updates in a random order, each agent's advantage weighted by min(M, c)
        logs = {name: [] for name in ("policy_loss", "entropy", "approx_kl", "clipfrac", "value_loss", "skipped_steps")}
        batch = (b_obs, b_actions, b_logprobs, b_advantages)
        if args.share_actor:
            update_shared_actor(actors[0], actor_optimizers[0], batch, args, writer, global_step, logs)
        else:
            update_actors(actors, actor_optimizers, batch, args, writer, global_step, logs)

        # ALGO LOGIC: critic update on the normalized returns
        for epoch in range(args.update_epochs):
            for mb_inds in torch.randperm(args.batch_size).tensor_split(args.num_minibatches):
                newvalue = critic(b_states[mb_inds]).squeeze(-1)
                v_loss = critic_loss(newvalue, b_values[mb_inds], b_returns[mb_inds], args.clip_coef).mean()
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
            mean_return, recent_returns = np.mean(recent_returns), []
        if args.eval_every and iteration % args.eval_every == 0 and iteration < args.num_iterations:
            writer.add_scalar("eval/episodic_return", evaluate(policies, args, device), global_step)
        print(f"global_step={global_step}, episodic_return={mean_return:.2f}, SPS={sps}", flush=True)
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
        video_folder = f"videos/{run_name}" if args.capture_video else None
        writer.add_scalar("eval/episodic_return", evaluate(policies, args, device, video_folder), global_step)

    writer.close()
