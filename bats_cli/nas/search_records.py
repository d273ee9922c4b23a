"""What a search records per epoch and per stage, and checks across ranks.

Per epoch: the metrics row, ``alphas/stageK_epochNN.json`` (softmax weights, α, entropies, the
untempered measures of :mod:`bats_cli.nas.search_health`), the epoch's genotype; per stage: its
genotype, a copy of its last checkpoint and its health warnings; at the end: :class:`SearchResult`.
:class:`SearchRecords` is the part of :class:`~bats_cli.nas.searcher.Searcher` that writes them.
Under ``torchrun`` every epoch end checks that the ranks derived one cell (:func:`check_ranks_agree`).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bats_cli.core.errors import RunFailure, UserInputError
from bats_cli.core.genotype import Genotype
from bats_cli.core.spaces import edge_endpoints
from bats_cli.nas.derive import (
    derive_genotype,
    edge_entropy,
    edge_report,
    genotype_summary,
    parameter_free_share,
    skip_count,
)
from bats_cli.utils.distributed import Dist, broadcast_tensors, rank_digests, rank_divergence

# ---- results -----------------------------------------------------------------------------------


@dataclass
class StageResult:
    stage: int
    layers: int
    ops: int
    epochs: int
    seconds: float
    genotype_path: str | None = None
    candidates_after: int | None = None
    # search_health.summarise_stage without the per-epoch list and the cell (untempered measures).
    health: dict[str, Any] | None = None


@dataclass
class SearchResult:
    out_dir: Path
    genotype: Genotype
    genotype_path: Path
    checkpoint: Path
    stages: list[StageResult]
    total_seconds: float
    parameter_free_share: dict[str, float] = field(default_factory=dict)
    skips: dict[str, int] = field(default_factory=dict)
    # Stages whose α did not learn (search_health); empty when every stage did.
    warnings: list[dict[str, Any]] = field(default_factory=list)
    # Processes (torchrun), each one's share of --batch-size, and each one's SHA-256 prefix of
    # the final cell it derived (checked equal before the result is written).
    world_size: int = 1
    per_rank_batch: int | None = None
    rank_genotypes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "genotype_path": str(self.genotype_path),
            "genotype": self.genotype.to_dict(),
            "checkpoint": str(self.checkpoint),
            "stage_seconds": [round(s.seconds, 3) for s in self.stages],
            "stages": [
                {
                    "stage": s.stage,
                    "layers": s.layers,
                    "ops": s.ops,
                    "epochs": s.epochs,
                    "seconds": round(s.seconds, 3),
                    "genotype_path": s.genotype_path,
                    **({"health": s.health} if s.health is not None else {}),
                }
                for s in self.stages
            ],
            "total_seconds": round(self.total_seconds, 3),
            "parameter_free_share": self.parameter_free_share,
            "skip_connections": self.skips,
            "warnings": self.warnings,
            "world_size": self.world_size,
            "per_rank_batch": self.per_rank_batch,
            "rank_genotype_sha256": self.rank_genotypes,
        }




@dataclass
class Sums:
    """Running sums of one half of the search steps: loss × images, correct predictions, images."""

    loss: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, loss: float, correct: float, count: float) -> None:
        self.loss += loss
        self.correct += int(correct)
        self.count += int(count)

    def mean_loss(self) -> float | None:
        return self.loss / self.count if self.count else None

    def accuracy(self) -> float | None:
        # Percentages, as every other accuracy this project writes.
        return 100.0 * self.correct / self.count if self.count else None

    def are_counts(self) -> bool:
        """Whether the sums read from a checkpoint can be this epoch's (not tampered with)."""
        return (all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 10**12
                    for c in (self.correct, self.count))
                and isinstance(self.loss, (int, float)) and math.isfinite(self.loss) and self.loss >= 0
                and self.correct <= self.count)


@dataclass
class EpochSums:
    """Running sums of the current epoch, of the weight steps (``w``) and the architecture steps
    (``a``); kept in checkpoints (flat: ``w_loss``, ..., ``a_count``) so a resumed epoch reports all of it."""

    w: Sums = field(default_factory=Sums)
    a: Sums = field(default_factory=Sums)

    def state(self) -> dict[str, Any]:
        """The checkpoint's form: ``w_loss``, ``w_correct``, ``w_count``, then the same for ``a``."""
        return {f"{half}_{k}": v for half, sums in (("w", self.w), ("a", self.a)) for k, v in asdict(sums).items()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochSums:
        """The sums of :meth:`state`; a sum it lacks is 0, other keys are ignored."""
        halves: dict[str, dict[str, Any]] = {"w": {}, "a": {}}
        for key, value in state.items():
            half, _, name = key.partition("_")
            if half in halves and name in Sums.__dataclass_fields__:
                halves[half][name] = value
        return cls(**{half: Sums(**sums) for half, sums in halves.items()})

    def metrics(self) -> dict[str, float | None]:
        return {"train_loss": self.w.mean_loss(), "train_acc": self.w.accuracy(),
                "arch_loss": self.a.mean_loss(), "arch_acc": self.a.accuracy()}

    def progress(self) -> dict[str, float]:
        return {_short(k): v for k, v in self.metrics().items() if v is not None}




# Largest |α - rank 0's α| tolerated before a data-parallel search stops: the ranks apply the same
# averaged gradients, so any difference at all means a bug, a non-deterministic all-reduce or a
# faulty device; only float noise is let through (and then erased by taking rank 0's values).
RANK_ALPHA_TOL = 1e-6
RANK_WEIGHT_TOL = 1e-4


def check_search_batch(batch_size: int, dist_info: Dist) -> None:
    """``--batch-size`` is the global batch of each half: it must split evenly over the ranks."""
    if batch_size % dist_info.world:
        raise UserInputError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the number of "
            f"processes ({dist_info.world}); each takes batch-size / {dist_info.world} images"
        )


def check_ranks_agree(model, genotype: Genotype, dist_info: Dist, device: torch.device, *,
                      where: str) -> list[str]:
    """Every rank's SHA-256 prefix of its derived ``genotype``, after checking that they are one
    and that α and the weights match rank 0's (:data:`RANK_ALPHA_TOL`, :data:`RANK_WEIGHT_TOL`);
    then rank 0's α and weights everywhere, bit for bit. One process: just its digest.

    ``model`` has ``alpha_normal``, ``alpha_reduce`` and ``weight_parameters()`` (a SuperNet).
    """
    cell = json.dumps({k: v for k, v in genotype.to_dict().items() if k in ("normal", "reduce",
                                                                             "normal_concat", "reduce_concat")},
                      sort_keys=True)
    digests = rank_digests(cell, dist_info, device)
    if not dist_info.enabled:
        return digests
    fix = "the ranks apply the same averaged gradients, so this is a bug or a faulty device"
    others = [r for r, d in enumerate(digests) if d != digests[0]]
    if others:
        raise RunFailure(
            f"data-parallel search: rank {others[0]} derived another cell than rank 0 at {where} "
            f"({len(others)} of {dist_info.world - 1} other ranks differ); {fix}"
        )
    alphas = [model.alpha_normal, model.alpha_reduce]
    weights = list(model.weight_parameters())
    d_alpha = rank_divergence(torch.cat([a.detach().reshape(-1) for a in alphas]), dist_info, device)
    flat_w = torch.cat([w.detach().reshape(-1) for w in weights]) if weights else torch.zeros(0)
    d_weight = rank_divergence(flat_w, dist_info, device)
    if d_alpha > RANK_ALPHA_TOL or d_weight > RANK_WEIGHT_TOL:
        raise RunFailure(
            f"data-parallel search: the ranks hold different models at {where} (α differs from "
            f"rank 0's by up to {d_alpha:.3g}, the weights by up to {d_weight:.3g}); {fix}"
        )
    broadcast_tensors([*alphas, *weights], dist_info)
    return digests


def _short(key: str) -> str:
    return {"train_loss": "w_loss", "train_acc": "w_acc", "arch_loss": "a_loss", "arch_acc": "a_acc"}.get(key, key)



class SearchRecords:
    """The per-epoch and per-stage outputs of :class:`~bats_cli.nas.searcher.Searcher` (a mixin: it
    reads the searcher's model, candidates, position and run directory)."""

    def end_epoch(self, bar) -> dict[str, Any]:
        cfg = self.cfg
        bar.set(lr=self._lr)
        phase = "search" if self._search_phase else "warm-up"
        genotype = self.current_genotype(name=f"{self.run_name}_{self._tag()}")
        self.check_ranks(genotype)
        if self.writes:
            genotype.save(self.run.path / "genotypes" / f"{self._tag()}.json")
        doc = self.write_alphas(genotype, phase)
        wn, wr = self.current_weights()
        ent_n, ent_r = edge_entropy(wn), edge_entropy(wr)
        hmax = math.log(len(self.candidates_normal[0]))
        row: dict[str, Any] = {
            "epoch": self.global_epoch(),
            "stage": self.stage + 1,
            "stage_epoch": self.epoch,
            "layers": cfg.layers[self.stage],
            "ops": len(self.candidates_normal[0]),
            "phase": phase,
            "lr": self._lr,
            **self.accum.metrics(),
            "seconds": None,  # the run's wall time, filled in by the loop
            "entropy_normal": float(ent_n.mean()),
            "entropy_reduce": float(ent_r.mean()),
            "entropy_normal_rel": float(ent_n.mean()) / hmax if hmax else 0.0,
            "entropy_reduce_rel": float(ent_r.mean()) / hmax if hmax else 0.0,
            "param_free_normal": doc["parameter_free_share"]["normal"],
            "param_free_reduce": doc["parameter_free_share"]["reduce"],
            "skip_normal": doc["skip_connections"]["normal"],
            "skip_reduce": doc["skip_connections"]["reduce"],
            "genotype": genotype_summary(genotype),
        }
        for e, (src, dst) in enumerate(edge_endpoints(cfg.nodes)):
            row[f"entropy_normal_{src}_{dst}"] = round(float(ent_n[e]), 6)
        for e, (src, dst) in enumerate(edge_endpoints(cfg.nodes)):
            row[f"entropy_reduce_{src}_{dst}"] = round(float(ent_r[e]), 6)
        # Not tempered by construction (search_health): softmax(α) at T = 1, α spread, cell changes.
        row.update({k: round(v, 6) for k, v in doc["untempered"].items()})
        row["changed_edges_last"] = self._changed_edges_last(genotype)
        self.accum = EpochSums()
        return row

    def _changed_edges_last(self, genotype: Genotype) -> int | None:
        """Derived edges changed since the stage's epoch e - STABLE_EPOCHS (epoch 0: initial α)."""
        from bats_cli.nas.search_health import STABLE_EPOCHS, changed_edges, read_alphas

        if not self.writes:  # the alphas files are rank 0's; so is the metrics row
            return None
        before = read_alphas(self.run.path, self.stage + 1, max(self.epoch - STABLE_EPOCHS, 0))
        if before is None or not before.get("genotype"):
            return None
        return changed_edges(before["genotype"], genotype.to_dict())

    def after_epoch(self, row) -> tuple[str, ...]:
        self.reporter.line(
            f"  H(normal)={row['entropy_normal']:.3f} H(reduce)={row['entropy_reduce']:.3f} "
            f"α spread={row['alpha_spread_normal']:.3f}/{row['alpha_spread_reduce']:.3f} "
            f"param-free={row['param_free_normal']:.2f}/{row['param_free_reduce']:.2f}  "
            f"{row['genotype']}"
        )
        return ()

    def current_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return (self.model.edge_weights(False).detach().double().cpu(),
                    self.model.edge_weights(True).detach().double().cpu())

    def current_genotype(self, *, name: str | None = None, final: bool = False) -> Genotype:
        wn, wr = self.current_weights()
        cfg = self.cfg
        data_txt = cfg.dataset + (f" ({cfg.data_dir})" if cfg.data_dir else "")
        source = (
            f"bats search on {data_txt}, seed {cfg.seed}, run {self.run_name}: stage {self.stage + 1}/"
            f"{cfg.stages}, epoch {self.epoch}/{cfg.epochs}"
        )
        notes = (
            f"BATS progressive search (§6.1): space {cfg.space}, search with {cfg.strategy()}, "
            f"T_normal={cfg.temp_normal:g}, T_reduce={cfg.temp_reduce:g}, layers "
            f"{','.join(map(str, cfg.layers))}, ops {','.join(map(str, cfg.ops))}, {cfg.epochs} epochs "
            f"({cfg.warmup} warm-up) per stage, batch {cfg.batch_size}, {cfg.channels} channels; "
            "DARTS rule on the last stage's softmax(alpha/T)"
            + (f"; skips in the normal cell capped at {cfg.max_skip}" if cfg.max_skip is not None else "")
        )
        return derive_genotype(
            wn, wr, self.candidates_normal, self.candidates_reduce, steps=cfg.nodes, space=cfg.space,
            max_skip=cfg.max_skip if final else None, name=name or self.run_name,
            source=source, notes=notes,
        )

    def _tag(self, epoch: int | None = None) -> str:
        width = max(2, len(str(self.cfg.epochs)))
        e = self.epoch if epoch is None else epoch
        return f"stage{self.stage + 1}_epoch{e:0{width}d}"

    def write_alphas(self, genotype: Genotype, phase: str) -> dict[str, Any]:
        """alphas/stageK_epochNN.json: softmax weights, α, entropy per edge; parameter-free share;
        the untempered measures of search_health (T = 1 entropy, α spread)."""
        from bats_cli.nas.search_health import alpha_measures

        wn, wr = self.current_weights()
        steps = self.cfg.nodes
        ent_n, ent_r = edge_entropy(wn), edge_entropy(wr)
        share = parameter_free_share(genotype)
        doc = {
            "stage": self.stage + 1,
            "epoch": self.epoch,
            "phase": phase,
            "layers": self.cfg.layers[self.stage],
            "ops_per_edge": len(self.candidates_normal[0]),
            "temperature_normal": round(float(self.model.temperature_normal), 6),
            "temperature_reduce": round(float(self.model.temperature_reduce), 6),
            "entropy_mean": {"normal": float(ent_n.mean()), "reduce": float(ent_r.mean())},
            "entropy_max": math.log(len(self.candidates_normal[0])),
            "untempered": alpha_measures(self.model.alpha_normal.detach().double().cpu(),
                                         self.model.alpha_reduce.detach().double().cpu()),
            "parameter_free_share": share,
            "skip_connections": skip_count(genotype),
            "genotype": genotype.to_dict(),
            "normal": edge_report(wn, self.candidates_normal, steps, self.model.alpha_normal.detach().cpu()),
            "reduce": edge_report(wr, self.candidates_reduce, steps, self.model.alpha_reduce.detach().cpu()),
        }
        if self.writes:
            self.run.write_json(f"alphas/{self._tag()}.json", doc)
        return doc


    def past_stages(self) -> list[StageResult]:
        """Results of the stages a resumed run finished before."""
        cfg = self.cfg
        return [
            StageResult(stage=past + 1, layers=cfg.layers[past], ops=cfg.ops[past], epochs=cfg.epochs,
                        seconds=self.stage_seconds[past],
                        genotype_path=str(self.out_dir / "genotypes" / f"stage{past + 1}.json"),
                        health=self._stage_health(past + 1))
            for past in range(self.stage)
        ]

    def _stage_health(self, stage: int) -> dict[str, Any] | None:
        """The stage's untempered measures from its alphas files (search_health.summarise_stage)."""
        from bats_cli.nas.search_health import summarise_stage

        if not self.writes:
            return None
        summary = summarise_stage(self.run.path, stage)
        if summary is None:
            return None
        return {k: v for k, v in summary.items() if k not in ("per_epoch", "genotype")}


    def end_stage(self) -> StageResult:
        """Stage outputs; then the weakest ops of every edge are dropped for the next stage."""
        cfg = self.cfg
        if not self.finished:
            self.stage_seconds[self.stage] = self.clock() - self.stage_started
        genotype = self.current_genotype(name=f"{self.run_name}_stage{self.stage + 1}")
        gpath = self.out_dir / "genotypes" / f"stage{self.stage + 1}.json"
        health = None
        if self.writes:
            genotype.save(gpath)
            stage_ckpt = self.run.path / f"stage{self.stage + 1}.safetensors"
            shutil.copyfile(self.run.last, stage_ckpt.with_suffix(".safetensors.tmp"))
            Path(stage_ckpt.with_suffix(".safetensors.tmp")).replace(stage_ckpt)
            health = self._check_stage()
        result = StageResult(
            stage=self.stage + 1, layers=cfg.layers[self.stage], ops=cfg.ops[self.stage],
            epochs=cfg.epochs, seconds=self.stage_seconds[self.stage],
            genotype_path=str(gpath), health=health,
        )
        from bats_cli.nas.search_health import stage_line

        self.reporter.line(
            f"stage {self.stage + 1}/{cfg.stages} done in {self.stage_seconds[self.stage]:.1f} s: "
            f"{genotype_summary(genotype)}"
        )
        if health:
            self.reporter.line(f"  stage {self.stage + 1} α: {stage_line(health)}")
        return result

    def _check_stage(self) -> dict[str, Any] | None:
        """Warn (and record) when this stage's α barely moved or its cell kept changing; returns
        the stage's health (untempered measures) for result.json."""
        from bats_cli.nas.search_health import alpha_measures, read_epoch_genotypes, stage_warnings

        cfg = self.cfg
        measures = alpha_measures(self.model.alpha_normal.detach().double().cpu(),
                                  self.model.alpha_reduce.detach().double().cpu())
        width = max(2, len(str(cfg.epochs)))
        found = stage_warnings(
            stage=self.stage + 1,
            **measures,
            search_genotypes=read_epoch_genotypes(self.run.path, self.stage + 1,
                                                  range(cfg.warmup + 1, cfg.epochs + 1), width),
        )
        self.warnings = [w for w in self.warnings if w["stage"] != self.stage + 1] + found
        for w in found:
            self.reporter.warn(w["message"])
        return self._stage_health(self.stage + 1)
