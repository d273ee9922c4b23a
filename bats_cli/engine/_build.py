"""Compile (once, cached) and load the bitwise kernel of ``bitwise.cpp``.

The module defines its own bindings (``BinaryLayer``, ``simd_paths``, ``simd_path``,
``set_simd``, ``popcount_peak``). ``-ffp-contract=off``: the float tail (× α, activation, + residual)
must round exactly as PyTorch's separate ops do, so no multiply-add may be fused. The SIMD popcount
path is chosen at run time (``bitwise.cpp``); ``BATS_BITWISE_SIMD=avx2|portable`` forces a lower one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from functools import lru_cache
from pathlib import Path

from bats_cli.core.errors import UserInputError

SOURCE = Path(__file__).with_name("bitwise.cpp")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


class EngineUnavailable(UserInputError):
    """The bitwise engine cannot be built here (no C++ compiler, no ninja, compile error)."""


def _cpu_tag() -> str:
    # -march=native code is only valid on the CPU it was built for: key the cache by it.
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def extension_name(source: str) -> str:
    digest = hashlib.sha256(
        "\0".join([source, *CFLAGS, *LDFLAGS, _cpu_tag(), sys.version]).encode()
    ).hexdigest()[:12]
    return f"bats_bitwise_{digest}"


def _ensure_ninja_on_path() -> None:
    # The `ninja` wheel puts its binary in the venv's bin/, which is not on PATH when a venv's
    # `bats` is run without activating it; torch looks for it on PATH.
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    os.environ["PATH"] = str(ninja.BIN_DIR) + os.pathsep + os.environ.get("PATH", "")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _say_if_compiling(cpp_extension, name: str) -> None:
    """A ``note:`` line on stderr when the kernel is not built yet: its first build takes half a
    minute, which should not look like a hang."""
    try:
        where = Path(cpp_extension._get_build_directory(name, verbose=False))
        built = (where / f"{name}.so").is_file()
    except Exception:  # a private helper of torch's: without it, build without a word
        return
    if not built:
        print(f"note: compiling the bitwise engine's XNOR + popcount kernel (once, about 30 s; "
              f"cached in {where})", file=sys.stderr, flush=True)


@lru_cache(maxsize=1)
def load_extension():
    """The compiled kernel module; :class:`EngineUnavailable` (one line) when it cannot be built.

    Built with torch's ``cpp_extension.load_inline`` into ``$TORCH_EXTENSIONS_DIR`` (default
    ``~/.cache/torch_extensions``) under a name that hashes source, flags and CPU, so later
    processes load the cached library in well under a second.
    """
    if _compiler() is None:
        raise EngineUnavailable(
            "the bitwise engine needs a C++ compiler (set CXX or install g++/clang++)"
        )
    _ensure_ninja_on_path()
    if not shutil.which("ninja"):
        raise EngineUnavailable(
            "the bitwise engine needs ninja to build its kernel: pip install ninja "
            "(or pip install -e '.[export]')"
        )
    # Importing cpp_extension logs a CUDA_HOME warning on CPU-only machines; it is noise here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    source = SOURCE.read_text()
    _say_if_compiling(cpp_extension, extension_name(source))
    try:
        ext = cpp_extension.load_inline(
            name=extension_name(source),
            cpp_sources=[source],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineUnavailable(f"the bitwise engine's kernel did not build: {first}") from None
    forced = os.environ.get("BATS_BITWISE_SIMD", "").strip()
    if forced:
        try:
            ext.set_simd(forced)
        except RuntimeError as exc:
            raise EngineUnavailable(f"BATS_BITWISE_SIMD={forced}: {str(exc).splitlines()[0]}") from None
    return ext
