"""Run the command blocks of README.md and regenerate (or check) the transcripts in docs/.

README.md marks a block of commands with ``<!--commands:NAME-->`` on the line before its fence;
docs/pipeline.md holds what those commands print between ``<!--transcript:NAME-->`` and
``<!--/transcript-->``. Run

    python tools/doc_transcripts.py            # run the tiny-pipeline block in a temporary folder
                                               # and rewrite the transcript from what it prints
    python tools/doc_transcripts.py --check    # exit 1 when the transcript no longer matches

A transcript keeps every line a command prints except progress lines whose number depends on
speed (``step N/M`` every 100 steps or 60 s) and, for ``bats search``, the per-epoch lines
(replaced by ``...``). The check compares the two with times, speeds, dates and free memory
masked: those depend on the machine, the numbers a reader compares do not.
tests/test_readme_commands.py runs the block and the check.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS_DOC = "README.md"
TRANSCRIPT_DOCS = ("docs/pipeline.md",)
BLOCK = re.compile(r"<!--commands:([a-z0-9-]+)-->\n```[a-z]*\n(.*?)```", re.S)
TRANSCRIPT = re.compile(r"(<!--transcript:([a-z0-9-]+)-->\n```console\n)(.*?)(```\n<!--/transcript-->)", re.S)


def blocks(text: str) -> dict[str, list[str]]:
    """NAME -> the command lines of that block (comments dropped, ``a && b`` split)."""
    out: dict[str, list[str]] = {}
    for name, body in BLOCK.findall(text):
        lines = []
        for raw in body.splitlines():
            line = raw.split("  #", 1)[0].strip()
            if line:
                lines.extend(part.strip() for part in line.split(" && "))
        out[name] = lines
    return out


def readme_blocks() -> dict[str, list[str]]:
    return blocks((ROOT / COMMANDS_DOC).read_text(encoding="utf-8"))


@dataclass
class Ran:
    line: str
    code: int
    out: str
    err: str


def run_line(line: str, cwd: Path, argv_edit=None) -> Ran:
    """``bats ...`` in this process, in ``cwd``; ``pip`` lines are skipped (code 0, no output)."""
    from bats_cli.cli import main

    words = shlex.split(line)
    if words[0] == "pip":
        return Ran(line, 0, "", "")
    if words[0] != "bats":
        raise ValueError(f"not a bats command: {line!r}")
    argv = words[1:] if argv_edit is None else argv_edit(words[1:])
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    # Every plan as on a first run: not one reused from an earlier run's cache.
    cache_setting = os.environ.get("BATS_PLAN_CACHE")
    os.environ["BATS_PLAN_CACHE"] = "0"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0)
    finally:
        os.chdir(previous)
        if cache_setting is None:
            os.environ.pop("BATS_PLAN_CACHE", None)
        else:
            os.environ["BATS_PLAN_CACHE"] = cache_setting
    return Ran(line, code, out.getvalue(), err.getvalue())


def run_block(lines: list[str], cwd: Path, argv_edit=None) -> list[Ran]:
    ran = []
    for line in lines:
        r = run_line(line, cwd, argv_edit)
        ran.append(r)
        if r.code != 0:
            break
    return ran


# Progress lines whose number depends on speed (every 100 steps or 60 s), and the one-off note of
# the bitwise kernel's first compilation.
_PROGRESS = re.compile(r"^(step \d+/\d+ |eval\s+\d+/\d+ steps|note: compiling )")


def render(ran: list[Ran]) -> str:
    """The console transcript of ``ran``: ``$ command`` then what it printed."""
    parts = []
    for r in ran:
        if r.line.startswith("pip "):
            continue
        parts.append(f"$ {r.line}")
        err = [line.rstrip() for line in r.err.splitlines() if not _PROGRESS.match(line)]
        if shlex.split(r.line)[1] == "search":
            kept = [line for line in err if line.startswith("plan:")]
            err = kept + (["..."] if len(kept) < len(err) else [])
        parts.extend(err)
        parts.extend(line.rstrip() for line in r.out.splitlines())
    return "\n".join(parts) + "\n"


_MASKS = [
    (re.compile(r"\babout \d{4}-\d\d-\d\d \d\d:\d\d\b"), "about <date>"),
    (re.compile(r"\b\d+:\d\d(:\d\d)?\b"), "<time>"),
    (re.compile(r"\b\d+(\.\d+)? ?(s|ms|min)\b"), "<time>"),
    (re.compile(r"\b\d+(\.\d+)? (images|img)/s\b"), "<speed>"),
    (re.compile(r"\b\d+(\.\d+)? GiB available"), "<free> available"),
    (re.compile(r"\bpeak (RAM|GPU memory) (about )?\d+(\.\d+)? GiB"), r"peak \1 <memory>"),
    # How the plan got its memory figure depends on how near the machine's limit the run is.
    (re.compile(r"^plan: (timing|measuring) .*"), "plan: <timing or measuring>"),
    (re.compile(r"\((meta-device estimate|measured at batches|measured by)[^)]*\)"), "(<how>)"),
    # File sizes include metadata (versions) that differ between installs; ratios do not.
    (re.compile(r"\b\d[\d,]* bytes\b"), "<size> bytes"),
]


# Transcripts of runs that learn: the float arithmetic of another CPU (its kernels, its rounding)
# changes losses, accuracies and so the derived cell and its counts, so there every number and
# every (op, input) choice is masked and the check is of what is printed, not of what was learned.
LEARNED = {"tiny-pipeline"}
_LEARNED_MASKS = [
    (re.compile(r"\b[a-z][a-z0-9_]*<\d+"), "<op>"),
    (re.compile(r"[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?"), "#"),
    # Column widths follow the numbers' widths.
    (re.compile(r"[─━═-]{2,}"), "─"),
    (re.compile(r"[ \t]+"), " "),
]


def normalize(text: str, name: str | None = None) -> str:
    """``text`` with what depends on the machine masked (times, speeds, dates, free memory; for a
    transcript in ``LEARNED`` also every number and derived op)."""
    masks = _MASKS + (_LEARNED_MASKS if name in LEARNED else [])
    lines = []
    for line in text.splitlines():
        for pattern, repl in masks:
            line = pattern.sub(repl, line)
        lines.append(line.rstrip())
    if name in LEARNED:
        # Where a long line wraps, and which ONNX operators the derived cell needs, follow the cell.
        words = " ".join(" ".join(lines).split())
        return _ONNX_OPS.sub("<onnx-ops> ", words).replace(" ", "\n") + "\n"
    return "\n".join(lines).strip() + "\n"


_ONNX_OPS = re.compile(r"(?:\b[A-Z][A-Za-z]+ #,? ?)+")


def transcripts(text: str) -> dict[str, str]:
    return {name: body for _, name, body, _ in TRANSCRIPT.findall(text)}


def stale(name: str, generated: str) -> list[str]:
    """Docs whose transcript NAME differs from ``generated`` (after masking)."""
    bad = []
    for doc in TRANSCRIPT_DOCS:
        quoted = transcripts((ROOT / doc).read_text(encoding="utf-8")).get(name)
        if quoted is not None and normalize(quoted, name) != normalize(generated, name):
            bad.append(doc)
    return bad


def first_difference(a: str, b: str, name: str | None = None) -> str:
    for i, (x, y) in enumerate(zip(normalize(a, name).splitlines(), normalize(b, name).splitlines())):
        if x != y:
            return f"line {i + 1}: doc {x!r} vs now {y!r}"
    return "different length"


def write(name: str, generated: str) -> list[str]:
    changed = []
    for doc in TRANSCRIPT_DOCS:
        path = ROOT / doc
        text = path.read_text(encoding="utf-8")
        new = TRANSCRIPT.sub(
            lambda m: m.group(1) + generated + m.group(4) if m.group(2) == name else m.group(0), text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(doc)
    return changed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    name = "tiny-pipeline"
    with tempfile.TemporaryDirectory(prefix="bats-doc-") as tmp:
        ran = run_block(readme_blocks()[name], Path(tmp))
    failed = [r for r in ran if r.code != 0]
    if failed:
        print(f"`{failed[0].line}` exited {failed[0].code}:\n{failed[0].err}", file=sys.stderr)
        return 1
    generated = render(ran)
    if check:
        bad = stale(name, generated)
        for doc in bad:
            quoted = transcripts((ROOT / doc).read_text(encoding="utf-8"))[name]
            print(f"{doc}: the {name} transcript is stale ({first_difference(quoted, generated, name)}); "
                  "run: python tools/doc_transcripts.py", file=sys.stderr)
        return 1 if bad else 0
    print(f"updated: {', '.join(write(name, generated)) or 'nothing'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
