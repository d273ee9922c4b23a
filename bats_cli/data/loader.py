"""Deterministic, resumable loading: epoch order, per-sample augmentation seeds, subsets, search split.

Two seeds fix everything a loader does, independently of ``num_workers`` and of where a run
was interrupted:

* the order of epoch ``e`` is a permutation drawn from a generator seeded with (seed, e);
* the augmentation of the sample at position ``i`` of the data set is drawn from torch's RNG
  seeded with (seed, e, i) just for that ``__getitem__`` call.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from bats_cli.core.errors import UserInputError
from bats_cli.data.rng import derive_seed, seeded_cpu_rng
from bats_cli.utils.signals import shield_worker_from_signals, signals_blocked

# Domain tags keep the seed streams of different uses apart.
_ORDER, _SAMPLE, _LOADER, _SPLIT, _SUBSET, _BATCH, _HOLDOUT = range(7)


def batch_seed(seed: int, epoch: int, step: int) -> int:
    """Seed for batch-level randomness (MixUp) of step ``step`` of ``epoch``."""
    return derive_seed(_BATCH, seed, epoch, step)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation seeded from (seed, epoch), or 0..n-1."""
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(derive_seed(_ORDER, seed, epoch))
    return torch.randperm(n, generator=generator).tolist()


class SeededView(Dataset):
    """``dataset[i]`` with torch's RNG seeded from (seed, epoch, i) during the call.

    The caller's (or worker's) RNG state is restored afterwards, so loading does not shift the
    random stream of the training loop. Transforms must draw from torch's RNG (torchvision's do).
    """

    def __init__(self, dataset: Dataset, *, seed: int, epoch: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with seeded_cpu_rng(derive_seed(_SAMPLE, self.seed, self.epoch, index)):
            return self.dataset[index]


class ShieldedDataLoader(DataLoader):
    """A DataLoader whose workers survive SIGINT/SIGTERM sent to the whole process group.

    Every DataLoader of the project is one of these: the main process alone decides to stop
    (save a checkpoint, exit 130); see :func:`bats_cli.utils.signals.shield_worker_from_signals`.
    """

    def __init__(self, *args, **kwargs):
        own = kwargs.pop("worker_init_fn", None)
        kwargs["worker_init_fn"] = (
            shield_worker_from_signals if own is None else _ShieldThen(own)
        )
        super().__init__(*args, **kwargs)

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        # Workers are forked here; with the signals held back they start shielded.
        with signals_blocked():
            return super()._get_iterator()


class _ShieldThen:
    """worker_init_fn: shield the worker, then run the caller's own init function."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, worker_id: int) -> None:
        shield_worker_from_signals(worker_id)
        self.fn(worker_id)


class _FixedOrder(Sampler[int]):
    """Yields a precomputed list of indices."""

    def __init__(self, indices: list[int]):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    skip_batches: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over one epoch whose batches depend only on (dataset, seed, epoch).

    ``skip_batches=k`` starts at batch k without loading the first k batches (mid-epoch resume).
    Use different seeds for loaders that run side by side (e.g. the two halves of the search).
    """
    if batch_size < 1:
        raise UserInputError(f"batch size must be at least 1, got {batch_size}")
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
    order = epoch_order(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch)
    return ShieldedDataLoader(
        SeededView(dataset, seed=seed, epoch=epoch),
        batch_size=batch_size,
        sampler=_FixedOrder(order[skip_batches * batch_size :]),
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        # DataLoader draws worker base seeds from this generator, not from the global RNG.
        generator=torch.Generator().manual_seed(derive_seed(_LOADER, seed, epoch)),
    )


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps per epoch: full global batches only (the incomplete last one is dropped,
    a different remainder every epoch since the order is reshuffled)."""
    if n_train < batch_size:
        raise UserInputError(
            f"--batch-size {batch_size} is larger than the {n_train} training images; "
            "use a smaller --batch-size (or a larger --subset)"
        )
    return n_train // batch_size


def check_batch(n_train: int, batch_size: int, dist_info) -> None:
    """Refuse, up front, a batch size that gives no step or cannot be split over the ranks."""
    steps_per_epoch(n_train, batch_size)
    if batch_size % dist_info.world:
        raise UserInputError(
            f"--batch-size {batch_size} must be divisible by the number of processes "
            f"({dist_info.world})"
        )


class _ShardedBatches(Sampler[list[int]]):
    """Index lists of one epoch: step ``s`` of rank ``r`` is its slice of global batch ``s``."""

    def __init__(self, order: list[int], *, batch: int, world: int, rank: int, start: int, stop: int):
        self.order, self.batch, self.world, self.rank = order, batch, world, rank
        self.start, self.stop = start, stop
        self.per_rank = batch // world

    def __iter__(self):
        for step in range(self.start, self.stop):
            lo = step * self.batch + self.rank * self.per_rank
            yield self.order[lo : lo + self.per_rank]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def sharded_loader(dataset: Dataset, *, batch_size: int, seed: int, epoch: int, skip: int,
                   dist_info, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Deterministic epoch loader (same order and augmentation as :func:`make_loader`), sharded
    like DistributedSampler with ``set_epoch``: the union of the ranks' step-``s`` batches is the
    single-process step-``s`` batch. ``dist_info`` is a :class:`bats_cli.utils.distributed.Dist`."""
    check_batch(len(dataset), batch_size, dist_info)
    order = epoch_order(len(dataset), shuffle=True, seed=seed, epoch=epoch)
    sampler = _ShardedBatches(order, batch=batch_size, world=dist_info.world, rank=dist_info.rank,
                              start=skip, stop=steps_per_epoch(len(dataset), batch_size))
    return ShieldedDataLoader(
        SeededView(dataset, seed=seed, epoch=epoch),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Worker seeds come from here, not the global RNG (augmentation is seeded per sample).
        generator=torch.Generator().manual_seed(derive_seed(_LOADER, seed, epoch)),
    )


def targets_of(dataset: Dataset) -> np.ndarray | None:
    """Class labels of every sample without loading images, or None if the data set hides them."""
    if isinstance(dataset, Subset):
        parent = targets_of(dataset.dataset)
        return None if parent is None else parent[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, SeededView):
        return targets_of(dataset.dataset)
    targets = getattr(dataset, "targets", None)
    return None if targets is None else np.asarray(targets, dtype=np.int64)


def _class_round_robin(targets: np.ndarray | None, permutation: np.ndarray) -> np.ndarray:
    """The permutation reordered so classes take turns; any prefix is then class-balanced."""
    if targets is None:
        return permutation
    rank = _rank_in_class(targets[permutation])
    return permutation[np.lexsort((np.arange(len(rank)), rank))]


def _rank_in_class(labels: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same label."""
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels)
    return rank


def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def balanced_subset(dataset: Dataset, n: int | None, *, seed: int) -> Dataset:
    """At most n samples, class-balanced when labels are known, deterministic given seed."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise UserInputError(f"subset must be at least 1, got {n}")
    perm = _permutation(len(dataset), derive_seed(_SUBSET, seed))
    chosen = _class_round_robin(targets_of(dataset), perm)[:n]
    return Subset(dataset, np.sort(chosen).tolist())


def holdout_split(train: Dataset, n: int, *, seed: int, eval_view: Dataset) -> tuple[Dataset, Dataset]:
    """(training part, held-out part) of ``train``: ``n`` class-balanced samples set aside as a
    validation set carved from the training split, served through ``eval_view`` (the same samples
    with the evaluation transforms). Disjoint, deterministic given seed."""
    if n >= len(train):
        raise UserInputError(f"--holdout {n} leaves no training images (the training split has {len(train)}); "
                             "lower --holdout or raise --subset")
    perm = _permutation(len(train), derive_seed(_HOLDOUT, seed))
    held = np.sort(_class_round_robin(targets_of(train), perm)[:n])
    keep = np.setdiff1d(np.arange(len(train)), held)
    return Subset(train, keep.tolist()), Subset(eval_view, held.tolist())


def search_split(train: Dataset, *, seed: int) -> tuple[Dataset, Dataset]:
    """(weight half, architecture half) of the training set, DARTS-style 50/50.

    Disjoint, covering, stratified by class when labels are known, deterministic given seed.
    Both halves keep the training transforms, as in DARTS.
    """
    if len(train) < 2:
        raise UserInputError(f"the training set has {len(train)} sample(s); the search needs at least 2")
    perm = _permutation(len(train), derive_seed(_SPLIT, seed))
    to_weights = _alternate(targets_of(train), perm)
    weight, arch = np.sort(perm[to_weights]), np.sort(perm[~to_weights])
    return Subset(train, weight.tolist()), Subset(train, arch.tolist())


def _alternate(targets: np.ndarray | None, permutation: np.ndarray) -> np.ndarray:
    """Mask over the permutation: True for the weight half.

    Within each class, members alternate in permutation order; the odd ones out of odd-sized
    classes alternate too, so both halves differ by at most one sample overall and per class.
    """
    if targets is None:
        return np.arange(len(permutation)) % 2 == 0
    labels = targets[permutation]
    rank = _rank_in_class(labels)
    counts = np.bincount(labels)[labels]
    leftover = (counts % 2 == 1) & (rank == counts - 1)
    mask = rank % 2 == 0
    mask[leftover] = np.arange(int(leftover.sum())) % 2 == 0
    return mask
