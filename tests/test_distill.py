"""Distillation from a teacher (`--teacher`): the losses, a frozen teacher, refused teachers, the chain."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import assert_same_state, cli, one_line_error, random_images

from bats_cli.core.errors import Interrupted, UserInputError
from bats_cli.core.zoo import resolve_genotype
from bats_cli.models.modelio import model_tensors, network_settings
from bats_cli.models.networks import build_network
from bats_cli.pipeline.binarize import BinarizeConfig, binarize
from bats_cli.pipeline.train import TrainConfig, train
from bats_cli.storage.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from bats_cli.training.distill import Distill, attention_loss, file_sha256, kd_loss, load_teacher
from bats_cli.training.fit import FitSpec, TrainJob
from bats_cli.utils.distributed import Dist

# 3 cells of 6 channels on 128 fashion-mini images at 16 px: 4 steps per epoch.
TINY = dict(genotype="bats_c10", dataset="fashion-mini", layers=3, channels=6, batch_size=32, subset=128,
            image_size=16, epochs=1, device="cpu", threads=1)
DATA = {"name": "fashion-mini", "image_size": 16, "num_classes": 10, "in_channels": 1, "network": "cifar"}


# --------------------------------------------------------------------------- the losses


def test_kd_loss_is_the_hand_computed_kl():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [3.0, -1.0, 0.0]])

    def kl(ps, pt):
        return sum(b * math.log(b / a) for a, b in zip(ps, pt))

    def softmax(row, T):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    for T in (1.0, 4.0):
        want = T * T * sum(kl(softmax(a, T), softmax(b, T)) for a, b in zip(s.tolist(), t.tolist())) / 2
        assert kd_loss(s, t, T).item() == pytest.approx(want, rel=1e-6)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_loss_compares_normalised_maps():
    a = torch.randn(2, 4, 3, 3)
    assert attention_loss([a], [3 * a]).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    b = torch.randn(2, 8, 3, 3)  # channel counts may differ: the map is a mean over channels
    qa = a.pow(2).mean(1).flatten(1)
    qb = b.pow(2).mean(1).flatten(1)
    want = (qa / qa.norm(dim=1, keepdim=True) - qb / qb.norm(dim=1, keepdim=True)).norm(dim=1).mean()
    assert attention_loss([a], [b]).item() == pytest.approx(want.item(), rel=1e-6)


# --------------------------------------------------------------------------- a frozen teacher


def test_teacher_gets_no_gradient_and_stays_in_eval_mode():
    torch.manual_seed(0)
    g = resolve_genotype("bats_c10")
    teacher = build_network(g, in_channels=1, num_classes=10, layers=3, channels=6, real=True)
    student = build_network(g, in_channels=1, num_classes=10, layers=3, channels=6)
    teacher.train()  # the job must put it in eval mode itself
    teacher.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    from bats_cli.training.distill import feature_modules

    distill = Distill(teacher=teacher, path="t", sha256="0" * 64, attention_weight=0.5,
                      _features=feature_modules(teacher))
    spec = FitSpec(kind="train", model=student, run_config={}, settings=network_settings(student), data={},
                   genotype_json=g.to_json(), epochs=1, batch_size=4, eval_batch_size=4, lr=1e-3, lr_min=0.0,
                   betas=(0.9, 0.999), weight_decay=0.0, aux_weight=0.4, mixup=None, seed=0,
                   precision="fp32", num_workers=0, distill=distill)
    job = TrainJob(spec, random_images(8, 16), random_images(8, 16), device=torch.device("cpu"),
                   dist_info=Dist())
    s_before = [p.clone() for p in student.parameters()]
    _, loader = job.begin_epoch()
    for batch in loader:
        job.train_step(batch)
        job.step += 1
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # BatchNorm statistics too
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters()))


# --------------------------------------------------------------------------- refused teachers


def _checkpoint(path, *, num_classes=10, channels=6, real=True, genotype="bats_c10", data=DATA):
    g = resolve_genotype(genotype)
    net = build_network(g, in_channels=1, num_classes=num_classes, layers=3, channels=channels, real=real)
    return save_checkpoint(path, model_tensors(net), kind="train",
                           config={"network": network_settings(net), "data": {**data, "num_classes": num_classes},
                                   "run": {"seed": 0}}, epoch=1, genotype_json=g.to_json())


def _train_argv(out, *extra):
    return ["train", "bats_c10", "--dataset", "fashion-mini", "--subset", "32", "--image-size", "16",
            "--layers", "3", "--channels", "6", "--batch-size", "16", "--epochs", "1", "--threads", "1",
            "--device", "cpu", "--out", str(out), "--quiet", *extra]


def test_mismatched_teachers_are_one_error(tmp_path, capsys):
    five = _checkpoint(tmp_path / "five.safetensors", num_classes=5)
    wide = _checkpoint(tmp_path / "wide.safetensors", channels=8)
    other = _checkpoint(tmp_path / "darts.safetensors", genotype="darts_v2")
    cifar = _checkpoint(tmp_path / "cifar.safetensors", data={**DATA, "name": "cifar10"})
    cases = [
        (["--teacher", str(five)], ("5 classes", "10")),
        (["--teacher", str(wide), "--attention-weight", "1"], ("stage shapes",)),
        (["--teacher", str(other), "--attention-weight", "1"], ("stage shapes",)),
        (["--teacher", str(cifar)], ("cifar10", "fashion-mini")),
        (["--teacher", str(tmp_path / "none.safetensors")], ("no such file",)),
        (["--kd-weight", "0.5"], ("--kd-weight", "--teacher")),
        (["--attention-weight", "1"], ("--attention-weight", "--teacher")),
    ]
    for extra, needles in cases:
        one_line_error(*cli(_train_argv(tmp_path / "run", *extra), capsys)[::2], *needles)
        assert not (tmp_path / "run").exists()  # refused before the run directory exists
    # A wider teacher is fine without attention matching (only the outputs are compared).
    assert load_teacher(wide, student=build_network(resolve_genotype("bats_c10"), in_channels=1,
                                                    num_classes=10, layers=3, channels=6),
                        settings={"num_classes": 10, "in_channels": 1, "kind": "cifar"},
                        dataset="fashion-mini", input_shape=(1, 16, 16)).sha256 == file_sha256(wide)
    code, _, err = cli(["binarize", str(five), "--teacher", str(five), "--epochs", "0"], capsys)
    one_line_error(code, err, "--teacher", "--epochs 0")


# --------------------------------------------------------------------------- the chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """teacher (--real) -> step 1 with the teacher (and attention) -> binarize with the teacher."""
    root = tmp_path_factory.mktemp("distill")
    g = resolve_genotype("bats_c10")
    teacher = train(TrainConfig(**TINY, real=True), genotype=g, out=root / "T", quiet=True,
                    handle_signals=False)
    t_path = root / "teacher.safetensors"
    shutil.copy(teacher["last"], t_path)
    student = train(TrainConfig(**TINY, teacher=str(t_path), attention_weight=0.5), genotype=g,
                    out=root / "S", quiet=True, handle_signals=False)
    binarized = binarize(BinarizeConfig(checkpoint=student["last"], epochs=1, device="cpu", calibration_batches=2,
                                        threads=1, teacher=str(t_path), kd_temperature=2.0),
                         out=root / "B", packed=root / "b.packed.safetensors", quiet=True, handle_signals=False)
    return root, t_path, student, binarized


@pytest.mark.slow
def test_runs_record_the_teacher(chain):
    root, t_path, student, binarized = chain
    digest = file_sha256(t_path)
    for run, result in ((root / "S", student), (root / "B", binarized)):
        assert result["teacher"]["sha256"] == digest and result["teacher"]["path"] == str(t_path)
        config = json.loads((run / "config.json").read_text())
        assert config["teacher"]["sha256"] == digest and config["config"]["teacher"] == str(t_path)
        meta = read_metadata(run / "last.safetensors")
        assert json.loads(meta.extra["bats_teacher"])["sha256"] == digest
    assert binarized["teacher"]["temperature"] == 2.0 and student["teacher"]["attention_weight"] == 0.5


@pytest.mark.slow
def test_eval_export_and_bitwise_agree(chain, capsys):
    from bats_cli.training.evaluate import evaluate_checkpoint

    root, _, _, binarized = chain
    packed = binarized["packed"]
    runs = {e: evaluate_checkpoint(packed, device="cpu", engine=e, threads=1, return_predictions=True, subset=128)
            for e in ("float", "bitwise")}
    assert torch.equal(runs["float"]["predictions"], runs["bitwise"]["predictions"])
    assert runs["float"]["top1"] == pytest.approx(binarized["final_top1"])
    pytest.importorskip("onnxruntime")
    onnx_path = root / "b.onnx"
    assert cli(["export", packed, "-o", str(onnx_path)], capsys)[0] == 0
    from bats_cli.training.onnx_eval import evaluate_onnx

    ort = evaluate_onnx(onnx_path, threads=1, return_predictions=True, subset=128)
    assert torch.equal(ort["predictions"], runs["float"]["predictions"])


@pytest.mark.slow
def test_resume_with_a_teacher_gives_the_same_result_and_checks_its_hash(chain):
    root, t_path, student, _ = chain
    g = resolve_genotype("bats_c10")
    cfg = TrainConfig(**TINY, teacher=str(t_path), attention_weight=0.5)
    with pytest.raises(Interrupted):
        train(cfg, genotype=g, out=root / "cut", quiet=True, stop_after_steps=2, handle_signals=False)
    saved = t_path.read_bytes()
    t_path.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    try:
        with pytest.raises(UserInputError, match="changed since the run started"):
            train(TrainConfig(genotype="bats_c10"), genotype=g, out=root / "cut", resume=True, quiet=True,
                  overrides={}, handle_signals=False)
    finally:
        t_path.write_bytes(saved)
    resumed = train(TrainConfig(genotype="bats_c10"), genotype=g, out=root / "cut", resume=True, quiet=True,
                    overrides={}, handle_signals=False)
    assert_same_state(root / "S" / "last.safetensors", root / "cut" / "last.safetensors")
    assert resumed["final_val_top1"] == student["final_val_top1"]


@pytest.mark.slow
def test_binarize_with_a_teacher_resumes_to_the_same_result(chain):
    root, t_path, student, binarized = chain
    cfg = BinarizeConfig(checkpoint=student["last"], epochs=1, device="cpu", calibration_batches=2, threads=1,
                         teacher=str(t_path), kd_temperature=2.0)
    with pytest.raises(Interrupted):
        binarize(cfg, out=root / "bin_cut", quiet=True, stop_after_steps=2, handle_signals=False)
    resumed = binarize(BinarizeConfig(checkpoint=student["last"]), out=root / "bin_cut", resume=True, quiet=True,
                       overrides={}, handle_signals=False, packed=root / "cut.packed.safetensors")
    assert resumed["teacher"] == binarized["teacher"] and resumed["final_top1"] == binarized["final_top1"]
    a, _ = load_checkpoint(binarized["last"])
    b, _ = load_checkpoint(root / "bin_cut" / "last.safetensors")
    for k in (k for k in a if k.startswith(("model.", "optim."))):
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- --activation rprelu


def _rprelu_network(reduce_shortcut="factorized"):
    """A binary bats_c10 network with RPReLU whose shifts, slopes and BatchNorms are all non-trivial."""
    from helpers import randomize_bn

    from bats_cli.layers.quant import BinarySpec, RPReLU

    gen = torch.Generator().manual_seed(3)
    net = build_network(resolve_genotype("bats_c10"), in_channels=1, num_classes=10, layers=3, channels=6,
                        activation="rprelu", spec=BinarySpec(activations=True, weights=True),
                        reduce_shortcut=reduce_shortcut)
    assert any(isinstance(m, RPReLU) for m in net.modules())
    randomize_bn(net, gen)
    return net.eval()


def test_rprelu_is_prelu_around_shifts_and_starts_as_prelu():
    from bats_cli.layers.quant import RPReLU

    act = RPReLU(3)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(act(x), torch.nn.PReLU(3, init=0.25)(x))
    act.shift_in.data = torch.tensor([1.0, -1.0, 0.5])
    act.shift_out.data = torch.tensor([0.1, 0.2, 0.3])
    y = x - act.shift_in.view(1, 3, 1, 1)
    want = torch.where(y > 0, y, 0.25 * y) + act.shift_out.view(1, 3, 1, 1)
    assert torch.allclose(act(x), want)
    # No RSign: every binary conv of the network has a BatchNorm right before its sign.
    from bats_cli.layers.ops import FactorizedReduce
    from bats_cli.layers.quant import BinaryConvBlock, quant_convs

    net = _rprelu_network()
    owners = [m for m in net.modules() if isinstance(m, (BinaryConvBlock, FactorizedReduce))]
    inner = {id(c) for m in owners for _, c in quant_convs(m)}
    assert inner == {id(c) for _, c in quant_convs(net)}
    assert all(isinstance(m.bn if isinstance(m, BinaryConvBlock) else m.pre, torch.nn.BatchNorm2d) for m in owners)


def test_rprelu_folds_into_the_bitwise_engine_with_identical_outputs():
    import copy

    from bats_cli.engine import to_bitwise
    from bats_cli.engine.bitwise import BitwiseBlock, BitwiseFactorizedReduce
    from bats_cli.engine.fold import ACT_RPRELU

    net = _rprelu_network()
    gen = torch.Generator().manual_seed(4)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 1, 16, 16, generator=gen).contiguous(memory_format=fmt)
        with torch.no_grad():
            want = net(x)
            fast = to_bitwise(copy.deepcopy(net))
            got = fast(x)
        assert torch.equal(got, want), (got - want).abs().max()
    layers = [m for m in fast.modules() if isinstance(m, (BitwiseBlock, BitwiseFactorizedReduce))]
    assert any(isinstance(m, BitwiseFactorizedReduce) for m in layers)
    # One kernel pass each: the shifts are in the kernel, no float activation is left behind.
    assert layers and all(m._act == ACT_RPRELU for m in layers)
    assert all(getattr(m, "act", None) is None and getattr(m, "post", None) is None for m in layers)


def test_rprelu_pack_eval_and_export_agree(tmp_path, capsys):
    from bats_cli.models.modelio import unpack
    from bats_cli.models.pack import save_packed
    from bats_cli.training.evaluate import evaluate_checkpoint

    net = _rprelu_network(reduce_shortcut="avgpool")
    path = save_packed(net, tmp_path / "r.packed.safetensors", settings=network_settings(net), data=DATA,
                       run={"seed": 0}, genotype_json=resolve_genotype("bats_c10").to_json(), source={})
    model, _ = unpack(path)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    runs = {e: evaluate_checkpoint(path, device="cpu", engine=e, threads=1, return_predictions=True, subset=64)
            for e in ("float", "bitwise")}
    assert torch.equal(runs["float"]["predictions"], runs["bitwise"]["predictions"])
    pytest.importorskip("onnxruntime")
    from bats_cli.training.onnx_eval import evaluate_onnx

    assert cli(["export", str(path), "-o", str(tmp_path / "r.onnx")], capsys)[0] == 0
    ort = evaluate_onnx(tmp_path / "r.onnx", threads=1, return_predictions=True, subset=64)
    assert torch.equal(ort["predictions"], runs["float"]["predictions"])


# --------------------------------------------------------------------------- bats ablate recipe


@pytest.mark.slow
def test_recipe_study_shares_one_teacher_per_seed_and_its_commands_parse(tmp_path, capsys):
    import shlex

    from typer.main import get_command

    from bats_cli.cli import _load_commands
    from bats_cli.cli.app import app
    from bats_cli.studies.jobs import StudyOptions, build_jobs
    from bats_cli.studies.results import markdown
    from bats_cli.studies.runner import run_study

    out = tmp_path / "study"
    code, stdout, err = cli(["ablate", "recipe", "--preset", "tiny", "--emit", "shell", "--out", str(out)], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 4
    _load_commands()
    group = get_command(app)
    teacher = str(out / "kd" / "seed0" / "teacher" / "last.safetensors")
    for line in lines:
        argvs = [shlex.split(part) for part in line.split(" && ") if part.startswith("bats ")]
        for argv in argvs:  # every flag is accepted by the real command
            group.get_command(None, argv[1]).make_context(argv[1], argv[2:])
        steps = {a[1] if a[1] != "train" or "--real" not in a else "teacher": a for a in argvs}
        if "/paper/" in line:
            assert "--teacher" not in line and "teacher" not in steps
            continue
        assert steps["train"][steps["train"].index("--teacher") + 1] == teacher
        assert steps["binarize"][steps["binarize"].index("--teacher") + 1] == teacher
        # Only the kd row trains the teacher; the others wait for it.
        assert ("teacher" in steps) == ("/kd/seed0/eval.json" in line)
        if "/kd+attention/" in line:
            assert "--attention-weight" in steps["train"] and "--attention-weight" in steps["binarize"]
        if "/kd+rprelu/" in line:
            assert steps["train"][steps["train"].index("--activation") + 1] == "rprelu"
    # With a fake runner: the teacher's time is reported beside the same-budget note.
    o = StudyOptions(study="recipe", out=tmp_path / "fake", preset="tiny", seeds=2)

    def runner(step, log):
        step.done.parent.mkdir(parents=True, exist_ok=True)
        if step.name == "teacher":
            step.done.write_text(json.dumps({"seconds": 120.0, "final_val_top1": 80.0}))
        elif step.name == "eval":
            step.done.write_text(json.dumps({"top1": 50.0, "n_images": 100}))
        elif step.name == "binarize":
            step.done.write_text(json.dumps({"step1_top1": 60.0}))
        else:
            step.done.write_text("{}")
        return 0

    summary = run_study(o, runner=runner, log=lambda m: None)
    rows = {v["variant"]: v for v in summary["variants"]}
    assert rows["kd+rprelu"]["teacher_seconds_mean"] == 120.0 and "teacher" not in rows["paper"]
    # Each recipe minus the paper's (does it help?), then what each addition brings to kd.
    assert {(c["a"], c["b"]) for c in summary["comparisons"]} == {
        ("kd", "paper"), ("kd+attention", "paper"), ("kd+rprelu", "paper"), ("kd+attention", "kd"), ("kd+rprelu", "kd")}
    assert "2.0 min per seed" in markdown(summary) and len(build_jobs(o)) == 8


@pytest.mark.slow
def test_the_plan_counts_the_teacher(chain, tmp_path, capsys):
    _, t_path, _, _ = chain
    plans = {}
    for extra in ((), ("--teacher", str(t_path))):
        code, out, err = cli(_train_argv(tmp_path / "run", *extra, "--dry-run", "--json"), capsys)
        assert code == 0, err
        plans[bool(extra)] = json.loads(out)
    weights = sum(t.numel() * 4 for k, t in load_checkpoint(t_path)[0].items() if k.startswith("model."))
    assert plans[True]["peak_memory_bytes"] >= plans[False]["peak_memory_bytes"] + 0.9 * weights
    assert any(n.startswith("teacher counted") for n in plans[True]["notes"]) and not plans[False]["notes"]
    assert not (tmp_path / "run").exists()
