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
# # 3 · The dependency graph of a torchvision model
#
# Pruning a channel means removing it from the layer that produces it *and* from every layer that reads it.
# Residual additions, concatenations and channel shuffles couple channels of different layers, so they must
# be removed together. `build_graph` traces a model with `torch.fx`, finds these *channel groups*, and
# builds an exact cost model: MACs and parameters for any pruning, without building the pruned model.
#
# **Sizes.** Run as is, this notebook uses the full sizes below. With the environment variable
# `PRUNE_ENV_NOTEBOOK_SMOKE=1` every size shrinks to a smoke test that only checks that the cells run (the
# test suite executes the notebooks that way, and so does the documentation site, whose copy of this page
# shows such a run); smoke-size numbers mean nothing.
#
# | setting | full | smoke |
# |---|---|---|
# | input resolution | 64 × 64 | 32 × 32 |
# | pruning ratios checked | 0.25, 0.5, 0.75 | 0.5 |
#
# Costs are exact for the input size given; a small resolution keeps tracing fast.

# %%
# %matplotlib inline
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from prune_env import build_graph, count_macs, count_params, prune
from prune_env.models import get_model

SMOKE = os.environ.get("PRUNE_ENV_NOTEBOOK_SMOKE") == "1"  # tiny sizes: the test suite sets this
RESOLUTION = 32 if SMOKE else 64
RATIOS = (0.5,) if SMOKE else (0.25, 0.5, 0.75)
torch.manual_seed(0)
x = torch.randn(1, 3, RESOLUTION, RESOLUTION)

# %% [markdown]
# ## ResNet-18: residual stages couple their convolutions

# %%
resnet = get_model("tv:resnet18", num_classes=10).eval()
graph = build_graph(resnet, x)
print(graph)
print(graph.table())

# %% [markdown]
# A group with several producers is a residual stage: every block's last convolution writes into the
# same sum, so their output channels (and the BatchNorms and the convolutions reading the sum) go
# together. The group with the most producers:

# %%
residual = max(graph.groups, key=lambda g: len(g.producers))
print(residual.details())
print()
print("producers:", [m.layer for m in residual.producers])

# %%
inner = min(graph.groups, key=lambda g: len(g.members))  # a block's inner convolution: a private group
print(inner.details())
print()
print("channels that can never be pruned (and why):")
for name, reason in list(graph.frozen.items())[:5]:
    print(f"  {name}: {reason}")
if not graph.frozen:
    print("  none")

# %% [markdown]
# ## ShuffleNet V2: channel splits and shuffles
#
# `chunk` splits a tensor's channels in two and `channel_shuffle` interleaves them, so a unit of pruning
# can span channels at scattered positions, or several channels at once.

# %%
shufflenet = get_model("tv:shufflenet_v2_x0_5", num_classes=10).eval()
sgraph = build_graph(shufflenet, x)
print(sgraph)
print(sgraph.table())


# %%
def coupled(group):
    """Members whose channels are interleaved (scattered) or bound several to a unit."""
    return [m for m in group.members if m.offset is None or m.multiplicity != 1]


shuffled = max(sgraph.groups, key=lambda g: (len(coupled(g)), len(g.members)))
print(shuffled.details())

# %% [markdown]
# ## Costs without building the model
#
# `graph.macs(ratio)` and `graph.params(ratio)` use the cost model; `prune(...)` builds the physically
# pruned network, on which `count_macs` / `count_params` count by running it. They must agree exactly.

# %%
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

# %% [markdown]
# The cost model is what makes budget projection cheap: a search can price thousands of candidate
# policies without building one. Costs are not proportional to the ratio, since a convolution loses
# both input and output channels:

# %%
grid = np.linspace(0, 0.9, 10)
fig, ax = plt.subplots(figsize=(5, 3.5))
for name, g in [("resnet18", graph), ("shufflenet_v2_x0_5", sgraph)]:
    ax.plot(grid, [g.macs(r) / g.base_macs for r in grid], label=f"{name} MACs")
    ax.plot(grid, [g.params(r) / g.base_params for r in grid], "--", label=f"{name} params")
ax.plot(grid, (1 - grid) ** 2, ":k", label="(1 - ratio)²")
ax.set(xlabel="uniform pruning ratio", ylabel="fraction of base cost")
ax.legend(fontsize="small")
plt.show()
