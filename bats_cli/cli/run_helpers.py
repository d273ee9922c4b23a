"""What the long commands (search, train, binarize) share around the library call: resume mode,
the memory plan's hook, the overrides a resume checks, the start line, rank 0, the config they
resolve (or print) and the run that ends in the result."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def is_main_process() -> bool:
    """False on the other ranks under torchrun: only rank 0 prints the result."""
    return int(os.environ.get("RANK", "0")) == 0



def _foreign_files(out: Path) -> str:
    """The first names in ``out`` when it holds files but nothing of a bats run, else ''."""
    try:
        names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    except OSError:
        return ""
    if not names or {"config.json", "metrics.csv", "last.safetensors"} & set(names):
        return ""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def resume_mode(out: Path | None, resume: bool, resume_or_start: bool) -> bool:
    """The library's ``resume`` flag; ``--resume`` of a directory without a checkpoint is refused."""
    from bats_cli.core.errors import UserInputError

    if resume and resume_or_start:
        raise UserInputError("give --resume or --resume-or-start, not both")
    if not (resume or resume_or_start):
        return False
    flag = "--resume" if resume else "--resume-or-start"
    if out is None:
        raise UserInputError(f"{flag} needs --out DIR (the run directory to continue)")
    from bats_cli.storage.runlock import in_use_message

    busy = in_use_message(out)
    if busy:
        raise UserInputError(busy)
    if resume and not (out / "last.safetensors").is_file() and _foreign_files(out):
        raise UserInputError(
            f"--resume: {out} holds no bats run ({_foreign_files(out)}); give the --out of the run "
            "to continue, or a new --out without --resume"
        )
    if resume and not (out / "last.safetensors").is_file():
        raise UserInputError(
            f"--resume: {out} holds no checkpoint (last.safetensors) to continue; start the run "
            f"without --resume, or use --resume-or-start to start it when there is none"
        )
    return True


def preflight_hook(*, dry_run: bool, ignore_plan: bool, as_json: bool, quiet: bool) -> Any:
    """The plan hook for a long command (see :mod:`bats_cli.training.plan`); ``ignore_plan``: start even
    when the plan says the run does not fit."""
    from bats_cli.training.plan import make_preflight

    return make_preflight(dry_run=dry_run, force=ignore_plan, as_json=as_json, quiet=quiet)


def starting(command: str, what: str, *, quiet: bool) -> None:
    """At a terminal, one line before a long command's slow start (importing torch, reading the
    data, building the network), so it is never silent for long; piped output stays as it was
    (an error is then still the one line on stderr)."""
    if quiet or os.environ.get("RANK", "0") != "0" or not sys.stderr.isatty():
        return
    print(f"{command}: starting: {what}; the plan follows", file=sys.stderr, flush=True)


def run_planned(fn: Callable[[], Any], *, as_json: bool) -> Any:
    """``fn()``; with ``--dry-run`` None (the hook printed the plan's lines on stderr; with
    ``--json`` the plan is printed here, as one JSON object on stdout)."""
    from bats_cli.training.plan import DryRun, print_plan

    try:
        return fn()
    except DryRun as dry:
        if as_json and dry.plan is not None:
            print_plan(dry.plan, as_json=True)
        return None



def resume_overrides(file_config: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """What a resume checks against the saved config: the ``--config`` file's settings, then the
    flags given (a flag left at None was not given)."""
    return {**(file_config or {}), **{k: v for k, v in overrides.items() if v is not None}}


def command_config(config_cls: Any, *, preset: str | None, presets: Mapping[str, Any], overrides: Mapping[str, Any],
                   config_file: Path | None, print_config_: bool) -> tuple[Any, Mapping[str, Any] | None]:
    """The config a long command runs with (preset, then ``--config FILE``, then the flags) and the
    file's settings; with ``--print-config`` the config is printed and None is returned in its place."""
    from bats_cli.cli.output import print_config
    from bats_cli.core.config import load_config_file, resolve_config

    file_config = load_config_file(config_file, config_cls) if config_file is not None else None
    cfg = resolve_config(config_cls, preset=preset, presets=presets, overrides=overrides, file_config=file_config)
    if print_config_:
        print_config(cfg)
        return None, file_config
    return cfg, file_config


def run_command(run: Callable[[Any, dict[str, Any]], Any], *, file_config: Mapping[str, Any] | None,
                overrides: Mapping[str, Any], dry_run: bool, ignore_plan: bool, as_json: bool, quiet: bool,
                table_fn: Callable[[Any], Any]) -> None:
    """``run(preflight hook, the overrides a resume checks)`` under the memory plan; rank 0 prints
    its result (a mapping), as a table or with ``--json`` as JSON."""
    from bats_cli.cli.output import emit_result

    # On --resume the saved config is the base; --config FILE and the flags must agree with it.
    resumed = resume_overrides(file_config, overrides)
    hook = preflight_hook(dry_run=dry_run, ignore_plan=ignore_plan, as_json=as_json, quiet=quiet)
    result = run_planned(lambda: run(hook, resumed), as_json=as_json)
    # Under torchrun every rank returns the result; rank 0 prints it.
    if result is not None and is_main_process():
        emit_result(result, as_json=as_json, table_fn=table_fn)
