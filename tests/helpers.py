"""Helpers shared by the test modules that drive the CLI in-process."""

from __future__ import annotations


def cli(argv, capsys):
    """Run ``bats_cli.cli.main(argv)`` in-process; returns (exit code, stdout, stderr), 0 when it returns."""
    from bats_cli.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code  # sys.exit() is success
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    """Assert exit code 2 and a single ``error: ...`` line on stderr containing every needle; return it."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def randomize_bn(module, gen) -> None:
    """Non-trivial BatchNorm statistics and affine terms (negative scales included, so folded
    thresholds flip), PReLU slopes of both signs, α scales: signs depend on all of them."""
    import torch

    from bats_cli.layers.quant import QuantConv2d, RPReLU

    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
        if isinstance(m, QuantConv2d) and m.scale is not None:
            m.scale.data.uniform_(0.5, 1.5, generator=gen)
        if isinstance(m, torch.nn.PReLU):
            m.weight.data.uniform_(-0.5, 0.5, generator=gen)
        if isinstance(m, RPReLU):  # ReActNet's learnable shifts around the slopes
            m.weight.data.uniform_(-0.5, 0.5, generator=gen)
            m.shift_in.data.copy_(torch.randn(m.weight.numel(), generator=gen))
            m.shift_out.data.copy_(torch.randn(m.weight.numel(), generator=gen))


def assert_same_state(path_a, path_b) -> None:
    """The two checkpoints hold the same model and optimizer tensors (same names, equal values)."""
    import torch

    from bats_cli.storage.checkpoint import load_checkpoint

    a, _ = load_checkpoint(path_a)
    b, _ = load_checkpoint(path_b)
    keys = [k for k in a if k.startswith(("model.", "optim."))]
    assert keys and keys == [k for k in b if k.startswith(("model.", "optim."))]
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def start_bats(args, cwd):
    """``python -m bats_cli ARGS`` in the background (one OpenMP thread, output captured as text)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "bats_cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sigterm_stops_resumably(proc) -> str:
    """SIGTERM ``proc``: it must exit 130 and say how to continue; returns its stderr."""
    import signal

    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "continue with --resume" in stderr
    return stderr


def random_images(n, side):
    """``n`` seeded random one-channel ``side``×``side`` images with labels 0-9: (image, label) items."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, side, side, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)
