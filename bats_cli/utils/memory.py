"""Memory probes and the one unit they are printed in: device memory, the cgroup limit, the
process's resident set, the RAM still available. Used by :mod:`bats_cli.utils.preflight` (absurd sizes)
and :mod:`bats_cli.training.plan` (the measured plan); every message shows bytes as GiB (``format_bytes``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

GIB = 2**30


def format_bytes(n: float, digits: int = 1) -> str:
    """``12.3 GiB``: the one unit of memory in every message."""
    return f"{n / GIB:.{digits}f} GiB"


def proc_kib(field_name: str, path: str = "/proc/self/status") -> int | None:
    """A ``Name:  123 kB`` field of a /proc file (``VmRSS``, ``VmHWM``, ``MemAvailable``), in KiB."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+)\s*kB", text, re.M)
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """What this process holds now (VmRSS; 0 when unknown)."""
    return (proc_kib("VmRSS") or 0) * 1024


def cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), if any."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a near-2**63 v1 value: no limit
            return int(text)
    return None


def _capped(n: int | None) -> int | None:
    limit = cgroup_limit()
    if n is None:
        return limit
    return min(n, limit) if limit is not None else n


def memory_limit_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory the device has in all: a GPU's total, or RAM (the cgroup limit when lower); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.get_device_properties(device).total_memory)
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    return _capped(ram)


def available_ram_bytes() -> int | None:
    """What this process may still grow by plus what it holds: MemAvailable + VmRSS, cgroup-capped."""
    avail = proc_kib("MemAvailable", "/proc/meminfo")
    if avail is None:
        return None
    return _capped(avail * 1024 + rss_bytes())


def available_gpu_bytes(device) -> int | None:
    """Free GPU memory plus what this process's allocator holds; None without CUDA."""
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError):
        return None
    return int(free + torch.cuda.memory_allocated(device))


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim``), so that a step's
    allocations grow the RSS instead of silently reusing memory freed earlier."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim with


def reset_peak_rss() -> bool:
    """Trim the heap and reset the peak RSS (VmHWM) to the current RSS; False where Linux cannot."""
    trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # "5" resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident set since the last :func:`reset_peak_rss` (or its start)."""
    hwm = proc_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
