"""The search supernet (§3, §4.2): every edge is a softmax(α / T)-weighted sum of candidate ops.

Architecture weights are registered parameters (``alpha_normal``, ``alpha_reduce``), so they live
in ``state_dict`` and in checkpoints; :meth:`SuperNet.arch_parameters` and
:meth:`SuperNet.weight_parameters` keep them apart for the two optimisers. Temperatures are
buffers, one for normal and one for reduction cells (§6.1: 0.2 and 0.15; T = 1 is plain DARTS).

Each edge may have its own candidate list (progressive op dropping, §6.1 after P-DARTS keeps the
strongest ops *of every edge*), but all edges of a stage have the same number of candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.core.spaces import edge_count, edge_endpoints, get_space
from bats_cli.layers.ops import OpContext
from bats_cli.layers.quant import BinarySpec
from bats_cli.models.mixed_op import fast_cell_forward, make_mixed_op


@dataclass(frozen=True)
class SupernetConfig:
    """The shape of one search stage's supernet."""

    space: str = "bats"
    channels: int = 16
    layers: int = 5
    num_classes: int = 10
    in_channels: int = 3
    steps: int = 4
    stem_multiplier: int = 3
    spec: BinarySpec = field(default_factory=BinarySpec)
    temperature_normal: float = 0.2
    temperature_reduce: float = 0.15
    activation: str = "prelu"
    channels_per_group: int = 3
    group_policy: str = "groups"
    reduce_shortcut: str = "avgpool"
    channel_shuffle: int = 0
    mixed_op: str = "fast"


class SearchCell(nn.Module):
    def __init__(
        self,
        *,
        steps: int,
        c_prev_prev: int,
        c_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        candidates: list[list[str]],
        ctx: OpContext,
        mixed_op: str,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        # The fast path computes what the edges leaving one node share once (mixed_op.fast).
        self.fast = mixed_op == "fast"
        self.preprocess0 = (
            ctx.factorized_reduce(c_prev_prev, C) if reduction_prev else ctx.preprocess(c_prev_prev, C)
        )
        self.preprocess1 = ctx.preprocess(c_prev, C)
        self.edges = nn.ModuleList(
            make_mixed_op(mixed_op, C, 2 if reduction and src < 2 else 1, ops, ctx)
            for (src, _), ops in zip(edge_endpoints(steps), candidates)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return fast_cell_forward(self, s0, s1, weights)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            node = sum(
                self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states)
            )
            offset += len(states)
            states.append(node)
        return torch.cat(states[2:], dim=1)


class SuperNet(nn.Module):
    """A CIFAR-style search network of ``layers`` cells (reductions at 1/3 and 2/3 depth)."""

    def __init__(
        self,
        config: SupernetConfig,
        *,
        candidates_normal: list[list[str]] | None = None,
        candidates_reduce: list[list[str]] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        space = get_space(config.space)
        n_edges = edge_count(config.steps)
        full = [list(space.candidates) for _ in range(n_edges)]
        self.candidates_normal = _check_candidates(candidates_normal or full, n_edges, space, "normal")
        self.candidates_reduce = _check_candidates(candidates_reduce or full, n_edges, space, "reduce")
        ctx = OpContext(
            spec=config.spec, affine=False, activation=config.activation,
            channels_per_group=config.channels_per_group, group_policy=config.group_policy,
            base_channels=config.channels, reduce_shortcut=config.reduce_shortcut,
            channel_shuffle=config.channel_shuffle, space=config.space,
        )
        C, layers = config.channels, config.layers
        c_curr = config.stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            self.cells.append(
                SearchCell(
                    steps=config.steps, c_prev_prev=c_prev_prev, c_prev=c_prev, C=c_curr,
                    reduction=reduction, reduction_prev=reduction_prev,
                    candidates=self.candidates_reduce if reduction else self.candidates_normal,
                    ctx=ctx, mixed_op=config.mixed_op,
                )
            )
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, config.steps * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, config.num_classes)

        k = len(self.candidates_normal[0])
        # DARTS initialisation: near-uniform, small random symmetry breaking.
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(n_edges, k))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, k))
        self.register_buffer("temperature_normal", torch.tensor(float(config.temperature_normal)))
        self.register_buffer("temperature_reduce", torch.tensor(float(config.temperature_reduce)))

    # -- parameters -------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_normal, self.alpha_reduce]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    # -- eq. (2) ----------------------------------------------------------------------------
    def edge_weights(self, reduction: bool) -> torch.Tensor:
        """softmax(α / T) per edge, shape (edges, candidates)."""
        if reduction:
            return F.softmax(self.alpha_reduce / self.temperature_reduce, dim=-1)
        return F.softmax(self.alpha_normal / self.temperature_normal, dim=-1)

    def forward(self, x: torch.Tensor,
                weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; ``weights`` = (normal, reduce) op weights per edge instead of softmax(α / T)
        (perturbation-based selection masks single ops or edges with it, ``bats_cli.nas.selection``)."""
        s0 = s1 = self.stem(x)
        if weights is None:
            w_normal, w_reduce = self.edge_weights(False), self.edge_weights(True)
        else:
            w_normal, w_reduce = weights
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def arch_state(self) -> dict:
        """Everything besides tensors needed to rebuild this supernet or derive a genotype."""
        return {
            "space": self.config.space,
            "steps": self.config.steps,
            "temperature_normal": float(self.temperature_normal),
            "temperature_reduce": float(self.temperature_reduce),
            "candidates_normal": self.candidates_normal,
            "candidates_reduce": self.candidates_reduce,
        }


def _check_candidates(candidates, n_edges: int, space, cell: str) -> list[list[str]]:
    if len(candidates) != n_edges:
        raise UserInputError(f"{cell} cell: expected candidates for {n_edges} edges, got {len(candidates)}")
    sizes = {len(ops) for ops in candidates}
    if len(sizes) != 1 or 0 in sizes:
        raise UserInputError(f"{cell} cell: every edge needs the same, non-zero number of candidate ops")
    for e, ops in enumerate(candidates):
        unknown = [op for op in ops if op not in space.candidates]
        if unknown:
            raise UserInputError(f"{cell} edge {e}: ops {unknown} are not candidates of the {space.name!r} space")
    return [list(ops) for ops in candidates]
