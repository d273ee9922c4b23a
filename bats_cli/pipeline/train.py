"""Step 1 of the two-step strategy (§4.3, footnote 4): train a genotype's network from scratch.

Binary activations and real weights by default (``real=True``: everything real-valued); the
paper's recipe (§6.2) is the default configuration: Adam (lr 1e-3, β = (0.9, 0.999), no weight
decay), cosine learning-rate decay, 600 epochs on CIFAR-sized data and 75 on ImageNet-sized data,
batch 256, auxiliary tower with weight 0.4, drop-path 0, Cutout 16 px on CIFAR-10 and MixUp 0.2 on
CIFAR-100.

Training itself is :func:`bats_cli.training.fit.fit` (shared with ``bats binarize``'s fine-tuning, step 2):
deterministic given the seed, resumable mid-epoch, interruptible (SIGINT / SIGTERM save
``last.safetensors`` and exit 130) and data-parallel under ``torchrun``; only rank 0 logs and
writes files. This module holds the configuration and the set-up of a ``bats train`` run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from bats_cli.core.config import (
    MAX_BATCH,
    MAX_DECAY,
    MAX_EPOCHS,
    MAX_IMAGE_SIZE,
    MAX_LR,
    Beta,
    Images,
    RunPlacement,
    Seed,
)
from bats_cli.core.errors import UserInputError
from bats_cli.core.presets import train_presets
from bats_cli.data.loader import check_batch, steps_per_epoch
from bats_cli.models.modelio import data_info, genotype_differs, genotype_name, network_label, network_settings
from bats_cli.training.fit import (
    DISTILL_DEFAULTS,
    DistillSettings,
    FitSpec,
    distill_line,
    eval_batch_size,
    fit,
    teacher_extra,
)
from bats_cli.training.longrun import begin, load_data, resume_config
from bats_cli.training.runloop import default_run_dir, interrupt_guarded, restores_threads
from bats_cli.utils.preflight import MAX_CHANNELS, MAX_LAYERS

# --------------------------------------------------------------------------- configuration

# §6.2: 600 epochs on CIFAR-10/100, 75 on ImageNet; keyed by network family.
PAPER_EPOCHS = {"cifar": 600, "imagenet": 75}
# The paper's data (§6.2); --preset tiny uses the embedded fashion-mini instead.
DEFAULT_DATASET = "cifar10"



class TrainConfig(RunPlacement, DistillSettings):
    """Everything ``bats train`` needs; defaults are the paper's (§6.2). Where it runs
    (device, precision, workers, threads) and its teacher come from the two bases."""

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
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0, le=MAX_DECAY)
    aux_weight: float = Field(0.4, ge=0, le=100)
    drop_path: float = Field(0.0, ge=0, lt=1)
    # augmentation: None = the paper's default for the data set; 0 = off
    cutout: Optional[int] = Field(None, ge=0, le=MAX_IMAGE_SIZE)
    mixup: Optional[float] = Field(None, ge=0, le=1000)
    autoaugment: bool = False
    seed: Seed = 0

    @model_validator(mode="after")
    def _optimizer_lr(self) -> "TrainConfig":
        if self.lr is None:
            # Assignment re-validates; the default follows the optimizer chosen.
            self.lr = 0.1 if self.optimizer == "sgd" else 1e-3
        return self


def check_arch_options(cfg: TrainConfig, arch: str) -> None:
    """UserInputError when a setting of another model is changed for ``arch`` (say, --layers for resnet18)."""
    from bats_cli.models.registry import check_options

    check_options(arch, cfg.model_dump(), {k: f.default for k, f in TrainConfig.model_fields.items()})


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



# --------------------------------------------------------------------------- bats train


@restores_threads
@interrupt_guarded
def train(
    cfg: TrainConfig,
    *,
    genotype,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    stop_after_steps: int | None = None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    preflight=None,
    stop=None,
    started: float | None = None,
) -> dict[str, Any]:
    """Run ``bats train``: returns the JSON-ready result (rank 0's is the one to print).

    ``genotype``: a :class:`~bats_cli.core.genotype.Genotype`, or a fixed model's name (``resnet18``,
    see :func:`bats_cli.core.zoo.resolve_network`). With ``resume`` and an existing
    ``<out>/last.safetensors`` the saved config is used; ``preset``
    and ``overrides`` (the flags given) must then agree with it. ``preflight(**plan)`` (see
    :func:`bats_cli.training.plan.make_preflight`) runs before the run directory is created.
    ``handle_signals=False``: no SIGINT/SIGTERM handlers (tests).
    """
    from bats_cli.data import build_datasets, describe_spec
    from bats_cli.models.registry import accepted, arch_for, check_same_model, create_model, get_model
    from bats_cli.utils.runtime import seed_everything

    arch = arch_for(genotype)
    model_entry = get_model(arch)
    name = genotype.name if model_entry.genotype else arch
    check_arch_options(cfg, arch)
    run = begin("train", out=out, resume=resume, default=lambda: default_run_dir("train", name),
                device=cfg.device, precision=cfg.precision)
    out, dist_info, device, meta = run.out, run.dist_info, run.device, run.meta
    resuming = run.resuming
    if resuming:
        check_same_model(meta.config.get("network") or {}, arch, out)
        if model_entry.genotype and meta.genotype_json is not None and genotype_differs(meta.genotype_json, genotype):
            raise UserInputError(
                f"cannot resume: the genotype differs from the one {out} was trained with "
                f"({genotype_name(meta.genotype_json)!r}); give the same GENOTYPE or another --out"
            )
        saved = meta.config.get("run", {})
        given = saved.get("genotype", cfg.genotype) if isinstance(saved, dict) else cfg.genotype
        cfg = resume_config(TrainConfig, saved, preset=preset, presets=train_presets(arch),
                            overrides={**(overrides or {}), "genotype": given}, defaults=DISTILL_DEFAULTS)
    run.settle(precision=cfg.precision, threads=cfg.threads, seed=cfg.seed)

    # Everything that can be refused is checked before the run directory is created.

    spec0 = describe_spec(cfg.dataset, cfg.data_dir, cfg.image_size)
    augment = resolve_augment(cfg, spec0.name)
    data = load_data(lambda download: build_datasets(
        cfg.dataset, data_dir=cfg.data_dir, download=download, subset=cfg.subset, image_size=cfg.image_size,
        augment=augment, seed=cfg.seed, holdout=cfg.holdout), cfg.download, dist_info)
    dspec = data.spec
    epochs = cfg.epochs or PAPER_EPOCHS[dspec.network]
    cfg = cfg.model_copy(update={"epochs": epochs, "cutout": augment.cutout or 0,
                                 "mixup": augment.mixup or 0.0})
    check_batch(len(data.train), cfg.batch_size, dist_info)

    seed_everything(cfg.seed)
    model = create_model(arch, genotype if model_entry.genotype else None, kind=dspec.network,
                         num_classes=dspec.num_classes, in_channels=dspec.in_channels,
                         **accepted(arch, cfg.model_dump()))
    settings = network_settings(model, width=cfg.width, data_spec=dspec)
    run_config = cfg.model_dump(mode="json")
    distill = None
    if cfg.teacher is not None:
        from bats_cli.training.distill import load_teacher, recorded_sha256

        distill = load_teacher(
            cfg.teacher, student=model, settings=settings, dataset=dspec.name,
            input_shape=(dspec.in_channels, dspec.image_size, dspec.image_size),
            temperature=cfg.kd_temperature, weight=cfg.kd_weight, attention_weight=cfg.attention_weight,
            expect_sha256=recorded_sha256(meta) if resuming else None,
        )
    run_dir, reporter = run.open(preflight, dict(
        command="train", model=model, teacher=None if distill is None else distill.teacher, device=device, dataset=dspec.name,
        train_images=len(data.train), test_images=len(data.test),
        input_shape=(dspec.in_channels, dspec.image_size, dspec.image_size),
        num_classes=dspec.num_classes, batch_size=cfg.batch_size // dist_info.world,
        eval_batch_size=eval_batch_size(cfg.eval_batch_size, cfg.batch_size),
        steps_per_epoch=steps_per_epoch(len(data.train), cfg.batch_size), epochs=epochs,
        precision=cfg.precision, network=network_label(settings),
    ), quiet=quiet)
    if run_dir is not None and not resuming:
        cells = {"genotype": genotype.to_dict()} if model_entry.genotype else {}
        teacher = {"teacher": distill.record()} if distill is not None else {}
        run_dir.write_config(run_config, device=device, network=settings, data=data_info(dspec, augment),
                             **cells, **teacher)
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
        data=data_info(dspec, augment), genotype_json=genotype.to_json() if model_entry.genotype else None,
        epochs=epochs,
        batch_size=cfg.batch_size, eval_batch_size=eval_batch_size(cfg.eval_batch_size, cfg.batch_size),
        lr=cfg.lr, lr_min=cfg.lr_min, betas=cfg.betas,
        weight_decay=cfg.weight_decay, aux_weight=cfg.aux_weight if settings["auxiliary"] else 0.0,
        mixup=augment.mixup, seed=cfg.seed, precision=cfg.precision,
        num_workers=cfg.num_workers, optimizer=cfg.optimizer, momentum=cfg.momentum,
        distill=distill, extra=teacher_extra(distill),
    )
    summary = fit(
        fit_spec, data.train, data.val, device=device, dist_info=dist_info, run_dir=run_dir,
        reporter=reporter, resume_from=run.opened, stop_after_steps=stop_after_steps,
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
    "PAPER_EPOCHS",
    "TrainConfig",
    "check_arch_options",
    "resolve_augment",
    "train",
]
