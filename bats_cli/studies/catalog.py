"""The studies of `bats ablate` (Tables 2-5, a random-cell baseline, the CPU proxy, the training recipe):
each study's rows (`Variant`) with the paper's numbers, and the budgets fixed per preset before any
result was seen (docs/ablations.md)."""

from __future__ import annotations

from dataclasses import dataclass

from bats_cli.core.archs import RESNET18
from bats_cli.core.errors import UserInputError

STUDIES = ("space", "temperature", "strategy", "random", "zoo", "proxy", "recipe")
# tiny: a smoke test of a study's commands (about a minute per job), not a result.
PRESETS = ("cpu", "paper", "tiny")

# §6.1: the reduction cell's temperature is 0.15 / 0.2 = 0.75 of the normal cell's.
REDUCE_RATIO = 0.75
# Budgets fixed per preset before any result is seen (docs/ablations.md):
# training images held out of every training run as its validation set (`train --holdout`), so
# that selection (best checkpoint, random search) never reads the test split, which `eval` reads once;
HOLDOUT = {"cpu": 1000, "paper": 5000, "tiny": 250}
# the random-search baseline's candidates (DARTS' random search trains several cells; 8 at paper
# scale, 4 at cpu scale) and their short training budget (cpu: 1 of the 4 epochs; paper: 60 of 600);
CANDIDATES = {"cpu": 4, "paper": 8, "tiny": 2}
CANDIDATE_EPOCHS = {"cpu": 1, "paper": 60, "tiny": 1}
# searched-perturbation's held-out images per preset; absent: derive's default (512). The tiny
# preset's supernet is a smoke test, so a few images show that the step runs.
PERTURB_IMAGES = {"tiny": 64}
# a matched random cell's size tolerance (±10 % of the searched cell's parameters);
MATCH_TOLERANCE = 0.1
# derive seeds of random-search candidates: disjoint from the `random` arm's seeds 0..N-1.
CANDIDATE_SEED_BASE = 1000
# The row every other row of a study is compared with, seed for seed (the paper's setting).
REFERENCE = {"space": "bats", "temperature": "T0.2", "strategy": "Wreal-Abinary", "random": "searched",
             "zoo": "bats_c10", "proxy": "searched-c12", "recipe": "paper"}
# The recipe study's attention-matching weight (Real-to-Binary's loss at this project's scale; not tuned).
RECIPE_ATTENTION_WEIGHT = 1.0


@dataclass(frozen=True)
class Variant:
    """One row of a study's table."""

    name: str
    label: str
    # Flags of `bats search` (None: no search; the genotype comes from ``genotype`` or --random).
    search: tuple[str, ...] | None = None
    genotype: str | None = None  # a bundled genotype name (zoo)
    random: bool = False  # `bats derive --random --seed SEED` (the random baseline)
    paper: str | None = None  # the paper's CIFAR-10 top-1 for this row, as printed there
    # Derive from the search of another variant of the same seed (no search of its own), with
    # this architecture-selection rule (`bats derive --select`).
    search_of: str | None = None
    select: str = "alpha"
    # A random cell whose size matches that seed's cell of this variant (`derive --random --match`).
    match_of: str | None = None
    # The random-search baseline: this many random cells, trained briefly, the best on held-out
    # training images kept (DARTS; Li & Talwalkar 2019).
    candidates: int = 0
    # Distillation (the recipe study): the variant of the same seed whose job trains the real-valued
    # teacher (`bats train GENOTYPE --real`; this variant's own name: it trains it), given as
    # `--teacher` to both steps; and extra flags of step 1 (`train`) and step 2 (`binarize`).
    teacher: str | None = None
    train_flags: tuple[str, ...] = ()
    binarize_flags: tuple[str, ...] = ()


def _search(optimizer: str, *, space: str = "bats", temp_normal: float = 0.2, temp_reduce: float = 0.15,
            weights: str = "real", activations: str = "binary") -> tuple[str, ...]:
    """The flags of a variant's `bats search`: every studied setting is spelled out, so one setting
    is written the same way in every study (and a job of one study can be reused by another)."""
    return ("--space", space, "--temp-normal", f"{temp_normal:g}", "--temp-reduce", f"{temp_reduce:g}",
            "--weights", weights, "--activations", activations, "--optimizer", optimizer)


def study_variants(study: str, *, optimizer: str = "adam") -> list[Variant]:
    """The variants of ``study`` with the paper's numbers (CIFAR-10 top-1, fully binary)."""
    # Table 4 changes the search domain only: the weights' optimiser is named on every search.
    if study == "space":  # Table 2
        return [
            Variant("bats", "BATS space, T = 0.2 / 0.15", _search(optimizer), paper="93.7 ± 0.6"),
            Variant("darts", "DARTS space, T = 0.2 / 0.15", _search(optimizer, space="darts"), paper="51.0 ± 7.5"),
            Variant("bats-T1", "BATS space, T = 1 / 1 (DARTS)",
                    _search(optimizer, temp_normal=1.0, temp_reduce=1.0), paper="86.0 ± 2.0"),
        ]
    if study == "temperature":  # Table 3
        paper = {1.0: "86.0*", 0.5: "92.1", 0.2: "93.7", 0.05: "93.3"}
        # T = 1 is DARTS' softmax in both cells (Table 3: "T=1 was used in DARTS"; its 86.0 is Table 2's
        # T = 1 row); below 1 the reduction cell's temperature is 0.75 of the normal cell's (§6.1).
        temps = [(1.0, 1.0)] + [(t, t * REDUCE_RATIO) for t in (0.5, 0.2, 0.05)]
        return [
            Variant(f"T{tn:g}", f"T = {tn:g} (normal) / {tr:g} (reduce)",
                    _search(optimizer, temp_normal=tn, temp_reduce=tr), paper=paper[tn])
            for tn, tr in temps
        ]
    if study == "strategy":  # Table 4
        rows = [("real", "real", "88.4 ± 0.8"), ("binary", "binary", "84.6 ± 1.7"),
                ("binary", "real", "91.1 ± 1.7"), ("real", "binary", "93.7 ± 0.6")]
        return [
            Variant(f"W{w}-A{a}", f"search W {w} / A {a}", _search(optimizer, weights=w, activations=a), paper=p)
            for w, a, p in rows
        ]
    if study == "random":  # does the search beat chance? (Table 5's random-search row)
        return [
            Variant("searched", "BATS search (this preset), DARTS selection by α", _search(optimizer), paper="93.7"),
            # Wang et al. (ICLR 2021): the same search checkpoints, ops chosen by the supernet's
            # accuracy drop when each is removed.
            Variant("searched-perturbation", "BATS search, perturbation-based selection",
                    search_of="searched", select="perturbation"),
            Variant("random", "one random cell of the BATS space", random=True),
            Variant("random-matched", "one random cell, parameters within ±10 % of the searched cell's",
                    random=True, match_of="searched"),
            Variant("random-search", "random search: best of N random cells on held-out training images",
                    random=True, candidates=-1, paper="92.9"),
        ]
    if study == "proxy":  # is the CPU search a faithful proxy? one change of it, against the same baselines
        # The cpu preset's supernet has 6 channels (2 groups of 3) where the network it is judged
        # in has 12 (4 groups): the supernet's grouped convs see different fan-ins. This study
        # searches at the evaluation network's width; its searched and random rows are the random
        # study's jobs (`--reuse` that study: the same commands and seeds).
        return [
            Variant("searched-c12", "BATS search at C = 12 (4 groups, as the evaluation network)",
                    _search(optimizer) + ("--channels", "12")),
            Variant("searched", "BATS search (the cpu preset: C = 6, 2 groups)", _search(optimizer)),
            Variant("random", "one random cell of the BATS space", random=True),
        ]
    if study == "recipe":  # the training recipe on one cell: the paper's two steps against distillation
        g = "bats_c10"
        att = ("--attention-weight", f"{RECIPE_ATTENTION_WEIGHT:g}")
        return [
            Variant("paper", "two steps, cross-entropy (the paper)", genotype=g, paper="93.7"),
            Variant("kd", "KL to the real-valued teacher in both steps (ReActNet's loss)", genotype=g, teacher="kd"),
            Variant("kd+attention", "KL + attention matching of cell outputs (Real-to-Binary)", genotype=g,
                    teacher="kd", train_flags=att, binarize_flags=att),
            Variant("kd+rprelu", "KL + RPReLU activations (ReActNet)", genotype=g, teacher="kd",
                    train_flags=("--activation", "rprelu")),
        ]
    if study == "zoo":  # Table 5: published cells and the hand-designed ResNet-18, binarized as in §3
        zoo = [("bats_c10", "BATS (paper's cell)", "93.7"), ("darts_v1", "DARTS (first order)", "89.4"),
               ("darts_v2", "DARTS (second order)", "91.1"), ("pdarts", "P-DARTS", "89.5"),
               ("nasnet_a", "NASNet-A", "90.3"), ("amoebanet_a", "AmoebaNet-A", "91.5"),
               # A reserved model name where a genotype goes: `bats train resnet18`.
               (RESNET18, "binary ResNet-18 (XNOR-Net++)", "91.0")]
        return [Variant(g, label, genotype=g, paper=p) for g, label, p in zoo]
    raise UserInputError(f"unknown study {study!r}; choose one of: {', '.join(STUDIES)}")

