"""Generate the notebooks in this directory from the cell sources below.

The notebooks are written without outputs, so what is committed is what a run will compute; edit the cells
here (reviewable Python) and regenerate rather than editing the ``.ipynb`` files by hand::

    python notebooks/build_notebooks.py          # rewrite every notebook
    python notebooks/build_notebooks.py --check  # exit 1 if a notebook differs from its source here

Every notebook reads ``PRUNE_ENV_NOTEBOOK_SMOKE``: unset, it runs at the full size documented in its
first cells; ``PRUNE_ENV_NOTEBOOK_SMOKE=1`` shrinks every size to a smoke test (what the test suite runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SMOKE_NOTE = """\
**Sizes.** Run as is, this notebook uses the full sizes below. With the environment variable
`PRUNE_ENV_NOTEBOOK_SMOKE=1` every size shrinks to a smoke test that only checks that the cells run (the
test suite executes the notebooks that way); smoke-size numbers mean nothing."""

SMOKE_LINE = (
    'SMOKE = os.environ.get("PRUNE_ENV_NOTEBOOK_SMOKE") == "1"  # tiny sizes: the test suite sets this'
)


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip("\n"))


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text.strip("\n"))


# ------------------------------------------------------------------------------------------------ 01


def quickstart() -> list[nbformat.NotebookNode]:
    return [
        md(
            f"""
# 1 · Quickstart: prune a ResNet with reinforcement learning

This notebook makes a pruning environment, takes a few random actions, trains PPO on it briefly, and
builds the pruned model the search found.

The environment is `prune_env/OneShotPrune-v0`: one step per episode, whose action is a pruning ratio for
every *channel group* of the network (channels that must be removed together). The action is projected
onto the budget (here: at most 50% of the base model's MACs), the model is physically pruned and scored
by a fast proxy (accuracy on a fixed validation subset after BatchNorm recalibration), and that score is
the reward.

{SMOKE_NOTE}

| setting | full | smoke |
|---|---|---|
| random actions | 10 | 3 |
| PPO steps (= proxy evaluations) | 2,000 | 32 |
| proxy | library defaults (1,000 validation samples, 8 BN batches) | 96 samples, 1 BN batch |

The base model (resnet20 on the scikit-learn digits) is trained once, about a minute on a laptop CPU,
and cached under `$PRUNE_ENV_CACHE` (default `~/.cache/prune_env`).
"""
        ),
        code(
            f"""
import os

import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
from stable_baselines3 import PPO

import prune_env  # registers the environments
from prune_env import count_macs, count_params

{SMOKE_LINE}
RANDOM_ACTIONS = 3 if SMOKE else 10
PPO_STEPS = 32 if SMOKE else 2_000
PPO_ROLLOUT = 16 if SMOKE else 128  # one-step episodes: a rollout of N steps is N evaluated policies
PROXY = dict(eval_samples=96, bn_recalib_batches=1) if SMOKE else {{}}
TARGET = 0.5  # keep at most this fraction of the base model's MACs
"""
        ),
        md("## Make the environment"),
        code(
            """
env = gym.make("prune_env/OneShotPrune-v0", model="resnet20", dataset="digits", target_macs=TARGET, **PROXY)
problem = env.unwrapped.problem  # the shared scoring machinery: base model, graph, proxy
print(problem.graph)
print(f"{problem.n_groups} channel groups; base proxy accuracy {problem.base_accuracy:.4f}")
print("observation", env.observation_space.shape, "action", env.action_space.shape)
"""
        ),
        md(
            """
## A few random actions

Each step prunes the network once. `info` reports the proxy accuracy and the cost actually reached
(never above the target: the projection guarantees it).
"""
        ),
        code(
            """
env.action_space.seed(0)
for episode in range(RANDOM_ACTIONS):
    obs, info = env.reset(seed=episode)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    print(
        f"episode {episode}: reward {reward:.4f}  accuracy {info['accuracy']:.4f}  "
        f"MACs ratio {info['macs_ratio']:.3f}  params ratio {info['params_ratio']:.3f}"
    )
"""
        ),
        md(
            """
## Train PPO briefly

Stable-Baselines3 trains on the environment directly. A small wrapper remembers the best policy any
episode found, which is what a pruning search reports.
"""
        ),
        code(
            """
class KeepBest(gym.Wrapper):
    \"\"\"Remembers the highest-reward outcome seen during training.\"\"\"

    def __init__(self, env):
        super().__init__(env)
        self.best_reward, self.best = -np.inf, None
        self.rewards = []

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.rewards.append(float(reward))
        if reward > self.best_reward:
            self.best_reward, self.best = float(reward), self.env.unwrapped.last_outcome
        return obs, reward, terminated, truncated, info


train_env = KeepBest(env)
agent = PPO("MlpPolicy", train_env, n_steps=PPO_ROLLOUT, batch_size=PPO_ROLLOUT, seed=0, verbose=0)
agent.learn(total_timesteps=PPO_STEPS)

rewards = np.array(train_env.rewards)
print(f"{len(rewards)} episodes; best reward {train_env.best_reward:.4f}")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(rewards, ".", alpha=0.4, label="episode reward")
ax.plot(np.maximum.accumulate(rewards), label="best so far")
ax.set(xlabel="episode", ylabel="reward (proxy accuracy)")
ax.legend()
plt.show()
"""
        ),
        md("What the trained policy does now (its deterministic action):"),
        code(
            """
obs, _ = env.reset(seed=0)
action, _ = agent.predict(obs, deterministic=True)
_, reward, _, _, info = env.step(action)
print(f"policy: accuracy {info['accuracy']:.4f}, MACs ratio {info['macs_ratio']:.3f}")
"""
        ),
        md(
            """
## The pruned model

`problem.build(keep)` returns a physically smaller copy of the base model keeping the given number of
channels in each group. Its MACs and parameters, counted on the real module, match what the environment
computed from the dependency graph without building it.
"""
        ),
        code(
            """
best = train_env.best
pruned = problem.build(np.array(best.keep))
x = problem.example_inputs
base_macs, base_params = count_macs(problem.base_model, x), count_params(problem.base_model)
macs, params = count_macs(pruned, x), count_params(pruned)
print(f"MACs   {base_macs:>12,} -> {macs:>12,}  ({macs / base_macs:.3f})")
print(f"params {base_params:>12,} -> {params:>12,}  ({params / base_params:.3f})")
assert (macs, params) == (best.macs, best.params)  # the graph's cost model is exact
print(pruned)
"""
        ),
        code(
            """
fig, ax = plt.subplots(figsize=(8, 3))
ax.bar(range(problem.n_groups), problem.channels, color="lightgray", label="base")
ax.bar(range(problem.n_groups), best.keep, label="kept")
ax.set(xlabel="channel group", ylabel="channels", title="Channels kept per group by the best policy")
ax.legend()
plt.show()
"""
        ),
    ]


# ------------------------------------------------------------------------------------------------ 02


def custom_reward() -> list[nbformat.NotebookNode]:
    return [
        md(
            f"""
# 2 · Custom rewards

A reward is any function `Outcome -> float`. The `Outcome` of a pruning policy holds its proxy
`accuracy` and `loss`, its `macs_ratio` and `params_ratio` (fractions of the base model's), the per-group
`ratios` and more. Here we write a reward that strongly prefers fewer *parameters* while the budget
constrains *MACs*, run the same search with the default accuracy reward and with ours, and compare the
policies they choose.

{SMOKE_NOTE}

| setting | full | smoke |
|---|---|---|
| search | `evolution` if registered, else `random` | same |
| evaluations per search | 150 | 4 |
| proxy | library defaults | 96 samples, 1 BN batch |
"""
        ),
        code(
            f"""
import os

import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np

from agents import BudgetedEvaluator, available, run_agent
from prune_env.problem import PruningProblem

{SMOKE_LINE}
EVALS = 4 if SMOKE else 150
PROXY = dict(eval_samples=96, bn_recalib_batches=1) if SMOKE else {{}}
AGENT = "evolution" if "evolution" in available() else "random"
print("search:", AGENT)
"""
        ),
        md("## Write the reward"),
        code(
            """
def fewer_params(outcome):
    \"\"\"Accuracy minus twice the fraction of parameters kept: 1% fewer parameters is worth 2% accuracy.\"\"\"
    return outcome.accuracy - 2.0 * outcome.params_ratio
"""
        ),
        md(
            """
One `PruningProblem` is shared by both searches (and by the environment below), so the base model,
the budget projection and the proxy are identical: only the reward differs.
"""
        ),
        code(
            """
problem = PruningProblem("resnet20", "digits", target_macs=0.5, **PROXY)
uniform = problem.evaluate(np.zeros(problem.n_groups))  # the same ratio everywhere, at the target
print(f"uniform policy: accuracy {uniform.accuracy:.4f}, params ratio {uniform.params_ratio:.3f}")
print(f"  default reward {uniform.accuracy:.4f}, fewer_params {fewer_params(uniform):.4f}")
"""
        ),
        md(
            """
## Plug it in

Anywhere a reward is accepted, a callable works like a preset name: the environments take
`reward=fewer_params`, and so does the evaluator that gives every search agent its budget.
"""
        ),
        code(
            """
env = gym.make("prune_env/OneShotPrune-v0", problem=problem, reward=fewer_params)
obs, _ = env.reset(seed=0)
_, reward, *_ = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
print(f"environment reward with fewer_params: {reward:.4f}")
"""
        ),
        code(
            """
searches = {}
for label, reward in [("accuracy", "acc"), ("fewer_params", fewer_params)]:
    result = run_agent(AGENT, BudgetedEvaluator(problem, EVALS, reward), seed=0)
    searches[label] = result
    best = result.best_outcome
    print(
        f"{label:>12}: {len(result.history)} evaluations; best accuracy {best.accuracy:.4f}, "
        f"MACs ratio {best.macs_ratio:.3f}, params ratio {best.params_ratio:.3f}"
    )
"""
        ),
        md(
            """
## The policies differ

Both respect the MACs budget, but the custom reward pays for parameters, which in a ResNet sit mostly
in the late, wide stages; so it should prune those groups harder. Per group, the fraction of channels
each search's best policy removes:
"""
        ),
        code(
            """
ratios = {label: r.best_ratios for label, r in searches.items()}
fig, ax = plt.subplots(figsize=(9, 3.5))
width = 0.4
for i, (label, r) in enumerate(ratios.items()):
    ax.bar(np.arange(problem.n_groups) + (i - 0.5) * width, r, width, label=label)
ax.set(xlabel="channel group (its channel count)", ylabel="fraction removed", title="Best policy of each search")
ax.set_xticks(range(problem.n_groups), [str(c) for c in problem.channels], fontsize=7)
ax.legend()
plt.show()

diff = np.abs(ratios["accuracy"] - ratios["fewer_params"])
print(f"largest per-group difference: {diff.max():.3f}; policies identical: {bool(np.all(diff == 0))}")
print(
    "params ratio: accuracy reward {:.3f}, fewer_params {:.3f}".format(
        searches["accuracy"].best_outcome.params_ratio, searches["fewer_params"].best_outcome.params_ratio
    )
)
"""
        ),
        md(
            """
With only a few evaluations (the smoke size) both searches may pick the same policy; at the full size
the custom reward's policy keeps fewer parameters at some cost in accuracy. Rewards can also shape the
layer-wise environment step by step: give the callable a `shape(step_info) -> float` method
(see `prune_env.rewards`).
"""
        ),
    ]


# ------------------------------------------------------------------------------------------------ 03


def dependency_graph() -> list[nbformat.NotebookNode]:
    return [
        md(
            f"""
# 3 · The dependency graph of a torchvision model

Pruning a channel means removing it from the layer that produces it *and* from every layer that reads it.
Residual additions, concatenations and channel shuffles couple channels of different layers, so they must
be removed together. `build_graph` traces a model with `torch.fx`, finds these *channel groups*, and
builds an exact cost model: MACs and parameters for any pruning, without building the pruned model.

{SMOKE_NOTE}

| setting | full | smoke |
|---|---|---|
| input resolution | 64 × 64 | 32 × 32 |
| pruning ratios checked | 0.25, 0.5, 0.75 | 0.5 |

Costs are exact for the input size given; a small resolution keeps tracing fast.
"""
        ),
        code(
            f"""
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from prune_env import build_graph, count_macs, count_params, prune
from prune_env.models import get_model

{SMOKE_LINE}
RESOLUTION = 32 if SMOKE else 64
RATIOS = (0.5,) if SMOKE else (0.25, 0.5, 0.75)
torch.manual_seed(0)
x = torch.randn(1, 3, RESOLUTION, RESOLUTION)
"""
        ),
        md("## ResNet-18: residual stages couple their convolutions"),
        code(
            """
resnet = get_model("tv:resnet18", num_classes=10).eval()
graph = build_graph(resnet, x)
print(graph)
print(graph.table())
"""
        ),
        md(
            """
A group with several producers is a residual stage: every block's last convolution writes into the
same sum, so their output channels (and the BatchNorms and the convolutions reading the sum) go
together. The group with the most producers:
"""
        ),
        code(
            """
residual = max(graph.groups, key=lambda g: len(g.producers))
print(residual.details())
print()
print("producers:", [m.layer for m in residual.producers])
"""
        ),
        code(
            """
inner = min(graph.groups, key=lambda g: len(g.members))  # a block's inner convolution: a private group
print(inner.details())
print()
print("channels that can never be pruned (and why):")
for name, reason in list(graph.frozen.items())[:5]:
    print(f"  {name}: {reason}")
if not graph.frozen:
    print("  none")
"""
        ),
        md(
            """
## ShuffleNet V2: channel splits and shuffles

`chunk` splits a tensor's channels in two and `channel_shuffle` interleaves them, so a unit of pruning
can span channels at scattered positions, or several channels at once.
"""
        ),
        code(
            """
shufflenet = get_model("tv:shufflenet_v2_x0_5", num_classes=10).eval()
sgraph = build_graph(shufflenet, x)
print(sgraph)
print(sgraph.table())
"""
        ),
        code(
            """
def coupled(group):
    \"\"\"Members whose channels are interleaved (scattered) or bound several to a unit.\"\"\"
    return [m for m in group.members if m.offset is None or m.multiplicity != 1]


shuffled = max(sgraph.groups, key=lambda g: (len(coupled(g)), len(g.members)))
print(shuffled.details())
"""
        ),
        md(
            """
## Costs without building the model

`graph.macs(ratio)` and `graph.params(ratio)` use the cost model; `prune(...)` builds the physically
pruned network, on which `count_macs` / `count_params` count by running it. They must agree exactly.
"""
        ),
        code(
            """
rows = []
for name, model, g in [("resnet18", resnet, graph), ("shufflenet_v2_x0_5", shufflenet, sgraph)]:
    for ratio in RATIOS:
        pruned = prune(model, x, ratio, graph=g)
        counted = (count_macs(pruned, x), count_params(pruned))
        predicted = (g.macs(ratio), g.params(ratio))
        assert counted == predicted, (name, ratio, counted, predicted)
        assert pruned(x).shape == model(x).shape  # still a working classifier
        rows.append((name, ratio, predicted[0] / g.base_macs, predicted[1] / g.base_params))
        print(
            f"{name:<20} ratio {ratio:.2f}: MACs {predicted[0]:>12,} ({rows[-1][2]:.3f}), "
            f"params {predicted[1]:>10,} ({rows[-1][3]:.3f})  == counted on the pruned model"
        )
"""
        ),
        md(
            """
The cost model is what makes budget projection cheap: a search can price thousands of candidate
policies without building one. Costs are not proportional to the ratio, since a convolution loses
both input and output channels:
"""
        ),
        code(
            """
grid = np.linspace(0, 0.9, 10)
fig, ax = plt.subplots(figsize=(5, 3.5))
for name, g in [("resnet18", graph), ("shufflenet_v2_x0_5", sgraph)]:
    ax.plot(grid, [g.macs(r) / g.base_macs for r in grid], label=f"{name} MACs")
    ax.plot(grid, [g.params(r) / g.base_params for r in grid], "--", label=f"{name} params")
ax.plot(grid, (1 - grid) ** 2, ":k", label="(1 - ratio)²")
ax.set(xlabel="uniform pruning ratio", ylabel="fraction of base cost")
ax.legend(fontsize="small")
plt.show()
"""
        ),
    ]


# ------------------------------------------------------------------------------------------------ 04


def benchmark_agents() -> list[nbformat.NotebookNode]:
    return [
        md(
            f"""
# 4 · Benchmark search agents

`prune_env.app.benchmark.run` runs every agent × seed on every (model, dataset, target), each with the same
evaluation budget on one shared `PruningProblem` (same base model, same proxy), optionally fine-tunes
each run's best pruned model identically and scores it on the test split, and saves tidy results:
`runs.csv` (one row per run), `evaluations.csv` (one row per evaluation) and `runs.json`. Rows are
written as each run finishes; running the cell again resumes an interrupted grid.

{SMOKE_NOTE}

| setting | full | smoke |
|---|---|---|
| agents | every registered agent | `uniform`, `random`, `evolution` (if registered) |
| targets (MACs fraction) | 0.3, 0.5 | 0.5 |
| seeds | 3 | 1 |
| evaluations per run | 100 | 4 |
| fine-tune epochs (KD, final report) | 10 | 1 |
| proxy | library defaults | 96 samples, 1 BN batch |

At full size expect tens of minutes on a laptop CPU, most of it in the RL agents' proxy evaluations.
"""
        ),
        code(
            f"""
import os
from pathlib import Path

import agents
from prune_env.app import benchmark

{SMOKE_LINE}
AGENTS = agents.available()
if SMOKE:
    AGENTS = [a for a in ("uniform", "random", "evolution") if a in AGENTS]
TARGETS = (0.5,) if SMOKE else (0.3, 0.5)
SEEDS = (0,) if SMOKE else (0, 1, 2)
EVALS = 4 if SMOKE else 100
FINETUNE_EPOCHS = 1 if SMOKE else 10
PROXY = dict(eval_samples=96, bn_recalib_batches=1) if SMOKE else {{}}
OUT = Path("runs") / ("benchmark-smoke" if SMOKE else "benchmark")
print("agents:", ", ".join(AGENTS))
"""
        ),
        md("## Run the grid"),
        code(
            """
results = benchmark.run(
    AGENTS,
    models=("resnet20",),
    datasets=("digits",),
    targets=TARGETS,
    seeds=SEEDS,
    evals=EVALS,
    out=OUT,
    finetune_epochs=FINETUNE_EPOCHS,
    problem_kwargs=PROXY,
)
print(f"{len(results.runs)} runs, {len(results.evaluations)} evaluations, saved in {OUT.resolve()}")
"""
        ),
        md(
            """
## The table

Per target and agent, mean ± standard deviation over seeds: proxy accuracy of the best policy (validation
subset), its MACs and parameter ratios, and the test accuracy after the identical fine-tune.
"""
        ),
        code("print(results.table())"),
        md(
            """
## Accuracy vs MACs

Every evaluated policy as a faint point per agent, each agent's Pareto front (the best accuracy found
at no more than a given cost) as a line, and the uniform policy (the same ratio in every group) as the
reference every method must beat.
"""
        ),
        code('results.plot_pareto(OUT / "pareto.png")'),
        md(
            """
## Learning curves

Proxy accuracy of the best policy found so far against evaluations spent: the mean over seeds with the
min–max band. Equal budgets make the x axes directly comparable.
"""
        ),
        code('results.plot_curves(OUT / "curves.png")'),
        md(
            """
## The tidy files

Each row of `runs.csv` identifies a run by `agent, model, dataset, target, seed`; `evaluations.csv`
repeats those keys on every evaluation, so either file loads straight into pandas (optional) or any
other tool. `BenchmarkResults.load(OUT)` reads them back.
"""
        ),
        code(
            """
reloaded = benchmark.BenchmarkResults.load(OUT)
try:
    runs_df, evals_df = reloaded.dataframes()
except ImportError:  # pandas is not a dependency
    print("pandas not installed; rows as dicts:")
    for row in reloaded.runs[:3]:
        print({k: row[k] for k in ("agent", "target", "seed", "evals_used", "best_accuracy", "test_accuracy")})
else:
    display(runs_df.drop(columns=["ratios", "keep"]))
"""
        ),
    ]


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_custom_reward.ipynb": custom_reward,
    "03_dependency_graph.ipynb": dependency_graph,
    "04_benchmark_agents.ipynb": benchmark_agents,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating an unchanged notebook changes nothing
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a notebook is not up to date")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        text = nbformat.writes(build(name)) + "\n"
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/build_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
