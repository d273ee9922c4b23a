"""Where inference time goes: measured share of binary convs vs the float layers around them.

Forward hooks time every leaf module of a model over a few forward passes; leaves are grouped
into categories (binary convs, BatchNorm, activations, pools, real convs / linear layers) and
whatever is not inside a leaf (the f(x) + x adds, concatenations, Python) is ``other``. Used by
``bats flops --profile`` and ``bench/infer.py``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

CATEGORIES = ("binary conv", "batchnorm", "activation", "pool", "real conv/linear", "other")


def category(module: nn.Module) -> str | None:
    """The category of a leaf module (``None``: not timed on its own, counted in ``other``)."""
    from bats_cli.engine.bitwise import _KernelLayer
    from bats_cli.layers.quant import QuantConv2d

    # A bitwise layer also does its BatchNorm (as thresholds), activation and adds.
    if isinstance(module, _KernelLayer) or (isinstance(module, QuantConv2d) and module.is_binary):
        return "binary conv"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    from bats_cli.layers.quant import RPReLU

    if isinstance(module, (nn.PReLU, nn.ReLU, RPReLU)):
        return "activation"
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return "pool"
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return "real conv/linear"
    return None


@torch.no_grad()
def profile_layers(model: nn.Module, x: torch.Tensor, *, reps: int = 3, warmup: int = 1) -> dict[str, Any]:
    """``{"total_s", "seconds": {category: s}, "share": {category: fraction}, "layers": {...}}``.

    Seconds are per forward pass (mean over ``reps``). Hooks add a little overhead to every
    leaf; ``total_s`` is measured with the hooks in place, so shares add up to 1.
    """
    was_training = model.training
    model.eval()
    seconds = {name: 0.0 for name in CATEGORIES}
    counts = {name: 0 for name in CATEGORIES}
    starts: dict[int, float] = {}
    handles = []

    def pre(mod, _inp):
        starts[id(mod)] = time.perf_counter()

    def make_post(cat):
        def post(mod, _inp, _out):
            seconds[cat] += time.perf_counter() - starts.pop(id(mod))
        return post

    for mod in model.modules():
        cat = category(mod)
        if cat is None:
            continue
        counts[cat] += 1
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(make_post(cat)))
    try:
        for _ in range(warmup):
            model(x)
        seconds.update({name: 0.0 for name in CATEGORIES})
        start = time.perf_counter()
        for _ in range(reps):
            model(x)
        total = (time.perf_counter() - start) / reps
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per_pass = {name: seconds[name] / reps for name in CATEGORIES}
    per_pass["other"] = max(0.0, total - sum(v for k, v in per_pass.items() if k != "other"))
    return {
        "total_s": total,
        "seconds": per_pass,
        "share": {k: (v / total if total else 0.0) for k, v in per_pass.items()},
        "layers": counts,
    }


def profile_network(
    model: nn.Module,
    input_size: tuple[int, int, int],
    *,
    batch: int = 1,
    reps: int = 3,
    engines: tuple[str, ...] = ("float", "bitwise"),
    warn=None,
) -> dict[str, Any]:
    """Layer-time shares of ``model`` (random input of ``batch`` images) per engine.

    ``float`` is PyTorch fp32 in the memory format ``bats eval`` uses (channels-last for grouped
    convs on CPU). ``bitwise`` runs the binary convs on the bitwise engine; timing does not
    depend on weight values, so a network with real weights is binarized first (a copy). An
    engine that cannot run (no compiler, no binary conv) is skipped with one line via ``warn``.
    """
    import copy

    from bats_cli.layers.quant import binarize_weights_, quant_convs
    from bats_cli.utils.runtime import memory_format

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_size, generator=gen)
    out: dict[str, Any] = {"batch": batch, "reps": reps, "threads": torch.get_num_threads()}
    for engine in engines:
        net = copy.deepcopy(model).float().eval()
        if engine == "bitwise":
            if not quant_convs(net):
                continue
            from bats_cli.engine.bitwise import EngineUnavailable, to_bitwise

            binarize_weights_(net)
            try:
                net = to_bitwise(net)
            except EngineUnavailable as exc:
                if warn is not None:
                    warn(f"note: no bitwise profile ({exc})")
                continue
        fmt = memory_format(torch.device("cpu"), net)
        net = net.to(memory_format=fmt)
        out[engine] = profile_layers(net, x.contiguous(memory_format=fmt), reps=reps)
    return out


__all__ = ["CATEGORIES", "category", "profile_layers", "profile_network"]
