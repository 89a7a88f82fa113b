"""Dead-channel equivalence: channels whose contribution is zero are removed without changing outputs.

For every group we zero the producers' filters/norm parameters and the consumers' input weights of some
units; L1 importance must then rank exactly those units last, and pruning them must leave the outputs
unchanged. This proves that every coupled slice was found and sliced at the right offsets.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision

import prune_env
import prune_env.surgery

MODELS = [
    ("resnet18", 32),
    ("resnext50_32x4d", 32),
    ("densenet121", 32),
    ("googlenet", 64),
    ("shufflenet_v2_x0_5", 32),
    ("mobilenet_v2", 32),
    ("mobilenet_v3_small", 32),
    ("efficientnet_b0", 32),
    ("regnet_y_400mf", 32),
    ("squeezenet1_1", 64),
    ("vgg11_bn", 32),
]
# LayerNorm normalises over all channels, so a zero channel still changes the statistics: the equivalence
# does not hold for it (ConvNeXt is covered by the zoo test instead). GroupNorm does hold: its channels go
# by whole normalisation groups (below).


def randomised_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, so a wrong slice cannot hide behind γ=1, β=0."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.1, generator=gen)


@pytest.mark.parametrize(("name", "res"), MODELS)
def test_zeroed_units_are_pruned_first_and_outputs_do_not_change(name: str, res: int) -> None:
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = torchvision.models.get_model(name, weights=None)
    randomised_bn(model, gen)
    model = model.double().eval()
    x = torch.randn(2, 3, res, res, generator=gen, dtype=torch.float64)
    graph = prune_env.build_graph(model, x[:1])

    rng = np.random.default_rng(0)
    dead: dict[int, np.ndarray] = {}
    for g in graph.groups:
        k = int(rng.integers(1, g.units))  # at least one dead unit, at least one alive
        dead[g.index] = np.sort(rng.choice(g.units, size=k, replace=False))
    prune_env.surgery.zero_units(model, graph, dead)
    with torch.no_grad():
        reference = model(x)

    ratios = [len(dead[g.index]) / g.units for g in graph.groups]
    assert list(graph.keep_counts(ratios)) == [g.units - len(dead[g.index]) for g in graph.groups]
    pruned = prune_env.prune(model, x[:1], ratios, graph=graph)
    explicit = prune_env.prune_channels(
        model, graph, {g.index: np.setdiff1d(np.arange(g.units), dead[g.index]) for g in graph.groups}
    )
    with torch.no_grad():
        out = pruned(x)
        out_explicit = explicit(x)
    # L1 importance picked exactly the dead units: same model as the explicit removal.
    assert torch.equal(out, out_explicit)
    torch.testing.assert_close(out, reference, rtol=1e-9, atol=1e-9)
    assert prune_env.count_macs(pruned, x[:1]) == graph.macs(ratios)


def test_removing_live_channels_does_change_outputs() -> None:
    """The equivalence test can fail: pruning channels that are *not* dead changes the outputs."""
    model = torchvision.models.resnet18().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = prune_env.build_graph(model, x[:1])
    pruned = prune_env.prune(model, x[:1], 0.25, graph=graph)
    with torch.no_grad():
        assert not torch.allclose(pruned(x), model(x), atol=1e-6)


class GroupNormNet(torch.nn.Module):
    """Conv → GroupNorm → ReLU twice, with a residual add across the second pair (RetinaNet v2's and BiT's
    pattern), in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GroupNorm(4, 16)
        self.c2, self.n2 = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.GroupNorm(8, 16)
        self.head = torch.nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.n1(self.c1(x)))
        return self.head(y + torch.relu(self.n2(self.c2(y))))


def test_groupnorm_goes_by_whole_groups_and_dead_groups_go_without_changing_outputs() -> None:
    gen = torch.Generator().manual_seed(3)
    model = GroupNormNet().double().eval()
    for norm in (model.n1, model.n2):
        norm.weight.data.uniform_(0.5, 1.5, generator=gen)
        norm.bias.data.normal_(0, 0.1, generator=gen)
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    graph = prune_env.build_graph(model, x[:1])
    # The residual couples n1's and n2's channels into one group whose units are the coarser grouping's:
    # n1's 4 groups of 4 channels (each one 2 of n2's groups).
    (group,) = graph.groups
    assert group.units == 4
    prune_env.surgery.zero_units(model, graph, {group.index: np.array([1, 2])})
    with torch.no_grad():
        reference = model(x)
    pruned = prune_env.prune_channels(model, graph, {group.index: np.array([0, 3])})
    assert (pruned.n1.num_groups, pruned.n1.num_channels, pruned.n2.num_groups) == (2, 8, 4)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference, rtol=1e-9, atol=1e-9)
    assert prune_env.count_macs(pruned, x[:1]) == graph.macs(0.5)
    # Removing live groups does change the outputs (the check above can fail).
    live = prune_env.prune_channels(model, graph, {group.index: np.array([1, 2])})
    with torch.no_grad():
        assert not torch.allclose(live(x), reference, atol=1e-6)
