"""Inference speed of a packed binary model: bitwise engine vs fp32 PyTorch vs onnxruntime, with a
roofline against this machine's measured popcount peak.

    python bench/infer.py [--quick] [--json] [--threads N] [--reps N] [--networks cifar,imagenet]

For each network (the paper's CIFAR network: bats_c10, 20 cells, C = 36, 32 px; the ImageNet
one: 14 cells, C = 80, 224 px, 1000 classes) a packed artifact is written and loaded back the
way a user would (``bats_cli.models.pack.unpack``), then run three ways in one process, interleaved
(ABBA order, so machine load hits all alike):

* ``fp32``: PyTorch, float32, channels-last (oneDNN), the binary layers emulated in float
  (BatchNorm, sign, conv with ±1 weights, × α, PReLU) — what ``bats eval`` does;
* ``bitwise``: the same model on the bitwise engine (BatchNorm + sign folded into the bit
  packing, XNOR + popcount, α / PReLU / adds in the same pass);
* ``onnxruntime``: ``bats export`` of the artifact, onnxruntime CPU with all graph optimisations.

Measured, at batch 1 and batch B (64, ``--batch``), all ratios within this one run:

* end to end (``end_to_end_s``), and images/s;
* the binary convs alone (``binary_convs_s``): every binary conv run on its own on the input it
  sees in the network, summed — fp32 = sign, ±1 conv, × α (``fp32_conv_only``: without the
  sign); bitwise = the kernel's plain binary conv (sign at 0, no BatchNorm folded);
* the binary layers alone (``binary_layers_s``): BatchNorm -> sign -> conv × α -> activation,
  fp32 modules vs the engine's fused layers, on the input each layer sees;
* the roofline: binary multiply-accumulates of the binary convs per second against this machine's
  peak (``popcount_peak``: the active SIMD path's XOR + popcount + add loop on L1-resident data,
  64 MACs per word, on as many threads, measured several times in this run, median), overall and
  per kind of conv (``roofline``); ``peak_fraction`` is the share of that peak;
* with ``--threads N > 1``: the bitwise engine at batch B on one thread vs N, interleaved
  (``thread_speedup``);
* the per-category profile of both PyTorch paths at batch 1 (what is still float).

The weights are random (BatchNorm statistics from one pass over random images): speed does not
depend on weight values.

The last line of stdout is one JSON object; ``binary_conv_speedup``, ``end_to_end_speedup`` and
``onnxruntime_speedup`` are the bitwise engine vs fp32 PyTorch (vs onnxruntime for the last),
batch 1, first network; ``peak_fraction`` its binary convs' share of the popcount peak; ``simd``
the SIMD path. ``--json`` prints only that line; otherwise a readable table comes first.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import interleaved_medians, machine, median

from bats_cli.core.zoo import resolve_genotype
from bats_cli.engine import to_bitwise
from bats_cli.engine._build import load_extension
from bats_cli.engine.bitwise import BitwiseConv2d, _KernelLayer, engine_info
from bats_cli.engine.profile import profile_layers
from bats_cli.layers.ops import FactorizedReduce
from bats_cli.layers.quant import BinaryConvBlock, binarize_weights_, quant_convs
from bats_cli.models.modelio import network_settings, unpack
from bats_cli.models.networks import build_network
from bats_cli.models.pack import save_packed

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
    """(unpacked fp32 model, packed path): random weights, BN stats from one pass."""
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


def capture(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple]:
    """``name -> (inputs, output)`` of the named modules in one forward pass of ``model``."""
    seen: dict[str, tuple] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_hook(
            lambda m, inp, out, name=name: seen.__setitem__(
                name, (tuple(t.detach().clone() for t in inp if isinstance(t, torch.Tensor)),
                       out.detach()))))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def runner(modules: dict[str, torch.nn.Module], inputs: dict[str, tuple]):
    def run():
        with torch.no_grad():
            for name, mod in modules.items():
                mod(*inputs[name])
    return run


def conv_only_modules(convs: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """fp32 binary convs without the sign: ±1 weights, pre-signed input (conv + α only)."""
    out = {}
    for name, conv in convs.items():
        plain = copy.deepcopy(conv)
        plain.input_quantizer = None
        with torch.no_grad():
            plain.weight.copy_(torch.where(conv.weight >= 0, 1.0, -1.0))
        plain.kernel_quantizer = None
        out[name] = plain
    return out


def conv_kind(conv) -> str:
    """Roofline rows: the kinds of binary conv in these networks."""
    kh, kw = conv.kernel_size
    if kh == kw == 1:
        return "1x1 dense" if conv.groups == 1 else "1x1 grouped"
    if conv.groups == 1:
        return f"{kh}x{kw} dense"
    if conv.groups == conv.in_channels:
        return "depthwise"
    return "grouped kxk"


def conv_macs(conv, out: torch.Tensor) -> int:
    """Binary MACs of one call (as ``bats flops`` counts BOPs): outputs × window size."""
    kh, kw = conv.kernel_size
    return out.numel() * (conv.in_channels // conv.groups) * kh * kw


def measure_peak(threads: int, seconds: float) -> float:
    return float(load_extension().popcount_peak(seconds, threads))


def bench_network(name: str, kwargs: dict, size: int, args, tmp: Path, peaks: list[float]) -> dict:
    cl = torch.channels_last
    model, path = packed_model(name, kwargs, size, tmp, args.seed)
    fp32 = copy.deepcopy(model).to(memory_format=cl)
    bitwise = to_bitwise(copy.deepcopy(model)).to(memory_format=cl)
    conv_names = [n for n, _ in quant_convs(fp32)]
    fp32_convs = {n: fp32.get_submodule(n) for n in conv_names}
    plain_bitwise = {n: BitwiseConv2d(c) for n, c in fp32_convs.items()}
    # The layers the engine fuses, under the same names in both models.
    layer_names = [n for n, m in fp32.named_modules()
                   if isinstance(m, (BinaryConvBlock, FactorizedReduce)) and quant_convs(m)]
    layer_names = [n for n in layer_names if isinstance(bitwise.get_submodule(n), _KernelLayer)]
    variants = ["fp32", "bitwise"]
    session = None
    if not args.no_onnx:
        try:
            from bats_cli.training.export import export_model, make_session

            onnx_path = tmp / f"{name}.onnx"
            export_model(path, onnx_path, force=True, verify_batch=1)
            session = make_session(onnx_path, threads=torch.get_num_threads(), optimize=True)
            variants.append("onnxruntime")
        except Exception as exc:  # the export extra may be missing: time the rest
            print(f"note: no onnxruntime timing ({str(exc).splitlines()[0]})", file=sys.stderr)

    result: dict = {"network": name, **{k: v for k, v in kwargs.items()}, "image_size": size,
                    "binary_convs": len(conv_names), "binary_layers_fused": len(layer_names),
                    "engine": engine_info(bitwise)}
    gen = torch.Generator().manual_seed(args.seed)
    for batch in (1, args.batch):
        x = torch.randn(batch, kwargs["in_channels"], size, size, generator=gen)
        x_cl = x.contiguous(memory_format=cl)
        x_np = x.numpy()
        fns = {"fp32": lambda: fp32(x_cl), "bitwise": lambda: bitwise(x_cl)}
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
        r = result[key] = {
            "end_to_end_s": {k: median(v) for k, v in times.items()},
            "images_per_s": {k: batch / median(v) for k, v in times.items()},
            "reps": {k: v for k, v in times.items()},
        }
        # The binary convs and the binary layers alone, on the inputs they see in the network.
        seen = capture(fp32, x_cl, conv_names + layer_names)
        conv_in = {n: seen[n][0] for n in conv_names}
        signed_in = {n: tuple(torch.where(t >= 0, 1.0, -1.0).contiguous(memory_format=cl)
                              for t in seen[n][0]) for n in conv_names}
        layer_in = {n: seen[n][0] for n in layer_names}
        kinds: dict[str, list[str]] = {}
        macs: dict[str, int] = {}
        for n in conv_names:
            kinds.setdefault(conv_kind(fp32_convs[n]), []).append(n)
            macs[n] = conv_macs(fp32_convs[n], seen[n][1])
        timed = {
            "fp32": runner(fp32_convs, conv_in),
            "fp32_conv_only": runner({n: m.to(memory_format=cl)
                                      for n, m in conv_only_modules(fp32_convs).items()}, signed_in),
            "bitwise": runner(plain_bitwise, conv_in),
            "fp32_layers": runner({n: fp32.get_submodule(n) for n in layer_names}, layer_in),
            "bitwise_layers": runner({n: bitwise.get_submodule(n) for n in layer_names}, layer_in),
        }
        for kind, names in kinds.items():
            timed[f"bitwise:{kind}"] = runner({n: plain_bitwise[n] for n in names}, conv_in)
        ctimes = interleaved_medians(timed, reps=reps, warmup=args.warmup, device=torch.device("cpu"))
        peaks.append(measure_peak(torch.get_num_threads(), args.peak_seconds))
        c = {k: median(v) for k, v in ctimes.items()}
        e2e = r["end_to_end_s"]
        r["binary_convs_s"] = {k: c[k] for k in ("fp32", "fp32_conv_only", "bitwise")}
        r["binary_layers_s"] = {"fp32": c["fp32_layers"], "bitwise": c["bitwise_layers"]}
        r["end_to_end_speedup"] = e2e["fp32"] / e2e["bitwise"]
        r["binary_conv_speedup"] = c["fp32"] / c["bitwise"]
        r["binary_conv_speedup_vs_conv_only"] = c["fp32_conv_only"] / c["bitwise"]
        r["binary_layer_speedup"] = c["fp32_layers"] / c["bitwise_layers"]
        if "onnxruntime" in e2e:
            r["onnxruntime_vs_fp32"] = e2e["fp32"] / e2e["onnxruntime"]
            r["onnxruntime_speedup"] = e2e["onnxruntime"] / e2e["bitwise"]
        total_macs = sum(macs.values())
        r["binary_macs"] = total_macs
        r["binary_macs_per_s"] = total_macs / c["bitwise"]
        r["roofline"] = {
            kind: {"convs": len(names), "macs": sum(macs[n] for n in names),
                   "seconds": c[f"bitwise:{kind}"],
                   "macs_per_s": sum(macs[n] for n in names) / c[f"bitwise:{kind}"]}
            for kind, names in kinds.items()
        }
        if batch == 1:
            result["profile_batch1"] = {
                "fp32": profile_layers(fp32, x_cl, reps=max(2, reps // 2)),
                "bitwise": profile_layers(bitwise, x_cl, reps=max(2, reps // 2)),
            }
        elif torch.get_num_threads() > 1:
            result["thread_scaling"] = thread_scaling(bitwise, x_cl, reps, args.warmup)
    return result


def thread_scaling(model, x, reps: int, warmup: int) -> dict:
    """The bitwise engine on one thread vs all of ``--threads``, interleaved; same outputs."""
    threads = torch.get_num_threads()

    def on(n):
        def run():
            torch.set_num_threads(n)
            try:
                with torch.no_grad():
                    model(x)
            finally:
                torch.set_num_threads(threads)
        return run

    with torch.no_grad():
        torch.set_num_threads(1)
        one = model(x)
        torch.set_num_threads(threads)
        same = bool(torch.equal(one, model(x)))
    times = interleaved_medians({"1": on(1), str(threads): on(threads)}, reps=reps, warmup=warmup,
                                device=torch.device("cpu"))
    t1, tn = median(times["1"]), median(times[str(threads)])
    return {"threads": threads, "seconds": {"1": t1, str(threads): tn}, "thread_speedup": t1 / tn,
            "identical_outputs": same, "reps": times}


def finish_roofline(results: list[dict], peak: float) -> None:
    for res in results:
        for key in [k for k in res if k.startswith("batch") and isinstance(res[k], dict)]:
            r = res[key]
            r["peak_fraction"] = r["binary_macs_per_s"] / peak
            for row in r["roofline"].values():
                row["peak_fraction"] = row["macs_per_s"] / peak


def table(results: list[dict], peak: float) -> list[tuple[str, ...]]:
    rows = [("network", "batch", "what", "fp32 PyTorch", "bitwise", "onnxruntime", "bitwise speedup")]
    for res in results:
        for key in ("batch1", f"batch{res['batch']}"):
            if key not in res:
                continue
            r = res[key]
            e, c, l = r["end_to_end_s"], r["binary_convs_s"], r["binary_layers_s"]
            b = key[len("batch"):]
            ort = (f"{e['onnxruntime'] * 1e3:.1f} ms ({r['onnxruntime_speedup']:.2f}x)"
                   if "onnxruntime" in e else "-")
            rows.append((res["network"], b, "end to end", f"{e['fp32'] * 1e3:.1f} ms",
                         f"{e['bitwise'] * 1e3:.1f} ms", ort, f"{r['end_to_end_speedup']:.2f}x"))
            rows.append((res["network"], b, f"binary convs ({res['binary_convs']})",
                         f"{c['fp32'] * 1e3:.1f} ms (conv only {c['fp32_conv_only'] * 1e3:.1f})",
                         f"{c['bitwise'] * 1e3:.1f} ms", "-", f"{r['binary_conv_speedup']:.2f}x"))
            rows.append((res["network"], b, f"binary layers ({res['binary_layers_fused']}, BN+act)",
                         f"{l['fp32'] * 1e3:.1f} ms", f"{l['bitwise'] * 1e3:.1f} ms", "-",
                         f"{r['binary_layer_speedup']:.2f}x"))
            rows.append((res["network"], b, "roofline: binary MAC/s",
                         f"peak {peak / 1e9:.0f} G", f"{r['binary_macs_per_s'] / 1e9:.1f} G", "",
                         f"{100 * r['peak_fraction']:.1f}% of peak"))
            for kind, row in sorted(r["roofline"].items()):
                rows.append((res["network"], b, f"  {kind} ({row['convs']})",
                             f"{row['macs'] / 1e6:.1f} M MACs", f"{row['seconds'] * 1e3:.2f} ms", "",
                             f"{100 * row['peak_fraction']:.1f}%"))
        ts = res.get("thread_scaling")
        if ts:
            rows.append((res["network"], str(res["batch"]), f"bitwise, {ts['threads']} threads vs 1",
                         "", f"{ts['seconds'][str(ts['threads'])] * 1e3:.1f} ms vs "
                         f"{ts['seconds']['1'] * 1e3:.1f} ms", "", f"{ts['thread_speedup']:.2f}x"))
        prof = res.get("profile_batch1")
        if prof:
            for engine in ("fp32", "bitwise"):
                shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof[engine]["share"].items())
                rows.append((res["network"], "1", f"profile {engine}", shares, "", "", ""))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="cifar,imagenet", help="comma-separated: cifar, imagenet")
    parser.add_argument("--batch", type=int, default=64, help="throughput batch (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions at batch 1 (half at --batch)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-seconds", type=float, default=0.3,
                        help="seconds per popcount-peak measurement (several per run)")
    parser.add_argument("--quick", action="store_true",
                        help="small networks (5 cells; ImageNet at 64 px), batch 8, 3 reps: a smoke test")
    parser.add_argument("--no-onnx", action="store_true", help="skip onnxruntime")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.reps, args.warmup = min(args.batch, 8), 3, 1
        args.peak_seconds = min(args.peak_seconds, 0.05)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    specs = QUICK if args.quick else NETWORKS
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"error: unknown network {unknown[0]!r}; choose cifar, imagenet")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    peaks = [measure_peak(threads, args.peak_seconds)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            kwargs, size = specs[name]
            r = bench_network(name, kwargs, size, args, Path(tmp), peaks)
            r["batch"] = args.batch
            results.append(r)
    peak = statistics.median(peaks)
    finish_roofline(results, peak)
    first = results[0]["batch1"]
    info = engine_info()
    out = {
        "bench": "infer",
        "weights": "random (speed does not depend on weight values)",
        "quick": args.quick,
        "machine": machine(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "seconds": time.perf_counter() - start,
        "threads": threads,
        "simd": info["simd"],
        "simd_available": info["simd_available"],
        "peak_binary_macs_per_s": peak,
        "peak_measurements": peaks,
        "networks": results,
        "speedup_network": results[0]["network"],
        "binary_conv_speedup": first["binary_conv_speedup"],
        "end_to_end_speedup": first["end_to_end_speedup"],
        "onnxruntime_speedup": first.get("onnxruntime_speedup"),
        "peak_fraction": first["peak_fraction"],
        "summary": {
            f"{res['network']} batch {key[len('batch'):]}": {
                "end_to_end_speedup": res[key]["end_to_end_speedup"],
                "binary_conv_speedup": res[key]["binary_conv_speedup"],
                "onnxruntime_speedup": res[key].get("onnxruntime_speedup"),
                "peak_fraction": res[key]["peak_fraction"],
            }
            for res in results for key in ("batch1", f"batch{res['batch']}") if key in res
        },
    }
    scaling = [res["thread_scaling"] for res in results if "thread_scaling" in res]
    if scaling:
        out["thread_speedup"] = {res["network"]: res["thread_scaling"]["thread_speedup"]
                                 for res in results if "thread_scaling" in res}
    if not args.json:
        rows = table(results, peak)
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        print(f"SIMD path: {info['simd']} (this CPU: {', '.join(info['simd_available'])}); "
              f"{threads} thread(s); popcount peak {peak / 1e9:.0f} G binary MAC/s")
        for k, row in enumerate(rows):
            print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
            if k == 0:
                print("  ".join("-" * w for w in widths))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
