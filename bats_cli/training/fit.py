"""The supervised trainer shared by ``bats train`` (step 1) and ``bats binarize``'s fine-tuning
(step 2): :class:`FitSpec` says what to train, :class:`TrainJob` is its :class:`~bats_cli.training.runloop.RunJob`,
:func:`fit` runs it on the shared :class:`~bats_cli.training.runloop.RunLoop`. It is

* deterministic given the seed (data order and augmentation come from ``bats_cli.data``'s seeded
  loader, MixUp from a per-batch seed, the rest from the seeded global RNG);
* resumable mid-epoch: ``last.safetensors`` holds weights, Adam state, RNG state, the position
  in the epoch and the running epoch sums, so an interrupted run continues exactly on CPU;
* distributed: under ``torchrun`` it trains with DistributedDataParallel, each rank taking its
  slice of every global batch, so the global batches are the same as in a single process.

Checkpoint layout (safetensors, kind ``train`` or ``binarize``): ``model.<state_dict key>``;
``last`` also holds ``optim.<param>.<buffer>`` and ``rng.*``. Metadata ``bats_config`` is
``{"run": <the run config>, "network": <settings to rebuild the net>, "data": <data spec>}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from bats_cli.core.config import RunConfig
from bats_cli.core.errors import RunFailure, UserInputError
from bats_cli.data.loader import sharded_loader, steps_per_epoch
from bats_cli.models.modelio import load_model_tensors, model_tensors
from bats_cli.training.distill import ATTENTION_WEIGHT, KD_TEMPERATURE, KD_WEIGHT, Distill, capture, feature_modules
from bats_cli.training.runloop import Checkpoint, RunJob, RunLoop, check_position, interrupt_guard
from bats_cli.utils.distributed import Dist, all_sum, broadcast_buffers
from bats_cli.utils.schedule import cosine_lr

# --------------------------------------------------------------------------- settings

# Runs saved before the distillation settings existed resume as runs without a teacher.
DISTILL_DEFAULTS = {"teacher": None, "kd_temperature": KD_TEMPERATURE, "kd_weight": KD_WEIGHT,
                    "attention_weight": ATTENTION_WEIGHT}


def check_distill_options(cfg) -> None:
    """ValueError when a distillation setting is changed without a teacher (it would do nothing)."""
    if cfg.teacher is not None:
        return
    changed = [flag for flag, value, default in (
        ("--kd-temperature", cfg.kd_temperature, KD_TEMPERATURE), ("--kd-weight", cfg.kd_weight, KD_WEIGHT),
        ("--attention-weight", cfg.attention_weight, ATTENTION_WEIGHT)) if value != default]
    if changed:
        raise ValueError(f"{', '.join(changed)} only apply with --teacher CKPT")


class DistillSettings(RunConfig):
    """Base of the configs of the two steps (train, binarize): distillation from a teacher
    (bats_cli.training.distill); no teacher = cross-entropy only, the paper's recipe."""

    teacher: Optional[str] = Field(None, max_length=4096, description="Teacher checkpoint; None: no distillation")
    kd_temperature: float = Field(KD_TEMPERATURE, gt=0, le=100)
    kd_weight: float = Field(KD_WEIGHT, ge=0, le=1)
    attention_weight: float = Field(ATTENTION_WEIGHT, ge=0, le=1000)

    @model_validator(mode="after")
    def _distill_options(self) -> "DistillSettings":
        check_distill_options(self)
        return self



def eval_batch_size(eval_batch: int | None, batch_size: int) -> int:
    """The evaluation batch: as given, else the training batch but at least 256 (no gradients)."""
    return eval_batch or max(batch_size, 256)


# --------------------------------------------------------------------------- loss


def _loss(output, target: torch.Tensor, aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): cross-entropy (soft targets after MixUp) plus the weighted auxiliary loss."""
    if isinstance(output, tuple):
        logits, aux = output
        loss = F.cross_entropy(logits.float(), target)
        if aux_weight > 0:
            loss = loss + aux_weight * F.cross_entropy(aux.float(), target)
        return loss, logits
    return F.cross_entropy(output.float(), target), output


def distill_line(distill: Distill) -> str:
    """The run's line about its teacher."""
    loss = ("KL divergence to the teacher" + (f" at T={distill.temperature:g}" if distill.temperature != 1 else "")
            + (f", x{distill.weight:g} + cross-entropy x{1 - distill.weight:g}" if distill.weight < 1
               else " (no cross-entropy)")
            + (f", + attention matching x{distill.attention_weight:g}" if distill.attention_weight > 0 else ""))
    return f"teacher {distill.path} ({distill.description}; frozen, eval mode): loss = {loss}"


def teacher_extra(distill: Optional[Distill]) -> dict[str, str]:
    """Checkpoint metadata naming the teacher (path, sha256, loss settings)."""
    return {} if distill is None else {"bats_teacher": json.dumps(distill.record())}


# --------------------------------------------------------------------------- the training job


@dataclass
class FitSpec:
    """What :class:`TrainJob` trains and how it records it."""

    kind: str  # checkpoint kind: "train" or "binarize"
    model: nn.Module
    run_config: dict[str, Any]
    settings: dict[str, Any]
    data: dict[str, Any]
    genotype_json: str | None  # None for a fixed model (no cells)
    epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    lr_min: float
    betas: tuple[float, float]
    weight_decay: float
    aux_weight: float
    mixup: float | None
    seed: int
    precision: str
    num_workers: int
    optimizer: str = "adam"  # "sgd": momentum SGD (Appendix B), same lr schedule
    momentum: float = 0.9
    # extra metadata stored in every checkpoint of this run (e.g. binarize's pre-fine-tune numbers)
    extra: dict[str, str] = field(default_factory=dict)
    # a frozen teacher: the loss becomes distillation (bats_cli.training.distill); None = cross-entropy
    distill: Optional[Distill] = None


@dataclass
class _Running:
    """Sums of the epoch so far and the best validation top-1 (kept in checkpoints)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    best_top1: float = -1.0
    best_epoch: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class TrainJob(RunJob):
    """Supervised training of an evaluation network: step 1 (``bats train``) and step 2's
    fine-tuning (``bats binarize``). Adam, cosine LR per step, auxiliary loss, optional MixUp;
    validation after every epoch, ``best`` kept by validation top-1.

    Deterministic given the seed (data order and augmentation from ``bats_cli.data``'s seeded
    loader, MixUp from a per-batch seed), sharded over ranks under DDP.
    """

    def __init__(self, spec: FitSpec, train_set, test_set, *, device: torch.device, dist_info: Dist) -> None:
        from bats_cli.data import mixup as make_mixup
        from bats_cli.utils.runtime import make_grad_scaler, memory_format

        self.kind = spec.kind
        self.spec = spec
        self.train_set, self.test_set = train_set, test_set
        self.device, self.dist = device, dist_info
        model = spec.model.to(device)
        self.fmt = memory_format(device, model, precision=spec.precision)
        self.model = model.to(memory_format=self.fmt)
        self.params = dict(self.model.named_parameters())
        if spec.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params.values(), lr=spec.lr, momentum=spec.momentum,
                                             weight_decay=spec.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(
                self.params.values(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
            )
        self.scaler = make_grad_scaler(device, spec.precision)
        self.steps_per_epoch = steps_per_epoch(len(train_set), spec.batch_size)
        self.total_steps = self.steps_per_epoch * spec.epochs
        self.running = _Running()
        self.history: list[dict[str, Any]] = []
        self._improved = False
        self.ddp = self.model
        if dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.mix = make_mixup(spec.mixup, num_classes=spec.settings["num_classes"]) if spec.mixup else None
        self.distill = spec.distill.to(device, self.fmt) if spec.distill is not None else None
        self.features = (feature_modules(self.model)
                         if self.distill is not None and self.distill.attention_weight > 0 else [])

    # -- position
    def segment_done(self) -> bool:
        return self.epoch >= self.spec.epochs

    def run_steps(self) -> tuple[int, int, int]:
        return self.total_steps, self.epoch * self.steps_per_epoch, self.spec.batch_size

    # -- an epoch
    def begin_epoch(self):
        spec = self.spec
        loader = sharded_loader(
            self.train_set, batch_size=spec.batch_size, seed=spec.seed, epoch=self.epoch,
            skip=self.step, dist_info=self.dist, num_workers=spec.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.ddp.train()
        return f"epoch {self.epoch + 1}/{spec.epochs}", loader

    def running_metrics(self) -> dict[str, float]:
        r = self.running
        return {"loss": r.loss_sum / r.seen} if r.seen else {}

    def train_step(self, batch) -> dict[str, float]:
        from bats_cli.data import batch_seed
        from bats_cli.utils.runtime import autocast

        spec, r = self.spec, self.running
        x, y = batch
        lr = cosine_lr(self.epoch * self.steps_per_epoch + self.step, self.total_steps, spec.lr, spec.lr_min)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)
        y = y.to(self.device, non_blocking=True)
        target = y
        if self.mix is not None:
            x, target = self.mix(x, y, seed=batch_seed(spec.seed, self.epoch, self.step))
        if self.distill is None:
            with autocast(self.device, spec.precision):
                output = self.ddp(x)
            loss, logits = _loss(output, target, spec.aux_weight)
        else:
            # The teacher sees exactly the student's batch (augmented, mixed), in eval mode.
            with autocast(self.device, spec.precision):
                t_logits, t_feats = self.distill.forward(x)
            with autocast(self.device, spec.precision), capture(self.features) as s_feats:
                output = self.ddp(x)
            loss, logits = self.distill.loss(output, target, t_logits, aux_weight=spec.aux_weight,
                                             student_features=s_feats, teacher_features=t_feats)
            del s_feats, t_feats
        if not torch.isfinite(loss):
            raise RunFailure(
                f"training diverged: loss is {loss.item()} at epoch {self.epoch + 1}, "
                f"step {self.step + 1}; try a lower --lr"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        n = y.shape[0]
        r.loss_sum += loss.item() * n
        r.correct += (logits.argmax(1) == y).sum().item()
        r.seen += n
        return {"loss": r.loss_sum / r.seen, "lr": lr}

    def end_epoch(self, bar) -> dict[str, Any]:
        from bats_cli.training.evaluate import evaluate_model

        spec, r = self.spec, self.running
        loss_sum, correct, seen = all_sum([r.loss_sum, r.correct, r.seen], self.dist, self.device)
        broadcast_buffers(self.model, self.dist)
        val = evaluate_model(
            self.model, self.test_set, batch_size=spec.eval_batch_size, device=self.device,
            precision=spec.precision, dist_info=self.dist, num_workers=spec.num_workers,
        )
        row = {
            "epoch": self.epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_top1": 100.0 * correct / max(seen, 1),
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        bar.set(train_top1=row["train_top1"], val_top1=row["val_top1"])
        self.history.append(row)
        r.loss_sum = r.correct = r.seen = 0.0
        self._improved = row["val_top1"] > r.best_top1
        if self._improved:
            r.best_top1, r.best_epoch = row["val_top1"], self.epoch
        return row

    def after_epoch(self, row) -> tuple[str, ...]:
        return ("best",) if self._improved else ()

    # -- checkpoints
    def checkpoint(self, *, with_state: bool) -> Checkpoint:
        from bats_cli.storage.optim_state import optimizer_state_tensors, state_to_json

        spec = self.spec
        tensors = model_tensors(self.model)
        extra = {**spec.extra, "bats_running": self.running.to_json()}
        if with_state:
            opt_tensors, opt_json = optimizer_state_tensors(self.optimizer, self.params)
            tensors.update(opt_tensors)
            extra["bats_optimizer"] = opt_json
            extra["bats_scaler"] = state_to_json(self.scaler.state_dict())
        return Checkpoint(
            tensors=tensors, config={"run": spec.run_config, "network": spec.settings, "data": spec.data},
            epoch=self.epoch, step=self.step, genotype_json=spec.genotype_json, extra=extra,
        )

    def restore(self, tensors, meta) -> None:
        from bats_cli.storage.optim_state import load_optimizer_state

        path = meta.path
        load_model_tensors(self.model, tensors, path)
        self.model.to(memory_format=self.fmt)
        try:
            load_optimizer_state(self.optimizer, self.params, tensors, meta.extra["bats_optimizer"])
            running = json.loads(meta.extra.get("bats_running", "{}"))
        except KeyError:
            raise UserInputError(f"cannot resume from {path}: it holds no optimizer state") from None
        if "bats_scaler" in meta.extra:
            from bats_cli.storage.optim_state import load_scaler_state

            load_scaler_state(self.scaler, meta.extra["bats_scaler"], where=f"{path}: bats_scaler")
        try:
            self.running = _Running(**running)
        except TypeError:
            raise UserInputError(f"cannot resume from {path}: unreadable running sums") from None
        if self.running.seen > self.steps_per_epoch * self.spec.batch_size or (
                self.running.correct > self.running.seen):
            raise UserInputError(f"cannot resume from {path}: its running sums count more images than "
                                 "an epoch has (a tampered checkpoint)")
        self.epoch, self.step = meta.epoch, meta.step
        check_position(path, epoch=self.epoch, step=self.step, epochs=self.spec.epochs,
                       steps_per_epoch=self.steps_per_epoch)
        if self.running.best_epoch > self.epoch:
            raise UserInputError(f"cannot resume: {path} names epoch {self.running.best_epoch} as its "
                                 f"best, but only {self.epoch} are done (a tampered checkpoint)")


def fit(
    spec: FitSpec,
    train_set,
    test_set,
    *,
    device: torch.device,
    dist_info: Dist,
    run_dir=None,
    reporter=None,
    resume_from: tuple[Mapping[str, torch.Tensor], Any] | None = None,
    stop_after_steps: int | None = None,
    handle_signals: bool = True,
    stop=None,
    started: float | None = None,
) -> dict[str, Any]:
    """Train ``spec.model`` with the shared run loop and return a summary; writes ``last`` /
    ``best`` / ``metrics.csv`` in ``run_dir``.

    ``stop``: an interrupt already entered by the caller (so a signal during set-up counts too);
    without one, ``handle_signals`` installs its own. ``stop_after_steps`` simulates a Ctrl-C
    after that many optimizer steps of this call (tests). ``resume_from``: the ``(tensors, meta)``
    of the checkpoint to continue, as the caller read it.
    """
    job = TrainJob(spec, train_set, test_set, device=device, dist_info=dist_info)
    with interrupt_guard(stop, handle_signals=handle_signals) as interrupt:
        loop = RunLoop(job, run_dir=run_dir, reporter=reporter, interrupt=interrupt,
                       dist_info=dist_info, device=device, stop_after_steps=stop_after_steps,
                       started=started)
        if resume_from is not None:
            loop.resume(resume_from)
        loop.run()
    history = job.history
    if not history and run_dir is not None:
        # Resuming a finished run: report what its metrics.csv recorded.
        history = [_row_numbers(r) for r in run_dir.metrics.read()]
    last = history[-1] if history else None
    r = job.running
    return {
        "epochs": spec.epochs,
        "steps_per_epoch": job.steps_per_epoch,
        "final": last,
        "best_top1": r.best_top1 if r.best_top1 >= 0 else None,
        "best_epoch": r.best_epoch or None,
        "seconds": round(loop.elapsed(), 1),
        "history": history,
    }


def _row_numbers(row: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        try:
            out[k] = int(v) if k == "epoch" else float(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


__all__ = [
    "DISTILL_DEFAULTS",
    "DistillSettings",
    "FitSpec",
    "TrainJob",
    "check_distill_options",
    "distill_line",
    "eval_batch_size",
    "fit",
    "teacher_extra",
]
