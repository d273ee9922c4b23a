"""Property-based fuzzing of every input boundary (docs/reliability.md, "Input boundaries").

The property, for every generated input: `bats` ends with exit 0, or exit 2 and exactly one
``error:`` line on stderr; never exit 1, never an internal error (no crash file), never a
traceback, within a time bound. Inputs are mutations of real files (genotype JSON, DARTS text,
checkpoints of every kind, resume state, --config files, run directories `bats report` reads) and
flag values at their extremes.

Example counts are small so the default suite stays within about a minute; the nightly profile
(``pytest tests/test_fuzz.py --hypothesis-profile=nightly``, registered in conftest.py) runs
25 times as many. Every CLI call is in-process (tests/helpers.py) on tiny inputs.
``BATS_FUZZ_TRACE=1 pytest -s`` prints every generated call with its exit code;
``BATS_FUZZ_NO_SHRINK=1`` reports a failure as found (shrinking a torch example takes minutes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

pytest.importorskip("hypothesis")  # a dev dependency (pyproject.toml)
from helpers import cli
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GENOTYPES = REPO / "bats_cli" / "genotypes"

pytestmark = pytest.mark.slow  # fuzzing (hypothesis) over trained artifacts

# One example of a boundary may take this long on a loaded 2-core machine; more is a hang.
EXAMPLE_SECONDS = 120


def budget(n: int) -> int:
    """``n`` examples in the default profile (max_examples 100), 25 n in the nightly one."""
    return n * max(1, settings().max_examples // 100)


def fuzz(n: int):
    """Hypothesis settings of one fuzz test: ``budget(n)`` examples, no per-example deadline
    (a loaded CI machine), the alarm in :func:`check` bounds each example instead."""
    # No "explain" phase: its line tracing makes one torch example take minutes.
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if not os.environ.get("BATS_FUZZ_NO_SHRINK"):
        phases.append(Phase.shrink)
    return settings(
        max_examples=budget(n),
        deadline=None,
        phases=phases,
        # The default suite tests the same examples every run (a stable time, no flakes);
        # the nightly profile draws new ones each time.
        derandomize=budget(1) == 1,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Hang(BaseException):
    """An example ran past EXAMPLE_SECONDS (a BaseException: the CLI must not catch it)."""


@contextlib.contextmanager
def _alarm(seconds: int):
    def ring(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check(argv: list[str], capsys, *, stdin: str | None = None) -> tuple[int, str, str]:
    """Run ``bats argv`` in-process and assert the property; returns (code, stdout, stderr)."""
    crashes: list[BaseException] = []

    def no_crash_file(exc):
        crashes.append(exc)
        return None

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("bats_cli.cli.lifecycle.save_traceback", no_crash_file))
        if stdin is not None:
            import io

            stack.enter_context(mock.patch("sys.stdin", io.StringIO(stdin)))
        stack.enter_context(_alarm(EXAMPLE_SECONDS))
        code, out, err = cli(argv, capsys)
    shown = f"bats {' '.join(a[:200] for a in argv)}\nexit {code}\n{err[-3000:]}"
    if os.environ.get("BATS_FUZZ_TRACE"):
        print(f"FUZZ {code} {argv[:2]} {(stdin or argv[-1])[:300]!r}", file=sys.__stderr__)
    assert not crashes, f"internal error: {crashes[0]!r}\n{shown}"
    assert "Traceback" not in err, shown
    assert code in (0, 2), shown
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, shown
        assert "internal error" not in errors[0], shown
    return code, out, err


# --------------------------------------------------------------------------- hostile values


class BigInt(int):
    """An integer JSON text spells with ``digits`` digits (past Python's int-to-string limit)."""

    def __new__(cls, digits: int):
        obj = super().__new__(cls, 7)
        obj.digits = digits
        return obj


def to_json(obj) -> str:
    """JSON text of ``obj``, with NaN / Infinity written as Python writes them, and BigInts."""
    if isinstance(obj, BigInt):
        return "9" * obj.digits
    if isinstance(obj, Deep):
        return "[" * obj.depth + "]" * obj.depth
    if isinstance(obj, bool) or obj is None:
        return json.dumps(obj)
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        return json.dumps(obj)  # NaN, Infinity, -Infinity
    if isinstance(obj, str):
        return json.dumps(obj)
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {to_json(v)}" for k, v in obj.items()) + "}"
    return "[" + ", ".join(to_json(v) for v in obj) + "]"


HOSTILE_INTS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([-1, 0, 1, 2**31, 2**31 - 1, 2**53 + 1, 2**63, 2**64, -(2**63), 10**30, 10**300]),
    st.builds(BigInt, st.sampled_from([400, 4299, 4301, 10_000])),
)
HOSTILE_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, -1.0, 1e-320, 1e308, -1e308, math.inf, -math.inf, math.nan, 0.5]),
    st.floats(allow_nan=True, allow_infinity=True),
)
HOSTILE_STRINGS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\x1b[2J", "\u202eevil", "../../../../etc/passwd", "/dev/zero", "a" * 5000,
                     "[link=file:///etc]x[/link]", "NaN", "-1", "1e999", "0x10", "cuda:99999",
                     "sep_conv_3x3", "skip_connect", "resnet18", "cells", "packed", "search"]),
)
SCALARS = st.one_of(st.none(), st.booleans(), HOSTILE_INTS, HOSTILE_FLOATS, HOSTILE_STRINGS)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_STRINGS, inner, max_size=4),
    max_leaves=8,
)
class Deep:
    """A JSON array nested ``depth`` levels deep (written as text: no recursion here)."""

    def __init__(self, depth: int):
        self.depth = depth


DEEP = st.builds(Deep, st.sampled_from([33, 200, 1000, 100_000]))


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate(data, draw, *, rounds: int = 3):
    """1 to ``rounds`` random edits of a JSON structure: a value replaced by a hostile one (type
    confusion, huge or non-finite numbers, control characters, deep nesting), a key or item
    deleted, a list item duplicated, an unknown key added."""
    import copy

    data = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, rounds))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "dup", "add", "deep"]))
        if not path:
            if op in ("replace", "deep"):
                data = draw(JSON_VALUES)
            continue
        parent, key = _get(data, path[:-1]), path[-1]
        if op == "replace":
            parent[key] = draw(JSON_VALUES)
        elif op == "deep":
            parent[key] = draw(DEEP)
        elif op == "delete":
            del parent[key]
        elif op == "dup" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif op == "add" and isinstance(parent, dict):
            parent[draw(HOSTILE_STRINGS)] = draw(JSON_VALUES)
    return data


def mutate_text(text: str, draw) -> str:
    """Sometimes a byte-level edit of serialized text: truncation, a character inserted or removed."""
    op = draw(st.sampled_from(["none", "none", "truncate", "insert", "remove"]))
    if not text or op == "none":
        return text
    i = draw(st.integers(0, len(text) - 1))
    if op == "truncate":
        return text[:i]
    if op == "insert":
        return text[:i] + draw(st.sampled_from(list("[]{},:\"\\0-9e.") + ["\x00", "\ufeff", "\udcff"])) + text[i:]
    return text[:i] + text[i + 1:]


def write_text(path: Path, text: str) -> Path:
    # Lone surrogates become invalid UTF-8 bytes: hostile files need not be valid text.
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return path


# --------------------------------------------------------------------------- genotypes


ZOO = {p.stem: json.loads(p.read_text()) for p in sorted(GENOTYPES.glob("*.json"))}


@fuzz(150)
@given(data=st.data())
def test_fuzz_genotype_json(tmp_path_factory, capsys, data):
    base = ZOO[data.draw(st.sampled_from(sorted(ZOO)))]
    text = mutate_text(to_json(mutate(base, data.draw)), data.draw)
    path = write_text(tmp_path_factory.mktemp("g") / "g.json", text)
    command = data.draw(st.sampled_from([["genotype", "validate"], ["genotype", "show"],
                                         ["genotype", "show", "--json"]]))
    check([*command, str(path)], capsys)


def _darts_range(draw, depth: int = 0) -> str:
    """``range(...)``: mostly integer arguments at the edges (zero steps, huge bounds)."""
    n = draw(st.sampled_from([0, 1, 2, 3, 3, 3, 4]))
    bound = st.sampled_from(["0", "1", "2", "6", "-1", "1000000", "1000001", "9" * 30, "0x" + "f" * 100])
    step = st.sampled_from(["0", "0", "1", "-1", "1000001"])
    args = [draw(step if i == 2 else bound) if draw(st.integers(0, 5)) else _darts_expr(draw, depth + 1)
            for i in range(n)]
    return "range(" + ", ".join(args) + ")"


def _darts_expr(draw, depth: int = 0) -> str:
    ints = draw(st.one_of(st.integers(-3, 8), st.sampled_from([0, 10**6, 10**7, 2**63, 10**300]).map(int)))
    kinds = ["int", "hex", "range", "list", "pair", "str", "call", "attr", "big", "neg"]
    kind = draw(st.sampled_from(kinds if depth < 3 else kinds[:2]))
    if kind == "int":
        return str(ints)
    if kind == "neg":
        return f"-{abs(ints)}"
    if kind == "hex":
        return "0x" + "f" * draw(st.sampled_from([1, 8, 100, 5000]))
    if kind == "big":
        return "9" * draw(st.sampled_from([20, 4299, 4301, 6000]))
    if kind == "range":
        return _darts_range(draw, depth)
    if kind == "list":
        n = draw(st.integers(0, 5))
        open_, close = draw(st.sampled_from([("[", "]"), ("(", ")")]))
        return open_ + ", ".join(_darts_expr(draw, depth + 1) for _ in range(n)) + close
    if kind == "pair":
        op = draw(st.sampled_from(["'sep_conv_3x3'", "'skip_connect'", "'group_conv_3x3'", "'evil'",
                                   "'\\x1b[2J'", "None", "1"]))
        return f"({op}, {_darts_expr(draw, depth + 1)})"
    if kind == "str":
        return repr(draw(HOSTILE_STRINGS))
    if kind == "call":
        return draw(st.sampled_from(["list", "tuple", "__import__", "open", "print"])) + "(" + _darts_expr(draw, depth + 1) + ")"
    return "os.system('true')"


@fuzz(150)
@given(data=st.data())
def test_fuzz_darts_genotype_text(tmp_path_factory, capsys, data):
    valid_cell = "[('sep_conv_3x3', 0), ('skip_connect', 1)]"
    names = ("normal", "normal_concat", "reduce", "reduce_concat")
    fields = {name: valid_cell if name in ("normal", "reduce") else "range(2, 3)" for name in names}
    # One field hostile (sometimes two), the others valid: an error in one never hides another's.
    for name in data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True)):
        hostile = _darts_range if "concat" in name and data.draw(st.booleans()) else _darts_expr
        fields[name] = hostile(data.draw)
    text = "Genotype(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"
    text = data.draw(st.sampled_from(["{}", "X = {}", "X = {}\nY = X", "{}\n{}", "import os\n{}"])).replace(
        "{}", text, 2)
    text = mutate_text(text, data.draw)
    how = data.draw(st.sampled_from(["argv", "file", "stdin"]))
    if how == "file":
        path = write_text(tmp_path_factory.mktemp("d") / "genotypes.py", text)
        check(["genotype", "import", str(path)], capsys)
    elif how == "stdin":
        check(["genotype", "import", "-"], capsys, stdin=text)
    elif "\x00" not in text:  # argv cannot hold a NUL byte
        check(["genotype", "import", text], capsys)


# --------------------------------------------------------------------------- tiny real artifacts

# The smallest runs there are: 3 cells of 6 channels on 8 px fashion-mini images, batch 8.
TRAIN_FLAGS = ["--dataset", "fashion-mini", "--subset", "16", "--batch-size", "8", "--epochs", "2",
               "--layers", "3", "--channels", "6", "--image-size", "8", "--threads", "1"]
SEARCH_FLAGS = ["--dataset", "fashion-mini", "--subset", "16", "--image-size", "8", "--batch-size", "8",
                "--epochs", "2", "--warmup", "1", "--channels", "6", "--layers", "3", "--ops", "8",
                "--threads", "1"]


class _StopAfter:
    """An interrupt that asks the run to stop at its ``n``-th poll (a Ctrl-C after n steps)."""

    def __init__(self, n: int):
        self.n, self.requested, self.signal_name = n, False, "SIGINT"

    def raise_if_requested(self, save_fn=None):
        from bats_cli.core.errors import Interrupted

        self.n -= 1
        if self.n <= 0 or self.requested:
            self.requested = True
            saved = save_fn() if save_fn is not None else None
            raise Interrupted(f"stopped; checkpoint {saved}")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Run directories stopped part-way (train, search), a finished train run and its packed
    artifact; built once, copied before each mutation."""
    import torch

    from bats_cli.core.errors import Interrupted
    from bats_cli.nas.search import SearchConfig, run_search

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("artifacts")
    capture = contextlib.redirect_stderr(open(os.devnull, "w"))
    with capture:
        # bats train, stopped after its first step (epoch 0 of 2, step 1 of 2).
        from bats_cli.core.zoo import resolve_genotype
        from bats_cli.pipeline.train import TrainConfig, train

        cfg = TrainConfig(genotype="bats_c10", dataset="fashion-mini", subset=16, batch_size=8, epochs=2,
                          layers=3, channels=6, image_size=8, threads=1)
        with pytest.raises(Interrupted):
            train(cfg, genotype=resolve_genotype("bats_c10"), out=root / "train", quiet=True,
                  stop_after_steps=1, handle_signals=False)
        # A finished run of the same settings and its packed artifact.
        shutil.copytree(root / "train", root / "done")
        train(cfg, genotype=resolve_genotype("bats_c10"), out=root / "done", resume=True, quiet=True,
              handle_signals=False)
        torch.set_num_threads(threads)
        code = cli(["binarize", str(root / "done" / "last.safetensors"), "--epochs", "0",
                    "--calibration-batches", "1", "--out", str(root / "bin"), "-o",
                    str(root / "model.packed.safetensors"), "--force", "-q"], _NoCapture())[0]
        assert code == 0
        # bats binarize of the finished run, one fine-tuning epoch, stopped after its first step.
        from bats_cli.pipeline.binarize import BinarizeConfig, binarize

        bcfg = BinarizeConfig(checkpoint=str(root / "done" / "last.safetensors"), epochs=1,
                              calibration_batches=1, threads=1)
        with pytest.raises(Interrupted):
            binarize(bcfg, out=root / "binarize", packed=root / "unused.packed.safetensors", quiet=True,
                     stop_after_steps=1, handle_signals=False)
        torch.set_num_threads(threads)
        # bats search, one stage of 2 one-step epochs, stopped after the step of its second epoch
        # (polls: step, end of epoch 1, step): metrics.csv and alphas/ hold epoch 1.
        scfg = SearchConfig(dataset="fashion-mini", subset=16, image_size=8, batch_size=8, epochs=2,
                            warmup=1, channels=6, layers=(3,), ops=(8,), threads=1)
        with pytest.raises(Interrupted):
            run_search(scfg, out_dir=root / "search", interrupt=_StopAfter(3))
    torch.set_num_threads(threads)
    return root


class _NoCapture:
    """A stand-in for capsys where nothing needs reading."""

    def readouterr(self):
        return "", ""


def read_file(path: Path):
    """(tensors, metadata) of a safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    return load_file(str(path)), meta


def write_file(path: Path, tensors, meta) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


SCALAR_KEYS = ("bats_format", "bats_kind", "bats_epoch", "bats_step")
HOSTILE_COUNTERS = st.one_of(
    st.integers(-5, 10).map(str),
    st.sampled_from(["", " 1", "1.0", "1e3", "0x10", "-0", "nan", "9" * 19, "9" * 21, str(2**63),
                     str(10**7), str(10**9 + 1), "search", "packed", "train", "binarize", "\x1b[2J"]),
)


def mutate_metadata(meta: dict, draw) -> dict:
    """Edits of a checkpoint's metadata: JSON values mutated (wrong types, sizes, nesting,
    non-finite numbers), counters and kinds replaced, keys deleted or added."""
    meta = dict(meta)
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from(sorted(meta) + ["unknown_key"]))
        op = draw(st.sampled_from(["json", "json", "json", "scalar", "delete", "raw"]))
        if op == "delete" and key in meta:
            del meta[key]
        elif op == "scalar" or key in SCALAR_KEYS:
            meta[key] = draw(HOSTILE_COUNTERS)
        elif op == "raw":
            meta[key] = mutate_text(meta.get(key, "{}"), draw) if draw(st.booleans()) else to_json(draw(JSON_VALUES))
        else:
            try:
                value = json.loads(meta.get(key, "{}"))
            except (ValueError, RecursionError):
                value = {}
            meta[key] = to_json(mutate(value, draw))
    return meta


TENSOR_EDITS = ["shape", "dtype", "nan", "delete", "add", "scalar"]


def mutate_tensors(tensors: dict, draw, *, prefixes=("",)) -> dict:
    """One edit of a tensor whose name starts with one of ``prefixes``: another shape, dtype,
    NaN/inf values, removed, or an unknown tensor added."""
    tensors = dict(tensors)
    names = sorted(k for k in tensors if k.startswith(prefixes)) or sorted(tensors)
    name = draw(st.sampled_from(names))
    op = draw(st.sampled_from(TENSOR_EDITS))
    t = tensors[name]
    if op == "shape":
        shape = draw(st.sampled_from([(), (1,), (0,), (3, 1), tuple(t.shape) + (1,),
                                      tuple(max(1, s - 1) for s in t.shape) or (2,)]))
        tensors[name] = torch.zeros(shape, dtype=t.dtype)
    elif op == "dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int8, torch.bool, torch.float16, torch.float64,
                                      torch.uint8]))
        tensors[name] = t.to(dtype)
    elif op == "nan":
        tensors[name] = torch.full_like(t.float(), draw(st.sampled_from([math.nan, math.inf, 1e38]))).to(
            t.dtype if t.is_floating_point() else torch.float32)
    elif op == "delete":
        del tensors[name]
    elif op == "add":
        tensors[name + ".extra"] = torch.zeros(2)
    else:
        tensors[name] = torch.tensor(draw(st.sampled_from([0.0, -1.0, 1e30])))
    return tensors


def _tampered_copy(src: Path, dst: Path, draw, *, tensor_prefixes=None) -> Path:
    tensors, meta = read_file(src)
    if tensor_prefixes is None or draw(st.booleans()):
        meta = mutate_metadata(meta, draw)
    if tensor_prefixes is not None:
        tensors = mutate_tensors(tensors, draw, prefixes=tensor_prefixes)
    return write_file(dst, tensors, meta)


# Commands that read a file of each kind, cheap on these tiny networks (8 test images).
EVAL = ["--subset", "8", "--batch-size", "8", "--threads", "1"]


@fuzz(10)
@given(data=st.data())
def test_fuzz_checkpoint_metadata(artifacts, tmp_path_factory, capsys, data):
    which = data.draw(st.sampled_from(["train", "packed", "search"]))
    src = {"train": artifacts / "done" / "last.safetensors", "packed": artifacts / "model.packed.safetensors",
           "search": artifacts / "search" / "last.safetensors"}[which]
    path = _tampered_copy(src, tmp_path_factory.mktemp("ck") / "x.safetensors", data.draw)
    if which == "search":
        command = data.draw(st.sampled_from([["derive", str(path)], ["derive", str(path), "--json"]]))
    else:
        command = data.draw(st.sampled_from([["eval", str(path), *EVAL], ["flops", str(path)]]))
    check(command, capsys)


# --------------------------------------------------------------------------- resume state

BINARIZE_FLAGS = ["--epochs", "1", "--calibration-batches", "1", "--threads", "1"]
RESUME_KEYS = {
    "train": ("bats_optimizer", "bats_running", "bats_epoch", "bats_step", "bats_loop"),
    "binarize": ("bats_optimizer", "bats_running", "bats_epoch", "bats_step", "bats_loop", "bats_binarize"),
    "search": ("search_state", "arch_state", "optim_w", "optim_a", "bats_epoch", "bats_step", "bats_loop"),
}


def _tampered_run(artifacts: Path, which: str, dst: Path, draw) -> Path:
    """A copy of a stopped run whose last.safetensors has tampered resume state: optimizer
    buffers of other shapes or dtypes, counters out of range, mutated state JSON."""
    run = shutil.copytree(artifacts / which, dst / which)
    last = run / "last.safetensors"
    tensors, meta = read_file(last)
    target = draw(st.sampled_from(["tensor", "json", "counter"]))
    if target == "tensor":
        tensors = mutate_tensors(tensors, draw, prefixes=("optim", "rng.", "model.alpha"))
    elif target == "counter":
        key = draw(st.sampled_from(["bats_epoch", "bats_step"]))
        meta[key] = draw(st.sampled_from(["0", "1", "2", "3", "4", "-1", "99", str(10**7), str(10**9)]))
    else:
        key = draw(st.sampled_from([k for k in RESUME_KEYS[which] if k in meta]))
        meta[key] = to_json(mutate(json.loads(meta[key]), draw))
    write_file(last, tensors, meta)
    return run


@fuzz(6)
@given(data=st.data())
def test_fuzz_resume_state(artifacts, tmp_path_factory, capsys, data):
    which = data.draw(st.sampled_from(["train", "binarize", "search"]))
    run = _tampered_run(artifacts, which, tmp_path_factory.mktemp("resume"), data.draw)
    if which == "train":
        check(["train", "bats_c10", *TRAIN_FLAGS, "--out", str(run), "--resume", "--ignore-plan", "-q"], capsys)
    elif which == "binarize":
        check(["binarize", str(artifacts / "done" / "last.safetensors"), *BINARIZE_FLAGS, "--out", str(run),
               "-o", str(run.parent / "m.packed.safetensors"), "--resume", "--force", "--ignore-plan", "-q"],
              capsys)
    else:
        check(["search", *SEARCH_FLAGS, "--out", str(run), "--resume", "--ignore-plan", "-q"], capsys)


# --------------------------------------------------------------------------- run directories


HOSTILE_CELLS = st.one_of(HOSTILE_STRINGS, st.sampled_from(
    ["inf", "-inf", "nan", "1e309", "-1", "0", "1" * 400, "9" * 5000, "1.5", "\"", "a,b", "\n"]))


def _mutate_csv(text: str, draw) -> str:
    import csv
    import io

    rows = list(csv.reader(io.StringIO(text)))
    op = draw(st.sampled_from(["cell", "cell", "column", "rows", "text"]))
    if op == "text" or len(rows) < 2:
        return mutate_text(text, draw)
    if op == "cell":
        r = draw(st.integers(0, len(rows) - 1))
        c = draw(st.integers(0, max(0, len(rows[r]) - 1)))
        if rows[r]:
            rows[r][c] = draw(HOSTILE_CELLS)
    elif op == "column":
        for row in rows:
            row.append(draw(HOSTILE_CELLS))
    else:
        rows = draw(st.sampled_from([rows[:1], rows + rows[1:], [rows[0][:1]] + rows[1:], rows[1:]]))
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


@fuzz(3)
@given(data=st.data())
def test_fuzz_run_directory_for_report(artifacts, tmp_path_factory, capsys, data):
    pytest.importorskip("matplotlib")
    which = data.draw(st.sampled_from(["done", "search"]))
    run = shutil.copytree(artifacts / which, tmp_path_factory.mktemp("report") / which)
    files = sorted(p for p in run.rglob("*.json")) + [run / "metrics.csv"]
    target = data.draw(st.sampled_from(files))
    text = target.read_text()
    if target.name == "metrics.csv":
        text = _mutate_csv(text, data.draw)
    else:
        text = mutate_text(to_json(mutate(json.loads(text), data.draw)), data.draw)
    write_text(target, text)
    check(["report", str(run), "--out", str(run.parent / "out")], capsys)


# --------------------------------------------------------------------------- --config files

CONFIG_MODELS = {"train": "bats_cli.pipeline.train:TrainConfig", "search": "bats_cli.nas.search:SearchConfig",
                 "binarize": "bats_cli.pipeline.binarize:BinarizeConfig"}


def _model(command: str):
    import importlib

    module, name = CONFIG_MODELS[command].split(":")
    return getattr(importlib.import_module(module), name)


@fuzz(100)
@given(data=st.data())
def test_fuzz_config_files(artifacts, tmp_path_factory, capsys, data):
    command = data.draw(st.sampled_from(sorted(CONFIG_MODELS)))
    fields = sorted(_model(command).model_fields)
    settings = {k: data.draw(JSON_VALUES) for k in data.draw(st.lists(st.sampled_from(fields), max_size=4))}
    if data.draw(st.booleans()):
        settings = {"command": command, "config": settings}  # a run's config.json
    text = mutate_text(to_json(settings), data.draw)
    path = write_text(tmp_path_factory.mktemp("cfg") / "config.json", text)
    head = {"train": ["train", "bats_c10"], "search": ["search"],
            "binarize": ["binarize", str(artifacts / "done" / "last.safetensors")]}[command]
    check([*head, "--config", str(path), "--print-config"], capsys)


# --------------------------------------------------------------------------- flag values

# Mostly values at or past the limits, some ordinary ones so that runs get past validation.
EXTREMES = st.sampled_from(["1", "2", "8", "0.1", "0.9", "inf", "-inf", "nan", "1e308", "-1", "0", "-0", "1e-320", "0.5", str(2**63), "9" * 30,
                            "9" * 5000, "", "abc", "0x10", "1,2", ",", ",".join(["3"] * 100), "cuda:7",
                            "\x1b[2J", "../../x"])

# Each command with the flags that take a value, on a base that finishes in a second or two
# (--dry-run for the long commands: every check before the work, the plan included).
FLAG_COMMANDS = {
    "train": (["train", "bats_c10", *TRAIN_FLAGS, "--dry-run", "-q"],
              ["--epochs", "--batch-size", "--subset", "--holdout", "--image-size", "--layers", "--channels",
               "--momentum", "--lr", "--lr-min", "--weight-decay", "--aux-weight", "--drop-path", "--cutout",
               "--mixup", "--seed", "--num-workers", "--threads", "--channel-shuffle", "--channels-per-group",
               "--width", "--activation", "--device", "--precision", "--optimizer", "--dataset"]),
    "search": (["search", *SEARCH_FLAGS, "--dry-run", "-q"],
               ["--epochs", "--warmup", "--batch-size", "--channels", "--nodes", "--layers", "--ops",
                "--temp-normal", "--temp-reduce", "--arch-lr", "--arch-weight-decay", "--arch-betas", "--lr",
                "--betas", "--momentum", "--lr-min", "--grad-clip", "--max-skip", "--channel-shuffle",
                "--channels-per-group", "--seed", "--subset", "--image-size", "--name", "--threads"]),
    "eval": (["eval", "{packed}", *EVAL],
             ["--batch-size", "--subset", "--image-size", "--threads", "--num-workers", "--engine", "--dataset"]),
    "flops": (["flops", "bats_c10", "--layers", "3", "--channels", "6"],
              ["--layers", "--channels", "--image-size", "--width", "--batch-size"]),
    "derive": (["derive", "--random", "--space", "bats", "--nodes", "2"],
               ["--seed", "--nodes", "--name", "--space", "--max-skip"]),
    "derive-match": (["derive", "--random", "--match", "bats_c10", "--layers", "3", "--channels", "6",
                      "--max-draws", "3"],
                     ["--tolerance", "--max-draws", "--layers", "--channels", "--match-by", "--seed"]),
}


@fuzz(20)
@given(data=st.data())
def test_fuzz_flag_values(artifacts, tmp_path_factory, capsys, data):
    name = data.draw(st.sampled_from(sorted(FLAG_COMMANDS)))
    base, flags = FLAG_COMMANDS[name]
    argv = [a.replace("{packed}", str(artifacts / "model.packed.safetensors")) for a in base]
    for flag in data.draw(st.lists(st.sampled_from(flags), min_size=1, max_size=2, unique=True)):
        argv += [flag, data.draw(EXTREMES)]
    if name in ("train", "search"):
        argv += ["--out", str(tmp_path_factory.mktemp("flags") / "run")]
    check(argv, capsys)


# --------------------------------------------------------------------------- accepted -> readable


def _bounds(info):
    """(low, high, is_int) of a numeric pydantic field, from its Ge/Gt/Le/Lt metadata."""
    import typing

    import annotated_types as at

    low = high = None
    for m in info.metadata:
        if isinstance(m, (at.Ge, at.Gt)):
            low = getattr(m, "ge", None) if isinstance(m, at.Ge) else m.gt
        if isinstance(m, (at.Le, at.Lt)):
            high = getattr(m, "le", None) if isinstance(m, at.Le) else m.lt
    args = typing.get_args(info.annotation) or (info.annotation,)
    is_int = int in args
    return low, high, is_int


def _boundary_values(model, draw) -> dict:
    """Settings of ``model`` at or near the limits a flag or --config file may set."""
    out = {}
    for name, info in model.model_fields.items():
        low, high, is_int = _bounds(info)
        if low is None and high is None or not draw(st.booleans()):
            continue
        lo = low if low is not None else 0
        hi = high if high is not None else lo + 10**6
        if is_int:
            out[name] = draw(st.sampled_from([int(lo), int(hi), int(lo) + 1, max(int(lo), int(hi) - 1)]))
        else:
            out[name] = draw(st.sampled_from([float(lo), float(hi) * 0.999999, (float(lo) + float(hi)) / 2]))
    return out


@fuzz(100)
@given(data=st.data())
def test_fuzz_every_accepted_setting_is_readable_back_from_a_checkpoint(data):
    """A run started with settings at their limits writes records that `eval` / `--resume`
    accept: the checkpoint's limits (bats_cli.storage.metadata) contain the flags' (bats_cli.core.config)."""
    from pydantic import ValidationError

    from bats_cli.nas.search import SearchConfig
    from bats_cli.pipeline.train import TrainConfig
    from bats_cli.storage.metadata import RunRecord, validate

    model = data.draw(st.sampled_from([TrainConfig, SearchConfig, _model("binarize")]))
    values = _boundary_values(model, data.draw)
    base = {"genotype": "bats_c10"} if model is TrainConfig else {"checkpoint": "x"} if "checkpoint" in model.model_fields else {}
    try:
        cfg = model.model_validate({**base, **values})
    except ValidationError:
        return  # a check across settings refused it at the start: fine
    record = json.loads(json.dumps(cfg.model_dump(mode="json")))
    validate(RunRecord, record, where="run record")


# --------------------------------------------------------------------------- ONNX files


@pytest.fixture(scope="module")
def onnx_model(artifacts):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = artifacts / "model.onnx"
    if not path.exists():
        code = cli(["export", str(artifacts / "model.packed.safetensors"), "-o", str(path)], _NoCapture())[0]
        assert code == 0
    return path


def _hostile_graph(draw):
    """A small graph that is no classifier: wrong ranks, dtypes, several inputs, a failing op."""
    from onnx import TensorProto, helper

    kind = draw(st.sampled_from(["identity", "rank2", "int_out", "two_inputs", "bad_reshape", "classes"]))
    x4 = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
    if kind == "identity":
        nodes, ins, out = [helper.make_node("Identity", ["x"], ["y"])], [x4], \
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])
    elif kind == "rank2":
        nodes, ins, out = [helper.make_node("Identity", ["x"], ["y"])], \
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])], \
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])
    elif kind == "int_out":
        nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Cast", ["f"], ["y"], to=TensorProto.INT64)]
        ins, out = [x4], helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 64])
    elif kind == "two_inputs":
        nodes = [helper.make_node("Add", ["x", "z"], ["y"])]
        ins = [x4, helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 1, 8, 8])]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])
    elif kind == "bad_reshape":
        shape = helper.make_tensor("s", TensorProto.INT64, [2], [7, 5])
        nodes = [helper.make_node("Reshape", ["x", "s"], ["y"])]
        ins, out = [x4], helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 5])
        return helper.make_graph(nodes, "g", ins, [out], initializer=[shape])
    else:  # logits of another number of classes
        nodes = [helper.make_node("Flatten", ["x"], ["y"])]
        ins, out = [x4], helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])
    return helper.make_graph(nodes, "g", ins, [out])


@fuzz(15)
@given(data=st.data())
def test_fuzz_onnx_files(onnx_model, tmp_path_factory, capsys, data):
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_model))
    op = data.draw(st.sampled_from(["metadata", "metadata", "graph", "bytes"]))
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    if op == "graph":
        props = {p.key: p.value for p in model.metadata_props}
        model = helper.make_model(_hostile_graph(data.draw), opset_imports=[helper.make_opsetid("", 17)])
        for k, v in props.items():
            model.metadata_props.add(key=k, value=v)
    elif op == "metadata":
        props = {p.key: p.value for p in model.metadata_props}
        del model.metadata_props[:]
        for k, v in mutate_metadata({k: v for k, v in props.items()}, data.draw).items():
            model.metadata_props.add(key=k, value=v)
    raw = model.SerializeToString()
    if op == "bytes":
        cut = data.draw(st.integers(0, len(raw)))
        raw = raw[:cut] + data.draw(st.binary(max_size=8)) + raw[cut + data.draw(st.integers(0, 8)):]
    path.write_bytes(raw)
    check(["eval", str(path), *EVAL], capsys)
