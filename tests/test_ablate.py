"""`bats ablate`: jobs, resuming by skipping finished ones, --emit, the fixed optimiser of Table 4."""

from __future__ import annotations

import json
import shlex

import pytest

from bats_cli.ablate import StudyOptions, build_jobs, emit_lines, reuse_jobs, run_study, study_variants
from bats_cli.errors import Interrupted
from tests.helpers import cli


def _fake_runner(calls, *, interrupt_at=None):
    """Writes each step's result file instead of running it; ``interrupt_at``: (job dir name, step)."""
    from bats_cli.derive import random_genotype

    def run(step, log):
        calls.append((str(step.done.parent), step.name))
        key = (step.done.parents[0].name if step.name in ("derive", "eval") else step.done.parents[1].name, step.name)
        if interrupt_at == key:
            return 130
        step.done.parent.mkdir(parents=True, exist_ok=True)
        if step.name == "derive":
            random_genotype("bats", 0).save(step.done)
        elif step.name == "binarize":
            step.done.write_text(json.dumps({"step1_top1": 50.0}))
        elif step.name == "eval":
            step.done.write_text(json.dumps({"top1": 40.0 + len(calls)}))
        else:
            step.done.write_text("{}")
        return 0

    return run


def test_jobs_resume_by_skipping_finished_ones(tmp_path, capsys):
    o = StudyOptions(study="random", out=tmp_path / "study", seeds=2)
    jobs = build_jobs(o)
    assert [j.name for j in jobs] == ["searched/seed0", "random/seed0", "searched/seed1", "random/seed1"]
    assert [s.name for s in jobs[0].steps] == ["search", "derive", "train", "binarize", "eval"]
    assert [s.name for s in jobs[1].steps] == ["derive", "train", "binarize", "eval"]
    calls: list = []
    # Interrupted in the middle of searched/seed1's training: the study stops with exit 130 ...
    with pytest.raises(Interrupted):
        run_study(o, runner=_fake_runner(calls, interrupt_at=("seed1", "train")), log=lambda m: None)
    done = {j.name for j in build_jobs(o) if j.finished}
    assert done == {"searched/seed0", "random/seed0"}  # nothing new starts after the interrupt
    # ... and a rerun skips finished jobs and finished steps: seed1 continues at its training step.
    calls.clear()
    summary = run_study(o, runner=_fake_runner(calls), log=lambda m: None)
    ran = [(d.split("/study/")[1], name) for d, name in calls]
    assert not any(d.startswith("searched/seed0") for d, _ in ran)
    assert ran[0] == ("searched/seed1/train", "train")
    assert ("searched/seed1/search", "search") not in ran
    assert summary["complete"] and [v["n"] for v in summary["variants"]] == [2, 2]
    assert summary["variants"][0]["binary_top1_std"] is not None
    for name in ("results.json", "results.md"):
        assert (o.out / name).is_file()
    assert json.loads((o.out / "results.json").read_text())["study"] == "random"
    # --summary rewrites the results from the finished jobs and runs nothing.
    (o.out / "results.md").unlink()
    code, out, err = cli(["ablate", "random", "--seeds", "2", "--out", str(o.out), "--summary", "--json"],
                         capsys)
    assert code == 0, err
    assert json.loads(out)["complete"] and (o.out / "results.md").is_file()
    # Everything finished: nothing runs again.
    calls.clear()
    run_study(o, runner=_fake_runner(calls), log=lambda m: None)
    assert calls == []


def test_emit_prints_one_valid_bats_command_line_per_job(tmp_path, capsys):
    from typer.main import get_command

    from bats_cli.cli import COMMAND_MODULES, _load_commands
    from bats_cli.cli.app import app

    code, out, err = cli(["ablate", "temperature", "--emit", "--seeds", "2", "--dataset", "imagefolder",
                          "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4 * 2  # 4 temperatures x 2 seeds
    assert not (tmp_path / "s").exists()  # --emit runs nothing
    _load_commands()
    group = get_command(app)
    for line in lines:
        for part in line.split(" && "):
            argv = shlex.split(part)
            assert argv[0] == "bats" and argv[1] in COMMAND_MODULES, part
            sub = group.get_command(None, argv[1])
            sub.make_context(argv[1], argv[2:])  # parses and type-checks every option; runs nothing
    assert "--temp-normal 0.05 --temp-reduce 0.0375" in out


def test_strategy_study_keeps_the_optimiser_fixed(tmp_path):
    from bats_cli.config import resolve_config
    from bats_cli.search import SEARCH_PRESETS, SearchConfig

    seen = set()
    for job in build_jobs(StudyOptions(study="strategy", out=tmp_path)):
        argv = job.steps[0].argv
        flags = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("--")}
        cfg = resolve_config(SearchConfig, preset="cpu", presets=SEARCH_PRESETS, overrides={
            "weights": flags["--weights"], "activations": flags["--activations"],
            "optimizer": flags.get("--optimizer")})
        seen.add((cfg.weights, cfg.activations))
        # Only the search domain changes between rows (Table 4).
        assert (cfg.optimizer, cfg.lr, cfg.lr_schedule) == ("adam", 1e-3, "constant")
    assert seen == {("real", "real"), ("binary", "binary"), ("binary", "real"), ("real", "binary")}
    # Asking for SGD changes every row alike.
    assert {v.search[-1] for v in study_variants("strategy", optimizer="sgd")} == {"sgd"}


def test_bad_study_is_one_line_error(capsys):
    from tests.helpers import one_line_error

    code, _, err = cli(["ablate", "nonsense", "--emit"], capsys)
    one_line_error(code, err, "unknown study")


def test_emit_skips_finished_jobs(tmp_path):
    o = StudyOptions(study="zoo", out=tmp_path)
    jobs = build_jobs(o)
    jobs[0].result.parent.mkdir(parents=True)
    jobs[0].result.write_text("{}")
    assert len(emit_lines(build_jobs(o))) == len(jobs) - 1


@pytest.mark.parametrize("study", ["space", "temperature", "strategy", "random"])
def test_every_search_variant_is_a_valid_cpu_search(study, tmp_path):
    from bats_cli.config import resolve_config
    from bats_cli.search import SEARCH_PRESETS, SearchConfig

    for job in build_jobs(StudyOptions(study=study, out=tmp_path)):
        if job.variant.search is None:
            continue
        flags = job.variant.search
        overrides = {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
        cfg = resolve_config(SearchConfig, preset="cpu", presets=SEARCH_PRESETS, overrides=overrides)
        assert cfg.optimizer == "adam" and cfg.arch_lr == 2e-2


def test_reuse_copies_finished_jobs_with_the_same_commands(tmp_path):
    # temperature's T = 0.2 and T = 1 rows are space's BATS and T = 1 rows: only DARTS runs again.
    temp = StudyOptions(study="temperature", out=tmp_path / "temperature", threads=2)
    run_study(temp, runner=_fake_runner([]), log=lambda m: None)
    space = StudyOptions(study="space", out=tmp_path / "space")  # other --threads: still the same jobs
    started = space.out / "darts" / "seed0"
    calls: list = []
    summary = run_study(space, runner=_fake_runner(calls), log=lambda m: None, reuse=[temp.out])
    assert {d.split("/space/")[1].split("/")[0] for d, _ in calls} == {"darts"}
    assert (space.out / "bats" / "seed0" / "REUSED.txt").read_text().startswith(
        f"copied from {temp.out / 'T0.2' / 'seed0'}")
    reused = {j["variant"]: j["reused_from"] for j in summary["jobs"]}
    assert reused == {"bats": str(temp.out / "T0.2" / "seed0"), "darts": None,
                      "bats-T1": str(temp.out / "T1" / "seed0")}
    assert summary["complete"]
    # A different seed or a different setting is never taken for the same job.
    other = StudyOptions(study="space", out=tmp_path / "space2", seeds=2, optimizer="sgd")
    assert reuse_jobs(build_jobs(other), [temp.out], log=lambda m: None) == []
    assert started.is_dir()


def test_reuse_leaves_a_started_job_alone(tmp_path):
    temp = StudyOptions(study="temperature", out=tmp_path / "temperature", variants=("T0.2",))
    run_study(temp, runner=_fake_runner([]), log=lambda m: None)
    space = StudyOptions(study="space", out=tmp_path / "space", variants=("bats",))
    job = build_jobs(space)[0]
    (job.dir / "search").mkdir(parents=True)  # its own search had begun
    assert reuse_jobs([job], [temp.out], log=lambda m: None) == []
    assert not (job.dir / "REUSED.txt").exists()


def test_variants_selects_rows_and_rejects_unknown_names(tmp_path, capsys):
    from tests.helpers import one_line_error

    o = StudyOptions(study="temperature", out=tmp_path, seeds=2, variants=("T0.05", "T1"))
    assert [j.name for j in build_jobs(o)] == ["T1/seed0", "T0.05/seed0", "T1/seed1", "T0.05/seed1"]
    code, _, err = cli(["ablate", "temperature", "--variants", "T0.3", "--emit"], capsys)
    one_line_error(code, err, "unknown --variants T0.3")
    code, _, err = cli(["ablate", "temperature", "--reuse", str(tmp_path), "--emit"], capsys)
    one_line_error(code, err, "--reuse")


def test_a_study_runs_end_to_end_with_the_real_commands(tmp_path, capsys):
    # The real `bats` subprocesses, at the tiny preset: every step's flags are accepted on a fresh
    # run directory and every result file is where the summary looks for it.
    out = tmp_path / "study"
    code, stdout, err = cli(["ablate", "random", "--preset", "tiny", "--variants", "searched", "--threads", "1",
                             "--out", str(out), "--json"], capsys)
    assert code == 0, err + "".join(p.read_text() for p in out.rglob("*.log"))
    summary = json.loads(stdout)
    (job,) = summary["jobs"]
    assert job["status"] == "done" and 0 <= job["binary_top1"] <= 100 and job["step1_top1"] is not None
    assert set(job["seconds"]) == {"search", "derive", "train", "binarize", "eval"}
    assert job["entropy_rel"] is not None and job["params"] > 0
    assert json.loads((out / "searched" / "seed0" / "job.json").read_text())["key"][0][0] == "search"


def test_zoo_has_the_binary_resnet18_baseline(tmp_path, capsys):
    from typer.main import get_command

    from bats_cli.ablate import job_record
    from bats_cli.cli import _load_commands
    from bats_cli.cli.app import app
    from bats_cli.modelio import network_settings
    from bats_cli.resnet import build_resnet

    variants = {v.name: v for v in study_variants("zoo")}
    assert variants["resnet18"].paper == "91.0" and "ResNet-18" in variants["resnet18"].label
    code, out, err = cli(["ablate", "zoo", "--emit", "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if "/resnet18/" in line)
    _load_commands()
    group = get_command(app)
    argvs = [shlex.split(part) for part in line.split(" && ")]
    assert [a[1] for a in argvs] == ["train", "binarize", "eval"] and argvs[0][2] == "resnet18"
    for argv in argvs:
        group.get_command(None, argv[1]).make_context(argv[1], argv[2:])
    # Its record: no genotype and no parameter-free share (not a cell network), but a cost.
    job = next(j for j in build_jobs(StudyOptions(study="zoo", out=tmp_path / "s")) if j.variant.name == "resnet18")
    (job.dir / "train").mkdir(parents=True)
    settings = {**network_settings(build_resnet(channels=4)), "image_size": 16}
    (job.dir / "train" / "result.json").write_text(json.dumps({"network": settings}))
    rec = job_record(job)
    assert rec["genotype"] is None and rec["arch"] == "resnet18" and rec["param_free_normal"] is None
    assert rec["params"] == sum(p.numel() for p in build_resnet(channels=4).parameters()) and rec["ops"] > 0
    from bats_cli.ablate import markdown, summarise

    o = StudyOptions(study="zoo", out=tmp_path / "s")
    row = next(line for line in markdown(summarise(o, build_jobs(o))).splitlines() if "ResNet-18" in line)
    assert "| 91.0 |" in row and "not a cell network" in row
