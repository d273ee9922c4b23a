"""`bats ablate`: jobs, resuming by skipping finished ones, --emit, the fixed optimiser of Table 4."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from helpers import cli

from bats_cli.core.errors import Interrupted, UserInputError
from bats_cli.studies.catalog import study_variants
from bats_cli.studies.jobs import StudyOptions, build_jobs, emit_lines
from bats_cli.studies.runner import reuse_jobs, run_study


def _fake_runner(calls, *, interrupt_at=None, top1=None):
    """Writes each step's result file instead of running it; ``interrupt_at``: (job dir name, step);
    ``top1(variant, seed)``: the eval top-1 (with 100 fake per-image predictions)."""
    import numpy as np

    from bats_cli.nas.random_genotypes import random_genotype

    def run(step, log):
        calls.append((str(step.done.parent), step.name))
        key = (step.done.parents[0].name if step.name in ("derive", "eval", "select") else step.done.parents[1].name,
               step.name)
        if interrupt_at == key:
            return 130
        step.done.parent.mkdir(parents=True, exist_ok=True)
        if step.name == "select":  # `bats genotype best RUN... --output FILE`
            from bats_cli.studies.jobs import best_of_runs

            runs = step.argv[2:step.argv.index("--output")]
            best_of_runs([Path(r) for r in runs])["genotype"].save(step.done)
        elif step.name == "derive" or step.name.endswith("-derive"):
            random_genotype("bats", len(calls)).save(step.done)
            if step.stdout is not None:
                step.stdout.write_text(json.dumps({"draws": 3}))
        elif step.name.endswith("-train"):
            g = json.loads((step.done.parents[1] / "genotype.json").read_text())
            step.done.write_text(json.dumps({"command": "train", "val_split": "holdout",
                                             "final_val_top1": 30.0 + len(calls), "seconds": 2.0}))
            (step.done.parent / "config.json").write_text(json.dumps({"genotype": g}))
        elif step.name == "binarize":
            step.done.write_text(json.dumps({"step1_top1": 50.0}))
        elif step.name.startswith("eval"):
            job_dir = step.done.parent
            value = top1(job_dir.parent.name, int(job_dir.name[4:])) if top1 else 40.0 + len(calls)
            labels = np.arange(100) % 10
            pred = labels.copy()
            pred[: 100 - int(value)] = (labels[: 100 - int(value)] + 1) % 10
            name = step.done.name.replace(".json", ".predictions.npy")
            np.save(job_dir / name, np.stack([pred, labels]).astype(np.int16))
            step.done.write_text(json.dumps({"top1": float(int(value)), "n_images": 100, "images_sha256": "same",
                                             "predictions": name}))
        else:
            step.done.write_text("{}")
        return 0

    return run


def test_jobs_resume_by_skipping_finished_ones(tmp_path, capsys):
    o = StudyOptions(study="random", out=tmp_path / "study", seeds=2, variants=("searched", "random"))
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
    code, out, err = cli(["ablate", "random", "--seeds", "2", "--variants", "searched,random", "--out", str(o.out),
                          "--summary", "--json"],
                         capsys)
    assert code == 0, err
    assert json.loads(out)["complete"] and (o.out / "results.md").is_file()
    # Everything finished: nothing runs again.
    calls.clear()
    run_study(o, runner=_fake_runner(calls), log=lambda m: None)
    assert calls == []


def test_a_study_run_in_parts_records_and_summarises_every_part(tmp_path, capsys):
    # `--variants A` then `--variants B` in one directory: study.json keeps both (and the larger
    # number of seeds), so --summary and --publish without flags see the whole study.
    out = tmp_path / "st"
    run_study(StudyOptions(study="random", preset="tiny", seeds=2, out=out, variants=("searched", "random")),
              runner=_fake_runner([]), log=lambda m: None)
    run_study(StudyOptions(study="random", preset="tiny", seeds=1, out=out, variants=("random-matched",)),
              runner=_fake_runner([]), log=lambda m: None)
    rec = json.loads((out / "study.json").read_text())
    assert rec["variants"] == ["searched", "random", "random-matched"] and rec["seeds"] == 2
    code, stdout, err = cli(["ablate", "random", "--out", str(out), "--summary", "--json"], capsys)
    assert code == 0, err
    rows = {v["variant"]: v["n"] for v in json.loads(stdout)["variants"]}
    assert rows == {"searched": 2, "random": 2, "random-matched": 1}
    # A run of every variant records them all (an empty list).
    run_study(StudyOptions(study="random", preset="tiny", seeds=1, out=out), runner=_fake_runner([]),
              log=lambda m: None)
    assert json.loads((out / "study.json").read_text())["variants"] == []


def test_emit_prints_one_valid_bats_command_line_per_job(tmp_path, capsys):
    from typer.main import get_command

    from bats_cli.cli import COMMAND_MODULES, _load_commands
    from bats_cli.cli.app import app

    code, out, err = cli(["ablate", "temperature", "--emit", "shell", "--seeds", "2", "--dataset", "imagefolder",
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
    from bats_cli.core.config import resolve_config
    from bats_cli.core.presets import SEARCH_PRESETS
    from bats_cli.nas.search import SearchConfig

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
    from helpers import one_line_error

    code, _, err = cli(["ablate", "nonsense", "--emit", "shell"], capsys)
    one_line_error(code, err, "unknown study")


def test_emit_skips_finished_jobs(tmp_path):
    o = StudyOptions(study="zoo", out=tmp_path)
    jobs = build_jobs(o)
    jobs[0].result.parent.mkdir(parents=True)
    jobs[0].result.write_text("{}")
    assert len(emit_lines(build_jobs(o))) == len(jobs) - 1


@pytest.mark.parametrize("study", ["space", "temperature", "strategy", "random", "proxy"])
def test_every_search_variant_is_a_valid_cpu_search(study, tmp_path):
    from bats_cli.core.config import resolve_config
    from bats_cli.core.presets import SEARCH_PRESETS
    from bats_cli.nas.search import SearchConfig

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
    from helpers import one_line_error

    o = StudyOptions(study="temperature", out=tmp_path, seeds=2, variants=("T0.05", "T1"))
    assert [j.name for j in build_jobs(o)] == ["T1/seed0", "T0.05/seed0", "T1/seed1", "T0.05/seed1"]
    code, _, err = cli(["ablate", "temperature", "--variants", "T0.3", "--emit", "shell"], capsys)
    one_line_error(code, err, "unknown --variants T0.3")
    code, _, err = cli(["ablate", "temperature", "--reuse", str(tmp_path), "--emit", "shell"], capsys)
    one_line_error(code, err, "--reuse")


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_the_random_study_runs_its_five_arms_end_to_end_with_the_real_commands(tmp_path, capsys):
    # The real `bats` subprocesses, at the tiny preset: every step's flags are accepted on a fresh
    # run directory and every result file is where the summary looks for it.
    out = tmp_path / "study"
    # A few hundred training images per network: the flags and files are what is checked here.
    code, stdout, err = cli(["ablate", "random", "--preset", "tiny", "--threads", "1", "--jobs", "2",
                             "--subset", "300", "--holdout", "60", "--out", str(out), "--json"], capsys)
    assert code == 0, err + "".join(p.read_text() for p in out.rglob("*.log"))
    summary = json.loads(stdout)
    jobs = {j["variant"]: j for j in summary["jobs"]}
    assert set(jobs) == {"searched", "searched-perturbation", "random", "random-matched", "random-search"}
    for job in jobs.values():
        assert job["status"] == "done" and 0 <= job["binary_top1"] <= 100 and job["step1_top1"] is not None
        assert job["n_images"] > 0 and job["top1_se"] > 0 and job["predictions"] and job["params"] > 0
        # The argv each step ran with, recorded as it ran.
        assert all(runs[-1]["exit"] == 0 and runs[-1]["argv"][0] == "bats" for runs in job["executed"].values())
        assert not job["dir"].startswith("/")
    searched = jobs["searched"]
    assert set(searched["seconds"]) == {"search", "derive", "train", "binarize", "eval"}
    assert searched["entropy_rel"] is not None and searched["search_health"]
    assert jobs["searched-perturbation"]["executed"]["derive"][0]["argv"][3:5] == ["--select", "perturbation"]
    assert "search" not in jobs["searched-perturbation"]["seconds"]  # the searched arm's search, not its own
    # The matched random cell is within ±10 % of the searched cell's parameters.
    assert abs(jobs["random-matched"]["params"] / searched["params"] - 1) <= 0.1
    assert jobs["random-matched"]["match"]["draws"] >= 1
    cands = jobs["random-search"]["candidates"]
    assert len(cands) == 2 and sum(c["chosen"] for c in cands) == 1
    assert all(c["holdout_top1"] is not None for c in cands) and jobs["random-search"]["selection_seconds"] > 0
    # Statistics of every pair; at n = 1 a verdict that says so, and a McNemar test on the same images.
    pairs = {(c["a"], c["b"]) for c in summary["comparisons"]}
    assert ("searched", "random-matched") in pairs and ("searched-perturbation", "searched") in pairs
    for c in summary["comparisons"]:
        assert {"paired_diff_mean", "paired_diff_se", "ci95", "t", "wilcoxon_p", "wins", "n", "verdict"} <= set(c)
        assert c["n"] == 1 and "no test" in c["verdict"] and len(c["mcnemar"]) == 1
    md = (out / "results.md").read_text()
    assert "Paired comparisons" in md and "searched − random" in md
    assert json.loads((out / "searched" / "seed0" / "job.json").read_text())["key"][0][0] == "search"


def test_zoo_has_the_binary_resnet18_baseline(tmp_path, capsys):
    from typer.main import get_command

    from bats_cli.cli import _load_commands
    from bats_cli.cli.app import app
    from bats_cli.models.modelio import network_settings
    from bats_cli.models.resnet import build_resnet
    from bats_cli.studies.results import job_record

    variants = {v.name: v for v in study_variants("zoo")}
    assert variants["resnet18"].paper == "91.0" and "ResNet-18" in variants["resnet18"].label
    code, out, err = cli(["ablate", "zoo", "--emit", "shell", "--out", str(tmp_path / "s")], capsys)
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
    from bats_cli.studies.results import markdown, summarise

    o = StudyOptions(study="zoo", out=tmp_path / "s")
    row = next(line for line in markdown(summarise(o, build_jobs(o))).splitlines() if "ResNet-18" in line)
    assert "| 91.0 |" in row and "not a cell network" in row


def test_random_study_arms_wait_for_the_search_they_use_and_record_statistics(tmp_path):
    o = StudyOptions(study="random", out=tmp_path / "study", seeds=6)
    calls: list = []
    summary = run_study(o, runner=_fake_runner(calls, top1=lambda v, s: 60 + s if v.startswith("searched") else 50 + s),
                        log=lambda m: None, )
    order = [(d.split("/study/")[1], n) for d, n in calls]
    for seed in range(6):
        search = order.index((f"searched/seed{seed}/search", "search"))
        assert order.index((f"searched-perturbation/seed{seed}", "derive")) > search
        assert order.index((f"random-matched/seed{seed}", "derive")) > order.index((f"searched/seed{seed}", "derive"))
    comp = {(c["a"], c["b"]): c for c in summary["comparisons"]}
    c = comp[("searched", "random")]
    # +10 points in each of 6 seeds: every seed wins, Wilcoxon p = 2 / 2^6, a significant verdict.
    assert (c["n"], c["wins"], c["paired_diff_mean"]) == (6, 6, 10.0)
    assert c["wilcoxon_p"] == pytest.approx(2 / 64) and c["significant"]
    assert c["verdict"].startswith("searched − random = +10.00 [+10.00, +10.00] points, paired, n = 6")
    assert [m["seed"] for m in c["mcnemar"]] == list(range(6)) and all(m["a_only"] == 10 for m in c["mcnemar"])
    assert comp[("searched-perturbation", "searched")]["verdict"].endswith("not distinguishable at this scale")
    job = next(j for j in summary["jobs"] if j["variant"] == "random-search")
    assert len(job["candidates"]) == 4 and sum(c["chosen"] for c in job["candidates"]) == 1
    assert all(j["top1_se"] == pytest.approx(100 * (j["binary_top1"] / 100 * (1 - j["binary_top1"] / 100) / 100) ** 0.5)
               for j in summary["jobs"])
    assert summary["holdout"] == 1000 and "train" in job["executed"]
    train_argv = job["executed"]["train"][0]["argv"]
    assert train_argv[train_argv.index("--holdout") + 1] == "1000"


def test_an_arm_whose_search_is_not_in_the_run_fails_at_once(tmp_path):
    o = StudyOptions(study="random", out=tmp_path / "study", variants=("random-matched",))
    lines: list = []
    from bats_cli.core.errors import RunFailure

    with pytest.raises(RunFailure, match="random-matched/seed0"):
        run_study(o, runner=_fake_runner([]), log=lines.append)
    assert any("which no job of this run will write" in line for line in lines)


def test_a_derived_row_reruns_a_search_that_kept_no_checkpoint(tmp_path):
    from dataclasses import replace

    o = StudyOptions(study="random", out=tmp_path / "study", seeds=2,
                     variants=("searched", "searched-perturbation", "random"))
    top1 = lambda v, s: 60 + s if v.startswith("searched") else 50  # noqa: E731
    # The searched arm finished first and, like a published job, kept no search checkpoint ...
    run_study(replace(o, variants=("searched", "random")), runner=_fake_runner([], top1=top1), log=lambda m: None)
    # ... except at seed 0.
    (o.out / "searched" / "seed0" / "search" / "last.safetensors").write_bytes(b"supernet")
    calls: list = []
    summary = run_study(o, runner=_fake_runner(calls, top1=top1), log=lambda m: None)
    jobs = {(j.variant.name, j.seed): j for j in build_jobs(o)}
    derive0 = next(s for s in jobs[("searched-perturbation", 0)].steps if s.name == "derive")
    assert derive0.argv[1] == str(o.out / "searched" / "seed0" / "search")  # the searched arm's own supernet
    own = jobs[("searched-perturbation", 1)]
    search = next(s for s in own.steps if s.name == "search")
    shared = next(s for s in jobs[("searched", 1)].steps if s.name == "search")
    assert search.argv[search.argv.index("--out") + 1] == str(own.dir / "search")
    assert search.argv[:search.argv.index("--out")] == shared.argv[:shared.argv.index("--out")]  # the same command
    assert next(s for s in own.steps if s.name == "derive").argv[1] == str(own.dir / "search")
    assert (str(own.dir / "search"), "search") in calls and not any("searched/seed" in d for d, _ in calls)
    recs = {(r["variant"], r["seed"]): r for r in summary["jobs"]}
    assert not recs[("searched-perturbation", 0)]["own_search"] and recs[("searched-perturbation", 1)]["own_search"]
    comp = {(c["a"], c["b"]): c for c in summary["comparisons"]}
    # Against the searched arm only where both read one supernet; against random on every seed.
    assert comp[("searched-perturbation", "searched")]["seeds"] == [0]
    assert comp[("searched-perturbation", "searched")]["seeds_left_out"]["seeds"] == [1]
    assert comp[("searched-perturbation", "random")]["seeds"] == [0, 1]
    assert "seed 1 left out (not the same search" in (o.out / "results.md").read_text()
    # A re-run that reproduced the recorded α history at every epoch is the same search: compared.
    from bats_cli.studies.results import summarise

    for d in (o.out / "searched" / "seed1" / "search", own.dir / "search"):
        (d / "alphas").mkdir(exist_ok=True)
        (d / "alphas" / "stage1_epoch01.json").write_text(json.dumps({"normal": [{"weights": {"skip_connect": 0.5}}],
                                                                      "reduce": [], "untempered": {"x": str(d)}}))
    again_summary = summarise(o, build_jobs(o))
    rec = next(r for r in again_summary["jobs"] if (r["variant"], r["seed"]) == ("searched-perturbation", 1))
    assert rec["search_reproduced"]
    pair = next(c for c in again_summary["comparisons"] if (c["a"], c["b"]) == ("searched-perturbation", "searched"))
    assert pair["seeds"] == [0, 1] and "seeds_left_out" not in pair
    (own.dir / "search" / "alphas" / "stage1_epoch01.json").write_text(json.dumps({"normal": [], "reduce": []}))
    assert not next(r for r in summarise(o, build_jobs(o))["jobs"]
                    if (r["variant"], r["seed"]) == ("searched-perturbation", 1))["search_reproduced"]
    # Another study reusing these jobs (no checkpoints were copied at seed 1) copies the perturbation
    # job that ran its own search instead of running it again.
    again: list = []
    other = replace(o, out=tmp_path / "other")
    run_study(other, runner=_fake_runner(again), log=lambda m: None, reuse=[o.out])
    assert (other.out / "searched-perturbation" / "seed1" / "REUSED.txt").is_file()
    assert not any("seed1" in d for d, _ in again)


def test_best_of_runs_keeps_the_best_held_out_run_and_refuses_test_split_runs(tmp_path, capsys):
    from bats_cli.nas.random_genotypes import random_genotype
    from bats_cli.studies.jobs import best_of_runs

    runs = []
    for i, top1 in enumerate([31.0, 35.5, 33.0]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "result.json").write_text(json.dumps({"command": "train", "val_split": "holdout", "final_val_top1": top1}))
        (d / "config.json").write_text(json.dumps({"genotype": random_genotype("bats", i, name=f"g{i}").to_dict()}))
        runs.append(d)
    picked = best_of_runs(runs)
    assert picked["genotype"].name == "g1" and picked["chosen"] == str(runs[1])
    code, out, err = cli(["genotype", "best", *map(str, runs), "-o", str(tmp_path / "best.json"), "--json"], capsys)
    assert code == 0, err and json.loads(out)["genotype"] == "g1"
    assert json.loads((tmp_path / "best.json").read_text())["name"] == "g1"
    (runs[0] / "result.json").write_text(json.dumps({"command": "train", "val_split": "test", "final_val_top1": 99.0}))
    with pytest.raises(UserInputError, match="validated on the test split"):
        best_of_runs(runs)


def test_evaluate_on_and_publish_recheck_a_study_without_training(tmp_path, capsys):
    from bats_cli.studies.publish import evaluate_on, publish

    o = StudyOptions(study="random", out=tmp_path / "study", seeds=2, variants=("searched", "random"))
    run_study(o, runner=_fake_runner([], top1=lambda v, s: 60 if v == "searched" else 55), log=lambda m: None)
    for job in build_jobs(o):  # what binarize leaves: the packed network
        job.packed.parent.mkdir(parents=True, exist_ok=True)
        job.packed.write_bytes(b"packed")
    other = tmp_path / "other-images"
    (other / "val" / "cat").mkdir(parents=True)  # a test split alone: no train/ beside it
    calls: list = []
    seen: list = []

    def runner(step, log):
        data_dir = Path(step.argv[step.argv.index("--data-dir") + 1])
        seen.append(sorted(p.name for p in (data_dir / "train").iterdir()))
        return _fake_runner(calls, top1=lambda v, s: 50)(step, log)

    summary = evaluate_on(o, other, runner=runner, log=lambda m: None)
    assert len(calls) == 4 and all(n == "eval-other-images" for _, n in calls)
    assert seen == [["cat"]] * 4  # train/ stands in with val/'s class folders
    assert summary["test_results"] == "eval-other-images.json"
    assert (o.out / "results-other-images.json").is_file() and (o.out / "results-other-images.md").is_file()
    c = summary["comparisons"][0]
    assert (c["paired_diff_mean"], c["wins"], c["ties"]) == (0.0, 0, 2)
    assert json.loads((o.out / "results.json").read_text())["comparisons"][0]["paired_diff_mean"] == 5.0
    # A published copy: light files only, and the same summary from it.
    dest = tmp_path / "published"
    publish(o, dest, log=lambda m: None)
    assert (dest / "searched" / "seed0" / "binarize" / "model.packed.safetensors").read_bytes() == b"packed"
    assert (dest / "random" / "seed1" / "genotype.json").is_file() and (dest / "results.json").is_file()
    assert not list(dest.rglob("*.log"))
    again = json.loads((dest / "results.json").read_text())
    assert again["comparisons"][0]["paired_diff_mean"] == 5.0
    code, out, err = cli(["ablate", "random", "--out", str(o.out), "--evaluate-on", str(tmp_path / "x"),
                          "--summary"], capsys)
    assert code == 2 and "at most one of" in err


def test_evaluate_on_finds_the_test_split_in_common_layouts(tmp_path):
    from bats_cli.studies.publish import _test_layout

    both = tmp_path / "both"
    for split in ("train", "val"):
        (both / split / "cat").mkdir(parents=True)
    assert _test_layout(both, "imagefolder") == both  # this project's layout, as it is
    for name in ("val", "test"):  # a test split alone, under val/ or test/ (train/ beside it or not)
        d = tmp_path / name
        (d / name / "cat").mkdir(parents=True)
        (d / "train" / "cat").mkdir(parents=True)
        if name == "val":
            shutil.rmtree(d / "train")
        got = _test_layout(d, "imagefolder")
        assert (got / "val").resolve() == (d / name).resolve() and (got / "train").resolve() == (d / name).resolve()
    flat = tmp_path / "flat"
    (flat / "cat").mkdir(parents=True)
    assert (_test_layout(flat, "imagefolder") / "val").resolve() == flat.resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="DIR/test/<class>"):
        _test_layout(tmp_path / "empty", "imagefolder")


def test_a_study_checks_its_data_before_the_first_job(tmp_path, capsys):
    from helpers import one_line_error

    code, _, err = cli(["ablate", "random", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "s")], capsys)
    one_line_error(code, err, "nowhere")
    assert not (tmp_path / "s" / "searched").exists()  # no job started


def test_a_failed_job_says_why_and_a_running_one_where_it_is(tmp_path):
    from bats_cli.core.errors import RunFailure
    from bats_cli.studies.runner import step_progress

    o = StudyOptions(study="random", out=tmp_path / "study", variants=("random",))

    def failing(step, log):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("training...\nerror: --batch-size 256 is larger than the 100 training images\n")
        return 2

    lines: list = []
    with pytest.raises(RunFailure):
        run_study(o, runner=failing, log=lines.append)
    assert any("failed" in line and "derive: error: --batch-size 256" in line for line in lines)
    summary = json.loads((o.out / "results.json").read_text())
    assert summary["jobs"][0]["error"].startswith("derive: error:")
    assert "random/seed0: derive: error:" in (o.out / "results.md").read_text()
    job = build_jobs(o)[0]
    train = next(s for s in job.steps if s.name == "train")
    train.done.parent.mkdir(parents=True)
    (train.done.parent / "metrics.csv").write_text("epoch,train_loss\n1,2.0\n2,1.5\n")
    assert step_progress(job, train) == "train epoch 2 done"


def test_emit_slurm_writes_an_array_script_with_one_task_per_unfinished_job(tmp_path, capsys):
    import subprocess

    out = tmp_path / "s"
    o = StudyOptions(study="random", out=out, preset="tiny", seeds=2)
    jobs = build_jobs(o)
    jobs[0].result.parent.mkdir(parents=True)
    jobs[0].result.write_text("{}")  # one finished job: not submitted again
    code, script, err = cli(["ablate", "random", "--preset", "tiny", "--seeds", "2", "--out", str(out),
                             "--emit", "slurm"], capsys)
    assert code == 0, err
    path = tmp_path / "random.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert f"#SBATCH --array=0-{len(jobs) - 2}" in script  # 10 jobs, 1 finished: tasks 0..8
    assert "#SBATCH --requeue" in script and "--signal=B:TERM@" in script and "scontrol requeue" in script
    # Each task's line is a job's steps; a row that reads another's search waits for it.
    assert script.count("--resume-or-start") >= len(jobs) - 1
    assert "until [ -e " in script and "searched/seed1/search/result.json" in script
    code, _, err = cli(["ablate", "random", "--emit", "pbs"], capsys)
    assert code == 2 and "--emit 'pbs'" in err
