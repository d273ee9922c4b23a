"""Step 2 of the two-step strategy (§4.3, footnote 4): binarize the weights of a trained network.

Every binary conv's weight becomes ``sign(W)`` with ``mean|W|`` (per output channel) folded
into its learned scale α (``QuantConv2d.binarize_weights_``), so the first forward pass stays close
to the real-weight one. BatchNorm statistics are then re-estimated on a few training batches
(the binary weights shift every layer's output distribution a little), and the network is
optionally fine-tuned with binary weights and activations (latent real weights, straight-through
estimator) for a few epochs with the same engine as ``bats train``.

Outputs in the run directory: ``last.safetensors`` / ``best.safetensors`` (kind ``binarize``),
``metrics.csv``, ``config.json``, ``result.json`` and the packed 1-bit artifact
(``model.packed.safetensors`` unless ``-o FILE`` says otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from bats_cli.core.config import (
    DEFAULT_BETAS,
    MAX_BATCH,
    MAX_CALIBRATION_BATCHES,
    MAX_EPOCHS,
    MAX_LR,
    Images,
    RunPlacement,
    Seed,
    current_keys,
)
from bats_cli.core.errors import UserInputError
from bats_cli.core.presets import BINARIZE_PRESETS
from bats_cli.training.fit import (
    DISTILL_DEFAULTS,
    DistillSettings,
    FitSpec,
    TrainJob,
    distill_line,
    eval_batch_size,
    fit,
    teacher_extra,
)
from bats_cli.training.longrun import begin, resume_config
from bats_cli.training.runloop import RunLoop, interrupt_guarded, restores_threads

# Fine-tuning budget: a share of the training run's epochs (the paper gives none; the first
# author's code treats step 2 as a full training stage). Measured (docs/pipeline.md):
# after `train --preset cpu` (4 epochs, 40.65 % top-1) binarizing gives 27.35 % with BatchNorm
# re-estimated; fine-tuning 1 epoch (1/4 of step 1) recovers 37.90 %, 2 epochs (1/2) 40.75 %,
# i.e. all of step 1. So the default is half of step 1: 2 epochs after 4, 300 after the
# paper's 600. (Earlier, at lr 1e-3 after a 2-epoch step 1: 1 epoch gave 44.5 % from 44.2 %.)
FINE_TUNE_SHARE = 0.5
DEFAULT_EPOCHS = None  # None: FINE_TUNE_SHARE of the training run's epochs (at least 1)
DEFAULT_LR = None  # None: the training run's --lr
DEFAULT_CALIBRATION_BATCHES = 20
PACKED_NAME = "model.packed.safetensors"


class BinarizeConfig(RunPlacement, DistillSettings):
    """Settings of ``bats binarize``; data, batch size and seed default to the training run's.
    Distillation during fine-tuning is never implicit: real-to-binary's chain gives the step-1
    checkpoint itself as --teacher."""

    checkpoint: str
    epochs: Optional[int] = Field(DEFAULT_EPOCHS, ge=0, le=MAX_EPOCHS)
    lr: Optional[float] = Field(DEFAULT_LR, gt=0, le=MAX_LR)
    lr_min: float = Field(0.0, ge=0, le=MAX_LR)
    batch_size: Optional[int] = Field(None, ge=1, le=MAX_BATCH)
    eval_batch_size: Optional[int] = Field(None, ge=1, le=MAX_BATCH)
    calibration_batches: int = Field(DEFAULT_CALIBRATION_BATCHES, ge=0, le=MAX_CALIBRATION_BATCHES)
    seed: Optional[Seed] = None
    data_dir: Optional[str] = None
    subset: Images = None
    keep_aux: bool = False

    @model_validator(mode="after")
    def _teacher_needs_epochs(self) -> "BinarizeConfig":
        if self.teacher is not None and self.epochs == 0:
            raise ValueError("--teacher needs fine-tuning epochs (--epochs 0 binarizes without training)")
        return self


def fine_tune_epochs(train_run: Mapping[str, Any]) -> int:
    """The default fine-tuning budget: FINE_TUNE_SHARE of the training run's epochs, at least 1."""
    return max(1, round(FINE_TUNE_SHARE * int(train_run.get("epochs") or 1)))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, dataset, *, batches: int, batch_size: int, seed: int,
                        device: torch.device, precision: str = "fp32") -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` training batches.

    Cumulative averages (momentum None) over augmented training images, as in training; weights
    are untouched. Returns the number of images used.
    """
    from bats_cli.data import make_loader
    from bats_cli.utils.runtime import autocast, memory_format

    if batches <= 0:
        return 0
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    fmt = memory_format(device, model, precision=precision)
    was_training = model.training
    model.train()
    seen = 0
    try:
        # Epoch -1: an order of its own, not one of the fine-tuning epochs.
        loader = make_loader(dataset, batch_size=batch_size, shuffle=True, seed=seed, epoch=-1)
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            with autocast(device, precision):
                model(x.to(device).contiguous(memory_format=fmt))
            seen += x.shape[0]
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return seen


@restores_threads
@interrupt_guarded
def binarize(
    cfg: BinarizeConfig,
    *,
    out: str | Path | None = None,
    packed: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    stop_after_steps: int | None = None,
    preflight=None,
    stop=None,
    started: float | None = None,
) -> dict[str, Any]:
    """Run ``bats binarize`` and return its JSON-ready result (``handle_signals=False``: no
    SIGINT/SIGTERM handlers, for tests)."""
    from bats_cli.data import AugmentConfig, build_datasets
    from bats_cli.data.loader import check_batch
    from bats_cli.layers.quant import binarize_weights_
    from bats_cli.models.modelio import (
        build_from_settings,
        check_dataset,
        load_genotype_from_meta,
        load_model_tensors,
        network_name,
    )
    from bats_cli.models.pack import packed_size_report, save_packed
    from bats_cli.storage.checkpoint import check_kind, load_tensors, read_metadata
    from bats_cli.training.evaluate import evaluate_model
    from bats_cli.utils.distributed import broadcast_buffers

    src = Path(cfg.checkpoint)
    meta = read_metadata(src)  # the step-1 checkpoint's header, read once (its tensors below)
    check_kind(meta, "train", "binarize")
    settings = meta.config.get("network")
    if not isinstance(settings, dict):
        raise UserInputError(f"{src}: the checkpoint records no network settings")
    if not settings.get("binary_activations"):
        raise UserInputError(
            f"{src} is a real-valued network (trained with --real); binarize needs a network "
            "trained with binary activations (train without --real)"
        )
    genotype = load_genotype_from_meta(meta)
    train_run: dict[str, Any] = meta.config.get("run") or {}
    data_rec: dict[str, Any] = meta.config.get("data") or {}

    run = begin("binarize", out=out, resume=resume, default=lambda: src.parent / "binarize",
                device=cfg.device, precision=cfg.precision, hint=" (the run directory is set with --out)")
    out, dist_info, device, opened = run.out, run.dist_info, run.device, run.opened
    resume_from = opened[1].path if opened is not None else None
    carried: dict[str, Any] = {}
    if opened is not None:
        rmeta = opened[1]
        saved = rmeta.config.get("run", {})
        given = saved.get("checkpoint") if isinstance(saved, dict) else None
        cfg = resume_config(BinarizeConfig, saved, preset=preset, presets=BINARIZE_PRESETS,
                            overrides={**(overrides or {}), "checkpoint": given}, defaults=DISTILL_DEFAULTS)
        carried = _carried(rmeta)

    seed = cfg.seed if cfg.seed is not None else int(train_run.get("seed", 0))
    run.settle(precision=cfg.precision, threads=cfg.threads, seed=seed)
    batch_size = cfg.batch_size or int(train_run.get("batch_size", 256))
    # Fine-tuning is Adam; an SGD run's lr (0.1, Appendix B) would not suit it: Adam's 1e-3 then.
    adam_run = train_run.get("optimizer", "adam") == "adam"
    lr = cfg.lr or (float(train_run.get("lr", 1e-3)) if adam_run else 1e-3)
    epochs = cfg.epochs if cfg.epochs is not None else fine_tune_epochs(train_run)
    cfg = cfg.model_copy(update={"seed": seed, "batch_size": batch_size, "lr": lr, "epochs": epochs})
    augment = AugmentConfig(**data_rec["augment"]) if data_rec.get("augment") else None
    name = data_rec.get("name") or train_run.get("dataset")
    if name is None:
        raise UserInputError(f"{src} records no data set")
    data_dir = cfg.data_dir or train_run.get("data_dir")
    subset = cfg.subset or train_run.get("subset")
    # The training run's held-out validation images (never trained on) stay its validation set here.
    holdout = train_run.get("holdout")
    data = build_datasets(
        name, data_dir=data_dir, download=False, subset=subset,
        image_size=data_rec.get("image_size"), augment=augment, seed=seed, holdout=holdout,
    )
    check_dataset(data.spec, settings, src)
    check_batch(len(data.train), batch_size, dist_info)
    plan_model = build_from_settings(genotype, settings)
    distill = None
    if cfg.teacher is not None and cfg.epochs > 0:
        from bats_cli.training.distill import load_teacher, recorded_sha256

        distill = load_teacher(
            cfg.teacher, student=plan_model, settings=settings, dataset=data.spec.name,
            input_shape=(data.spec.in_channels, data.spec.image_size, data.spec.image_size),
            temperature=cfg.kd_temperature, weight=cfg.kd_weight, attention_weight=cfg.attention_weight,
            expect_sha256=recorded_sha256(rmeta) if resume_from is not None else None,
        )
    plan = dict(
        command="binarize", model=plan_model, device=device,
        teacher=None if distill is None else distill.teacher,
        dataset=data.spec.name, train_images=len(data.train), test_images=len(data.test),
        input_shape=(data.spec.in_channels, data.spec.image_size, data.spec.image_size),
        num_classes=data.spec.num_classes, batch_size=batch_size // dist_info.world,
        eval_batch_size=eval_batch_size(cfg.eval_batch_size, batch_size),
        steps_per_epoch=len(data.train) // batch_size, epochs=cfg.epochs, precision=cfg.precision,
        advice="binarize a smaller trained network, or use another device",
    )
    run_dir, reporter = run.open(preflight, plan, quiet=quiet)
    del plan_model, plan
    eval_bs = eval_batch_size(cfg.eval_batch_size, batch_size)
    bin_settings = {**settings, "binary_weights": True, "real": False}

    if resume_from is None:
        model = build_from_settings(genotype, settings)
        load_model_tensors(model, load_tensors(meta), src)
        model.to(device)
        step1 = evaluate_model(model, data.test, batch_size=eval_bs, device=device,
                               precision=cfg.precision, dist_info=dist_info)
        convs = binarize_weights_(model)
        if convs == 0:
            raise UserInputError(f"{src}: the network has no binary convolutions to binarize")
        # Step 1's top-1 is a reported result (the test split); the monitoring numbers below and
        # the fine-tuning's validation use `data.val` (the held-out training images with --holdout).
        no_cal = evaluate_model(model, data.val, batch_size=eval_bs, device=device,
                                precision=cfg.precision, dist_info=dist_info)
        calibrated = calibrate_batchnorm(
            model, data.train, batches=cfg.calibration_batches, batch_size=batch_size, seed=seed,
            device=device, precision=cfg.precision,
        )
        broadcast_buffers(model, dist_info)
        binarized = evaluate_model(model, data.val, batch_size=eval_bs, device=device,
                                   precision=cfg.precision, dist_info=dist_info)
        carried = {
            "step1_top1": step1["top1"], "step1_top5": step1["top5"],
            "binarized_top1_no_calibration": no_cal["top1"],
            "binarized_top1": binarized["top1"], "binarized_top5": binarized["top5"],
            "binary_convs": convs, "calibration_images": calibrated,
        }
        reporter.line(
            f"binarized the weights of {convs} convs: top-1 {step1['top1']:.2f} % (step 1) -> "
            f"{no_cal['top1']:.2f} % (binary weights) -> {binarized['top1']:.2f} % "
            f"(BatchNorm re-estimated on {calibrated} images)"
        )
    else:
        model = build_from_settings(genotype, bin_settings)
        load_model_tensors(model, opened[0], resume_from)

    run_config = cfg.model_dump(mode="json")
    # The data directory goes with the data record so `bats eval` finds it with no flags.
    data_record = {**data_rec, "name": data.spec.name,
                   "data_dir": None if data_dir is None else str(data_dir)}
    run_record = {**train_run, "data_dir": data_dir}
    if run_dir is not None and resume_from is None:
        teacher = {"teacher": distill.record()} if distill is not None else {}
        run_dir.write_config(run_config, device=device, source=str(src), network=bin_settings, data=data_record,
                             **teacher)
    aux_weight = float(train_run.get("aux_weight", 0.4)) if settings.get("auxiliary") else 0.0
    spec = FitSpec(
        kind="binarize", model=model, run_config=run_config, settings=bin_settings,
        data=data_record,
        genotype_json=meta.genotype_json or (genotype.to_json() if genotype is not None else None),
        epochs=cfg.epochs, batch_size=batch_size, eval_batch_size=eval_bs, lr=cfg.lr,
        lr_min=cfg.lr_min,
        betas=tuple(float(b) for b in current_keys(train_run).get("betas", DEFAULT_BETAS)),
        weight_decay=0.0, aux_weight=aux_weight,
        mixup=augment.mixup if augment is not None else None, seed=seed,
        precision=cfg.precision, num_workers=cfg.num_workers,
        extra={"bats_binarize": json.dumps(carried), "bats_source": str(src), **teacher_extra(distill)},
        distill=distill,
    )
    if distill is not None:
        reporter.line(distill_line(distill))
    if cfg.epochs > 0:
        reporter.line(f"fine-tuning with binary weights and activations: {cfg.epochs} "
                      f"epoch{'' if cfg.epochs == 1 else 's'}, "
                      f"lr {cfg.lr:g} (cosine), batch {batch_size}")
        summary = fit(spec, data.train, data.val, device=device, dist_info=dist_info,
                      run_dir=run_dir, reporter=reporter, resume_from=opened,
                      stop_after_steps=stop_after_steps, handle_signals=False, stop=stop,
                      started=started)
        final = summary["final"]
        final_top1, final_top5 = final["val_top1"], final["val_top5"]
        best_top1 = summary["best_top1"]
    else:
        final_top1, final_top5 = carried["binarized_top1"], carried["binarized_top5"]
        best_top1 = final_top1
        if run_dir is not None:
            _save_plain(spec, run_dir, data, device=device, dist_info=dist_info)

    result: dict[str, Any] = {
        "command": "binarize",
        "source": str(src),
        "genotype": network_name(genotype, settings),
        "dataset": data.spec.name,
        "binary_convs": carried.get("binary_convs"),
        "step1_top1": carried.get("step1_top1"),
        "binarized_top1_no_calibration": carried.get("binarized_top1_no_calibration"),
        "binarized_top1": carried.get("binarized_top1"),
        "fine_tune_epochs": cfg.epochs,
        # What binarized_* / final_* / best_* were measured on: "test", or "holdout" (training images
        # held out by the training run's --holdout; step1_top1 is on the test split either way).
        "val_split": "holdout" if data.holdout else "test",
        "final_top1": final_top1,
        "final_top5": final_top5,
        "best_top1": best_top1,
        "drop_vs_step1": (carried["step1_top1"] - final_top1) if "step1_top1" in carried else None,
        "out": str(out),
        "last": str(out / "last.safetensors"),
        "best": str(out / "best.safetensors"),
    }
    if distill is not None:
        result["teacher"] = distill.record()
    if dist_info.is_main:
        packed_path = Path(packed) if packed is not None else out / PACKED_NAME
        # The final (last) weights are packed: with the cosine schedule ending near 0 they are
        # the settled ones, and best-by-validation would select on the test split.
        save_packed(
            model.cpu(), packed_path, settings=bin_settings, data=data_record, run=run_record,
            genotype_json=spec.genotype_json,
            source={"checkpoint": str(out / "last.safetensors"), "step1": str(src)},
            epoch=cfg.epochs, keep_aux=cfg.keep_aux,
        )
        size = packed_size_report(packed_path)
        result["packed"] = str(packed_path)
        result["packed_size"] = {
            "file_bytes": size["file_bytes"],
            "binary_convs_ratio": size["binary_convs"]["ratio"],
            "total_ratio": size["total"]["ratio"],
        }
        if run_dir is not None:
            run_dir.write_json("result.json", result)
    return result


# What a binarize checkpoint carries from before its fine-tuning (reported at the end).
_CARRIED_PERCENT = ("step1_top1", "step1_top5", "binarized_top1_no_calibration", "binarized_top1",
                    "binarized_top5")
_CARRIED_COUNTS = ("binary_convs", "calibration_images")


def _carried(meta) -> dict[str, Any]:
    """``bats_binarize`` of a binarize checkpoint, checked: percentages in 0..100, counts."""
    import math

    from bats_cli.storage.metadata import load_json

    where = f"{meta.path}: bats_binarize"
    data = load_json(meta.extra.get("bats_binarize", "{}"), where=where)
    ok = isinstance(data, dict) and all(
        k in data and type(data[k]) in (int, float) and math.isfinite(data[k]) and 0 <= data[k] <= 100
        for k in _CARRIED_PERCENT) and all(
        type(data.get(k)) is int and 0 <= data[k] <= 10**9 for k in _CARRIED_COUNTS)
    if not ok:
        raise UserInputError(f"{where}: not the accuracies a binarize run records before its fine-tuning "
                             "(a tampered checkpoint)")
    return data


def _save_plain(spec, run_dir, data, *, device, dist_info) -> None:
    """last / best for a run without fine-tuning (the binarized, calibrated weights)."""
    loop = RunLoop(TrainJob(spec, data.train, data.val, device=device, dist_info=dist_info),
                   run_dir=run_dir, dist_info=dist_info, device=device)
    for path in (run_dir.last, run_dir.best):
        loop.save(path, with_state=False)


__all__ = [
    "BINARIZE_PRESETS",
    "BinarizeConfig",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "PACKED_NAME",
    "binarize",
    "calibrate_batchnorm",
]
