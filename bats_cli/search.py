"""The BATS search (§4, §6.1): progressive, temperature-regularised, binary-activation DARTS.

Three stages (P-DARTS): 5, 11, 17 cells with 8, 5, 3 candidate ops per edge. Each stage builds a
fresh supernet over the surviving candidates, trains 25 epochs (the first 10 weights only) with
first-order bilevel optimisation on the 50/50 split of the training set, then drops the weakest
ops of every edge by softmax weight. The last stage's weights give the genotype (DARTS rule).

Per step of a search epoch: one architecture step (Adam on α, architecture-half batch), then one
weight step (weights, weight-half batch). Warm-up epochs do only the weight step.

The paper does not give the search width. 16 channels (DARTS) cannot hold the 3 channels per
group of §4.1, so the default is 18 = 6 groups × 3, the nearest to DARTS' 16.

Library entry point: :func:`run_search`. A run directory holds ``config.json``, ``metrics.csv``,
``last.safetensors`` (resumable, kind "search"), ``stageK.safetensors`` (end of each stage),
``alphas/stageK_epochNN.json``, ``genotypes/stageK_epochNN.json``, ``genotypes/stageK.json``,
``genotype.json`` and ``result.json``.

Data-parallel (``torchrun --nproc-per-node N -m bats_cli search ...``): ``batch_size`` is the
global batch of each half, as in ``bats train``; every rank takes ``batch_size / N`` images of
each step's architecture batch and weight batch (the single-process batches, sliced), the α
gradients and then the weight gradients are averaged over the ranks before each optimiser step,
so every rank holds the same α and weights. At every epoch end the ranks compare their derived
cells and α (a :class:`~bats_cli.errors.RunFailure` names the rank that differs), then take rank
0's parameters bit for bit. BatchNorm normalises with each rank's own images, so N processes
match one process to a tolerance, not bit for bit. Rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from bats_cli.config import (
    MAX_BATCH,
    MAX_DECAY,
    MAX_EPOCHS,
    MAX_IMAGE_SIZE,
    MAX_IMAGES,
    MAX_LR,
    Beta,
    Device,
    RunConfig,
    RunName,
    Seed,
    Threads,
    Workers,
    check_resume_config,
)
from bats_cli.derive import (
    ARCH_STATE_KEY,
    derive_genotype,
    edge_entropy,
    edge_report,
    genotype_summary,
    parameter_free_share,
    safe_name,
    skip_count,
)
from bats_cli.distributed import (
    Dist,
    agree,
    all_sum,
    average_gradients,
    barrier,
    broadcast_tensors,
    rank_digests,
    rank_divergence,
)
from bats_cli.errors import RunFailure, UserInputError
from bats_cli.genotype import Genotype
from bats_cli.preflight import MAX_CHANNELS, MAX_LAYERS, MAX_NODES
from bats_cli.quant import BinarySpec
from bats_cli.runloop import (
    Checkpoint,
    RunJob,
    RunLoop,
    check_out_dir,
    interrupt_guard,
    open_run_dir,
    preflight_everywhere,
    restores_threads,
    set_threads,
)
from bats_cli.schedule import cosine_lr
from bats_cli.spaces import edge_endpoints, get_space

SEARCH_STATE_KEY = "search_state"
OPTIM_W_KEY = "optim_w"
OPTIM_A_KEY = "optim_a"
RESULT_NAME = "result.json"
GENOTYPE_NAME = "genotype.json"


def _default_mixed_op() -> str:
    from bats_cli.supernet import SupernetConfig

    return SupernetConfig().mixed_op


# A search checkpoint records its stage in 0..64 (bats_cli.metadata.SearchState).
MAX_STAGES = 64
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4


class SearchConfig(RunConfig):
    """Every number of the search; defaults are the paper's (§6.1, §4.3, Appendix B for --real)."""

    # data
    dataset: str = "cifar10"  # the paper searches on CIFAR-10 (§6.1)
    data_dir: str | None = None
    download: bool | None = None  # None: fetch torchvision data sets when missing
    subset: int | None = Field(None, ge=4, le=MAX_IMAGES)
    image_size: int | None = Field(None, ge=8, le=MAX_IMAGE_SIZE)
    seed: Seed = 0
    # search space and strategy (§4.1, §4.3, Table 4)
    space: Literal["bats", "darts"] = "bats"
    weights: Literal["real", "binary"] = "real"
    activations: Literal["real", "binary"] = "binary"
    # progressive schedule (§6.1, after P-DARTS)
    layers: tuple[Annotated[int, Field(le=MAX_LAYERS)], ...] = Field((5, 11, 17), max_length=MAX_STAGES)
    ops: tuple[int, ...] = Field((8, 5, 3), max_length=MAX_STAGES)
    epochs: int = Field(25, ge=1, le=MAX_EPOCHS)
    warmup: int = Field(10, ge=0, le=MAX_EPOCHS)
    batch_size: int = Field(96, ge=1, le=MAX_BATCH)
    channels: int = Field(18, ge=2, le=MAX_CHANNELS)
    nodes: int = Field(4, ge=1, le=MAX_NODES)
    channels_per_group: int = Field(3, ge=1, le=MAX_CHANNELS)
    group_policy: Literal["groups", "channels"] = "groups"
    # Ablation switches (§4.1, not the paper's method): shortcut of stride-2 conv ops, shuffle.
    reduce_shortcut: Literal["avgpool", "factorized", "none"] = "avgpool"
    channel_shuffle: int = Field(0, ge=0, le=MAX_CHANNELS)
    activation: Literal["prelu", "relu", "none"] = "prelu"
    # Below 1e-4, α/T overflows float32 once α has moved; above 1e4 softmax is flat whatever α.
    temp_normal: float = Field(0.2, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    temp_reduce: float = Field(0.15, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)
    # architecture optimiser: Adam (§6.1)
    arch_lr: float = Field(6e-4, gt=0, le=MAX_LR)
    arch_weight_decay: float = Field(1e-3, ge=0, le=MAX_DECAY)
    arch_betas: tuple[Beta, Beta] = (0.5, 0.999)
    # weight optimiser: Adam (§6.1) whatever the search domain (Table 4 keeps it fixed); SGD
    # momentum 0.9, lr 0.1 only when asked for (--optimizer sgd, or the CLI's --real: Appendix B)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float | None = Field(None, gt=0, le=MAX_LR)
    weight_decay: float | None = Field(None, ge=0, le=MAX_DECAY)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, le=1)
    lr_schedule: Literal["constant", "cosine"] | None = None
    lr_min: float = Field(1e-3, ge=0, le=MAX_LR)
    grad_clip: float | None = Field(5.0, gt=0, le=1e9)
    # derivation
    max_skip: int | None = Field(None, ge=0, le=2 * MAX_NODES)
    name: RunName = None
    # implementation
    mixed_op: Literal["fast", "reference"] | None = None
    device: Device = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_workers: Workers = 0
    # CPU threads for this run (None: torch's default). Not part of what is searched.
    threads: Threads = None

    @model_validator(mode="before")
    @classmethod
    def _strategy_defaults(cls, data: Any) -> Any:
        """Fill what depends on the chosen optimiser: SGD's lr 0.1 and cosine (Appendix B).

        The search domain (--weights / --activations) never changes the optimiser by itself:
        Table 4's rows differ in the domain only.
        """
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("optimizer") is None:
            data["optimizer"] = "adam"
        sgd = data["optimizer"] == "sgd"
        if data.get("lr") is None:
            data["lr"] = 0.1 if sgd else 1e-3
        if data.get("weight_decay") is None:
            data["weight_decay"] = 3e-4
        if data.get("lr_schedule") is None:
            # The paper gives no schedule for Adam (constant); SGD follows DARTS (cosine).
            data["lr_schedule"] = "cosine" if sgd else "constant"
        if data.get("mixed_op") is None:
            data["mixed_op"] = _default_mixed_op()
        return data

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        n_space = len(get_space(self.space).candidates)
        if len(self.layers) != len(self.ops) or not self.layers:
            raise ValueError(
                f"--layers and --ops need one value per stage: got {len(self.layers)} and {len(self.ops)}"
            )
        if any(n < 3 for n in self.layers):
            raise ValueError(
                f"--layers {','.join(map(str, self.layers))}: every stage needs at least 3 cells "
                "(reductions sit at 1/3 and 2/3 of the depth; fewer leave no normal cell to search)"
            )
        if self.ops[0] != n_space:
            raise ValueError(
                f"--ops: the first stage searches all {n_space} ops of the {self.space!r} space, "
                f"got {self.ops[0]}"
            )
        if any(b > a for a, b in zip(self.ops, self.ops[1:])):
            raise ValueError(f"--ops must not grow from stage to stage, got {list(self.ops)}")
        if self.ops[-1] < 2:
            raise ValueError("--ops: the last stage needs at least 2 ops per edge")
        if self.warmup >= self.epochs:
            raise ValueError(
                f"--warmup {self.warmup} leaves no epoch that updates the architecture "
                f"(--epochs {self.epochs})"
            )
        if self.channels % 2:
            raise ValueError(f"--channels {self.channels}: must be even (factorized reduce)")
        if self.space == "bats" and self.channels % self.channels_per_group:
            raise ValueError(
                f"--channels {self.channels} cannot be split into groups of "
                f"{self.channels_per_group} channels; use a multiple of {self.channels_per_group}"
            )
        if self.optimizer == "sgd" and self.lr_schedule == "cosine" and self.lr_min > (self.lr or 0):
            raise ValueError(f"--lr-min {self.lr_min} is above --lr {self.lr}")
        if self.mixed_op not in ("fast", "reference"):
            raise ValueError(f"mixed op must be fast or reference, got {self.mixed_op!r}")
        return self

    @property
    def spec(self) -> BinarySpec:
        return BinarySpec.parse(weights=self.weights, activations=self.activations)

    @property
    def stages(self) -> int:
        return len(self.layers)

    def strategy(self) -> str:
        return f"W {self.weights} / A {self.activations}"


# ---- pure helpers ------------------------------------------------------------------------------


def drop_weakest_ops(
    weights: torch.Tensor | Sequence[Sequence[float]],
    candidates: Sequence[Sequence[str]],
    keep: int,
) -> list[list[str]]:
    """Keep the ``keep`` strongest ops of every edge (by softmax weight), in their original order.

    Ties go to the op listed first. Every edge keeps exactly ``keep`` ops.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    out = []
    for e, ops in enumerate(candidates):
        if keep > len(ops):
            raise ValueError(f"edge {e}: cannot keep {keep} of {len(ops)} ops")
        ranked = sorted(range(len(ops)), key=lambda k: (-float(w[e, k]), k))[:keep]
        out.append([ops[k] for k in sorted(ranked)])
    return out


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


# ---- the searcher ------------------------------------------------------------------------------


@dataclass
class _Accum:
    """Running sums of the current epoch (kept in checkpoints so a resumed epoch reports all of it)."""

    w_loss: float = 0.0
    w_correct: int = 0
    w_count: int = 0
    a_loss: float = 0.0
    a_correct: int = 0
    a_count: int = 0

    def metrics(self) -> dict[str, float | None]:
        return {
            "train_loss": self.w_loss / self.w_count if self.w_count else None,
            # Percentages, as every other accuracy this project writes.
            "train_acc": 100.0 * self.w_correct / self.w_count if self.w_count else None,
            "arch_loss": self.a_loss / self.a_count if self.a_count else None,
            "arch_acc": 100.0 * self.a_correct / self.a_count if self.a_count else None,
        }

    def progress(self) -> dict[str, float]:
        return {_short(k): v for k, v in self.metrics().items() if v is not None}


class Searcher(RunJob):
    """The search as a :class:`~bats_cli.runloop.RunJob`: stages are the loop's segments, the
    search step is one architecture step then one weight step. Use :func:`run_search`."""

    kind = "search"

    def __init__(self, config: SearchConfig, *, run, device: torch.device, data, in_channels: int,
                 num_classes: int, reporter=None, dist_info: Dist = Dist(),
                 out_dir: Path | None = None) -> None:
        """``run``: the :class:`~bats_cli.rundir.RunDir` on rank 0, None on the other ranks
        (they write nothing; ``out_dir`` then names the run)."""
        from bats_cli.progress import Reporter

        self.cfg = config
        self.run = run
        self.out_dir = Path(run.path if run is not None else out_dir)
        self.writes = run is not None
        self.dist = dist_info
        self.reporter = reporter or Reporter(quiet=True)
        self.device = device
        self.weight_half, self.arch_half = data
        self.space = get_space(config.space)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.run_name = safe_name(config.name or self.out_dir.name)
        # Every rank's SHA-256 prefix of the last cell it derived (result.json: proof they agree).
        self.rank_genotypes: list[str] = []
        self.stage = 0
        self.epoch = 0
        self.step = 0
        self.accum = _Accum()
        self.stage_seconds: list[float] = [0.0] * config.stages
        self.stage_started = 0.0
        self.stage_results: list[StageResult] = []
        self.finished = False
        self.warnings: list[dict[str, Any]] = []
        self.model = None
        self.opt_w = None
        self.opt_a = None
        n_edges = len(edge_endpoints(config.nodes))
        full = [list(self.space.candidates) for _ in range(n_edges)]
        self.candidates_normal = full
        self.candidates_reduce = [list(ops) for ops in full]
        bs = config.batch_size
        self.steps_per_epoch = min(len(self.weight_half) // bs, len(self.arch_half) // bs)
        if self.steps_per_epoch < 1:
            raise UserInputError(
                f"--batch-size {bs} is larger than each half of the training set "
                f"({len(self.arch_half)} images for the architecture, {len(self.weight_half)} for the "
                "weights); lower --batch-size or raise --subset"
            )
        check_search_batch(bs, dist_info)

    # -- building ---------------------------------------------------------------------------
    def build_stage(self, in_channels: int, num_classes: int) -> None:
        """A fresh supernet and optimisers for the current stage and candidate lists."""
        from bats_cli.data import derive_seed
        from bats_cli.runtime import make_grad_scaler
        from bats_cli.supernet import SuperNet, SupernetConfig

        cfg = self.cfg
        # Each stage's initialisation depends on (seed, stage) only, so resuming never shifts it.
        torch.manual_seed(derive_seed(cfg.seed, 7001, self.stage))
        sconf = SupernetConfig(
            space=cfg.space, channels=cfg.channels, layers=cfg.layers[self.stage],
            num_classes=num_classes, in_channels=in_channels, steps=cfg.nodes, spec=cfg.spec,
            temperature_normal=cfg.temp_normal, temperature_reduce=cfg.temp_reduce,
            activation=cfg.activation, channels_per_group=cfg.channels_per_group,
            group_policy=cfg.group_policy, reduce_shortcut=cfg.reduce_shortcut,
            channel_shuffle=cfg.channel_shuffle, mixed_op=cfg.mixed_op,
        )
        from bats_cli.preflight import check_supernet_fits

        check_supernet_fits(lambda: SuperNet(sconf, candidates_normal=self.candidates_normal,
                                             candidates_reduce=self.candidates_reduce), self.device,
                            channels=sconf.channels, layers=sconf.layers, nodes=sconf.steps)
        try:
            model = SuperNet(sconf, candidates_normal=self.candidates_normal,
                             candidates_reduce=self.candidates_reduce)
        except ImportError as exc:  # the fast mixed op is optional
            raise UserInputError(f"mixed op {cfg.mixed_op!r} is not available ({exc})") from None
        self.model = model.to(self.device)
        self.in_channels, self.num_classes = in_channels, num_classes
        if cfg.optimizer == "adam":
            self.opt_w = torch.optim.Adam(self.model.weight_parameters(), lr=cfg.lr, betas=cfg.betas,
                                          weight_decay=cfg.weight_decay)
        else:
            self.opt_w = torch.optim.SGD(self.model.weight_parameters(), lr=cfg.lr,
                                         momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.opt_a = torch.optim.Adam(self.model.arch_parameters(), lr=cfg.arch_lr,
                                      betas=cfg.arch_betas, weight_decay=cfg.arch_weight_decay)
        self.scaler_w = make_grad_scaler(self.device, cfg.precision)
        self.scaler_a = make_grad_scaler(self.device, cfg.precision)
        self.stage_started = self.clock()

    # -- steps ------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        from bats_cli.runtime import autocast

        with autocast(self.device, self.cfg.precision):
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
        finite = bool(torch.isfinite(loss))
        # Every rank stops together: one that raised alone would leave the others waiting.
        if not agree(finite, self.dist, self.device):
            value = f"{loss.item()}" if not finite else "non-finite on another rank"
            raise RunFailure(
                f"the loss became {value} in stage {self.stage + 1}, epoch {self.epoch + 1}, "
                f"step {self.step + 1}; lower --lr or --arch-lr"
            )
        return loss, int((logits.argmax(1) == y).sum())

    def arch_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """First-order DARTS: one Adam step on α from an architecture-half batch (weights untouched)."""
        params = self.model.arch_parameters()
        loss, correct = self._forward(x, y)
        # Gradients for α only: the weights' gradients would be thrown away anyway.
        grads = torch.autograd.grad(self.scaler_a.scale(loss), params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g  # None (skipped by Adam) for a cell type the network does not contain
        average_gradients(params, self.dist)
        self.scaler_a.step(self.opt_a)
        self.scaler_a.update()
        self.opt_a.zero_grad(set_to_none=True)
        return float(loss.detach()), correct

    def weight_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """One step on the network weights from a weight-half batch (α untouched)."""
        params = self.model.weight_parameters()
        self.opt_w.zero_grad(set_to_none=True)
        loss, correct = self._forward(x, y)
        self.scaler_w.scale(loss).backward(inputs=params)
        average_gradients(params, self.dist)  # before clipping: every rank clips the same mean
        if self.cfg.grad_clip:
            self.scaler_w.unscale_(self.opt_w)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler_w.step(self.opt_w)
        self.scaler_w.update()
        self.opt_w.zero_grad(set_to_none=True)
        return float(loss.detach()), correct

    # -- an epoch (RunJob) ------------------------------------------------------------------
    def segment_done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    def metrics_epoch(self) -> int:
        return self.global_epoch()

    def run_steps(self) -> tuple[int, int, int]:
        cfg = self.cfg
        return (cfg.stages * cfg.epochs * self.steps_per_epoch,
                self.global_epoch() * self.steps_per_epoch, cfg.batch_size)

    def _loaders(self, search: bool):
        from bats_cli.data import derive_seed
        from bats_cli.data.loader import sharded_loader

        cfg = self.cfg
        # One process: make_loader's batches. N ranks: rank r takes its slice of each of them.
        common = dict(batch_size=cfg.batch_size, epoch=self.epoch, skip=self.step, dist_info=self.dist,
                      num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda")
        w = sharded_loader(self.weight_half, seed=derive_seed(cfg.seed, 1, self.stage), **common)
        a = sharded_loader(self.arch_half, seed=derive_seed(cfg.seed, 2, self.stage), **common) if search else None
        return w, a

    def _set_lr(self) -> float:
        cfg = self.cfg
        lr = cfg.lr if cfg.lr_schedule == "constant" else cosine_lr(self.epoch, cfg.epochs, cfg.lr, cfg.lr_min)
        for group in self.opt_w.param_groups:
            group["lr"] = lr
        return lr

    def begin_epoch(self):
        cfg = self.cfg
        if self.epoch == 0 and self.step == 0 and not self.finished:
            # The stage's starting point: initial α (for before/after comparisons, Fig. 1).
            self.write_alphas(self.current_genotype(name=f"{self.run_name}_{self._tag(0)}"), "init")
        self._search_phase = self.epoch >= cfg.warmup
        self._lr = self._set_lr()
        stage_txt = f"stage {self.stage + 1}/{cfg.stages} ({cfg.layers[self.stage]} cells, {cfg.ops[self.stage]} ops)"
        desc = f"{stage_txt} epoch {self.epoch + 1}/{cfg.epochs}" + ("" if self._search_phase else " warm-up")
        self.model.train()
        return desc, self._batches(*self._loaders(self._search_phase))

    def _batches(self, w_loader, a_loader):
        a_iter = iter(a_loader) if a_loader is not None else None
        for xw, yw in w_loader:
            if self.step >= self.steps_per_epoch:
                break
            yield xw, yw, (next(a_iter) if a_iter is not None else None)

    def running_metrics(self) -> dict[str, float]:
        return self.accum.progress()

    def train_step(self, batch) -> dict[str, float]:
        xw, yw, arch_batch = batch
        sums = [0.0, 0, 0]
        if arch_batch is not None:
            xa, ya = arch_batch
            xa, ya = xa.to(self.device, non_blocking=True), ya.to(self.device, non_blocking=True)
            a_loss, a_correct = self.arch_step(xa, ya)
            sums = [a_loss * len(ya), a_correct, len(ya)]
        xw, yw = xw.to(self.device, non_blocking=True), yw.to(self.device, non_blocking=True)
        w_loss, w_correct = self.weight_step(xw, yw)
        sums += [w_loss * len(yw), w_correct, len(yw)]
        # The running sums cover the global batch, so that rank 0's checkpoint holds every rank's.
        if self.dist.enabled:
            sums = all_sum([float(v) for v in sums], self.dist, self.device)
        if arch_batch is not None:
            self.accum.a_loss += sums[0]
            self.accum.a_correct += int(sums[1])
            self.accum.a_count += int(sums[2])
        self.accum.w_loss += sums[3]
        self.accum.w_correct += int(sums[4])
        self.accum.w_count += int(sums[5])
        return self.accum.progress()

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
        self.accum = _Accum()
        return row

    def _changed_edges_last(self, genotype: Genotype) -> int | None:
        """Derived edges changed since the stage's epoch e - STABLE_EPOCHS (epoch 0: initial α)."""
        from bats_cli.search_health import STABLE_EPOCHS, changed_edges, read_alphas

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

    # -- per-epoch outputs ------------------------------------------------------------------
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
        from bats_cli.search_health import alpha_measures

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

    # -- one model on every rank ------------------------------------------------------------
    def check_ranks(self, genotype: Genotype) -> None:
        """Under torchrun: every rank derived ``genotype`` and holds rank 0's α and weights, or a
        RunFailure says which rank differs; then every rank takes rank 0's parameters exactly."""
        self.rank_genotypes = check_ranks_agree(
            self.model, genotype, self.dist, self.device,
            where=f"stage {self.stage + 1}, epoch {self.epoch}",
        )

    def global_epoch(self) -> int:
        return self.stage * self.cfg.epochs + self.epoch

    # -- stages (the loop's segments) -------------------------------------------------------
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
        from bats_cli.search_health import summarise_stage

        if not self.writes:
            return None
        summary = summarise_stage(self.run.path, stage)
        if summary is None:
            return None
        return {k: v for k, v in summary.items() if k not in ("per_epoch", "genotype")}

    def next_segment(self) -> bool:
        self.stage_results.append(self.end_stage())
        if self.stage + 1 >= self.cfg.stages:
            return False
        self.advance_stage()
        self.build_stage(self.in_channels, self.num_classes)
        return True

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
        from bats_cli.search_health import stage_line

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
        from bats_cli.search_health import alpha_measures, read_epoch_genotypes, stage_warnings

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

    def advance_stage(self) -> None:
        cfg = self.cfg
        keep = cfg.ops[self.stage + 1]
        wn, wr = self.current_weights()
        self.candidates_normal = drop_weakest_ops(wn, self.candidates_normal, keep)
        self.candidates_reduce = drop_weakest_ops(wr, self.candidates_reduce, keep)
        self.stage += 1
        self.epoch = 0
        self.step = 0
        self.accum = _Accum()
        self.reporter.line(
            f"stage {self.stage + 1}/{cfg.stages}: {cfg.layers[self.stage]} cells, {keep} ops per edge"
        )

    # -- checkpoints (RunJob) ---------------------------------------------------------------
    def arch_state(self) -> dict[str, Any]:
        state = self.model.arch_state()
        state["stage"] = self.stage
        state["run_name"] = self.run_name
        return state

    def checkpoint(self, *, with_state: bool = True) -> Checkpoint:
        from bats_cli.optim_state import optimizer_state_tensors, state_to_json

        named = dict(self.model.named_parameters())
        tensors = {f"model.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
        ow, ow_json = optimizer_state_tensors(self.opt_w, named, prefix="optim_w.")
        oa, oa_json = optimizer_state_tensors(self.opt_a, named, prefix="optim_a.")
        tensors.update({k: v.detach().cpu() for k, v in {**ow, **oa}.items()})
        state = {
            "stage": self.stage,
            "epoch": self.epoch,
            "step": self.step,
            "global_epoch": self.global_epoch(),
            "steps_per_epoch": self.steps_per_epoch,
            "stage_seconds": self.stage_seconds,
            "stage_started": self.stage_started,
            "accum": self.accum.__dict__,
            "finished": self.finished,
            "warnings": self.warnings,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "scaler_w": state_to_json(self.scaler_w.state_dict()),
            "scaler_a": state_to_json(self.scaler_a.state_dict()),
        }
        genotype = self.current_genotype()
        return Checkpoint(
            tensors=tensors, config=self.cfg.model_dump(mode="json"), epoch=self.epoch,
            step=self.step, genotype_json=json.dumps(genotype.to_dict()),
            extra={
                ARCH_STATE_KEY: json.dumps(self.arch_state()),
                SEARCH_STATE_KEY: json.dumps(state),
                OPTIM_W_KEY: ow_json,
                OPTIM_A_KEY: oa_json,
                "stage": str(self.stage + 1),
            },
        )

    def restore(self, tensors, meta) -> None:
        from bats_cli.optim_state import load_optimizer_state

        path = meta.path
        check_resume_config(meta.config, self.cfg)
        try:
            state = json.loads(meta.extra[SEARCH_STATE_KEY])
            arch = json.loads(meta.extra[ARCH_STATE_KEY])
            self.stage = int(state["stage"])
            self.epoch = int(state["epoch"])
            self.step = int(state["step"])
            self.stage_seconds = [float(s) for s in state["stage_seconds"]]
            accum_keys = set(_Accum.__dataclass_fields__)
            self.accum = _Accum(**{k: v for k, v in state["accum"].items() if k in accum_keys})
            self.finished = bool(state.get("finished", False))
            self.warnings = list(state.get("warnings", []))
            self.candidates_normal = [list(ops) for ops in arch["candidates_normal"]]
            self.candidates_reduce = [list(ops) for ops in arch["candidates_reduce"]]
            in_channels, num_classes = int(state["in_channels"]), int(state["num_classes"])
            saved_steps = int(state["steps_per_epoch"])
            stage_started = float(state.get("stage_started", 0.0))
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise UserInputError(f"{path}: cannot resume, incomplete search state ({str(exc)[:100]})") from None
        self._check_restored(path, stage_started)
        if saved_steps != self.steps_per_epoch:
            raise UserInputError(
                f"cannot resume: the data gives {self.steps_per_epoch} steps per epoch, the run had "
                f"{saved_steps} (did the data set change?)"
            )
        if (in_channels, num_classes) != (self.in_channels, self.num_classes):
            raise UserInputError(
                f"cannot resume: the data has {self.in_channels} channels / {self.num_classes} classes, "
                f"the run had {in_channels} / {num_classes}"
            )
        self.build_stage(in_channels, num_classes)
        self.stage_started = stage_started
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        from bats_cli.metadata import check_state_dtypes

        check_state_dtypes(path, self.model.state_dict(), model_sd)
        try:
            self.model.load_state_dict(model_sd)
        except RuntimeError as exc:
            raise UserInputError(f"{path}: cannot resume, the supernet does not match ({str(exc).splitlines()[0]})") from None
        named = dict(self.model.named_parameters())
        try:
            load_optimizer_state(self.opt_w, named, tensors, meta.extra[OPTIM_W_KEY], prefix="optim_w.")
            load_optimizer_state(self.opt_a, named, tensors, meta.extra[OPTIM_A_KEY], prefix="optim_a.")
        except KeyError as exc:
            raise UserInputError(f"{path}: cannot resume, no optimizer state {exc}") from None
        from bats_cli.optim_state import load_scaler_state

        load_scaler_state(self.scaler_w, state["scaler_w"], where=f"{path}: scaler_w")
        load_scaler_state(self.scaler_a, state["scaler_a"], where=f"{path}: scaler_a")

    def _check_restored(self, path, stage_started: float) -> None:
        """The restored position and state lie inside this run: a counter past the end, a stage
        that does not exist, candidate lists another supernet would need are refused."""
        import math

        from bats_cli.runloop import check_position
        from bats_cli.spaces import edge_count

        cfg = self.cfg
        bad = f"cannot resume: {path}"
        if not 0 <= self.stage < cfg.stages:
            raise UserInputError(f"{bad} is at stage {self.stage + 1} of a {cfg.stages}-stage search")
        check_position(path, epoch=self.epoch, step=self.step, epochs=cfg.epochs,
                       steps_per_epoch=self.steps_per_epoch, what=f"(stage {self.stage + 1})")
        if self.finished and (self.stage != cfg.stages - 1 or self.epoch != cfg.epochs):
            raise UserInputError(f"{bad} says the search finished at stage {self.stage + 1}, epoch "
                                 f"{self.epoch} of {cfg.stages} stages of {cfg.epochs} epochs")
        times = [*self.stage_seconds, stage_started]
        if len(self.stage_seconds) != cfg.stages or not all(math.isfinite(t) and 0 <= t < 1e10 for t in times):
            raise UserInputError(f"{bad}: its stage times are not {cfg.stages} durations")
        acc = self.accum
        counts = (acc.w_correct, acc.w_count, acc.a_correct, acc.a_count)
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 10**12 for c in counts) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in (acc.w_loss, acc.a_loss)
        ) or acc.w_correct > acc.w_count or acc.a_correct > acc.a_count:
            raise UserInputError(f"{bad}: its running sums are not counts (a tampered checkpoint)")
        if not all(isinstance(w, dict) and isinstance(w.get("stage"), int) and isinstance(w.get("message"), str)
                   for w in self.warnings) or len(self.warnings) > 10_000:
            raise UserInputError(f"{bad}: unreadable search warnings")
        space = get_space(cfg.space).candidates
        keep = cfg.ops[self.stage]
        for cell, cands in (("normal", self.candidates_normal), ("reduce", self.candidates_reduce)):
            if len(cands) != edge_count(cfg.nodes) or not all(
                    len(ops) == keep and len(set(ops)) == keep and all(isinstance(op, str) and op in space for op in ops)
                    for ops in cands):
                raise UserInputError(
                    f"{bad}: its {cell} candidate ops are not {edge_count(cfg.nodes)} edges of {keep} "
                    f"distinct {cfg.space} ops (stage {self.stage + 1})"
                )


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


def load_search_data(config: SearchConfig, *, download: bool | None = None):
    """(weight half, architecture half, spec) of the training set, DARTS 50/50 split.

    ``download``: overrides ``config.download`` (False on the ranks that wait for rank 0's)."""
    from bats_cli.data import AugmentConfig, build_datasets, search_split

    data = build_datasets(
        config.dataset, data_dir=config.data_dir,
        download=config.download if download is None else download, subset=config.subset,
        image_size=config.image_size,
        # DARTS searches with crop + flip only (no Cutout / MixUp).
        augment=AugmentConfig(), seed=config.seed,
    )
    if data.spec.network != "cifar":
        raise UserInputError(
            f"{data.spec.image_size} px images: the search network is the CIFAR one (the paper searches "
            "on CIFAR-10); pass --image-size 32 (or at most 64)"
        )
    weight_half, arch_half = search_split(data.train, seed=config.seed)
    return weight_half, arch_half, data.spec


@contextlib.contextmanager
def _discard_if_unstarted(run):
    """A start refused after the run directory was made (e.g. the batch) leaves no directory."""
    try:
        yield
    except UserInputError:
        if run is not None:
            run.discard_if_unstarted()
        raise


@restores_threads
def run_search(
    config: SearchConfig,
    *,
    out_dir: str | Path,
    resume: bool = False,
    reporter=None,
    interrupt=None,
    preflight=None,
) -> SearchResult:
    """Run (or continue) the 3-stage search in ``out_dir``; returns the final genotype and timings.

    ``interrupt`` is anything with ``requested`` and ``raise_if_requested(save_fn)`` (default: a
    :class:`~bats_cli.signals.GracefulInterrupt` turning SIGINT/SIGTERM into a saved checkpoint and
    :class:`~bats_cli.errors.Interrupted`).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls this: the search is data-parallel
    (module docstring), rank 0 reports and writes, every rank returns the same result.
    """
    from bats_cli.distributed import init_run_device
    from bats_cli.progress import Reporter

    started = time.perf_counter()  # the run's time includes its start-up
    from bats_cli.preflight import check_sizes

    check_sizes(channels=config.channels, layers=max(config.layers), nodes=config.nodes,
                what="the search supernet")
    dist_info, device = init_run_device(config.device, config.precision)
    reporter = reporter if reporter is not None and dist_info.is_main else Reporter(quiet=True)
    check_search_batch(config.batch_size, dist_info)
    # Everything that can be refused is checked before the run directory exists.
    check_out_dir(Path(out_dir), resume)
    # Every rank checked the directory before rank 0 creates it.
    barrier(dist_info)
    ckpt = Path(out_dir) / "last.safetensors" if resume else None
    ckpt = ckpt if ckpt is not None and ckpt.is_file() else None
    if ckpt is not None:
        from bats_cli.checkpoint import read_metadata

        meta = read_metadata(ckpt)
        if meta.kind != "search":
            raise UserInputError(f"{ckpt} is a {meta.kind} checkpoint; `bats search --resume` needs a search run")
        check_resume_config(meta.config, config)
    # With --download under torchrun, rank 0 downloads while the others wait for it.
    wait_for_download = config.download is not False and dist_info.enabled
    if wait_for_download and not dist_info.is_main:
        barrier(dist_info)
    weight_half, arch_half, spec = load_search_data(
        config, download=None if dist_info.is_main else False)
    if wait_for_download and dist_info.is_main:
        barrier(dist_info)
    if preflight is not None:
        from bats_cli.plan import search_plan_args

        plan_args = search_plan_args(config, spec, device, len(weight_half), len(arch_half))
        # Memory is per process: each rank holds a supernet and its share of the batch.
        plan_args["batch_size"] = plan_args["eval_batch_size"] = config.batch_size // dist_info.world
        preflight_everywhere(preflight, plan_args, dist_info, device)
    run = open_run_dir(Path(out_dir), resume, dist_info, device)
    if ckpt is None and run is not None:
        run.write_config(config.model_dump(mode="json"), device=device, command="search")
    if config.threads and device.type == "cpu":
        set_threads(config.threads)
    with interrupt_guard(interrupt) as stop, _discard_if_unstarted(run):
        searcher = Searcher(config, run=run, reporter=reporter, device=device,
                            data=(weight_half, arch_half), in_channels=spec.in_channels,
                            num_classes=spec.num_classes, dist_info=dist_info, out_dir=Path(out_dir))
        loop = RunLoop(searcher, run_dir=run, reporter=reporter, interrupt=stop, device=device,
                       dist_info=dist_info, started=started)
        path = run.path if run is not None else Path(out_dir)
        if ckpt is not None:
            loop.resume(ckpt)
            reporter.line(
                f"resuming {path}: stage {searcher.stage + 1}, epoch {searcher.epoch + 1}, "
                f"step {searcher.step}"
            )
        else:
            searcher.build_stage(spec.in_channels, spec.num_classes)
            per_rank = (f" ({config.batch_size // dist_info.world} per process over {dist_info.world} processes)"
                        if dist_info.enabled else "")
            reporter.line(
                f"search {path}: {config.space} space, {config.strategy()}, "
                f"{len(weight_half)}+{len(arch_half)} images, batch {config.batch_size}{per_rank}, "
                f"{searcher.steps_per_epoch} steps per epoch, "
                f"stages {','.join(map(str, config.layers))} cells / {','.join(map(str, config.ops))} ops"
            )
        searcher.stage_results = searcher.past_stages()
        loop.run()
        final = searcher.current_genotype(final=True)
        searcher.check_ranks(final)
        searcher.finished = True
        loop.save_last()
    gpath = final.save(path / GENOTYPE_NAME) if run is not None else path / GENOTYPE_NAME
    result = SearchResult(
        out_dir=path, genotype=final, genotype_path=gpath,
        checkpoint=run.last if run is not None else path / "last.safetensors",
        stages=searcher.stage_results, total_seconds=loop.elapsed(),
        parameter_free_share=parameter_free_share(final), skips=skip_count(final),
        warnings=searcher.warnings, world_size=dist_info.world,
        per_rank_batch=config.batch_size // dist_info.world, rank_genotypes=searcher.rank_genotypes,
    )
    if run is not None:
        run.write_json(RESULT_NAME, result.to_dict())
    # The result exists once run_search returns, on every rank.
    barrier(dist_info)
    return result
