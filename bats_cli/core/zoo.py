"""The bundled genotypes (``genotypes/*.json``, installed as ``bats_cli/genotypes``) by name, and
what ``bats train`` / ``bats flops`` accept: a genotype file, a bundled name or a fixed model."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from bats_cli.core.archs import MODELS, model_key, not_cells
from bats_cli.core.errors import UserInputError
from bats_cli.core.genotype import Genotype, load_genotype
from bats_cli.core.names import exists

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _zoo_dir() -> Any:
    # bats_cli/genotypes is a link to the top-level genotypes/ (the one copy, where users look);
    # a wheel holds the files themselves as package data.
    return resources.files("bats_cli").joinpath("genotypes")


def zoo_names() -> list[str]:
    """Names of the genotypes shipped with the package (``genotypes/*.json``)."""
    try:
        entries = list(_zoo_dir().iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.name[: -len(".json")] for e in entries if e.name.endswith(".json"))


def load_zoo_genotype(name: str) -> Genotype:
    key = name.strip().lower().replace("-", "_")
    if key.endswith(".json"):
        key = key[: -len(".json")]
    names = zoo_names()
    if not _NAME_RE.match(key) or key not in names:
        raise UserInputError(
            f"{name!r} is not a bundled genotype; available: {', '.join(names) or 'none'}"
        )
    text = _zoo_dir().joinpath(f"{key}.json").read_text(encoding="utf-8")
    return Genotype.from_json(text, origin=f"bundled genotype {key}")


def resolve_genotype(arg: str | os.PathLike[str]) -> Genotype:
    """A genotype from a ``.json`` path or a bundled name (``bats_c10``, ``darts_v2``, ...)."""
    found = resolve_network(arg)
    if isinstance(found, str):
        raise not_cells(found, f"{os.fspath(arg)!r} names the {MODELS[found]}")
    return found


def resolve_network(arg: str | os.PathLike[str]) -> Genotype | str:
    """What ``bats train`` / ``bats flops`` accept: a genotype (path or bundled name), or the name
    of a fixed model (``resnet18``; see :mod:`bats_cli.core.archs`), returned as that name."""
    model = model_key(arg)
    if model is not None:
        return model
    text = os.fspath(arg)
    p = Path(text)
    looks_like_path = p.suffix.lower() == ".json" or os.sep in text or "/" in text
    if looks_like_path and not exists(p) and p.suffix == ".json" and p.stem in zoo_names():
        raise UserInputError(
            f"{text}: no such file (the bundled genotype of that name is available as `{p.stem}`)"
        )
    if looks_like_path or exists(p):
        return load_genotype(p)
    key = text.strip().lower().replace("-", "_")
    if key in zoo_names():
        return load_zoo_genotype(key)
    raise UserInputError(
        f"{text!r} is neither a genotype file nor a bundled genotype (nor a model); bundled: "
        f"{', '.join(zoo_names()) or 'none'} (see `bats genotype list`); models: {', '.join(MODELS)}"
    )
