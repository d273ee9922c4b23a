"""What the bitwise kernel needs from a float layer: conv geometry and weight signs, BatchNorm +
sign folded into per-channel thresholds (:func:`fold_bn_sign`), the activation's code and terms."""

from __future__ import annotations

import torch
from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.layers.quant import QuantConv2d, RPReLU

ACT_NONE, ACT_RELU, ACT_PRELU, ACT_RPRELU = 0, 1, 2, 3

REAL_WEIGHTS = ("the bitwise engine needs binary weights and binary activations (a packed "
                "artifact or a binarize checkpoint), not a step-1 model with real weights")


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def check_conv(conv: QuantConv2d) -> None:
    if conv.input_quantizer is None or conv.kernel_quantizer is None:
        raise UserInputError(REAL_WEIGHTS)
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or conv.bias is not None:
        raise UserInputError("the bitwise engine supports zero-padded convs without bias only")


def geometry(conv: QuantConv2d, offset: int = 0, fill_ones: bool = False) -> list[int]:
    kh, kw = conv.kernel_size
    sh, sw = pair(conv.stride)
    ph, pw = pair(conv.padding)
    dh, dw = pair(conv.dilation)
    return [conv.groups, kh, kw, sh, sw, ph, pw, dh, dw, offset, offset, int(fill_ones)]


def weight_signs(conv: QuantConv2d) -> torch.Tensor:
    # The sign the float path applies (STE sign: w >= 0 -> +1), stored as int8.
    return torch.where(conv.weight.detach().cpu() >= 0, 1, -1).to(torch.int8)


# ---- BatchNorm + sign -> thresholds ---------------------------------------------------------

_KMAX = 0x7F7FFFFF  # order key of the largest finite float32


def _key_floats(keys: torch.Tensor) -> torch.Tensor:
    """float32 values of order keys (int64): key order is float order, -0 and +0 share key 0."""
    bits = torch.where(keys >= 0, keys, (-keys) | 0x80000000)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


@torch.no_grad()
def fold_bn_sign(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(thresholds, signs)`` with ``sign(bn(x)) = +1  <=>  signs * x >= thresholds`` per channel.

    Found by bisection over the float32 values on ``bn`` itself (eval mode), so the rounding of
    PyTorch's BatchNorm is reproduced exactly; then checked on probes in NCHW and NHWC (values
    next to each threshold and random ones). ``None`` when ``bn`` cannot be folded (not a
    BatchNorm2d with running statistics) or the check fails: the caller keeps the float BatchNorm.
    Non-finite inputs are outside the contract (the float path maps ±inf through x·0 = NaN where
    a BatchNorm scale is 0).
    """
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
        return None
    was_training = bn.training
    bn.eval()
    try:
        C = bn.num_features
        w = bn.weight.detach().float().cpu() if bn.affine and bn.weight is not None else torch.ones(C)
        dec = w < 0  # a negative scale turns the sign around: bit = x <= t

        def pred(keys: torch.Tensor) -> torch.Tensor:
            x = _key_floats(keys).view(1, C, 1, 1).to(bn.running_mean.device)
            return (bn(x) >= 0).view(C).cpu()

        lo = torch.full((C,), -_KMAX, dtype=torch.int64)
        hi = torch.full((C,), _KMAX, dtype=torch.int64)
        q_lo, q_hi = pred(lo) ^ dec, pred(hi) ^ dec  # q: False ... False True ... True
        L, H = lo.clone(), hi.clone()
        active = ~q_lo & q_hi
        while bool(((H - L > 1) & active).any()):
            M = torch.div(L + H, 2, rounding_mode="floor")
            qm = pred(M) ^ dec
            H = torch.where(active & qm, M, H)
            L = torch.where(active & ~qm, M, L)
        first_true = torch.where(q_lo, lo, torch.where(q_hi, H, hi + 1))  # smallest key with q
        inf = torch.tensor(float("inf"))
        t_inc = torch.where(first_true <= hi, _key_floats(first_true.clamp(max=_KMAX)), inf)
        t_dec = torch.where(first_true - 1 >= lo, _key_floats((first_true - 1).clamp(min=-_KMAX)), -inf)
        signs = torch.where(dec, -1.0, 1.0)
        thresholds = torch.where(dec, -t_dec, t_inc)
        if not _folding_holds(bn, thresholds, signs):
            return None
        return thresholds.contiguous(), signs.contiguous()
    finally:
        bn.train(was_training)


def _folding_holds(bn: nn.Module, thresholds: torch.Tensor, signs: torch.Tensor) -> bool:
    C = thresholds.numel()
    t = thresholds * signs  # back to x units
    finite = torch.isfinite(t)
    t0 = torch.where(finite, t, torch.zeros(()))
    near = [t0, torch.nextafter(t0, torch.full_like(t0, -float("inf"))),
            torch.nextafter(t0, torch.full_like(t0, float("inf")))]
    gen = torch.Generator().manual_seed(0)
    mean = bn.running_mean.detach().float().cpu()
    std = (bn.running_var.detach().float().cpu() + bn.eps).sqrt()
    rand = [mean + std * torch.randn(C, generator=gen) * 3 for _ in range(13)]
    x = torch.stack(near + rand + [torch.zeros(C)], dim=-1).view(1, C, 1, -1)  # 17 pixels
    for probe in (x, x.contiguous(memory_format=torch.channels_last)):
        want = bn(probe.to(bn.running_mean.device)).cpu() >= 0
        got = probe * signs.view(1, C, 1, 1) >= thresholds.view(1, C, 1, 1)
        if not torch.equal(want, got):
            return False
    return True


def plain_sign(C: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(C), torch.ones(C)


def kernel_activation(module: nn.Module | None, channels: int) -> tuple[int, torch.Tensor, tuple] | None:
    """``(code, slopes, shifts)`` of an activation the kernel applies, ``None`` if it cannot;
    ``shifts``: RPReLU's (before, after) per channel, else ``()``."""
    if module is None or isinstance(module, nn.Identity):
        return ACT_NONE, torch.zeros(1), ()
    if isinstance(module, nn.ReLU):
        return ACT_RELU, torch.zeros(1), ()
    if isinstance(module, nn.PReLU) and module.weight.numel() in (1, channels):
        return ACT_PRELU, module.weight.detach().float().cpu().clone(), ()
    if isinstance(module, RPReLU) and module.weight.numel() == channels:
        shifts = tuple(t.detach().float().cpu().clone() for t in (module.shift_in, module.shift_out))
        return ACT_RPRELU, module.weight.detach().float().cpu().clone(), shifts
    return None
