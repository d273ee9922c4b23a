"""Step 1 of the two-step strategy (§4.3, footnote 4): train a genotype's network from scratch.

Binary activations and real weights by default (``real=True``: everything real-valued); the
paper's recipe (§6.2) is the default configuration: Adam (lr 1e-3, β = (0.9, 0.999), no weight
decay), cosine learning-rate decay, 600 epochs on CIFAR-sized data and 75 on ImageNet-sized data,
batch 256, auxiliary tower with weight 0.4, drop-path 0, Cutout 16 px on CIFAR-10 and MixUp 0.2 on
CIFAR-100.

The training step (:class:`TrainJob`, run by :func:`fit` on the shared
:class:`~bats_cli.runloop.RunLoop`) is shared with ``bats binarize``'s fine-tuning (step 2). It is

* deterministic given the seed (data order and augmentation come from ``bats_cli.data``'s seeded
  loader, MixUp from a per-batch seed, the rest from the seeded global RNG);
* resumable mid-epoch: ``last.safetensors`` holds weights, Adam state, RNG state, the position
  in the epoch and the running epoch sums, so an interrupted run continues exactly on CPU;
* interruptible: SIGINT / SIGTERM finish the current step, save ``last.safetensors`` and raise
  :class:`~bats_cli.errors.Interrupted` (exit 130);
* distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel,
  each rank taking its slice of every global batch (``batch_size / world_size`` images), so the
  global batches are the same as in a single process; only rank 0 logs and writes files.

Checkpoint layout (safetensors, kind ``train`` or ``binarize``): ``model.<state_dict key>``;
``last`` also holds ``optim.<param>.<buffer>`` and ``rng.*``. Metadata ``bats_config`` is
``{"run": <the run config>, "network": <settings to rebuild the net>, "data": <data spec>}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from bats_cli.archs import CELLS, arch_of
from bats_cli.config import (
    MAX_BATCH,
    MAX_DECAY,
    MAX_EPOCHS,
    MAX_IMAGE_SIZE,
    MAX_LR,
    RESUME_IGNORED_KEYS,
    Device,
    Images,
    RunConfig,
    Seed,
    Threads,
    Workers,
)
from bats_cli.data.loader import check_batch, sharded_loader, steps_per_epoch
from bats_cli.distill import ATTENTION_WEIGHT, KD_TEMPERATURE, KD_WEIGHT, Distill, capture, feature_modules
from bats_cli.distributed import Dist, all_sum, barrier, broadcast_buffers, init_run_device
from bats_cli.errors import RunFailure, UserInputError
from bats_cli.modelio import (
    data_info,
    genotype_differs,
    genotype_name,
    load_model_tensors,
    model_tensors,
    network_label,
    network_settings,
)
from bats_cli.preflight import MAX_CHANNELS, MAX_LAYERS
from bats_cli.runloop import (
    Checkpoint,
    RunJob,
    RunLoop,
    check_out_dir,
    check_position,
    default_run_dir,
    interrupt_guard,
    open_run_dir,
    preflight_everywhere,
    restores_threads,
    set_threads,
)
from bats_cli.schedule import cosine_lr

# --------------------------------------------------------------------------- configuration

# §6.2: 600 epochs on CIFAR-10/100, 75 on ImageNet; keyed by network family.
PAPER_EPOCHS = {"cifar": 600, "imagenet": 75}
# The paper's data (§6.2); --preset tiny uses the embedded fashion-mini instead.
DEFAULT_DATASET = "cifar10"


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


class TrainConfig(RunConfig):
    """Everything ``bats train`` needs; defaults are the paper's (§6.2)."""

    genotype: str = Field(description="Genotype name or path, or a model name (resnet18), as given (informational).")
    # data
    dataset: str = DEFAULT_DATASET
    data_dir: Optional[str] = None
    download: Optional[bool] = Field(None, description="None: fetch torchvision data sets when missing")
    subset: Images = None
    # Validate on N class-balanced training images held out of training (never the test split):
    # per-epoch validation and `best` then never read the test split (bats ablate, selection).
    holdout: Images = None
    image_size: Optional[int] = Field(None, ge=8, le=MAX_IMAGE_SIZE)
    # network
    width: str = "1x"
    layers: Optional[int] = Field(None, ge=3, le=MAX_LAYERS)
    channels: Optional[int] = Field(None, ge=1, le=MAX_CHANNELS)
    real: bool = False
    activation: Literal["prelu", "rprelu", "relu", "none"] = "prelu"
    group_policy: Literal["groups", "channels"] = "groups"
    channels_per_group: Optional[int] = Field(None, ge=1, le=MAX_CHANNELS)
    reduce_shortcut: Literal["avgpool", "factorized", "none"] = "avgpool"
    channel_shuffle: int = Field(0, ge=0, le=MAX_CHANNELS, description="0: off; G: shuffle in G groups after grouped convs")
    auxiliary: bool = True
    # optimisation
    epochs: Optional[int] = Field(None, ge=1, le=MAX_EPOCHS, description="None: 600 (CIFAR-sized), 75 (ImageNet)")
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    eval_batch_size: Optional[int] = Field(None, ge=1, le=MAX_BATCH)
    # Adam (§6.2) by default; SGD momentum 0.9, lr 0.1 is Appendix B's recipe for real networks.
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, le=1)
    lr: Optional[float] = Field(None, gt=0, le=MAX_LR, description="None: 1e-3 (Adam), 0.1 (SGD)")
    lr_min: float = Field(0.0, ge=0, le=MAX_LR)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=MAX_DECAY)
    aux_weight: float = Field(0.4, ge=0, le=100)
    drop_path: float = Field(0.0, ge=0, lt=1)
    # augmentation: None = the paper's default for the data set; 0 = off
    cutout: Optional[int] = Field(None, ge=0, le=MAX_IMAGE_SIZE)
    mixup: Optional[float] = Field(None, ge=0, le=1000)
    autoaugment: bool = False
    # run
    seed: Seed = 0
    device: Device = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_workers: Workers = 0
    threads: Threads = Field(None, description="CPU threads; None: torch's default")
    # distillation (bats_cli.distill): None = cross-entropy only (the paper's recipe)
    teacher: Optional[str] = Field(None, max_length=4096, description="Teacher checkpoint; None: no distillation")
    kd_temperature: float = Field(KD_TEMPERATURE, gt=0, le=100)
    kd_weight: float = Field(KD_WEIGHT, ge=0, le=1)
    attention_weight: float = Field(ATTENTION_WEIGHT, ge=0, le=1000)

    @model_validator(mode="after")
    def _optimizer_lr(self) -> "TrainConfig":
        if self.lr is None:
            # Assignment re-validates; the default follows the optimizer chosen.
            self.lr = 0.1 if self.optimizer == "sgd" else 1e-3
        check_distill_options(self)
        return self


# Settings that may differ when a run is resumed: where and how it runs, not what it trains.
TRAIN_RESUME_IGNORED = RESUME_IGNORED_KEYS | {"threads"}

from bats_cli.presets import TRAIN_PRESETS, train_presets  # noqa: E402  (torch-free, shown by --help)

# Settings of the cell networks only, with their defaults: a fixed model (resnet18) refuses any
# other value rather than ignore it.
CELL_ONLY = {"layers": None, "channels_per_group": None, "group_policy": "groups",
             "reduce_shortcut": "avgpool", "channel_shuffle": 0, "aux_weight": 0.4, "drop_path": 0.0}


def check_arch_options(cfg: TrainConfig, arch: str) -> None:
    """UserInputError when a cell-only setting is changed for a fixed model."""
    if arch == CELLS:
        return
    changed = [k for k, default in CELL_ONLY.items() if getattr(cfg, k) != default]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise UserInputError(f"{flags} only apply to cell networks, not to {arch}")


def resolve_augment(cfg: TrainConfig, dataset_name: str):
    """The AugmentConfig a run uses: the paper default for the data set, then explicit flags.

    ``cutout 0`` / ``mixup 0`` switch a default off. ImageFolder trees (e.g. cifar10-mini) get no
    data-set-specific extra: the paper ties Cutout to CIFAR-10 and MixUp to CIFAR-100 by name.
    """
    from bats_cli.data import AugmentConfig

    base = AugmentConfig.paper_default(dataset_name)
    cutout = base.cutout if cfg.cutout is None else (cfg.cutout or None)
    mixup = base.mixup if cfg.mixup is None else (cfg.mixup or None)
    return AugmentConfig(cutout=cutout, mixup=mixup, autoaugment=cfg.autoaugment)


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
            + (f", x{distill.weight:g} + cross-entropy x{1 - distill.weight:g}" if distill.weight < 1 else " (no cross-entropy)")
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
    # a frozen teacher: the loss becomes distillation (bats_cli.distill); None = cross-entropy
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
        from bats_cli.runtime import make_grad_scaler, memory_format

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
        from bats_cli.runtime import autocast

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
        from bats_cli.evaluate import evaluate_model

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
        from bats_cli.checkpoint import optimizer_state_tensors, state_to_json

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
        from bats_cli.checkpoint import load_optimizer_state

        path = meta.path
        load_model_tensors(self.model, tensors, path)
        self.model.to(memory_format=self.fmt)
        try:
            load_optimizer_state(self.optimizer, self.params, tensors, meta.extra["bats_optimizer"])
            running = json.loads(meta.extra.get("bats_running", "{}"))
        except KeyError:
            raise UserInputError(f"cannot resume from {path}: it holds no optimizer state") from None
        if "bats_scaler" in meta.extra:
            from bats_cli.checkpoint import load_scaler_state

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
    resume_from: Path | None = None,
    stop_after_steps: int | None = None,
    handle_signals: bool = True,
    stop=None,
    started: float | None = None,
) -> dict[str, Any]:
    """Train ``spec.model`` with the shared run loop and return a summary; writes ``last`` /
    ``best`` / ``metrics.csv`` in ``run_dir``.

    ``stop``: an interrupt already entered by the caller (so a signal during set-up counts too);
    without one, ``handle_signals`` installs its own. ``stop_after_steps`` simulates a Ctrl-C
    after that many optimizer steps of this call (tests).
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


# --------------------------------------------------------------------------- bats train


@restores_threads
def train(
    cfg: TrainConfig,
    *,
    genotype,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    stop_after_steps: int | None = None,
    handle_signals: bool = True,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    preflight=None,
) -> dict[str, Any]:
    """Run ``bats train``: returns the JSON-ready result (rank 0's is the one to print).

    ``genotype``: a :class:`~bats_cli.genotype.Genotype`, or a fixed model's name (``resnet18``,
    see :func:`bats_cli.zoo.resolve_network`). With ``resume`` and an existing
    ``<out>/last.safetensors`` the saved config is used; ``preset``
    and ``overrides`` (the flags given) must then agree with it. ``preflight(**plan)`` (see
    :func:`bats_cli.plan.make_preflight`) runs before the run directory is created.
    """
    started = time.perf_counter()  # the run's time includes its start-up
    # Installed first, so that a signal during set-up stops the run too (after one step).
    with interrupt_guard(handle_signals=handle_signals) as stop:
        return _train(cfg, genotype=genotype, out=out, resume=resume, quiet=quiet,
                      stop_after_steps=stop_after_steps, preset=preset, overrides=overrides,
                      stop=stop, preflight=preflight, started=started)


def _train(
    cfg: TrainConfig,
    *,
    genotype,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    stop_after_steps: int | None = None,
    stop=None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    preflight=None,
    started: float | None = None,
) -> dict[str, Any]:
    """Run ``bats train``: returns the JSON-ready result (rank 0's is the one to print).

    With ``resume`` and an existing ``<out>/last.safetensors`` the saved config is used; ``preset``
    and ``overrides`` (the flags given) must then agree with it.
    """
    from bats_cli.config import resolve_resume_config
    from bats_cli.data import build_datasets
    from bats_cli.progress import Reporter
    from bats_cli.runtime import seed_everything

    arch = genotype if isinstance(genotype, str) else CELLS
    name = arch if arch != CELLS else genotype.name
    check_arch_options(cfg, arch)
    dist_info, device = init_run_device(cfg.device, cfg.precision)
    if resume and out is None:
        raise UserInputError("--resume needs --out: the run directory to continue")
    out = Path(out) if out is not None else default_run_dir("train", name)

    check_out_dir(out, resume)
    resume_from = out / "last.safetensors" if resume and (out / "last.safetensors").exists() else None
    resuming = resume_from is not None
    if resuming:
        from bats_cli.checkpoint import check_kind, read_metadata

        meta = read_metadata(resume_from)
        check_kind(meta, "train", "train --resume")
        saved_arch = arch_of(meta.config.get("network") or {})
        if saved_arch != arch:
            raise UserInputError(
                f"cannot resume: {out} trained {'a cell network' if saved_arch == CELLS else saved_arch}, "
                f"not {'a cell network' if arch == CELLS else arch}; give the same GENOTYPE or another --out"
            )
        if arch == CELLS and meta.genotype_json is not None and genotype_differs(meta.genotype_json, genotype):
            raise UserInputError(
                f"cannot resume: the genotype differs from the one {out} was trained with "
                f"({genotype_name(meta.genotype_json)!r}); give the same GENOTYPE or another --out"
            )
        saved = meta.config.get("run", {})
        saved = {**DISTILL_DEFAULTS, **saved} if isinstance(saved, dict) else saved
        cfg = resolve_resume_config(
            TrainConfig, saved, preset=preset, presets=train_presets(arch),
            overrides={**(overrides or {}), "genotype": saved.get("genotype", cfg.genotype)},
            ignore=TRAIN_RESUME_IGNORED,
        )
    set_threads(cfg.threads)

    # Everything that can be refused is checked before the run directory is created.
    seed_everything(cfg.seed)
    from bats_cli.data import describe_spec

    spec0 = describe_spec(cfg.dataset, cfg.data_dir, cfg.image_size)
    augment = resolve_augment(cfg, spec0.name)
    # With --download under torchrun, rank 0 downloads while the others wait for it.
    wait_for_download = cfg.download is not False and dist_info.enabled
    if wait_for_download and not dist_info.is_main:
        barrier(dist_info)
    data = build_datasets(
        cfg.dataset, data_dir=cfg.data_dir, download=cfg.download if dist_info.is_main else False,
        subset=cfg.subset, image_size=cfg.image_size, augment=augment, seed=cfg.seed,
        holdout=cfg.holdout,
    )
    if wait_for_download and dist_info.is_main:
        barrier(dist_info)
    dspec = data.spec
    epochs = cfg.epochs or PAPER_EPOCHS[dspec.network]
    cfg = cfg.model_copy(update={"epochs": epochs, "cutout": augment.cutout or 0,
                                 "mixup": augment.mixup or 0.0})
    check_batch(len(data.train), cfg.batch_size, dist_info)

    seed_everything(cfg.seed)
    if arch == CELLS:
        from bats_cli.networks import build_network

        model = build_network(
            genotype, kind=dspec.network, num_classes=dspec.num_classes,
            in_channels=dspec.in_channels, width=cfg.width, layers=cfg.layers,
            channels=cfg.channels, real=cfg.real, auxiliary=cfg.auxiliary, drop_path=cfg.drop_path,
            activation=cfg.activation, channels_per_group=cfg.channels_per_group,
            group_policy=cfg.group_policy, reduce_shortcut=cfg.reduce_shortcut,
            channel_shuffle=cfg.channel_shuffle,
        )
    else:
        from bats_cli.resnet import build_resnet

        model = build_resnet(kind=dspec.network, num_classes=dspec.num_classes,
                             in_channels=dspec.in_channels, width=cfg.width, channels=cfg.channels,
                             real=cfg.real, activation=cfg.activation)
    settings = network_settings(model, width=cfg.width, data_spec=dspec)
    run_config = cfg.model_dump(mode="json")
    distill = None
    if cfg.teacher is not None:
        from bats_cli.distill import load_teacher, recorded_sha256

        distill = load_teacher(
            cfg.teacher, student=model, settings=settings, dataset=dspec.name,
            input_shape=(dspec.in_channels, dspec.image_size, dspec.image_size),
            temperature=cfg.kd_temperature, weight=cfg.kd_weight, attention_weight=cfg.attention_weight,
            expect_sha256=recorded_sha256(meta) if resuming else None,
        )
    if preflight is not None:
        preflight_everywhere(preflight, dict(
            command="train", model=model, teacher=None if distill is None else distill.teacher, device=device, dataset=dspec.name,
            train_images=len(data.train), test_images=len(data.test),
            input_shape=(dspec.in_channels, dspec.image_size, dspec.image_size),
            num_classes=dspec.num_classes, batch_size=cfg.batch_size // dist_info.world,
            eval_batch_size=cfg.eval_batch_size or max(cfg.batch_size, 256),
            steps_per_epoch=steps_per_epoch(len(data.train), cfg.batch_size), epochs=epochs,
            precision=cfg.precision, network=network_label(settings),
        ), dist_info, device)
    run_dir = open_run_dir(out, resume, dist_info, device)
    if run_dir is not None and not resuming:
        cells = {"genotype": genotype.to_dict()} if arch == CELLS else {}
        teacher = {"teacher": distill.record()} if distill is not None else {}
        run_dir.write_config(run_config, device=device, network=settings, data=data_info(dspec, augment),
                             **cells, **teacher)
    reporter = Reporter(quiet=quiet or not dist_info.is_main)
    n_params = sum(p.numel() for p in model.parameters())
    # `bats flops` counts the inference network: without the auxiliary head (training only).
    n_infer = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("auxiliary_head."))
    reporter.line(
        f"train {name} on {dspec.name} ({len(data.train)} train / "
        + (f"{len(data.val)} held-out validation" if data.holdout else f"{len(data.test)} test")
        + f" images): {network_label(settings)}, "
        f"{'real' if cfg.real else 'binary activations, real weights'}, {n_params:,} parameters "
        + (f"({n_infer:,} without the auxiliary head, as bats flops counts), " if n_infer != n_params else "")
        + f"{epochs} epoch{'' if epochs == 1 else 's'}, batch {cfg.batch_size}"
        + (f" over {dist_info.world} processes" if dist_info.enabled else "")
        + f", device {device}" + (" (resuming)" if resuming else "")
    )
    if distill is not None:
        reporter.line(distill_line(distill))
    fit_spec = FitSpec(
        kind="train", model=model, run_config=run_config, settings=settings,
        data=data_info(dspec, augment), genotype_json=genotype.to_json() if arch == CELLS else None,
        epochs=epochs,
        batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size or max(cfg.batch_size, 256),
        lr=cfg.lr, lr_min=cfg.lr_min, betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay, aux_weight=cfg.aux_weight if settings["auxiliary"] else 0.0,
        mixup=augment.mixup, seed=cfg.seed, precision=cfg.precision,
        num_workers=cfg.num_workers, optimizer=cfg.optimizer, momentum=cfg.momentum,
        distill=distill, extra=teacher_extra(distill),
    )
    summary = fit(
        fit_spec, data.train, data.val, device=device, dist_info=dist_info, run_dir=run_dir,
        reporter=reporter, resume_from=resume_from, stop_after_steps=stop_after_steps,
        handle_signals=False, stop=stop, started=started,
    )
    result = {
        "command": "train",
        "genotype": name,
        "arch": arch,
        "dataset": dspec.name,
        "train_images": len(data.train),
        "test_images": len(data.test),
        # What final_val_* / best_val_* were measured on: "test" or "holdout" (of the training split).
        "val_split": "holdout" if data.holdout else "test",
        "val_images": len(data.val),
        "network": settings,
        "parameters": n_params,
        "parameters_without_aux": n_infer,
        "epochs": epochs,
        "steps_per_epoch": summary["steps_per_epoch"],
        "world_size": dist_info.world,
        "final_train_top1": summary["final"]["train_top1"] if summary["final"] else None,
        "final_val_top1": summary["final"]["val_top1"] if summary["final"] else None,
        "final_val_top5": summary["final"]["val_top5"] if summary["final"] else None,
        "best_val_top1": summary["best_top1"],
        "best_epoch": summary["best_epoch"],
        "seconds": summary["seconds"],
        "out": str(out),
        "last": str(out / "last.safetensors"),
        "best": str(out / "best.safetensors"),
    }
    if distill is not None:
        result["teacher"] = distill.record()
    if run_dir is not None:
        run_dir.write_json("result.json", result)
    return result


__all__ = [
    "DEFAULT_DATASET",
    "FitSpec",
    "PAPER_EPOCHS",
    "TRAIN_PRESETS",
    "TRAIN_RESUME_IGNORED",
    "TrainConfig",
    "check_arch_options",
    "TrainJob",
    "fit",
    "resolve_augment",
    "train",
]
