"""Which kind of network a run trains: a cell network built from a genotype, or a fixed model.

Network settings record it as ``arch``: ``"cells"`` (the default; files written before the key
existed hold cell networks) or a reserved model name. The only fixed model is ``resnet18``,
Table 5's hand-designed baseline binarized as §3 binarizes the cells. Model names are reserved
where a genotype is accepted (``bats train resnet18``, ``bats flops resnet18``); a file of that
name wins, as a path always does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bats_cli.core.errors import UserInputError

CELLS = "cells"
RESNET18 = "resnet18"
# Reserved model names -> what they are (shown in errors and `--help`).
MODELS: dict[str, str] = {RESNET18: "binary ResNet-18 (XNOR-Net++, real stem and classifier; Table 5)"}
ARCHS = (CELLS, *MODELS)


def model_key(arg: str | os.PathLike[str]) -> str | None:
    """The reserved model ``arg`` names, or None (a path, or not a model name)."""
    text = os.fspath(arg)
    key = text.strip().lower().replace("-", "_").replace("_", "")
    if key not in MODELS or Path(text).exists():
        return None
    return key


def arch_of(settings: Mapping[str, Any]) -> str:
    """The ``arch`` of recorded network settings; ``cells`` when absent (older files)."""
    arch = settings.get("arch", CELLS)
    if arch not in ARCHS:
        raise UserInputError(f"unknown network arch {arch!r}; known: {', '.join(ARCHS)}")
    return arch


def not_cells(arch: str, what: str) -> UserInputError:
    """The one-line refusal of a genotype-only output for a fixed model."""
    return UserInputError(f"{what}: {arch} is not a cell network (it has no genotype)")


__all__ = ["ARCHS", "CELLS", "MODELS", "RESNET18", "arch_of", "model_key", "not_cells"]
