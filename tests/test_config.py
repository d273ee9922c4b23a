"""Config resolution: paper default < preset < flag; one-line errors; resume checks."""

from __future__ import annotations

import pytest
from pydantic import Field

from bats_cli.core.config import (
    RESUME_IGNORED_KEYS,
    RunConfig,
    check_resume_config,
    config_diff,
    resolve_config,
    resolve_resume_config,
)
from bats_cli.core.errors import UserInputError


class DemoConfig(RunConfig):
    epochs: int = Field(250, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_min: float = 0.0
    dataset: str = "cifar10"
    device: str = "auto"
    num_workers: int = 4
    betas: tuple[float, float] = (0.9, 0.999)


PRESETS = {"smoke": {"epochs": 2, "lr": 0.01}, "paper": {}}


def test_precedence_default_preset_flag():
    cfg = resolve_config(DemoConfig, preset=None, presets=PRESETS, overrides={"epochs": None})
    assert cfg.epochs == 250 and cfg.lr == 1e-3
    cfg = resolve_config(DemoConfig, preset="smoke", presets=PRESETS, overrides={"epochs": None})
    assert cfg.epochs == 2 and cfg.lr == 0.01
    cfg = resolve_config(DemoConfig, preset="smoke", presets=PRESETS, overrides={"epochs": 7})
    assert cfg.epochs == 7 and cfg.lr == 0.01


def test_unknown_preset_lists_choices():
    with pytest.raises(UserInputError, match="unknown --preset 'fast'; choose one of: paper, smoke"):
        resolve_config(DemoConfig, preset="fast", presets=PRESETS, overrides={})


def test_validation_error_is_one_line_naming_the_flag():
    with pytest.raises(UserInputError) as info:
        resolve_config(DemoConfig, preset=None, presets=PRESETS, overrides={"lr_min": "abc"})
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("invalid value for --lr-min: 'abc'")
    with pytest.raises(UserInputError, match="--epochs: 0: input should be greater than 0"):
        resolve_config(DemoConfig, preset=None, presets=PRESETS, overrides={"epochs": 0})
    with pytest.raises(UserInputError, match="unknown setting --warmup-epochs"):
        resolve_config(DemoConfig, preset=None, presets=PRESETS, overrides={"warmup_epochs": 1})


def test_config_diff_messages():
    old = DemoConfig(epochs=5).model_dump(mode="json")
    new = DemoConfig(epochs=6, lr=0.01, device="cuda", num_workers=0)
    assert config_diff(old, new) == ["epochs: 5 -> 6", "lr: 0.001 -> 0.01"]
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 2}, "c": "x"}) == ["a.b: 1 -> 2", "c: (absent) -> x"]
    assert config_diff({"n": 5}, {"n": 5.0}) == []
    assert config_diff({"n": True}, {"n": 1}) == ["n: true -> 1"]
    assert config_diff({}, {}) == []
    assert "device" in RESUME_IGNORED_KEYS and "num_workers" in RESUME_IGNORED_KEYS


def test_check_resume_config():
    saved = DemoConfig(epochs=5).model_dump(mode="json")
    check_resume_config(saved, DemoConfig(epochs=5, device="cpu", num_workers=1))
    with pytest.raises(UserInputError, match=r"cannot resume: config differs: epochs: 5 -> 6, lr: 0.001 -> 0.002"):
        check_resume_config(saved, DemoConfig(epochs=6, lr=0.002))


def test_resolve_resume_config_takes_saved_values():
    saved = DemoConfig(epochs=5, lr=0.01).model_dump(mode="json")
    cfg = resolve_resume_config(
        DemoConfig, saved, preset=None, presets=PRESETS, overrides={"epochs": None, "device": "cpu"}
    )
    assert (cfg.epochs, cfg.lr, cfg.device, cfg.betas) == (5, 0.01, "cpu", (0.9, 0.999))
    with pytest.raises(UserInputError, match="epochs: 5 -> 9"):
        resolve_resume_config(DemoConfig, saved, preset=None, presets=PRESETS, overrides={"epochs": 9})


def test_a_check_across_settings_names_only_its_setting(tmp_path, capsys):
    from helpers import cli, one_line_error

    args = ["search", "--preset", "tiny", "--channels", "4000", "--out", str(tmp_path / "s")]
    line = one_line_error(*cli(args, capsys)[::2], "error: --channels 4000 cannot be split into groups of 3")
    assert "--config" not in line and "{" not in line
    conf = tmp_path / "c.json"
    conf.write_text('{"channels": 4000}')
    line = one_line_error(*cli([*args, "--config", str(conf)], capsys)[::2], "--channels 4000 cannot be split")
    assert "--config" in line and "{" not in line


class DecayConfig(RunConfig):
    weight_decay: float = 0.0
    arch_weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


def test_older_keys_are_read_under_todays_names(tmp_path):
    import json

    from bats_cli.core.config import current_keys, load_config_file

    # A search's config.json (wd, arch_wd) and a training run's (beta1, beta2) from before the rename.
    old = {"wd": 5e-4, "arch_wd": 2e-3, "beta1": 0.5, "beta2": 0.99}
    assert current_keys(old) == {"weight_decay": 5e-4, "arch_weight_decay": 2e-3, "betas": [0.5, 0.99]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": old}))
    assert load_config_file(path, DecayConfig) == {"weight_decay": 5e-4, "arch_weight_decay": 2e-3,
                                                   "betas": [0.5, 0.99]}
    # An old run resumes with its own values, and a flag that differs is still refused by its new name.
    cfg = resolve_resume_config(DecayConfig, old, preset=None, presets={}, overrides={})
    assert (cfg.weight_decay, cfg.arch_weight_decay, cfg.betas) == (5e-4, 2e-3, (0.5, 0.99))
    check_resume_config(old, cfg)
    with pytest.raises(UserInputError, match=r"weight_decay: 0.0005 -> 0.001"):
        resolve_resume_config(DecayConfig, old, preset=None, presets={}, overrides={"weight_decay": 1e-3})


def test_the_search_and_train_configs_spell_each_setting_once():
    from bats_cli.nas.search import SearchConfig
    from bats_cli.pipeline.train import TrainConfig

    for model in (SearchConfig, TrainConfig):
        assert not {"wd", "arch_wd", "beta1", "beta2"} & set(model.model_fields), model
    assert {"weight_decay", "betas"} <= set(SearchConfig.model_fields) & set(TrainConfig.model_fields)
