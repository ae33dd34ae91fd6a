# lv_hatrpo_mpe.py: LV-HATRPO on MPE (PettingZoo MPE, package mpe2). Docs: README.md, section "lv_hatrpo_mpe.py".
import contextlib
import copy
import importlib
import importlib.util
import io
import multiprocessing
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Categorical, Normal, kl_divergence
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

ENV_IDS = ("simple_spread_v3", "simple_reference_v3", "simple_speaker_listener_v4")


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
    """if toggled, record the evaluation episodes as videos under `videos/{run_name}` (headless)"""
    save_model: bool = False
    """if toggled, save the model to `runs/{run_name}` and evaluate it from that file"""
    checkpoint_every: int = 0
    """write `runs/{run_name}/checkpoint.pt` every this many iterations and at the end (0: only on an interrupt);
    each one starts new episodes, so that a run resumed from it continues exactly"""
    resume: Optional[str] = None
    """continue from this checkpoint (with the run's own flags; a larger --total-timesteps goes further)"""
    max_bad_updates: int = 3
    """stop after this many iterations in a row whose update met a non-finite loss, gradient or parameter"""

    # Algorithm specific arguments
    env_id: str = "simple_spread_v3"
    """the MPE scenario: simple_spread_v3, simple_reference_v3 or simple_speaker_listener_v4"""
    num_agents: Optional[int] = None
    """the number of agents of simple_spread_v3 (3 when not given; the other scenarios have 2)"""
    continuous_actions: bool = True
    """if toggled, continuous actions (Gaussian policies); `--no-continuous-actions` for discrete ones"""
    max_cycles: int = 25
    """the length of an episode (it is truncated, never terminated, after this many steps)"""
    total_timesteps: int = 1_000_000
    """total joint environment steps of the experiment"""
    learning_rate: float = 5e-4
    """the learning rate of the critic's optimizer (the actors take trust-region steps, no learning rate)"""
    anneal_lr: bool = False
    """if toggled, anneal the critic's learning rate linearly to zero"""
    num_envs: int = 10
    """the number of parallel environments"""
    vector_env: Literal["sync", "async"] = "sync"
    """gymnasium's vector environment: `sync` (one process) or `async` (one subprocess per environment)"""
    torch_threads: int = 1
    """torch's CPU threads: small networks gain little from more, and busy cores make extra threads spin-wait"""
    num_steps: int = 100
    """the number of steps to run in each environment per policy rollout"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 1
    """the number of mini-batches per epoch of the critic (each actor's step uses the whole batch)"""
    critic_epochs: int = 5
    """the number of epochs of the critic's update"""
    norm_adv: bool = True
    """if toggled, normalize the advantages over the batch"""
    clip_coef: float = 0.2
    """the value-loss clipping coefficient (also the ratio band of `losses/clipfrac`)"""
    clip_vloss: bool = True
    """if toggled, use the clipped value loss"""
    huber_delta: Optional[float] = 10.0
    """the delta of the critic's Huber loss (`None` for the squared error)"""
    norm_value: bool = True
    """if toggled, normalize the value targets with running statistics"""
    max_grad_norm: float = 10.0
    """the maximum norm for the gradient clipping of the critic"""
    hidden_sizes: tuple[int, ...] = (128, 128)
    """the hidden layer sizes of the actors and the critic"""
    std_param: Literal["sigmoid", "log"] = "sigmoid"
    """Gaussian std: `sigmoid` is HARL's 0.5*sigmoid(p) (0.37 at start, at most 0.5); `log` is a free log-std"""
    factor: Literal["clipped", "raw", "none"] = "clipped"
    """the factor M that weights a later agent's advantage: `clipped` min(M, c) is LV-HATRPO, `raw` is plain
    HATRPO, `none` (M = 1) is the MAPPO-style (MATRPO) update"""
    factor_clip: float = 1.0
    """the upper bound c of the clipped factor"""
    kl_threshold: float = 0.005
    """the trust region: the bound delta on the mean KL(pi_old || pi_new) of each agent's step"""
    cg_iters: int = 10
    """the conjugate-gradient iterations that solve F x = g for the natural gradient"""
    cg_damping: float = 0.1
    """the damping added to the Fisher matrix (F + damping * I) in the conjugate gradient"""
    ls_steps: int = 10
    """the most steps of the backtracking line search"""
    backtrack_coef: float = 0.8
    """the factor that shrinks the step at each line-search step"""
    accept_ratio: float = 0.5
    """a step is accepted when its surrogate improvement is at least this fraction of the linear prediction"""
    fixed_order: bool = False
    """if toggled, update the agents in their fixed order instead of a random permutation per iteration"""
    eval_episodes: int = 10
    """the number of deterministic evaluation episodes at the end (with --save-model or --capture-video)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


def parse_args(argv: Optional[list] = None) -> Args:
    """tyro's parser, its boxed error report folded into one line (help still prints in full)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(Args, args=argv)
    except SystemExit as exit_:
        if not exit_.code:
            raise
        # the box's body up to its first rule: the message, without the help text tyro appends
        report = captured.getvalue().splitlines()[1:]
        report = report[: next((i for i, line in enumerate(report) if "───" in line), len(report))]
        message = " ".join(re.sub(r"[│╭╮╰╯]", " ", " ".join(report)).split())
        sys.exit(f"{os.path.basename(__file__)}: error: {message} (see --help)")


def check_args(args: Args) -> Optional[str]:
    """Returns what is wrong with the flags, as one line that says what to do, or None."""
    if args.env_id not in ENV_IDS:
        return f"unknown --env-id {args.env_id!r}: choose one of {', '.join(ENV_IDS)}"
    if args.num_agents is not None:
        if args.num_agents < 1:
            return f"--num-agents must be at least 1, got {args.num_agents}"
        if args.env_id != "simple_spread_v3" and args.num_agents != 2:
            return f"{args.env_id} always has 2 agents: leave out --num-agents"
    for name in (
        "total_timesteps",
        "num_envs",
        "num_steps",
        "num_minibatches",
        "max_cycles",
        "eval_episodes",
        "cg_iters",
        "ls_steps",
    ):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    for name in ("learning_rate", "clip_coef", "max_grad_norm", "factor_clip", "kl_threshold", "backtrack_coef"):
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    if args.torch_threads < 1:
        return f"--torch-threads must be at least 1, got {args.torch_threads}"
    if args.checkpoint_every < 0 or args.max_bad_updates < 1:
        return "--checkpoint-every must not be negative and --max-bad-updates must be at least 1"
    if args.resume is not None and not os.path.isfile(args.resume):
        return f"--resume {args.resume}: no such file (checkpoints are written to runs/<run>/checkpoint.pt)"
    if args.critic_epochs < 0 or args.cg_damping < 0:
        return "--critic-epochs and --cg-damping must not be negative"
    if not (args.backtrack_coef < 1 and 0 <= args.accept_ratio <= 1):
        return "--backtrack-coef must lie in (0, 1) and --accept-ratio in [0, 1]"
    if not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        return "--gamma and --gae-lambda must lie in [0, 1]"
    if args.huber_delta is not None and not args.huber_delta > 0:
        return f"--huber-delta must be positive (or None for the squared error), got {args.huber_delta}"
    if not args.hidden_sizes or min(args.hidden_sizes) < 1:
        return "--hidden-sizes needs at least one positive layer size, e.g. --hidden-sizes 128 128"
    if args.num_minibatches > args.num_envs * args.num_steps:
        return f"--num-minibatches {args.num_minibatches} exceeds the batch of {args.num_envs * args.num_steps} samples"
    return None


def padded_bounds(spaces: list, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The agents' action bounds as two (num_agents, width) arrays, padding unbounded: one clip for all agents."""
    low = np.full((len(spaces), width), -np.inf, np.float32)
    high = np.full((len(spaces), width), np.inf, np.float32)
    for i, space in enumerate(spaces):
        low[i, : space.shape[0]], high[i, : space.shape[0]] = space.low, space.high
    return low, high


class MultiAgentArrays(gym.Env):
    """One MPE scenario seen as a gymnasium Env of arrays, so that gymnasium's vector API batches it.

    Observation: a dict of `obs` (num_agents, max_obs_dim), each agent's observation zero-padded to the largest,
    `state` (state_dim,), the global state, and `active` (num_agents,), 1 for agents alive before this step.
    Action: (num_agents, max_act_dim) floats, each agent reading its first act_dim entries (continuous), or one
    integer per agent (discrete). Reward: the team reward, the sum of the agents' rewards.

    It drives mpe2's own environment (`raw_env`) through PettingZoo's AEC calls, one agent's action after another,
    the last one stepping the world, as `parallel_env` does inside; that conversion also observes every agent before
    each action and routes every call through three wrappers, about half the time of a step. Same numbers: the tests
    step both side by side.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self, env_id: str, num_agents: Optional[int], continuous_actions: bool, max_cycles: int, render_mode=None
    ):
        kwargs = {"N": num_agents or 3} if env_id == "simple_spread_v3" else {}
        module = importlib.import_module(f"mpe2.{env_id}")
        self.env = module.raw_env(
            continuous_actions=continuous_actions, max_cycles=max_cycles, render_mode=render_mode, **kwargs
        )
        self.render_mode = render_mode
        self.continuous = continuous_actions
        self.agents = list(self.env.possible_agents)
        act_spaces = [self.env.action_space(a) for a in self.agents]
        self.obs_dims = [self.env.observation_space(a).shape[0] for a in self.agents]
        self.act_dims = [s.shape[0] if continuous_actions else int(s.n) for s in act_spaces]
        n = len(self.agents)
        self.observation_space = gym.spaces.Dict(
            {
                "obs": gym.spaces.Box(-np.inf, np.inf, (n, max(self.obs_dims)), np.float32),
                "state": gym.spaces.Box(-np.inf, np.inf, self.env.state_space.shape, np.float32),
                "active": gym.spaces.Box(0.0, 1.0, (n,), np.float32),
            }
        )
        if continuous_actions:
            self.act_low, self.act_high = padded_bounds(act_spaces, max(self.act_dims))
            self.action_space = gym.spaces.Box(-np.inf, np.inf, (n, max(self.act_dims)), np.float32)
        else:
            self.action_space = gym.spaces.MultiDiscrete(self.act_dims)

    def _arrays(self) -> dict:
        obs = [self.env.observe(agent) for agent in self.agents]
        padded = np.zeros(self.observation_space["obs"].shape, np.float32)
        for i, agent_obs in enumerate(obs):
            padded[i, : self.obs_dims[i]] = agent_obs
        # MPE's env.state() is the agents' observations concatenated; joining the ones at hand spares recomputing them
        state = np.concatenate(obs, dtype=np.float32)
        # MPE's agents all stay in the game until the episode ends, for all of them at once
        return {"obs": padded, "state": state, "active": np.ones(len(self.agents), np.float32)}

    def reset(self, seed: Optional[int] = None, options: Optional[dict] = None):
        self.env.reset(seed=seed, options=options)
        return self._arrays(), {}

    def step(self, action: np.ndarray):
        if self.continuous:  # the Gaussian sample is clipped to the bounds here only, not in its stored log-prob
            action = np.clip(action, self.act_low, self.act_high)
        for i in range(len(self.agents)):  # AEC order: each agent's action in turn, the last one steps the world
            self.env.step(action[i, : self.act_dims[i]] if self.continuous else int(action[i]))
        reward = float(sum(self.env.rewards[agent] for agent in self.agents))
        terminated = any(self.env.terminations[agent] for agent in self.agents)
        truncated = any(self.env.truncations[agent] for agent in self.agents)
        return self._arrays(), reward, terminated, truncated, {}

    def render(self):
        return self.env.render()

    def close(self):
        self.env.close()


def make_env(env_id: str, num_agents: Optional[int], continuous_actions: bool, max_cycles: int, render_mode=None):
    def thunk():
        if multiprocessing.parent_process() is not None:  # an async worker: interrupts are the learner's to handle
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return MultiAgentArrays(env_id, num_agents, continuous_actions, max_cycles, render_mode)

    return thunk


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(in_dim: int, hidden_sizes: tuple[int, ...]) -> nn.Sequential:
    """LayerNorm on the input, then Linear-ReLU-LayerNorm blocks (HARL's MLP base)."""
    layers = [nn.LayerNorm(in_dim)]
    for size in hidden_sizes:
        layers += [layer_init(nn.Linear(in_dim, size)), nn.ReLU(), nn.LayerNorm(size)]
        in_dim = size
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """One agent's policy over its local observation: Gaussian (state-independent std) or categorical."""

    def __init__(self, obs_dim: int, act_dim: int, continuous: bool, hidden_sizes: tuple[int, ...], std_param: str):
        super().__init__()
        self.obs_dim, self.act_dim, self.continuous, self.std_type = obs_dim, act_dim, continuous, std_param
        self.net = mlp(obs_dim, hidden_sizes)
        self.head = layer_init(nn.Linear(hidden_sizes[-1], act_dim), std=0.01)
        if continuous:  # HARL: std = 0.5 * sigmoid(p), p = 1 at start; else log std = p, p = 0 at start
            self.std_param = nn.Parameter(torch.full((act_dim,), 1.0 if std_param == "sigmoid" else 0.0))

    def distribution(self, obs: torch.Tensor) -> torch.distributions.Distribution:
        """The action distribution given padded observations (..., max_obs_dim)."""
        out = self.head(self.net(obs[..., : self.obs_dim]))
        if not self.continuous:
            return Categorical(logits=out)
        return Normal(out, self.std().expand_as(out))

    def std(self) -> torch.Tensor:
        """The state-independent standard deviation of a Gaussian policy, one per action dimension."""
        return 0.5 * torch.sigmoid(self.std_param) if self.std_type == "sigmoid" else self.std_param.exp()

    def log_prob_entropy(self, dist: torch.distributions.Distribution, action: torch.Tensor):
        """Log-probability of padded actions and the entropy, summed over action dimensions when continuous."""
        if not self.continuous:
            return dist.log_prob(action), dist.entropy()
        return dist.log_prob(action[..., : self.act_dim]).sum(-1), dist.entropy().sum(-1)


class BatchedActors:
    """Every agent's actor as one network for acting: each layer's weights stacked along a leading agent dimension
    and applied by one batched matmul, instead of a Python loop over agents (same distributions, fewer calls).

    Agents of different sizes are zero-padded: the input LayerNorm runs over each agent's own observation entries,
    and the padded action entries get no probability. The Actor modules stay the source of truth; `load` copies
    their weights in after every update.
    """

    def __init__(self, actors: nn.ModuleList):
        device = actors[0].head.weight.device
        obs_dims = torch.tensor([a.obs_dim for a in actors], device=device).view(-1, 1, 1)
        act_dims = torch.tensor([a.act_dim for a in actors], device=device).view(-1, 1, 1)
        self.shapes = (int(obs_dims.max()), int(act_dims.max()))  # (max_obs_dim, max_act_dim)
        self.continuous, self.obs_dims = actors[0].continuous, obs_dims.float()  # (N, 1, 1)
        self.obs_mask = torch.arange(self.shapes[0], device=device) < obs_dims  # (N, 1, max_obs_dim)
        self.act_mask = torch.arange(self.shapes[1], device=device) < act_dims  # (N, 1, max_act_dim)
        self.load(actors)

    @torch.no_grad()
    def load(self, actors: nn.ModuleList) -> None:
        def stack(tensors: list, shape: tuple) -> torch.Tensor:  # zero-padded to shape, stacked over agents
            padded = tensors[0].new_zeros((len(tensors),) + shape)
            for i, t in enumerate(tensors):
                padded[(i,) + tuple(slice(0, n) for n in t.shape)] = t
            return padded

        max_obs_dim, max_act_dim = self.shapes
        layers = [list(actor.net) for actor in actors]  # LayerNorm, then (Linear, ReLU, LayerNorm) per hidden layer
        self.norm_in = [
            stack([layer[0].weight for layer in layers], (max_obs_dim,)).unsqueeze(1),
            stack([layer[0].bias for layer in layers], (max_obs_dim,)).unsqueeze(1),
        ]
        self.hidden = []
        for j in range(1, len(layers[0]), 3):
            linear, norm = [layer[j] for layer in layers], [layer[j + 2] for layer in layers]
            out_dim, in_dim = linear[-1].weight.shape[0], max_obs_dim if j == 1 else linear[-1].weight.shape[1]
            self.hidden.append(
                [
                    stack([m.weight for m in linear], (out_dim, in_dim)).transpose(1, 2),
                    stack([m.bias for m in linear], (out_dim,)).unsqueeze(1),
                    stack([m.weight for m in norm], (out_dim,)).unsqueeze(1),
                    stack([m.bias for m in norm], (out_dim,)).unsqueeze(1),
                ]
            )
        hidden_dim = actors[0].head.weight.shape[1]
        self.head = [
            stack([a.head.weight for a in actors], (max_act_dim, hidden_dim)).transpose(1, 2),
            stack([a.head.bias for a in actors], (max_act_dim,)).unsqueeze(1),
        ]
        if self.continuous:
            stds = [a.std() for a in actors]
            self.std = stack(stds, (max_act_dim,)).unsqueeze(1) + ~self.act_mask  # padding: std 1, masked anyway

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (E, N, max_obs_dim) -> actions (E, N, max_act_dim) or (E, N), log-probabilities (E, N)."""
        x = obs.transpose(0, 1) * self.obs_mask  # (N, E, max_obs_dim)
        mean = x.sum(-1, keepdim=True) / self.obs_dims
        var = ((x - mean) * self.obs_mask).pow(2).sum(-1, keepdim=True) / self.obs_dims
        x = (x - mean) / (var + 1e-5).sqrt() * self.norm_in[0] + self.norm_in[1]
        for weight, bias, norm_weight, norm_bias in self.hidden:
            x = torch.baddbmm(bias, x, weight).relu()
            x = F.layer_norm(x, x.shape[-1:]) * norm_weight + norm_bias
        out = torch.baddbmm(self.head[1], x, self.head[0])  # (N, E, max_act_dim)
        if self.continuous:
            action = out if deterministic else out + self.std * torch.randn_like(out)
            action = action * self.act_mask
            logprob = (Normal(out, self.std).log_prob(action) * self.act_mask).sum(-1)
            return action.transpose(0, 1), logprob.transpose(0, 1)
        dist = Categorical(logits=out.masked_fill(~self.act_mask, -torch.inf))
        action = dist.probs.argmax(-1) if deterministic else dist.sample()
        return action.transpose(0, 1), dist.log_prob(action).transpose(0, 1)


class Critic(nn.Module):
    """Centralized value function V(s) on the global state."""

    def __init__(self, state_dim: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.net = nn.Sequential(mlp(state_dim, hidden_sizes), layer_init(nn.Linear(hidden_sizes[-1], 1), std=1.0))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state).squeeze(-1)


class ValueNorm(nn.Module):
    """Running mean and variance of the value targets (debiased exponential averages, as in MAPPO and HARL).

    The critic predicts normalized values; `denormalize` maps them back to returns. Disabled, it is the identity.
    """

    def __init__(self, enabled: bool = True, beta: float = 0.99999, epsilon: float = 1e-5):
        super().__init__()
        self.enabled, self.beta, self.epsilon = enabled, beta, epsilon
        self.register_buffer("running_mean", torch.zeros(()))
        self.register_buffer("running_mean_sq", torch.zeros(()))
        self.register_buffer("debiasing_term", torch.zeros(()))

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        debias = self.debiasing_term.clamp(min=self.epsilon)
        mean, mean_sq = self.running_mean / debias, self.running_mean_sq / debias
        return mean, (mean_sq - mean**2).clamp(min=1e-2)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if self.enabled:
            self.running_mean.mul_(self.beta).add_(x.mean() * (1 - self.beta))
            self.running_mean_sq.mul_(self.beta).add_((x**2).mean() * (1 - self.beta))
            self.debiasing_term.mul_(self.beta).add_(1 - self.beta)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        mean, var = self.mean_var()
        return (x - mean) / var.sqrt()

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        mean, var = self.mean_var()
        return x * var.sqrt() + mean


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_value: torch.Tensor,
    terminations: torch.Tensor,
    truncations: torch.Tensor,
    final_values: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """GAE(gamma, lambda) over a rollout of shape (num_steps, num_envs) with exact episode ends.

    delta_t = r_t + gamma * V_next_t - V(s_t), A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}, where
    V_next_t is V(s_{t+1}) inside an episode, 0 after a termination, and V(final state) after a truncation (the
    vector env has already reset, so s_{t+1} belongs to the next episode); next_value is V of the state after the
    last step and final_values holds V(final state) where truncations is set.
    """
    next_values = torch.cat([values[1:], next_value.unsqueeze(0)])
    next_values = torch.where(truncations.bool(), final_values, next_values) * (1.0 - terminations)
    not_done = 1.0 - torch.maximum(terminations, truncations)
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * not_done[t] * lastgaelam
    return advantages


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the samples where mask is 1 (masked samples, e.g. dead agents, count for nothing)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def factor_used(factor: torch.Tensor, mode: str, factor_clip: float) -> torch.Tensor:
    """The factor that weights agent i_k's advantage: min(M, c) (LV-HATRPO), M (HATRPO) or 1 (MAPPO-style)."""
    if mode == "clipped":
        return factor.clamp(max=factor_clip)
    if mode == "raw":
        return factor
    return torch.ones_like(factor)


def accumulate_factor(
    factor: torch.Tensor, newlogprob: torch.Tensor, oldlogprob: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """M <- M * pi_new(a|o) / pi_old(a|o) on every sample (unclipped); masked samples keep their factor."""
    return factor * torch.where(mask > 0, (newlogprob - oldlogprob).exp(), torch.ones_like(factor))


def surrogate(
    newlogprob: torch.Tensor,
    oldlogprob: torch.Tensor,
    advantages: torch.Tensor,
    factor: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The linear surrogate E[M * r * A] over the samples where mask is 1 (maximised)."""
    ratio = (newlogprob - oldlogprob).exp()
    return masked_mean(factor * ratio * advantages, mask)


def mean_kl(old_dist, new_dist, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(pi_old || pi_new) over the samples where mask is 1 (summed over action dimensions)."""
    kl = kl_divergence(old_dist, new_dist)
    kl = kl.sum(-1) if isinstance(new_dist, Normal) else kl
    return masked_mean(kl, mask)


def detached(dist):
    """A copy of the distribution cut from the graph: pi_old, fixed while pi_new moves."""
    if isinstance(dist, Normal):
        return Normal(dist.loc.detach(), dist.scale.detach())
    return Categorical(logits=dist.logits.detach())


def conjugate_gradient(fvp, b: torch.Tensor, iters: int, residual_tol: float = 1e-10) -> torch.Tensor:
    """Solves F x = b for a symmetric positive definite F known only through products fvp(v) = F v."""
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        fp = fvp(p)
        alpha = rr / (p @ fp)
        x, r = x + alpha * p, r - alpha * fp
        rr_new = r @ r
        if rr_new < residual_tol:
            break
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


def fisher_vector_product(actor: Actor, obs: torch.Tensor, old_dist, mask: torch.Tensor, damping: float):
    """v -> (F + damping * I) v, F the Hessian of the mean KL at the current parameters, by double backprop."""
    params = list(actor.parameters())
    grad_kl = torch.autograd.grad(mean_kl(old_dist, actor.distribution(obs), mask), params, create_graph=True)
    grad_kl = torch.cat([g.reshape(-1) for g in grad_kl])

    def fvp(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(grad_kl @ v, params, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]) + damping * v

    return fvp


def trpo_step(
    actor: Actor,
    obs: torch.Tensor,
    actions: torch.Tensor,
    oldlogprob: torch.Tensor,
    advantages: torch.Tensor,
    factor: torch.Tensor,
    mask: torch.Tensor,
    args: Args,
) -> dict:
    """One trust-region step of one agent: maximise E[M r A] s.t. mean KL(pi_old || pi_new) <= delta.

    Natural gradient x = F^-1 g by conjugate gradient, full step sqrt(2 delta / x^T F x) x, then backtracking:
    the first step (coef = backtrack^j) whose KL is under delta and whose improvement is positive and at least
    accept_ratio of the linear prediction g . step is kept; if none is, the old parameters are restored.
    """
    params = list(actor.parameters())
    old_params = parameters_to_vector(params).detach()
    dist = actor.distribution(obs)
    objective = surrogate(actor.log_prob_entropy(dist, actions)[0], oldlogprob, advantages, factor, mask)
    g = torch.cat([grad.reshape(-1) for grad in torch.autograd.grad(objective, params)])
    check_finite("surrogate or gradient", objective, g)
    old_dist = detached(dist)
    fvp = fisher_vector_product(actor, obs, old_dist, mask, args.cg_damping)
    direction = conjugate_gradient(fvp, g, args.cg_iters)
    shs = direction @ fvp(direction)
    result = {"kl": 0.0, "line_search_steps": args.ls_steps, "accepted": 0.0, "objective": objective.item()}
    if not (shs > 0 and torch.isfinite(shs)):  # no gradient (e.g. all advantages zero): nothing to improve
        return result
    full_step = (2 * args.kl_threshold / shs).sqrt() * direction
    expected_improve = g @ full_step
    with torch.no_grad():
        for j in range(args.ls_steps):
            coef = args.backtrack_coef**j
            vector_to_parameters(old_params + coef * full_step, params)
            new_dist = actor.distribution(obs)
            new_objective = surrogate(
                actor.log_prob_entropy(new_dist, actions)[0], oldlogprob, advantages, factor, mask
            )
            kl, improve = mean_kl(old_dist, new_dist, mask), new_objective - objective
            if kl <= args.kl_threshold and improve > 0 and improve >= args.accept_ratio * coef * expected_improve:
                return {"kl": kl.item(), "line_search_steps": j + 1, "accepted": 1.0, "objective": new_objective.item()}
        vector_to_parameters(old_params, params)
    return result


def critic_loss(
    newvalue: torch.Tensor,
    oldvalue: torch.Tensor,
    returns: torch.Tensor,
    clip_coef: float,
    clip_vloss: bool,
    huber_delta: Optional[float],
) -> torch.Tensor:
    """Huber (or squared) error of the normalized value, the worse of clipped and unclipped when clip_vloss."""

    def error(v: torch.Tensor) -> torch.Tensor:
        if huber_delta is None:
            return 0.5 * (v - returns) ** 2
        return F.huber_loss(v, returns, reduction="none", delta=huber_delta)

    if not clip_vloss:
        return error(newvalue).mean()
    v_clipped = oldvalue + (newvalue - oldvalue).clamp(-clip_coef, clip_coef)
    return torch.max(error(newvalue), error(v_clipped)).mean()


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or parameter, met before the update reached the parameters."""


def check_finite(what: str, *tensors: torch.Tensor) -> None:
    if not all(torch.isfinite(t).all() for t in tensors):
        raise NonFiniteError(f"non-finite {what}")


def training_state(actors, critic, value_norm, actor_optimizers, critic_optimizer) -> dict:
    """Everything an update changes, as state dicts of the live tensors (deepcopy it to keep a snapshot)."""
    return {
        "actors": actors.state_dict(),
        "critic": critic.state_dict(),
        "value_norm": value_norm.state_dict(),
        "actor_optimizers": [optimizer.state_dict() for optimizer in actor_optimizers],
        "critic_optimizer": critic_optimizer.state_dict(),
    }


def load_training_state(state: dict, actors, critic, value_norm, actor_optimizers, critic_optimizer) -> None:
    actors.load_state_dict(state["actors"])
    critic.load_state_dict(state["critic"])
    value_norm.load_state_dict(state["value_norm"])
    for optimizer, optimizer_state in zip(actor_optimizers, state["actor_optimizers"], strict=True):
        optimizer.load_state_dict(optimizer_state)
    critic_optimizer.load_state_dict(state["critic_optimizer"])


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Writes a temporary file, then renames it over path: a crash mid-write leaves the previous checkpoint whole."""
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


# flags a resumed run may change; every other one must match the checkpoint's
RESUME_MAY_CHANGE = {
    "total_timesteps",
    "num_iterations",
    "resume",
    "checkpoint_every",
    "max_bad_updates",
    "cuda",
    "torch_threads",
}
RESUME_MAY_CHANGE |= {"track", "wandb_project_name", "wandb_entity", "capture_video", "save_model", "eval_episodes"}


def load_checkpoint(args: Args) -> dict:
    """The checkpoint of --resume, or a one-line exit when it cannot be read or was trained with other flags."""
    try:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False)
        trained_with = checkpoint["args"]
    except Exception as error:
        sys.exit(f"{os.path.basename(__file__)}: error: cannot read the checkpoint {args.resume}: {error!r:.200}")
    for name, value in vars(args).items():
        if name not in RESUME_MAY_CHANGE and name in trained_with and trained_with[name] != value:
            flag = f"--{name.replace('_', '-')}"
            sys.exit(
                f"{os.path.basename(__file__)}: error: {args.resume} was trained with {flag} {trained_with[name]}, "
                f"not {value}: resume with the run's own flags"
            )
    return checkpoint


def stop_on_signals() -> list:
    """SIGINT and SIGTERM append to the returned list, which the loop reads between iterations; a second Ctrl-C
    stops at once."""
    received = []

    def handler(signum: int, frame) -> None:
        received.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(
            f"\n{signal.Signals(signum).name}: stopping after this iteration (Ctrl-C again to stop now)",
            file=sys.stderr,
        )

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return received


def make_checkpoint(state: dict, global_step: int, iteration: int, run_name: str, args: Args) -> dict:
    """A training state with what resuming needs besides: random streams, progress, the run and its flags."""
    progress = {"global_step": global_step, "iteration": iteration, "run_name": run_name, "args": vars(args)}
    return {**state, "rng": rng_states(), **progress}


def build_actors(env: MultiAgentArrays, args: Args) -> nn.ModuleList:
    return nn.ModuleList(
        Actor(obs_dim, act_dim, env.continuous, args.hidden_sizes, args.std_param)
        for obs_dim, act_dim in zip(env.obs_dims, env.act_dims, strict=True)
    )


def evaluate(model_path: str, args: Args, device: torch.device, video_folder: Optional[str] = None) -> list:
    """Runs deterministic episodes with the actors saved in model_path; returns the team returns."""
    env = make_env(args.env_id, args.num_agents, args.continuous_actions, args.max_cycles, "rgb_array")()
    if video_folder is not None:
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda _: True, disable_logger=True)
    actors = build_actors(env.unwrapped, args).to(device)
    actors.load_state_dict(torch.load(model_path, map_location=device)["actors"])
    policy = BatchedActors(actors)
    returns = []
    for episode in range(args.eval_episodes):
        obs, _ = env.reset(seed=args.seed + 10_000 + episode)
        done, episodic_return = False, 0.0
        while not done:
            action, _ = policy.act(torch.as_tensor(obs["obs"], device=device).unsqueeze(0), deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action[0].cpu().numpy())
            episodic_return += reward
            done = terminated or truncated
        returns.append(episodic_return)
    env.close()
    return returns


if __name__ == "__main__":
    args = parse_args()
    if (problem := check_args(args)) is not None:
        sys.exit(f"{os.path.basename(__file__)}: error: {problem}")
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = max(1, args.total_timesteps // args.batch_size)
    checkpoint = None if args.resume is None else load_checkpoint(args)
    num_agents_tag = f"_n{args.num_agents or 3}" if args.env_id == "simple_spread_v3" else ""
    run_name = f"{args.env_id}{num_agents_tag}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if checkpoint is not None:  # a resumed run appends to its own TensorBoard run
        run_name = checkpoint["run_name"]
    if args.capture_video:
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame renders off-screen
        if importlib.util.find_spec("moviepy") is None:
            sys.exit(f"{os.path.basename(__file__)}: error: --capture-video needs moviepy: pip install moviepy")
    if args.track:
        try:
            import wandb
        except ImportError:
            sys.exit(f"{os.path.basename(__file__)}: error: --track needs wandb: pip install wandb")

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            monitor_gym=True,
            save_code=True,
        )
    # on resume, events a crashed run logged after its checkpoint are purged, so no step appears twice
    writer = SummaryWriter(f"runs/{run_name}", purge_step=None if checkpoint is None else checkpoint["global_step"] + 1)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.distributions.Distribution.set_default_validate_args(False)  # argument checks cost more than the math

    if args.cuda and not torch.cuda.is_available():
        print("warning: --cuda given but no GPU is available; training on the CPU", file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.set_num_threads(args.torch_threads)

    # env setup
    env_fns = [
        make_env(args.env_id, args.num_agents, args.continuous_actions, args.max_cycles) for _ in range(args.num_envs)
    ]
    vector_cls = gym.vector.AsyncVectorEnv if args.vector_env == "async" else gym.vector.SyncVectorEnv
    # SAME_STEP autoreset: a finished env returns its reset observation and puts the true final one in
    # infos["final_obs"], whose state the critic needs to bootstrap a truncated episode
    envs = vector_cls(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    spec_env = MultiAgentArrays(args.env_id, args.num_agents, args.continuous_actions, args.max_cycles)
    num_agents = len(spec_env.agents)
    obs_shape = envs.single_observation_space["obs"].shape  # (num_agents, max_obs_dim)
    state_dim = envs.single_observation_space["state"].shape[0]
    max_act_dim = envs.single_action_space.shape[-1] if args.continuous_actions else 1

    actors = build_actors(spec_env, args).to(device)
    policy = BatchedActors(actors)  # all actors in one batched network for the rollout, reloaded after each update
    critic = Critic(state_dim, args.hidden_sizes).to(device)
    value_norm = ValueNorm(args.norm_value).to(device)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    spec_env.close()

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs) + obs_shape, device=device)  # (T, E, N, max_obs_dim)
    states = torch.zeros((args.num_steps, args.num_envs, state_dim), device=device)  # (T, E, state_dim)
    final_states = torch.zeros_like(states)  # true final state where an episode was truncated at step t
    action_shape = (num_agents, max_act_dim) if args.continuous_actions else (num_agents,)
    actions = torch.zeros((args.num_steps, args.num_envs) + action_shape, device=device)  # (T, E, N[, max_act_dim])
    logprobs = torch.zeros((args.num_steps, args.num_envs, num_agents), device=device)  # (T, E, N)
    active_masks = torch.zeros((args.num_steps, args.num_envs, num_agents), device=device)  # (T, E, N)
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)  # (T, E): the team reward
    terminations = torch.zeros((args.num_steps, args.num_envs), device=device)
    truncations = torch.zeros((args.num_steps, args.num_envs), device=device)

    # TRY NOT TO MODIFY: start the game
    global_step, start_iteration, last_iteration = 0, 1, 0
    if checkpoint is not None:  # continue: weights, optimizers, value statistics, random streams and step count
        load_training_state(checkpoint, actors, critic, value_norm, [], critic_optimizer)
        policy.load(actors)
        set_rng_states(checkpoint["rng"])
        global_step, last_iteration = checkpoint["global_step"], checkpoint["iteration"]
        start_iteration = last_iteration + 1
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"
    start_time, start_step = time.time(), global_step
    recent_returns, mean_return = [], float("nan")  # the episodes finished since the last progress line
    interrupted, bad_updates = stop_on_signals(), 0  # signals received; iterations in a row with a skipped update
    progress = tqdm(
        initial=global_step, total=args.num_iterations * args.batch_size, unit="step", disable=not sys.stderr.isatty()
    )

    for iteration in range(start_iteration, args.num_iterations + 1):
        if interrupted:
            break
        if iteration == start_iteration or (args.checkpoint_every and (iteration - 1) % args.checkpoint_every == 0):
            # new episodes, seeded by the iteration: a run resumed from a checkpoint continues exactly
            next_obs_np, _ = envs.reset(seed=args.seed + iteration - 1)
            next_obs = torch.as_tensor(next_obs_np["obs"], device=device)
            next_state = torch.as_tensor(next_obs_np["state"], device=device)
            next_active = torch.as_tensor(next_obs_np["active"], device=device)
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            critic_optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        rollout_start = time.time()
        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step], states[step], active_masks[step] = next_obs, next_state, next_active

            # ALGO LOGIC: each agent acts on its own observation with its own actor (all agents in one batched call)
            actions[step], logprobs[step] = policy.act(next_obs)

            # TRY NOT TO MODIFY: execute the game and log data.
            env_actions = actions[step].cpu().numpy()
            next_obs_np, reward, terminated, truncated, infos = envs.step(
                env_actions if args.continuous_actions else env_actions.astype(np.int64)
            )
            rewards[step] = torch.as_tensor(reward, device=device)
            terminations[step] = torch.as_tensor(terminated, device=device)
            truncations[step] = torch.as_tensor(truncated, device=device)
            next_obs = torch.as_tensor(next_obs_np["obs"], device=device)
            next_state = torch.as_tensor(next_obs_np["state"], device=device)
            next_active = torch.as_tensor(next_obs_np["active"], device=device)
            for env_idx in np.flatnonzero(truncated):
                final_states[step, env_idx] = torch.as_tensor(infos["final_obs"][env_idx]["state"], device=device)
            if "episode" in infos:
                for env_idx in np.flatnonzero(infos["_episode"]):
                    episodic_return = float(infos["episode"]["r"][env_idx])
                    recent_returns.append(episodic_return)
                    writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                    writer.add_scalar("charts/episodic_length", infos["episode"]["l"][env_idx], global_step)

        update_start = time.time()
        snapshot = copy.deepcopy(training_state(actors, critic, value_norm, [], critic_optimizer))
        try:  # a non-finite loss, gradient or parameter undoes the iteration's whole update (see except)
            # bootstrap value if not done
            with torch.no_grad():
                values = value_norm.denormalize(critic(states))  # (T, E)
                next_value = value_norm.denormalize(critic(next_state))
                final_values = value_norm.denormalize(critic(final_states))
                advantages = compute_gae(
                    rewards, values, next_value, terminations, truncations, final_values, args.gamma, args.gae_lambda
                )
                returns = advantages + values
                value_norm.update(returns)

            # flatten the batch
            b_obs = obs.reshape((-1,) + obs_shape)
            b_states = states.reshape(-1, state_dim)
            b_actions = actions.reshape((-1,) + action_shape)
            b_logprobs = logprobs.reshape(-1, num_agents)
            b_active = active_masks.reshape(-1, num_agents)
            b_advantages = advantages.reshape(-1)
            b_returns = value_norm.normalize(returns.reshape(-1))
            b_values = value_norm.normalize(values.reshape(-1))
            if args.norm_adv:
                b_advantages = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)

            # ALGO LOGIC: sequential trust-region steps in a random order, each agent's advantage weighted by the factor
            # M = prod_{j before i_k} pi_new^j(a^j|o^j) / pi_old^j(a^j|o^j), clipped from above: min(M, c)
            order = list(range(num_agents)) if args.fixed_order else torch.randperm(num_agents).tolist()
            factor = torch.ones(args.batch_size, device=device)
            b_inds = np.arange(args.batch_size)
            pg_losses, entropies, approx_kls, clipfracs = [], [], [], []
            for k, agent in enumerate(order):
                m_used = factor_used(factor, args.factor, args.factor_clip)
                writer.add_scalar(f"lv/factor_mean_{k}", factor.mean().item(), global_step)
                writer.add_scalar(f"lv/factor_max_{k}", factor.max().item(), global_step)
                writer.add_scalar(
                    f"lv/factor_clip_fraction_{k}", (factor > args.factor_clip).float().mean().item(), global_step
                )
                writer.add_scalar(f"lv/adv_variance_{k}", (m_used * b_advantages).var().item(), global_step)

                # ALGO LOGIC: agent i_k's trust-region step on E[M_used * r * A] over the whole batch
                actor = actors[agent]
                step_info = trpo_step(
                    actor,
                    b_obs[:, agent],
                    b_actions[:, agent],
                    b_logprobs[:, agent],
                    b_advantages,
                    m_used,
                    b_active[:, agent],
                    args,
                )
                pg_losses.append(-step_info["objective"])
                for name in ("kl", "line_search_steps", "accepted"):
                    writer.add_scalar(f"hatrpo/{name}_{k}", step_info[name], global_step)

                with torch.no_grad():
                    newlogprob, entropy = actor.log_prob_entropy(
                        actor.distribution(b_obs[:, agent]), b_actions[:, agent]
                    )
                    entropies.append(masked_mean(entropy, b_active[:, agent]).item())
                    logratio = newlogprob - b_logprobs[:, agent]
                    ratio = logratio.exp()
                    approx_kls.append(((ratio - 1) - logratio).mean().item())
                    clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
                    # the next agent sees M * pi_new^{i_k} / pi_old^{i_k}: the unclipped product carries over
                    factor = accumulate_factor(factor, newlogprob, b_logprobs[:, agent], b_active[:, agent])

            # ALGO LOGIC: critic update on the normalized returns
            v_losses = []
            for epoch in range(args.critic_epochs):
                np.random.shuffle(b_inds)
                for start in range(0, args.batch_size, args.minibatch_size):
                    mb_inds = b_inds[start : start + args.minibatch_size]
                    newvalue = critic(b_states[mb_inds])
                    v_loss = critic_loss(
                        newvalue,
                        b_values[mb_inds],
                        b_returns[mb_inds],
                        args.clip_coef,
                        args.clip_vloss,
                        args.huber_delta,
                    )
                    critic_optimizer.zero_grad()
                    v_loss.backward()
                    grad_norm = nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                    check_finite("critic loss or gradient", v_loss, grad_norm)
                    critic_optimizer.step()
                    v_losses.append(v_loss.item())
            check_finite("parameter", *actors.parameters(), *critic.parameters())
        except NonFiniteError as error:
            load_training_state(snapshot, actors, critic, value_norm, [], critic_optimizer)
            bad_updates += 1
            writer.add_scalar("charts/skipped_update", 1, global_step)
            print(f"warning: iteration {iteration}: {error}; update skipped, parameters unchanged", file=sys.stderr)
            if bad_updates >= args.max_bad_updates:
                progress.close()
                writer.close()
                kept = checkpoint_path if os.path.exists(checkpoint_path) else "none (see --checkpoint-every)"
                sys.exit(
                    f"{os.path.basename(__file__)}: error: {bad_updates} updates in a row met non-finite values; "
                    f"stopped. Last good checkpoint: {kept}"
                )
            continue
        bad_updates = 0
        policy.load(actors)

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        writer.add_scalar("perf/rollout_time", update_start - rollout_start, global_step)
        writer.add_scalar("perf/update_time", time.time() - update_start, global_step)
        sps = int((global_step - start_step) / (time.time() - start_time))
        writer.add_scalar("charts/learning_rate", critic_optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("losses/value_loss", np.mean(v_losses) if v_losses else 0.0, global_step)
        writer.add_scalar("losses/policy_loss", np.mean(pg_losses) if pg_losses else 0.0, global_step)
        writer.add_scalar("losses/entropy", np.mean(entropies) if entropies else 0.0, global_step)
        writer.add_scalar("losses/approx_kl", np.mean(approx_kls), global_step)
        writer.add_scalar("losses/clipfrac", np.mean(clipfracs), global_step)
        if recent_returns:
            mean_return, recent_returns = np.mean(recent_returns), []
        progress.update(args.batch_size)
        progress.set_postfix(episodic_return=f"{mean_return:.2f}", SPS=sps)
        progress.write(f"global_step={global_step}, episodic_return={mean_return:.2f}, SPS={sps}")
        sys.stdout.flush()  # the line reaches a log file now, not when the buffer fills
        last_iteration = iteration
        if args.checkpoint_every and (iteration % args.checkpoint_every == 0 or iteration == args.num_iterations):
            state = training_state(actors, critic, value_norm, [], critic_optimizer)
            save_checkpoint(checkpoint_path, make_checkpoint(state, global_step, iteration, run_name, args))

    progress.close()
    envs.close()
    if interrupted:  # SIGINT or SIGTERM: keep what was learned, say how to go on, exit 130 or 143
        state = training_state(actors, critic, value_norm, [], critic_optimizer)
        save_checkpoint(checkpoint_path, make_checkpoint(state, global_step, last_iteration, run_name, args))
        writer.close()
        print(f"interrupted at global_step={global_step}; checkpoint written to {checkpoint_path}")
        command = re.sub(r" --resume[= ]\S+", "", " ".join(sys.argv))
        print(f"resume with: python {command} --resume {checkpoint_path}")
        sys.exit(128 + interrupted[0])
    if args.save_model or args.capture_video:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        torch.save(
            {
                "actors": actors.state_dict(),
                "critic": critic.state_dict(),
                "value_norm": value_norm.state_dict(),
                "args": vars(args),
            },
            model_path,
        )
        if args.save_model:
            print(f"model saved to {model_path}")
        episodic_returns = evaluate(model_path, args, device, f"videos/{run_name}" if args.capture_video else None)
        for idx, episodic_return in enumerate(episodic_returns):
            writer.add_scalar("eval/episodic_return", episodic_return, idx)
        print(f"eval: mean episodic_return={np.mean(episodic_returns):.2f} over {len(episodic_returns)} episodes")
        if not args.save_model:
            os.remove(model_path)

    writer.close()
