"""A mixed op that computes what :class:`~bats_cli.models.mixed_op.reference.ReferenceMixedOp` computes, fast.

:class:`FastMixedOp` holds the very same modules (``self.ops``, built by the same code), so one
``state_dict`` loads into either; only the forward differs. Everything exploited is exact: the
results agree up to float rounding (``tests/test_supernet.py`` checks outputs, gradients of
weights and α, and running statistics against the reference, in float64).

* Search BatchNorms have no affine parameters, so every grouped-conv candidate (and
  factorized-reduce skip) that reads a given tensor normalises and binarises it identically --
  on one edge, and on every edge leaving the same node of a cell. BatchNorm + sign run once per
  node (:func:`fast_cell_forward`), or once per edge when a :class:`FastMixedOp` is called alone.
  Every op's running statistics are still updated as its own BatchNorm would have; in eval mode
  the sharing happens only while they are all equal.
* The convs reading that tensor become one grouped conv per dilation: smaller kernels are
  zero-padded to the largest one and stacked as extra output channels of every group, with the
  XNOR-Net++ output scale folded into the kernel. The activation (PReLU) is nonlinear, so the
  mixing weights are applied after it, per op: ``sum_i w_i * act_i(z_i)``, one small matrix
  product per edge over channels-last memory.
* Likewise each pool (with its BatchNorm) runs once per node, and the identity connection of
  all conv ops of an edge is one ``sum(w_i) * x``. A factorized-reduce skip's two stride-2 1×1
  convs are one 2×2 stride-2 conv. 'none' adds exactly zero (and gets zero gradient): skipped.
* Two custom autograd functions save only what backward needs: the input (alive anyway), one
  ``bool`` per input value for the signs, and the raw conv outputs; the normalised and binarised
  input and the activations are recomputed in backward. Under ``torch.autograd.grad(loss,
  arch_parameters)`` (the architecture step) they skip the conv weight gradients, as built-in
  ops do.

Ops it does not know (DARTS-space convs) run as their own modules. :func:`fast_block_forward`
fuses a cell's preprocessing blocks the same way. The fast cell runs channels-last on CPU, where
grouped convs with 3 channels per group are several times faster. Under autocast the fused
path computes in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bats_cli.core.spaces import edge_endpoints
from bats_cli.layers.ops import FactorizedReduce, GroupConvOp, Zero
from bats_cli.layers.quant import STE_SIGN, BinaryConvBlock, QuantConv2d
from bats_cli.models.mixed_op.reference import ReferenceMixedOp

__all__ = ["FastMixedOp", "fast_block_forward", "fast_cell_forward"]

_CL = torch.channels_last


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _without_autocast(fn):
    """Run the fused path in float32 when autocast is on: the custom autograd functions pick
    their own dtypes, and mixing them with autocast's per-op casts would not match up."""

    def wrapper(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type
        if not torch.is_autocast_enabled(device):
            return fn(*args)
        with torch.autocast(device, enabled=False):
            return fn(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                        for a in args))

    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


def _engine_needs(ctx, arg: int, tensor_arg: int) -> bool:
    """Whether this backward must produce the gradient of input ``arg`` (``tensor_arg``-th tensor).

    ``needs_input_grad`` says only whether the input requires grad; under
    ``torch.autograd.grad(loss, inputs=...)`` (the architecture step) the engine may not need it,
    and built-in ops then skip e.g. the conv weight gradient. Ask the engine so these can too.
    """
    if not ctx.needs_input_grad[arg]:
        return False
    node = ctx.next_functions[tensor_arg][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


_BOUNDS: dict[torch.dtype, tuple[float, float]] = {}


def _ste_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """hardtanh_backward passes ``lo < x < hi``; the next floats beyond ±1 make that |x| <= 1."""
    if dtype not in _BOUNDS:
        one = torch.tensor(1.0, dtype=dtype)
        hi = torch.nextafter(one, one * 2).item()
        _BOUNDS[dtype] = (-hi, hi)
    return _BOUNDS[dtype]


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=_CL):
        return _CL
    return torch.contiguous_format


class _NormSignConv(torch.autograd.Function):
    """BatchNorm (no affine) -> optional sign (STE) -> several convs of that one input.

    Saves ``x`` (alive anyway), the statistics and, when binary, the signs as ``bool``; the float
    normalised / binarised input is rebuilt in backward. With batch statistics the gradient is
    BatchNorm's full one (through mean and variance).
    """

    @staticmethod
    def forward(ctx, x, xn, mean, invstd, batch_stats, binary, specs, *weights):
        # ``xn`` is BatchNorm's own output, computed outside exactly as the reference op's
        # BatchNorm computes it, so the signs are bit-identical to the reference op's.
        if binary:
            positive = xn >= 0
            s = positive.to(x.dtype).mul_(2).sub_(1)  # sign with 0 -> +1, like the STE quantizer
        else:
            positive, s = None, xn
        outs = tuple(
            F.conv2d(s, w, None, stride, padding, dilation, groups)
            for w, (stride, padding, dilation, groups) in zip(weights, specs)
        )
        ctx.save_for_backward(x, mean, invstd, positive, *weights)
        ctx.batch_stats, ctx.binary, ctx.specs = batch_stats, binary, specs
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x, mean, invstd, positive, *weights = ctx.saved_tensors
        need_x = _engine_needs(ctx, 0, 0)
        invstd_c = _per_channel(invstd)
        xn = torch.addcmul(_per_channel(-mean * invstd), x, invstd_c)
        s = positive.to(x.dtype).mul_(2).sub_(1) if ctx.binary else xn
        grad_s = None
        weight_grads = []
        for i, (g, w, (stride, padding, dilation, groups)) in enumerate(zip(grads, weights, ctx.specs)):
            need_w = _engine_needs(ctx, 7 + i, 4 + i)
            if g is None or not (need_x or need_w):
                weight_grads.append(None)
                continue
            gi, gw, _ = torch.ops.aten.convolution_backward(
                g.contiguous(memory_format=_memory_format(s)), s, w, None, list(stride),
                list(padding), list(dilation), False, [0, 0], groups, [need_x, need_w, False],
            )
            weight_grads.append(gw)
            if need_x:
                grad_s = gi if grad_s is None else grad_s.add_(gi)
        del s
        grad_x = None
        if need_x and grad_s is not None:
            if ctx.binary:
                # Straight-through estimator: the gradient passes where |BN(x)| <= 1.
                grad_s = torch.ops.aten.hardtanh_backward(grad_s, xn, *_ste_bounds(x.dtype))
            if ctx.batch_stats:
                grad_x = torch.ops.aten.native_batch_norm_backward(
                    grad_s, x, None, None, None, mean, invstd, True, 0.0, [True, False, False]
                )[0]
            else:
                grad_x = grad_s * invstd_c
        return (grad_x, None, None, None, None, None, None, *weight_grads)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W*C/width, width) over channels-last memory (a view when it is)."""
    return t.contiguous(memory_format=_CL).permute(0, 2, 3, 1).reshape(-1, width)


def _mix_matrix(w: torch.Tensor, cpg: int) -> torch.Tensor:
    """(n*cpg, cpg): sums n blocks of cpg channels with weights w, i.e. kron(w, I)."""
    return torch.kron(w.view(-1, 1), torch.eye(cpg, dtype=w.dtype, device=w.device))


def _empty_cl(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=_CL)


class _ActMix(torch.autograd.Function):
    """Per output: ``sum_i w_i * act_i(z_i)`` over that output's ops, stacked inside every group.

    ``z`` holds, for each of ``groups`` groups, ``m`` blocks of ``cpg`` channels: the ops of
    output 0, then those of output 1, ... (``counts`` ops each); ``slope`` is the per-channel
    negative slope of a PReLU in the same order (0 for ReLU, 1 for no activation, then
    ``identity``). In channels-last memory every (pixel, group) is a row of ``m * cpg`` values,
    so each output's weighted sum is one matrix product with kron(w, I). ``w`` (one weight per
    op) None means one output of one op with weight 1. Only ``z`` is saved.
    """

    @staticmethod
    def forward(ctx, z, slope, w, groups, counts, identity):
        z = z.contiguous(memory_format=_CL)
        N, Cz, H, W = z.shape
        m = sum(counts)
        cpg = Cz // (groups * m)
        ctx.save_for_backward(z, slope, w)
        ctx.groups, ctx.counts, ctx.cpg, ctx.identity = groups, counts, cpg, identity
        if identity:
            y = z.clone() if w is None else z
        else:
            y = torch._prelu_kernel(z, _per_channel(slope))
        if w is None:
            return (y,)
        y_rows = _rows(y, m * cpg)
        outs, start = [], 0
        for n in counts:
            # Written straight into a channels-last tensor, so the result is not a view.
            out = _empty_cl((N, groups * cpg, H, W), z)
            torch.mm(y_rows[:, start * cpg:(start + n) * cpg], _mix_matrix(w[start:start + n], cpg),
                     out=_rows(out, cpg))
            outs.append(out)
            start += n
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        z, slope, w = ctx.saved_tensors
        counts, cpg = ctx.counts, ctx.cpg
        m = sum(counts)
        need_z, need_slope = _engine_needs(ctx, 0, 0), _engine_needs(ctx, 1, 1)
        need_w = w is not None and _engine_needs(ctx, 2, 2)
        grad_z = grad_slope = grad_w = None
        grads = [None if g is None else g.contiguous(memory_format=_CL) for g in grads]
        slope_c = _per_channel(slope)
        if need_w:
            # d out / d w_i = act_i(z_i): sum_j (act(z)^T g)[(i, j), j].
            y_rows = _rows(z if ctx.identity else torch._prelu_kernel(z, slope_c), m * cpg)
            parts, start = [], 0
            for n, g in zip(counts, grads):
                if g is None:
                    parts.append(w.new_zeros(n))
                else:
                    a = y_rows[:, start * cpg:(start + n) * cpg].t() @ _rows(g, cpg)
                    parts.append(a.view(n, cpg, cpg).diagonal(dim1=1, dim2=2).sum(1))
                start += n
            grad_w = torch.cat(parts)
            del y_rows
        if need_z or need_slope:
            # The gradient w.r.t. act(z): w_i * g of its output, by matrix products.
            if w is None:
                grad_act = grads[0].clone() if not ctx.identity else grads[0]
            else:
                grad_act = _empty_cl(z.shape, z)
                ga_rows, start = _rows(grad_act, m * cpg), 0
                for n, g in zip(counts, grads):
                    block = ga_rows[:, start * cpg:(start + n) * cpg]
                    if g is None:
                        block.zero_()
                    else:
                        torch.mm(_rows(g, cpg), _mix_matrix(w[start:start + n], cpg).t(), out=block)
                    start += n
            if ctx.identity:
                grad_z = grad_act
            else:
                # PReLU backward from fast dense kernels: g where z > 0, slope * g elsewhere.
                positive = torch.ops.aten.threshold_backward(grad_act, z, 0)
                negative = grad_act.sub_(positive)  # exactly g where z <= 0, 0 elsewhere
                if need_slope:
                    grad_slope = _rows(negative * z, z.shape[1]).sum(0)
                grad_z = positive.addcmul_(negative, slope_c) if need_z else None
        return grad_z, grad_slope, grad_w, None, None, None


# -- which modules can be fused ----------------------------------------------------------------
_ACTIVATIONS = (nn.PReLU, nn.ReLU, nn.Identity)


def _plain_bn(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and not bn.affine


def _plain_conv(conv: nn.Module) -> bool:
    return (
        isinstance(conv, QuantConv2d) and conv.bias is None and conv.padding_mode == "zeros"
        and conv.input_quantizer in (None, STE_SIGN) and isinstance(conv.padding, tuple)
        and conv.kernel_size[0] == conv.kernel_size[1]
    )


def _fusable_block(block: nn.Module) -> bool:
    return (isinstance(block, BinaryConvBlock) and _plain_bn(block.bn) and _plain_conv(block.conv)
            and isinstance(block.act, _ACTIVATIONS))


def _fusable_conv_op(op: nn.Module) -> bool:
    if not (isinstance(op, GroupConvOp) and _fusable_block(op.conv)):
        return False
    conv = op.conv.conv
    d, k = conv.dilation[0], conv.kernel_size[0]
    return (conv.dilation[0] == conv.dilation[1] and conv.padding == (d * (k // 2),) * 2
            and isinstance(op.shortcut, (nn.Identity, nn.AvgPool2d))
            and isinstance(op.shuffle, nn.Identity))


def _fusable_fr(fr: nn.Module) -> bool:
    return (
        isinstance(fr, FactorizedReduce) and not fr.darts_float and _plain_bn(fr.pre)
        and isinstance(fr.post, _ACTIVATIONS)
        and all(_plain_conv(c) and c.kernel_size == (1, 1) and c.stride == (2, 2)
                and c.padding == (0, 0) and c.groups == 1 for c in (fr.conv_1, fr.conv_2))
        and fr.conv_1.input_quantizer is fr.conv_2.input_quantizer
    )


def _pool_key(op: nn.Module):
    """Pool + BatchNorm (the DARTS pool op): a key equal for ops computing the same thing."""
    if (isinstance(op, nn.Sequential) and len(op) == 2 and isinstance(op[0], (nn.MaxPool2d, nn.AvgPool2d))
            and _plain_bn(op[1])):
        bn = op[1]
        return (repr(op[0]), bn.num_features, bn.eps, bn.momentum, bn.track_running_stats)
    return None


def _bn_key(bn: nn.BatchNorm2d, conv: QuantConv2d) -> tuple:
    """What must agree for ops to share one normalisation (and sign) of their input."""
    return (bn.num_features, bn.eps, bn.momentum, bn.track_running_stats, conv.input_quantizer is None)


# -- merged kernels --------------------------------------------------------------------------
def _scaled_kernel(conv: QuantConv2d) -> torch.Tensor:
    w = conv.quantized_weight()
    return w if conv.scale is None else w * conv.scale.view(-1, 1, 1, 1)


def _slope(act: nn.Module, channels: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(act, nn.PReLU):
        return act.weight.expand(channels) if act.weight.numel() == 1 else act.weight
    value = 0.0 if isinstance(act, nn.ReLU) else 1.0
    return torch.full((channels,), value, dtype=like.dtype, device=like.device)


def _stack_blocks(blocks: list[BinaryConvBlock], K: int, groups: int):
    """Convs of the same groups and dilation as one conv: kernels padded to K×K, op-major per group."""
    kernels, slopes = [], []
    for block in blocks:
        w = _scaled_kernel(block.conv)
        pad = (K - block.conv.kernel_size[0]) // 2
        if pad:
            w = F.pad(w, (pad, pad, pad, pad))
        kernels.append(w.unflatten(0, (groups, -1)))
        slopes.append(_slope(block.act, block.conv.out_channels, w).view(groups, -1))
    if len(blocks) == 1:
        return kernels[0].flatten(0, 1), slopes[0].flatten()
    return torch.stack(kernels, dim=1).flatten(0, 2), torch.stack(slopes, dim=1).flatten()


def _stack_frs(frs: list[FactorizedReduce]):
    """Each FactorizedReduce's conv_1 (even grid) and conv_2 (odd grid) as one 2×2 stride-2 conv."""
    kernels, slopes = [], []
    for fr in frs:
        w1 = F.pad(_scaled_kernel(fr.conv_1), (0, 1, 0, 1))  # tap (0, 0)
        w2 = F.pad(_scaled_kernel(fr.conv_2), (1, 0, 1, 0))  # tap (1, 1)
        kernels += [w1, w2]
        slopes.append(_slope(fr.post, w1.shape[0] * 2, w1))
    return torch.cat(kernels), torch.cat(slopes)


class _Branch(NamedTuple):
    """One conv of the shared (normalised, binarised) input and how its outputs are mixed."""

    weight: torch.Tensor  # kernel, output scales folded in
    spec: tuple  # (stride, padding, dilation, groups)
    slope: torch.Tensor  # activation negative slope per output channel
    identity: bool  # no activation at all
    groups: int  # output channels: (groups, ops, channels per group), ops output-major
    counts: tuple  # ops of each output
    mix: torch.Tensor | None  # one mixing weight per op (None: a single op, weight 1)


# -- the shared normalisation ------------------------------------------------------------------
def _stats_shared(bns: list[nn.BatchNorm2d]) -> bool:
    """One normalisation serves all: batch statistics, or equal running statistics."""
    bn0 = bns[0]
    if any(bn.training != bn0.training for bn in bns[1:]):
        return False
    if bn0.training or not bn0.track_running_stats:
        return True
    return all(
        torch.equal(bn.running_mean, bn0.running_mean) and torch.equal(bn.running_var, bn0.running_var)
        for bn in bns[1:]
    )


def _sync_running_stats(bns: list[nn.BatchNorm2d], before, x: torch.Tensor) -> None:
    """After bns[0] ran on ``x`` in training mode, give the others the update their own forward would."""
    bn0 = bns[0]
    mean0, var0 = before
    stats = None
    for bn in bns[1:]:
        bn.num_batches_tracked.add_(1)
        if torch.equal(bn.running_mean, mean0) and torch.equal(bn.running_var, var0):
            # The usual case: identical statistics stay bit-identical.
            bn.running_mean.copy_(bn0.running_mean)
            bn.running_var.copy_(bn0.running_var)
            continue
        if stats is None:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
            stats = mean, var
        f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.lerp_(stats[0].to(bn.running_mean.dtype), f)
        bn.running_var.lerp_(stats[1].to(bn.running_var.dtype), f)


def _normalise(bns: list[nn.BatchNorm2d], x: torch.Tensor):
    """BatchNorm of ``x`` exactly as each of ``bns`` computes it (one of them runs), no autograd.

    Returns the normalised ``x``, mean, 1/std and whether those are batch statistics. With batch
    statistics every BatchNorm's running statistics are updated as its own forward would.
    """
    bn0 = bns[0]
    with torch.no_grad():
        if not bn0.training and bn0.track_running_stats:
            xn = F.batch_norm(x, bn0.running_mean, bn0.running_var, None, None, False, 0.0, bn0.eps)
            return xn, bn0.running_mean.clone(), torch.rsqrt(bn0.running_var + bn0.eps), False
        update = bn0.training and bn0.track_running_stats
        factor = 0.0
        if update:
            before = bn0.running_mean.clone(), bn0.running_var.clone()
            bn0.num_batches_tracked.add_(1)
            factor = bn0.momentum if bn0.momentum is not None else 1.0 / float(bn0.num_batches_tracked)
        xn, mean, invstd = torch.ops.aten.native_batch_norm(
            x, None, None, bn0.running_mean if update else None,
            bn0.running_var if update else None, True, factor, bn0.eps,
        )
        if update:
            _sync_running_stats(bns, before, x)
    return xn, mean, invstd, True


def _shared_batch_norm(bns: list[nn.BatchNorm2d], x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` for every BatchNorm in ``bns`` at once (all in training mode), with autograd."""
    bn0 = bns[0]
    update = bn0.training and bn0.track_running_stats and len(bns) > 1
    before = (bn0.running_mean.clone(), bn0.running_var.clone()) if update else None
    out = bn0(x)
    if update:
        with torch.no_grad():
            _sync_running_stats(bns, before, x)
    return out


def _run_branches(x: torch.Tensor, bns: list[nn.BatchNorm2d], binary: bool,
                  branches: list[_Branch]) -> list[tuple[torch.Tensor, ...]]:
    """Normalise (and binarise) ``x`` once, then every branch's conv, activation and mixing."""
    xn, mean, invstd, batch_stats = _normalise(bns, x)
    zs = _NormSignConv.apply(x, xn, mean, invstd, batch_stats, binary,
                             tuple(b.spec for b in branches), *[b.weight for b in branches])
    del xn
    return [_ActMix.apply(z, b.slope, b.mix, b.groups, b.counts, b.identity)
            for z, b in zip(zs, branches)]


def _even(x: torch.Tensor) -> bool:
    return x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0


@_without_autocast
def fast_block_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a cell's preprocessing block, fused where it is a plain binary block."""
    if _fusable_block(module):
        conv = module.conv
        branch = _Branch(_scaled_kernel(conv), (conv.stride, conv.padding, conv.dilation, conv.groups),
                         _slope(module.act, conv.out_channels, conv.weight),
                         isinstance(module.act, nn.Identity), 1, (1,), None)
        ((out,),) = _run_branches(x, [module.bn], conv.input_quantizer is not None, [branch])
        return out
    if _fusable_fr(module) and _even(x):
        weight, slope = _stack_frs([module])
        branch = _Branch(weight, ((2, 2), (0, 0), (1, 1), 1), slope,
                         isinstance(module.post, nn.Identity), 1, (1,), None)
        ((out,),) = _run_branches(x, [module.pre], module.conv_1.input_quantizer is not None, [branch])
        return out
    return module(x)


# -- one input, several edges ---------------------------------------------------------------
def _edges_forward(edges: list["FastMixedOp"], weights: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of several fast mixed ops that all read ``x`` (one edge, or all edges leaving
    one node of a cell), computing what they share once.

    Shared: BatchNorm + sign of ``x`` for every conv and factorized-reduce op of every edge; the
    convs (one per dilation, all edges' ops stacked as output channels); the pools and their
    BatchNorms (the same pool of the same input normalised the same way); the conv ops'
    identity connection.
    """
    n_edges = len(edges)
    even = _even(x)
    keys = {e.norm_key for e in edges if e.norm_key is not None}
    key = next(iter(keys)) if keys else None
    if len(keys) > 1:
        # Different normalisations (a configuration the supernet does not build): one by one.
        return [out for e, w in zip(edges, weights) for out in _edges_forward([e], [w], x)]
    outs: list[torch.Tensor | None] = [None] * n_edges

    def add(pos: int, y: torch.Tensor, coef: torch.Tensor | None = None) -> None:
        if coef is None:
            outs[pos] = y if outs[pos] is None else outs[pos] + y
        else:
            outs[pos] = coef * y if outs[pos] is None else torch.addcmul(outs[pos], coef, y)

    # Everything normalised and binarised the same way: one BatchNorm, one sign, few convs.
    by_dilation: dict[tuple, list[tuple[int, int]]] = {}
    frs: list[tuple[int, int]] = []
    bns: list[nn.BatchNorm2d] = []
    for pos, edge in enumerate(edges):
        for i in edge.conv_ops:
            conv = edge.ops[i].conv.conv
            by_dilation.setdefault((conv.dilation[0], conv.stride, conv.groups), []).append((pos, i))
            bns.append(edge.ops[i].conv.bn)
        if even:
            for i in edge.fr_ops:
                frs.append((pos, i))
                bns.append(edge.ops[i].pre)
    if bns and not _stats_shared(bns):
        if n_edges > 1:
            return [out for e, w in zip(edges, weights) for out in _edges_forward([e], [w], x)]
        edge, w = edges[0], weights[0]
        return [sum(wi * op(x) for wi, op in zip(w, edge.ops))]
    if bns:
        branches, owners = [], []
        for (d, _, _), pairs in sorted(by_dilation.items()):
            blocks = [edges[pos].ops[i].conv for pos, i in pairs]
            conv = blocks[0].conv
            K = max(b.conv.kernel_size[0] for b in blocks)
            weight, slope = _stack_blocks(blocks, K, conv.groups)
            spec = (conv.stride, (d * (K // 2),) * 2, (d, d), conv.groups)
            positions = sorted({pos for pos, _ in pairs})
            counts = tuple(sum(1 for p, _ in pairs if p == pos) for pos in positions)
            mix = torch.stack([weights[pos][i] for pos, i in pairs])
            identity = all(isinstance(b.act, nn.Identity) for b in blocks)
            branches.append(_Branch(weight, spec, slope, identity, conv.groups, counts, mix))
            owners.append(positions)
        if frs:
            modules = [edges[pos].ops[i] for pos, i in frs]
            weight, slope = _stack_frs(modules)
            mix = torch.stack([weights[pos][i] for pos, i in frs])
            identity = all(isinstance(m.post, nn.Identity) for m in modules)
            branches.append(_Branch(weight, ((2, 2), (0, 0), (1, 1), 1), slope, identity, 1,
                                    (1,) * len(frs), mix))
            owners.append([pos for pos, _ in frs])
        binary = not key[-1]
        for ys, positions in zip(_run_branches(x, bns, binary, branches), owners):
            for pos, y in zip(positions, ys):
                add(pos, y)

    # Pools: the same pool of the same input, normalised the same way, once for all edges.
    pools: dict[tuple, list[tuple[int, int]]] = {}
    for pos, edge in enumerate(edges):
        for i, pkey in edge.pool_ops:
            pools.setdefault(pkey, []).append((pos, i))
    for pairs in pools.values():
        first = edges[pairs[0][0]].ops[pairs[0][1]]
        bns = [edges[pos].ops[i][1] for pos, i in pairs]
        if _stats_shared(bns):
            pooled = first[0](x)
            normed = _shared_batch_norm(bns, pooled) if bns[0].training else first[1](pooled)
            for pos, i in pairs:
                add(pos, normed, weights[pos][i])
        else:
            for pos, i in pairs:
                add(pos, edges[pos].ops[i](x), weights[pos][i])

    # Identity connections of the conv ops and identity skips: coefficients of one tensor.
    shortcut = None
    for pos, edge in enumerate(edges):
        w = weights[pos]
        if edge.conv_ops:
            coef_idx = edge.conv_ops + (edge.identity_ops if edge.shortcut_is_identity else [])
            if shortcut is None:
                shortcut = edge.ops[edge.conv_ops[0]].shortcut(x)
            add(pos, shortcut, w[coef_idx].sum() if len(coef_idx) > 1 else w[coef_idx[0]])
            if not edge.shortcut_is_identity:
                for i in edge.identity_ops:
                    add(pos, x, w[i])
        else:
            for i in edge.identity_ops:
                add(pos, x, w[i])
        fused = set(edge.conv_ops) | set(edge.zero_ops) | set(edge.identity_ops)
        fused |= {i for i, _ in edge.pool_ops}
        if even:
            fused |= set(edge.fr_ops)
        for i, op in enumerate(edge.ops):
            if i not in fused:
                add(pos, op(x), w[i])
        if outs[pos] is None:  # only 'none' candidates
            outs[pos] = sum(wi * op(x) for wi, op in zip(w, edge.ops))
    return outs


@_without_autocast
def fast_cell_forward(cell, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A search cell's forward where the edges are :class:`FastMixedOp`: everything the edges
    leaving one node share (see :func:`_edges_forward`) is computed once for all of them."""
    if s1.device.type == "cpu":
        # Grouped convs are several times faster channels-last on CPU.
        s0 = s0.contiguous(memory_format=_CL)
        s1 = s1.contiguous(memory_format=_CL)
    states = [fast_block_forward(cell.preprocess0, s0), fast_block_forward(cell.preprocess1, s1)]
    steps = cell.steps
    endpoints = edge_endpoints(steps)  # edge e: (source state, destination node state)
    nodes: list[torch.Tensor | None] = [None] * (steps + 2)
    for src in range(steps + 1):
        out_edges = [e for e, (s, _) in enumerate(endpoints) if s == src]
        fast = [e for e in out_edges if isinstance(cell.edges[e], FastMixedOp)]
        outs = {}
        if fast:
            outs = dict(zip(fast, _edges_forward([cell.edges[e] for e in fast],
                                                 [weights[e] for e in fast], states[src])))
        for e in out_edges:
            y = outs[e] if e in outs else cell.edges[e](states[src], weights[e])
            dst = endpoints[e][1]
            nodes[dst] = y if nodes[dst] is None else nodes[dst] + y
        # Node src + 1 has all its inputs now (they come from states 0 .. src).
        if src >= 1:
            states.append(nodes[src + 1])
    return torch.cat(states[2:], dim=1)


class FastMixedOp(nn.Module):
    """Drop-in replacement for ``ReferenceMixedOp``: same modules, same results, faster."""

    def __init__(self, C: int, stride: int, op_names: list[str], ctx) -> None:
        super().__init__()
        # The very same modules (and state_dict keys) as the reference op.
        self.op_names = list(op_names)
        self.ops = ReferenceMixedOp(C, stride, op_names, ctx).ops
        self.stride = stride
        self._plan()

    def _plan(self) -> None:
        ops = self.ops
        convs = [i for i, op in enumerate(ops) if _fusable_conv_op(op)]
        frs = [i for i, op in enumerate(ops) if _fusable_fr(op)]
        keys = [(_bn_key(ops[i].conv.bn, ops[i].conv.conv), ops[i].conv.conv.stride,
                 ops[i].conv.conv.groups, type(ops[i].shortcut)) for i in convs]
        if convs:
            convs = [i for i, k in zip(convs, keys) if k == keys[0]]
            frs = [i for i in frs if _bn_key(ops[i].pre, ops[i].conv_1) == keys[0][0]]
            self.norm_key = keys[0][0]
        elif frs:
            self.norm_key = _bn_key(ops[frs[0]].pre, ops[frs[0]].conv_1)
        else:
            self.norm_key = None
        self.conv_ops = convs
        self.fr_ops = frs[:1]
        self.zero_ops = [i for i, op in enumerate(ops) if isinstance(op, Zero)]
        self.identity_ops = [i for i, op in enumerate(ops) if isinstance(op, nn.Identity)]
        self.pool_ops = [(i, _pool_key(op)) for i, op in enumerate(ops) if _pool_key(op) is not None]
        self.shortcut_is_identity = bool(convs) and isinstance(ops[convs[0]].shortcut, nn.Identity)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return _single_edge(self, x, weights)


@_without_autocast
def _single_edge(edge: FastMixedOp, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return _edges_forward([edge], [weights], x)[0]
