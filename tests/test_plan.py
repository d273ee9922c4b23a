"""The plan speaks before it measures, measures only where that decides something, states its
verdict and a time estimate, and is reused by an identical later plan (--resume, a run after
its --dry-run)."""

from __future__ import annotations

import json

import pytest
from helpers import cli

GIB = 2**30


@pytest.fixture
def plan_env(monkeypatch, tmp_path):
    """The plan module with its cache in tmp_path and a settable memory room."""
    from bats_cli.training import plan

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    room = {"available": 64 * GIB, "in_use": GIB}
    monkeypatch.setattr(plan, "_memory_room", lambda device: ("RAM", room["available"], room["in_use"]))
    calls = {"measure": 0, "time": 0}
    real_measure, real_time = plan.measure_memory, plan.time_steps

    def measure(*a, **k):
        calls["measure"] += 1
        return real_measure(*a, **k)

    def timing(*a, **k):
        calls["time"] += 1
        return real_time(*a, **k)

    monkeypatch.setattr(plan, "measure_memory", measure)
    monkeypatch.setattr(plan, "time_steps", timing)
    return plan, room, calls


def _args(batch_size=32):
    from bats_cli.core.zoo import resolve_genotype
    from bats_cli.models.networks import build_network

    net = build_network(resolve_genotype("bats_c10"), layers=3, channels=6, num_classes=10, in_channels=1)
    return dict(command="train", model=net, device="cpu", dataset="fashion-mini", train_images=640,
                test_images=100, input_shape=(1, 16, 16), num_classes=10, batch_size=batch_size,
                eval_batch_size=256, steps_per_epoch=640 // batch_size, epochs=3, network="3 cells, C=6")


def test_far_below_the_limit_is_timed_not_measured_and_says_so_first(plan_env):
    plan, _room, calls = plan_env
    said = []

    def announce(line):
        # Nothing is timed or measured before the plan has said what it is about to do.
        assert calls["time"] == calls["measure"] == 0
        said.append(line)

    p = plan.plan_run(**_args(), announce=announce)
    assert said[0].startswith("plan: train on cpu, fashion-mini (640 train / 100 test images)")
    assert said[1].startswith("plan: network 3 cells, C=6,") and said[2].startswith("plan: 3 epochs x 20 steps")
    assert said[3].startswith("plan: timing a training step at batches 2 and 4")
    assert calls == {"measure": 0, "time": 1}
    assert p.fits and p.memory_source == "estimated"
    assert p.seconds_per_epoch > 0 and p.seconds_total == pytest.approx(3 * p.seconds_per_epoch)
    text = "\n".join(p.result_lines())
    assert "plan: fits: peak RAM about" in text and "not measured: far from the limit" in text
    assert "plan: time, estimated: about" in text and "per epoch" in text and "in all" in text


def test_far_above_the_limit_is_refused_with_a_batch_that_fits(plan_env, monkeypatch):
    from bats_cli.utils.memory import rss_bytes

    plan, _room, calls = plan_env
    # 400 MiB of room beyond what the process holds *now*: the first plan's timing step loads
    # kernels lazily (RSS grows by ~200 MiB on a CUDA build of torch), and a room fixed before it
    # would shrink under the second plan's measurement.
    def room_now(device):
        rss = rss_bytes()
        return "RAM", rss + 400 * 2**20, rss

    monkeypatch.setattr(plan, "_memory_room", room_now)
    p = plan.plan_run(**_args(batch_size=4096))
    assert calls["measure"] == 0 and not p.fits
    text = "\n".join(p.result_lines())
    assert "plan: does not fit:" in text and "the run would be refused; `--batch-size" in text
    suggested = p.largest_fitting_batch
    assert 1 <= suggested < 4096
    # The suggestion is one the plan accepts.
    assert plan.plan_run(**_args(batch_size=suggested)).fits
    with pytest.raises(Exception, match=f"--batch-size {suggested}"):
        plan.check_fits(p)


def test_near_the_limit_is_measured_once_then_reused(plan_env):
    from bats_cli.training.plan_measure import meta_band

    plan, room, calls = plan_env
    args = _args()
    step = plan.estimate_step(args["model"], input_shape=args["input_shape"])
    low, high = meta_band(step, in_use=room["in_use"], batch_size=32, optimizer_moments=2)
    # Room between the band's ends: only a measurement can tell.
    room["available"] = int(high / plan.HEADROOM)
    first = plan.plan_run(**args)
    assert calls["measure"] == 1 and first.memory_source == "measured" and first.seconds_per_epoch > 0
    second = plan.plan_run(**_args())  # a new process would build the same network again
    assert calls["measure"] == 1 and second.memory_source == "measured" and second.reused
    assert (second.peak_memory_bytes, second.largest_fitting_batch) == (first.peak_memory_bytes,
                                                                       first.largest_fitting_batch)
    assert "from an earlier plan of this network and data" in second.result_lines()[0]


def test_an_estimated_plan_is_reused_unless_memory_got_tight(plan_env):
    from bats_cli.training.plan_measure import meta_band

    plan, room, calls = plan_env
    first = plan.plan_run(**_args())
    assert calls["time"] == 1 and first.memory_source == "estimated" and not first.reused
    # A --resume (the same network and data) pays no second timing ...
    second = plan.plan_run(**_args())
    assert second.reused and calls["time"] == 1 and second.seconds_per_epoch == first.seconds_per_epoch
    # ... unless memory got tight since: then it is measured after all.
    args = _args()
    step = plan.estimate_step(args["model"], input_shape=args["input_shape"])
    _low, high = meta_band(step, in_use=room["in_use"], batch_size=32, optimizer_moments=2)
    room["available"] = int(high / plan.HEADROOM)
    assert plan.plan_run(**args).memory_source == "measured" and calls["measure"] == 1


def test_suggested_batches_are_stable_round_numbers():
    from bats_cli.training.plan import round_batch

    assert [round_batch(b) for b in (5, 15, 17, 63, 65, 162, 160, 175)] == [5, 15, 16, 56, 64, 160, 160, 160]


def test_dry_run_text_states_verdict_and_time_and_json_has_them(plan_env, tmp_path, capsys):
    argv = ["train", "bats_c10", "--preset", "tiny", "--subset", "64", "--image-size", "16",
            "--out", str(tmp_path / "r"), "--dry-run"]
    code, out, err = cli(argv, capsys)
    assert code == 0 and out == "", err
    lines = err.splitlines()
    assert lines[0].startswith("plan: train on cpu, fashion-mini")
    assert any(line.startswith("plan: fits: peak RAM about") for line in lines)
    assert any(line.startswith("plan: time, estimated: about") for line in lines)
    code, out, err = cli([*argv, "--json"], capsys)
    data = json.loads(out)
    assert data["fits"] and data["seconds_per_epoch"] > 0 and data["seconds_total"] > 0
    assert not (tmp_path / "r").exists()
