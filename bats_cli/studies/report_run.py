"""What `bats report` reads of a run directory, once: ``metrics.csv``, ``config.json``, ``result.json``,
``alphas/*.json`` and the genotype (``genotype.json``, the recorded config or the checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bats_cli.core.errors import UserInputError


@dataclass
class Run:
    """What a run directory holds, read once."""

    path: Path
    name: str
    kind: str  # "search", "train" or "binarize"
    config: dict[str, Any]
    record: dict[str, Any]  # the whole config.json
    rows: list[dict[str, Any]]
    result: dict[str, Any] | None
    alphas: list[dict[str, Any]] = field(default_factory=list)
    genotype: Any = None
    same_cell_as: str | None = None  # an earlier run of the report with this genotype (drawn there)


def read_run(path: Path) -> Run:
    """A run directory as a :class:`Run`; one error line when it is not one."""
    from bats_cli.core.genotype import Genotype

    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path}: not a run directory (expected --out of search, train or binarize)")
    metrics = path / "metrics.csv"
    config_path = path / "config.json"
    if not metrics.is_file() or not config_path.is_file():
        raise UserInputError(f"{path}: no metrics.csv and config.json; is it a run directory that "
                             "finished at least one epoch?")
    from bats_cli.storage.rundir import read_run_files

    # Every file is checked where it is read (bounded, typed, finite): bats_cli/storage/rundir.py.
    files = read_run_files(path)
    record, rows, result, alphas = files.record, files.rows, files.result, files.alphas
    if not rows:
        raise UserInputError(f"{path}: metrics.csv has no epochs yet")
    if record.get("command") == "search" or alphas:
        kind = "search"
    elif "source" in record:
        kind = "binarize"
    else:
        kind = "train"
    genotype = None
    if (path / "genotype.json").is_file():
        from bats_cli.core.genotype import load_genotype

        genotype = load_genotype(path / "genotype.json")
    elif isinstance(record.get("genotype"), dict):
        genotype = Genotype.from_dict(record["genotype"], origin=f"{config_path} genotype")
    config = record.get("config")
    if genotype is None:
        genotype = _checkpoint_genotype(path)
    return Run(path=path, name=path.resolve().name, kind=kind,
               config=config if isinstance(config, dict) else {},
               record=record, rows=rows, result=result, alphas=alphas, genotype=genotype)


def _checkpoint_genotype(path: Path) -> Any:
    """The genotype recorded in the run's checkpoint (a binarize run's config.json has none)."""
    from bats_cli.core.genotype import Genotype
    from bats_cli.storage.checkpoint import read_metadata

    last = path / "last.safetensors"
    if not last.is_file():
        return None
    meta = read_metadata(last)
    if not meta.genotype_json:
        return None
    return Genotype.from_json(meta.genotype_json, origin=f"{last} (bats_genotype)")
