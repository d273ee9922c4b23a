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
``genotype.json`` and ``result.json``. The settings are :mod:`bats_cli.nas.search_config`, the steps
:mod:`bats_cli.nas.searcher`, what each epoch and stage records :mod:`bats_cli.nas.search_records`; this
module loads the data and runs the search.

Data-parallel (``torchrun --nproc-per-node N -m bats_cli search ...``): ``batch_size`` is the
global batch of each half, as in ``bats train``; every rank takes ``batch_size / N`` images of
each step's architecture batch and weight batch (the single-process batches, sliced), the α
gradients and then the weight gradients are averaged over the ranks before each optimiser step,
so every rank holds the same α and weights. At every epoch end the ranks compare their derived
cells and α (a :class:`~bats_cli.core.errors.RunFailure` names the rank that differs), then take rank
0's parameters bit for bit. BatchNorm normalises with each rank's own images, so N processes
match one process to a tolerance, not bit for bit. Rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bats_cli.core.config import check_resume_config
from bats_cli.core.errors import UserInputError
from bats_cli.core.presets import SEARCH_PRESETS
from bats_cli.nas.derive import parameter_free_share, skip_count
from bats_cli.nas.search_config import SearchConfig
from bats_cli.nas.search_records import SearchResult, check_search_batch
from bats_cli.nas.searcher import Searcher
from bats_cli.training.longrun import begin, load_data, resume_config
from bats_cli.training.runloop import RunLoop, interrupt_guard, restores_threads
from bats_cli.utils.distributed import barrier

RESULT_NAME = "result.json"
GENOTYPE_NAME = "genotype.json"


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
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Run (or continue) the 3-stage search in ``out_dir``; returns the final genotype and timings.

    ``interrupt`` is anything with ``requested`` and ``raise_if_requested(save_fn)`` (default: a
    :class:`~bats_cli.utils.signals.GracefulInterrupt` turning SIGINT/SIGTERM into a saved checkpoint and
    :class:`~bats_cli.core.errors.Interrupted`).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls this: the search is data-parallel
    (module docstring), rank 0 reports and writes, every rank returns the same result.

    With ``resume`` and an existing ``<out_dir>/last.safetensors``: given ``overrides`` (the flags
    of the command line), the saved config is used and ``preset`` and ``overrides`` must agree
    with it; without, ``config`` itself must be the saved one.
    """
    started = time.perf_counter()  # the run's time includes its start-up
    run = begin("search", out=out_dir, resume=resume, default=lambda: Path(out_dir),
                device=config.device, precision=config.precision)
    dist_info, device, opened = run.dist_info, run.device, run.opened
    if opened is not None and overrides is not None:
        config = resume_config(SearchConfig, opened[1].config, preset=preset, presets=SEARCH_PRESETS,
                               overrides=overrides)
    elif opened is not None:
        check_resume_config(opened[1].config, config)
    run.settle(precision=config.precision, threads=config.threads)  # the supernet's seed is the searcher's (per stage)
    from bats_cli.utils.preflight import check_sizes

    # Everything that can be refused is checked before the run directory exists.
    check_sizes(channels=config.channels, layers=max(config.layers), nodes=config.nodes,
                what="the search supernet")
    check_search_batch(config.batch_size, dist_info)
    # Every rank checked the directory before rank 0 creates it.
    barrier(dist_info)
    weight_half, arch_half, spec = load_data(lambda download: load_search_data(config, download=download),
                                             config.download, dist_info)
    plan_args = None
    if preflight is not None:
        from bats_cli.training.plan import search_plan_args

        plan_args = search_plan_args(config, spec, device, len(weight_half), len(arch_half))
        # Memory is per process: each rank holds a supernet and its share of the batch.
        plan_args["batch_size"] = plan_args["eval_batch_size"] = config.batch_size // dist_info.world
    run_dir, reporter = run.open(preflight, plan_args, quiet=reporter is None, reporter=reporter)
    if opened is None and run_dir is not None:
        run_dir.write_config(config.model_dump(mode="json"), device=device, command="search")
    with interrupt_guard(interrupt) as stop, _discard_if_unstarted(run_dir):
        searcher = Searcher(config, run=run_dir, reporter=reporter, device=device,
                            data=(weight_half, arch_half), in_channels=spec.in_channels,
                            num_classes=spec.num_classes, dist_info=dist_info, out_dir=Path(out_dir))
        loop = RunLoop(searcher, run_dir=run_dir, reporter=reporter, interrupt=stop, device=device,
                       dist_info=dist_info, started=started)
        path = run_dir.path if run_dir is not None else Path(out_dir)
        if opened is not None:
            loop.resume(opened)
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
    gpath = final.save(path / GENOTYPE_NAME) if run_dir is not None else path / GENOTYPE_NAME
    result = SearchResult(
        out_dir=path, genotype=final, genotype_path=gpath,
        checkpoint=run_dir.last if run_dir is not None else path / "last.safetensors",
        stages=searcher.stage_results, total_seconds=loop.elapsed(),
        parameter_free_share=parameter_free_share(final), skips=skip_count(final),
        warnings=searcher.warnings, world_size=dist_info.world,
        per_rank_batch=config.batch_size // dist_info.world, rank_genotypes=searcher.rank_genotypes,
    )
    if run_dir is not None:
        run_dir.write_json(RESULT_NAME, result.to_dict())
    # The result exists once run_search returns, on every rank.
    barrier(dist_info)
    return result
