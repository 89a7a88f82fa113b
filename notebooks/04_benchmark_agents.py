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
# # 4 · Benchmark search agents
#
# `prune_env.app.benchmark.run` runs every agent × seed on every (model, dataset, target), each with the same
# evaluation budget on one shared `PruningProblem` (same base model, same proxy), optionally fine-tunes
# each run's best pruned model identically and scores it on the test split, and saves tidy results:
# `runs.csv` (one row per run), `evaluations.csv` (one row per evaluation) and `runs.json`. Rows are
# written as each run finishes; running the cell again resumes an interrupted grid.
#
# **Sizes.** Run as is, this notebook uses the full sizes below. With the environment variable
# `PRUNE_ENV_NOTEBOOK_SMOKE=1` every size shrinks to a smoke test that only checks that the cells run (the
# test suite executes the notebooks that way, and so does the documentation site, whose copy of this page
# shows such a run); smoke-size numbers mean nothing.
#
# | setting | full | smoke |
# |---|---|---|
# | agents | every registered agent | `uniform`, `random`, `evolution` (if registered) |
# | targets (MACs fraction) | 0.3, 0.5 | 0.5 |
# | seeds | 3 | 1 |
# | evaluations per run | 100 | 4 |
# | fine-tune epochs (KD, final report) | 10 | 1 |
# | proxy | library defaults | 96 samples, 1 BN batch |
#
# At full size expect tens of minutes on a laptop CPU, most of it in the RL agents' proxy evaluations.

# %%
# %matplotlib inline
import os
from pathlib import Path

from IPython.display import display

import agents
from prune_env.app import benchmark

SMOKE = os.environ.get("PRUNE_ENV_NOTEBOOK_SMOKE") == "1"  # tiny sizes: the test suite sets this
AGENTS = agents.available()
if SMOKE:
    AGENTS = [a for a in ("uniform", "random", "evolution") if a in AGENTS]
TARGETS = (0.5,) if SMOKE else (0.3, 0.5)
SEEDS = (0,) if SMOKE else (0, 1, 2)
EVALS = 4 if SMOKE else 100
FINETUNE_EPOCHS = 1 if SMOKE else 10
PROXY = dict(eval_samples=96, bn_recalib_batches=1) if SMOKE else {}
OUT = Path("runs") / ("benchmark-smoke" if SMOKE else "benchmark")
print("agents:", ", ".join(AGENTS))

# %% [markdown]
# ## Run the grid

# %%
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

# %% [markdown]
# ## The table
#
# Per target and agent, mean ± standard deviation over seeds: proxy accuracy of the best policy (validation
# subset), its MACs and parameter ratios, and the test accuracy after the identical fine-tune.

# %%
print(results.table())

# %% [markdown]
# ## Accuracy vs MACs
#
# Every evaluated policy as a faint point per agent, each agent's Pareto front (the best accuracy found
# at no more than a given cost) as a line, and the uniform policy (the same ratio in every group) as the
# reference every method must beat.

# %%
results.plot_pareto(OUT / "pareto.png")

# %% [markdown]
# ## Learning curves
#
# Proxy accuracy of the best policy found so far against evaluations spent: the mean over seeds with the
# min–max band. Equal budgets make the x axes directly comparable.

# %%
results.plot_curves(OUT / "curves.png")

# %% [markdown]
# ## The tidy files
#
# Each row of `runs.csv` identifies a run by `agent, model, dataset, target, seed`; `evaluations.csv`
# repeats those keys on every evaluation, so either file loads straight into pandas (optional) or any
# other tool. `BenchmarkResults.load(OUT)` reads them back.

# %%
reloaded = benchmark.BenchmarkResults.load(OUT)
try:
    runs_df, evals_df = reloaded.dataframes()
except ImportError:  # pandas is not a dependency
    print("pandas not installed; rows as dicts:")
    for row in reloaded.runs[:3]:
        print(
            {k: row[k] for k in ("agent", "target", "seed", "evals_used", "best_accuracy", "test_accuracy")}
        )
else:
    display(runs_df.drop(columns=["ratios", "keep"]))
