"""Behaviour of the engine's public API: ratios, importance, errors, costs, coupling on small models."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import prune_env
import prune_env.surgery
from prune_env import InvalidRatiosError, InvalidSettingError, UnknownNameError, UntraceableModelError


class ConcatNet(nn.Module):
    """Two producers concatenated, then a flatten→linear head: offsets and feature blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(12 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.fc(torch.flatten(self.pool(self.dw(y)), 1))


class SharedConvNet(nn.Module):
    """The same convolution applied twice: its input and output channels are one group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.relu(self.shared(self.stem(x)))))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # fx cannot trace a branch on tensor values
            return self.conv(x)
        return x


class WithDataDependentBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = DataDependent()
        self.mid = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.block(self.stem(x)))))


class UnsupportedOpNet(nn.Module):
    """A cumulative sum over channels cannot be mapped: those channels must stay, with a warning."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cumsum(self.c1(x), dim=1)
        return self.c3(torch.relu(self.c2(y)))


class LiteralSliceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.c2(self.c1(x)[:, :4]))  # a literal bound baked into the code


X = torch.randn(1, 3, 8, 8)


def test_ratio_zero_is_the_identity() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    graph = prune_env.build_graph(model, x[:1])
    same = prune_env.prune(model, x[:1], 0.0, graph=graph)
    assert same is not model
    assert graph.macs(0.0) == graph.base_macs
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
    assert prune_env.count_params(same) == prune_env.count_params(model)


def test_ratio_forms_and_validation() -> None:
    model = ConcatNet().eval()
    graph = prune_env.build_graph(model, X)
    names = [g.name for g in graph.groups]
    assert names == ["a", "b"]  # the depthwise conv joins the producers' groups; fc's output is the model's
    by_name = prune_env.prune(model, X, {"a": 0.5}, graph=graph)
    assert by_name.a.out_channels == 4 and by_name.b.out_channels == 4
    by_seq = prune_env.prune(model, X, [0.5, 0.5], graph=graph)
    assert (by_seq.a.out_channels, by_seq.b.out_channels, by_seq.dw.groups) == (4, 2, 6)
    with pytest.raises(InvalidRatiosError, match="expected 2 ratios"):
        graph.macs([0.1, 0.2, 0.3])
    with pytest.raises(InvalidRatiosError, match="finite"):
        graph.macs([float("nan"), 0.1])
    with pytest.raises(InvalidRatiosError, match=r"\[0, 1\]"):
        graph.macs(1.5)
    with pytest.raises(InvalidRatiosError, match="unknown group name"):
        graph.macs({"nope": 0.1})


def test_ratio_one_keeps_one_channel_per_group() -> None:
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 32, 32)
    graph = prune_env.build_graph(model, x)
    assert list(graph.keep_counts(1.0)) == [1] * len(graph.groups)
    tiny = prune_env.prune(model, x, 1.0, graph=graph)
    with torch.no_grad():
        assert tiny(x).shape == (1, 1000)
    assert prune_env.count_macs(tiny, x) == graph.macs(1.0)


def test_round_to_gives_multiples() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    graph = prune_env.build_graph(model, x)
    keep = graph.keep_counts(0.37, round_to=8)
    assert all(k % 8 == 0 for k in keep)
    pruned = prune_env.prune(model, x, 0.37, graph=graph, round_to=8)
    assert pruned.conv1.out_channels == keep[0]
    assert prune_env.count_macs(pruned, x) == graph.macs(0.37, round_to=8)


def test_concat_offsets_depthwise_and_flatten_blocks() -> None:
    graph = prune_env.build_graph(ConcatNet(), X)
    a, b = graph.groups
    fc_a = next(m for m in a.members if m.layer == "fc")
    fc_b = next(m for m in b.members if m.layer == "fc")
    assert (fc_a.offset, fc_a.multiplicity, len(fc_a.positions)) == (0, 4, 32)  # 8 channels × 2×2 features
    assert (fc_b.offset, fc_b.multiplicity) == (32, 4)
    dw_b = [m for m in b.members if m.layer == "dw"]
    assert {m.kind for m in dw_b} == {"in", "out"} and all(m.offset == 8 for m in dw_b)
    assert "offset 8" in b.details() and "fc (Linear)" in b.details()


def test_shared_module_prunes_consistently() -> None:
    model = SharedConvNet().eval()
    graph = prune_env.build_graph(model, X)
    assert len(graph.groups) == 1  # stem out = shared in = shared out
    pruned = prune_env.prune(model, X, 0.5, graph=graph)
    assert pruned.shared.in_channels == pruned.shared.out_channels == 3
    assert prune_env.count_macs(pruned, X) == graph.macs(0.5)


def test_untraceable_module_names_the_module_and_the_fix() -> None:
    model = WithDataDependentBlock().eval()
    with pytest.raises(
        UntraceableModelError, match=r"(?s)'block' \(DataDependent\).*leaf_modules=\[DataDependent\]"
    ):
        prune_env.build_graph(model, X)
    with pytest.warns(UserWarning, match="DataDependent module 'block'"):
        graph = prune_env.build_graph(model, X, leaf_modules=[DataDependent])
    assert [g.name for g in graph.groups] == ["mid"]  # the leaf's channels (stem → block) stay whole
    pruned = prune_env.prune(model, X, 0.5, graph=graph)
    assert pruned.stem.out_channels == 4 and pruned.mid.out_channels == 4
    assert prune_env.count_macs(pruned, X) == graph.macs(0.5)


class RepeatedUnsupportedOpNet(nn.Module):
    """The same unmappable op at four places, beside a different one."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(4))
        self.side = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for conv in self.convs:
            y = torch.cumsum(conv(y), dim=1)
        return self.head(y + torch.cumprod(self.side(x), dim=1))


def test_a_reason_shared_by_several_nodes_is_reported_once_with_its_count() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = prune_env.build_graph(RepeatedUnsupportedOpNet().eval(), X)
    (message,) = [str(w.message) for w in caught if "prune_env" in str(w.message)]
    reasons = message.split(" — ", 1)[1].split("; ")
    assert len(reasons) == 2, reasons
    cumsum_reason = graph.frozen["cumsum"]
    assert reasons[0] == f"{cumsum_reason} at 4 nodes (cumsum, cumsum_1, cumsum_2, ...)"
    assert reasons[1] == f"cumprod: {graph.frozen['cumprod']}"
    assert {k for k, why in graph.frozen.items() if why == cumsum_reason} == {
        f"cumsum{s}" for s in ("", "_1", "_2", "_3")
    }


def test_unsupported_op_freezes_channels_with_one_warning() -> None:
    model = UnsupportedOpNet().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = prune_env.build_graph(model, X)
    messages = [str(w.message) for w in caught if "prune_env" in str(w.message)]
    assert len(messages) == 1 and "cumsum" in messages[0]
    assert [g.name for g in graph.groups] == ["c2"]
    pruned = prune_env.prune(model, X, 0.5, graph=graph)
    assert pruned.c1.out_channels == 8
    with torch.no_grad():
        assert pruned(X).shape == model(X).shape


def test_literal_channel_slice_is_never_pruned() -> None:
    model = LiteralSliceNet().eval()
    with pytest.warns(UserWarning, match="literal bounds"):
        graph = prune_env.build_graph(model, X)
    assert "c1" not in [g.name for g in graph.groups]
    pruned = prune_env.prune(model, X, 0.5, graph=graph)
    with torch.no_grad():
        assert pruned(X).shape == (1, 2, 8, 8)


def test_importance_choices() -> None:
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    graph = prune_env.build_graph(model, x)
    group = graph.group("layer1.0.conv1")  # conv1 → bn1 → conv2 (in)
    # bn_scale keeps the channels with the largest |γ|.
    model.layer1[0].bn1.weight.data = torch.arange(64, dtype=torch.float32)
    pruned = prune_env.prune(model, x, {group.name: 0.25}, importance="bn_scale", graph=graph)
    assert torch.equal(pruned.layer1[0].bn1.weight, torch.arange(16, 64, dtype=torch.float32))
    # A callable is used exactly: keep the even channels.
    calls = []

    def even_first(g: prune_env.ChannelGroup, m: nn.Module) -> np.ndarray:
        calls.append(g.name)
        return (np.arange(g.units) % 2 == 0).astype(float)

    pruned = prune_env.prune(model, x, {group.name: 0.5}, importance=even_first, graph=graph)
    assert calls == [group.name]
    assert torch.equal(pruned.layer1[0].bn1.weight, torch.arange(0, 64, 2, dtype=torch.float32))
    # Random importance is reproducible from a seed and differs between seeds.
    r1 = prune_env.prune(model, x, 0.5, importance="random", seed=3, graph=graph)
    r2 = prune_env.prune(model, x, 0.5, importance="random", seed=3, graph=graph)
    r3 = prune_env.prune(model, x, 0.5, importance="random", seed=4, graph=graph)
    assert torch.equal(r1.conv1.weight, r2.conv1.weight)
    assert not torch.equal(r1.conv1.weight, r3.conv1.weight)
    with pytest.raises(ValueError, match="expected 64 finite values"):
        prune_env.prune(model, x, {group.name: 0.5}, importance=lambda g, m: np.zeros(3), graph=graph)
    with pytest.raises(UnknownNameError, match="unknown importance 'snip'"):
        prune_env.prune(model, x, 0.5, importance="snip", graph=graph)


def test_count_macs_matches_a_hand_formula() -> None:
    """nanoGPT's habit: check the counter against first principles on a model small enough to do by hand."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8×8 output, 8 filters of 3×3×3
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # depthwise, 4×4 output
        nn.Flatten(),
        nn.Linear(8 * 16, 10),
    )
    x = torch.randn(2, 3, 8, 8)
    expected = 2 * (64 * 8 * 27 + 16 * 8 * 9 + 128 * 10)
    assert prune_env.count_macs(model, x) == expected
    assert prune_env.count_params(model) == (8 * 27 + 8) + (8 * 9 + 8) + (128 * 10 + 10)
    graph = prune_env.build_graph(model, x)
    assert graph.base_macs == expected and graph.base_params == prune_env.count_params(model)


def test_vectorised_costs_equal_the_exact_python_sum() -> None:
    """Costs are evaluated in int64 when that cannot overflow, else in Python ints: both must agree,
    and the float batch path must agree with them on models of this size."""
    model = torchvision.models.resnet18(num_classes=10)
    graph = prune_env.build_graph(model, torch.randn(1, 3, 32, 32))
    costs = graph.costs
    assert costs._int64_exact
    rng = np.random.default_rng(0)
    keeps = np.stack(
        [np.maximum(1, (costs.full * rng.uniform(0, 1, costs.n_groups)).astype(np.int64)) for _ in range(20)]
    )
    fast = [(costs.macs(k), costs.params(k)) for k in keeps]
    costs._int64_exact = False
    try:
        exact = [(costs.macs(k), costs.params(k)) for k in keeps]
    finally:
        costs._int64_exact = True
    assert fast == exact and all(isinstance(m, int) for m, _ in fast)
    np.testing.assert_array_equal(costs.macs_batch(keeps), [m for m, _ in exact])
    # The action wall's per-group quadratic, in both paths.
    quadratics = []
    for flag in (True, False):
        costs._int64_exact = flag
        try:
            quadratics.append(
                [costs.along_group(k, g, m) for k in keeps[:5] for g in (0, 3) for m in ("macs", "params")]
            )
        finally:
            costs._int64_exact = True
    assert quadratics[0] == quadratics[1]


def test_count_macs_leaves_the_model_as_it_was() -> None:
    model = torchvision.models.resnet18().train()
    before = model.layer1[0].bn1.running_mean.clone()
    prune_env.count_macs(model, torch.randn(2, 3, 32, 32))
    assert model.training and torch.equal(before, model.layer1[0].bn1.running_mean)


def test_graph_reports() -> None:
    graph = prune_env.build_graph(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    table = graph.table().splitlines()
    assert len(table) == len(graph.groups) + 1 and "conv1" in table[1]
    assert repr(graph).startswith("DependencyGraph(ResNet: 12 prunable groups")
    assert math.isclose(graph.macs(0.5) / graph.base_macs, 0.25, rel_tol=0.1)  # MACs are ~quadratic in width


def test_not_a_module_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        prune_env.build_graph(lambda x: x, X)  # type: ignore[arg-type]


class NeedsData(nn.Module):
    """``.item()`` needs real values: the meta-tensor pass must fall back to real execution."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        return self.c2(y) * x.abs().max().item()


def test_ops_that_need_data_fall_back_to_real_execution() -> None:
    model = NeedsData().eval()
    graph = prune_env.build_graph(model, X)
    assert [g.name for g in graph.groups] == ["c1"]
    pruned = prune_env.prune(model, X, 0.5, graph=graph)
    assert pruned.c1.out_channels == 4
    assert prune_env.count_macs(pruned, X) == graph.macs(0.5)


class _SameGroupInAndOut(nn.Module):
    """A conv whose input and output channels are one group (a residual add): MACs ∝ kept²."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.body(x)
        return self.head(x.mean((2, 3)))


def test_cost_along_one_group_is_an_exact_quadratic() -> None:
    """The action wall prices every candidate count of one group from ``along_group``'s (a, b, q); with a
    conv inside a residual stream the quadratic term is not zero and must be right too."""
    model = _SameGroupInAndOut()
    graph = prune_env.build_graph(model, torch.randn(1, 3, 6, 6))
    assert len(graph.groups) == 1
    costs = graph.costs
    for flag in (True, False):  # the int64 and the Python-int paths
        costs._int64_exact = flag
        try:
            a, b, q = costs.along_group(costs.full_keep(), 0, "macs")
            assert q == 36 * 9  # body: 6x6 outputs x 3x3 kernel x kept_in x kept_out
            for c in range(1, 9):
                assert a + b * c + q * c * c == costs.macs(np.array([c]))
                assert sum(costs.along_group(costs.full_keep(), 0, "params") * np.array([1, c, c * c])) == (
                    costs.params(np.array([c]))
                )
        finally:
            costs._int64_exact = True


def test_rebuilder_follows_the_base_model_when_it_is_converted_or_frozen() -> None:
    """Module.to/double replace parameter data, not the parameters; requires_grad may be changed later:
    a rebuild must reflect the base model as it is now, like prune_channels does."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = prune_env.build_graph(model, x)
    rebuilder = prune_env.surgery.ModelRebuilder(model, graph)
    units = [np.arange(0, g.units, 2) for g in graph.groups]
    rebuilder.rebuild(units)
    model.double()
    model.fc.weight.requires_grad_(False)
    rebuilt = rebuilder.rebuild(units)
    reference = prune_env.prune_channels(model, graph, units)
    assert rebuilt.fc.weight.dtype == torch.float64 and not rebuilt.fc.weight.requires_grad
    for (name, a), (_, b) in zip(rebuilt.state_dict().items(), reference.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x.double()), reference(x.double()), rtol=0, atol=0)


def test_rebuilder_stays_exact_when_its_caches_overflow() -> None:
    """With tiny cache limits every rebuild clears caches part-way through; results must not change."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = prune_env.build_graph(model, x)
    rebuilder = prune_env.surgery.ModelRebuilder(model, graph)
    rebuilder.CACHE_LIMIT = 2
    rng = np.random.default_rng(0)
    policies = [
        [np.sort(rng.permutation(g.units)[: rng.integers(1, g.units + 1)]) for g in graph.groups]
        for _ in range(3)
    ]
    for units in [*policies, policies[0]]:
        rebuilt = rebuilder.rebuild(units)
        reference = prune_env.prune_channels(model, graph, units)
        assert repr(rebuilt) == repr(reference)
        for (name, a), (_, b) in zip(
            rebuilt.state_dict().items(), reference.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    assert len(rebuilder._index_cache) <= 2 and len(rebuilder._dropped_cache) <= 2


class UndeclaredRadixBlock(nn.Module):
    """Split attention's core: a conv of two groups whose halves are summed position by position."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(2 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        b, rc, h, w = y.shape
        return y.reshape(b, 2, rc // 2, h, w).sum(dim=1)


class RadixBlock(UndeclaredRadixBlock):
    pass


prune_env.register_layer(RadixBlock, prune_env.LayerSpec(groups="alike"))


def radix_net(block: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), block(6), nn.Conv2d(6, 4, 1), nn.Flatten(1),
        nn.LazyLinear(3),
    )  # fmt: skip


def test_groups_declared_alike_narrow_every_group_exactly() -> None:
    """A grouped conv inside a module declared ``groups="alike"`` prunes position j of every group together
    (the radix sum binds them), keeping its group count; whole-group pruning would freeze it. Zeroed units
    are the ones removed, and the outputs do not change."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    whole = radix_net(UndeclaredRadixBlock).eval()
    whole(x)
    assert all(g.name != "3.conv" for g in prune_env.build_graph(whole, x[:1]).groups)  # frozen
    model = radix_net(RadixBlock).eval()
    model(x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = model.double()
    x = x.double()
    graph = prune_env.build_graph(model, x[:1])
    inner = graph.group("3.conv")
    assert inner.units == 6  # positions within a group, each in both groups
    assert graph.group("0").units == 3  # the stem's channel j and 3 + j feed position j of both groups
    dead = {inner.index: np.array([1, 4]), graph.group("0").index: np.array([2])}
    prune_env.surgery.zero_units(model, graph, dead)
    with torch.no_grad():
        reference = model(x)
    keep = {g: np.setdiff1d(np.arange(graph.groups[g].units), d) for g, d in dead.items()}
    pruned = prune_env.prune_channels(model, graph, keep).eval()
    conv = pruned[3].conv
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference, rtol=1e-9, atol=1e-9)
    counts = np.array([g.units for g in graph.groups])
    for g, k in keep.items():
        counts[g] = len(k)
    assert graph.costs.macs(counts) == prune_env.count_macs(pruned, x[:1])


def test_groups_must_be_whole_or_alike() -> None:
    with pytest.raises(InvalidSettingError, match="groups must be 'whole' or 'alike'"):
        prune_env.register_layer(RadixBlock, prune_env.LayerSpec(groups="some"))


def test_padding_layers_pass_channels_through() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ZeroPad2d(1), nn.ReflectionPad2d((1, 0, 2, 1)), nn.Conv2d(8, 8, 3),
        nn.ConstantPad2d(1, 0.5), nn.Conv2d(8, 4, 1),
    ).eval()  # fmt: skip
    graph = prune_env.build_graph(model, X)
    assert [g.name for g in graph.groups] == ["0", "3"]
    pruned = prune_env.prune(model, X, 0.5, graph=graph)
    assert prune_env.count_macs(pruned, X) == graph.macs(0.5)
    with torch.no_grad():
        assert pruned(X).shape == model(X).shape
