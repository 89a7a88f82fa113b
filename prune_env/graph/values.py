"""The public values a dependency graph is made of: layer dimensions (slots), members and channel groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

MemberKind = Literal["out", "in", "channel", "param"]
SlotKind = Literal["out", "in", "channel", "param", "op"]


@dataclass(frozen=True)
class Slot:
    """One dimension of one layer (or raw parameter) whose indices the graph maps to channels.

    ``kind`` says which dimension: a layer's output (``"out"``) or input (``"in"``) channels, the channels
    of a per-channel layer such as a norm (``"channel"``), or dim ``dim`` of the tensor named ``layer``
    itself (``"param"``, a parameter fetched by traced code). ``size`` counts its indices in the unpruned
    model; a raw parameter that is never sliced has ``dim == -1`` and ``size == 1``.

    Kind ``"op"`` is a traced operation whose MACs depend on channels it holds no weights for (the
    matmuls of attention count the kept heads): ``layer`` names the traced node and the slot counts the
    channel positions the op multiplies over. It is never a group member — there is nothing to slice —
    and exists so that the cost model counts the op's MACs exactly.
    """

    layer: str
    layer_type: str
    kind: SlotKind
    dim: int
    size: int


@dataclass(frozen=True)
class MemberPositions:
    """Where one member of a group lies along its slot: index ``positions[i]`` belongs to unit
    ``units[i]``, so dropping a unit drops ``positions[units == u]`` of slot ``slot``."""

    slot: int
    positions: np.ndarray
    units: np.ndarray


@dataclass(frozen=True)
class Member:
    """One dimension of one layer (or raw parameter) that a group's channels run along.

    ``positions`` lists, unit by unit, the indices along ``dim`` that the group owns: unit ``u`` owns
    ``positions[u * multiplicity:(u + 1) * multiplicity]`` (a flatten→linear member owns a block of
    ``H*W`` features per channel, for instance).
    """

    layer: str
    layer_type: str
    kind: MemberKind
    dim: int
    positions: tuple[int, ...]
    multiplicity: int
    size: int

    @property
    def offset(self) -> int | None:
        """First index when the member's positions are one contiguous run, else None."""
        lo = min(self.positions)
        contiguous = sorted(self.positions) == list(range(lo, lo + len(self.positions)))
        return lo if contiguous else None

    def unit_positions(self, unit: int) -> tuple[int, ...]:
        m = self.multiplicity
        return self.positions[unit * m : (unit + 1) * m]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels of the network that must be pruned together: the unit of importance and removal.

    ``units`` counts the independently removable units (for almost every group one unit is one
    channel; channel shuffles and chunking bind several channels into one unit).
    """

    name: str
    units: int
    members: tuple[Member, ...]
    index: int = 0

    @property
    def producers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.kind == "out")

    @property
    def consumers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.kind == "in")

    def details(self) -> str:
        lines = [f"group {self.index} {self.name!r}: {self.units} prunable units"]
        for m in self.members:
            where = f"offset {m.offset}" if m.offset is not None else "scattered"
            per = f", {m.multiplicity} per unit" if m.multiplicity != 1 else ""
            lines.append(
                f"  {m.kind:<7} {m.layer} ({m.layer_type}) dim {m.dim}: "
                f"{len(m.positions)} of {m.size} ({where}{per})"
            )
        return "\n".join(lines)
