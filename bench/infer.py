"""Inference speed of a packed binary model: bitwise engine vs fp32 PyTorch vs onnxruntime.

    python bench/infer.py [--quick] [--json] [--threads N] [--reps N] [--networks cifar,imagenet]

For each network (the paper's CIFAR network: bats_c10, 20 cells, C = 36, 32 px; the ImageNet
one: 14 cells, C = 80, 224 px, 1000 classes) a packed artifact is written and loaded back the
way a user would (``bats_cli.pack.unpack``), then run three ways in one process, interleaved
(ABBA order, so machine load hits all alike):

* ``fp32``: PyTorch, float32, channels-last (oneDNN), the binary convs emulated in float
  (sign, conv with ±1 weights, × α) — what ``bats eval`` does;
* ``bitwise``: the same model with every binary conv on the bitwise engine (XNOR + popcount);
* ``onnxruntime``: ``bats export`` of the artifact, onnxruntime CPU with all graph optimisations.

Measured: batch-1 latency and batch-B throughput (B = 64, ``--batch``), end to end and for the
binary convs alone (each binary conv run on its own on the inputs it sees in the network, summed
over the network; fp32 also without the sign: ``fp32_conv_only``), plus the per-category profile
of both PyTorch paths. The weights are random (BatchNorm statistics from one pass over random
images): this is a speed benchmark, and speed does not depend on weight values.

The last line of stdout is one JSON object; its ``binary_conv_speedup`` and
``end_to_end_speedup`` are bitwise vs fp32 PyTorch, batch 1, CIFAR network. ``--json`` prints
only that line; otherwise a readable table comes first.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import interleaved_medians, machine, median

import torch

from bats_cli.engine import to_bitwise
from bats_cli.engine.profile import profile_layers
from bats_cli.genotype import resolve_genotype
from bats_cli.networks import build_network
from bats_cli.modelio import network_settings, unpack
from bats_cli.pack import save_packed
from bats_cli.quant import binarize_weights_, quant_convs

NETWORKS = {
    # name: (build_network kwargs, input size)
    "cifar": (dict(kind="cifar", num_classes=10, in_channels=3, layers=20, channels=36), 32),
    "imagenet": (dict(kind="imagenet", num_classes=1000, in_channels=3, layers=14, channels=80), 224),
}
QUICK = {
    "cifar": (dict(kind="cifar", num_classes=10, in_channels=3, layers=5, channels=12), 32),
    "imagenet": (dict(kind="imagenet", num_classes=100, in_channels=3, layers=5, channels=40), 64),
}


def packed_model(name: str, kwargs: dict, size: int, tmp: Path, seed: int):
    """(unpacked fp32 model, packed path, input size): random weights, BN stats from one pass."""
    torch.manual_seed(seed)
    genotype = resolve_genotype("bats_c10")
    net = build_network(genotype, auxiliary=False, **kwargs)
    binarize_weights_(net)
    net.train()
    with torch.no_grad():
        net(torch.randn(4, kwargs["in_channels"], size, size))
    net.eval()
    data = {"name": "cifar10" if kwargs["kind"] == "cifar" else "imagenet", "image_size": size,
            "num_classes": kwargs["num_classes"], "in_channels": kwargs["in_channels"],
            "network": kwargs["kind"]}
    path = save_packed(net, tmp / f"{name}.packed.safetensors", settings=network_settings(net),
                       data=data, run={}, genotype_json=genotype.to_json(),
                       source={"bench": "infer", "weights": "random"})
    model, _ = unpack(path)
    return model, path


def capture_conv_inputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input every binary conv sees in one forward pass of ``model``."""
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, conv in quant_convs(model):
        handles.append(conv.register_forward_hook(
            lambda mod, inp, out, name=name: inputs.__setitem__(name, inp[0].detach().clone())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return inputs


def conv_runner(modules: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor]):
    def run():
        with torch.no_grad():
            for name, mod in modules.items():
                mod(inputs[name])
    return run


def conv_only_modules(model) -> dict[str, torch.nn.Module]:
    """fp32 binary convs without the sign: ±1 weights, pre-signed input (conv + α only)."""
    out = {}
    for name, conv in quant_convs(model):
        plain = copy.deepcopy(conv)
        plain.input_quantizer = None
        with torch.no_grad():
            plain.weight.copy_(torch.where(conv.weight >= 0, 1.0, -1.0))
        plain.kernel_quantizer = None
        out[name] = plain
    return out


def bench_network(name: str, kwargs: dict, size: int, args, tmp: Path) -> dict:
    cl = torch.channels_last
    model, path = packed_model(name, kwargs, size, tmp, args.seed)
    fp32 = copy.deepcopy(model).to(memory_format=cl)
    bitwise = to_bitwise(copy.deepcopy(model)).to(memory_format=cl)
    n_binary = len(quant_convs(model))
    variants = ["fp32", "bitwise"]
    session = None
    if not args.no_onnx:
        try:
            from bats_cli.export import export_model, make_session

            onnx_path = tmp / f"{name}.onnx"
            export_model(path, onnx_path, force=True, verify_batch=1)
            session = make_session(onnx_path, threads=torch.get_num_threads(), optimize=True)
            variants.append("onnxruntime")
        except Exception as exc:  # the export extra may be missing: time the rest
            print(f"note: no onnxruntime timing ({str(exc).splitlines()[0]})", file=sys.stderr)

    result: dict = {"network": name, **{k: v for k, v in kwargs.items()}, "image_size": size,
                    "binary_convs": n_binary}
    gen = torch.Generator().manual_seed(args.seed)
    for batch in (1, args.batch):
        x = torch.randn(batch, kwargs["in_channels"], size, size, generator=gen)
        x_cl = x.contiguous(memory_format=cl)
        x_np = x.numpy()
        fns = {}
        with torch.no_grad():
            fns["fp32"] = lambda: fp32(x_cl)
            fns["bitwise"] = lambda: bitwise(x_cl)
        if session is not None:
            fns["onnxruntime"] = lambda: session.run(None, {"images": x_np})

        def nograd(f):
            def g():
                with torch.no_grad():
                    f()
            return g

        reps = args.reps if batch == 1 else max(2, args.reps // 2)
        times = interleaved_medians({k: nograd(f) for k, f in fns.items()}, reps=reps,
                                    warmup=args.warmup, device=torch.device("cpu"))
        key = "batch1" if batch == 1 else f"batch{batch}"
        result[key] = {
            "end_to_end_s": {k: median(v) for k, v in times.items()},
            "images_per_s": {k: batch / median(v) for k, v in times.items()},
            "reps": {k: v for k, v in times.items()},
        }
        # The binary convs alone, on the inputs they see in the network.
        inputs_cl = capture_conv_inputs(fp32, x_cl)
        convs = {
            "fp32": conv_runner(dict(quant_convs(fp32)), inputs_cl),
            "fp32_conv_only": conv_runner(
                {n: m.to(memory_format=cl) for n, m in conv_only_modules(fp32).items()},
                {n: torch.where(t >= 0, 1.0, -1.0).contiguous(memory_format=cl)
                 for n, t in inputs_cl.items()}),
            "bitwise": conv_runner(
                {n: bitwise.get_submodule(n) for n, _ in quant_convs(fp32)}, inputs_cl),
        }
        ctimes = interleaved_medians(convs, reps=reps, warmup=args.warmup, device=torch.device("cpu"))
        result[key]["binary_convs_s"] = {k: median(v) for k, v in ctimes.items()}
        e2e = result[key]["end_to_end_s"]
        bc = result[key]["binary_convs_s"]
        result[key]["end_to_end_speedup"] = e2e["fp32"] / e2e["bitwise"]
        result[key]["binary_conv_speedup"] = bc["fp32"] / bc["bitwise"]
        result[key]["binary_conv_speedup_vs_conv_only"] = bc["fp32_conv_only"] / bc["bitwise"]
        if "onnxruntime" in e2e:
            result[key]["onnxruntime_vs_fp32"] = e2e["fp32"] / e2e["onnxruntime"]
        if batch == 1:
            result["profile_batch1"] = {
                "fp32": profile_layers(fp32, x_cl, reps=max(2, reps // 2)),
                "bitwise": profile_layers(bitwise, x_cl, reps=max(2, reps // 2)),
            }
    return result


def table(results: list[dict]) -> list[tuple[str, ...]]:
    rows = [("network", "batch", "what", "fp32 PyTorch", "bitwise", "onnxruntime", "bitwise speedup")]
    for r in results:
        for key in ("batch1", f"batch{r['batch']}"):
            if key not in r:
                continue
            e, c = r[key]["end_to_end_s"], r[key]["binary_convs_s"]
            b = key[len("batch"):]
            ort = f"{e['onnxruntime'] * 1e3:.1f} ms" if "onnxruntime" in e else "-"
            rows.append((r["network"], b, "end to end", f"{e['fp32'] * 1e3:.1f} ms",
                         f"{e['bitwise'] * 1e3:.1f} ms", ort, f"{r[key]['end_to_end_speedup']:.2f}x"))
            rows.append((r["network"], b, f"binary convs ({r['binary_convs']})",
                         f"{c['fp32'] * 1e3:.1f} ms (conv only {c['fp32_conv_only'] * 1e3:.1f})",
                         f"{c['bitwise'] * 1e3:.1f} ms", "-", f"{r[key]['binary_conv_speedup']:.2f}x"))
        prof = r.get("profile_batch1")
        if prof:
            for engine in ("fp32", "bitwise"):
                shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof[engine]["share"].items())
                rows.append((r["network"], "1", f"profile {engine}", shares, "", "", ""))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="cifar,imagenet", help="comma-separated: cifar, imagenet")
    parser.add_argument("--batch", type=int, default=64, help="throughput batch (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions at batch 1 (half at --batch)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="small networks (5 cells; ImageNet at 64 px), batch 8, 3 reps: a smoke test")
    parser.add_argument("--no-onnx", action="store_true", help="skip onnxruntime")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.reps, args.warmup = min(args.batch, 8), 3, 1
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    specs = QUICK if args.quick else NETWORKS
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"error: unknown network {unknown[0]!r}; choose cifar, imagenet")
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            kwargs, size = specs[name]
            r = bench_network(name, kwargs, size, args, Path(tmp))
            r["batch"] = args.batch
            results.append(r)
    first = results[0]
    out = {
        "bench": "infer",
        "weights": "random (speed does not depend on weight values)",
        "quick": args.quick,
        "machine": machine(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "seconds": time.perf_counter() - start,
        "networks": results,
        "speedup_network": first["network"],
        "binary_conv_speedup": first["batch1"]["binary_conv_speedup"],
        "end_to_end_speedup": first["batch1"]["end_to_end_speedup"],
    }
    if not args.json:
        rows = table(results)
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        for k, row in enumerate(rows):
            print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
            if k == 0:
                print("  ".join("-" * w for w in widths))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
