"""Signal propagation at initialization, on any ``nn.Module``.

:func:`measure_signal` feeds an input (usually N(0, 1) noise) through a model
and records, after every residual block l (REFERENCE.md section 6;
Brock et al. 2021, "Characterizing signal propagation"):

* ``mean_sq``  = mean_c (mean_{n,h,w} x)^2  -- average squared channel mean
* ``var``      = mean_c  var_{n,h,w} x      -- average channel variance
* ``res_var``  = the same variance of the residual branch output f(x), before
  any scalar gain (NF alpha, SkipInit gain, RescaleNet b_l) and before the
  addition; ``None`` when the branch cannot be identified.
* ``skip_var`` = the variance of the skip-path output (times RescaleNet's a_l^2)
  and ``ratio`` = sqrt(s_branch^2 res_var / skip_var), De & Smith's (2020)
  residual-to-skip scale (~ 1/sqrt(l) under batch normalization).

Variances are population variances (divide by the count) over batch and
spatial positions, per channel, then averaged over channels.

How blocks are found (``blocks=None``): every :class:`normfree.blocks.ResidualBlock`
of the model; otherwise the blocks made by :func:`normfree.convert` (``ConvertedBlock``,
``SkipGain``; their branch is their ``branch_out``); otherwise torchvision/timm-style blocks, i.e. the outermost
modules that have ``conv1`` and ``conv2`` children and a ``bn2``, ``bn3``, ``norm2``
or ``norm3`` child (torchvision and timm ResNets, timm ResNetV2). The residual branch
f(x) of a block is: for ``ResidualBlock`` the output
of ``block.branch_out``, through which f passes on the block's reference path
(the model is run :func:`~normfree.blocks.unfolded` while measuring: the same
outputs, every scalar applied step by step); for torchvision/timm blocks the output of ``se`` if present, else
of the last norm (``bn3``, ``bn2``, ``norm3``, ``norm2``), or, for pre-activation blocks (timm's ResNetV2:
``norm1`` registered before ``conv1``), of the last conv (``conv3``, else ``conv2``); for other blocks the module given in ``branches={block: module}``,
else unknown (``res_var=None``). The skip path is ``block.shortcut`` /
``block.downsample`` (the block input when that attribute is ``None``).

Batch normalization: with ``bn_stats="batch"`` (default, as in the papers'
SPPs at initialization) BatchNorm layers normalize with the statistics of the
current batch and their running statistics are restored afterwards; dropout
and stochastic depth are off. With ``bn_stats="running"`` the whole model runs
in eval mode. Every module's train/eval flag is restored on return, and the
hooks are removed: the model is left exactly as it was.

Chunking: the input is processed ``chunk_size`` samples at a time; per-channel
sums and sums of squares are accumulated in float64, so the statistics equal
those of one pass up to float rounding -- except for BatchNorm in batch mode,
which then normalizes each chunk with that chunk's statistics (a warning is
issued; use a chunk of at least the batch you mean). The per-sample spatial
sums run in the activation's precision (float32), so the variance carries a
relative error ~1e-7 x mean_sq / var: negligible unless the channel means
dwarf the variance. Cost: a sum and a vector norm per measured tensor, no copy
of activations, no host synchronisation until the end (benchmarks/bench_signal.py).

Also here: :func:`measure_gradients` (backward signal, per-block
||dL/d(block output)||), :func:`predict_variance` (the papers' analytic
variance per block, for our models), :func:`path_length_distribution` (Veit et
al. 2016) and :func:`effective_depth` (from the measured residual/skip ratios),
:func:`compare_models` (registered models by name, for ``normfree spp``).

Note: 3x3 convolutions lose variance to zero padding at small spatial sizes
(at 4x4 about 30% per conv), so SPPs of ImageNet-style ResNets should be
taken at >= 128x128; the CIFAR-style WRN is fine at 32x32.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .blocks import PoolPadShortcut, ResidualBlock, unfolded
from .layers import WeightNormConv2d, _normal_moments, activation_he_gain, get_activation
from .converted import converted_blocks, converted_branch, converted_branch_scale, predict_converted_variance

InputLike = Union[torch.Tensor, Sequence[int]]

__all__ = [
    "BlockStats", "GradStats", "SignalStats", "measure_signal", "measure_gradients", "find_blocks",
    "predict_variance", "path_length_distribution", "effective_depth", "write_csv", "write_json",
    "compare_models", "format_table",
]


# --------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------
@dataclass
class BlockStats:
    """Signal statistics after one residual block.

    index: 1-based position l of the block (as in the papers' formulas).
    name: the block's qualified name in the model (``"blocks.3"``).
    stage: 1-based stage; a new stage starts where the output shape changes.
    channels: channels of the block output.
    mean_sq, var: average squared channel mean / channel variance of the output.
    res_var, res_mean_sq: the same for the residual branch f(x) before any gain (or None).
    skip_var: channel variance of the skip-path contribution (or None).
    branch_scale: the scalar s_branch multiplying f(x) (1.0 when there is none).
    ratio: sqrt(branch_scale^2 res_var / skip_var), De & Smith's residual-to-skip ratio (or None).
    """

    index: int
    name: str
    stage: int
    channels: int
    mean_sq: float
    var: float
    res_var: Optional[float] = None
    res_mean_sq: Optional[float] = None
    skip_var: Optional[float] = None
    branch_scale: float = 1.0
    ratio: Optional[float] = None


@dataclass
class GradStats:
    """Backward signal at one block: the gradient g = dL/d(block output).

    norm: ||g||_2 over the whole batch; rms: norm / sqrt(number of elements).
    """

    index: int
    name: str
    stage: int
    norm: float
    rms: float


class SignalStats(list):
    """A list of :class:`BlockStats` (one per block, in order) plus the statistics
    of the first block's input (``input_mean_sq``, ``input_var``) and the
    ``chunk_size`` used."""

    def __init__(self, records: Iterable[BlockStats] = (), input_mean_sq: float = float("nan"),
                 input_var: float = float("nan"), chunk_size: Optional[int] = None):
        super().__init__(records)
        self.input_mean_sq = input_mean_sq
        self.input_var = input_var
        self.chunk_size = chunk_size

    def to_dicts(self) -> List[dict]:
        return [asdict(r) for r in self]

    def column(self, field: str) -> List:
        return [getattr(r, field) for r in self]


# --------------------------------------------------------------------------
# per-channel moments
# --------------------------------------------------------------------------
def _partial(t: torch.Tensor, cdim: int):
    """Per-channel (sum, sum of squares) of one tensor in float64, its count per
    channel and its shape from the channel dim on.

    The per-sample reduction over the trailing (spatial) dims runs on the tensor
    itself (a sum and a vector norm: no copy of the activation); only the small
    (N, C) partial results are converted to float64.
    """
    t = t.detach()
    cdim = cdim % t.dim() if t.dim() > 1 else 0
    inner = tuple(range(cdim + 1, t.dim()))
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if inner:
        s1 = t.sum(inner, dtype=acc)
        s2 = torch.linalg.vector_norm(t, dim=inner, dtype=acc).square_()
    else:
        s1 = t.to(acc)
        s2 = s1.square()
    s1, s2 = s1.double(), s2.double()
    outer = tuple(range(cdim))
    if outer:
        s1, s2 = s1.sum(outer), s2.sum(outer)
    return s1, s2, t.numel() // t.shape[cdim], tuple(t.shape[cdim:])


class _Moments:
    """Per-channel count, sum and sum of squares, accumulated in float64 across
    chunks (so chunked statistics equal one pass up to float rounding)."""

    __slots__ = ("cdim", "n", "s1", "s2", "shape")

    def __init__(self, cdim: int = 1):
        self.cdim = cdim
        self.n = 0
        self.s1: Optional[torch.Tensor] = None
        self.s2: Optional[torch.Tensor] = None
        self.shape: Optional[Tuple[int, ...]] = None

    def add(self, t: torch.Tensor):
        part = _partial(t, self.cdim)
        self.add_partial(part)
        return part

    def add_partial(self, part) -> None:
        s1, s2, n, shape = part
        if self.s1 is None:
            self.s1, self.s2, self.shape = s1.clone(), s2.clone(), shape
        else:
            self.s1 += s1
            self.s2 += s2
        self.n += n

    @property
    def empty(self) -> bool:
        return self.n == 0

    def result(self) -> Tuple[float, float]:
        """(average squared channel mean, average channel variance) of what was accumulated."""
        mean = self.s1 / self.n
        var = (self.s2 / self.n - mean * mean).clamp_(min=0.0)
        return float((mean * mean).mean()), float(var.mean())


# --------------------------------------------------------------------------
# finding blocks, branches and skips
# --------------------------------------------------------------------------
def _is_torchvision_block(m: nn.Module) -> bool:
    """torchvision / timm ResNet blocks (conv1, conv2, bn2 or bn3) and timm ResNetV2
    blocks (conv1, conv2, norm2 or norm3; pre-activation or not)."""
    kids = dict(m.named_children())
    return "conv1" in kids and "conv2" in kids and any(n in kids for n in ("bn2", "bn3", "norm2", "norm3"))


def _is_preactivation(block: nn.Module) -> bool:
    """timm's ResNetV2 PreActBasic / PreActBottleneck register ``norm1`` before ``conv1``
    (the norm acts on the block input); its post-activation Bottleneck registers it after."""
    names = [n for n, _ in block.named_children()]
    return "norm1" in names and "conv1" in names and names.index("norm1") < names.index("conv1")


def find_blocks(model: nn.Module) -> List[nn.Module]:
    """The residual blocks of ``model`` in module order (see the module docstring
    for the rules); an empty list when none is detectable."""
    ours = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    if ours:
        return ours
    converted = converted_blocks(model)
    if converted:
        return converted
    found: List[nn.Module] = []
    inside: set = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if _is_torchvision_block(m):
            found.append(m)
            inside.update(id(s) for s in m.modules())
    return found


def _default_branch(block: nn.Module) -> Optional[nn.Module]:
    if isinstance(block, ResidualBlock):
        return block.branch_out
    converted = converted_branch(block)
    if converted is not None:
        return converted
    se = getattr(block, "se", None)
    if isinstance(se, nn.Module) and not isinstance(se, nn.Identity):
        return se
    # pre-activation: f(x) ends with its last conv; otherwise with the norm after it
    last = ("conv3", "conv2") if _is_preactivation(block) else ("bn3", "bn2", "norm3", "norm2")
    for name in last:
        m = getattr(block, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


def _skip_module(block: nn.Module) -> Tuple[str, Optional[nn.Module]]:
    """("module", m) when the skip path is module m's output, ("input", None)
    when it is the block input, ("unknown", None) otherwise."""
    for name in ("shortcut", "downsample"):
        if hasattr(block, name):
            m = getattr(block, name)
            if m is None:
                return "input", None
            if isinstance(m, nn.Module):
                return "module", m
    return "unknown", None


def _as_float(s) -> Optional[float]:
    if s is None:
        return None
    return float(s.detach()) if isinstance(s, torch.Tensor) else float(s)


def _validate_blocks(model: nn.Module, blocks, branches) -> Tuple[List[nn.Module], Dict[nn.Module, nn.Module]]:
    names = {m: n for n, m in model.named_modules()}
    if blocks is None:
        blocks = find_blocks(model)
        if not blocks:
            raise ValueError(
                f"no residual blocks detected in {type(model).__name__}: pass blocks=[...] "
                f"(the residual block modules of the model, in order) and optionally "
                f"branches={{block: residual_branch_module}}; detected automatically are "
                f"normfree ResidualBlock and torchvision/timm-style blocks (children conv1, conv2 and bn2 or bn3)")
    else:
        if isinstance(blocks, nn.Module):
            blocks = [blocks]
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks is empty: pass the residual block modules of the model, in order")
        seen = set()
        for i, b in enumerate(blocks):
            if not isinstance(b, nn.Module):
                raise TypeError(f"blocks[{i}] is a {type(b).__name__}, not an nn.Module: pass the "
                                f"residual block modules of the model (e.g. model.layer1[0])")
            if b not in names:
                raise ValueError(f"blocks[{i}] ({type(b).__name__}) is not a module of this "
                                 f"{type(model).__name__}: pass modules taken from the model itself "
                                 f"(e.g. list(model.layer1) + list(model.layer2))")
            if id(b) in seen:
                raise ValueError(f"blocks[{i}] ({names[b] or type(b).__name__}) is listed twice")
            seen.add(id(b))
    branch_map: Dict[nn.Module, nn.Module] = {}
    given = dict(branches or {})
    for b in list(given):
        if b not in blocks:
            raise ValueError(f"branches has a key ({names.get(b, type(b).__name__)}) that is not one of "
                             f"the measured blocks; keys must be entries of blocks")
        if not isinstance(given[b], nn.Module) or given[b] not in names:
            raise ValueError(f"branches[{names.get(b)}] must be a module of the model (the last layer of "
                             f"that block's residual branch), got {type(given[b]).__name__}")
    for b in blocks:
        br = given.get(b) or _default_branch(b)
        if br is not None:
            branch_map[b] = br
    return blocks, branch_map


# --------------------------------------------------------------------------
# modes, inputs, chunks
# --------------------------------------------------------------------------
@contextlib.contextmanager
def _measurement_mode(model: nn.Module, bn_stats: str):
    """Eval mode everywhere; BatchNorm in batch-statistics mode when bn_stats ==
    "batch" (running statistics restored on exit). Restores every flag."""
    if bn_stats not in ("batch", "running"):
        raise ValueError(f"bn_stats must be 'batch' or 'running', got {bn_stats!r}")
    flags = [(m, m.training) for m in model.modules()]
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)] if bn_stats == "batch" else []
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    try:
        model.eval()
        for m in bns:
            m.train()
        yield bns
    finally:
        with torch.no_grad():
            for m, bufs in zip(bns, saved):
                for k, v in bufs.items():
                    getattr(m, k).copy_(v)
        for m, f in flags:
            m.training = f


def _model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.device, b.dtype
    return torch.device("cpu"), torch.float32


def _input_shape(x: InputLike) -> Tuple[int, ...]:
    if isinstance(x, torch.Tensor):
        shape = tuple(x.shape)
    elif isinstance(x, (tuple, list, torch.Size)) and all(isinstance(v, int) for v in x):
        shape = tuple(x)
    else:
        raise TypeError(f"x must be a tensor or an input shape such as (256, 3, 32, 32), got {type(x).__name__}")
    if len(shape) < 2 or shape[0] < 1 or any(v < 1 for v in shape):
        raise ValueError(f"input must have a batch dimension and positive sizes, e.g. (N, C, H, W); got {shape}")
    return shape


def _check_input(model: nn.Module, shape: Tuple[int, ...], x: InputLike = None) -> None:
    """The model's own shape check on the shape given (a meta tensor: nothing is
    allocated), and for a tensor input: no NaN or Inf (they would make every
    statistic NaN without a word)."""
    check = getattr(model, "check_input", None)
    if callable(check):
        check(torch.empty(shape, device="meta"))
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        bad = sum(int((~torch.isfinite(x[i:i + 256])).sum()) for i in range(0, shape[0], 256))
        if bad:
            raise ValueError(f"the input holds {bad} NaN/Inf value(s) (of {x.numel()}, shape {shape}): "
                             f"the statistics would be NaN; pass finite values")


def _chunks(x: InputLike, shape, chunk: int, seed: int, device, dtype) -> Iterator[torch.Tensor]:
    n = shape[0]
    if isinstance(x, torch.Tensor):
        for i in range(0, n, chunk):
            yield x[i:i + chunk].to(device=device, dtype=dtype)
        return
    # N(0, 1) noise drawn sample by sample from one seeded generator: the same
    # input whatever the chunk size.
    g = torch.Generator().manual_seed(seed)
    for i in range(0, n, chunk):
        k = min(chunk, n - i)
        xs = torch.stack([torch.randn(shape[1:], generator=g) for _ in range(k)])
        yield xs.to(device=device, dtype=dtype)


def _auto_chunk(model: nn.Module, shape, device, dtype, memory_budget: float) -> int:
    """Samples per chunk so that 6 copies of the largest activation fit the budget
    (probed with a one-sample forward; a no_grad ResNet-50 at 224x224 peaks at
    ~5 per sample on CPU); the whole batch when the input is small."""
    n = shape[0]
    per_sample_in = math.prod(shape[1:])
    elem = torch.finfo(dtype).bits // 8
    if 6 * 128 * n * per_sample_in * elem <= memory_budget:  # fits even if activations are 128x the input
        return n
    biggest = [per_sample_in]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            biggest[0] = max(biggest[0], out.numel())

    flags = [(m, m.training) for m in model.modules()]
    hs = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            _forward(model, torch.zeros((1,) + tuple(shape[1:]), device=device, dtype=dtype), shape)
    finally:
        for m, f in flags:
            m.training = f
        for h in hs:
            h.remove()
    return int(max(1, min(n, memory_budget // (6 * biggest[0] * elem))))


def _first_conv_channels(model: nn.Module) -> Optional[int]:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels
    return None


def _forward(model: nn.Module, xb: torch.Tensor, shape) -> torch.Tensor:
    try:
        return model(xb)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        c = _first_conv_channels(model)
        hint = f" (its first convolution takes {c} input channels: pass (N, {c}, H, W))" if c else ""
        raise ValueError(f"the model failed on an input of shape {tuple(shape)}{hint}: {e}") from e


def _stages(shapes: List[Optional[Tuple[int, ...]]]) -> List[int]:
    stages, stage, prev = [], 0, None
    for s in shapes:
        if s != prev:
            stage += 1
            prev = s
        stages.append(stage)
    return stages


def _warn_bn_chunks(bns, chunk: int, n: int) -> None:
    if bns and chunk < n:
        warnings.warn(f"BatchNorm layers use batch statistics and the input is processed in chunks of "
                      f"{chunk} < {n} samples: each chunk is normalized with its own statistics "
                      f"(as with batch size {chunk}); pass chunk_size={n} for one batch of {n}",
                      UserWarning, stacklevel=3)


# --------------------------------------------------------------------------
# forward signal
# --------------------------------------------------------------------------
def measure_signal(model: nn.Module, x: InputLike, blocks: Optional[Sequence[nn.Module]] = None, *,
                   branches: Optional[Dict[nn.Module, nn.Module]] = None, chunk_size: Optional[int] = None,
                   seed: int = 0, bn_stats: str = "batch", channel_dim: int = 1,
                   memory_budget: float = 2 * 2 ** 30, residual: bool = True) -> SignalStats:
    """Signal propagation statistics after every residual block (see module doc).

    Args:
        model: any ``nn.Module``; left unchanged.
        x: the input tensor, or an input shape ``(N, C, H, W)``: N(0, 1) noise
           drawn from ``seed`` (identical whatever ``chunk_size``).
        blocks: the residual blocks to measure, in order (default: detected).
        branches: ``{block: module}`` whose output is the residual branch f(x).
        chunk_size: samples per forward pass. Default: all of them when even
           activations 128x the input size fit ``memory_budget`` bytes (x6);
           otherwise a one-sample probe forward finds the largest activation
           and the chunk holds 6 of those within the budget (ResNet-50 at
           224x224, 2 GiB: 111 samples per chunk).
        bn_stats: "batch" (BatchNorm uses batch statistics) or "running".
        channel_dim: the channel dimension of block outputs (1 for NCHW).
        residual: also measure the residual branch and skip path (res_var,
           skip_var, ratio); False measures block outputs only (faster).

    Returns:
        :class:`SignalStats`, a list of :class:`BlockStats`.
    """
    shape = _input_shape(x)
    _check_input(model, shape, x)
    blocks, branch_map = _validate_blocks(model, blocks, branches)
    if not residual:
        branch_map = {}
    names = {m: n for n, m in model.named_modules()}
    device, dtype = _model_device_dtype(model)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    chunk = min(chunk_size or _auto_chunk(model, shape, device, dtype, memory_budget), shape[0])

    # our blocks give f(x) through block.branch_out on their reference path
    # (ResidualBlock.forward with fold_scalars off): run the model unfolded then.
    ours = [b for b in blocks if isinstance(b, ResidualBlock)]
    scales = {b: _as_float(b.branch_scale()) for b in ours}
    need_unfold = any(branch_map.get(b) is b.branch_out for b in ours)

    out_m = [_Moments(channel_dim) for _ in blocks]
    res_m = [_Moments(channel_dim) for _ in blocks]
    skip_m = [_Moments(channel_dim) for _ in blocks]
    in_m = _Moments(channel_dim)
    last: Dict[str, object] = {"t": None, "part": None}

    def out_hook(i):
        def hook(_m, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"block {names[blocks[i]]!r} returned {type(out).__name__}, not a tensor")
            last["t"], last["part"] = t, out_m[i].add(t)
        return hook

    def pre_hook(i):
        def hook(_m, inp):
            if i != 0 and skip_kind[i] != "input":
                return
            t = inp[0]
            # the input of a block is usually the previous block's output: reuse its sums
            part = last["part"] if last["t"] is t else _partial(t, channel_dim)
            if i == 0:
                in_m.add_partial(part)
            if skip_kind[i] == "input":
                skip_m[i].add_partial(part)
        return hook

    def simple_hook(acc):
        def hook(_m, _inp, out):
            acc.add(out[0] if isinstance(out, (tuple, list)) else out)
        return hook

    skip_kind: List[str] = []
    handles = []
    for i, b in enumerate(blocks):
        kind, sm = _skip_module(b) if residual else ("unknown", None)
        skip_kind.append(kind)
        handles.append(b.register_forward_pre_hook(pre_hook(i)))
        if kind == "module":
            handles.append(sm.register_forward_hook(simple_hook(skip_m[i])))
        if b in branch_map:
            handles.append(branch_map[b].register_forward_hook(simple_hook(res_m[i])))
        handles.append(b.register_forward_hook(out_hook(i)))

    try:
        ctx = unfolded(model) if need_unfold else contextlib.nullcontext()
        with ctx, _measurement_mode(model, bn_stats) as bns, torch.no_grad():
            _warn_bn_chunks(bns, chunk, shape[0])
            for xb in _chunks(x, shape, chunk, seed, device, dtype):
                _forward(model, xb, shape)
                last["t"] = last["part"] = None
    finally:
        for h in handles:
            h.remove()

    stages = _stages([m.shape for m in out_m])
    records = []
    for i, b in enumerate(blocks):
        if out_m[i].empty:
            raise ValueError(f"block {i} ({names[b] or type(b).__name__}) was never called by the model's "
                             f"forward: pass blocks that the forward pass uses")
        mean_sq, var = out_m[i].result()
        res_var = res_mean_sq = skip_var = ratio = None
        s = scales.get(b) if isinstance(b, ResidualBlock) else _as_float(converted_branch_scale(b))
        s = 1.0 if s is None else s
        if b in branch_map and not res_m[i].empty:
            res_mean_sq, res_var = res_m[i].result()
        if not skip_m[i].empty:
            skip_var = skip_m[i].result()[1]
            a = getattr(b, "skip_scale", None) if isinstance(b, ResidualBlock) else None
            if a is not None:
                skip_var *= a * a
        if res_var is not None and skip_var is not None and skip_var > 0:
            ratio = math.sqrt(s * s * res_var / skip_var)
        records.append(BlockStats(index=i + 1, name=names[b], stage=stages[i],
                                  channels=out_m[i].shape[0] if out_m[i].shape else 1,
                                  mean_sq=mean_sq, var=var, res_var=res_var, res_mean_sq=res_mean_sq,
                                  skip_var=skip_var, branch_scale=s, ratio=ratio))
    in_mean_sq, in_var = in_m.result() if not in_m.empty else (float("nan"), float("nan"))
    return SignalStats(records, input_mean_sq=in_mean_sq, input_var=in_var, chunk_size=chunk)


# --------------------------------------------------------------------------
# backward signal
# --------------------------------------------------------------------------
def measure_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                      blocks: Optional[Sequence[nn.Module]] = None, *, chunk_size: Optional[int] = None,
                      bn_stats: str = "batch") -> List[GradStats]:
    """Per-block norm of g_l = dL/d(output of block l) for the loss L = loss_fn(model(x), y).

    ``loss_fn`` must return the mean over the batch (like ``F.cross_entropy``);
    each chunk's loss is weighted by chunk/N so that chunked gradients equal the
    full-batch ones (exactly so without batch statistics). Uses
    ``torch.autograd.grad``: parameters' ``.grad`` are not touched. Dropout and
    stochastic depth are off; BatchNorm per ``bn_stats`` (see :func:`measure_signal`).
    """
    shape = _input_shape(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError("measure_gradients needs an input tensor x (and targets y)")
    if not isinstance(y, torch.Tensor) or y.shape[0] != shape[0]:
        raise ValueError(f"y must be a tensor with one target per sample ({shape[0]}), got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    _check_input(model, shape, x)
    blocks, _ = _validate_blocks(model, blocks, None)
    names = {m: n for n, m in model.named_modules()}
    device, dtype = _model_device_dtype(model)
    n = shape[0]
    chunk = min(chunk_size or n, n)
    sq = [torch.zeros((), dtype=torch.float64, device=device) for _ in blocks]
    count = [0] * len(blocks)
    shapes: List[Optional[Tuple[int, ...]]] = [None] * len(blocks)
    outs: List[Tuple[int, torch.Tensor]] = []

    def hook(i):
        def h(_m, _inp, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            outs.append((i, t))
            if shapes[i] is None:
                shapes[i] = tuple(t.shape[1:])
        return h

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        with _measurement_mode(model, bn_stats) as bns, torch.enable_grad():
            _warn_bn_chunks(bns, chunk, n)
            for s in range(0, n, chunk):
                xb = x[s:s + chunk].to(device=device, dtype=dtype).requires_grad_(True)
                yb = y[s:s + chunk].to(device)
                outs.clear()
                loss = loss_fn(_forward(model, xb, shape), yb) * (xb.shape[0] / n)
                grads = torch.autograd.grad(loss, [t for _, t in outs], allow_unused=True)
                for (i, t), g in zip(outs, grads):
                    count[i] += t.numel()
                    if g is not None:
                        sq[i] += g.detach().double().square().sum()
                outs.clear()
    finally:
        for h in handles:
            h.remove()
    stages = _stages(shapes)
    res = []
    for i, b in enumerate(blocks):
        if count[i] == 0:
            raise ValueError(f"block {i} ({names[b]}) was never called by the model's forward")
        norm = math.sqrt(float(sq[i]))
        res.append(GradStats(index=i + 1, name=names[b], stage=stages[i], norm=norm,
                             rms=norm / math.sqrt(count[i])))
    return res


# --------------------------------------------------------------------------
# analytic predictions
# --------------------------------------------------------------------------
def predict_variance(model: Union[nn.Module, str], v0: float = 1.0, **create_kwargs) -> List[float]:
    """Expected Var(x_l) after every block of a normfree model at initialization.

    ``model`` is a normfree ``ResNet`` (or a model name, built with
    ``create_model(name, **create_kwargs)``), or a model converted with
    ``normfree.convert(..., method="nf")`` (the NF rule below); ``v0`` is the
    variance of the first block's input, taken to be zero-mean (1 for NF, whose
    stem is designed to give unit variance). Any other model raises a
    ValueError saying so.
    Per block, with s the branch scalar (alpha, gain, b_l; 1 if none), a the
    skip scalar (RescaleNet a_l; 1 if none) and v_skip the skip-path variance:

        v_l = a^2 v_skip + s^2 r

    * normalized branch (bn, relubn, gn, ln, in; De & Smith 2020): the branch
      ends with a He-initialized conv of a normalized input, r = c. For the
      norm -> ReLU order the conv sees relu(z), z ~ N(0, 1): second moment
      2 x 1/2 = 1, of which E[relu(z)]^2 x 2 = 1/pi goes into channel means,
      so c = 1 - 1/pi; for ReLU -> norm the input is zero-mean with unit
      variance: c = 2. v_skip = v_{l-1}, or c at a transition whose conv
      shortcut takes the normalized input: linear growth v ~ v0 + l c within a
      stage.
    * NF (nf, nf_he; Brock et al. 2021): the pre-activation divides by beta^2 =
      the tracked expected variance, and f preserves the variance of its input:
      r = v_{l-1} / beta^2; v_skip = v_{l-1}, or v_{l-1} / beta^2 at a transition.
      With the SkipInit gain g at 1 (s = alpha) and v0 = 1 this is the tracked
      1 + k alpha^2 after the k-th block of a stage (``block.expected_var_out``);
      with g = 0 (the default init, as in DeepMind's nf_resnet.py) every block
      but a transition keeps the variance, and a transition divides it by beta^2.
    * unnormalized He-initialized branch (none, skipinit, rescale; De & Smith
      2020, Shao et al. 2020): r = v_{l-1}, v_skip = v_{l-1}: v_l = (a^2 + s^2)
      v_{l-1}, i.e. 2^l for none, (1 + alpha^2)^l for SkipInit, constant for
      RescaleNet (a^2 + b^2 = 1). This is the papers' idealization: He init
      preserves the second moment E[x^2] = var + mean_sq; the measured channel
      variance grows more slowly (about (2 - 1/pi) per block for none), since
      part of it turns into channel means, and zero padding loses some at
      small resolutions.
    * Fixup (Zhang et al. 2019): the last branch conv is zero, r = 0: constant.
    * Fixup's pool+pad shortcut zero-pads channels: v_skip = v_{l-1} cin / cout.
    * scalings (Balduzzi et al. 2017 a = s = 1/sqrt(2): constant; Szegedy et al.
      2016 s = beta on a bn branch: v ~ v0 + l beta^2 c; Hanin & Rolnick 2018
      s = b^l: v_l = v_{l-1} (1 + b^2l), bounded) enter through a and s above.
    * weight-normalized convs (wn, cwn, arpit; Salimans & Kingma 2016, Huang et
      al. 2017, Arpit et al. 2019): a conv whose filters have norm g maps an input
      of variance u to g^2 k u, with k = E[act(z)^2] (z ~ N(0, 1)) for WN, the
      second moment of the activation before it, and k = Var[act(z)] for CWN, whose
      zero-sum filters cancel the activation's mean: r = v_{l-1} prod_i g_i^2 k
      over the branch's convs (g_i^2 the mean of g^2 over filters), v_skip =
      v_{l-1} g^2 k through a WN shortcut. WN with g = the He gain keeps the second
      moment (r = v_{l-1}, as He init); CWN with g = sqrt(2) after a ReLU keeps
      2 x (1 - 1/pi) / 2 = 0.68 of the variance per conv; Arpit et al.'s g^2 =
      2 cin/cout, and 2/L on the last conv, give v_l = v_{l-1} (cin/cout)(1 + 1/L).
      For an activation other than ReLU, k is taken at the actual scale: E[act(x)^2]
      or Var[act(x)] for x ~ N(0, u), u the variance reaching it.
    * He-initialized branch with another activation than ReLU (selu, gelu, ...):
      the gain G = 1 / sqrt(E[act(z)^2]) keeps the second moment only at unit
      scale; each conv maps u to G^2 E[act(x)^2], x ~ N(0, u) (for SELU, G = 1 and
      (mean 0, variance 1) is a fixed point, Klambauer et al. 2017).
    * LSUV (Mishkin & Matas 2016), for a model initialized by
      :func:`normfree.lsuv_init`: every conv's output has variance 1, r = 1, and
      v_skip = 1 at a transition: v ~ v0 + l within a stage, as under BN.

    Means are ignored (He-init nets drift, see ``mean_sq``) and ReLU is assumed.
    NFNets and NF-RegNets are refused (ValueError): their average-pool shortcut
    divides the variance by up to 4, by how much depends on the spatial
    correlation of the features, which no formula here knows.
    """
    if isinstance(model, str):
        from .models import create_model  # only for names; signal.py otherwise needs only blocks
        model = create_model(model, **create_kwargs)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    if not blocks and converted_blocks(model):
        return predict_converted_variance(model, v0)
    if not blocks:
        raise ValueError(f"predict_variance needs a normfree model (with ResidualBlock blocks) or a model converted "
                         f"with normfree.convert(model, method='nf'); {type(model).__name__} is neither, so there is "
                         f"no analytic prediction for it. Measure it with normfree.measure_signal(model, x)")
    scheme = getattr(model, "scheme", None)
    if any(getattr(b, "shortcut_pool", None) is not None for b in blocks):
        raise ValueError("no analytic prediction for a model with an average-pool shortcut (NFNets, NF-RegNets): "
                         "it divides the variance by up to 4, depending on spatial correlations; measure it with "
                         "normfree.measure_signal(model, x)")
    v = float(v0)
    out = []
    for b in blocks:
        s = _as_float(b.branch_scale())
        s2 = 1.0 if s is None else s * s
        a2 = 1.0 if b.skip_scale is None else b.skip_scale ** 2
        norm = scheme.norm if scheme is not None else None
        if b.expected_var is not None:  # NF: the branch and a conv shortcut see Var(x) / beta^2
            h = v / b.expected_var
            v_skip = h if b.shortcut_uses_preact else v
            r = h
        elif norm is not None:
            c = 1.0 - 1.0 / math.pi if scheme.order == "norm_act" else 2.0
            v_skip = c if b.shortcut_uses_preact else v
            r = c
        elif scheme is not None and scheme.data_init == "lsuv":  # after lsuv_init: unit-variance conv outputs
            v_skip = 1.0 if b.shortcut_uses_preact else v
            r = 1.0
        elif all(isinstance(c, WeightNormConv2d) for c in b.convs):  # (C)WN: g^2 x what the activation passes
            act = scheme.act if scheme is not None else "relu"
            r = v
            for c in b.convs:
                r = _wn_gain2(c) * _act_moment(act, r, c.center)
            v_skip = _wn_gain2(b.shortcut) * _act_moment(act, v, b.shortcut.center) if b.shortcut_uses_preact else v
        else:
            v_skip = v
            r = v
            act = scheme.act if scheme is not None else "relu"
            if scheme is not None and scheme.fixup:
                r = 0.0
            elif act != "relu":  # He's gain keeps E[x^2] at unit scale only: u -> G^2 E[act(sqrt(u) z)^2]
                g2 = activation_he_gain(act) ** 2
                for _ in b.convs:
                    r = g2 * _act_moment(act, r, False)
                if b.shortcut_uses_preact:
                    v_skip = g2 * _act_moment(act, v, False)
        if isinstance(b.shortcut, PoolPadShortcut):
            v_skip = v * b.in_channels / b.out_channels
        v = a2 * v_skip + s2 * r
        out.append(v)
    return out


def _wn_gain2(conv: WeightNormConv2d) -> float:
    """g^2 of a weight-normalized conv: the mean of its squared gains."""
    return float(conv.gain.detach().double().square().mean())


def _act_moment(act: str, u: float, centered: bool) -> float:
    """E[act(x)^2] (``centered``: Var[act(x)]) for x ~ N(0, u): what a conv with
    unit-norm filters (zero-sum ones when centered) passes on per unit of g^2."""
    if act == "relu":  # E[relu(x)^2] = u / 2; E[relu(x)]^2 = u / (2 pi)
        return u * (1.0 - 1.0 / math.pi) / 2.0 if centered else u / 2.0
    if u <= 0.0:
        return 0.0
    fn = get_activation(act)
    m1, m2 = _normal_moments(lambda z: fn(z * math.sqrt(u)), points=20_001)
    return m2 - m1 * m1 if centered else m2


def path_length_distribution(n: Union[int, nn.Module], p: Union[float, Sequence[float]] = 0.5) -> np.ndarray:
    """P(a path traverses k residual branches), k = 0..n.

    A network of n residual blocks unrolls into 2^n paths; with p = 1/2 the
    lengths follow Binomial(n, 1/2) (Veit et al. 2016). A sequence of
    per-block probabilities p_l gives the Poisson-binomial distribution (see
    :func:`effective_depth`). ``n`` may be a model (its blocks are counted).
    """
    if isinstance(n, nn.Module):
        blocks = find_blocks(n)
        if not blocks:
            raise ValueError("no residual blocks detected in the model: pass the number of blocks")
        n = len(blocks)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a number of blocks >= 0, got {n!r}")
    ps = np.full(n, float(p)) if np.isscalar(p) else np.asarray(p, dtype=np.float64)
    if ps.shape != (n,) or np.any((ps < 0) | (ps > 1)):
        raise ValueError(f"p must be one probability or {n} probabilities in [0, 1]")
    dist = np.zeros(n + 1)
    dist[0] = 1.0
    for k, q in enumerate(ps):
        dist[1:k + 2] = dist[1:k + 2] * (1 - q) + dist[0:k + 1] * q
        dist[0] *= 1 - q
    return dist


def effective_depth(stats: Sequence[BlockStats]) -> dict:
    """De & Smith's picture of effective depth from measured residual/skip ratios.

    If branch and skip are uncorrelated, block l's output variance splits into
    a branch share p_l = r_l^2 / (1 + r_l^2) (r_l = ``ratio``) and a skip share
    1 - p_l; the output variance then splits over the 2^n paths, a path through
    the branches of a set S of blocks carrying prod_{l in S} p_l prod_{l not in S} (1 - p_l).
    The variance-weighted path-length distribution is Poisson-binomial(p_1..p_n):
    Binomial(n, 1/2) when r = 1 (no normalization), mean ~ ln(n) when r ~ 1/sqrt(l)
    (batch normalization: shallow effective depth), 0 when r = 0 (SkipInit at init).

    Returns {"p": per-block p_l, "distribution": P(k), "mean": sum p_l, "blocks": n}.
    Blocks without a ratio are skipped.
    """
    p = [r.ratio ** 2 / (1 + r.ratio ** 2) for r in stats if r.ratio is not None]
    dist = path_length_distribution(len(p), p) if p else np.ones(1)
    return {"p": p, "distribution": dist, "mean": float(sum(p)), "blocks": len(p)}


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------
def _rows(results: Dict[str, Sequence[BlockStats]], predictions: Optional[Dict[str, Sequence[float]]]):
    for label, stats in results.items():
        pred = (predictions or {}).get(label)
        for j, r in enumerate(stats):
            row = {"model": label, **asdict(r)}
            row["predicted_var"] = pred[j] if pred is not None else None
            yield row


def write_csv(results: Dict[str, Sequence[BlockStats]], path, predictions=None) -> str:
    """Write one row per (model, block) to ``path`` (CSV); returns the path."""
    cols = ["model"] + [f.name for f in fields(BlockStats)] + ["predicted_var"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for row in _rows(results, predictions):
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return str(path)


def write_json(results: Dict[str, Sequence[BlockStats]], path, predictions=None, meta=None) -> str:
    """Write ``{"meta": ..., "models": {label: {"input_var", "blocks": [...], "predicted_var"}}}``."""
    doc = {"meta": meta or {}, "models": {}}
    for label, stats in results.items():
        doc["models"][label] = {
            "input_shape": list(getattr(stats, "input_shape", None) or []) or None,
            "input_mean_sq": getattr(stats, "input_mean_sq", None),
            "input_var": getattr(stats, "input_var", None),
            "blocks": [asdict(r) for r in stats],
            "predicted_var": list((predictions or {}).get(label) or []) or None,
        }
        if getattr(stats, "nf_gain", None) is not None:
            doc["models"][label]["nf_gain"] = stats.nf_gain
        if getattr(stats, "grads", None) is not None:
            doc["models"][label]["grads"] = [asdict(g) for g in stats.grads]
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1, default=float)
    return str(path)


# --------------------------------------------------------------------------
# several registered models at once (the ``normfree spp`` command)
# --------------------------------------------------------------------------
def compare_models(names: Sequence[str], *, batch: Optional[int] = None, resolution: Optional[int] = None,
                   in_chans: int = 3,
                   chunk_size: Optional[int] = None, seed: int = 0, depth: Optional[int] = None,
                   width: Optional[float] = None, grads: bool = False, nf_gain: Optional[float] = 1.0,
                   **options) -> Tuple[Dict[str, SignalStats], Dict[str, List[float]]]:
    """Build each registered model ``name`` (``depth``, ``width`` and method
    ``**options`` as for ``create_model``) with weights seeded by ``seed`` and
    measure it on N(0, 1) noise (batch, in_chans, resolution, resolution) drawn
    from ``seed``. NF models are drawn with their SkipInit gain at ``nf_gain``
    (default 1, the paper's SPP convention; labelled ``"nf_wrn (gain 1)"``).
    Returns ({label: stats}, {label: predicted variances}); see
    :func:`normfree.factory.compare_specs` (which also takes foreign models) for
    the defaults and the details."""
    from .factory import compare_specs  # model building lives there; measuring needs no registry

    return compare_specs([(name, None) for name in names], batch=batch, resolution=resolution,
                         in_chans=in_chans, chunk_size=chunk_size, seed=seed, depth=depth, width=width,
                         grads=grads, nf_gain=nf_gain, options=options)


def format_table(results: Dict[str, Sequence[BlockStats]], predictions=None) -> str:
    """A short text table: one line per (model, block); the model column is as
    wide as the longest label (labels are never cut)."""
    w = max([len("model")] + [len(label) for label in results])
    lines = [f"{'model':{w}s} {'block':>5s} {'stage':>5s} {'mean_sq':>10s} {'var':>10s} {'pred_var':>10s} "
             f"{'res_var':>10s} {'ratio':>7s}"]
    fmt = lambda v, n=10: f"{v:{n}.4g}" if v is not None else f"{'-':>{n}s}"  # noqa: E731
    for label, stats in results.items():
        pred = (predictions or {}).get(label)
        for j, r in enumerate(stats):
            lines.append(f"{label:{w}s} {r.index:5d} {r.stage:5d} {fmt(r.mean_sq)} {fmt(r.var)} "
                         f"{fmt(pred[j] if pred else None)} {fmt(r.res_var)} {fmt(r.ratio, 7)}")
    return "\n".join(lines)
