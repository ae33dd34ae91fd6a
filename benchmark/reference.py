"""What bad and good look like on simple_spread: uniformly random actions and hand-written controllers.

    python benchmark/reference.py --num-agents 3 5 --episodes 100           # mpe2 (lv_happo_mpe.py)
    python benchmark/reference.py --vmas --num-agents 2 3 5 8 12              # VMAS (lv_happo_vmas.py)

The controller assigns agents to landmarks once per episode, greedily by distance (the closest free pair first);
`nearest`, uncoordinated, sends each agent to the landmark nearest to it at the start. Both steer an agent to its
landmark with a proportional push and velocity damping, u = gain * (landmark - p) - damping * v, as continuous
actions of lv_happo_mpe.py's environment (mpe2's continuous actions are [no-op, -x, +x, -y, +y] push magnitudes
in [0, 1]). All run on the scripts' own environment, so the returns are in the units the scripts log (the sum of
the agents' rewards over the 25-step episode). With `--vmas` the same three policies play VMAS's simple_spread
through lv_happo_vmas.py's adapter, 1,000 episodes as one batch (its actions: a force in [-1, 1] per axis; its
team reward: the shared reward, see that script), so the returns are in the units lv_happo_vmas.py logs; `fixed`
sends agent i to landmark i.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lv_happo_mpe import Args, MultiAgentArrays  # noqa: E402


def greedy_assignment(positions: np.ndarray, landmarks: np.ndarray) -> list:
    """Agent i -> landmark assignment[i], the closest free (agent, landmark) pair first."""
    distances = np.linalg.norm(positions[:, None] - landmarks[None], axis=-1)
    assignment, taken = [-1] * len(positions), set()
    for flat in np.argsort(distances, axis=None):
        agent, landmark = divmod(int(flat), len(landmarks))
        if assignment[agent] < 0 and landmark not in taken:
            assignment[agent] = landmark
            taken.add(landmark)
    return assignment


def controller_actions(obs: np.ndarray, assignment: list, gain: float, damping: float) -> np.ndarray:
    """obs (N, obs_dim) of simple_spread: [velocity, position, landmarks relative (2N), ...] -> actions (N, 5)."""
    actions = np.zeros((len(obs), 5), np.float32)
    for i, landmark in enumerate(assignment):
        push = gain * obs[i, 4 + 2 * landmark : 6 + 2 * landmark] - damping * obs[i, 0:2]
        actions[i, 1:] = np.clip([-push[0], push[0], -push[1], push[1]], 0.0, 1.0)
    return actions


def episode_returns(num_agents: int, episodes: int, policy: str, gain: float = 10.0, damping: float = 2.0) -> list:
    env, rng, returns = MultiAgentArrays(Args(num_agents=num_agents)), np.random.default_rng(0), []
    for episode in range(episodes):
        arrays, total, done = env.reset(seed=episode)[0], 0.0, False
        obs = arrays["obs"]
        landmarks = obs[0, 2:4] + obs[0, 4 : 4 + 2 * num_agents].reshape(num_agents, 2)
        assignment = greedy_assignment(obs[:, 2:4], landmarks)
        if policy == "nearest":
            assignment = np.linalg.norm(obs[:, None, 2:4] - landmarks[None], axis=-1).argmin(1).tolist()
        while not done:
            if policy == "random":
                actions = rng.uniform(0, 1, (num_agents, 5)).astype(np.float32)
            else:
                actions = controller_actions(arrays["obs"], assignment, gain, damping)
            arrays, reward, terminated, truncated, _ = env.step(actions)
            total, done = total + reward, terminated or truncated
        returns.append(total)
    return returns


def vmas_episode_returns(
    num_agents: int, episodes: int, policy: str, gain: float = 10.0, damping: float = 1.0, max_steps: int = 25
) -> list:
    """Returns of `episodes` VMAS simple_spread episodes played at once by `policy` (random, nearest, fixed or
    controller). obs (E, N, obs_dim) of VMAS's spread: [position, velocity, landmarks relative (2N), others...]."""
    import torch

    import lv_happo_vmas

    args = lv_happo_vmas.Args(num_agents=num_agents, max_steps=max_steps)
    envs, rng = lv_happo_vmas.VMASEnvs(args, episodes, 0, torch.device("cpu")), np.random.default_rng(0)
    obs = envs.reset(seed=0)[0].numpy()
    relative = obs[:, :, 4 : 4 + 2 * num_agents].reshape(episodes, num_agents, num_agents, 2)  # landmark - position
    if policy == "fixed":
        assignment = np.tile(np.arange(num_agents), (episodes, 1))
    elif policy == "nearest":
        assignment = np.linalg.norm(relative, axis=-1).argmin(-1)
    elif policy == "controller":
        landmarks = obs[:, 0, None, 0:2] + relative[:, 0]  # (E, N landmarks, 2), from agent 0's view
        assignment = np.array([greedy_assignment(o[:, 0:2], lm) for o, lm in zip(obs, landmarks, strict=True)])
    total = np.zeros(episodes)
    for _ in range(max_steps):
        if policy == "random":
            actions = rng.uniform(-1, 1, (episodes, num_agents, 2))
        else:
            relative = obs[:, :, 4 : 4 + 2 * num_agents].reshape(episodes, num_agents, num_agents, 2)
            target = np.take_along_axis(relative, assignment[:, :, None, None], axis=2)[:, :, 0]
            actions = np.clip(gain * target - damping * obs[:, :, 2:4], -1.0, 1.0)
        next_obs, _, reward, *_ = envs.step(torch.as_tensor(actions, dtype=torch.float32))
        obs, total = next_obs.numpy(), total + reward.numpy()
    return total.tolist()


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-agents", nargs="+", type=int, default=[3, 5])
    parser.add_argument("--episodes", type=int, default=None, help="100 (mpe2) or 1000 (VMAS)")
    parser.add_argument("--vmas", action="store_true", help="VMAS's simple_spread instead of mpe2's")
    args = parser.parse_args(argv)
    for n in args.num_agents:
        for policy in (
            ("random", "nearest", "fixed", "controller") if args.vmas else ("random", "nearest", "controller")
        ):
            if args.vmas:
                returns = vmas_episode_returns(n, args.episodes or 1000, policy)
            else:
                returns = episode_returns(n, args.episodes or 100, policy)
            print(f"simple_spread N={n} {policy}: mean return {np.mean(returns):.1f} over {len(returns)} episodes")


if __name__ == "__main__":
    main()
