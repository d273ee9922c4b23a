"""The search's :class:`~bats_cli.training.runloop.RunJob`: :class:`Searcher` builds each stage's supernet,
takes the architecture and weight steps, advances the stages (dropping the weakest ops) and saves
and restores its state; what it records is :class:`~bats_cli.nas.search_records.SearchRecords`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bats_cli.core.errors import RunFailure, UserInputError
from bats_cli.core.genotype import Genotype
from bats_cli.core.spaces import edge_endpoints, get_space
from bats_cli.nas.derive import ARCH_STATE_KEY, safe_name
from bats_cli.nas.search_config import SearchConfig
from bats_cli.nas.search_records import EpochSums, SearchRecords, StageResult, check_ranks_agree, check_search_batch
from bats_cli.training.runloop import Checkpoint, RunJob
from bats_cli.utils.distributed import Dist, agree, all_sum, average_gradients
from bats_cli.utils.schedule import cosine_lr

SEARCH_STATE_KEY = "search_state"
OPTIM_W_KEY = "optim_w"
OPTIM_A_KEY = "optim_a"


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



# ---- the searcher ------------------------------------------------------------------------------


class Searcher(SearchRecords, RunJob):
    """The search as a :class:`~bats_cli.training.runloop.RunJob`: stages are the loop's segments, the
    search step is one architecture step then one weight step. Use :func:`run_search`."""

    kind = "search"

    def __init__(self, config: SearchConfig, *, run, device: torch.device, data, in_channels: int,
                 num_classes: int, reporter=None, dist_info: Dist = Dist(),
                 out_dir: Path | None = None) -> None:
        """``run``: the :class:`~bats_cli.storage.rundir.RunDir` on rank 0, None on the other ranks
        (they write nothing; ``out_dir`` then names the run)."""
        from bats_cli.utils.progress import Reporter

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
        self.accum = EpochSums()
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
        from bats_cli.models.supernet import SuperNet, SupernetConfig
        from bats_cli.utils.runtime import make_grad_scaler

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
        from bats_cli.utils.preflight import check_supernet_fits

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
        from bats_cli.utils.runtime import autocast

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
            self.accum.a.add(*sums[:3])
        self.accum.w.add(*sums[3:])
        return self.accum.progress()


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

    # -- stages (the loop's segments) -------------------------------------------------------
    def next_segment(self) -> bool:
        self.stage_results.append(self.end_stage())
        if self.stage + 1 >= self.cfg.stages:
            return False
        self.advance_stage()
        self.build_stage(self.in_channels, self.num_classes)
        return True


    def advance_stage(self) -> None:
        cfg = self.cfg
        keep = cfg.ops[self.stage + 1]
        wn, wr = self.current_weights()
        self.candidates_normal = drop_weakest_ops(wn, self.candidates_normal, keep)
        self.candidates_reduce = drop_weakest_ops(wr, self.candidates_reduce, keep)
        self.stage += 1
        self.epoch = 0
        self.step = 0
        self.accum = EpochSums()
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
        from bats_cli.storage.optim_state import optimizer_state_tensors, state_to_json

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
            "accum": self.accum.state(),
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
        from bats_cli.storage.optim_state import load_optimizer_state

        path = meta.path  # its config was checked by run_search
        try:
            state = json.loads(meta.extra[SEARCH_STATE_KEY])
            arch = json.loads(meta.extra[ARCH_STATE_KEY])
            self.stage = int(state["stage"])
            self.epoch = int(state["epoch"])
            self.step = int(state["step"])
            self.stage_seconds = [float(s) for s in state["stage_seconds"]]
            self.accum = EpochSums.from_state(state["accum"])
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
        from bats_cli.storage.metadata import check_state_dtypes

        check_state_dtypes(path, self.model.state_dict(), model_sd)
        try:
            self.model.load_state_dict(model_sd)
        except RuntimeError as exc:
            raise UserInputError(f"{path}: cannot resume, the supernet does not match "
                                 f"({str(exc).splitlines()[0]})") from None
        named = dict(self.model.named_parameters())
        try:
            load_optimizer_state(self.opt_w, named, tensors, meta.extra[OPTIM_W_KEY], prefix="optim_w.")
            load_optimizer_state(self.opt_a, named, tensors, meta.extra[OPTIM_A_KEY], prefix="optim_a.")
        except KeyError as exc:
            raise UserInputError(f"{path}: cannot resume, no optimizer state {exc}") from None
        from bats_cli.storage.optim_state import load_scaler_state

        load_scaler_state(self.scaler_w, state["scaler_w"], where=f"{path}: scaler_w")
        load_scaler_state(self.scaler_a, state["scaler_a"], where=f"{path}: scaler_a")

    def _check_restored(self, path, stage_started: float) -> None:
        """The restored position and state lie inside this run: a counter past the end, a stage
        that does not exist, candidate lists another supernet would need are refused."""
        import math

        from bats_cli.core.spaces import edge_count
        from bats_cli.training.runloop import check_position

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
        if not (self.accum.w.are_counts() and self.accum.a.are_counts()):
            raise UserInputError(f"{bad}: its running sums are not counts (a tampered checkpoint)")
        if not all(isinstance(w, dict) and isinstance(w.get("stage"), int) and isinstance(w.get("message"), str)
                   for w in self.warnings) or len(self.warnings) > 10_000:
            raise UserInputError(f"{bad}: unreadable search warnings")
        space = get_space(cfg.space).candidates
        keep = cfg.ops[self.stage]
        for cell, cands in (("normal", self.candidates_normal), ("reduce", self.candidates_reduce)):
            if len(cands) != edge_count(cfg.nodes) or not all(
                    len(ops) == keep and len(set(ops)) == keep
                    and all(isinstance(op, str) and op in space for op in ops) for ops in cands):
                raise UserInputError(
                    f"{bad}: its {cell} candidate ops are not {edge_count(cfg.nodes)} edges of {keep} "
                    f"distinct {cfg.space} ops (stage {self.stage + 1})"
                )
