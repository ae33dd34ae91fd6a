"""The scripts are siblings: each is self-contained, so the pieces they share are copies, and the copies must stay
textually identical (a fix to one is a fix to all), and every script sets up in the same order. Differences that an
environment or a method truly needs are named here, with the reason."""

import ast

import pytest
from conftest import ROOT

SCRIPTS = ["lv_happo_mpe.py", "lv_hatrpo_mpe.py", "lv_happo_mamujoco.py", "lv_happo_smac.py", "lv_happo_vmas.py"]
SCRIPTS.append("lv_happo_smac_rnn.py")  # the SMAC script with recurrent actors and critic
EVERY = set(SCRIPTS)
SHARING = {"lv_happo_mpe.py", "lv_happo_mamujoco.py", "lv_happo_vmas.py"}  # the update's pieces, without masks
GYM = {"lv_happo_mpe.py", "lv_hatrpo_mpe.py", "lv_happo_mamujoco.py"}  # gymnasium's vector API, one env per thunk
# piece: the scripts whose copies must be identical; every other script's own version is named in DIFFERENT
SHARED = {
    "fail": EVERY,
    "layer_init": EVERY,
    "mlp": EVERY,
    "ValueNorm": EVERY,
    "compute_gae": EVERY,
    "advantages_and_returns": EVERY - {"lv_happo_smac.py", "lv_happo_smac_rnn.py"},
    "reached_states": GYM,
    "evaluate_saved_model": GYM,
    "factor_used": EVERY,
    "critic_loss": EVERY,
    "agent_step": SHARING,
    "agent_logratio": SHARING,
    "log_update": SHARING | {"lv_hatrpo_mpe.py"},
    "update_actors": SHARING,
    "update_shared_actor": SHARING,
    "log_factor": EVERY,
    "gradient_step": EVERY,
    "make_env": GYM,
    "Actor": {"lv_happo_mpe.py", "lv_hatrpo_mpe.py", "lv_happo_vmas.py"},
    "act": {"lv_happo_mpe.py", "lv_hatrpo_mpe.py", "lv_happo_vmas.py"},
    "evaluate": GYM - {"lv_happo_mamujoco.py"},
    "load_run": EVERY,
    "restore": EVERY,
    "save_checkpoint": EVERY,
    "catch_interrupts": EVERY,
    "make_actors": {"lv_happo_mpe.py", "lv_happo_vmas.py"},
    "MultiAgentArrays": {"lv_happo_mpe.py"},
}
DIFFERENT = {
    ("advantages_and_returns", "lv_happo_smac.py"): "a value per agent with the FP state; returns the critic's inputs",
    ("update_actors", "lv_hatrpo_mpe.py"): "one trust-region step per agent (trpo_step), not epochs of clipped steps",
    ("update_actors", "lv_happo_smac.py"): "available actions and alive masks in the batch; a dead agent's ratio is 1",
    ("update_shared_actor", "lv_happo_smac.py"): "the same masks as its update_actors",
    (
        "agent_logratio",
        "lv_happo_smac.py",
    ): "0 where the agent is dead (its forced no-op); its actor takes the agent id",
    ("log_update", "lv_happo_smac.py"): "over the living samples only",
    ("make_env", "lv_happo_smac.py"): "batched simulators (SMAX vmapped, StarCraft II processes), not thunks",
    ("make_env", "lv_happo_vmas.py"): "one batched simulator (`VMASEnvs`), not thunks",
    ("Actor", "lv_happo_mamujoco.py"): "Gaussian policies only",
    ("Actor", "lv_happo_smac.py"): "categorical policies over the available actions",
    ("act", "lv_happo_mamujoco.py"): "Gaussian policies only",
    ("act", "lv_happo_smac.py"): "available-action masks; every SMAX agent of a map has the same sizes",
    ("agent_step", "lv_happo_smac.py"): "the loss over the living agent's samples, among its available actions",
    ("evaluate", "lv_happo_smac.py"): "win rates, SMAX games in parallel or one StarCraft II game",
    ("evaluate", "lv_happo_mamujoco.py"): "the actors stacked once for act's vmapped pass (17 and 20 agents)",
    ("evaluate", "lv_happo_vmas.py"): "one batch of episodes, VMAS's shared random state",
    ("evaluate_saved_model", "lv_happo_vmas.py"): "the sizes from one batched environment, not a thunk's",
    ("evaluate_saved_model", "lv_happo_smac.py"): "win rates, from the batched evaluation environments",
    ("make_actors", "lv_hatrpo_mpe.py"): "no shared actor: one trust-region step per agent",
    ("make_actors", "lv_happo_mamujoco.py"): "Gaussian actors only",
    ("make_actors", "lv_happo_smac.py"): "every SMAX agent of a map has one size; a shared actor is told the ids",
    ("MultiAgentArrays", "lv_happo_mamujoco.py"): "MaMuJoCo's parallel env, its partitions and observation options",
    ("MultiAgentArrays", "lv_hatrpo_mpe.py"): "no shared actor, so no one-hot id (tested below)",
    (
        "advantages_and_returns",
        "lv_happo_smac_rnn.py",
    ): "one pass of the recurrent critic over the rollout, from its first hidden state",
    (
        "log_update",
        "lv_happo_smac_rnn.py",
    ): "as lv_happo_smac.py's (test_the_recurrent_smac_script_shares_the_smac_pieces)",
    (
        "make_env",
        "lv_happo_smac_rnn.py",
    ): "as lv_happo_smac.py's (test_the_recurrent_smac_script_shares_the_smac_pieces)",
    (
        "make_actors",
        "lv_happo_smac_rnn.py",
    ): "as lv_happo_smac.py's (test_the_recurrent_smac_script_shares_the_smac_pieces)",
    (
        "evaluate_saved_model",
        "lv_happo_smac_rnn.py",
    ): "as lv_happo_smac.py's (test_the_recurrent_smac_script_shares_the_smac_pieces)",
    ("Actor", "lv_happo_smac_rnn.py"): "recurrent: a GRU cell after the MLP base, hidden states in and out",
    ("act", "lv_happo_smac_rnn.py"): "carries each agent's hidden state and resets it where an episode began",
    ("agent_step", "lv_happo_smac_rnn.py"): "on chunks of steps, each from its stored hidden state",
    ("agent_logratio", "lv_happo_smac_rnn.py"): "over the whole rollout from the rollout's first hidden state",
    ("evaluate", "lv_happo_smac_rnn.py"): "carries the actors' hidden states through each episode",
    ("update_actors", "lv_happo_smac_rnn.py"): "in chunks; the carry from a pass over the whole rollout",
    ("update_shared_actor", "lv_happo_smac_rnn.py"): "in chunks; the carry from a pass over the whole rollout",
}
# the set-up of the main block, in CleanRL's order
SETUP = [
    "args = tyro.cli(Args)",
    "check_args(args)",
    "load_run(args.resume, args)",
    "run_name = ",
    "# TRY NOT TO MODIFY: seeding",
    "# env setup",
    "critic_optimizer = ",
    "# ALGO Logic: Storage setup",
    "# TRY NOT TO MODIFY: checkpoints hold",
    "restore(checkpoint, stateful)",  # before anything is written: a file that does not fit ends in one line
    "wandb.init(",
    "writer = SummaryWriter(",
    "# TRY NOT TO MODIFY: start the game",
    "for iteration in range(start_iteration, args.num_iterations + 1):",
    "# ALGO LOGIC: sequential ",
    "# ALGO LOGIC: critic update",
    "# TRY NOT TO MODIFY: record rewards",
]


def pieces(script: str) -> dict:
    """{name: source text} of the script's module-level functions, classes and assignments."""
    source = (ROOT / script).read_text()
    found = {}
    for node in ast.parse(source).body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
        names += [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for name in names:  # a name assigned twice keeps both texts
            found[name] = found.get(name, "") + ast.get_source_segment(source, node) + "\n"
    return found


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_pieces_are_identical(name):
    texts = {script: pieces(script).get(name) for script in SCRIPTS}
    copies = {texts[script] for script in SHARED[name]}
    assert None not in copies, f"{name} is missing from {[s for s in SHARED[name] if texts[s] is None]}"
    assert len(copies) == 1, f"{name} differs between {sorted(SHARED[name])}: copy the changed one to the others"
    for script in EVERY - SHARED[name]:  # a script outside the group says why, or has no such piece
        assert (name, script) in DIFFERENT or texts[script] is None, f"{script}'s {name}: share it or name why not"


def test_named_differences_are_real():
    for name, script in DIFFERENT:
        assert script not in SHARED[name] and pieces(script).get(name) != pieces(min(SHARED[name])).get(name)


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_block_sets_up_in_the_same_order(script):
    source = (ROOT / script).read_text()
    main = source[source.index('if __name__ == "__main__":') :]
    positions = [main.find(marker) for marker in SETUP]
    assert -1 not in positions, [marker for marker, at in zip(SETUP, positions, strict=True) if at == -1]
    assert positions == sorted(positions), [
        marker for marker, _ in sorted(zip(SETUP, positions, strict=True), key=lambda p: p[1])
    ]


def test_mpe_arrays_differ_only_by_the_id():
    """LV-HATRPO has no shared actor: its MultiAgentArrays is LV-HAPPO's without the one-hot id, line for line."""
    happo = pieces("lv_happo_mpe.py")["MultiAgentArrays"].splitlines()
    id_lines = [line for line in happo if "if self.share_actor:" in line or "np.eye(len(obs))" in line]
    assert len(id_lines) == 2
    happo = "\n".join(line for line in happo if line not in id_lines) + "\n"
    without_id = {
        ", self.share_actor = render_mode, args.continuous_actions, args.share_actor": " = render_mode, "
        "args.continuous_actions",
        " + n * self.share_actor for a in self.agents]  # + id": " for a in self.agents]",
    }
    for mine, theirs in without_id.items():
        assert mine in happo, mine
        happo = happo.replace(mine, theirs)
    assert happo == pieces("lv_hatrpo_mpe.py")["MultiAgentArrays"]


SMAC_PIECES = ["smax_maps", "SMAXEnvs", "SC2Envs", "CriticInput", "masked_mean", "actor_loss", "log_update"]
SMAC_PIECES += ["make_env", "start_env", "make_actors", "evaluate_saved_model"]


@pytest.mark.parametrize("name", SMAC_PIECES)
def test_the_recurrent_smac_script_shares_the_smac_pieces(name):
    assert pieces("lv_happo_smac_rnn.py")[name] == pieces("lv_happo_smac.py")[name], f"{name}: copy one to the other"
