"""Bytes of the fp32 checkpoint vs the packed 1-bit artifact of the same binarized network.

    python bench/artifact_size.py [--genotype bats_c10] [--layers 20] [--channels 36] [--table]

Builds the evaluation network (binary activations), binarizes its weights as ``bats binarize``
does, then writes (1) the fp32 checkpoint ``bats train`` would write and (2) the packed artifact
``bats binarize -o`` writes, into a temporary directory, and reports both file sizes and the
binary-conv and whole-model ratios (``bats_cli.models.pack.packed_size_report``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import emit, machine

from bats_cli.core.zoo import resolve_genotype
from bats_cli.layers.quant import binarize_weights_
from bats_cli.models.modelio import model_tensors, network_settings
from bats_cli.models.networks import build_network
from bats_cli.models.pack import packed_size_report, save_packed
from bats_cli.storage.checkpoint import save_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genotype", default="bats_c10", help="genotype file or bundled name")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--channels", type=int, default=36)
    parser.add_argument("--table", action="store_true", help="also print a readable table")
    args = parser.parse_args(argv)

    genotype = resolve_genotype(args.genotype)
    model = build_network(genotype, layers=args.layers, channels=args.channels).eval()
    settings = network_settings(model)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = save_checkpoint(Path(tmp) / "fp32.safetensors", model_tensors(model), kind="train",
                               config={"network": settings}, epoch=0,
                               genotype_json=genotype.to_json())
        binarize_weights_(model)
        packed = save_packed(model, Path(tmp) / "model.packed.safetensors",
                             settings={**settings, "binary_weights": True}, data={}, run={},
                             genotype_json=genotype.to_json(), source={"bench": "artifact_size"})
        report = packed_size_report(packed)
        fp32_bytes, packed_bytes = fp32.stat().st_size, packed.stat().st_size

    binary = report["binary_convs"]
    result = {
        "genotype": genotype.name, "layers": args.layers, "channels": args.channels,
        "fp32_checkpoint_bytes": fp32_bytes,
        "packed_artifact_bytes": packed_bytes,
        "file_ratio": fp32_bytes / packed_bytes,
        "binary_conv_fp32_bytes": binary["fp32_bytes"],
        "binary_conv_packed_bytes": binary["packed_bytes"],
        "binary_conv_ratio": binary["fp32_bytes"] / binary["packed_bytes"],
        "machine": machine(),
    }
    rows = [("what", "fp32", "packed", "ratio"),
            ("binary conv weights + scales", f"{binary['fp32_bytes']:,}", f"{binary['packed_bytes']:,}",
             f"{result['binary_conv_ratio']:.1f}x"),
            ("file on disk", f"{fp32_bytes:,}", f"{packed_bytes:,}", f"{result['file_ratio']:.1f}x")]
    emit(result, rows, args.table)


if __name__ == "__main__":
    main()
