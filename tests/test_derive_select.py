"""`bats derive --select perturbation`: perturbation-based architecture selection (Wang et al. 2021)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli as _cli
from helpers import one_line_error as _one_line_error
from torch import nn

from bats_cli.core.genotype import load_genotype
from bats_cli.core.spaces import edge_endpoints
from bats_cli.nas.derive import derive_genotype
from bats_cli.nas.search import SearchConfig, run_search
from bats_cli.nas.selection import (
    derive_by_perturbation,
    load_search_supernet,
    select_cells,
    selection_batches,
    supernet_evaluator,
)

STEPS = 4
N_EDGES = len(edge_endpoints(STEPS))
OPS = ["none", "max_pool_3x3", "skip_connect", "group_conv_3x3"]
CANDS = {"normal": [OPS] * N_EDGES, "reduce": [OPS] * N_EDGES}


class ToySupernet(nn.Module):
    """logits = sum over cells, edges and ops of weight * (linear map of that op) @ x.

    The label of x (6 features) is (argmax x[:2], argmax x[2:4]) as one of 4 classes. One op of
    one edge of the normal cell (``signal``) reads the first pair, one of the reduction cell the
    second; every other op adds a little of the two unrelated features x[4:]. Removing a signal
    op halves the accuracy, removing any other op hardly changes it. It keeps the supernet's forward contract,
    ``model(x, weights=(normal, reduce))``.
    """

    def __init__(self, signal: dict[str, tuple[int, int]], noise: float = 0.01) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        maps = torch.zeros(2, N_EDGES, len(OPS), 4, 6)
        maps[..., 4:] = noise * torch.randn(2, N_EDGES, len(OPS), 4, 2, generator=g)
        for c, cell in enumerate(("normal", "reduce")):
            e, k = signal[cell]
            maps[c, e, k] = 0.0
            for a in range(2):
                for b in range(2):
                    maps[c, e, k, 2 * a + b, a if cell == "normal" else 2 + b] = 1.0
        maps[:, :, 0] = 0.0  # 'none' adds zero
        self.maps = nn.Parameter(maps, requires_grad=False)

    def forward(self, x, weights):
        out = 0
        for c, w in enumerate(weights):
            out = out + torch.einsum("ek,ekij,nj->ni", w, self.maps[c], x)
        return out


def _toy_batches(n: int = 256, batch: int = 64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    y = 2 * x[:, :2].argmax(1) + x[:, 2:4].argmax(1)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("progressive", [True, False])
def test_the_op_whose_removal_hurts_most_is_chosen(progressive):
    # Normal edge 5 (input 0 -> node 4) and reduce edge 12 (input 3 -> node 5) carry the signal.
    signal = {"normal": (5, OPS.index("group_conv_3x3")), "reduce": (12, OPS.index("skip_connect"))}
    model = ToySupernet(signal)
    evaluate = supernet_evaluator(model, _toy_batches())
    # α favours max_pool everywhere: the DARTS rule would never pick the signal ops.
    w = torch.full((N_EDGES, len(OPS)), 0.2)
    w[:, OPS.index("max_pool_3x3")] = 0.4
    weights = {"normal": w.clone(), "reduce": w.clone()}
    sel = select_cells(evaluate, weights, CANDS, steps=STEPS, seed=3, progressive=progressive)
    alpha_rule = derive_genotype(w, w, CANDS["normal"], CANDS["reduce"], space="bats")
    assert {op for op, _ in alpha_rule.normal} == {"max_pool_3x3"}
    assert sel.base_accuracy > 0.8
    for cell, (e, k) in signal.items():
        src, dst = edge_endpoints(STEPS)[e]
        node = dst - 2
        entries = sel.cells[cell][2 * node: 2 * node + 2]
        # The signal edge is kept, first (it hurts most), with the signal op.
        assert entries[0] == (OPS[k], src)
        decision = next(d for d in sel.decisions if d.get("edge") == e and d["cell"] == cell)
        without = decision["without"]
        assert set(without) == set(OPS[1:])  # 'none' is never a choice
        assert without[OPS[k]]["accuracy"] < 0.75 < min(v["accuracy"] for op, v in without.items() if op != OPS[k])
    # Every node keeps two distinct inputs; evaluations: 1 + 3 ops x 28 edges + inputs of nodes 3-5 x 2 cells.
    for cell in ("normal", "reduce"):
        for node in range(STEPS):
            srcs = [src for _, src in sel.cells[cell][2 * node: 2 * node + 2]]
            assert len(set(srcs)) == 2 and max(srcs) <= node + 1
    assert sel.evaluations == 1 + 3 * 2 * N_EDGES + 2 * (3 + 4 + 5)


def test_selection_is_deterministic_for_a_seed():
    signal = {"normal": (0, 1), "reduce": (1, 2)}
    evaluate = supernet_evaluator(ToySupernet(signal, noise=0.5), _toy_batches())
    w = torch.full((N_EDGES, len(OPS)), 0.25)
    weights = {"normal": w, "reduce": w}
    a = select_cells(evaluate, weights, CANDS, steps=STEPS, seed=0)
    b = select_cells(evaluate, weights, CANDS, steps=STEPS, seed=0)
    assert a.cells == b.cells and a.decisions == b.decisions


# --------------------------------------------------------------------------- a real tiny search


TINY = dict(dataset="fashion-mini", subset=64, image_size=8, batch_size=8, epochs=2, warmup=1, channels=6,
            layers=(3, 3), ops=(8, 3), threads=1)


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("select") / "search"
    run_search(SearchConfig(**TINY), out_dir=out)
    torch.set_num_threads(before)
    return out


@pytest.mark.slow
def test_supernet_is_the_checkpoints_and_masking_reaches_it(tiny_search):
    st = load_search_supernet(tiny_search)
    assert len(st.model.cells) == 3 and len(st.model.candidates_normal[0]) == 3
    batches = selection_batches(st.config, images=16, seed=0)
    assert sum(len(y) for _, y in batches) == 16
    wn, wr = st.snapshot.weights("normal"), st.snapshot.weights("reduce")
    x = batches[0][0]
    st.model.train()
    with torch.no_grad():
        plain = st.model(x)
        given = st.model(x, weights=(wn.float(), wr.float()))
        masked = wn.float().clone()
        masked[0] = 0.0
        cut = st.model(x, weights=(masked, wr.float()))
    assert torch.allclose(plain, given, atol=1e-5) and not torch.allclose(plain, cut, atol=1e-3)


@pytest.mark.slow
def test_images_are_the_architecture_half_without_augmentation(tiny_search):
    from bats_cli.data import build_datasets, search_split
    from bats_cli.nas.selection import _with_eval_transforms

    st = load_search_supernet(tiny_search)
    cfg = st.config
    data = build_datasets(cfg.dataset, subset=cfg.subset, image_size=cfg.image_size, seed=cfg.seed)
    weight_half, arch_half = search_split(data.train, seed=cfg.seed)
    held = _with_eval_transforms(arch_half, data.test)
    pool = torch.stack([held[i][0] for i in range(len(held))]).flatten(1)
    weight_view = _with_eval_transforms(weight_half, data.test)
    others = torch.stack([weight_view[i][0] for i in range(len(weight_half))]).flatten(1)
    batches = selection_batches(cfg, images=32, seed=1)
    for x, _ in batches:
        for img in x.flatten(1):
            assert (pool - img).abs().amax(1).min() == 0  # one of the held-out images, unaugmented
            assert (others - img).abs().amax(1).min() > 0
    # Another seed picks (or orders) other images.
    assert not torch.equal(batches[0][0], selection_batches(cfg, images=32, seed=2)[0][0])


@pytest.mark.slow
def test_library_matches_a_masked_evaluation(tiny_search):
    res = derive_by_perturbation(tiny_search, images=16, seed=0, progressive=False)
    st = load_search_supernet(tiny_search)
    batches = selection_batches(st.config, images=16, seed=0)
    evaluate = supernet_evaluator(st.model, batches)
    first = next(d for d in res.selection.decisions if "edge" in d and len(d["without"]) > 1)
    cell, e = first["cell"], first["edge"]
    cands = st.snapshot.candidates_normal if cell == "normal" else st.snapshot.candidates_reduce
    w = {c: st.snapshot.weights(c).clone() for c in ("normal", "reduce")}
    scores = {}
    for k, op in enumerate(cands[e]):
        if op == "none":
            continue
        trial = {c: t.clone() for c, t in w.items()}
        trial[cell][e, k] = 0.0
        scores[op] = evaluate(trial)
        assert first["without"][op]["accuracy"] == scores[op][0]
        assert first["without"][op]["loss"] == pytest.approx(scores[op][1])
    assert first["op"] == min(scores, key=lambda op: (scores[op][0], -scores[op][1]))


@pytest.mark.slow
def test_cli_end_to_end_is_valid_and_deterministic(tiny_search, tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = ["derive", str(tiny_search), "--select", "perturbation", "--perturb-images", "16", "--seed", "1",
            "--threads", "1"]
    code, stdout, err = _cli([*argv, "-o", str(out), "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    g = load_genotype(out)
    assert g.to_dict() == res["genotype"] and "Wang et al." in g.notes and "perturbation" in g.source
    sel = res["selection"]
    assert sel["method"] == "perturbation" and sel["images"] == 16 and sel["progressive"] is True
    assert 0.0 <= sel["supernet_accuracy"] <= 1.0 and sel["evaluations"] > 28
    assert "supernet accuracy" in err  # progress lines on stderr
    code, stdout2, err = _cli([*argv, "-q"], capsys)
    assert code == 0 and err == ""
    assert json.loads(stdout2) == res["genotype"]


@pytest.mark.slow
def test_cli_bad_inputs(tiny_search, capsys):
    ck = str(tiny_search)
    _one_line_error(*_cli(["derive", ck, "--select", "greedy"], capsys)[::2], "--select")
    _one_line_error(*_cli(["derive", ck, "--perturb-images", "8"], capsys)[::2], "--perturb-images", "perturbation")
    _one_line_error(*_cli(["derive", "--random", "--select", "perturbation"], capsys)[::2], "--select")
    _one_line_error(*_cli(["derive", ck, "--select", "perturbation", "--max-skip", "2"], capsys)[::2], "--max-skip")
    _one_line_error(*_cli(["derive", ck, "--select", "perturbation", "--dataset", "imagefolder", "--data-dir",
                           str(tiny_search)], capsys)[::2], str(tiny_search))
