"""Perturbation-based architecture selection (Wang et al., "Rethinking Architecture Selection in
Differentiable NAS", ICLR 2021) on a search checkpoint's supernet: ``bats derive --select
perturbation``.

The DARTS rule reads the genotype off α; Wang et al. show α's magnitude need not say which op
matters to the supernet, and instead remove an op and measure how much the supernet's accuracy
drops. What this module does, and where it departs from them:

* **The supernet** is the checkpoint's last stage (its cells and per-edge candidate lists),
  rebuilt as ``bats search --resume`` rebuilds it and loaded with the checkpoint's weights and α.
* **The images** are held-out *training* images, never the test split: the architecture half of
  the search's own 50/50 split (the checkpoint's data settings and seed, so the very half the
  weights were not trained on), served with the evaluation transforms (no crop / flip: every
  evaluation sees the same pixels), ``images`` of them in batches of the search's batch size,
  picked by ``seed``. Wang et al. use the same half (their ``valid_queue``), with training
  transforms.
* **Removing an op** sets its weight in the mixed op to zero and leaves the others as they are
  (no renormalisation): Wang et al.'s ``proj_mask``. ``none`` is never chosen (a genotype cannot
  hold it; removing it changes nothing).
* **BatchNorm uses batch statistics** (the supernet runs in training mode, without gradients):
  its BatchNorms are affine-free and trained on batch statistics only, and the running means
  belong to the unmasked supernet, not to the masked one being measured. Wang et al. evaluate in
  training mode too. Nothing stochastic runs in the supernet, so the result depends on ``seed``
  alone.
* **Op choice per edge**: the op whose removal lowers the accuracy most (ties: the larger loss,
  then the larger α weight). **Topology per node**: the two inputs whose removal (the whole
  edge set to zero) lowers the accuracy most, listed in that order; as in Wang et al., after all
  edges have their op.
* **Order and fine-tuning** (``progressive``): Wang et al. decide one edge at a time in random
  order (normal and reduction cells alternating), replace the decided edge by its op alone
  (weight 1, the others 0), fine-tune the supernet for a few epochs, and go on; nodes likewise.
  Here there is *no fine-tuning* (a CPU tool): ``progressive=True`` (default) keeps their order
  (drawn from ``seed``) and projection, ``progressive=False`` scores every edge and node on the
  unchanged trained supernet (order-free).

Cost: one evaluation of ``images`` images per candidate op of every edge with two or more
(28 edges x 2-3 ops after the paper's op dropping) plus one per input of every node with more than
two; on 2 CPU cores a few minutes for ``search --preset cpu`` checkpoints at 512 images.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bats_cli.core.errors import UserInputError
from bats_cli.core.genotype import CELLS, Genotype
from bats_cli.core.names import safe_name
from bats_cli.core.spaces import edge_endpoints
from bats_cli.nas.derive import NONE_OP, ArchSnapshot, load_arch_snapshot

DEFAULT_IMAGES = 512
# Seed stream of the images picked for selection (apart from the search's own streams).
_SELECT_STREAM = 9001

# (accuracy, loss) of the supernet under the given (normal, reduce) op weights.
Evaluate = Callable[[Mapping[str, torch.Tensor]], tuple[float, float]]


@dataclass
class Selection:
    """The chosen cells and how each choice was made (for ``--json`` and tests)."""

    cells: dict[str, list[tuple[str, int]]]
    base_accuracy: float
    base_loss: float
    evaluations: int
    progressive: bool
    decisions: list[dict[str, Any]] = field(default_factory=list)


def _hurt_key(score: tuple[float, float], prior: float) -> tuple[float, float, float]:
    """Sort key, most harmful removal first: lowest accuracy, then highest loss, then prior."""
    acc, loss = score
    return (acc, -loss, -prior)


def select_cells(
    evaluate: Evaluate,
    weights: Mapping[str, torch.Tensor],
    candidates: Mapping[str, Sequence[Sequence[str]]],
    *,
    steps: int,
    seed: int = 0,
    progressive: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Selection:
    """Perturbation-based selection of both cells, given a supernet evaluator.

    ``weights[cell]`` is the (edges, candidates) op-weight matrix the supernet runs with
    (softmax(α / T)), ``candidates[cell]`` the op names of its columns; ``evaluate`` maps a
    ``{"normal": W, "reduce": W}`` dict to the supernet's (accuracy, loss) on fixed images.
    """
    endpoints = edge_endpoints(steps)
    w = {cell: weights[cell].detach().clone().double() for cell in CELLS}
    prior = {cell: w[cell].clone() for cell in CELLS}
    for cell in CELLS:
        if w[cell].shape != (len(endpoints), len(candidates[cell][0])):
            raise UserInputError(f"{cell} cell: op weights {tuple(w[cell].shape)} do not match "
                                 f"{len(endpoints)} edges of {len(candidates[cell][0])} candidates")
    count = 0

    def run(trial: dict[str, torch.Tensor]) -> tuple[float, float]:
        nonlocal count
        count += 1
        return evaluate(trial)

    base = run(w)
    say = progress or (lambda _text: None)
    say(f"supernet accuracy {100 * base[0]:.2f} % (loss {base[1]:.4f}) before selection")
    rng = random.Random(seed)
    decisions: list[dict[str, Any]] = []

    def interleave(per_cell: dict[str, list[int]]) -> list[tuple[str, int]]:
        order = {cell: list(items) for cell, items in per_cell.items()}
        if progressive:
            for cell in CELLS:
                rng.shuffle(order[cell])
        return [(cell, order[cell][i]) for i in range(len(order["normal"])) for cell in CELLS]

    # 1. The op of every edge.
    chosen: dict[str, dict[int, int]] = {cell: {} for cell in CELLS}
    current = w
    for cell, e in interleave({cell: list(range(len(endpoints))) for cell in CELLS}):
        ops = [k for k, op in enumerate(candidates[cell][e]) if op != NONE_OP]
        if not ops:
            raise UserInputError(f"{cell} edge {e} has no op other than 'none' to choose")
        scores: dict[int, tuple[float, float]] = {}
        if len(ops) > 1:
            for k in ops:
                trial = {c: t.clone() for c, t in current.items()}
                trial[cell][e, k] = 0.0
                scores[k] = run(trial)
        best = min(ops, key=lambda k: _hurt_key(scores.get(k, base), float(prior[cell][e, k])))
        chosen[cell][e] = best
        if progressive:
            current = {c: t.clone() for c, t in current.items()}
            current[cell][e] = 0.0
            current[cell][e, best] = 1.0
        src, dst = endpoints[e]
        decisions.append({
            "cell": cell, "edge": e, "input": src, "node": dst, "op": candidates[cell][e][best],
            "without": {candidates[cell][e][k]: {"accuracy": a, "loss": loss} for k, (a, loss) in scores.items()},
        })
        if scores:
            say(f"{cell} edge {src}->{dst}: {candidates[cell][e][best]} (accuracy without: "
                + ", ".join(f"{candidates[cell][e][k]} {100 * a:.1f} %" for k, (a, _) in scores.items())
                + ")")

    # 2. Two inputs per node, on the edges reduced to their chosen op.
    if not progressive:
        current = {c: t.clone() for c, t in w.items()}
    else:
        current = {c: t.clone() for c, t in current.items()}
    starts = [sum(n + 2 for n in range(node)) for node in range(steps)]
    kept: dict[str, dict[int, list[int]]] = {cell: {} for cell in CELLS}
    for cell, node in interleave({cell: list(range(steps)) for cell in CELLS}):
        inputs = list(range(node + 2))
        scores = {}
        if len(inputs) > 2:
            for j in inputs:
                trial = {c: t.clone() for c, t in current.items()}
                trial[cell][starts[node] + j] = 0.0
                scores[j] = run(trial)
        strength = {j: float(prior[cell][starts[node] + j, chosen[cell][starts[node] + j]]) for j in inputs}
        top = sorted(inputs, key=lambda j: _hurt_key(scores.get(j, base), strength[j]))[:2]
        kept[cell][node] = top
        if progressive:
            for j in inputs:
                if j not in top:
                    current[cell][starts[node] + j] = 0.0
        decisions.append({
            "cell": cell, "node": node + 2, "inputs": top,
            "without": {str(j): {"accuracy": a, "loss": loss} for j, (a, loss) in scores.items()},
        })
        if scores:
            say(f"{cell} node {node + 2}: inputs {top[0]}, {top[1]} (accuracy without: "
                + ", ".join(f"{j} {100 * a:.1f} %" for j, (a, _) in scores.items()) + ")")

    cells = {
        cell: [(candidates[cell][starts[node] + j][chosen[cell][starts[node] + j]], j)
               for node in range(steps) for j in kept[cell][node]]
        for cell in CELLS
    }
    return Selection(cells=cells, base_accuracy=base[0], base_loss=base[1], evaluations=count,
                     progressive=progressive, decisions=decisions)


# ---- the supernet and images of a search checkpoint --------------------------------------------


@dataclass
class SearchState:
    """A search checkpoint's last-stage supernet, rebuilt and loaded, with its settings."""

    model: Any  # SuperNet
    config: Any  # SearchConfig
    snapshot: ArchSnapshot
    in_channels: int
    num_classes: int


def load_search_supernet(path: str | Path, *, device: torch.device | str = "cpu") -> SearchState:
    """The supernet of a search checkpoint's current stage, as ``bats search --resume`` builds it."""
    from bats_cli.core.config import validate_config
    from bats_cli.models.supernet import SuperNet, SupernetConfig
    from bats_cli.nas.search import SearchConfig
    from bats_cli.nas.searcher import SEARCH_STATE_KEY
    from bats_cli.storage.checkpoint import load_checkpoint
    from bats_cli.storage.metadata import check_state_dtypes

    snap = load_arch_snapshot(path)
    tensors, meta = load_checkpoint(snap.path, expect_kind="search", command="derive")
    saved = meta.config if isinstance(meta.config, dict) else {}
    cfg = validate_config(SearchConfig, {k: v for k, v in saved.items() if k in SearchConfig.model_fields})
    try:
        state = json.loads(meta.extra[SEARCH_STATE_KEY])
        in_channels, num_classes = int(state["in_channels"]), int(state["num_classes"])
        stage = int(snap.stage if snap.stage is not None else state["stage"])
        layers = cfg.layers[stage]
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise UserInputError(f"{snap.path}: search checkpoint without usable search state ({exc})") from None
    # Searcher.build_stage's supernet, with the checkpoint's own temperatures and candidate lists.
    sconf = SupernetConfig(
        space=snap.space, channels=cfg.channels, layers=layers, num_classes=num_classes,
        in_channels=in_channels, steps=snap.steps, spec=cfg.spec,
        temperature_normal=snap.temperature_normal, temperature_reduce=snap.temperature_reduce,
        activation=cfg.activation, channels_per_group=cfg.channels_per_group,
        group_policy=cfg.group_policy, reduce_shortcut=cfg.reduce_shortcut,
        channel_shuffle=cfg.channel_shuffle, mixed_op=cfg.mixed_op,
    )
    try:
        model = SuperNet(sconf, candidates_normal=snap.candidates_normal,
                         candidates_reduce=snap.candidates_reduce)
    except ImportError as exc:  # the fast mixed op is optional
        raise UserInputError(f"mixed op {cfg.mixed_op!r} is not available ({exc})") from None
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    check_state_dtypes(snap.path, model.state_dict(), model_sd)
    try:
        model.load_state_dict(model_sd)
    except RuntimeError as exc:
        raise UserInputError(
            f"{snap.path}: the supernet does not match the checkpoint ({str(exc).splitlines()[0]})"
        ) from None
    return SearchState(model=model.to(device), config=cfg, snapshot=snap, in_channels=in_channels,
                       num_classes=num_classes)


def _unwrap(dataset: Any) -> tuple[Any, list[int] | None]:
    """(base data set, indices into it) of a chain of Subsets (None: all of it, in order)."""
    from torch.utils.data import Subset

    chain = []
    while isinstance(dataset, Subset):
        chain.append(list(dataset.indices))
        dataset = dataset.dataset
    if not chain:
        return dataset, None
    idx = chain[0]
    for inner in chain[1:]:
        idx = [inner[i] for i in idx]
    return dataset, idx


def _with_eval_transforms(part: Any, test: Any) -> Any:
    """``part`` of the training split served with the test split's (evaluation) transforms."""
    from torch.utils.data import Subset

    base, idx = _unwrap(part)
    test_base, _ = _unwrap(test)
    tf = getattr(test_base, "transform", None)
    if tf is None or not hasattr(base, "transform"):
        return part  # an unknown source: keep its transforms (the loader seeds them)
    view = copy.copy(base)
    view.transform = tf
    return view if idx is None else Subset(view, idx)


def selection_batches(
    config: Any,
    *,
    images: int = DEFAULT_IMAGES,
    seed: int = 0,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``images`` held-out training images (the search's architecture half, evaluation
    transforms) in batches of the search's batch size, picked by ``seed``; in memory."""
    from bats_cli.data import AugmentConfig, build_datasets, derive_seed, make_loader, search_split

    if images < 1:
        raise UserInputError(f"--perturb-images must be at least 1, got {images}")
    name = dataset or config.dataset
    if dataset is not None and data_dir is None and dataset != config.dataset:
        directory = None  # the checkpoint's directory holds its own data set
    else:
        directory = data_dir if data_dir is not None else config.data_dir
    data = build_datasets(
        name, data_dir=directory, download=config.download, subset=config.subset,
        image_size=config.image_size, augment=AugmentConfig(), seed=config.seed,
    )
    spec = data.spec
    if in_channels is not None and (spec.in_channels, spec.num_classes) != (in_channels, num_classes):
        raise UserInputError(
            f"--dataset {spec.name}: {spec.in_channels} channels / {spec.num_classes} classes, the "
            f"supernet takes {in_channels} / {num_classes}"
        )
    # The search's own split (its seed): the half its weights were not trained on.
    _, arch_half = search_split(data.train, seed=config.seed)
    held = _with_eval_transforms(arch_half, data.test)
    n = min(images, len(held))
    batch = min(config.batch_size, n)
    loader = make_loader(held, batch_size=batch, shuffle=True, seed=derive_seed(_SELECT_STREAM, seed),
                         drop_last=True)
    batches = []
    for x, y in loader:
        if len(batches) * batch + batch > n:
            break
        batches.append((x, y))
    return batches


def supernet_evaluator(model: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                       device: torch.device | str = "cpu", batch_stats: bool = True) -> Evaluate:
    """``evaluate(weights) -> (accuracy, loss)`` of ``model`` on ``batches`` (no gradients)."""
    device = torch.device(device)
    on_device = [(x.to(device), y.to(device)) for x, y in batches]
    total = sum(len(y) for _, y in on_device)
    if total == 0:
        raise UserInputError("no images to measure the supernet on")

    @torch.no_grad()
    def evaluate(weights: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        dtype = next(model.parameters()).dtype
        w = (weights["normal"].to(device, dtype), weights["reduce"].to(device, dtype))
        model.train(batch_stats)
        correct, loss = 0, 0.0
        for x, y in on_device:
            logits = model(x, weights=w)
            loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        return correct / total, loss / total

    return evaluate


@dataclass
class PerturbationResult:
    genotype: Genotype
    selection: Selection
    images: int
    snapshot: ArchSnapshot

    def to_dict(self) -> dict[str, Any]:
        """What ``bats derive --select perturbation --json`` reports under ``"selection"``."""
        s = self.selection
        return {
            "method": "perturbation",
            "images": self.images,
            "evaluations": s.evaluations,
            "progressive": s.progressive,
            "supernet_accuracy": s.base_accuracy,
            "supernet_loss": s.base_loss,
            "decisions": s.decisions,
        }


def derive_by_perturbation(
    path: str | Path,
    *,
    images: int = DEFAULT_IMAGES,
    seed: int = 0,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    device: str = "cpu",
    progressive: bool = True,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> PerturbationResult:
    """The genotype of a search checkpoint by perturbation-based selection (module docstring)."""
    from bats_cli.utils.runtime import select_device

    dev = select_device(device)
    st = load_search_supernet(path, device=dev)
    batches = selection_batches(st.config, images=images, seed=seed, dataset=dataset, data_dir=data_dir,
                                in_channels=st.in_channels, num_classes=st.num_classes)
    used = sum(len(y) for _, y in batches)
    snap = st.snapshot
    evaluate = supernet_evaluator(st.model, batches, device=dev)
    selection = select_cells(
        evaluate,
        {"normal": snap.weights("normal"), "reduce": snap.weights("reduce")},
        {"normal": snap.candidates_normal, "reduce": snap.candidates_reduce},
        steps=snap.steps, seed=seed, progressive=progressive, progress=progress,
    )
    stage = f"stage {snap.stage + 1}, " if isinstance(snap.stage, int) else ""
    concat = list(range(2, snap.steps + 2))
    mode = ("edges in seeded random order, each replaced by its op before the next"
            if progressive else "every edge and node scored on the unchanged supernet")
    genotype = Genotype.from_dict({
        "name": name or safe_name(snap.run_name or snap.path.parent.name, default="searched"),
        "space": snap.space,
        "normal": [list(p) for p in selection.cells["normal"]],
        "normal_concat": concat,
        "reduce": [list(p) for p in selection.cells["reduce"]],
        "reduce_concat": concat,
        "source": (f"bats derive {snap.path} --select perturbation --perturb-images {images} "
                   f"--seed {seed} ({stage}{snap.epoch} epochs done, step {snap.step})"),
        "notes": (
            f"Perturbation-based selection (Wang et al., ICLR 2021) without fine-tuning: per edge "
            f"the op whose removal lowers the supernet's accuracy most, per node the two inputs "
            f"likewise ({mode}); {used} held-out training images (architecture half), BatchNorm "
            f"batch statistics; supernet accuracy {100 * selection.base_accuracy:.2f} %."
        ),
    }, origin="perturbation-selected genotype")
    return PerturbationResult(genotype=genotype, selection=selection, images=used, snapshot=snap)
