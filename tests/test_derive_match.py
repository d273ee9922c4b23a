"""`bats derive --random --match`: random cells drawn until their network's size matches a genotype's."""

from __future__ import annotations

import json

import pytest
from helpers import cli as _cli
from helpers import one_line_error as _one_line_error

from bats_cli.core.errors import UserInputError
from bats_cli.core.genotype import load_genotype
from bats_cli.core.zoo import load_zoo_genotype
from bats_cli.nas.random_genotypes import (
    match_network,
    matched_random_genotype,
    network_cost,
    random_genotype,
)

TARGET = load_zoo_genotype("bats_c10")


def test_cpu_preset_network_is_the_train_presets():
    net = match_network()
    assert (net.preset, net.dataset, net.image_size, net.layers, net.channels) == ("cpu", "cifar10", 16, 6, 12)
    paper = match_network("paper")
    assert (paper.image_size, paper.layers, paper.channels) == (32, None, None)
    assert match_network("cpu", layers=8, channels=24).layers == 8
    with pytest.raises(UserInputError, match="--preset"):
        match_network("huge")


def test_count_matches_bats_flops():
    """The count is the one `bats flops` gives for the same network."""
    from bats_cli.models.counting import count_model
    from bats_cli.models.networks import build_network

    net = match_network()
    model = build_network(TARGET, kind="cifar", layers=6, channels=12)  # with its auxiliary tower
    report = count_model(model, (3, 16, 16))  # on the meta device
    cost = network_cost(TARGET, net)
    assert cost["params"] == report.params and cost["ops"] == pytest.approx(report.ops)
    assert network_cost(TARGET, net, "params") == {"params": report.params}  # the meta-device count


@pytest.mark.slow
@pytest.mark.parametrize("by", ["params", "ops"])
def test_several_seeds_land_within_tolerance(by):
    net = match_network()
    for seed in range(3):
        m = matched_random_genotype(TARGET, seed, by=by, tolerance=0.1, network=net)
        target, value = network_cost(TARGET, net)[by], network_cost(m.genotype, net)[by]
        assert (m.target, m.value) == (target, value)
        assert abs(value - target) <= 0.1 * target
        assert m.draws >= 1 and m.genotype.space == "bats" and "none" not in m.genotype.ops_used
        # Deterministic: the same seed gives the same cell after the same number of draws.
        again = matched_random_genotype(TARGET, seed, by=by, tolerance=0.1, network=net)
        assert again.genotype == m.genotype and again.draws == m.draws


def test_first_draw_is_the_plain_random_cell():
    net = match_network()
    # Wide enough to accept anything: the first draw is `derive --random --seed 5`.
    m = matched_random_genotype(TARGET, 5, tolerance=10.0, network=net)
    assert m.draws == 1
    plain = random_genotype("bats", 5)
    assert (m.genotype.normal, m.genotype.reduce) == (plain.normal, plain.reduce)


def test_impossible_tolerance_is_a_clear_error():
    net = match_network()
    with pytest.raises(UserInputError, match="no random bats cell within .* in 20 draws"):
        matched_random_genotype(TARGET, 0, tolerance=0.0, max_draws=20, network=net)
    for bad in (dict(by="flops"), dict(tolerance=-0.1), dict(max_draws=0)):
        with pytest.raises(UserInputError):
            matched_random_genotype(TARGET, 0, network=net, **bad)


def test_cli_json_reports_draws_target_and_value(tmp_path, capsys):
    out = tmp_path / "m.json"
    code, stdout, err = _cli(["derive", "--random", "--seed", "2", "--match", "bats_c10", "--match-by", "ops",
                              "--tolerance", "0.05", "--threads", "1", "-o", str(out), "--json"], capsys)
    assert code == 0, err
    m = res = json.loads(stdout)
    assert m["target_genotype"] == "bats_c10" and m["match_by"] == "ops" and m["tolerance"] == 0.05
    assert abs(m["value"] - m["target"]) <= 0.05 * m["target"] and m["draws"] >= 1
    assert m["match_network"] == {"preset": "cpu", "dataset": "cifar10", "image_size": 16, "layers": 6,
                                  "channels": 12}
    g = load_genotype(out)
    assert g.to_dict() == res["genotype"] and "bats_c10" in g.notes and "--match bats_c10" in g.source
    assert network_cost(g, match_network())["ops"] == m["value"]
    # Without -o / --json: the genotype on stdout, the match on stderr.
    code, stdout, err = _cli(["derive", "--random", "--seed", "2", "--match", "bats_c10", "--match-by", "ops",
                              "--tolerance", "0.05"], capsys)
    assert code == 0 and json.loads(stdout)["normal"] == res["genotype"]["normal"]
    assert "matched bats_c10 by ops" in err


def test_cli_bad_inputs(capsys):
    _one_line_error(*_cli(["derive", "--random", "--match", "bats_c10", "--tolerance", "0", "--max-draws", "1"],
                          capsys)[::2], "1 draws", "--max-draws")
    _one_line_error(*_cli(["derive", "--random", "--preset", "cpu"], capsys)[::2], "--preset", "--match")
    _one_line_error(*_cli(["derive", "--random", "--match", "bats_c10", "--space", "darts"], capsys)[::2], "--space")
    _one_line_error(*_cli(["derive", "--random", "--match", "nope_genotype"], capsys)[::2], "nope_genotype")
    argv = ["derive", "--random", "--match", "bats_c10", "--match-by", "macs"]
    _one_line_error(*_cli(argv, capsys)[::2], "--match-by")
