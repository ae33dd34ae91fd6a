# lv_hatrpo_mpe.py: LV-HATRPO on MPE (PettingZoo MPE, package mpe2). Docs: docs/lv_hatrpo_mpe.md
import importlib.util
import math
import os
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
from torch import Tensor
from torch.distributions import Categorical, Distribution, Independent, Normal, kl_divergence
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.tensorboard import SummaryWriter


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
    """if toggled, record the final evaluation episodes as videos under `videos/{run_name}` (headless)"""
    save_model: bool = False
    """if toggled, save the model to `runs/{run_name}` and evaluate it from that file"""
    eval_model: Optional[str] = None
    """evaluate this model (--save-model's) or checkpoint with its run's flags in --eval-episodes episodes"""
    checkpoint_every: int = 0
    """write `runs/{run_name}/checkpoint.pt` every this many iterations and at the end (0: only on an interrupt)"""
    resume: Optional[str] = None
    """continue from this checkpoint with its run's flags (a larger --total-timesteps goes further)"""

    # Algorithm specific arguments
    env_id: Literal["simple_spread_v3", "simple_reference_v3", "simple_speaker_listener_v4"] = "simple_spread_v3"
    """the MPE scenario (simple_speaker_listener_v4: agents of different observation and action sizes)"""
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
    num_envs: int = 10
    """the number of parallel environments"""
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
    clip_coef: float = 0.2
    """the value-loss clipping coefficient (also the ratio band of `losses/clipfrac`)"""
    max_grad_norm: float = 10.0
    """the maximum norm for the gradient clipping of the critic"""
    hidden_sizes: tuple[int, ...] = (128, 128)
    """the hidden layer sizes of the actors and the critic"""
    factor: Literal["clipped", "raw", "none"] = "clipped"
    """the factor M of a later agent's advantage: `clipped` min(M, c) LV-HATRPO, `raw` HATRPO, `none` (M = 1)"""
    factor_clip: float = 1.0
    """the upper bound c of the clipped factor"""
    fixed_order: bool = False
    """if toggled, update the agents in their fixed order instead of a random permutation per iteration"""
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
    eval_every: int = 0
    """evaluate every this many iterations and at the end, logged as `eval/episodic_return` (0: never)"""
    eval_episodes: int = 10
    """the number of deterministic evaluation episodes (--eval-every, --eval-model, --save-model, --capture-video)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


class MultiAgentArrays(gym.Env):
    """One MPE scenario as an Env of arrays for gymnasium's vector API: `obs` (num_agents, max_obs_dim), zero-padded,
    and `state`; actions (num_agents, max_act_dim) or (num_agents,); the team's reward. It calls mpe2's `raw_env` as
    its `parallel_env` does, without the extra observations and wrappers (half the time of a step)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, args: Args, render_mode: Optional[str] = None):
        kwargs = {"N": args.num_agents or 3} if args.env_id == "simple_spread_v3" else {}
        module = importlib.import_module(f"mpe2.{args.env_id}")
        self.env = module.raw_env(
            continuous_actions=args.continuous_actions, max_cycles=args.max_cycles, render_mode=render_mode, **kwargs
        )
        self.render_mode, self.continuous = render_mode, args.continuous_actions
        self.agents = list(self.env.possible_agents)
        n = len(self.agents)
        self.act_spaces = [self.env.action_space(a) for a in self.agents]
        self.obs_dims = [self.env.observation_space(a).shape[0] for a in self.agents]
        self.act_dims = [s.shape[0] if self.continuous else int(s.n) for s in self.act_spaces]
        obs_space = gym.spaces.Box(-np.inf, np.inf, (n, max(self.obs_dims)), np.float32)
        state_space = gym.spaces.Box(-np.inf, np.inf, self.env.state_space.shape, np.float32)
        self.observation_space = gym.spaces.Dict({"obs": obs_space, "state": state_space})
        box = gym.spaces.Box(-np.inf, np.inf, (n, max(self.act_dims)), np.float32)
        self.action_space = box if self.continuous else gym.spaces.MultiDiscrete(self.act_dims)

    def _arrays(self) -> dict:
        obs = [self.env.observe(agent) for agent in self.agents]
        padded = np.zeros(self.observation_space["obs"].shape, np.float32)
        for i, agent_obs in enumerate(obs):
            padded[i, : len(agent_obs)] = agent_obs
        # MPE's env.state() is the agents' observations joined: joining the ones at hand spares computing them again
        return {"obs": padded, "state": np.concatenate(obs, dtype=np.float32)}

    def reset(self, seed: Optional[int] = None, options: Optional[dict] = None):
        self.env.reset(seed=seed, options=options)
        return self._arrays(), {}

    def step(self, action: np.ndarray):
        for i, space in enumerate(self.act_spaces):  # AEC order: each agent's action in turn, the last steps the world
            # the Gaussian sample is clipped to the bounds here only, not in its stored log-prob
            self.env.step(
                np.clip(action[i, : self.act_dims[i]], space.low, space.high) if self.continuous else int(action[i])
            )
        reward = float(sum(self.env.rewards[agent] for agent in self.agents))
        terminated = any(self.env.terminations[agent] for agent in self.agents)
        truncated = any(self.env.truncations[agent] for agent in self.agents)
        return self._arrays(), reward, terminated, truncated, {}

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
    """One agent's policy over its local observation: Gaussian (state-independent std) or categorical."""

    def __init__(self, obs_dim: int, act_dim: int, continuous: bool, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.obs_dim, self.act_dim, self.continuous = obs_dim, act_dim, continuous
        self.net = mlp(obs_dim, hidden_sizes, act_dim, out_std=0.01)
        if continuous:  # HARL's std: 0.5 * sigmoid(p), p = 1 at start (0.37; at most 0.5)
            self.std_param = nn.Parameter(torch.ones(act_dim))

    def distribution(self, obs: Tensor) -> Distribution:
        """The action distribution given padded observations (..., max_obs_dim): categorical over the logits, or
        Gaussian (its log-probability sums over the dimensions)."""
        out = self.net(obs[..., : self.obs_dim])
        if not self.continuous:
            return Categorical(logits=out)
        return Independent(Normal(out, (0.5 * torch.sigmoid(self.std_param)).expand_as(out)), 1)


@torch.inference_mode()
def act(actors: list, obs: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor]:
    """obs (E, N, max_obs_dim) -> actions (E, N, max_act_dim), zero-padded, or (E, N), and log-probabilities (E, N)."""
    max_act_dim, actions, logprobs = max(actor.act_dim for actor in actors), [], []
    for i, actor in enumerate(actors):  # each agent acts on its own observation with its own actor
        dist = actor.distribution(obs[:, i])
        action = dist.mode if deterministic else dist.sample()
        logprobs.append(dist.log_prob(action))
        actions.append(F.pad(action, (0, max_act_dim - actor.act_dim)) if actor.continuous else action)
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


def surrogate(newlogprob: Tensor, oldlogprob: Tensor, advantages: Tensor, factor: Tensor) -> Tensor:
    """The linear surrogate E[M * r * A] (maximised)."""
    ratio = (newlogprob - oldlogprob).exp()
    return (factor * ratio * advantages).mean()


def conjugate_gradient(fvp, g: Tensor, iters: int) -> Tensor:
    """x with fvp(x) = g, by at most iters steps of conjugate gradient (fvp: v -> (F + damping * I) v)."""
    x, r, p = torch.zeros_like(g), g.clone(), g.clone()
    rr = r @ r
    for _ in range(iters):
        fp = fvp(p)
        alpha = rr / (p @ fp)
        x, r = x + alpha * p, r - alpha * fp
        rr_new = r @ r
        if rr_new < 1e-10:
            break
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


def line_search(trial, expected_improve: Tensor, args: Args) -> tuple[float, int, float]:
    """Backtracking: the first coef = backtrack^j, j < ls_steps, whose trial(coef) = (KL, improvement) keeps the KL
    under delta and improves by at least accept_ratio of the linear prediction coef * expected_improve (and by more
    than 0). Returns (coef, steps tried, its KL), or (0, ls_steps, 0) when none is accepted."""
    for j in range(args.ls_steps):
        coef = args.backtrack_coef**j
        kl, improve = trial(coef)
        if kl <= args.kl_threshold and improve > 0 and improve >= args.accept_ratio * coef * expected_improve:
            return coef, j + 1, float(kl)
    return 0.0, args.ls_steps, 0.0


def trpo_step(actor: Actor, obs: Tensor, actions: Tensor, oldlogprob: Tensor, adv: Tensor, m: Tensor, args: Args):
    """One agent's step: maximise E[m_used r A] s.t. mean KL(pi_old || pi_new) <= delta, by the natural gradient
    x = F^-1 g (conjugate gradient; F the Hessian of the mean KL), scaled to the full step sqrt(2 delta / x^T F x) x
    (the quadratic model's KL is then delta), then line_search from it, else the old parameters. Returns (KL,
    line-search steps, accepted), or None for a non-finite surrogate or gradient."""
    params = list(actor.parameters())
    old_params = parameters_to_vector(params).detach()
    objective = surrogate(actor.distribution(obs).log_prob(actions), oldlogprob, adv, m)
    g = parameters_to_vector(torch.autograd.grad(objective, params))
    if not (torch.isfinite(objective) and torch.isfinite(g).all()):
        return None
    with torch.no_grad():
        old_dist = actor.distribution(obs)  # pi_old, fixed while pi_new moves
    kl = kl_divergence(old_dist, actor.distribution(obs)).mean()
    grad_kl = parameters_to_vector(torch.autograd.grad(kl, params, create_graph=True))

    def fvp(v: Tensor) -> Tensor:  # v -> (F + damping * I) v
        return parameters_to_vector(torch.autograd.grad(grad_kl @ v, params, retain_graph=True)) + args.cg_damping * v

    direction = conjugate_gradient(fvp, g, args.cg_iters)
    shs = direction @ fvp(direction)
    full_step = (2 * args.kl_threshold / shs).sqrt() * direction

    @torch.no_grad()
    def trial(coef: float) -> tuple[Tensor, Tensor]:  # (KL, improvement) with the parameters moved by coef * full_step
        vector_to_parameters(old_params + coef * full_step, params)
        new_dist = actor.distribution(obs)
        new_objective = surrogate(new_dist.log_prob(actions), oldlogprob, adv, m)
        return kl_divergence(old_dist, new_dist).mean(), new_objective - objective

    if shs > 0 and torch.isfinite(shs):  # no step at all without a gradient (e.g. all advantages zero)
        coef, steps, kl = line_search(trial, g @ full_step, args)
        if coef:
            return kl, steps, 1.0
    vector_to_parameters(old_params, params)
    return 0.0, args.ls_steps, 0.0


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


def update_actors(actors: list, batch: tuple, args: Args, writer, step: int, logs: dict) -> None:
    """LV-HATRPO's sequential update. In a random order i_1, ..., i_n, agent i_k takes one trust-region step
    (trpo_step) on its linear surrogate

        E[ m_used * r * A ],   m_used = min(M, c),   M = prod_{j < k} r^{i_j}   (HATRPO: M; MAPPO-style: 1),

    then its ratio on every sample multiplies the unclipped M that the next agent sees. batch: obs (B, N, max_obs_dim),
    actions (B, N[, max_act_dim]), behaviour log-probabilities (B, N), advantages (B,)."""
    b_obs, b_actions, b_logprobs, b_advantages = batch
    batch_size, num_agents = b_logprobs.shape
    factor = torch.ones(batch_size, device=b_advantages.device)  # M: 1 for the first agent of the order
    order = list(range(num_agents)) if args.fixed_order else torch.randperm(num_agents).tolist()  # fresh each call
    for k, agent in enumerate(order):
        actor = actors[agent]
        m_used = factor_used(factor, args.factor, args.factor_clip)
        log_factor(writer, k, factor, m_used * b_advantages, args.factor_clip, step)
        actions = b_actions[:, agent, : actor.act_dim] if b_actions.dim() > 2 else b_actions[:, agent]  # unpadded
        samples = (b_obs[:, agent], actions, b_logprobs[:, agent], b_advantages, m_used)
        result = trpo_step(actor, *samples, args)
        if result is None:  # a non-finite surrogate or gradient: no step
            logs["skipped_steps"].append(1)
        for name, value in zip(("kl", "line_search_steps", "accepted"), result or (), strict=False):
            writer.add_scalar(f"hatrpo/{name}_{k}", value, step)
        with torch.no_grad():  # the new policy once, for its entropy and its ratio
            dist = actor.distribution(samples[0])
        logs["entropy"].append(dist.entropy().mean().item())
        logratio = dist.log_prob(samples[1]) - samples[2]
        log_update(logratio, args.clip_coef, logs)
        logs["policy_loss"].append(-surrogate(samples[2] + logratio, samples[2], b_advantages, m_used).item())
        factor = factor * logratio.exp()  # the carry: the unclipped M times agent i_k's new ratio


def fail(message: str) -> None:  # one line on stderr that says what to do, and exit status 1
    sys.exit(f"{os.path.basename(__file__)}: error: {message}")


def check_args(args: Args) -> Optional[str]:
    """What is wrong with the flags, as one line that says what to do, or None."""
    positive = "num_agents total_timesteps num_envs num_steps num_minibatches max_cycles eval_episodes learning_rate"
    positive = (positive + " clip_coef max_grad_norm factor_clip").split()
    positive += ["kl_threshold", "cg_iters", "ls_steps", "backtrack_coef"]
    for name, value in vars(args).items():
        wrong = isinstance(value, (int, float)) and not (value > 0 if name in positive else value >= 0)
        if wrong or (isinstance(value, float) and not math.isfinite(value)):
            words = "a positive number" if name in positive else "a finite number, not negative"
            return f"--{name.replace('_', '-')} must be {words}, got {value}"
    problems = [
        (args.env_id != "simple_spread_v3" and args.num_agents not in (None, 2), f"{args.env_id} always has 2 agents"),
        (args.seed >= 2**32, f"--seed must be below 2**32, got {args.seed}"),  # the environments' seeding
        (max(args.gamma, args.gae_lambda) > 1, "--gamma and --gae-lambda must lie in [0, 1]"),
        (max(args.accept_ratio, args.backtrack_coef) > 1, "--accept-ratio and --backtrack-coef must lie in [0, 1]"),
        (not args.hidden_sizes or min(args.hidden_sizes) < 1, "--hidden-sizes needs positive sizes, e.g. 128 128"),
        (args.num_minibatches > args.num_envs * args.num_steps, "--num-minibatches exceeds the batch's samples"),
        (args.eval_model and not os.path.isfile(args.eval_model), f"--eval-model {args.eval_model}: no such file"),
        (args.resume and not os.path.isfile(args.resume), f"--resume {args.resume}: no such file"),
        (args.eval_model and (args.resume or args.save_model), "with --eval-model, drop --resume and --save-model"),
        (args.capture_video and not importlib.util.find_spec("moviepy"), "--capture-video needs: pip install moviepy"),
        (args.track and not importlib.util.find_spec("wandb"), "--track needs wandb: pip install wandb"),
    ]
    return next((message for wrong, message in problems if wrong), None)


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


def evaluate(actors: nn.ModuleList, args: Args, device: torch.device, video_folder: Optional[str] = None) -> float:
    """The mean team return of deterministic episodes on an environment of their own (seeded apart from training's),
    printed with its spread."""
    env = make_env(args, "rgb_array")()
    if video_folder is not None:
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda _: True, disable_logger=True)
    returns = []
    for episode in range(args.eval_episodes):
        next_obs, _ = env.reset(seed=args.seed + 10_000 + episode)
        done, episodic_return = False, 0.0
        while not done:
            action, _ = act(actors, torch.as_tensor(next_obs["obs"], device=device).unsqueeze(0), deterministic=True)
            next_obs, reward, terminated, truncated, _ = env.step(action[0].cpu().numpy())
            episodic_return, done = episodic_return + reward, terminated or truncated
        returns.append(episodic_return)
    env.close()
    mean, std = np.mean(returns), np.std(returns)
    print(f"eval: episodic_return {mean:.2f} ± {std:.2f} (mean ± std of {len(returns)} episodes)")
    return float(mean)


def make_actors(args: Args, obs_dims: list, act_dims: list, device: torch.device) -> tuple[nn.ModuleList, list]:
    """The actors, one per agent (a trust-region step has no shared actor), and the one each agent acts with."""
    sizes = zip(obs_dims, act_dims, strict=True)
    actors = nn.ModuleList(Actor(o, a, args.continuous_actions, args.hidden_sizes) for o, a in sizes)
    return actors.to(device), list(actors)


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
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame renders off-screen for --capture-video
    if args.eval_model:  # evaluate a saved model instead of training, and exit
        evaluate_saved_model(args)
    checkpoint, args = (None, args) if args.resume is None else load_run(args.resume, args)  # the run's own flags
    args.batch_size = int(args.num_envs * args.num_steps)
    args.num_iterations = max(1, args.total_timesteps // args.batch_size)
    num_agents_tag = f"_n{args.num_agents or 3}" if args.env_id == "simple_spread_v3" else ""
    run_name = f"{args.env_id}{num_agents_tag}__{args.exp_name}__{args.seed}__{int(time.time())}"
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
    action_shape = envs.single_action_space.shape  # (num_agents, max_act_dim) or (num_agents,)

    actors, _ = make_actors(args, obs_dims, act_dims, device)
    critic = mlp(state_dim, args.hidden_sizes, 1, out_std=1.0).to(device)  # the centralized critic V(s)
    value_norm = ValueNorm().to(device)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs) + obs_shape, device=device)  # (T, E, N, max_obs_dim)
    states = torch.zeros((args.num_steps, args.num_envs, state_dim), device=device)  # (T, E, state_dim)
    next_states = torch.zeros_like(states)  # the state step t reached: the final one where an episode was truncated
    actions = torch.zeros((args.num_steps, args.num_envs) + action_shape, device=device)  # (T, E, N[, max_act_dim])
    logprobs = torch.zeros((args.num_steps, args.num_envs, num_agents), device=device)  # (T, E, N)
    rewards, terminations, dones = torch.zeros((3, args.num_steps, args.num_envs), device=device)  # (T, E) each

    # TRY NOT TO MODIFY: checkpoints hold these state dicts, the random streams and the progress
    stateful = {"actors": actors, "critic": critic, "value_norm": value_norm, "critic_optimizer": critic_optimizer}
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
        if iteration == start_iteration or (args.checkpoint_every and (iteration - 1) % args.checkpoint_every == 0):
            # new episodes, seeded by the iteration: a run resumed from a checkpoint continues exactly
            next_obs_np, _ = envs.reset(seed=args.seed + iteration - 1)
            next_obs, next_state = (torch.as_tensor(next_obs_np[key], device=device) for key in ("obs", "state"))

        rollout_start = time.time()
        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step], states[step] = next_obs, next_state

            # ALGO LOGIC: each agent acts on its own observation with its own actor
            actions[step], logprobs[step] = act(actors, next_obs)

            # TRY NOT TO MODIFY: execute the game and log data.
            env_actions = actions[step].cpu().numpy().astype(envs.single_action_space.dtype)
            next_obs_np, reward, terminated, truncated, infos = envs.step(env_actions)
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

        # ALGO LOGIC: sequential trust-region steps in a random order, each agent's advantage weighted by min(M, c)
        logs = {name: [] for name in ("policy_loss", "entropy", "approx_kl", "clipfrac", "value_loss", "skipped_steps")}
        update_actors(actors, (b_obs, b_actions, b_logprobs, b_advantages), args, writer, global_step, logs)

        # ALGO LOGIC: critic update on the normalized returns
        for epoch in range(args.critic_epochs):
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
            writer.add_scalar("eval/episodic_return", evaluate(actors, args, device), global_step)
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
        writer.add_scalar("eval/episodic_return", evaluate(actors, args, device, video_folder), global_step)

    writer.close()
