"""Random, valid, fx-traceable CNNs for the property tests, described as plain data.

A network is drawn as a :class:`NetSpec` (a tuple of frozen block dataclasses) and only then built into an
``nn.Module``. Drawing data rather than modules lets hypothesis shrink a failure to a small, readable
spec, and the spec's repr is a complete reproduction (``build_model(spec)`` rebuilds the same weights).

Every block's structure is fixed when the module is built (attributes / ``nn.ModuleList``), so ``forward``
has no data-dependent control flow and traces with ``torch.fx``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
from hypothesis import strategies as st
from torch import nn

MAX_WIDTH = 24

# --------------------------------------------------------------------------------------------------------
# Specs: what to build
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSpec:
    """conv → bn → relu (without bn the conv has a bias, so bias slicing is exercised too)."""

    width: int
    kernel: int
    stride: int
    bn: bool = True


@dataclass(frozen=True)
class ResidualSpec:
    """relu(f(x) + shortcut(x)), f = conv-bn-relu-conv-bn; shortcut = 1x1 conv-bn projection or identity."""

    width: int
    kernel: int
    stride: int
    project: bool  # forced when the shape changes


@dataclass(frozen=True)
class ConcatSpec:
    """torch.cat of 2–3 branches along channels; a branch is conv-bn-relu of that width, or 0 = identity."""

    branches: tuple[int, ...]
    kernel: int


@dataclass(frozen=True)
class DepthwiseSpec:
    """Depthwise conv (groups = channels), optionally a channel multiplier, then bn → relu."""

    multiplier: int
    stride: int


@dataclass(frozen=True)
class GroupedSpec:
    """Grouped conv (2 or 4 groups dividing both widths) → bn → relu."""

    width: int
    groups: int
    kernel: int


@dataclass(frozen=True)
class SESpec:
    """x * sigmoid(fc2(relu(fc1(avgpool(x))))), the fcs as 1x1 convs or as Linear layers."""

    hidden: int
    linear: bool


@dataclass(frozen=True)
class ShuffleSpec:
    """ShuffleNet V2 unit: chunk in two, cat(x1, branch(x2)), then shuffle the two halves.

    ``pre`` > 0 first maps the input to that (even) width with a 1x1 conv-bn-relu, so the unit can follow
    a block of any width; 0 chunks the input itself (which must then have an even width).
    """

    pre: int
    mid: int
    out: int  # branch output width: usually half the width (as in ShuffleNet V2), else any even total


@dataclass(frozen=True)
class ScaleSpec:
    """A learnable per-channel multiplier, ``self.scale * x`` (a raw parameter of shape (C, 1, 1))."""


@dataclass(frozen=True)
class CumsumSpec:
    """1x1 conv, then ``torch.cumsum(x, dim=1)``: an op mixing channels the engine cannot map.

    The conv gives the cumsum fresh (prunable) channels to freeze — on channels already frozen (the model
    input, say) there is nothing to warn about — so a spec with this block always expects the warning.
    """

    width: int


BlockSpec = (
    ConvSpec
    | ResidualSpec
    | ConcatSpec
    | DepthwiseSpec
    | GroupedSpec
    | SESpec
    | ShuffleSpec
    | ScaleSpec
    | CumsumSpec
)
BLOCK_KINDS: tuple[type, ...] = get_args(BlockSpec)


@dataclass(frozen=True)
class NetSpec:
    """A whole network: blocks in sequence, then a classifier head; ``seed`` fixes the weights."""

    in_channels: int
    size: int
    blocks: tuple[BlockSpec, ...]
    head_hidden: int  # 0: avgpool → flatten → linear; > 0: flatten → linear(hidden) → relu → linear
    classes: int
    seed: int

    @property
    def has_unsupported_op(self) -> bool:
        return any(isinstance(b, CumsumSpec) for b in self.blocks)


def out_width(block: BlockSpec, c: int) -> int:
    """Channels a block produces from ``c`` input channels."""
    if isinstance(block, (ConvSpec, ResidualSpec, GroupedSpec, CumsumSpec)):
        return block.width
    if isinstance(block, ConcatSpec):
        return sum(w if w else c for w in block.branches)
    if isinstance(block, DepthwiseSpec):
        return c * block.multiplier
    if isinstance(block, ShuffleSpec):
        return (block.pre or c) // 2 + block.out
    return c  # SE and scale keep the width


# --------------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------------

widths = st.integers(1, MAX_WIDTH)
kernels = st.sampled_from([1, 3])
strides = st.sampled_from([1, 2])


@st.composite
def _concat(draw: st.DrawFn) -> ConcatSpec:
    n = draw(st.integers(2, 3))
    branches = draw(st.lists(widths, min_size=n, max_size=n))
    if draw(st.booleans()):
        branches[draw(st.integers(0, n - 1))] = 0  # one identity branch (DenseNet-style reuse of x)
    return ConcatSpec(tuple(branches), draw(kernels))


@st.composite
def _grouped(draw: st.DrawFn, c: int) -> GroupedSpec:
    g = draw(st.sampled_from([g for g in (2, 4) if c % g == 0]))
    return GroupedSpec(width=g * draw(st.integers(1, MAX_WIDTH // g)), groups=g, kernel=draw(kernels))


@st.composite
def _shuffle(draw: st.DrawFn, c: int) -> ShuffleSpec:
    pre = 2 * draw(st.integers(1, MAX_WIDTH // 2)) if c % 2 or draw(st.booleans()) else 0
    half = (pre or c) // 2
    # Usually half the width, as in ShuffleNet V2; sometimes any width keeping the total even.
    out = half if draw(st.integers(0, 3)) else draw(widths.filter(lambda w: (half + w) % 2 == 0))
    return ShuffleSpec(pre=pre, mid=draw(widths), out=out)


def block_specs(c: int) -> st.SearchStrategy[BlockSpec]:
    """Blocks that are valid on a ``c``-channel input (a grouped conv needs divisible widths)."""
    choices: list[st.SearchStrategy[BlockSpec]] = [
        st.builds(ConvSpec, widths, kernels, strides, st.booleans()),
        st.builds(ResidualSpec, widths, kernels, strides, st.booleans()),
        _concat(),
        st.builds(DepthwiseSpec, st.sampled_from([1, 2]), strides),
        st.builds(SESpec, widths, st.booleans()),
        st.just(ScaleSpec()),
        _shuffle(c),
    ]
    weights = [3] * len(choices)
    if c % 2 == 0:
        # Only possible on even widths, so drawn more often when they are.
        choices.append(_grouped(c))
        weights.append(5)
    # The unsupported op freezes the channels around it, so keep it rare: most models should be fully
    # prunable, and the ones that are not must still come out valid.
    choices.append(st.builds(CumsumSpec, widths))
    weights.append(1)
    return st.sampled_from([s for s, w in zip(choices, weights, strict=True) for _ in range(w)]).flatmap(
        lambda s: s
    )


@st.composite
def net_specs(draw: st.DrawFn, max_blocks: int = 5) -> NetSpec:
    in_channels = draw(st.sampled_from([1, 3]))
    size = draw(st.sampled_from([8, 12]))
    blocks: list[BlockSpec] = []
    if draw(st.integers(0, 3)):
        # Usually a stem conv first: the input's channels are frozen (never pruned), so a block applied
        # straight to the input mostly tests freezing. Sometimes not, so that is tested too.
        blocks.append(ConvSpec(draw(widths), 3, 1))
    c = out_width(blocks[0], in_channels) if blocks else in_channels
    for _ in range(draw(st.integers(1, max_blocks))):
        block = draw(block_specs(c))
        blocks.append(block)
        c = out_width(block, c)
    head_hidden = draw(widths) if draw(st.booleans()) else 0
    return NetSpec(
        in_channels=in_channels,
        size=size,
        blocks=tuple(blocks),
        head_hidden=head_hidden,
        classes=draw(st.integers(2, 10)),
        seed=draw(st.integers(0, 2**16)),
    )


# --------------------------------------------------------------------------------------------------------
# Modules: how to build it
# --------------------------------------------------------------------------------------------------------


def conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int, spec: ResidualSpec) -> None:
        super().__init__()
        self.f = nn.Sequential(
            conv_bn(c, spec.width, spec.kernel, spec.stride), conv_bn(spec.width, spec.width, 3, relu=False)
        )
        needs_projection = spec.project or spec.stride != 1 or spec.width != c
        self.shortcut = (
            conv_bn(c, spec.width, 1, spec.stride, relu=False) if needs_projection else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.f(x) + self.shortcut(x))


class Concat(nn.Module):
    def __init__(self, c: int, spec: ConcatSpec) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            conv_bn(c, w, spec.kernel) if w else nn.Identity() for w in spec.branches
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, spec: SESpec) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = spec.linear
        if spec.linear:
            self.fc1, self.fc2 = nn.Linear(c, spec.hidden), nn.Linear(spec.hidden, c)
        else:
            self.fc1, self.fc2 = nn.Conv2d(c, spec.hidden, 1), nn.Conv2d(spec.hidden, c, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.pool(x)
        if self.linear:  # a build-time constant, so fx sees one branch
            b, c = x.size(0), x.size(1)
            s = self.fc2(self.relu(self.fc1(s.flatten(1)))).view(b, c, 1, 1)
        else:
            s = self.fc2(self.relu(self.fc1(s)))
        return x * torch.sigmoid(s)


class Shuffle(nn.Module):
    def __init__(self, c: int, spec: ShuffleSpec) -> None:
        super().__init__()
        self.pre = conv_bn(c, spec.pre, 1) if spec.pre else nn.Identity()
        half = (spec.pre or c) // 2
        self.branch = nn.Sequential(
            conv_bn(half, spec.mid, 1),
            conv_bn(spec.mid, spec.mid, 3, groups=spec.mid, relu=False),
            conv_bn(spec.mid, spec.out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.pre(x).chunk(2, dim=1)
        x = torch.cat((x1, self.branch(x2)), 1)
        b, c, h, w = x.size()
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


class Scale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class Cumsum(nn.Module):
    def __init__(self, c: int, spec: CumsumSpec) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, spec.width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.conv(x), dim=1)


def build_block(block: BlockSpec, c: int) -> nn.Module:
    if isinstance(block, ConvSpec):
        if block.bn:
            return conv_bn(c, block.width, block.kernel, block.stride)
        return nn.Sequential(
            nn.Conv2d(c, block.width, block.kernel, block.stride, block.kernel // 2), nn.ReLU()
        )
    if isinstance(block, ResidualSpec):
        return Residual(c, block)
    if isinstance(block, ConcatSpec):
        return Concat(c, block)
    if isinstance(block, DepthwiseSpec):
        return conv_bn(c, c * block.multiplier, 3, block.stride, groups=c)
    if isinstance(block, GroupedSpec):
        return conv_bn(c, block.width, block.kernel, groups=block.groups)
    if isinstance(block, SESpec):
        return SqueezeExcite(c, block)
    if isinstance(block, ShuffleSpec):
        return Shuffle(c, block)
    if isinstance(block, ScaleSpec):
        return Scale(c)
    if isinstance(block, CumsumSpec):
        return Cumsum(c, block)
    raise TypeError(f"unknown block spec {block!r}")


class RandomCNN(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        c = spec.in_channels
        blocks = []
        for block in spec.blocks:
            blocks.append(build_block(block, c))
            c = out_width(block, c)
        self.blocks = nn.ModuleList(blocks)
        if spec.head_hidden:
            # Flatten the (input-size dependent, but fixed) final map: each channel owns h*w features.
            # Measured in eval mode: train-mode BN cannot normalise a 1x1 map of a batch of one.
            self.blocks.eval()
            with torch.no_grad():
                h, w = self.features(torch.zeros(1, spec.in_channels, spec.size, spec.size)).shape[2:]
            self.blocks.train()
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(c * h * w, spec.head_hidden),
                nn.ReLU(),
                nn.Linear(spec.head_hidden, spec.classes),
            )
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, spec.classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(spec: NetSpec) -> nn.Module:
    """The network of ``spec`` in float64, with deterministic random weights and BN statistics.

    BatchNorm gets random affine parameters and running statistics so that eval-mode BN is not the
    identity (zeroed or swapped channels would otherwise go unnoticed).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = RandomCNN(spec)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


def example_input(spec: NetSpec, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.in_channels, spec.size, spec.size, generator=gen, dtype=torch.float64)
