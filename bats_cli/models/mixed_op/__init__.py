"""Mixed ops of the search supernet: one edge = softmax(α / T)-weighted sum of candidate ops.

``reference``: the textbook op (a Python loop over candidate modules); ``fast``: the same modules
and results, with what the candidates share computed once. The supernet picks one by name.
"""

from __future__ import annotations

from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.layers.ops import OpContext
from bats_cli.models.mixed_op.fast import FastMixedOp, fast_cell_forward
from bats_cli.models.mixed_op.reference import ReferenceMixedOp

MIXED_OPS = ("fast", "reference")


def make_mixed_op(kind: str, C: int, stride: int, op_names: list[str], ctx: OpContext) -> nn.Module:
    """The mixed op named ``kind`` over the candidates ``op_names``."""
    if kind == "reference":
        return ReferenceMixedOp(C, stride, op_names, ctx)
    if kind == "fast":
        return FastMixedOp(C, stride, op_names, ctx)
    raise UserInputError(f"mixed op must be one of {', '.join(MIXED_OPS)}, got {kind!r}")


__all__ = ["MIXED_OPS", "FastMixedOp", "ReferenceMixedOp", "fast_cell_forward", "make_mixed_op"]
