"""Seed derivation and a cheap scoped seeding of torch's CPU generator."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (negative ones allowed)."""
    entropy = [int(p) % 2**64 for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextmanager
def seeded_cpu_rng(seed: int):
    """Seed torch's CPU generator for a block, then restore its state.

    Uses the generator directly: torch.manual_seed also visits every accelerator backend and
    costs ~100 us, as much as augmenting a small image.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)
