"""The textbook DARTS mixed op (§4.2): every candidate op its own module, weighted and summed.

It is the definition the fast path (:mod:`bats_cli.models.mixed_op.fast`) is tested against, and the
owner of the candidate modules (and so of the ``state_dict`` keys) of both.
"""

from __future__ import annotations

import torch
from torch import nn

from bats_cli.layers.ops import OpContext, build_op


class ReferenceMixedOp(nn.Module):
    """The textbook DARTS mixed op: every candidate its own module, summed in a Python loop."""

    def __init__(self, C: int, stride: int, op_names: list[str], ctx: OpContext) -> None:
        super().__init__()
        self.op_names = list(op_names)
        ops = []
        for name in op_names:
            op = build_op(name, C, stride, ctx)
            if "pool" in name:
                # DARTS: a parameter-free BatchNorm after pooling keeps scales comparable.
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))


__all__ = ["ReferenceMixedOp"]
