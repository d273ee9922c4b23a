"""One name, short form, type and meaning per concept across every command's options, read from
the click command tree (not from --help text); and the options whose meaning was split."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from helpers import cli, one_line_error


def _commands():
    """(path, click command) of every command and sub-command."""
    from typer.main import get_command

    from bats_cli.cli import _load_commands
    from bats_cli.cli.app import app

    _load_commands()
    found, todo = [], [("bats", get_command(app))]
    while todo:
        path, command = todo.pop()
        subs = getattr(command, "commands", None)
        if subs:
            todo += [(f"{path} {name}", sub) for name, sub in subs.items()]
        else:
            found.append((path, command))
    return found


def _options():
    """{long name: [(command path, click option)]} over every command."""
    by_name = defaultdict(list)
    for path, command in _commands():
        for param in command.params:
            if getattr(param, "param_type_name", "") != "option":
                continue
            longs = [o for o in param.opts if o.startswith("--")]
            by_name[longs[0] if longs else param.opts[0]].append((path, param))
    return by_name


def _kind(param):
    """(value type, "file" / "dir" / "path" for paths, min, max), on typer's own click or on click."""
    desc = getattr(param, "type_descriptor", None)
    if desc is not None:  # typer >= 0.26
        name = getattr(desc.annotation, "__name__", str(desc.annotation))
        return name, desc.path_type if desc.is_path else None, param.min, param.max
    kind, path = param.type, None
    if hasattr(kind, "dir_okay"):
        path = "file" if not kind.dir_okay else "dir" if not kind.file_okay else "path"
    return type(kind).__name__, path, getattr(kind, "min", None), getattr(kind, "max", None)


def _declaration(param, *, with_help: bool = True):
    """What makes two options the same option."""
    return (
        tuple(param.opts), tuple(param.secondary_opts), param.is_flag, *_kind(param), param.envvar, param.metavar,
        getattr(param, "rich_help_panel", None), param.help if with_help else None,
    )


OPTIONS = _options()


def test_the_concepts_are_there():
    # Guard against a vacuous pass: the options compared below exist on several commands.
    for name in ("--threads", "--json", "--dataset", "--data-dir", "--preset", "--config", "--force",
                 "--output", "--out", "--ignore-plan"):
        assert len(OPTIONS[name]) >= 2, (name, OPTIONS[name])


@pytest.mark.parametrize("name", ["--threads", "--json", "--dataset", "--data-dir", "--config", "--force",
                                  "--ignore-plan", "--quiet", "--seed", "--resume", "--dry-run", "--group-policy",
                                  "--channels-per-group", "--reduce-shortcut", "--channel-shuffle"])
def test_one_declaration_per_concept(name):
    declared = {_declaration(param) for _, param in OPTIONS[name]}
    assert len(declared) == 1, {path: _declaration(p) for path, p in OPTIONS[name]}


def test_every_preset_is_one_option_type():
    # The help lists each command's own presets; the rest is one declaration, refused at parse time.
    declared = {_declaration(param, with_help=False)[:-2] for _, param in OPTIONS["--preset"]}
    assert len(declared) == 1, declared
    for path, param in OPTIONS["--preset"]:
        assert param.callback is not None and ":" in param.help, path


def test_short_forms_mean_one_option_everywhere():
    long_of = defaultdict(set)
    for name, uses in OPTIONS.items():
        for _, param in uses:
            for short in (o for o in param.opts if not o.startswith("--")):
                long_of[short].add(name)
    assert long_of["-o"] == {"--output"}
    assert all(len(names) == 1 for names in long_of.values()), dict(long_of)


def test_output_is_a_file_and_out_a_directory():
    for path, param in OPTIONS["--output"]:
        assert "-o" in param.opts and _kind(param)[1] == "file", path
    for path, param in OPTIONS["--out"]:
        assert param.opts == ["--out"] and _kind(param)[1] == "dir", path


def test_force_only_overwrites():
    (help_text,) = {param.help for _, param in OPTIONS["--force"]}
    assert "overwrite" in help_text.lower() and "plan" not in help_text.lower()
    commands = {path for path, _ in OPTIONS["--ignore-plan"]}
    assert commands == {"bats search", "bats train", "bats binarize"}


def test_panels_are_the_named_constants():
    from bats_cli.cli.options import DATA, DISTILL, OUTPUT, RUN

    for name in ("--threads", "--json", "--dataset", "--data-dir", "--force", "--output", "--teacher"):
        for path, param in OPTIONS[name]:
            assert param.rich_help_panel in (DATA, RUN, OUTPUT, DISTILL), (path, name)


def test_ablate_presets_are_the_studies():
    from bats_cli.cli.ablate import ABLATE_PRESETS
    from bats_cli.studies.catalog import PRESETS

    assert set(ABLATE_PRESETS) == set(PRESETS)


def test_ablate_refuses_an_unknown_preset_and_has_no_short_out(capsys):
    code, _, err = cli(["ablate", "random", "--preset", "huge"], capsys)
    one_line_error(code, err, "huge", "cpu")
    code, _, err = cli(["ablate", "random", "-o", "somewhere"], capsys)
    one_line_error(code, err, "-o")


def test_eval_output_is_not_overwritten_without_force(tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not a checkpoint")
    existing = tmp_path / "eval.json"
    existing.write_text('{"kept": true}')
    code, _, err = cli(["eval", str(model), "-o", str(existing)], capsys)
    one_line_error(code, err, "already exists", "--force")
    assert json.loads(existing.read_text()) == {"kept": True}
    # With --force the output check passes and the checkpoint is what is refused.
    code, _, err = cli(["eval", str(model), "-o", str(existing), "--force"], capsys)
    line = one_line_error(code, err)
    assert "already exists" not in line and "model.safetensors" in line


def test_ignore_plan_is_the_plan_override(monkeypatch):
    from bats_cli.cli.run_helpers import preflight_hook
    from bats_cli.training import plan

    seen = {}
    monkeypatch.setattr(plan, "make_preflight", lambda **kw: seen.update(kw))
    preflight_hook(dry_run=False, ignore_plan=True, as_json=False, quiet=True)
    assert seen["force"] is True


def test_force_no_longer_overrides_the_plan(capsys):
    code, _, err = cli(["train", "bats_c10", "--preset", "tiny", "--force", "--print-config"], capsys)
    one_line_error(code, err, "--force")
    code, out, _ = cli(["train", "bats_c10", "--preset", "tiny", "--ignore-plan", "--print-config"], capsys)
    assert code == 0 and json.loads(out)["genotype"] == "bats_c10"
