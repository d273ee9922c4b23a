"""`bats search`: config, op dropping, bilevel steps, temperatures, outputs, resume, signals, CLI errors."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from helpers import cli as _cli
from helpers import one_line_error as _one_line_error
from helpers import random_images, sigterm_stops_resumably, start_bats

from bats_cli.core.config import validate_config
from bats_cli.core.errors import Interrupted, UserInputError
from bats_cli.core.genotype import load_genotype
from bats_cli.core.presets import SEARCH_PRESETS
from bats_cli.core.spaces import SPACES
from bats_cli.nas.derive import edge_entropy, load_arch_snapshot
from bats_cli.nas.search import SearchConfig, run_search
from bats_cli.nas.searcher import Searcher, drop_weakest_ops
from bats_cli.storage.checkpoint import load_checkpoint, read_metadata

# Small enough for CPU tests: 8 px images, 2 steps per epoch, 3 cells (the least with a normal cell).
TINY = dict(
    dataset="fashion-mini", subset=32, image_size=8, batch_size=8, epochs=2, warmup=1, channels=6, layers=(3, 3, 3),
    threads=1,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- config


def test_defaults_are_the_papers_numbers():
    c = SearchConfig()
    assert (c.layers, c.ops, c.epochs, c.warmup, c.batch_size) == ((5, 11, 17), (8, 5, 3), 25, 10, 96)
    assert (c.temp_normal, c.temp_reduce) == (0.2, 0.15)
    assert (c.arch_lr, c.arch_weight_decay, c.arch_betas) == (6e-4, 1e-3, (0.5, 0.999))
    assert (c.optimizer, c.lr, c.weight_decay, c.betas, c.lr_schedule) == ("adam", 1e-3, 3e-4, (0.9, 0.999), "constant")
    assert (c.weights, c.activations, c.space, c.nodes) == ("real", "binary", "bats", 4)
    assert c.channels == 18 and c.channels % c.channels_per_group == 0
    assert c.spec.activations and not c.spec.weights
    # The search domain alone never switches the optimiser (Table 4 varies the domain only) ...
    r = SearchConfig(weights="real", activations="real")
    assert (r.optimizer, r.lr, r.lr_schedule) == ("adam", 1e-3, "constant")
    assert r.spec.real
    # ... Appendix B's recipe (SGD, lr 0.1, momentum 0.9, cosine) is asked for explicitly.
    r = SearchConfig(weights="real", activations="real", optimizer="sgd")
    assert (r.optimizer, r.lr, r.momentum, r.lr_schedule) == ("sgd", 0.1, 0.9, "cosine")
    # Explicit values win over the derived ones.
    assert SearchConfig(weights="real", activations="real", optimizer="sgd", lr=0.05).lr == 0.05


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"layers": (5, 11), "ops": (8, 5, 3)}, "one value per stage"),
        ({"ops": (5, 3, 2)}, "all 8 ops"),
        ({"ops": (8, 3, 5)}, "must not grow"),
        ({"ops": (8, 5, 1)}, "at least 2"),
        ({"warmup": 25}, "--warmup"),
        ({"channels": 16}, "--channels 16"),
        ({"layers": (2, 5, 8)}, "at least 3 cells"),
        ({"temp_normal": 0}, "--temp-normal"),
    ],
)
def test_bad_configs_are_one_line_errors(bad, needle):
    with pytest.raises(UserInputError) as exc:
        validate_config(SearchConfig, bad)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- op dropping


def test_drop_weakest_ops_keeps_the_strongest_in_space_order():
    ops = list(SPACES["bats"].candidates)
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(14, 8), dim=-1)
    five = drop_weakest_ops(w, [ops] * 14, 5)
    assert all(len(e) == 5 for e in five)
    for e, kept in enumerate(five):
        order = sorted(range(8), key=lambda k: -float(w[e, k]))[:5]
        assert kept == [ops[k] for k in sorted(order)]
    w5 = torch.softmax(torch.randn(14, 5), dim=-1)
    three = drop_weakest_ops(w5, five, 3)
    assert all(len(e) == 3 and set(e) <= set(f) for e, f in zip(three, five))
    with pytest.raises(ValueError):
        drop_weakest_ops(w5, five, 6)


# --------------------------------------------------------------------------- one tiny search, shared


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("search") / "tiny"
    result = run_search(SearchConfig(**TINY), out_dir=out)
    torch.set_num_threads(before)
    return out, result


def test_stages_drop_to_5_then_3_ops_per_edge(tiny_run):
    out, _ = tiny_run
    snaps = [load_arch_snapshot(out / f"stage{k}.safetensors") for k in (1, 2, 3)]
    for snap, k in zip(snaps, (8, 5, 3)):
        for cands in (snap.candidates_normal, snap.candidates_reduce):
            assert len(cands) == 14 and all(len(ops) == k for ops in cands)
    # The survivors are exactly the strongest ops of the previous stage's final weights.
    for prev, nxt, keep in ((snaps[0], snaps[1], 5), (snaps[1], snaps[2], 3)):
        assert nxt.candidates_normal == drop_weakest_ops(prev.weights("normal"), prev.candidates_normal, keep)
        assert nxt.candidates_reduce == drop_weakest_ops(prev.weights("reduce"), prev.candidates_reduce, keep)
    assert [s.stage for s in snaps] == [0, 1, 2]


def test_outputs_of_a_run(tiny_run):
    out, result = tiny_run
    g = load_genotype(out / "genotype.json")
    assert g == result.genotype and g.space == "bats" and g.name == "tiny"
    assert g.source and "bats search" in g.source and "T_normal=0.2" in g.notes
    assert "none" not in g.ops_used
    for stage in (1, 2, 3):
        load_genotype(out / "genotypes" / f"stage{stage}.json")
        for epoch in (1, 2):
            load_genotype(out / "genotypes" / f"stage{stage}_epoch{epoch:02d}.json")
            doc = json.loads((out / "alphas" / f"stage{stage}_epoch{epoch:02d}.json").read_text())
            assert doc["temperature_normal"] == 0.2 and doc["temperature_reduce"] == 0.15
            edge = doc["normal"][0]
            assert sum(edge["weights"].values()) == pytest.approx(1.0)
            assert set(edge["weights"]) == set(edge["alpha"])
            assert 0 <= edge["entropy"] <= edge["entropy_max"] + 1e-9
            assert set(doc["parameter_free_share"]) == {"normal", "reduce"}
    rows = list(__import__("csv").DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["phase"] for r in rows] == ["warm-up", "search"] * 3
    assert rows[0]["arch_loss"] == "" and float(rows[1]["arch_loss"]) > 0
    for key in ("entropy_normal_0_2", "entropy_reduce_4_5", "param_free_normal", "param_free_reduce",
                "entropy_normal", "train_acc", "arch_acc", "genotype"):
        assert key in rows[0]
    assert len(result.stages) == 3 and all(s.seconds > 0 for s in result.stages)
    data = json.loads((out / "result.json").read_text())
    assert data["genotype"]["name"] == "tiny" and len(data["stage_seconds"]) == 3
    meta = read_metadata(out / "last.safetensors")
    assert meta.kind == "search" and meta.epoch == 2 and meta.extra["stage"] == "3"
    assert json.loads(meta.genotype_json)["normal"] == [list(p) for p in g.normal]


def test_alphas_move_only_after_warmup(tiny_run):
    out, _ = tiny_run
    for stage in (1, 2, 3):
        docs = [json.loads((out / "alphas" / f"stage{stage}_epoch{e:02d}.json").read_text()) for e in (0, 1, 2)]
        alphas = [[list(edge["alpha"].values()) for edge in d["normal"] + d["reduce"]] for d in docs]
        assert docs[0]["phase"] == "init" and docs[1]["phase"] == "warm-up"
        assert alphas[0] == alphas[1], "a warm-up epoch changed the architecture weights"
        assert alphas[1] != alphas[2], "the search epoch did not move the architecture weights"


def test_derive_reads_a_search_checkpoint_alone(tiny_run, capsys, tmp_path):
    out, result = tiny_run
    target = tmp_path / "derived.json"
    code, _, err = _cli(["derive", str(out / "last.safetensors"), "-o", str(target)], capsys)
    assert code == 0, err
    g = load_genotype(target)
    assert (g.normal, g.reduce) == (result.genotype.normal, result.genotype.reduce)
    # A run directory works too; the default output is the genotype JSON on stdout.
    code, stdout, err = _cli(["derive", str(out)], capsys)
    assert code == 0 and json.loads(stdout)["normal"] == [list(p) for p in g.normal]


# --------------------------------------------------------------------------- steps and temperature


def _searcher(tmp_path, **kw):
    from bats_cli.storage.rundir import RunDir
    from bats_cli.utils.progress import Reporter

    cfg = SearchConfig(**{**TINY, **kw})
    s = Searcher(cfg, run=RunDir(tmp_path / "run", resume=False), reporter=Reporter(quiet=True),
                 device=torch.device("cpu"), data=(random_images(16, 8), random_images(16, 8)), in_channels=1, num_classes=10)
    s.build_stage(1, 10)
    return s


def test_arch_step_moves_only_alpha_and_weight_step_only_weights(tmp_path):
    s = _searcher(tmp_path)
    x, y = random_images(8, 8).tensors

    def snapshot():
        return ({n: p.detach().clone() for n, p in s.model.named_parameters() if not n.startswith("alpha")},
                [a.detach().clone() for a in s.model.arch_parameters()])

    w0, a0 = snapshot()
    s.weight_step(x, y)
    w1, a1 = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(a0, a1)), "a weight step moved alpha"
    assert any(not torch.equal(w0[n], w1[n]) for n in w0)
    s.arch_step(x, y)
    w2, a2 = snapshot()
    assert all(torch.equal(w1[n], w2[n]) for n in w1), "an architecture step moved a weight"
    assert all(not torch.equal(a, b) for a, b in zip(a1, a2))


def test_low_temperature_sharpens_every_edge():
    from bats_cli.models.supernet import SuperNet, SupernetConfig

    torch.manual_seed(0)
    alphas = 0.3 * torch.randn(14, 8)
    sharp = edge_entropy(torch.softmax(alphas / 0.2, dim=-1))
    flat = edge_entropy(torch.softmax(alphas, dim=-1))
    assert bool((sharp < flat).all())
    assert float(flat.mean() - sharp.mean()) > 0.1
    # The supernet applies its own temperatures (0.2 normal, 0.15 reduce; 1 = DARTS).
    nets = {t: SuperNet(SupernetConfig(channels=6, layers=3, in_channels=1, temperature_normal=t,
                                       temperature_reduce=t)) for t in (0.2, 1.0)}
    for net in nets.values():
        with torch.no_grad():
            net.alpha_normal.copy_(alphas)
    h = {t: edge_entropy(net.edge_weights(False).detach()) for t, net in nets.items()}
    assert bool((h[0.2] < h[1.0]).all())
    assert float(h[1.0].max()) <= math.log(8) + 1e-9


# --------------------------------------------------------------------------- resume


class _StopAfter:
    """Acts like GracefulInterrupt with a signal arriving at the n-th check."""

    def __init__(self, n):
        self.n = n
        self.calls = 0
        self.requested = False

    def raise_if_requested(self, save_fn=None):
        self.calls += 1
        if self.calls == self.n:
            self.requested = True
            saved = save_fn() if save_fn else None
            raise Interrupted(f"stopped; checkpoint {saved}")


def _tensors(path):
    tensors, _ = load_checkpoint(path, expect_kind="search")
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    cfg = SearchConfig(**{**TINY, "layers": (3, 4), "ops": (8, 3), "epochs": 3})
    full = run_search(cfg, out_dir=tmp_path / "full")
    # Stop mid-epoch in stage 1's search phase, then mid-epoch in stage 2, then finish.
    with pytest.raises(Interrupted):
        run_search(cfg, out_dir=tmp_path / "cut", interrupt=_StopAfter(4))
    meta = read_metadata(tmp_path / "cut" / "last.safetensors")
    assert (meta.extra["stage"], meta.epoch, meta.step) == ("1", 1, 1)
    with pytest.raises(Interrupted):
        run_search(cfg, out_dir=tmp_path / "cut", resume=True, interrupt=_StopAfter(10))
    meta = read_metadata(tmp_path / "cut" / "last.safetensors")
    assert (meta.extra["stage"], meta.epoch, meta.step) == ("2", 1, 1)
    resumed = run_search(cfg, out_dir=tmp_path / "cut", resume=True)
    a, b = _tensors(tmp_path / "full" / "last.safetensors"), _tensors(tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.genotype.normal == full.genotype.normal and resumed.genotype.reduce == full.genotype.reduce
    rows = list(__import__("csv").DictReader(open(tmp_path / "cut" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    full_rows = list(__import__("csv").DictReader(open(tmp_path / "full" / "metrics.csv")))
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in full_rows]


@pytest.mark.slow
def test_resume_with_another_config_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["search", "--dataset", "fashion-mini", "--subset", "32", "--image-size", "8", "--batch-size", "8", "--epochs", "2",
            "--warmup", "1", "--channels", "6", "--layers", "3,3", "--ops", "8,3", "--threads", "1",
            "--out", str(out), "-q"]
    cfg = validate_config(SearchConfig, {**TINY, "layers": (3, 3), "ops": (8, 3)})
    with pytest.raises(Interrupted):
        run_search(cfg, out_dir=out, interrupt=_StopAfter(1))
    code, _, err = _cli(args[:-3] + ["--epochs", "3", "--temp-normal", "0.5", "--out", str(out), "--resume"], capsys)
    _one_line_error(code, err, "cannot resume", "epochs: 2 -> 3", "temp_normal: 0.2 -> 0.5")
    # Without --resume an existing run is not overwritten.
    code, _, err = _cli(args, capsys)
    _one_line_error(code, err, "--resume")
    # Same command line + --resume (or just --out --resume) continues.
    code, out_json, err = _cli(["search", "--out", str(out), "--resume", "--json", "-q"], capsys)
    assert code == 0, err
    assert json.loads(out_json)["genotype"]["space"] == "bats"


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = start_bats(["search", "--dataset", "fashion-mini", "--subset", "64", "--image-size", "8",
                       "--batch-size", "8", "--epochs", "40", "--warmup", "1", "--channels", "6", "--layers",
                       "3,3", "--ops", "8,3", "--device", "cpu", "--out", str(out)], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (out / "alphas" / "stage1_epoch01.json").exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    sigterm_stops_resumably(proc)
    meta = read_metadata(out / "last.safetensors")
    assert meta.kind == "search" and meta.extra["stage"] == "1" and meta.epoch >= 1
    # It resumes where it stopped: one more step, then it stops again.
    cfg = validate_config(SearchConfig, meta.config)
    with pytest.raises(Interrupted):
        run_search(cfg, out_dir=out, resume=True, interrupt=_StopAfter(1))
    after = read_metadata(out / "last.safetensors")
    steps = 4  # 64 images -> 32 per half -> 4 batches of 8
    done_before = meta.epoch * steps + meta.step
    # A checkpoint taken after an epoch's last step (step == 4) resumes into the epoch's end.
    assert after.epoch * steps + after.step == done_before + (0 if meta.step == steps else 1)
    assert after.extra["stage"] == "1"


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_darts_space_json(tmp_path, capsys):
    code, out, err = _cli(
        ["search", "--dataset", "fashion-mini", "--space", "darts", "--subset", "32", "--image-size", "8", "--batch-size", "8",
         "--epochs", "2", "--warmup", "1", "--channels", "6", "--layers", "3,3", "--ops", "8,3",
         "--threads", "1", "--out", str(tmp_path / "d"), "--json", "-q"],
        capsys,
    )
    assert code == 0, err
    assert out.count("\n") == 1
    res = json.loads(out)
    assert res["genotype"]["space"] == "darts"
    assert {op for op, _ in res["genotype"]["normal"] + res["genotype"]["reduce"]} <= set(SPACES["darts"].candidates)
    assert len(res["stage_seconds"]) == 2
    load_genotype(res["genotype_path"])


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--layers", "5,11", "--ops", "8,5,3"], "one value per stage"),
        (["--layers", "5,x,17"], "--layers"),
        (["--channels", "16"], "--channels 16"),
        (["--real", "--activations", "binary"], "--real"),
        (["--preset", "huge"], "--preset"),
        (["--dataset", "imagefolder"], "--data-dir"),
        (["--resume"], "--out"),
        (["--weights", "ternary"], "--weights"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys):
    extra = [] if "--resume" in argv else ["--out", str(tmp_path / "x")]
    code, _, err = _cli(["search", *argv, *extra], capsys)
    _one_line_error(code, err, needle)


def test_presets_resolve():
    from bats_cli.core.config import resolve_config

    tiny = resolve_config(SearchConfig, preset="tiny", presets=SEARCH_PRESETS, overrides={"epochs": 3})
    assert tiny.layers == (3, 4, 5) and tiny.epochs == 3 and tiny.ops == (8, 5, 3)
    assert tiny.dataset == "fashion-mini"
    small = resolve_config(SearchConfig, preset="small", presets=SEARCH_PRESETS, overrides={})
    assert small.warmup < small.epochs
    assert resolve_config(SearchConfig, preset="paper", presets=SEARCH_PRESETS, overrides={}) == SearchConfig()


@pytest.mark.slow
def test_search_on_real_images(cifar10_mini_dir, tmp_path):
    cfg = SearchConfig(**{**TINY, "dataset": "imagefolder", "data_dir": str(cifar10_mini_dir),
                          "layers": (3, 3), "ops": (8, 3), "subset": 40})
    result = run_search(cfg, out_dir=tmp_path / "c10")
    assert result.genotype.space == "bats"
    meta = read_metadata(tmp_path / "c10" / "last.safetensors")
    assert json.loads(meta.extra["search_state"])["in_channels"] == 3
