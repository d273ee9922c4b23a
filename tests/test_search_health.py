"""The cpu preset's α learns on real images, and a search that did not learn says so."""

from __future__ import annotations

import csv
import json
import math

import pytest

from bats_cli.nas.cell_similarity import cell_similarity, chance_similarity
from bats_cli.nas.search_health import (
    alpha_measures,
    cell_changes,
    doc_measures,
    softmax,
    stage_warnings,
    summarise_run,
)


def _g(*ops: str) -> dict:
    """A cell of 4 edges: the given ops from input 0, then skips from input 1."""
    normal = [[op, 0] for op in ops] + [["skip_connect", 1]] * (4 - len(ops))
    return {"normal": normal, "normal_concat": [2, 3], "reduce": [["max_pool_3x3", 0]] * 4,
            "reduce_concat": [2, 3]}


def test_stage_warnings_keep_the_old_signature_for_running_searches():
    # A search process started before the untempered check imports this module at its first
    # stage's end and passes the tempered entropies only: it gets the old check, not a crash.
    w = stage_warnings(stage=1, entropy_normal_rel=0.99, entropy_reduce_rel=0.98, search_genotypes=[])
    assert [x["kind"] for x in w] == ["uniform"] and "entropy_rel" in w[0]
    assert stage_warnings(stage=1, entropy_normal_rel=0.6, entropy_reduce_rel=0.7, search_genotypes=[]) == []
    with pytest.raises(TypeError):
        stage_warnings(stage=1, search_genotypes=[])


def test_stage_warnings_flag_uniform_alpha_and_an_unsettled_cell():
    g3, g5, pool = "group_conv_3x3", "group_conv_5x5", "avg_pool_3x3"
    # A rewritten cell early in the stage and one near-tie flipping at the end (1 of 8 edges): fine.
    settled = [_g(g3, g3), _g(g5, g5), _g(g5, g5), _g(g5, g3)]
    # "uniform" is judged on α's spread per edge (untempered), no longer on softmax(α/T)'s entropy.
    assert stage_warnings(stage=1, alpha_spread_normal=0.6, alpha_spread_reduce=0.3, search_genotypes=settled) == []
    w = stage_warnings(stage=2, alpha_spread_normal=0.004, alpha_spread_reduce=0.006,
                       search_genotypes=[_g(g3, g3), _g(g5, g5), _g(pool, pool, g5)])
    assert [x["kind"] for x in w] == ["uniform", "unstable"]
    assert w[0]["alpha_spread"] == pytest.approx(0.005)
    assert all(x["stage"] == 2 and "--arch-lr" in x["message"] and "--epochs" in x["message"] for x in w)
    assert (w[1]["changed_edges"], w[1]["edges"]) == (3, 8)
    assert cell_changes(settled) == 2


def _entropy_fall(cifar10_mini_dir, tmp_path, name, **overrides):
    from bats_cli.core.config import resolve_config
    from bats_cli.core.presets import SEARCH_PRESETS
    from bats_cli.nas.search import SearchConfig, run_search

    # The cpu preset's α settings on a 3-cell first stage, cut to 6 architecture steps (one
    # epoch of 384 images, no warm-up).
    base = {"dataset": "imagefolder", "data_dir": str(cifar10_mini_dir), "layers": (3,), "ops": (8,),
            "epochs": 1, "warmup": 0, "subset": 384}
    cfg = resolve_config(SearchConfig, preset="cpu", presets=SEARCH_PRESETS, overrides={**base, **overrides})
    res = run_search(cfg, out_dir=tmp_path / name)
    with open(tmp_path / name / "metrics.csv", newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    init = json.loads((tmp_path / name / "alphas" / "stage1_epoch00.json").read_text())
    fall = sum(init["entropy_mean"].values()) - float(last["entropy_normal"]) - float(last["entropy_reduce"])
    return fall, res, json.loads((tmp_path / name / "result.json").read_text())


@pytest.mark.slow
def test_cpu_preset_alpha_moves_on_real_batches(cifar10_mini_dir, tmp_path):
    fall_cpu, _, result_cpu = _entropy_fall(cifar10_mini_dir, tmp_path, "cpu")
    # The paper's α learning rate over the same 6 steps barely moves α: the preset's 2e-2 matters.
    fall_paper, res, result = _entropy_fall(cifar10_mini_dir, tmp_path, "paper_lr", arch_lr=6e-4)
    assert fall_cpu > 5e-3, fall_cpu
    assert fall_paper < fall_cpu / 20, (fall_paper, fall_cpu)
    # Untempered: α's spread (measured 0.18 at 2e-2, 0.0067 at 6e-4) tells the two apart as well.
    spread = {name: summarise_run(tmp_path / name)["stages"][0] for name in ("cpu", "paper_lr")}
    assert spread["cpu"]["alpha_spread_normal"] > 10 * spread["paper_lr"]["alpha_spread_normal"]
    # That near-uniform search warns and records it; 6 steps at the preset's rate do not.
    assert [w["kind"] for w in result["warnings"]] == ["uniform"]
    assert res.warnings == result["warnings"] and "--arch-lr" in result["warnings"][0]["message"]
    assert "uniform" not in [w["kind"] for w in result_cpu["warnings"]]


# ---- untempered measures -----------------------------------------------------------------------


def test_t1_entropy_of_uniform_and_peaked_alpha():
    uniform = alpha_measures([[1.0] * 8] * 14, [[1.0] * 8] * 14)
    assert uniform["entropy_normal_rel_t1"] == pytest.approx(1.0)
    assert uniform["entropy_reduce_rel_t1"] == pytest.approx(1.0)
    assert uniform["alpha_spread_normal"] == 0.0 and uniform["alpha_spread_reduce"] == 0.0
    # One op 5 nats above seven others: p = e^5 / (e^5 + 7).
    peaked = [[5.0] + [0.0] * 7]
    p = math.exp(5) / (math.exp(5) + 7)
    q = (1 - p) / 7
    expected = -(p * math.log(p) + 7 * q * math.log(q)) / math.log(8)
    m = alpha_measures(peaked, [[1.0] * 8])
    assert m["entropy_normal_rel_t1"] == pytest.approx(expected) and expected < 0.3
    assert m["alpha_spread_normal"] == pytest.approx(5.0)


def _alphas_doc(alpha: list[list[float]], temperature: float, *, with_alpha: bool = True) -> dict:
    ops = [f"op{k}" for k in range(len(alpha[0]))]
    edges = []
    for row in alpha:
        edge = {"weights": dict(zip(ops, softmax(row, temperature)))}
        if with_alpha:
            edge["alpha"] = dict(zip(ops, row))
        edges.append(edge)
    return {"temperature_normal": temperature, "temperature_reduce": temperature,
            "normal": edges, "reduce": edges}


def test_retempering_alpha_leaves_the_untempered_measures_alone():
    alpha = [[0.9, 0.1, -0.4, 0.2, 0.0], [0.3, -0.2, 0.1, 0.6, -0.5]]
    t1, t02 = doc_measures(_alphas_doc(alpha, 1.0)), doc_measures(_alphas_doc(alpha, 0.2))
    # The same α re-tempered at 0.2 looks much sharper through softmax(α/T) ...
    assert t02["entropy_normal_rel"] < t1["entropy_normal_rel"] - 0.2
    # ... but not through softmax(α) or α's spread.
    for key in ("entropy_normal_rel_t1", "entropy_reduce_rel_t1", "alpha_spread_normal", "alpha_spread_reduce"):
        assert t02[key] == pytest.approx(t1[key])
    # A file without raw α: recovered from the weights and T (α = T log w + const per edge).
    recovered = doc_measures(_alphas_doc(alpha, 0.2, with_alpha=False))
    for key in ("entropy_normal_rel_t1", "alpha_spread_normal"):
        assert recovered[key] == pytest.approx(t1[key])


# ---- cross-seed similarity ---------------------------------------------------------------------


def _cell(*pairs) -> list[list]:
    return [[op, src] for op, src in pairs]


def _geno(normal, reduce, name="g") -> dict:
    return {"name": name, "space": "bats", "normal": normal, "normal_concat": [2, 3, 4, 5],
            "reduce": reduce, "reduce_concat": [2, 3, 4, 5]}


def test_cell_similarity_of_identical_and_partly_shared_cells():
    g3, g5, skip, avg = "group_conv_3x3", "group_conv_5x5", "skip_connect", "avg_pool_3x3"
    normal = _cell((g3, 0), (g5, 1), (skip, 0), (g3, 2), (avg, 1), (g5, 3), (g3, 4), (g3, 0))
    reduce = _cell((g5, 0), (g5, 1), (g3, 1), (g3, 2), (skip, 0), (g5, 3), (avg, 4), (g3, 1))
    a = _geno(normal, reduce, "a")
    same = cell_similarity([a, a])
    assert (same["normal"], same["reduce"], same["both"]) == (1.0, 1.0, 1.0)
    # The order of a node's two choices (strongest first) is not part of the architecture.
    swapped = _geno(normal[1:2] + normal[0:1] + normal[2:], reduce, "swapped")
    assert cell_similarity([a, swapped])["normal"] == 1.0
    # b shares 6 of 8 normal choices (node 2's op differs; node 5 takes a different input) and
    # 2 of 8 reduce choices (only node 2).
    b_normal = _cell((g3, 0), (g5, 1), (avg, 0), (g3, 2), (avg, 1), (g5, 3), (g3, 4), (g3, 1))
    b_reduce = reduce[:2] + _cell((g5, 1), (g5, 2), (avg, 0), (g3, 3), (g5, 4), (skip, 1))
    b = _geno(b_normal, b_reduce, "b")
    sim = cell_similarity([a, b, a])
    assert sim["pairs"] == 3 and sim["names"] == ["a", "b", "a"]
    assert sim["matrix"]["normal"][0][1] == sim["matrix"]["normal"][1][0] == pytest.approx(6 / 8)
    assert sim["matrix"]["reduce"][0][1] == pytest.approx(2 / 8)
    assert sim["matrix"]["both"][0][1] == pytest.approx(8 / 16)
    assert sim["matrix"]["both"][0][2] == 1.0
    assert sim["normal"] == pytest.approx((6 / 8 + 1.0 + 6 / 8) / 3)
    assert sim["both"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert cell_similarity([a])["both"] is None


def test_chance_similarity_matches_random_genotypes():
    from bats_cli.nas.random_genotypes import random_genotype

    chance = chance_similarity("bats")
    # 7 ops other than none; nodes with 2..5 inputs: mean of 2 / (n * 7).
    assert chance == pytest.approx(sum(2 / (n * 7) for n in (2, 3, 4, 5)) / 4)
    sim = cell_similarity([random_genotype("bats", seed) for seed in range(120)])
    assert sim["chance"]["both"] == chance
    assert sim["both"] == pytest.approx(chance, abs=0.015)
    assert sim["normal"] == pytest.approx(chance, abs=0.02) and sim["reduce"] == pytest.approx(chance, abs=0.02)


# ---- a search directory, post hoc --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_search(tmp_path_factory):
    from bats_cli.nas.search import SearchConfig, run_search

    out = tmp_path_factory.mktemp("health") / "search"
    # 2 stages of 3 epochs (1 warm-up) on 32 images: α gets 4 steps per stage at the paper's lr.
    cfg = SearchConfig(dataset="fashion-mini", subset=32, image_size=8, batch_size=8, epochs=3,
                       warmup=1, channels=6, layers=(3, 3), ops=(8, 3), threads=1, device="cpu")
    run_search(cfg, out_dir=out)
    return out


@pytest.mark.slow
def test_summarise_run_matches_what_the_search_recorded(small_search):
    out = small_search
    summary = summarise_run(out)
    result = json.loads((out / "result.json").read_text())
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert summary["finished"] and summary["genotype"] == json.loads((out / "genotype.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [1, 2]
    # A few α steps at 6e-4: α barely moved, and both the search and the summary say so.
    assert summary["warnings"] == result["warnings"]
    assert [w["kind"] for w in result["warnings"] if w["kind"] == "uniform"] == ["uniform", "uniform"]
    for s, recorded in zip(summary["stages"], result["stages"]):
        assert s["finished"] and s["last_epoch"] == 3 and s["search_epochs"] == 2
        assert recorded["health"] == {k: v for k, v in s.items() if k not in ("per_epoch", "genotype")}
        assert s["genotype"] == json.loads((out / "genotypes" / f"stage{s['stage']}.json").read_text())
        assert s["alpha_spread_normal"] < 0.05 and s["entropy_normal_rel_t1"] > 0.999
        assert s["entropy_normal_rel"] < s["entropy_normal_rel_t1"]
        before, after = (json.loads((out / "genotypes" / f"stage{s['stage']}_epoch{e:02d}.json").read_text())
                         for e in (2, 3))
        from bats_cli.nas.search_health import changed_edges

        assert s["changed_edges"] == changed_edges(before, after) and s["changed_epochs"] == 1
        assert s["edges"] == 16
        assert [p["epoch"] for p in s["per_epoch"]] == [0, 1, 2, 3]
        stage_rows = [r for r in rows if int(r["stage"]) == s["stage"]]
        for row, p in zip(stage_rows, s["per_epoch"][1:]):
            for key in ("entropy_normal_rel_t1", "entropy_reduce_rel_t1", "alpha_spread_normal", "alpha_spread_reduce"):
                assert float(row[key]) == pytest.approx(p[key], abs=2e-6)
            assert float(row["entropy_normal_rel"]) == pytest.approx(p["entropy_normal_rel"], abs=1e-6)
            assert int(row["changed_edges_last"]) == p["changed_edges_last"]
        # The row's count is against the stage's epoch e - 2 (epoch 0: the initial α).
        assert stage_rows[0]["changed_edges_last"] == "0"  # a warm-up epoch does not move α
    # Existing readers of metrics.csv still find their columns.
    assert {"entropy_normal_rel", "entropy_reduce_rel", "entropy_normal_0_2"} <= set(rows[-1])


@pytest.mark.slow
def test_summarise_run_reads_runs_of_older_code(small_search, tmp_path):
    """Alphas files without today's `untempered` block (any older search) give the same measures,
    and so do files with weights only (α recovered from T log w)."""
    import shutil

    from bats_cli.core.errors import UserInputError

    with pytest.raises(UserInputError, match="alphas"):
        summarise_run(tmp_path)
    new = summarise_run(small_search)
    for strip in ("untempered", "alpha"):
        old = tmp_path / strip
        shutil.copytree(small_search, old)
        for path in (old / "alphas").glob("*.json"):
            doc = json.loads(path.read_text())
            doc.pop("untempered", None)
            if strip == "alpha":
                for cell in ("normal", "reduce"):
                    for edge in doc[cell]:
                        edge.pop("alpha")
            path.write_text(json.dumps(doc))
        got = summarise_run(old)
        assert [w["kind"] for w in got["warnings"]] == [w["kind"] for w in new["warnings"]]
        for a, b in zip(got["stages"], new["stages"]):
            for key in ("entropy_normal_rel_t1", "alpha_spread_reduce", "changed_edges", "entropy_reduce_rel"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (strip, key)
    # A published copy keeps result.json and alphas/ but no genotypes/ files: its stages still count
    # as finished, with the same measures and warnings.
    pub = tmp_path / "published"
    shutil.copytree(small_search, pub)
    shutil.rmtree(pub / "genotypes")
    got = summarise_run(pub)
    assert all(s["finished"] for s in got["stages"]) and got["warnings"] == new["warnings"]
    (pub / "result.json").unlink()  # an unfinished run without genotypes/: its stages are not
    assert not any(s["finished"] for s in summarise_run(pub)["stages"])
