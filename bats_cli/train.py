"""Step 1 of the two-step strategy (§4.3, footnote 4): train a genotype's network from scratch.

Binary activations and real weights by default (``real=True``: everything real-valued); the
paper's recipe (§6.2) is the default configuration: Adam (lr 1e-3, β = (0.9, 0.999), no weight
decay), cosine learning-rate decay, 600 epochs on CIFAR-sized data and 75 on ImageNet-sized data,
batch 256, auxiliary tower with weight 0.4, drop-path 0, Cutout 16 px on CIFAR-10 and MixUp 0.2 on
CIFAR-100.

The training engine (:func:`fit`) is shared with ``bats binarize``'s fine-tuning (step 2). It is

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
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bats_cli.config import RESUME_IGNORED_KEYS, RunConfig
from bats_cli.errors import Interrupted, RunFailure, UserInputError

# --------------------------------------------------------------------------- configuration

# §6.2: 600 epochs on CIFAR-10/100, 75 on ImageNet; keyed by network family.
PAPER_EPOCHS = {"cifar": 600, "imagenet": 75}
DEFAULT_DATASET = "fashion-mini"


class TrainConfig(RunConfig):
    """Everything ``bats train`` needs; defaults are the paper's (§6.2)."""

    genotype: str = Field(description="Genotype name or path as given (informational).")
    # data
    dataset: str = DEFAULT_DATASET
    data_dir: Optional[str] = None
    download: bool = False
    subset: Optional[int] = Field(None, ge=1)
    image_size: Optional[int] = Field(None, ge=8)
    # network
    width: str = "1x"
    layers: Optional[int] = Field(None, ge=3)
    channels: Optional[int] = Field(None, ge=1)
    real: bool = False
    activation: Literal["prelu", "relu", "none"] = "prelu"
    group_policy: Literal["groups", "channels"] = "groups"
    channels_per_group: Optional[int] = Field(None, ge=1)
    reduce_shortcut: Literal["avgpool", "factorized"] = "avgpool"
    auxiliary: bool = True
    # optimisation
    epochs: Optional[int] = Field(None, ge=1, description="None: 600 (CIFAR-sized), 75 (ImageNet)")
    batch_size: int = Field(256, ge=1)
    eval_batch_size: Optional[int] = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_min: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    aux_weight: float = Field(0.4, ge=0)
    drop_path: float = Field(0.0, ge=0, lt=1)
    # augmentation: None = the paper's default for the data set; 0 = off
    cutout: Optional[int] = Field(None, ge=0)
    mixup: Optional[float] = Field(None, ge=0)
    autoaugment: bool = False
    # run
    seed: int = Field(0, ge=0)
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_workers: int = Field(0, ge=0)
    threads: Optional[int] = Field(None, ge=1, description="CPU threads; None: torch's default")


# Settings that may differ when a run is resumed: where and how it runs, not what it trains.
TRAIN_RESUME_IGNORED = RESUME_IGNORED_KEYS | {"threads"}

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe is the default; "paper" only names it.
    "paper": {},
    # About a minute on a CPU: the smallest network (3 cells, 6 channels), 2 epochs of at most
    # 2,500 images (all of fashion-mini), lr 2e-3 (measured: 53.8 % top-1 vs 44.4 % at 1e-3).
    # One thread: tiny tensors gain nothing from more, and lose a lot on a busy shared CPU.
    "tiny": {"layers": 3, "channels": 6, "epochs": 2, "batch_size": 32, "subset": 2500,
             "lr": 2e-3, "threads": 1},
}


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


# --------------------------------------------------------------------------- network settings

NETWORK_KEYS = (
    "kind", "num_classes", "in_channels", "channels", "layers", "width", "activation",
    "channels_per_group", "group_policy", "reduce_shortcut", "stem_groups", "auxiliary",
    "drop_path", "binary_activations", "binary_weights", "space",
)


def network_settings(model: nn.Module, *, width: str = "1x", data_spec=None) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` with :func:`build_from_settings` (JSON-ready).

    With ``data_spec`` the data set's name and image size are added (``bats flops`` reads them
    to count a checkpoint's network at its input size).
    """
    cfg, ctx = model.config, model.ctx
    extra = {}
    if data_spec is not None:
        extra = {"dataset": data_spec.name, "image_size": data_spec.image_size}
    return {
        **extra,
        "real": ctx.spec.real,
        "kind": cfg.kind,
        "num_classes": cfg.num_classes,
        "in_channels": cfg.in_channels,
        "channels": cfg.channels,
        "layers": cfg.layers,
        "width": width,  # informational: ``channels`` is what the width resolved to
        "activation": ctx.activation,
        "channels_per_group": ctx.channels_per_group,
        "group_policy": ctx.group_policy,
        "reduce_shortcut": ctx.reduce_shortcut,
        "stem_groups": cfg.stem_groups,
        "auxiliary": cfg.auxiliary,
        "drop_path": cfg.drop_path,
        "binary_activations": ctx.spec.activations,
        "binary_weights": ctx.spec.weights,
        "space": ctx.space,
    }


def build_from_settings(genotype, settings: Mapping[str, Any], **changes: Any) -> nn.Module:
    """The network described by ``settings`` (see :func:`network_settings`), with ``changes``."""
    from bats_cli.networks import build_network
    from bats_cli.quant import BinarySpec

    s = {**settings, **changes}
    missing = [k for k in NETWORK_KEYS if k not in s and k not in ("width", "space")]
    if missing:
        raise UserInputError(f"checkpoint lacks network settings: {', '.join(missing)}")
    spec = BinarySpec(activations=bool(s["binary_activations"]), weights=bool(s["binary_weights"]))
    return build_network(
        genotype,
        kind=s["kind"],
        num_classes=int(s["num_classes"]),
        in_channels=int(s["in_channels"]),
        channels=int(s["channels"]),
        layers=int(s["layers"]),
        spec=spec,
        auxiliary=bool(s["auxiliary"]),
        drop_path=float(s["drop_path"]),
        activation=s["activation"],
        channels_per_group=int(s["channels_per_group"]),
        group_policy=s["group_policy"],
        reduce_shortcut=s["reduce_shortcut"],
        stem_groups=int(s["stem_groups"]),
    )


def data_info(spec, augment) -> dict[str, Any]:
    """The data spec (and augmentation) as recorded in checkpoints."""
    return {
        "name": spec.name,
        "num_classes": spec.num_classes,
        "image_size": spec.image_size,
        "in_channels": spec.in_channels,
        "network": spec.network,
        "augment": asdict(augment) if augment is not None else None,
    }


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}


def load_model_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load ``model.*`` tensors strictly; a mismatch is one line naming the checkpoint."""
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(
                f"{len(wrong)} with another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                f"{tuple(own[k].shape)} in the network)"
            )
        raise UserInputError(
            f"{path}: weights do not match the network its genotype and settings describe: "
            + "; ".join(detail)
        )
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes (env vars) when WORLD_SIZE > 1.

    Backend: NCCL on CUDA, gloo on CPU. Already-initialised groups are reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def init_run_device(device_name: str, precision: str) -> tuple[Dist, torch.device]:
    """:func:`init_distributed`, then this process's device (its own GPU under torchrun), precision checked."""
    from bats_cli.runtime import check_precision, select_device

    dist_info = init_distributed(device_name)
    device = select_device(device_name)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    check_precision(device, precision)
    return dist_info, device


def _all_sum(values: list[float], dist_info: Dist, device: torch.device) -> list[float]:
    if not dist_info.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _broadcast_buffers(model: nn.Module, dist_info: Dist) -> None:
    """Rank 0's BatchNorm statistics everywhere (each rank updated its own in the last step)."""
    if not dist_info.enabled:
        return
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, 0)


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _agree(ok: bool, dist_info: Dist, device: torch.device) -> bool:
    """True on every rank only if ``ok`` is true on every rank."""
    if not dist_info.enabled:
        return ok
    return _all_sum([0.0 if ok else 1.0], dist_info, device)[0] == 0


# --------------------------------------------------------------------------- data loading


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps per epoch: full global batches only (the incomplete last one is dropped,
    a different remainder every epoch since the order is reshuffled)."""
    if n_train < batch_size:
        raise UserInputError(
            f"--batch-size {batch_size} is larger than the {n_train} training images; "
            "use a smaller --batch-size (or a larger --subset)"
        )
    return n_train // batch_size


class _Batches(torch.utils.data.Sampler):
    """Index lists of one epoch: step ``s`` of rank ``r`` is its slice of global batch ``s``."""

    def __init__(self, order: list[int], *, batch: int, world: int, rank: int, start: int, stop: int):
        self.order, self.batch, self.world, self.rank = order, batch, world, rank
        self.start, self.stop = start, stop
        self.per_rank = batch // world

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            lo = step * self.batch + self.rank * self.per_rank
            yield self.order[lo : lo + self.per_rank]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def train_loader(dataset, *, batch_size: int, seed: int, epoch: int, skip: int, dist_info: Dist,
                 num_workers: int = 0, pin_memory: bool = False):
    """Deterministic epoch loader (same order and augmentation as ``bats_cli.data.make_loader``),
    sharded like DistributedSampler with ``set_epoch``: the union of the ranks' step-``s``
    batches is the single-process step-``s`` batch."""
    from bats_cli.data import SeededView, derive_seed, epoch_order

    if batch_size % dist_info.world:
        raise UserInputError(
            f"--batch-size {batch_size} must be divisible by the number of processes "
            f"({dist_info.world})"
        )
    order = epoch_order(len(dataset), shuffle=True, seed=seed, epoch=epoch)
    sampler = _Batches(order, batch=batch_size, world=dist_info.world, rank=dist_info.rank,
                       start=skip, stop=steps_per_epoch(len(dataset), batch_size))
    return torch.utils.data.DataLoader(
        SeededView(dataset, seed=seed, epoch=epoch),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Worker seeds come from here, not the global RNG (augmentation is seeded per sample).
        generator=torch.Generator().manual_seed(derive_seed(2, seed, epoch)),
    )


# --------------------------------------------------------------------------- schedule / loss


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    """Cosine decay from ``lr`` at step 0 towards ``lr_min`` at ``total`` (updated every step)."""
    if total <= 0:
        return lr
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * min(step, total) / total))


def _loss(output, target: torch.Tensor, aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): cross-entropy (soft targets after MixUp) plus the weighted auxiliary loss."""
    if isinstance(output, tuple):
        logits, aux = output
        loss = F.cross_entropy(logits.float(), target)
        if aux_weight > 0:
            loss = loss + aux_weight * F.cross_entropy(aux.float(), target)
        return loss, logits
    return F.cross_entropy(output.float(), target), output


# --------------------------------------------------------------------------- the engine


@dataclass
class FitState:
    """Where a run stands: completed epochs, steps taken in the current one, running sums."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    best_top1: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def running_json(self) -> str:
        return json.dumps({"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                           "best_top1": self.best_top1, "best_epoch": self.best_epoch})


@dataclass
class FitSpec:
    """What :func:`fit` trains and how it records it."""

    kind: str  # checkpoint kind: "train" or "binarize"
    model: nn.Module
    run_config: dict[str, Any]
    settings: dict[str, Any]
    data: dict[str, Any]
    genotype_json: str
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
    # extra metadata stored in every checkpoint of this run (e.g. binarize's pre-fine-tune numbers)
    extra: dict[str, str] = field(default_factory=dict)


@contextmanager
def _maybe(cm):
    if cm is None:
        yield None
    else:
        with cm as value:
            yield value


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
) -> dict[str, Any]:
    """Train ``spec.model`` and return a summary; writes ``last`` / ``best`` / ``metrics.csv``.

    ``stop``: a :class:`~bats_cli.runtime.GracefulInterrupt` already entered by the caller (so a
    signal during set-up counts too); without one, ``handle_signals`` installs its own.
    ``stop_after_steps`` simulates a Ctrl-C after that many optimizer steps of this call (tests).
    """
    from bats_cli.checkpoint import (
        load_checkpoint,
        load_optimizer_state,
        optimizer_state_tensors,
        save_checkpoint,
        state_from_json,
        state_to_json,
    )
    from bats_cli.data import batch_seed, mixup as make_mixup
    from bats_cli.evaluate import evaluate_model
    from bats_cli.runtime import (
        GracefulInterrupt,
        Reporter,
        autocast,
        make_grad_scaler,
        memory_format,
        restore_rng_state,
        rng_state_tensors,
    )

    reporter = reporter or Reporter(quiet=True)
    model = spec.model.to(device)
    fmt = memory_format(device, model, precision=spec.precision)
    model = model.to(memory_format=fmt)
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(
        params.values(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
    )
    scaler = make_grad_scaler(device, spec.precision)
    state = FitState()
    spe = steps_per_epoch(len(train_set), spec.batch_size)
    total_steps = spe * spec.epochs

    if resume_from is not None:
        tensors, meta = load_checkpoint(resume_from, expect_kind=spec.kind, command=spec.kind)
        load_model_tensors(model, tensors, resume_from)
        model.to(memory_format=fmt)
        try:
            load_optimizer_state(optimizer, params, tensors, meta.extra["bats_optimizer"])
            running = json.loads(meta.extra.get("bats_running", "{}"))
        except KeyError:
            raise UserInputError(f"cannot resume from {resume_from}: it holds no optimizer state") from None
        restore_rng_state(tensors)
        if "bats_scaler" in meta.extra:
            scaler.load_state_dict(state_from_json(meta.extra["bats_scaler"]))
        state = FitState(epoch=meta.epoch, step=meta.step, **running)
        if state.step > spe:
            raise UserInputError(f"cannot resume: {resume_from} is at step {state.step} of an "
                                 f"epoch of {spe} steps (different data or batch size)")
        del tensors
        if run_dir is not None:
            # A crash between writing a metrics row and saving last.safetensors leaves a row
            # the resumed run will write again.
            run_dir.resumed_at(state.epoch)

    ddp = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)

    mix = make_mixup(spec.mixup, num_classes=spec.settings["num_classes"]) if spec.mixup else None
    started = time.perf_counter()

    def save(path: Path, *, with_state: bool) -> Path:
        tensors = model_tensors(model)
        extra = {**spec.extra, "bats_running": state.running_json()}
        if with_state:
            opt_tensors, opt_json = optimizer_state_tensors(optimizer, params)
            tensors.update(opt_tensors)
            tensors.update(rng_state_tensors())
            extra["bats_optimizer"] = opt_json
            extra["bats_scaler"] = state_to_json(scaler.state_dict())
        return save_checkpoint(
            path, tensors, kind=spec.kind,
            config={"run": spec.run_config, "network": spec.settings, "data": spec.data},
            epoch=state.epoch, step=state.step, genotype_json=spec.genotype_json, extra=extra,
        )

    def save_last() -> Path | None:
        _broadcast_buffers(model, dist_info)
        if dist_info.is_main and run_dir is not None:
            return save(run_dir.last, with_state=True)
        return None

    steps_this_call = 0
    own = GracefulInterrupt() if handle_signals and stop is None else None
    with _maybe(own) as own_stop:
        stop = stop if stop is not None else own_stop
        if stop is None and stop_after_steps is not None:
            stop = GracefulInterrupt()  # a flag only (not entered: no handlers installed)
        while state.epoch < spec.epochs:
            epoch = state.epoch
            loader = train_loader(
                train_set, batch_size=spec.batch_size, seed=spec.seed, epoch=epoch,
                skip=state.step, dist_info=dist_info, num_workers=spec.num_workers,
                pin_memory=device.type == "cuda",
            )
            ddp.train()
            with reporter.epoch(f"epoch {epoch + 1}/{spec.epochs}", spe) as bar:
                if state.step:
                    bar.update(state.step)
                for x, y in loader:
                    lr = cosine_lr(epoch * spe + state.step, total_steps, spec.lr, spec.lr_min)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
                    y = y.to(device, non_blocking=True)
                    target = y
                    if mix is not None:
                        x, target = mix(x, y, seed=batch_seed(spec.seed, epoch, state.step))
                    with autocast(device, spec.precision):
                        output = ddp(x)
                    loss, logits = _loss(output, target, spec.aux_weight)
                    if not torch.isfinite(loss):
                        raise RunFailure(
                            f"training diverged: loss is {loss.item()} at epoch {epoch + 1}, "
                            f"step {state.step + 1}; try a lower --lr"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    n = y.shape[0]
                    state.loss_sum += loss.item() * n
                    state.correct += (logits.argmax(1) == y).sum().item()
                    state.seen += n
                    state.step += 1
                    steps_this_call += 1
                    bar.update(1, loss=state.loss_sum / state.seen, lr=lr)
                    requested = False
                    if stop is not None:
                        if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                            stop.requested, stop.signal_name = True, stop.signal_name or "SIGINT"
                        requested = stop.requested
                    if not _agree(not requested, dist_info, device):
                        if stop is not None and not stop.requested:
                            stop.requested, stop.signal_name = True, "SIGTERM (another rank)"
                        _raise_interrupt(stop, save_last, dist_info)

                loss_sum, correct, seen = _all_sum(
                    [state.loss_sum, state.correct, state.seen], dist_info, device
                )
                _broadcast_buffers(model, dist_info)
                val = evaluate_model(
                    model, test_set, batch_size=spec.eval_batch_size, device=device,
                    precision=spec.precision, dist_info=dist_info, num_workers=spec.num_workers,
                )
                row = {
                    "epoch": epoch + 1,
                    "train_loss": loss_sum / max(seen, 1),
                    "train_top1": 100.0 * correct / max(seen, 1),
                    "val_loss": val["loss"],
                    "val_top1": val["top1"],
                    "val_top5": val["top5"],
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": round(time.perf_counter() - started, 1),
                }
                bar.set(train_top1=row["train_top1"], val_top1=row["val_top1"])
            state.history.append(row)
            state.epoch, state.step = epoch + 1, 0
            state.loss_sum = state.correct = state.seen = 0.0
            improved = row["val_top1"] > state.best_top1
            if improved:
                state.best_top1, state.best_epoch = row["val_top1"], epoch + 1
            if dist_info.is_main and run_dir is not None:
                run_dir.append_metrics(row)
                if improved:
                    save(run_dir.best, with_state=False)
                save(run_dir.last, with_state=True)
            if not _agree(not (stop is not None and stop.requested), dist_info, device):
                _raise_interrupt(stop, save_last, dist_info)
    if not state.history and run_dir is not None:
        # Resuming a finished run: report what its metrics.csv recorded.
        state.history = [_row_numbers(r) for r in run_dir.metrics.read()]
    last = state.history[-1] if state.history else None
    return {
        "epochs": spec.epochs,
        "steps_per_epoch": spe,
        "final": last,
        "best_top1": state.best_top1 if state.best_top1 >= 0 else None,
        "best_epoch": state.best_epoch or None,
        "seconds": round(time.perf_counter() - started, 1),
        "history": state.history,
    }


def _row_numbers(row: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        try:
            out[k] = int(v) if k == "epoch" else float(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def _raise_interrupt(stop, save_last: Callable[[], Path | None], dist_info: Dist) -> None:
    saved = save_last()
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()
    where = f"; checkpoint saved to {saved}; continue with --resume" if saved else ""
    name = getattr(stop, "signal_name", None) or "a signal"
    raise Interrupted(f"interrupted by {name}{where}")


# --------------------------------------------------------------------------- bats train


def restores_threads(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: torch's thread count is restored when ``fn`` returns (``--threads``)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when asked (torchrun already sets OMP_NUM_THREADS=1 per rank)."""
    if threads is not None:
        torch.set_num_threads(threads)


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse an --out that RunDir would refuse, before any work is done."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file, not a directory")
    if not resume and out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise UserInputError(
            f"{out} already holds a run; use --resume to continue it or choose another --out"
        )


def check_batch(n_train: int, batch_size: int, dist_info: Dist) -> None:
    steps_per_epoch(n_train, batch_size)
    if batch_size % dist_info.world:
        raise UserInputError(
            f"--batch-size {batch_size} must be divisible by the number of processes "
            f"({dist_info.world})"
        )


def open_run_dir(out: Path, resume: bool, dist_info: Dist, device: torch.device):
    """RunDir on rank 0 (None elsewhere); every rank fails if rank 0 cannot open it."""
    from bats_cli.runtime import RunDir

    run_dir, error = None, None
    if dist_info.is_main:
        try:
            run_dir = RunDir(out, resume=resume)
        except UserInputError as exc:
            error = exc
    if not _agree(error is None, dist_info, device):
        raise error or RunFailure("rank 0 could not open the run directory")
    return run_dir


def default_run_dir(prefix: str, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{prefix}-{name}-{stamp}"


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
) -> dict[str, Any]:
    """Run ``bats train``: returns the JSON-ready result (rank 0's is the one to print).

    With ``resume`` and an existing ``<out>/last.safetensors`` the saved config is used; ``preset``
    and ``overrides`` (the flags given) must then agree with it.
    """
    from bats_cli.runtime import GracefulInterrupt

    # Installed first, so that a signal during set-up stops the run too (after one step).
    with _maybe(GracefulInterrupt() if handle_signals else None) as stop:
        return _train(cfg, genotype=genotype, out=out, resume=resume, quiet=quiet,
                      stop_after_steps=stop_after_steps, preset=preset, overrides=overrides,
                      stop=stop)


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
) -> dict[str, Any]:
    """Run ``bats train``: returns the JSON-ready result (rank 0's is the one to print).

    With ``resume`` and an existing ``<out>/last.safetensors`` the saved config is used; ``preset``
    and ``overrides`` (the flags given) must then agree with it.
    """
    from bats_cli.config import resolve_resume_config
    from bats_cli.data import build_datasets
    from bats_cli.runtime import Reporter, seed_everything

    dist_info, device = init_run_device(cfg.device, cfg.precision)
    if resume and out is None:
        raise UserInputError("--resume needs --out: the run directory to continue")
    out = Path(out) if out is not None else default_run_dir("train", genotype.name)

    check_out_dir(out, resume)
    resume_from = out / "last.safetensors" if resume and (out / "last.safetensors").exists() else None
    resuming = resume_from is not None
    if resuming:
        from bats_cli.checkpoint import check_kind, read_metadata

        meta = read_metadata(resume_from)
        check_kind(meta, "train", "train --resume")
        if meta.genotype_json is not None and _genotype_differs(meta.genotype_json, genotype):
            raise UserInputError(
                f"cannot resume: the genotype differs from the one {out} was trained with "
                f"({_genotype_name(meta.genotype_json)!r}); give the same GENOTYPE or another --out"
            )
        saved = meta.config.get("run", {})
        cfg = resolve_resume_config(
            TrainConfig, saved, preset=preset, presets=TRAIN_PRESETS,
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
    wait_for_download = cfg.download and dist_info.enabled
    if wait_for_download and not dist_info.is_main:
        _barrier()
    data = build_datasets(
        cfg.dataset, data_dir=cfg.data_dir, download=cfg.download and dist_info.is_main,
        subset=cfg.subset, image_size=cfg.image_size, augment=augment, seed=cfg.seed,
    )
    if wait_for_download and dist_info.is_main:
        _barrier()
    dspec = data.spec
    epochs = cfg.epochs or PAPER_EPOCHS[dspec.network]
    cfg = cfg.model_copy(update={"epochs": epochs, "cutout": augment.cutout or 0,
                                 "mixup": augment.mixup or 0.0})
    check_batch(len(data.train), cfg.batch_size, dist_info)

    from bats_cli.networks import build_network

    seed_everything(cfg.seed)
    model = build_network(
        genotype, kind=dspec.network, num_classes=dspec.num_classes,
        in_channels=dspec.in_channels, width=cfg.width, layers=cfg.layers,
        channels=cfg.channels, real=cfg.real, auxiliary=cfg.auxiliary, drop_path=cfg.drop_path,
        activation=cfg.activation, channels_per_group=cfg.channels_per_group,
        group_policy=cfg.group_policy, reduce_shortcut=cfg.reduce_shortcut,
    )
    settings = network_settings(model, width=cfg.width, data_spec=dspec)
    run_config = cfg.model_dump(mode="json")
    run_dir = open_run_dir(out, resume, dist_info, device)
    if run_dir is not None and not resuming:
        run_dir.write_config(run_config, network=settings, data=data_info(dspec, augment),
                             genotype=genotype.to_dict())
    reporter = Reporter(quiet=quiet or not dist_info.is_main)
    n_params = sum(p.numel() for p in model.parameters())
    reporter.line(
        f"train {genotype.name} on {dspec.name} ({len(data.train)} train / {len(data.test)} test "
        f"images): {settings['layers']} cells, C={settings['channels']}, "
        f"{'real' if cfg.real else 'binary activations, real weights'}, {n_params:,} parameters, "
        f"{epochs} epochs, batch {cfg.batch_size}"
        + (f" over {dist_info.world} processes" if dist_info.enabled else "")
        + f", device {device}" + (" (resuming)" if resuming else "")
    )
    fit_spec = FitSpec(
        kind="train", model=model, run_config=run_config, settings=settings,
        data=data_info(dspec, augment), genotype_json=genotype.to_json(), epochs=epochs,
        batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size or max(cfg.batch_size, 256),
        lr=cfg.lr, lr_min=cfg.lr_min, betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay, aux_weight=cfg.aux_weight if cfg.auxiliary else 0.0,
        mixup=augment.mixup, seed=cfg.seed, precision=cfg.precision,
        num_workers=cfg.num_workers,
    )
    summary = fit(
        fit_spec, data.train, data.test, device=device, dist_info=dist_info, run_dir=run_dir,
        reporter=reporter, resume_from=resume_from, stop_after_steps=stop_after_steps,
        handle_signals=False, stop=stop,
    )
    result = {
        "command": "train",
        "genotype": genotype.name,
        "dataset": dspec.name,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "network": settings,
        "parameters": n_params,
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
    if run_dir is not None:
        run_dir.write_json("result.json", result)
    return result


def _genotype_name(text: str) -> str:
    try:
        return json.loads(text).get("name", "?")
    except ValueError:
        return "?"


def _genotype_differs(saved_json: str, genotype) -> bool:
    try:
        saved = json.loads(saved_json)
    except ValueError:
        return True
    keys = ("space", "normal", "normal_concat", "reduce", "reduce_concat")
    now = genotype.to_dict()
    return any(json.dumps(saved.get(k)) != json.dumps(now.get(k)) for k in keys)


def load_genotype_from_meta(meta) -> Any:
    """The genotype recorded in a checkpoint's metadata."""
    from bats_cli.genotype import Genotype

    if not meta.genotype_json:
        raise UserInputError(f"{meta.path}: the checkpoint records no genotype")
    return Genotype.from_json(meta.genotype_json, origin=f"{meta.path} (genotype metadata)")


__all__ = [
    "DEFAULT_DATASET",
    "Dist",
    "FitSpec",
    "PAPER_EPOCHS",
    "TRAIN_PRESETS",
    "TrainConfig",
    "build_from_settings",
    "cosine_lr",
    "data_info",
    "fit",
    "init_distributed",
    "init_run_device",
    "load_genotype_from_meta",
    "load_model_tensors",
    "network_settings",
    "resolve_augment",
    "train",
    "train_loader",
]
