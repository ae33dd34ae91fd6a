"""The method itself, pinned: each script's `update_actors` and `update_shared_actor` called with stand-in actors whose
ratios the test sets, so that a wrong carry, a wrong clip, a missing reset or an unshuffled order fails here. The
stand-ins take their steps through a recorder in place of `agent_step`, which notes the factor each step weights the
advantage by (m_used); the real `agent_logratio` then reads the ratio the stand-in was given."""

import importlib
import math

import pytest
import torch
from conftest import parse
from torch import nn

SCRIPTS = ["lv_happo_mpe", "lv_happo_mamujoco", "lv_happo_vmas"]
BATCH = 4


class StandIn(nn.Module):
    """An actor whose log-probability of every action is the behaviour one (zero here) until its first step, and
    after its s-th step log(ratios[s - 1]), cycling: the ratio it hands on to the factor is the one the test set."""

    def __init__(self, *ratios: float):
        super().__init__()
        self.ratios, self.steps, self.act_dim = ratios, 0, 1

    def distribution(self, obs: torch.Tensor) -> "StandIn":
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        ratio = self.ratios[(self.steps - 1) % len(self.ratios)] if self.steps else 1.0
        return torch.full(actions.shape[:1], math.log(ratio))

    def entropy(self) -> torch.Tensor:
        return torch.zeros(BATCH)


class Writer:
    """A SummaryWriter's add_scalar, keeping the last value of each tag."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag: str, value, step: int) -> None:
        self.scalars[tag] = float(value)


def recorder(module, monkeypatch) -> list:
    """Replaces the script's agent_step (LV-HATRPO: trpo_step): each step is noted as (agent, m_used) and counts for
    its stand-in."""
    steps = []

    def note(actor, obs: torch.Tensor, m_used: torch.Tensor) -> None:
        assert torch.all(m_used == m_used[0])  # the stand-ins' ratios are the same on every sample
        steps.append((int(obs[0, 0]), float(m_used[0])))
        actor.steps += 1

    def step(actor, optimizer, *rest):  # (samples, args, logs), SMAC: (agent, samples, args, logs)
        samples = rest[-3]
        note(actor, samples[0], samples[-1])  # obs first, m_used last

    def trpo_step(actor, obs, actions, oldlogprob, advantages, m_used, args):
        note(actor, obs, m_used)
        return 0.004, 1, 1.0

    monkeypatch.setattr(module, "agent_step", step, raising=False)
    monkeypatch.setattr(module, "trpo_step", trpo_step, raising=False)
    return steps


def batch(num_agents: int) -> tuple:
    """obs (B, N, 1) holding each agent's index, actions (B, N, 1), behaviour log-probabilities 0, advantages."""
    obs = torch.arange(num_agents, dtype=torch.float32).expand(BATCH, num_agents).unsqueeze(-1)
    return obs, torch.zeros(BATCH, num_agents, 1), torch.zeros(BATCH, num_agents), torch.tensor([1.0, -1, 2, -2])


def script_args(module, *flags: str):
    epochs = [] if module.__name__ == "lv_hatrpo_mpe" else ["--update-epochs", "2", "--num-minibatches", "2"]
    return parse(module, *epochs, *flags)


def update(module, ratios: list, *flags: str) -> tuple:
    """update_actors on stand-ins with these ratios: the writer and the logs."""
    writer, logs = Writer(), {name: [] for name in ("policy_loss", "entropy", "approx_kl", "clipfrac", "skipped_steps")}
    smac, args = module.__name__ == "lv_happo_smac", script_args(module, *flags)
    actors = [(SMACStandIn if smac else StandIn)(ratio) for ratio in ratios]
    optimizers = [] if module.__name__ == "lv_hatrpo_mpe" else [[None] * len(ratios)]  # one trust-region step each
    data = smac_batch(torch.ones(BATCH, len(ratios))) if smac else batch(len(ratios))
    module.update_actors(actors, *optimizers, data, args, writer, 0, logs)
    return writer, logs


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("shared", [False, True])
def test_the_minibatches_of_an_epoch_split_the_batch_once_into_near_equal_parts(script, shared, monkeypatch):
    module = importlib.import_module(script)
    seen = []  # the advantages (1, -1, 2, -2: one per sample) of each step's minibatch

    def step(actor, optimizer, samples, args, logs):
        seen.append(sorted(samples[3].tolist()))
        actor.steps += 1

    monkeypatch.setattr(module, "agent_step", step)
    args = script_args(module, "--num-minibatches", "3", "--fixed-order")  # 3 does not divide the 4 samples
    logs = {name: [] for name in ("policy_loss", "entropy", "approx_kl", "clipfrac", "skipped_steps")}
    if shared:
        module.update_shared_actor(StandIn(1.0), None, batch(2), args, Writer(), 0, logs)
    else:
        module.update_actors([StandIn(1.0), StandIn(1.0)], [None, None], batch(2), args, Writer(), 0, logs)
    assert len(seen) == 2 * 2 * 3  # agents x epochs x minibatches: no minibatch of the remainder
    first_agent = seen[0::2] if shared else seen[:6]  # shared: the agents take turns on each minibatch
    for epoch in (first_agent[:3], first_agent[3:]):
        assert sorted(x for mb in epoch for x in mb) == [-2.0, -1.0, 1.0, 2.0]  # every sample once
        assert sorted(map(len, epoch)) == [1, 1, 2]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "factor, weights",
    [
        # ratios 2, 1/4, 3 in the order 0, 1, 2: M is 1, 2, 1/2 at positions 0, 1, 2
        ("clipped", [1.0, 1.0, 0.5]),  # min(M, 1): a clipped carry would give the third min(1, 1) / 4 = 0.25
        ("raw", [1.0, 2.0, 0.5]),
        ("none", [1.0, 1.0, 1.0]),
    ],
)
def test_each_agent_is_weighted_by_the_carried_factor(script, factor, weights, monkeypatch):
    module = importlib.import_module(script)
    steps = recorder(module, monkeypatch)
    writer, logs = update(module, [2.0, 0.25, 3.0], "--factor", factor, "--fixed-order")
    # agent after agent, each through its 2 epochs of 2 minibatches, each step weighted by its position's factor
    assert steps == [(agent, weight) for agent, weight in enumerate(weights) for _ in range(4)]
    assert logs["skipped_steps"] == []
    # the logged factor is M itself, unclipped; the variance is that of m_used * A
    assert [writer.scalars[f"lv/factor_mean_{k}"] for k in range(3)] == pytest.approx([1.0, 2.0, 0.5])
    assert writer.scalars["lv/factor_clip_fraction_1"] == 1.0 and writer.scalars["lv/factor_clip_fraction_2"] == 0.0
    variance = torch.tensor([1.0, -1, 2, -2]).var().item()
    assert writer.scalars["lv/adv_variance_2"] == pytest.approx(weights[2] ** 2 * variance)
    # each agent's update measured once, on its whole batch: KL(old || new) ~ (r - 1) - log r
    assert logs["approx_kl"] == pytest.approx([(r - 1) - math.log(r) for r in (2.0, 0.25, 3.0)])


@pytest.mark.parametrize("script", [*SCRIPTS, "lv_hatrpo_mpe", "lv_happo_smac"])
def test_order_is_a_fresh_permutation_each_iteration(script, monkeypatch):
    module = importlib.import_module(script)
    steps = recorder(module, monkeypatch)
    per_agent = 1 if script == "lv_hatrpo_mpe" else 4  # one trust-region step, or 2 epochs of 2 minibatches

    def orders(*flags: str) -> list:
        found = []
        for _ in range(12):
            steps.clear()
            update(module, [2.0] * 5, "--factor", "raw", *flags)
            assert [weight for _, weight in steps[::per_agent]] == [1.0, 2.0, 4.0, 8.0, 16.0]  # by position
            found.append([agent for agent, _ in steps[::per_agent]])
        return found

    torch.manual_seed(0)
    shuffled = orders()
    assert all(sorted(order) == list(range(5)) for order in shuffled)
    assert len({tuple(order) for order in shuffled}) > 6  # 12 draws of 120 permutations: fresh ones, not one
    torch.manual_seed(0)
    assert orders() == shuffled  # the same seed, the same orders
    assert orders("--fixed-order") == [list(range(5))] * 12


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "factor, weights",
    [  # per epoch, M = 1, 2, 0.5, 1.5, 3, 0.75 before each step: one actor whose steps give ratios 2, 1/4, 3, 2, ...
        ("raw", [1.0, 2.0, 0.5, 1.5, 3.0, 0.75]),
        ("clipped", [1.0, 1.0, 0.5, 1.0, 1.0, 0.75]),  # a clipped carry: 1, 1, 0.25, 0.75, 1, 0.25
    ],
)
def test_shared_actor_interleaves_agents_and_restarts_the_factor_every_epoch(script, factor, weights, monkeypatch):
    # one actor for 3 agents: per epoch, per minibatch, each agent of the order takes one step, after which its ratio
    # multiplies M; M is 1 again at the start of the next epoch
    module = importlib.import_module(script)
    steps = recorder(module, monkeypatch)
    writer, logs = Writer(), {name: [] for name in ("policy_loss", "entropy", "approx_kl", "clipfrac", "skipped_steps")}
    args = script_args(module, "--factor", factor, "--fixed-order", "--share-actor")
    module.update_shared_actor(StandIn(2.0, 0.25, 3.0), None, batch(3), args, writer, 0, logs)
    one_epoch = list(zip([0, 1, 2, 0, 1, 2], weights, strict=True))  # 2 minibatches x 3 agents
    assert steps == one_epoch + one_epoch and logs["skipped_steps"] == []
    assert [writer.scalars[f"lv/factor_mean_{k}"] for k in range(3)] == [1.0, 2.0, 0.5]  # the last epoch's first pass


@pytest.mark.parametrize("factor, weights", [("clipped", [1.0, 1.0, 0.5]), ("raw", [1.0, 2.0, 0.5])])
def test_hatrpo_carries_the_factor_the_same_way(factor, weights, monkeypatch):
    module = importlib.import_module("lv_hatrpo_mpe")
    steps = recorder(module, monkeypatch)
    writer, logs = update(module, [2.0, 0.25, 3.0], "--factor", factor, "--fixed-order")
    assert steps == list(enumerate(weights))  # one trust-region step per agent, in the order
    assert logs["skipped_steps"] == []
    assert [writer.scalars[f"lv/factor_mean_{k}"] for k in range(3)] == pytest.approx([1.0, 2.0, 0.5])
    assert writer.scalars["hatrpo/kl_2"] == 0.004 and writer.scalars["hatrpo/accepted_0"] == 1.0


class SMACStandIn(StandIn):
    """A stand-in with the SMAC actors' signature: distribution(obs, available actions, agent)."""

    def distribution(self, obs: torch.Tensor, avail: torch.Tensor, agent: int) -> "StandIn":
        return self


def smac_batch(alive: torch.Tensor) -> tuple:
    """The SMAC script's batch for N agents: obs holding each agent's index, available actions, actions holding each
    sample's index, behaviour log-probabilities 0, each agent's advantages, the alive masks given (B, N)."""
    n = alive.shape[1]
    obs, _, logprobs, advantages = batch(n)
    actions = torch.arange(BATCH, dtype=torch.float32)[:, None].expand(BATCH, n)
    return obs, torch.ones(BATCH, n, 2), actions, logprobs, advantages[:, None].expand(BATCH, n), alive


@pytest.mark.parametrize(
    "factor, weights",
    [  # agent 0 dead in sample 0 (ratio 1 there), 2 elsewhere; then 1/4: M = 1; 1, 2, 2, 2; 1/4, 1/2, 1/2, 1/2
        ("clipped", [[1.0] * 4, [1.0] * 4, [0.25, 0.5, 0.5, 0.5]]),
        ("raw", [[1.0] * 4, [1.0, 2.0, 2.0, 2.0], [0.25, 0.5, 0.5, 0.5]]),
    ],
)
def test_smac_carries_the_factor_and_a_dead_agent_carries_a_ratio_of_1(factor, weights, monkeypatch):
    module = importlib.import_module("lv_happo_smac")
    seen = []

    def step(actor, optimizer, agent, samples, args, logs):  # notes (agent, m_used by sample index)
        m_used = dict(zip(samples[2].long().tolist(), samples[6].tolist(), strict=True))
        seen.append((agent, [m_used[b] for b in range(BATCH)]))
        actor.steps += 1

    monkeypatch.setattr(module, "agent_step", step)
    alive = torch.ones(BATCH, 3)
    alive[0, 0] = 0
    actors = [SMACStandIn(ratio) for ratio in (2.0, 0.25, 3.0)]
    args = script_args(module, "--factor", factor, "--fixed-order", "--num-minibatches", "1")
    logs = {"approx_kl": [], "clipfrac": []}
    module.update_actors(actors, [None] * 3, smac_batch(alive), args, Writer(), 0, logs)
    assert seen == [(agent, weights[agent]) for agent in range(3) for _ in range(2)]  # 2 epochs of 1 minibatch
    # the KL estimate over the living samples only: agent 0's three, with ratio 2
    assert logs["approx_kl"][0] == pytest.approx((2 - 1) - math.log(2))


class RecurrentStandIn(StandIn):
    """A stand-in with the recurrent actors' signature: distribution(obs, avail, agent, h, starts) -> (dist, h)."""

    def distribution(self, obs: torch.Tensor, avail: torch.Tensor, agent: int, h: torch.Tensor, starts) -> tuple:
        return self, h

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return super().log_prob(actions.flatten()).view(actions.shape)


@pytest.mark.parametrize(
    "factor, weights",
    [  # as for the SMAC script, the samples now the 4 steps of one environment, in chunks of 2
        ("clipped", [[1.0] * 4, [1.0] * 4, [0.25, 0.5, 0.5, 0.5]]),
        ("raw", [[1.0] * 4, [1.0, 2.0, 2.0, 2.0], [0.25, 0.5, 0.5, 0.5]]),
    ],
)
def test_the_recurrent_script_carries_the_factor_over_the_whole_rollout(factor, weights, monkeypatch):
    module = importlib.import_module("lv_happo_smac_rnn")
    seen = []

    def step(actor, optimizer, agent, samples, h0, args, logs):  # notes (agent, m_used by step)
        m_used = dict(zip(samples[2].flatten().long().tolist(), samples[7].flatten().tolist(), strict=True))
        seen.append((agent, [m_used[t] for t in range(BATCH)]))
        actor.steps += 1

    monkeypatch.setattr(module, "agent_step", step)
    alive = torch.ones(BATCH, 3)
    alive[0, 0] = 0
    obs, avail, actions, logprobs, advantages, alive = (x[:, None] for x in smac_batch(alive))  # (T, E = 1, N, ...)
    starts, hidden = torch.zeros(BATCH, 1), torch.zeros(BATCH, 1, 3, 1)
    actors = [RecurrentStandIn(ratio) for ratio in (2.0, 0.25, 3.0)]
    flags = ("--factor", factor, "--fixed-order", "--data-chunk-length", "2", "--num-minibatches", "1")
    args = script_args(module, *flags)  # both chunks in one minibatch
    batch_ = (obs, avail.bool(), actions, logprobs, advantages, alive, starts, hidden)
    module.update_actors(actors, [None] * 3, batch_, args, Writer(), 0, {"approx_kl": [], "clipfrac": []})
    assert seen == [(agent, weights[agent]) for agent in range(3) for _ in range(2)]  # 2 epochs of 1 minibatch
