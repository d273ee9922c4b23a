"""Op names of each search space (names only; implementations live in :mod:`bats_cli.layers.ops`) and
the topology of a cell's edges, which the architecture weights, the supernet and derivation share.

``candidates`` are the ops the supernet searches over, in a fixed order that the architecture
weights of a search checkpoint follow; ``ops`` are all names a genotype of that space may use
(DARTS-space genotypes from NASNet/AmoebaNet also use ``sep_conv_7x7`` and ``conv_7x1_1x7``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchSpace:
    name: str
    candidates: tuple[str, ...]
    extra_ops: tuple[str, ...] = ()
    # Ops without parameters: the "real-valued path" of a cell (Table 3 / Fig. 2 diagnostics).
    parameter_free: tuple[str, ...] = ("none", "skip_connect", "max_pool_3x3", "avg_pool_3x3")

    @property
    def ops(self) -> tuple[str, ...]:
        return self.candidates + self.extra_ops


SPACES: dict[str, SearchSpace] = {
    # §4.1, Table 1: binary-first space, every conv a single grouped conv with an identity added.
    "bats": SearchSpace(
        name="bats",
        candidates=(
            "none",
            "max_pool_3x3",
            "avg_pool_3x3",
            "skip_connect",
            "group_conv_3x3",
            "group_conv_5x5",
            "dil_group_conv_3x3",
            "dil_group_conv_5x5",
        ),
    ),
    # DARTS (Liu et al., 2019) space, in the DARTS code's PRIMITIVES order.
    "darts": SearchSpace(
        name="darts",
        candidates=(
            "none",
            "max_pool_3x3",
            "avg_pool_3x3",
            "skip_connect",
            "sep_conv_3x3",
            "sep_conv_5x5",
            "dil_conv_3x3",
            "dil_conv_5x5",
        ),
        extra_ops=("sep_conv_7x7", "conv_7x1_1x7"),
    ),
}


def get_space(name: str) -> SearchSpace:
    from bats_cli.core.errors import UserInputError

    try:
        return SPACES[name]
    except KeyError:
        raise UserInputError(
            f"unknown search space {name!r}; choose one of: {', '.join(SPACES)}"
        ) from None


def edge_count(steps: int) -> int:
    """Edges of a cell with ``steps`` intermediate nodes (node i has i + 2 inputs)."""
    return sum(2 + i for i in range(steps))


def edge_endpoints(steps: int) -> list[tuple[int, int]]:
    """(source state, target node) of every edge, in the order the architecture weights use."""
    return [(src, node + 2) for node in range(steps) for src in range(node + 2)]
