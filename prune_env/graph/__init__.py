"""Dependency graph: which channels of a network must be pruned together, and what any pruning costs.

How it works (the *why* matters more than the how here); the modules follow the data:

1. ``tracing``: ``torch.fx`` traces the model; standard ``torch.nn`` layers and declared layers
   (``layers``) are leaves.
2. ``propagate``: an interpreter runs the traced graph on the example inputs — on meta tensors, shapes
   only (``meta``), unless a black-box layer needs real values — and, next to every value, propagates a
   *channel-id tensor* (``elements``): an int64 tensor broadcastable to the value whose entries name
   "channel elements". Layers that create channels (conv/linear outputs, parameters) allocate fresh
   elements; element 0 is *poison* (model inputs and outputs, anything we cannot map).
3. ``ops`` names the rule for each op (``rules_functions``, ``rules_modules``). Elementwise ops (residual
   add, squeeze-excite multiply, norms) *union* the elements they pair up. Data-movement ops (view,
   permute, flatten, cat, chunk, channel shuffle, ...) are executed on the id tensors themselves, so their
   index mapping is exact rather than hand-written. An op no table names freezes the channels it touches.
4. ``resolve``: union-find over the elements gives *units*: sets of channels that must disappear together.
   Units born in the same layer, or joined by a union, form a *group* (one pruning ratio), as in DepGraph;
   concat keeps its producers in separate groups. A unit touching poison is never pruned. Each group
   lists its *members* (every layer dimension it runs along) and ``cost_terms`` turns them into exact
   MAC and parameter counts for any numbers of kept units.

Ops whose behaviour depends on the channel count at run time are handled so that the pruned model's own
code still computes the same thing: ``chunk`` and a ``view`` that splits the channel axis (channel shuffle)
union corresponding positions, so every part keeps the same channels; a literal size that cannot adapt
(``x[:, :64]``, ``view(n, 64, -1)``) poisons the channels it touches, with one warning naming the nodes.
A size read from a tensor (``b, c, h, w = x.shape``) remembers the channels it counts: a reshape that uses it
for another tensor's channels couples the two, so both keep the same number (a block that rebuilds its
input's shape from the attention output's channels stays consistent).

Attention is mapped from its ops (``rules_attention``): a matrix product unites the positions it contracts
and makes the positions each output fibre sums over one unit, so ``q @ kᵀ`` and ``attn @ v`` (or the fused
``scaled_dot_product_attention``) prune whole heads; their MACs are counted on *operation slots* (kind
``"op"``), which cost terms use but which are never group members. A head count used as a literal size
(``reshape(B, N, 3, self.num_heads, self.head_dim)``) is declared with ``LayerSpec(resize=fn,
split_axis=-2)``.

Layers the engine does not know are declared once with :func:`register_layer` (a :class:`LayerSpec`): a
module that behaves like a torch layer but computes differently (timm's ``Conv2dSame``), a black box whose
output channel ``c`` depends only on input channel ``c`` (anti-aliasing blur, ECA attention), or a traced
module whose literal channel sizes are recomputed after surgery (selective-kernel input splits).
"""

from prune_env.graph.build import build_graph, example_tuple
from prune_env.graph.dependency_graph import (
    DependencyGraph,
    check_module,
    check_round_to,
    unit_count_to_keep,
    units_to_keep,
)
from prune_env.graph.layers import (
    LayerSpec,
    layer_spec,
    register_layer,
    register_opaque,
    shrink_channelwise,
    spec_sizes,
    spec_tensors,
)
from prune_env.graph.tracing import trace
from prune_env.graph.values import ChannelGroup, Member, MemberKind, MemberPositions, Slot

__all__ = [
    "ChannelGroup",
    "DependencyGraph",
    "LayerSpec",
    "Member",
    "MemberKind",
    "MemberPositions",
    "Slot",
    "build_graph",
    "check_module",
    "check_round_to",
    "example_tuple",
    "layer_spec",
    "register_layer",
    "register_opaque",
    "shrink_channelwise",
    "spec_sizes",
    "spec_tensors",
    "trace",
    "unit_count_to_keep",
    "units_to_keep",
]
