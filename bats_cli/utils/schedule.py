"""The one learning-rate schedule helper: cosine decay (§6.2 "cosine learning-rate decay").

``bats train`` / ``binarize`` call it per optimizer step, ``bats search`` per epoch (DARTS
updates its cosine once an epoch); both are the same curve sampled at different grains.
"""

from __future__ import annotations

import math


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    """Cosine decay from ``lr`` at ``step`` 0 towards ``lr_min`` at ``total`` (clamped there)."""
    if total <= 0:
        return lr
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * min(step, total) / total))


__all__ = ["cosine_lr"]
