"""The bitwise inference engine: binary layers as XNOR + popcount, BatchNorm folded into the bits.

:func:`to_bitwise` rewrites a model with binary weights and activations (a packed artifact or a
``binarize`` checkpoint) for inference, in place:

* every binary layer ``BatchNorm -> sign -> conv × α -> activation`` (the paper's §3 layer,
  :class:`~bats_cli.layers.quant.BinaryConvBlock`) becomes one :class:`BitwiseBlock`: BatchNorm + sign are
  a per-channel threshold (``bn(x) >= 0  <=>  s·x >= t``, ``s = -1`` where the BatchNorm scale is
  negative), found at load time by bisection on the module's own BatchNorm and checked against it,
  so the bits are exactly the float path's (:mod:`bats_cli.engine.fold`); the C++ kernel packs the
  input bits straight from the previous layer's float output (the normalised tensor is never
  written), runs XNOR + popcount and applies α, PReLU / ReLU / RPReLU (its shifts too) and the
  adds that follow in the same pass;
* a cell op ``f(x) + x`` (:class:`~bats_cli.layers.ops.GroupConvOp`), ResNet's ``conv2(conv1(x)) + x``
  and a cell node's sum of two ops hand their adds to that pass (:class:`BitwiseGroupConvOp`,
  :class:`BitwiseBasicBlock`, :class:`BitwiseCell`); factorized reduce (BatchNorm, two binary 1×1
  convs on offset grids, concat, activation) is one kernel call (:class:`BitwiseFactorizedReduce`);
* any other binary conv becomes a :class:`BitwiseConv2d` (sign at 0, conv, × α);
* max pools run the kernel's channels-last max pool (:class:`BitwiseMaxPool2d`, same values).

Integer sums are exact in float32 (|sum| < 2^24) and the float tail runs the same operations in
the same order as PyTorch (the kernel is built with ``-ffp-contract=off``), so a converted
model's outputs equal the float-emulated binary model's bit for bit (``tests/test_engine.py``).
The SIMD popcount path (AVX-512 VPOPCNTDQ, AVX2, portable) is chosen at run time:
:func:`simd_path`. Threads: ``torch.set_num_threads`` (``--threads``); results do not depend on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bats_cli.core.errors import UserInputError
from bats_cli.engine._build import EngineUnavailable, load_extension
from bats_cli.engine.fold import (
    ACT_NONE,
    check_conv,
    fold_bn_sign,
    geometry,
    kernel_activation,
    pair,
    plain_sign,
    weight_signs,
)
from bats_cli.layers.ops import FactorizedReduce, GroupConvOp
from bats_cli.layers.quant import BinaryConvBlock, QuantConv2d
from bats_cli.models.networks import Cell
from bats_cli.models.resnet import BasicBlock

ENGINES = ("float", "bitwise", "auto")

# ---- modules ---------------------------------------------------------------------------------

class _KernelLayer(nn.Module):
    """A layer run by one ``BinaryLayer`` of the C++ kernel, rebuilt from buffers when needed."""

    grouped_conv = False  # runtime.memory_format: stands in for a grouped conv when True

    def _set_layer(self, in_channels: int, thresholds, signs, convs: list[QuantConv2d],
                   geometry: list[list[int]], scale: torch.Tensor, act: int, slope: torch.Tensor,
                   shifts: tuple = ()) -> None:
        self.in_channels = in_channels
        self.out_channels = sum(c.out_channels for c in convs)
        self.n_convs = len(convs)
        self.register_buffer("thresholds", thresholds.float().clone())
        self.register_buffer("signs", signs.float().clone())
        for i, conv in enumerate(convs):
            self.register_buffer(f"weight_sign_{i}", weight_signs(conv))
        self.register_buffer("scale", scale.detach().float().cpu().clone())
        self.register_buffer("slope", slope.float().clone())
        # RPReLU's shifts before and after the PReLU (ACT_RPRELU only), applied in the same pass.
        self._shifts = len(shifts) == 2
        for name, t in zip(("shift_in", "shift_out"), shifts or (torch.zeros(1), torch.zeros(1))):
            self.register_buffer(name, t.float().clone())
        self._geometry = geometry
        self._act = act
        self._handle = None
        self.grouped_conv = any(c.groups > 1 for c in convs)
        self.params = geometry[0][:9]  # groups, kh, kw, sh, sw, ph, pw, dh, dw (first conv)

    def _layer(self):
        if self._handle is None:
            ext = load_extension()
            weights = [getattr(self, f"weight_sign_{i}").float() for i in range(len(self._geometry))]
            shifts = (self.shift_in, self.shift_out) if self._shifts else (None, None)
            self._handle = ext.BinaryLayer(self.in_channels, self.thresholds, self.signs, weights,
                                           self._geometry, self.scale, self._act, self.slope, *shifts)
        return self._handle

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_handle"] = None  # the C++ object is rebuilt from the buffers (deepcopy, pickle)
        return state

    def _run(self, x: torch.Tensor, residual=None, add=None) -> torch.Tensor:
        handle = self._handle if self._handle is not None else self._layer()
        if not x.is_cpu:
            raise UserInputError("the bitwise engine runs on the CPU; use --device cpu")
        if x.dtype != torch.float32:
            x = x.float()
        return handle.forward(x, residual, add)

    def _run_then(self, act: nn.Module | None, x: torch.Tensor, residual=None, add=None) -> torch.Tensor:
        """The kernel, then ``act`` when the kernel could not take it, then the sums it would have added."""
        if act is None:
            return self._run(x, residual, add)
        y = act(self._run(x))
        if residual is not None:
            y = y + residual
        return y if add is None else y + add

    def kernel_layout(self) -> str:
        """How the kernel lays out this layer's windows (for ``--verbose`` / debugging)."""
        return self._layer().describe()


class BitwiseConv2d(_KernelLayer):
    """A binary conv (sign(x) ⊛ sign(W) × α, sign at 0) run by the kernel; inference only."""

    accepts_add = True

    def __init__(self, conv: QuantConv2d) -> None:
        super().__init__()
        check_conv(conv)
        self._set_layer(conv.in_channels, *plain_sign(conv.in_channels), [conv], [geometry(conv)],
                        conv.scale, ACT_NONE, torch.zeros(1))

    def forward(self, x: torch.Tensor, residual=None, add=None) -> torch.Tensor:
        return self._run(x, residual, add)

    def extra_repr(self) -> str:
        g, kh, kw, sh, sw, ph, pw, dh, dw = self.params
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"stride=({sh}, {sw}), padding=({ph}, {pw}), dilation=({dh}, {dw}), groups={g}")


class BitwiseBlock(_KernelLayer):
    """BatchNorm -> sign -> conv × α -> activation [+ residual] [+ add] in one kernel pass.

    When the BatchNorm cannot be folded (no running statistics, or the threshold check failed)
    it stays a float module before the kernel (``self.bn``); an activation the kernel does not
    know stays a module after it (``self.act``), and then the adds run in PyTorch, in the same
    order as the float path.
    """

    accepts_add = True

    def __init__(self, block: BinaryConvBlock) -> None:
        super().__init__()
        conv = block.conv
        check_conv(conv)
        folded = fold_bn_sign(block.bn)
        self.bn = None if folded is not None else block.bn
        thresholds, signs = folded if folded is not None else plain_sign(conv.in_channels)
        act = kernel_activation(block.act, conv.out_channels)
        self.act = None if act is not None else block.act
        code, slope, shifts = act if act is not None else (ACT_NONE, torch.zeros(1), ())
        self._set_layer(conv.in_channels, thresholds, signs, [conv], [geometry(conv)], conv.scale,
                        code, slope, shifts)
        self.folded = folded is not None
        self._one_pass = self.bn is None and self.act is None

    def forward(self, x: torch.Tensor, residual=None, add=None) -> torch.Tensor:
        if self._one_pass:
            return self._run(x, residual, add)
        if self.bn is not None:
            x = self.bn(x)
        return self._run_then(self.act, x, residual, add)


class BitwiseFactorizedReduce(_KernelLayer):
    """Factorized reduce (BatchNorm, two binary 1×1 stride-2 convs on grids offset by one pixel,
    concatenated, activation) as one kernel call; the offset grid's padded edge is a 0 after
    BatchNorm, so its bits are +1, as in the float path."""

    accepts_add = True

    def __init__(self, fr: FactorizedReduce) -> None:
        super().__init__()
        for conv in (fr.conv_1, fr.conv_2):
            check_conv(conv)
        folded = fold_bn_sign(fr.pre)
        self.pre = None if folded is not None else fr.pre
        c_in = fr.conv_1.in_channels
        thresholds, signs = folded if folded is not None else plain_sign(c_in)
        c_out = fr.conv_1.out_channels + fr.conv_2.out_channels
        act = kernel_activation(fr.post, c_out)
        self.post = None if act is not None else fr.post
        code, slope, shifts = act if act is not None else (ACT_NONE, torch.zeros(1), ())
        scale = torch.cat([fr.conv_1.scale.detach(), fr.conv_2.scale.detach()])
        self._set_layer(c_in, thresholds, signs, [fr.conv_1, fr.conv_2],
                        [geometry(fr.conv_1), geometry(fr.conv_2, offset=1, fill_ones=True)],
                        scale, code, slope, shifts)
        self.folded = folded is not None

    def forward(self, x: torch.Tensor, residual=None, add=None) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        return self._run_then(self.post, x, residual, add)


class BitwiseMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (a cell op) with the kernel's channels-last max pool: the same values
    (a max selects, so nothing rounds; NaN propagates as in PyTorch), without PyTorch's argmax
    bookkeeping. Other layouts and options run PyTorch's."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__(pool.kernel_size, stride=pool.stride, padding=pool.padding,
                         dilation=pool.dilation, return_indices=pool.return_indices,
                         ceil_mode=pool.ceil_mode)
        k, s, p, d = (pair(v) for v in (self.kernel_size, self.stride or self.kernel_size,
                                          self.padding, self.dilation))
        square = k[0] == k[1] and s[0] == s[1] and p[0] == p[1]
        self._kernel_args = ((k[0], s[0], p[0]) if square and d == (1, 1) and not self.ceil_mode
                             and not self.return_indices else None)

    def forward(self, x: torch.Tensor):
        if (self._kernel_args is not None and x.is_cpu and x.dtype == torch.float32 and x.dim() == 4
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return load_extension().max_pool_nhwc(x, *self._kernel_args)
        return super().forward(x)


class BitwiseGroupConvOp(nn.Module):
    """§4.1's ``f(x) + x`` with the shortcut's add (and a node's add) in the kernel pass."""

    accepts_add = True

    def __init__(self, op: GroupConvOp, block: BitwiseBlock, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.conv = block
        self.shortcut = shortcut
        self.identity = isinstance(shortcut, nn.Identity)

    def forward(self, x: torch.Tensor, add=None) -> torch.Tensor:
        if self.shortcut is None:
            res = None
        else:
            res = x if self.identity else self.shortcut(x)
        return self.conv(x, res, add)


class BitwiseSequential(nn.Sequential):
    """A sequence whose last module takes the add of the node it feeds (DARTS sep/dil convs)."""

    accepts_add = True

    def forward(self, x: torch.Tensor, add=None) -> torch.Tensor:  # type: ignore[override]
        mods = list(self)
        for m in mods[:-1]:
            x = m(x)
        return mods[-1](x, add=add)


class BitwiseBasicBlock(nn.Module):
    """ResNet's ``conv2(conv1(x)) + shortcut(x)`` with the add in conv2's kernel pass."""

    def __init__(self, block: BasicBlock, conv1: nn.Module, conv2: BitwiseBlock,
                 downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1, self.conv2, self.downsample = conv1, conv2, downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x), residual=shortcut)


class BitwiseCell(nn.Module):
    """A genotype cell whose node sums ``op_a(x_a) + op_b(x_b)`` run in one op's kernel pass.

    Same values as :class:`~bats_cli.models.networks.Cell` in eval mode: ``(0 + h_a) + h_b`` there,
    ``h_a + h_b`` here (float addition is commutative; ``0 + h`` only turns -0 into +0).
    """

    def __init__(self, cell: Cell, ops: list[nn.Module]) -> None:
        super().__init__()
        self.reduction = cell.reduction
        self.preprocess0, self.preprocess1 = cell.preprocess0, cell.preprocess1
        self.ops = nn.ModuleList(ops)
        self.steps, self.multiplier = cell.steps, cell.multiplier
        self.indices, self.concat, self.op_names = list(cell.indices), list(cell.concat), list(cell.op_names)
        self._accepts = [bool(getattr(op, "accepts_add", False)) for op in ops]

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        ops, idx, accepts = self.ops, self.indices, self._accepts
        for step in range(self.steps):
            a, b = 2 * step, 2 * step + 1
            if accepts[b]:
                states.append(ops[b](states[idx[b]], add=ops[a](states[idx[a]])))
            elif accepts[a]:
                states.append(ops[a](states[idx[a]], add=ops[b](states[idx[b]])))
            else:
                states.append(ops[a](states[idx[a]]) + ops[b](states[idx[b]]))
        return torch.cat([states[i] for i in self.concat], dim=1)


# ---- conversion ------------------------------------------------------------------------------

def binary_conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantConv2d) and m.is_binary]


def bitwise_conv_count(model: nn.Module) -> int:
    """How many binary convs of ``model`` the kernel runs (factorized reduce's layer runs two)."""
    return sum(m.n_convs for m in model.modules() if isinstance(m, _KernelLayer))


def _is_binary_block(m: nn.Module) -> bool:
    return isinstance(m, BinaryConvBlock) and m.conv.is_binary


def _convert(m: nn.Module) -> nn.Module:
    """The bitwise replacement of ``m`` (children first); ``m`` itself when nothing applies."""
    if isinstance(m, QuantConv2d):
        return BitwiseConv2d(m) if m.is_binary else m
    if type(m) is nn.MaxPool2d:
        return BitwiseMaxPool2d(m)
    if _is_binary_block(m):
        return BitwiseBlock(m)
    if isinstance(m, FactorizedReduce) and not m.darts_float and m.conv_1.is_binary:
        return BitwiseFactorizedReduce(m)
    if isinstance(m, GroupConvOp) and _is_binary_block(m.conv) and isinstance(m.shuffle, nn.Identity):
        shortcut = None if m.shortcut is None else _convert(m.shortcut)
        return BitwiseGroupConvOp(m, BitwiseBlock(m.conv), shortcut)
    if isinstance(m, BasicBlock) and _is_binary_block(m.conv2):
        down = None if m.downsample is None else _convert(m.downsample)
        return BitwiseBasicBlock(m, _convert(m.conv1), BitwiseBlock(m.conv2), down)
    for name, child in list(m.named_children()):
        new = _convert(child)
        if new is not child:
            setattr(m, name, new)
    if isinstance(m, Cell):
        return BitwiseCell(m, list(m.ops))
    if isinstance(m, nn.Sequential) and len(m) and getattr(m[-1], "accepts_add", False):
        return BitwiseSequential(*list(m))
    return m


@torch.no_grad()
def to_bitwise(model: nn.Module) -> nn.Module:
    """Rewrite ``model`` (in place where it can) for the bitwise engine; returns it in eval mode.

    Returns the replacement when ``model`` itself is replaced (one binary conv or block).

    Raises :class:`EngineUnavailable` (one line) when the kernel cannot be compiled, and
    :class:`UserInputError` when the model has real weights or no binary conv at all.
    """
    names = binary_conv_names(model)
    if not names:
        raise UserInputError("the model has no binary convolutions; nothing for the bitwise engine")
    for name in names:
        check_conv(model.get_submodule(name))
    load_extension()
    model.eval()
    return _convert(model).eval()


def simd_path() -> str:
    """The SIMD popcount path the kernel uses on this CPU (``BATS_BITWISE_SIMD`` can force one)."""
    return load_extension().simd_path()


def engine_info(model: nn.Module | None = None) -> dict[str, Any]:
    """What the bitwise engine runs here: SIMD path (and the CPU's others), threads, and for a
    converted ``model`` its binary layers (BatchNorms folded into thresholds or kept in float)."""
    ext = load_extension()
    info: dict[str, Any] = {"simd": ext.simd_path(), "simd_available": list(ext.simd_paths()),
                            "threads": torch.get_num_threads()}
    if model is not None:
        layers = [m for m in model.modules() if isinstance(m, _KernelLayer)]
        info["binary_layers"] = len(layers)
        info["bn_folded"] = sum(bool(getattr(m, "folded", False)) for m in layers)
        info["bn_kept_float"] = sum(getattr(m, "folded", True) is False for m in layers)
        info["fused_adds"] = sum(isinstance(m, (BitwiseGroupConvOp, BitwiseBasicBlock, BitwiseCell))
                                 for m in model.modules())
    return info


def apply_engine(model: nn.Module, engine: str, *, device: torch.device | str = "cpu",
                 warn=None) -> tuple[nn.Module, str]:
    """``(model, engine used)`` for ``--engine float|bitwise|auto``.

    ``bitwise`` is what the user asked for explicitly, so a missing compiler is an error (one
    line, exit 2) rather than a silent float run labelled bitwise; ``auto`` uses the bitwise
    engine where it can (CPU, binary weights, a compiler) and otherwise says why in one line
    through ``warn`` and keeps the float path.
    """
    if engine not in ENGINES:
        raise UserInputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "float":
        return model, "float"
    try:
        if torch.device(device).type != "cpu":
            raise UserInputError("the bitwise engine runs on the CPU; use --device cpu")
        return to_bitwise(model), "bitwise"
    except UserInputError as exc:
        if engine == "bitwise":
            raise
        if warn is not None:
            warn(f"note: bitwise engine not used ({exc}); running the float path")
        return model, "float"


def engine_available() -> bool:
    try:
        load_extension()
    except EngineUnavailable:
        return False
    return True


__all__ = ["BitwiseBasicBlock", "BitwiseBlock", "BitwiseCell", "BitwiseConv2d",
           "BitwiseFactorizedReduce", "BitwiseGroupConvOp", "BitwiseMaxPool2d", "BitwiseSequential",
           "ENGINES",
           "EngineUnavailable", "apply_engine", "binary_conv_names", "bitwise_conv_count",
           "engine_available",
           "engine_info", "simd_path", "to_bitwise"]
