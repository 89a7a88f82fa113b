# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2 · Custom rewards
#
# A reward is any function `Outcome -> float`. The `Outcome` of a pruning policy holds its proxy
# `accuracy` and `loss`, its `macs_ratio` and `params_ratio` (fractions of the base model's), the per-group
# `ratios` and more. Here we write a reward that strongly prefers fewer *parameters* while the budget
# constrains *MACs*, run the same search with the default accuracy reward and with ours, and compare the
# policies they choose.
#
# **Sizes.** Run as is, this notebook uses the full sizes below. With the environment variable
# `PRUNE_ENV_NOTEBOOK_SMOKE=1` every size shrinks to a smoke test that only checks that the cells run (the
# test suite executes the notebooks that way, and so does the documentation site, whose copy of this page
# shows such a run); smoke-size numbers mean nothing.
#
# | setting | full | smoke |
# |---|---|---|
# | search | `evolution` if registered, else `random` | same |
# | evaluations per search | 150 | 4 |
# | proxy | library defaults | 96 samples, 1 BN batch |

# %%
# %matplotlib inline
import os

import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np

from agents import BudgetedEvaluator, available, run_agent
from prune_env.problem import PruningProblem

SMOKE = os.environ.get("PRUNE_ENV_NOTEBOOK_SMOKE") == "1"  # tiny sizes: the test suite sets this
EVALS = 4 if SMOKE else 150
PROXY = dict(eval_samples=96, bn_recalib_batches=1) if SMOKE else {}
AGENT = "evolution" if "evolution" in available() else "random"
print("search:", AGENT)


# %% [markdown]
# ## Write the reward


# %%
def fewer_params(outcome):
    """Accuracy minus twice the fraction of parameters kept: 1% fewer parameters is worth 2% accuracy."""
    return outcome.accuracy - 2.0 * outcome.params_ratio


# %% [markdown]
# One `PruningProblem` is shared by both searches (and by the environment below), so the base model,
# the budget projection and the proxy are identical: only the reward differs.

# %%
problem = PruningProblem("resnet20", "digits", target_macs=0.5, **PROXY)
uniform = problem.evaluate(np.zeros(problem.n_groups))  # the same ratio everywhere, at the target
print(f"uniform policy: accuracy {uniform.accuracy:.4f}, params ratio {uniform.params_ratio:.3f}")
print(f"  default reward {uniform.accuracy:.4f}, fewer_params {fewer_params(uniform):.4f}")

# %% [markdown]
# ## Plug it in
#
# Anywhere a reward is accepted, a callable works like a preset name: the environments take
# `reward=fewer_params`, and so does the evaluator that gives every search agent its budget.

# %%
env = gym.make("prune_env/OneShotPrune-v0", problem=problem, reward=fewer_params)
obs, _ = env.reset(seed=0)
_, reward, *_ = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
print(f"environment reward with fewer_params: {reward:.4f}")

# %%
searches = {}
for label, reward in [("accuracy", "acc"), ("fewer_params", fewer_params)]:
    result = run_agent(AGENT, BudgetedEvaluator(problem, EVALS, reward), seed=0)
    searches[label] = result
    best = result.best_outcome
    print(
        f"{label:>12}: {len(result.history)} evaluations; best accuracy {best.accuracy:.4f}, "
        f"MACs ratio {best.macs_ratio:.3f}, params ratio {best.params_ratio:.3f}"
    )

# %% [markdown]
# ## The policies differ
#
# Both respect the MACs budget, but the custom reward pays for parameters, which in a ResNet sit mostly
# in the late, wide stages; so it should prune those groups harder. Per group, the fraction of channels
# each search's best policy removes:

# %%
ratios = {label: r.best_ratios for label, r in searches.items()}
fig, ax = plt.subplots(figsize=(9, 3.5))
width = 0.4
for i, (label, r) in enumerate(ratios.items()):
    ax.bar(np.arange(problem.n_groups) + (i - 0.5) * width, r, width, label=label)
ax.set(
    xlabel="channel group (its channel count)", ylabel="fraction removed", title="Best policy of each search"
)
ax.set_xticks(range(problem.n_groups), [str(c) for c in problem.units], fontsize=7)
ax.legend()
plt.show()

diff = np.abs(ratios["accuracy"] - ratios["fewer_params"])
print(f"largest per-group difference: {diff.max():.3f}; policies identical: {bool(np.all(diff == 0))}")
print(
    "params ratio: accuracy reward {:.3f}, fewer_params {:.3f}".format(
        searches["accuracy"].best_outcome.params_ratio, searches["fewer_params"].best_outcome.params_ratio
    )
)

# %% [markdown]
# With only a few evaluations (the smoke size) both searches may pick the same policy; at the full size
# the custom reward's policy keeps fewer parameters at some cost in accuracy. Rewards can also shape the
# layer-wise environment step by step: give the callable a `shape(step_info) -> float` method
# (see `prune_env.rewards`).
