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
# # 1 · Quickstart: prune a ResNet with reinforcement learning
#
# This notebook makes a pruning environment, takes a few random actions, trains PPO on it briefly, and
# builds the pruned model the search found.
#
# The environment is `prune_env/OneShotPrune-v0`: one step per episode, whose action is a pruning ratio for
# every *channel group* of the network (channels that must be removed together). The action is projected
# onto the budget (here: at most 50% of the base model's MACs), the model is physically pruned and scored
# by a fast proxy (accuracy on a fixed validation subset after BatchNorm recalibration), and that score is
# the reward.
#
# **Sizes.** Run as is, this notebook uses the full sizes below. With the environment variable
# `PRUNE_ENV_NOTEBOOK_SMOKE=1` every size shrinks to a smoke test that only checks that the cells run (the
# test suite executes the notebooks that way, and so does the documentation site, whose copy of this page
# shows such a run); smoke-size numbers mean nothing.
#
# | setting | full | smoke |
# |---|---|---|
# | random actions | 10 | 3 |
# | PPO steps (= proxy evaluations) | 2,000 | 32 |
# | proxy | library defaults (1,000 validation samples, 8 BN batches) | 96 samples, 1 BN batch |
#
# The base model (resnet20 on the scikit-learn digits) is trained once, about a minute on a laptop CPU,
# and cached under `$PRUNE_ENV_CACHE` (default `~/.cache/prune_env`).

# %%
# %matplotlib inline
import os

import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
from stable_baselines3 import PPO

import prune_env  # noqa: F401  (registers the environments)
from prune_env import count_macs, count_params

SMOKE = os.environ.get("PRUNE_ENV_NOTEBOOK_SMOKE") == "1"  # tiny sizes: the test suite sets this
RANDOM_ACTIONS = 3 if SMOKE else 10
PPO_STEPS = 32 if SMOKE else 2_000
PPO_ROLLOUT = 16 if SMOKE else 128  # one-step episodes: a rollout of N steps is N evaluated policies
PROXY = dict(eval_samples=96, bn_recalib_batches=1) if SMOKE else {}
TARGET = 0.5  # keep at most this fraction of the base model's MACs

# %% [markdown]
# ## Make the environment

# %%
env = gym.make("prune_env/OneShotPrune-v0", model="resnet20", dataset="digits", target_macs=TARGET, **PROXY)
problem = env.unwrapped.problem  # the shared scoring machinery: base model, graph, proxy
print(problem.graph)
print(f"{problem.n_groups} channel groups; base proxy accuracy {problem.base_accuracy:.4f}")
print("observation", env.observation_space.shape, "action", env.action_space.shape)

# %% [markdown]
# ## A few random actions
#
# Each step prunes the network once. `info` reports the proxy accuracy and the cost actually reached
# (never above the target: the projection guarantees it).

# %%
env.action_space.seed(0)
for episode in range(RANDOM_ACTIONS):
    obs, info = env.reset(seed=episode)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    print(
        f"episode {episode}: reward {reward:.4f}  accuracy {info['accuracy']:.4f}  "
        f"MACs ratio {info['macs_ratio']:.3f}  params ratio {info['params_ratio']:.3f}"
    )


# %% [markdown]
# ## Train PPO briefly
#
# Stable-Baselines3 trains on the environment directly. A small wrapper remembers the best policy any
# episode found, which is what a pruning search reports.


# %%
class KeepBest(gym.Wrapper):
    """Remembers the highest-reward outcome seen during training."""

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

# %% [markdown]
# What the trained policy does now (its deterministic action):

# %%
obs, _ = env.reset(seed=0)
action, _ = agent.predict(obs, deterministic=True)
_, reward, _, _, info = env.step(action)
print(f"policy: accuracy {info['accuracy']:.4f}, MACs ratio {info['macs_ratio']:.3f}")

# %% [markdown]
# ## The pruned model
#
# `problem.build(keep)` returns a physically smaller copy of the base model keeping the given number of
# channels in each group. Its MACs and parameters, counted on the real module, match what the environment
# computed from the dependency graph without building it.

# %%
best = train_env.best
pruned = problem.build(np.array(best.keep))
x = problem.example_inputs
base_macs, base_params = count_macs(problem.base_model, x), count_params(problem.base_model)
macs, params = count_macs(pruned, x), count_params(pruned)
print(f"MACs   {base_macs:>12,} -> {macs:>12,}  ({macs / base_macs:.3f})")
print(f"params {base_params:>12,} -> {params:>12,}  ({params / base_params:.3f})")
assert (macs, params) == (best.macs, best.params)  # the graph's cost model is exact
print(pruned)

# %% [markdown]
# The picture pruning papers show: the fraction of each group's channels the best policy keeps, in network
# order, beside uniform pruning to the same target (a search run saves it as `allocation.png`).

# %%
kept = np.array(best.keep) / problem.units
uniform = problem.uniform_keep() / problem.units
groups = np.arange(problem.n_groups)
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.bar(groups - 0.2, kept, 0.4, label="best policy")
ax.bar(groups + 0.2, uniform, 0.4, color="tab:gray", alpha=0.6, label="uniform, same target")
ax.set_xticks(groups, problem.group_names, rotation=90, fontsize=7)
ax.set(ylabel="fraction of channels kept", ylim=(0, 1.05))
ax.legend()
plt.show()
