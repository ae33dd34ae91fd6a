# lv_happo_smac.py: LV-HAPPO on SMAC, with SMAX (JaxMARL) or StarCraft II (smac). Docs: README.md, "lv_happo_smac.py".
import contextlib
import copy
import importlib.util
import io
import os
import random
import re
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
from torch.distributions import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

SC2_INSTALL = (
    "the sc2 backend needs StarCraft II and the smac package: install the game (Linux: unzip SC2.4.10.zip from "
    "github.com/Blizzard/s2client-proto, set SC2PATH, copy SMAC_Maps into StarCraftII/Maps), then "
    "pip install git+https://github.com/oxwhirl/smac.git (README.md, section lv_happo_smac.py)"
)


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
    checkpoint_every: int = 0
    """write `runs/{run_name}/checkpoint.pt` every this many iterations and at the end (0: only on an interrupt);
    each one starts new episodes, so that a run resumed from it continues exactly"""
    resume: Optional[str] = None
    """continue from this checkpoint (with the run's own flags; a larger --total-timesteps goes further)"""
    max_bad_updates: int = 3
    """stop after this many iterations in a row whose update met a non-finite loss, gradient or parameter"""

    # Algorithm specific arguments
    env_id: str = "3m"
    """the map: a SMAX map (3m, 2s3z, 3s5z, 5m_vs_6m, 3s5z_vs_3s6z, 27m_vs_30m, 6h_vs_8z, ...) or a SMAC map (sc2)"""
    backend: Literal["smax", "sc2"] = "smax"
    """`smax`: JaxMARL's SMAX, jit-compiled and vmapped over the environments; `sc2`: StarCraft II via smac"""
    max_steps: Optional[int] = None
    """the time limit of a SMAX game in steps (SMAX's 100 on every map when not given; SMAC maps set their own)"""
    state_type: Literal["FP", "EP"] = "FP"
    """the critic's input: `FP` global state + the agent's observation + its one-hot id, one value per agent
    (each agent uses its own advantage); `EP` the global state, one value per environment"""
    total_timesteps: int = 2_000_000
    """total joint environment steps of the experiment"""
    learning_rate: float = 5e-4
    """the learning rate of the actors' optimizers"""
    critic_learning_rate: float = 5e-4
    """the learning rate of the critic's optimizer"""
    anneal_lr: bool = False
    """if toggled, anneal both learning rates linearly to zero"""
    num_envs: int = 32
    """the number of parallel environments (SMAX: vmapped in one call; sc2: one StarCraft II process each)"""
    torch_threads: int = 1
    """torch's CPU threads: small networks gain little from more, and busy cores make extra threads spin-wait"""
    num_steps: int = 100
    """the number of steps to run in each environment per policy rollout"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 1
    """the number of mini-batches per epoch (actors and critic)"""
    update_epochs: int = 5
    """the number of epochs of each actor's update"""
    critic_epochs: int = 5
    """the number of epochs of the critic's update"""
    norm_adv: bool = True
    """if toggled, normalize the advantages over the batch (the alive agents' samples)"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient (also clips the value loss)"""
    clip_vloss: bool = True
    """if toggled, use the clipped value loss"""
    huber_delta: Optional[float] = 10.0
    """the delta of the critic's Huber loss (`None` for the squared error)"""
    norm_value: bool = True
    """if toggled, normalize the value targets with running statistics"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus"""
    max_grad_norm: float = 10.0
    """the maximum norm for the gradient clipping"""
    hidden_sizes: tuple[int, ...] = (64, 64, 64)
    """the hidden layer sizes of the actors and the critic"""
    factor: Literal["clipped", "raw", "none"] = "clipped"
    """the factor M that weights a later agent's advantage: `clipped` min(M, c) is LV-HAPPO, `raw` is plain
    HAPPO, `none` (M = 1) is the MAPPO-style update"""
    factor_clip: float = 1.0
    """the upper bound c of the clipped factor"""
    fixed_order: bool = False
    """if toggled, update the agents in their fixed order instead of a random permutation per iteration"""
    eval_episodes: int = 32
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


def jax_settings(cuda: bool) -> None:
    """Environment variables XLA reads when jax is first imported: no GPU memory preallocation (torch needs it),
    and on the CPU one XLA thread beside torch's, so the two do not oversubscribe the cores."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not cuda:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


@contextlib.contextmanager
def quiet_stdout():
    """Silences file descriptor 1: jaxmarl prints a notice about its submodules on import, through a sys.stdout
    that it resets while importing, so contextlib.redirect_stdout cannot catch it."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def smax_maps() -> list:
    with quiet_stdout():
        from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO
    return list(MAP_NAME_TO_SCENARIO)


def check_args(args: Args) -> Optional[str]:
    """Returns what is wrong with the flags, as one line that says what to do, or None."""
    if args.max_steps is not None and (args.backend == "sc2" or args.max_steps < 1):
        return "--max-steps takes a positive number of steps, with --backend smax only (SMAC maps set their own)"
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "eval_episodes"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    for name in ("learning_rate", "critic_learning_rate", "clip_coef", "max_grad_norm", "factor_clip"):
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    if args.torch_threads < 1:
        return f"--torch-threads must be at least 1, got {args.torch_threads}"
    if args.checkpoint_every < 0 or args.max_bad_updates < 1:
        return "--checkpoint-every must not be negative and --max-bad-updates must be at least 1"
    if args.resume is not None and not os.path.isfile(args.resume):
        return f"--resume {args.resume}: no such file (checkpoints are written to runs/<run>/checkpoint.pt)"
    if args.update_epochs < 0 or args.critic_epochs < 0 or args.ent_coef < 0:
        return "--update-epochs, --critic-epochs and --ent-coef must not be negative"
    if not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        return "--gamma and --gae-lambda must lie in [0, 1]"
    if args.huber_delta is not None and not args.huber_delta > 0:
        return f"--huber-delta must be positive (or None for the squared error), got {args.huber_delta}"
    if not args.hidden_sizes or min(args.hidden_sizes) < 1:
        return "--hidden-sizes needs at least one positive layer size, e.g. --hidden-sizes 64 64 64"
    if args.num_minibatches > args.num_envs * args.num_steps:
        return f"--num-minibatches {args.num_minibatches} exceeds the batch of {args.num_envs * args.num_steps} samples"
    # the backend's package and map list last: importing jaxmarl takes seconds
    if args.backend == "smax":
        if importlib.util.find_spec("jaxmarl") is None:
            return "the smax backend needs jaxmarl: pip install -r requirements.txt (or pip install jaxmarl)"
        if args.env_id not in (maps := smax_maps()):
            return f"unknown SMAX map --env-id {args.env_id!r}: choose one of {', '.join(maps)}"
    else:
        if importlib.util.find_spec("smac") is None:
            return SC2_INSTALL
        from smac.env.starcraft2.maps import smac_maps

        if args.env_id not in (maps := smac_maps.get_smac_map_registry()):
            return f"unknown SMAC map --env-id {args.env_id!r}: choose one of {', '.join(maps)}"
    return None


# what both backends return: reset() the first four, step() all (and `restarted`)
RESET_KEYS = ("obs", "state", "avail", "active")
STEP_KEYS = RESET_KEYS + ("reward", "terminated", "truncated", "won", "final_obs", "final_state")


class SMAXEnvs:
    """`num_envs` SMAX games (JaxMARL's HeuristicEnemySMAX) stepped by one jit-compiled function vmapped over the
    environments; arrays reach torch through DLPack, without a copy when jax and torch share the device.

    Both backends return dicts of tensors: `obs` (E, N, obs_dim), `state` (E, state_dim), `avail` (E, N, A) bool,
    `active` (E, N) 1 for living agents; `step` adds `reward` (E,) the team reward, `terminated` (a side is
    wiped out), `truncated` (time limit), `won`, `restarted` (E,) bool, and `final_obs`, `final_state`, the
    observations before a finished game's reset (the returned `obs` and `state` already belong to the next game).
    """

    def __init__(self, map_name: str, num_envs: int, seed: int, device: torch.device, max_steps: Optional[int] = None):
        import jax
        import jax.numpy as jnp

        with quiet_stdout():
            from jaxmarl import make
            from jaxmarl.environments.smax import map_name_to_scenario
        self.jax, self.jnp, self.device = jax, jnp, device
        limit = {} if max_steps is None else {"max_steps": max_steps}
        self.env = env = make("HeuristicEnemySMAX", scenario=map_name_to_scenario(map_name), **limit)
        self.num_agents = n = env.num_agents
        self.obs_dim = env.observation_spaces[env.agents[0]].shape[0]
        self.num_actions = int(env.action_spaces[env.agents[0]].n)
        # arrays cross devices by DLPack only where jax runs on torch's device; else through host memory
        self.shared_device = device if device.type == "cpu" or jax.default_backend() == "gpu" else torch.device("cpu")
        self.restarted = torch.zeros(num_envs, dtype=torch.bool, device=device)

        def observe(state) -> tuple:
            obs = env.get_obs(state)
            avail = env.get_avail_actions(state)
            return (
                jnp.stack([obs[a] for a in env.agents]),
                env.get_world_state(state),
                jnp.stack([avail[a] for a in env.agents]).astype(bool),
                state.state.unit_alive[:n].astype(jnp.float32),
            )

        def reset(key):
            state = env.reset(key)[1]
            return state, observe(state)

        def step(key, state, action):
            key_step, key_reset = jax.random.split(key)
            _, state, rewards, dones, _ = env.step_env(
                key_step, state, {a: action[i] for i, a in enumerate(env.agents)}
            )
            allies_alive, enemies_alive = state.state.unit_alive[:n].any(), state.state.unit_alive[n:].any()
            terminated = ~(allies_alive & enemies_alive)
            final_obs, final_state = observe(state)[:2]
            reset_state = env.reset(key_reset)[1]  # a finished game restarts in the same step
            state = jax.tree.map(lambda r, s: jnp.where(dones["__all__"], r, s), reset_state, state)
            ends = (terminated, dones["__all__"] & ~terminated, allies_alive & ~enemies_alive)
            return state, (*observe(state), rewards[env.agents[0]], *ends, final_obs, final_state)

        def many(fn: Callable) -> Callable:  # vmapped over environments, each with its own key
            def batched(key, *xs):
                key, subkey = jax.random.split(key)
                return key, *jax.vmap(fn)(jax.random.split(subkey, num_envs), *xs)

            return jax.jit(batched)

        self._reset, self._step = many(reset), many(step)
        self.key = jax.random.PRNGKey(seed)
        first = self.reset()
        self.state_dim = first["state"].shape[-1]
        self.step(first["avail"].float().argmax(-1))  # compiles both now, not inside the first iteration
        self.key = jax.random.PRNGKey(seed)

    def _to_torch(self, arrays: tuple, names: tuple) -> dict:
        return {name: torch.from_dlpack(x).to(self.device) for name, x in zip(names, arrays, strict=True)}

    def reset(self, seed: Optional[int] = None) -> dict:
        if seed is not None:
            self.key = self.jax.random.PRNGKey(seed)
        self.key, self.states, arrays = self._reset(self.key)
        return self._to_torch(arrays, RESET_KEYS)

    def step(self, actions: torch.Tensor) -> dict:
        action = self.jnp.from_dlpack(actions.to(self.shared_device, torch.int32))
        self.key, self.states, arrays = self._step(self.key, self.states, action)
        return self._to_torch(arrays, STEP_KEYS) | {"restarted": self.restarted}

    def close(self) -> None:
        pass


class SC2Envs:
    """`num_envs` StarCraft II games (smac's StarCraft2Env), one game process each, stepped in turn, with the
    interface of SMAXEnvs. A game whose process crashes is closed and started again and training goes on: the
    episode it was playing is lost (it ends there as a truncation and is not counted as an episode), and the
    restart is counted in `restarts`. `make_game(i)` builds game i (tests pass a stand-in)."""

    def __init__(
        self,
        map_name: str,
        num_envs: int,
        seed: int,
        device: torch.device,
        make_game: Optional[Callable[[int], Any]] = None,
        replay_dir: Optional[str] = None,
    ):
        if make_game is None:
            from smac.env import StarCraft2Env

            def make_game(i: int) -> Any:
                return StarCraft2Env(map_name=map_name, seed=seed + i, replay_dir=replay_dir or "")

        self.make_game, self.device, self.restarts = make_game, device, 0
        self.games = [make_game(i) for i in range(num_envs)]
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

    def reset(self, seed: Optional[int] = None) -> dict:
        """New episodes in every game (StarCraft II takes its seeds when a game starts, so seed is unused)."""
        for game in self.games:
            game.reset()
        self.last = [self._observe(i) for i in range(len(self.games))]
        return self._batch(self.last, RESET_KEYS)

    def step(self, actions: torch.Tensor) -> dict:
        rows = []
        for i, action in enumerate(actions.cpu().numpy()):
            try:
                reward, done, info = self.games[i].step(action.tolist())
            except Exception as error:  # the game process died: lose this episode, not the run
                print(f"warning: StarCraft II game {i} crashed ({error!r:.200}); restarting it", file=sys.stderr)
                with contextlib.suppress(Exception):
                    self.games[i].close()
                self.games[i] = self.make_game(i)
                reward, done, info = 0.0, True, {}
            restarted = done and not info  # smac also restarts a failed game itself, returning (0, True, {})
            self.restarts += restarted
            final = self.last[i] if restarted else self._observe(i)  # a lost episode ends at the last state seen
            if done:
                self.games[i].reset()
            truncated = done and (restarted or bool(info.get("episode_limit", False)))
            won = bool(info.get("battle_won", False))
            self.last[i] = self._observe(i)
            rows.append((*self.last[i], reward, done and not truncated, truncated, won, *final[:2], restarted))
        out = self._batch(rows, STEP_KEYS + ("restarted",))
        out["reward"] = out["reward"].float()
        return out

    def close(self) -> None:
        for game in self.games:
            with contextlib.suppress(Exception):
                game.close()


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


def masked_categorical(logits: torch.Tensor, avail: torch.Tensor) -> Categorical:
    """The categorical over the available actions only: unavailable ones get probability zero."""
    return Categorical(logits=logits.masked_fill(~avail, -torch.inf))


class Actor(nn.Module):
    """One agent's categorical policy over its local observation, restricted to its available actions."""

    def __init__(self, obs_dim: int, num_actions: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.net = mlp(obs_dim, hidden_sizes)
        self.head = layer_init(nn.Linear(hidden_sizes[-1], num_actions), std=0.01)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The logits of every action, before masking."""
        return self.head(self.net(obs))

    def distribution(self, obs: torch.Tensor, avail: torch.Tensor) -> Categorical:
        return masked_categorical(self(obs), avail)


class BatchedActors:
    """Every agent's actor as one network for acting: the parameters stacked along a leading agent dimension
    (torch.func.stack_module_state) and one vmapped call, instead of a Python loop over agents. The Actor modules
    stay the source of truth; `load` copies their weights in after every update."""

    def __init__(self, actors: nn.ModuleList):
        self.base = copy.deepcopy(actors[0]).to("meta")
        self.forward = torch.func.vmap(lambda params, obs: torch.func.functional_call(self.base, params, (obs,)))
        self.load(actors)

    @torch.no_grad()
    def load(self, actors: nn.ModuleList) -> None:
        self.params = torch.func.stack_module_state(list(actors))[0]

    @torch.no_grad()
    def act(
        self, obs: torch.Tensor, avail: torch.Tensor, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """obs (E, N, obs_dim), avail (E, N, A) -> actions (E, N), log-probabilities (E, N)."""
        dist = masked_categorical(self.forward(self.params, obs.transpose(0, 1)).transpose(0, 1), avail)
        action = dist.probs.argmax(-1) if deterministic else dist.sample()
        return action, dist.log_prob(action)


def critic_inputs(state: torch.Tensor, obs: torch.Tensor, state_type: str) -> torch.Tensor:
    """The critic's input (..., C, D): EP is the global state (C = 1); FP joins the state with each agent's
    observation and one-hot id (C = N agents, one value each)."""
    if state_type == "EP":
        return state.unsqueeze(-2)
    num_agents = obs.shape[-2]
    ids = torch.eye(num_agents, device=obs.device).expand(obs.shape[:-1] + (num_agents,))
    return torch.cat([state.unsqueeze(-2).expand(obs.shape[:-1] + state.shape[-1:]), obs, ids], -1)


class Critic(nn.Module):
    """Centralized value function on the critic's input: V(s) (EP) or V(s, o_i, i) per agent (FP)."""

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
    """The factor that weights agent i_k's advantage: min(M, c) (LV-HAPPO), M (HAPPO) or 1 (MAPPO-style)."""
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


def actor_loss(
    newlogprob: torch.Tensor,
    oldlogprob: torch.Tensor,
    advantages: torch.Tensor,
    factor: torch.Tensor,
    mask: torch.Tensor,
    clip_coef: float,
) -> torch.Tensor:
    """-E[M * min(r A, clip(r, 1 - eps, 1 + eps) A)] over the samples where mask is 1."""
    ratio = (newlogprob - oldlogprob).exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)
    return -masked_mean(factor * surrogate, mask)


def critic_loss(
    newvalue: torch.Tensor,
    oldvalue: torch.Tensor,
    returns: torch.Tensor,
    clip_coef: float,
    clip_vloss: bool,
    huber_delta: Optional[float],
    mask: torch.Tensor,
) -> torch.Tensor:
    """Huber (or squared) error of the normalized value, the worse of clipped and unclipped when clip_vloss,
    averaged where mask is 1 (FP: the living agents' values)."""

    def error(v: torch.Tensor) -> torch.Tensor:
        if huber_delta is None:
            return 0.5 * (v - returns) ** 2
        return F.huber_loss(v, returns, reduction="none", delta=huber_delta)

    if not clip_vloss:
        return masked_mean(error(newvalue), mask)
    v_clipped = oldvalue + (newvalue - oldvalue).clamp(-clip_coef, clip_coef)
    return masked_mean(torch.max(error(newvalue), error(v_clipped)), mask)


def make_envs(args: Args, device: torch.device, num_envs: int, seed: int, replay_dir: Optional[str] = None):
    if args.backend == "smax":
        return SMAXEnvs(args.env_id, num_envs, seed, device, args.max_steps)
    return SC2Envs(args.env_id, num_envs, seed, device, replay_dir=replay_dir)


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


def build_actors(envs, args: Args) -> nn.ModuleList:
    return nn.ModuleList(Actor(envs.obs_dim, envs.num_actions, args.hidden_sizes) for _ in range(envs.num_agents))


def save_smax_animation(envs: SMAXEnvs, policy: BatchedActors, path: str, seed: int) -> None:
    """One deterministic episode of a single SMAX game, drawn by JaxMARL's visualizer into a GIF at path."""
    import matplotlib
    from jaxmarl.viz.visualizer import SMAXVisualizer

    matplotlib.rcParams["animation.writer"] = "pillow"  # GIFs without ffmpeg

    env, jax, jnp = envs.env, envs.jax, envs.jnp
    key, key_reset = jax.random.split(jax.random.PRNGKey(seed))
    _, state = env.reset(key_reset)
    state_seq, done = [], False
    while not done:
        obs, avail = env.get_obs(state), env.get_avail_actions(state)
        obs = torch.as_tensor(np.stack([obs[a] for a in env.agents]), device=envs.device).unsqueeze(0)
        avail = torch.as_tensor(np.stack([avail[a] for a in env.agents]), device=envs.device).bool().unsqueeze(0)
        action = policy.act(obs, avail, deterministic=True)[0][0].cpu().numpy()
        actions = {a: jnp.asarray(action[i]) for i, a in enumerate(env.agents)}
        key, key_step = jax.random.split(key)
        state_seq.append((key_step, state, actions))
        _, state, _, dones, _ = env.step(key_step, state, actions)
        done = bool(dones["__all__"])
    SMAXVisualizer(env, state_seq).animate(save_fname=path, view=False)


def evaluate(model_path: str, args: Args, device: torch.device, video_folder: Optional[str] = None) -> tuple:
    """Runs deterministic episodes with the actors saved in model_path; returns the team returns and the wins.

    SMAX plays all of them at once, one game each; StarCraft II plays them one after another in one game.
    """
    num_envs = args.eval_episodes if args.backend == "smax" else 1
    envs = make_envs(args, device, num_envs, args.seed + 10_000, replay_dir=video_folder)
    actors = build_actors(envs, args).to(device)
    actors.load_state_dict(torch.load(model_path, map_location=device)["actors"])
    policy = BatchedActors(actors)
    returns, wins = [], []
    episodes = np.zeros(num_envs, int)  # per game, up to ceil(eval_episodes / num_envs) each
    episode_returns = torch.zeros(num_envs, device=device)
    next_ = envs.reset()
    while len(returns) < args.eval_episodes:
        action, _ = policy.act(next_["obs"], next_["avail"], deterministic=True)
        next_ = envs.step(action)
        episode_returns += next_["reward"]
        done = next_["terminated"] | next_["truncated"]
        counted = (done & ~next_["restarted"]).cpu().numpy()  # a game lost to a crash is no episode
        for i in np.flatnonzero(counted & (episodes < -(-args.eval_episodes // num_envs))):
            returns.append(episode_returns[i].item())
            wins.append(next_["won"][i].item())
            episodes[i] += 1
        episode_returns *= ~done
    if video_folder is not None:
        os.makedirs(video_folder, exist_ok=True)
        if args.backend == "smax":
            save_smax_animation(envs, policy, os.path.join(video_folder, f"{args.env_id}.gif"), args.seed + 10_000)
        else:
            envs.games[0].save_replay()
    envs.close()
    return returns[: args.eval_episodes], wins[: args.eval_episodes]


if __name__ == "__main__":
    args = parse_args()
    jax_settings(args.cuda and torch.cuda.is_available())
    if (problem := check_args(args)) is not None:
        sys.exit(f"{os.path.basename(__file__)}: error: {problem}")
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = max(1, args.total_timesteps // args.batch_size)
    checkpoint = None if args.resume is None else load_checkpoint(args)
    run_name = f"{args.env_id}_{args.backend}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if checkpoint is not None:  # a resumed run appends to its own TensorBoard run
        run_name = checkpoint["run_name"]
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

    # env setup: SMAX compiles its step here; StarCraft II starts one game per environment
    try:
        envs = make_envs(args, device, args.num_envs, args.seed)
        next_ = envs.reset()
    except Exception as error:
        if args.backend == "smax":
            raise
        sys.exit(f"{os.path.basename(__file__)}: error: StarCraft II did not start ({error!r:.200}); {SC2_INSTALL}")
    # on resume, events a crashed run logged after its checkpoint are purged, so no step appears twice
    writer = SummaryWriter(f"runs/{run_name}", purge_step=None if checkpoint is None else checkpoint["global_step"] + 1)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )
    num_agents, num_actions, obs_dim = envs.num_agents, envs.num_actions, envs.obs_dim
    critic_shape = critic_inputs(next_["state"], next_["obs"], args.state_type).shape[1:]  # (C, critic_input_dim)

    actors = build_actors(envs, args).to(device)
    policy = BatchedActors(actors)  # all actors in one batched network for the rollout, reloaded after each update
    critic = Critic(critic_shape[-1], args.hidden_sizes).to(device)
    value_norm = ValueNorm(args.norm_value).to(device)
    actor_optimizers = [
        torch.optim.Adam(actor.parameters(), lr=args.learning_rate, eps=1e-5, fused=True) for actor in actors
    ]
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate, eps=1e-5, fused=True)

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs, num_agents, obs_dim), device=device)  # (T, E, N, obs_dim)
    states = torch.zeros((args.num_steps, args.num_envs, envs.state_dim), device=device)  # (T, E, state_dim)
    final_obs, final_states = torch.zeros_like(obs), torch.zeros_like(states)  # before a reset at step t
    avail_actions = torch.zeros(
        (args.num_steps, args.num_envs, num_agents, num_actions), dtype=torch.bool, device=device
    )
    actions = torch.zeros((args.num_steps, args.num_envs, num_agents), dtype=torch.long, device=device)  # (T, E, N)
    logprobs = torch.zeros((args.num_steps, args.num_envs, num_agents), device=device)  # (T, E, N)
    active_masks = torch.zeros((args.num_steps, args.num_envs, num_agents), device=device)  # (T, E, N): alive
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)  # (T, E): the team reward
    terminations = torch.zeros((args.num_steps, args.num_envs), device=device)
    truncations = torch.zeros((args.num_steps, args.num_envs), device=device)
    # finished episodes, kept on the device and logged once per iteration: (T, E) each
    finished = torch.zeros((args.num_steps, args.num_envs), dtype=torch.bool, device=device)
    finished_returns, finished_lengths, finished_wins = (
        torch.zeros_like(rewards),
        torch.zeros_like(rewards),
        torch.zeros_like(rewards),
    )

    # TRY NOT TO MODIFY: start the game
    global_step, start_iteration, last_iteration = 0, 1, 0
    if checkpoint is not None:  # continue: weights, optimizers, value statistics, random streams and step count
        load_training_state(checkpoint, actors, critic, value_norm, actor_optimizers, critic_optimizer)
        policy.load(actors)
        set_rng_states(checkpoint["rng"])
        global_step, last_iteration = checkpoint["global_step"], checkpoint["iteration"]
        start_iteration = last_iteration + 1
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"
    start_time, start_step = time.time(), global_step
    episode_returns = torch.zeros(args.num_envs, device=device)
    episode_lengths = torch.zeros(args.num_envs, device=device)
    recent_returns, recent_wins, mean_return, win_rate = [], [], float("nan"), float("nan")
    interrupted, bad_updates = stop_on_signals(), 0  # signals received; iterations in a row with a skipped update
    progress = tqdm(
        initial=global_step, total=args.num_iterations * args.batch_size, unit="step", disable=not sys.stderr.isatty()
    )

    for iteration in range(start_iteration, args.num_iterations + 1):
        if interrupted:
            break
        if iteration > 1 and (
            iteration == start_iteration or (args.checkpoint_every and (iteration - 1) % args.checkpoint_every == 0)
        ):
            # new episodes, seeded by the iteration: a run resumed from a checkpoint continues exactly
            next_ = envs.reset(seed=args.seed + iteration - 1)
            episode_returns.zero_()
            episode_lengths.zero_()
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            for optimizer in actor_optimizers:
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate
            critic_optimizer.param_groups[0]["lr"] = frac * args.critic_learning_rate

        rollout_start = time.time()
        for step in range(args.num_steps):
            obs[step], states[step], avail_actions[step], active_masks[step] = (
                next_["obs"],
                next_["state"],
                next_["avail"],
                next_["active"],
            )

            # ALGO LOGIC: each agent acts on its own observation, among its available actions (one batched call)
            actions[step], logprobs[step] = policy.act(next_["obs"], next_["avail"])

            # TRY NOT TO MODIFY: execute the game and log data.
            next_ = envs.step(actions[step])
            rewards[step], terminations[step], truncations[step] = (
                next_["reward"],
                next_["terminated"],
                next_["truncated"],
            )
            final_obs[step], final_states[step] = next_["final_obs"], next_["final_state"]
            episode_returns += next_["reward"]
            episode_lengths += 1
            done = next_["terminated"] | next_["truncated"]
            finished[step] = done & ~next_["restarted"]
            finished_returns[step], finished_lengths[step], finished_wins[step] = (
                episode_returns,
                episode_lengths,
                next_["won"],
            )
            episode_returns *= ~done
            episode_lengths *= ~done
        global_step += args.batch_size
        for step, env_idx in finished.nonzero().tolist():
            step_of_end = global_step - args.batch_size + (step + 1) * args.num_envs
            recent_returns.append(finished_returns[step, env_idx].item())
            recent_wins.append(finished_wins[step, env_idx].item())
            writer.add_scalar("charts/episodic_return", recent_returns[-1], step_of_end)
            writer.add_scalar("charts/episodic_length", finished_lengths[step, env_idx].item(), step_of_end)
        if finished.any():
            writer.add_scalar("charts/win_rate", finished_wins[finished].mean().item(), global_step)

        update_start = time.time()
        snapshot = copy.deepcopy(training_state(actors, critic, value_norm, actor_optimizers, critic_optimizer))
        try:  # a non-finite loss, gradient or parameter undoes the iteration's whole update (see except)
            # bootstrap value if not done: values (T, E, C), C = N agents (FP) or 1 (EP)
            with torch.no_grad():
                critic_in = critic_inputs(states, obs, args.state_type)
                values = value_norm.denormalize(critic(critic_in))
                next_value = value_norm.denormalize(
                    critic(critic_inputs(next_["state"], next_["obs"], args.state_type))
                )
                final_values = value_norm.denormalize(critic(critic_inputs(final_states, final_obs, args.state_type)))
                advantages = compute_gae(
                    rewards.unsqueeze(-1).expand_as(values),
                    values,
                    next_value,
                    terminations.unsqueeze(-1).expand_as(values),
                    truncations.unsqueeze(-1).expand_as(values),
                    final_values,
                    args.gamma,
                    args.gae_lambda,
                )
                returns = advantages + values
                value_norm.update(returns)

            # flatten the batch
            b_obs = obs.reshape(-1, num_agents, obs_dim)
            b_avail = avail_actions.reshape(-1, num_agents, num_actions)
            b_actions = actions.reshape(-1, num_agents)
            b_logprobs = logprobs.reshape(-1, num_agents)
            b_active = active_masks.reshape(-1, num_agents)
            b_critic_in = critic_in.reshape((-1,) + critic_shape)
            b_advantages = advantages.reshape(-1, critic_shape[0])
            b_returns = value_norm.normalize(returns.reshape(-1, critic_shape[0]))
            b_values = value_norm.normalize(values.reshape(-1, critic_shape[0]))
            b_value_mask = (
                b_active if args.state_type == "FP" else torch.ones_like(b_values)
            )  # dead agents' values don't count
            if args.norm_adv:
                adv_mean = masked_mean(b_advantages, b_value_mask)
                adv_std = masked_mean((b_advantages - adv_mean) ** 2, b_value_mask).sqrt()
                b_advantages = (b_advantages - adv_mean) / (adv_std + 1e-8)

            # ALGO LOGIC: sequential actor updates in a random order, each agent's advantage weighted by the factor
            # M = prod_{j before i_k} pi_new^j(a^j|o^j) / pi_old^j(a^j|o^j), clipped from above: min(M, c)
            order = list(range(num_agents)) if args.fixed_order else torch.randperm(num_agents).tolist()
            factor = torch.ones(args.batch_size, device=device)
            b_inds = np.arange(args.batch_size)
            pg_losses, entropies, approx_kls, clipfracs = [], [], [], []
            for k, agent in enumerate(order):
                m_used = factor_used(factor, args.factor, args.factor_clip)
                agent_advantages = b_advantages[:, agent if args.state_type == "FP" else 0]
                alive = b_active[:, agent] > 0
                writer.add_scalar(f"lv/factor_mean_{k}", factor.mean().item(), global_step)
                writer.add_scalar(f"lv/factor_max_{k}", factor.max().item(), global_step)
                writer.add_scalar(
                    f"lv/factor_clip_fraction_{k}", (factor > args.factor_clip).float().mean().item(), global_step
                )
                writer.add_scalar(
                    f"lv/adv_variance_{k}", (m_used * agent_advantages)[alive].var().nan_to_num().item(), global_step
                )

                actor, optimizer = actors[agent], actor_optimizers[agent]
                for epoch in range(args.update_epochs):
                    np.random.shuffle(b_inds)
                    for start in range(0, args.batch_size, args.minibatch_size):
                        mb_inds = b_inds[start : start + args.minibatch_size]
                        dist = actor.distribution(b_obs[mb_inds, agent], b_avail[mb_inds, agent])
                        newlogprob, entropy = dist.log_prob(b_actions[mb_inds, agent]), dist.entropy()
                        mb_mask = b_active[mb_inds, agent]  # a dead agent's forced no-op teaches nothing
                        pg_loss = actor_loss(
                            newlogprob,
                            b_logprobs[mb_inds, agent],
                            agent_advantages[mb_inds],
                            m_used[mb_inds],
                            mb_mask,
                            args.clip_coef,
                        )
                        entropy_loss = masked_mean(entropy, mb_mask)
                        loss = pg_loss - args.ent_coef * entropy_loss

                        optimizer.zero_grad()
                        loss.backward()
                        grad_norm = nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
                        check_finite(f"loss or gradient of agent {agent}", loss, grad_norm)
                        optimizer.step()
                        pg_losses.append(pg_loss.item())
                        entropies.append(entropy_loss.item())

                with torch.no_grad():
                    newlogprob = actor.distribution(b_obs[:, agent], b_avail[:, agent]).log_prob(b_actions[:, agent])
                    logratio = newlogprob - b_logprobs[:, agent]
                    ratio = logratio.exp()
                    approx_kls.append(masked_mean((ratio - 1) - logratio, b_active[:, agent]).item())
                    clipfracs.append(
                        masked_mean(((ratio - 1.0).abs() > args.clip_coef).float(), b_active[:, agent]).item()
                    )
                    # the next agent sees M * pi_new^{i_k} / pi_old^{i_k}: the unclipped product carries over
                    factor = accumulate_factor(factor, newlogprob, b_logprobs[:, agent], b_active[:, agent])

            # ALGO LOGIC: critic update on the normalized returns
            v_losses = []
            for epoch in range(args.critic_epochs):
                np.random.shuffle(b_inds)
                for start in range(0, args.batch_size, args.minibatch_size):
                    mb_inds = b_inds[start : start + args.minibatch_size]
                    newvalue = critic(b_critic_in[mb_inds])
                    v_loss = critic_loss(
                        newvalue,
                        b_values[mb_inds],
                        b_returns[mb_inds],
                        args.clip_coef,
                        args.clip_vloss,
                        args.huber_delta,
                        b_value_mask[mb_inds],
                    )
                    critic_optimizer.zero_grad()
                    v_loss.backward()
                    grad_norm = nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                    check_finite("critic loss or gradient", v_loss, grad_norm)
                    critic_optimizer.step()
                    v_losses.append(v_loss.item())
            check_finite("parameter", *actors.parameters(), *critic.parameters())
        except NonFiniteError as error:
            load_training_state(snapshot, actors, critic, value_norm, actor_optimizers, critic_optimizer)
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
        writer.add_scalar("charts/learning_rate", actor_optimizers[0].param_groups[0]["lr"], global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("losses/value_loss", np.mean(v_losses) if v_losses else 0.0, global_step)
        writer.add_scalar("losses/policy_loss", np.mean(pg_losses) if pg_losses else 0.0, global_step)
        writer.add_scalar("losses/entropy", np.mean(entropies) if entropies else 0.0, global_step)
        writer.add_scalar("losses/approx_kl", np.mean(approx_kls), global_step)
        writer.add_scalar("losses/clipfrac", np.mean(clipfracs), global_step)
        if args.backend == "sc2":
            writer.add_scalar("charts/sc2_restarts", envs.restarts, global_step)
        if recent_returns:
            mean_return, win_rate = np.mean(recent_returns), np.mean(recent_wins)
            recent_returns, recent_wins = [], []
        progress.update(args.batch_size)
        progress.set_postfix(episodic_return=f"{mean_return:.2f}", win_rate=f"{win_rate:.2f}", SPS=sps)
        progress.write(
            f"global_step={global_step}, episodic_return={mean_return:.2f}, win_rate={win_rate:.2f}, SPS={sps}"
        )
        sys.stdout.flush()  # the line reaches a log file now, not when the buffer fills
        last_iteration = iteration
        if args.checkpoint_every and (iteration % args.checkpoint_every == 0 or iteration == args.num_iterations):
            state = training_state(actors, critic, value_norm, actor_optimizers, critic_optimizer)
            save_checkpoint(checkpoint_path, make_checkpoint(state, global_step, iteration, run_name, args))

    progress.close()
    envs.close()
    if interrupted:  # SIGINT or SIGTERM: keep what was learned, say how to go on, exit 130 or 143
        state = training_state(actors, critic, value_norm, actor_optimizers, critic_optimizer)
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
        episodic_returns, wins = evaluate(
            model_path, args, device, f"videos/{run_name}" if args.capture_video else None
        )
        for idx, (episodic_return, won) in enumerate(zip(episodic_returns, wins, strict=True)):
            writer.add_scalar("eval/episodic_return", episodic_return, idx)
        writer.add_scalar("eval/win_rate", float(np.mean(wins)), global_step)
        print(
            f"eval: mean episodic_return={np.mean(episodic_returns):.2f}, win_rate={np.mean(wins):.2f} "
            f"over {len(episodic_returns)} episodes"
        )
        if not args.save_model:
            os.remove(model_path)

    writer.close()
