"""`bats derive`: the DARTS rule, skip cap, temperatures from the checkpoint, random genotypes, plots."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest
import torch
from helpers import cli as _cli
from helpers import one_line_error as _one_line_error

from bats_cli.core.errors import UserInputError
from bats_cli.core.genotype import Genotype, load_genotype
from bats_cli.core.spaces import SPACES, edge_endpoints
from bats_cli.core.zoo import load_zoo_genotype
from bats_cli.nas.derive import (
    derive_from_checkpoint,
    derive_genotype,
    edge_entropy,
    parameter_free_share,
)
from bats_cli.nas.random_genotypes import random_genotype
from bats_cli.storage.checkpoint import save_checkpoint

OPS = list(SPACES["bats"].candidates)  # none, max, avg, skip, g3, g5, dg3, dg5


def _onehot_weights(picks: dict[int, tuple[str, float]], n_edges: int = 14, ops=OPS) -> torch.Tensor:
    """Uniform-ish weights; edge e gets op picks[e][0] with weight picks[e][1] (rest shared)."""
    w = torch.full((n_edges, len(ops)), 0.0)
    for e in range(n_edges):
        w[e] = 0.01
        w[e, 0] = 0.5  # 'none' is strong everywhere and must never be chosen
        if e in picks:
            op, strength = picks[e]
            w[e, ops.index(op)] = strength
    return w / w.sum(dim=1, keepdim=True)


def test_darts_rule_on_hand_made_weights():
    # edges of node 0: (0,2)=0 (1,2)=1; node 1: 2,3,4; node 2: 5..8; node 3: 9..13
    normal = _onehot_weights({
        0: ("group_conv_5x5", 0.9), 1: ("dil_group_conv_3x3", 0.4),
        2: ("skip_connect", 0.2), 3: ("max_pool_3x3", 0.8), 4: ("group_conv_3x3", 0.7),
        5: ("avg_pool_3x3", 0.3), 6: ("group_conv_5x5", 0.6), 7: ("dil_group_conv_5x5", 0.65), 8: ("skip_connect", 0.1),
        9: ("group_conv_3x3", 0.9), 10: ("group_conv_3x3", 0.2), 11: ("group_conv_3x3", 0.3),
        12: ("group_conv_3x3", 0.2), 13: ("skip_connect", 0.95),
    })
    reduce = _onehot_weights({0: ("max_pool_3x3", 0.9), 1: ("max_pool_3x3", 0.8)})
    cands = [OPS] * 14
    g = derive_genotype(normal, reduce, cands, cands, space="bats", name="hand")
    # Strongest edge first within a node, as in DARTS.
    assert [list(p) for p in g.normal] == [
        ["group_conv_5x5", 0], ["dil_group_conv_3x3", 1],
        ["max_pool_3x3", 1], ["group_conv_3x3", 2],
        ["dil_group_conv_5x5", 2], ["group_conv_5x5", 1],
        ["skip_connect", 4], ["group_conv_3x3", 0],
    ]
    assert g.normal_concat == (2, 3, 4, 5) == g.reduce_concat
    assert g.reduce[:2] == (("max_pool_3x3", 0), ("max_pool_3x3", 1))
    assert "none" not in g.ops_used


def test_per_edge_candidate_lists_after_dropping():
    torch.manual_seed(1)
    cands = [["none", "skip_connect", "group_conv_5x5"] if e % 2 else
             ["max_pool_3x3", "group_conv_3x3", "dil_group_conv_5x5"] for e in range(14)]
    w = torch.softmax(torch.randn(14, 3), dim=-1)
    g = derive_genotype(w, w, cands, cands, space="bats")
    for cell in ("normal", "reduce"):
        start = 0
        chosen = g.cell(cell)
        for node in range(4):
            for op, src in chosen[2 * node: 2 * node + 2]:
                e = start + src
                ops = cands[e]
                best = max((k for k in range(3) if ops[k] != "none"), key=lambda k: float(w[e, k]))
                assert op == ops[best]
            start += node + 2


def test_max_skip_replaces_the_weakest_skips_by_their_next_best_op():
    picks = {e: ("skip_connect", 0.6 + 0.01 * e) for e in range(14)}
    normal = _onehot_weights(picks)
    for e in range(14):  # the runner-up on every edge
        normal[e, OPS.index("group_conv_5x5")] = 0.05
    normal = normal / normal.sum(1, keepdim=True)
    cands = [OPS] * 14
    free = derive_genotype(normal, normal, cands, cands, space="bats")
    assert sum(op == "skip_connect" for op, _ in free.normal) == 8
    capped = derive_genotype(normal, normal, cands, cands, space="bats", max_skip=2)
    skips = [(op, src) for op, src in capped.normal if op == "skip_connect"]
    assert len(skips) == 2
    # The two strongest skips (highest edge index = node 3's last edges) survive.
    assert capped.normal[6:] == (("skip_connect", 4), ("skip_connect", 3))
    assert {op for op, _ in capped.normal[:6]} == {"group_conv_5x5"}
    # P-DARTS caps the normal cell only.
    assert capped.reduce == free.reduce
    with pytest.raises(UserInputError):
        derive_genotype(normal, normal, cands, cands, space="bats", max_skip=-1)


def test_shape_and_name_errors():
    w = torch.full((14, 8), 1 / 8)
    with pytest.raises(UserInputError, match="14 edges"):
        derive_genotype(w[:10], w, [OPS] * 10, [OPS] * 14, space="bats")
    with pytest.raises(UserInputError, match="not candidates"):
        derive_genotype(w, w, [OPS] * 14, [OPS] * 14, space="darts")


def _save_search_ckpt(path, alpha_n, alpha_r, cands_n, cands_r, t_n, t_r, steps=4):
    arch = {"space": "bats", "steps": steps, "temperature_normal": t_n, "temperature_reduce": t_r,
            "candidates_normal": cands_n, "candidates_reduce": cands_r, "stage": 2, "run_name": "hand"}
    return save_checkpoint(path, {"model.alpha_normal": alpha_n, "model.alpha_reduce": alpha_r},
                           kind="search", config={}, epoch=25,
                           extra={"arch_state": json.dumps(arch)})


def test_checkpoint_temperatures_decide_which_edges_win(tmp_path):
    """Node 1 picks 2 of 3 edges; which two depends on T, so derive must use the checkpoint's T.

    At low T an edge's strength is its gap to the runner-up; at high T its lead over the mean.
    """
    cands = [["none", "skip_connect", "group_conv_3x3"]] * 14
    alpha = torch.zeros(14, 3)
    alpha[2] = torch.tensor([-10.0, 1.0, 0.9])  # input 0: far above the mean, tiny gap
    alpha[3] = torch.tensor([0.0, 1.0, 0.0])  # input 1: clear gap, small lead over the mean
    alpha[4] = torch.tensor([-3.0, 0.3, 0.0])  # input 2: in between at both temperatures
    cold = derive_from_checkpoint(_save_search_ckpt(tmp_path / "cold.safetensors", alpha, alpha, cands, cands,
                                                    0.1, 0.1))
    hot = derive_from_checkpoint(_save_search_ckpt(tmp_path / "hot.safetensors", alpha, alpha, cands, cands,
                                                   10.0, 10.0))
    assert {src for _, src in cold.normal[2:4]} == {1, 2}
    assert {src for _, src in hot.normal[2:4]} == {0, 2}
    assert cold.name == "hand" and "T_normal=0.1" in cold.notes
    assert "stage 3" in cold.source


def test_random_genotype_is_valid_and_seeded():
    a, b, c = random_genotype("bats", 3), random_genotype("bats", 3), random_genotype("bats", 4)
    assert a == b and a.normal != c.normal
    for g in (a, c, random_genotype("darts", 0, steps=5)):
        assert "none" not in g.ops_used
        for cell in ("normal", "reduce"):
            entries = g.cell(cell)
            for k in range(len(entries) // 2):
                srcs = [src for _, src in entries[2 * k: 2 * k + 2]]
                assert len(set(srcs)) == 2 and max(srcs) <= k + 1
    Genotype.from_json(a.to_json())


def test_entropy_and_parameter_free_share():
    assert edge_entropy(torch.full((2, 8), 1 / 8)).tolist() == pytest.approx([math.log(8)] * 2)
    assert edge_entropy(torch.eye(3)).tolist() == [0.0, 0.0, 0.0]
    g = load_zoo_genotype("bats_c10")
    share = parameter_free_share(g)
    assert share["normal"] == pytest.approx(2 / 8) and share["reduce"] == pytest.approx(3 / 8)
    assert len(edge_endpoints(4)) == 14 and edge_endpoints(4)[-1] == (4, 5)


# --------------------------------------------------------------------------- CLI


def test_cli_random_with_plots(tmp_path, capsys):
    from PIL import Image

    out, svg, png, dot = (tmp_path / n for n in ("r.json", "r.svg", "r.png", "r.dot"))
    code, _, err = _cli(["derive", "--random", "--seed", "5", "--space", "darts", "-o", str(out),
                         "--plot", str(svg), "--dot", str(dot)], capsys)
    assert code == 0, err
    g = load_genotype(out)
    assert g.space == "darts" and g == random_genotype("darts", 5)
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text()
    for op, _ in g.normal:
        assert op in text
    assert dot.read_text().startswith("digraph") and "->" in dot.read_text()
    code, stdout, err = _cli(["derive", "--random", "--seed", "5", "--plot", str(png), "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["plot"] == str(png) and res["genotype"]["space"] == "bats"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


def test_cli_bad_inputs(tmp_path, capsys):
    g = tmp_path / "g.json"
    load_zoo_genotype("bats_c10").save(g)
    _one_line_error(*_cli(["derive", str(g)], capsys)[::2], "search checkpoint")
    train = save_checkpoint(tmp_path / "t.safetensors", {"w": torch.zeros(1)}, kind="train", config={}, epoch=1)
    _one_line_error(*_cli(["derive", str(train)], capsys)[::2], "train checkpoint", "search")
    _one_line_error(*_cli(["derive"], capsys)[::2], "--random")
    _one_line_error(*_cli(["derive", str(train), "--random"], capsys)[::2], "not both")
    _one_line_error(*_cli(["derive", str(tmp_path / "missing.safetensors")], capsys)[::2], "no such")
    _one_line_error(*_cli(["derive", "--random", "--space", "resnet"], capsys)[::2], "resnet")
    _one_line_error(*_cli(["derive", "--random", "--plot", str(tmp_path / "x.pdf")], capsys)[::2], ".svg")
    _one_line_error(*_cli(["derive", str(tmp_path)], capsys)[::2], "last.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    _one_line_error(*_cli(["derive", str(tmp_path / "junk.safetensors")], capsys)[::2], "junk.safetensors")
    # An existing output is not overwritten without --force.
    _one_line_error(*_cli(["derive", "--random", "-o", str(g)], capsys)[::2], "--force")


def test_plot_bundled_genotypes(tmp_path):
    from bats_cli.studies.plot import save_plot, to_dot

    for name in ("bats_c10", "nasnet_a", "darts_v2"):
        g = load_zoo_genotype(name)
        ET.fromstring(save_plot(g, tmp_path / f"{name}.svg").read_text())
        assert save_plot(g, tmp_path / f"{name}.png").stat().st_size > 1000
        assert to_dot(g).count("->") == len(g.normal) + len(g.reduce) + len(g.normal_concat) + len(g.reduce_concat)
