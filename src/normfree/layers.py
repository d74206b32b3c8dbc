"""Small building blocks: convolutions that fold scalars into their weights,
Scaled Weight Standardization, (centered) weight normalization, scalar gains
and biases, activation gammas.

Every convolution here takes optional ``in_scale`` / ``out_scale`` arguments:
``conv(x, in_scale=a, out_scale=b)`` equals ``b * conv(a * x)`` (the bias is
scaled by ``b`` only). Since a convolution is linear, multiplying its (small)
weight is exact and much cheaper than multiplying the (large) activation map;
the residual block uses this to apply NF-ResNet's gamma/beta, alpha and the
SkipInit gain without extra passes over activations.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

Scale = Optional[Union[float, torch.Tensor]]

# --------------------------------------------------------------------------
# activations and their gammas
# --------------------------------------------------------------------------
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    # GELU's tanh approximation: jax.nn.gelu's default, so the one DeepMind's NFNets use
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "elu": F.elu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
    "selu": F.selu,  # Klambauer et al. 2017: lambda 1.0507..., alpha 1.6733... (torch's constants)
}

#: in-place forms of the activations whose backward reads only their output,
#: in place and out of place alike (ReLU: threshold_backward(grad, y); tanh:
#: 1 - y^2; sigmoid: y (1 - y)), so that overwriting the input gives the same
#: bits under autograd. GELU and SiLU need their input for the backward; ELU's
#: (and SELU's) in-place backward works from y where the out-of-place one uses
#: exp(x), equal only to rounding: they have no entry and always run out of place.
INPLACE_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "sigmoid": torch.sigmoid_,
    "identity": lambda x: x,
}

#: Monte-Carlo gammas published with the NF-ResNet authors' code (Brock et al.
#: 2021): gamma * g(z), z ~ N(0, 1), has unit variance. Kept for reference and
#: tests; the models use :func:`activation_gamma`, which integrates exactly.
PUBLISHED_GAMMAS: Dict[str, float] = {
    "relu": 1.7139588594436646,
    "gelu": 1.7015043497085571,
    "gelu_tanh": 1.7015043497085571,  # the published "gelu" constant was drawn with jax's tanh form
    "silu": 1.7881293296813965,
    "tanh": 1.5939117670059204,
    "elu": 1.2716004848480225,
    "sigmoid": 4.803835391998291,
    "identity": 1.0,
}

#: exact ReLU gamma: Var(relu(z)) = (1 - 1/pi) / 2
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function registered under ``name`` (see ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; allowed: {sorted(ACTIVATIONS)}") from None


def _normal_moments(fn: Callable[[torch.Tensor], torch.Tensor], points: int = 480_001) -> tuple:
    """(E[g(z)], E[g(z)^2]) for z ~ N(0, 1), by trapezoidal integration on a fine
    grid (accurate to ~1e-9 even for kinks such as ReLU's; ~1e-6 with 20,001 points)."""
    z = torch.linspace(-12.0, 12.0, points, dtype=torch.float64, device="cpu")  # (also under a meta-device context)
    w = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    with torch.no_grad():
        g = fn(z).to(torch.float64)
    return float(torch.trapezoid(w * g, z)), float(torch.trapezoid(w * g * g, z))


def _gamma_of(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    m1, m2 = _normal_moments(fn)
    var = m2 - m1 * m1
    if not np.isfinite(var) or var <= 0:
        raise ValueError(f"activation has zero or undefined variance under N(0,1): var={var}")
    return 1.0 / math.sqrt(var)


def _he_gain_of(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    m2 = _normal_moments(fn)[1]
    if not np.isfinite(m2) or m2 <= 0:
        raise ValueError(f"activation has zero or undefined second moment under N(0,1): E[g(z)^2]={m2}")
    return 1.0 / math.sqrt(m2)


@functools.lru_cache(maxsize=None)
def _named_gamma(name: str) -> float:
    return _gamma_of(get_activation(name))


@functools.lru_cache(maxsize=None)
def _named_he_gain(name: str) -> float:
    return _he_gain_of(get_activation(name))


def activation_gamma(act: Union[str, Callable[[torch.Tensor], torch.Tensor]]) -> float:
    """gamma such that ``gamma * act(z)``, z ~ N(0, 1), has unit variance.

    gamma = 1 / sqrt(Var[g(z)]), computed by numerical integration against the
    normal density (Brock et al. 2021, "Characterizing signal propagation",
    section 4). For ReLU this is sqrt(2 / (1 - 1/pi)) = 1.7129.
    """
    if isinstance(act, str):
        return _named_gamma(act)
    return _gamma_of(act)


def activation_he_gain(act: Union[str, Callable[[torch.Tensor], torch.Tensor]]) -> float:
    """He et al. (2015)'s gain for a layer fed by ``act``: 1 / sqrt(E[g(z)^2]), z ~ N(0, 1).

    A fan-in initialization with std gain / sqrt(fan_in) then keeps the second
    moment of the pre-activations: sqrt(2) for ReLU, ~1.534 for GELU, 1 for
    ``"identity"`` (a linear input). Computed by numerical integration, like
    :func:`activation_gamma`. (It differs from ``torch.nn.init.calculate_gain``
    for tanh, 5/3, and sigmoid, 1, which are not second-moment preserving.)
    """
    if isinstance(act, str):
        return _named_he_gain(act)
    return _he_gain_of(act)


# --------------------------------------------------------------------------
# convolutions
# --------------------------------------------------------------------------
def _as_factor(scale):
    """A scale (float, 0-d or per-channel tensor, or a tuple of those) as one
    factor shaped to broadcast over a conv weight (out, in, kh, kw)."""
    if isinstance(scale, tuple):
        f = None
        for s in scale:
            s = _as_factor(s)
            if s is not None:
                f = s if f is None else f * s
        return f
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        return scale.reshape(-1, 1, 1, 1)
    return scale


def _split_scale(scale) -> tuple:
    """A scale (number, tensor or tuple of those) as (product of the numbers,
    [the tensors, 0-d or per-channel]): numbers are multiplied in Python, so only
    the tensors cost an op (:func:`_ws_forward` shapes them to its rows)."""
    if scale is None:
        return 1.0, []
    if isinstance(scale, tuple):
        const, tensors = 1.0, []
        for s in scale:
            c, t = _split_scale(s)
            const, tensors = const * c, tensors + t
        return const, tensors
    if isinstance(scale, torch.Tensor):
        return 1.0, [scale]
    return float(scale), []


def _fold(w: torch.Tensor, b: Optional[torch.Tensor], in_scale: Scale, out_scale: Scale):
    """Fold ``in_scale`` (scalar) and ``out_scale`` (scalar or per-channel) into w, b."""
    s = _as_factor(in_scale)
    o = _as_factor(out_scale)
    if o is not None:
        s = o if s is None else s * o
        if b is not None:
            b = b * (o.reshape(-1) if isinstance(o, torch.Tensor) else o)
    if s is not None:
        w = w * s
    return w, b


def _add_bias(b: Optional[torch.Tensor], extra: Optional[torch.Tensor], channels: int):
    if extra is None:
        return b
    extra = extra.reshape(-1).expand(channels)
    return extra if b is None else b + extra


def _scale_key(scale) -> tuple:
    # identity + version of tensors, value of numbers: equal keys => equal scales
    if isinstance(scale, tuple):
        return tuple(_scale_key(s) for s in scale)
    if isinstance(scale, torch.Tensor):
        if scale.is_inference():  # no version counter: never treat as unchanged
            return (object(),)
        return (id(scale), scale._version, scale.data_ptr(), scale.dtype, scale.device)
    return (scale,)


#: folded weights a conv keeps under no_grad: the block's folded forward and its
#: reference path (which measure_signal runs) each use one
CACHE_ENTRIES = 2


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward folds scalar multipliers into its weight.

    ``forward(x, in_scale=a, out_scale=b, add_bias=c, in_bias=d) ==
    b * conv(a * (x + d)) + c``; with none of them it is exactly ``nn.Conv2d``.
    ``in_bias`` (a scalar tensor, Fixup's bias before a conv) is applied as
    ``conv(x) + d * conv(ones)``, exact with zero padding, so that ``x + d``
    need not be materialized and saved for backward. ``out_scale`` may be a number,
    a 0-d or per-channel tensor, or a tuple of those (multiplied); ``add_bias``
    a 0-d or per-channel tensor added to the bias (Fixup's bias after the
    branch). State-dict compatible with ``nn.Conv2d``.

    Without autograd (``torch.no_grad()`` / ``torch.inference_mode()``) and with
    ``cache_weights`` the folded weight is computed once and cached (the two
    most recently used scalings: a block's folded and reference paths), keyed on the identity,
    ``_version`` counter and storage of every tensor involved (weight, bias,
    gain, tensor scales) and on the values of numeric scales: an optimizer step
    or ``load_state_dict`` (in-place updates) bumps ``_version``, ``.to()``
    changes the storage, so the cache is never stale. It holds no autograd
    graph and is left out of ``state_dict``, pickling and ``deepcopy``. It is
    not used while ``torch.jit.trace`` or ``torch.compile`` / ``torch.export``
    trace: the graph must compute the folded weight, not hold a copy of it.
    ``cache_weights`` (class attribute, or per instance) is the cache's one
    switch: False computes :meth:`folded_weight_bias` on every call (the
    reference the cache must equal, tested bit for bit). It is off for plain
    convolutions, whose folded weight is at most one small multiply (measured:
    1.01x at ResNet-50 batch-1 inference, within noise), and on for
    :class:`ScaledStdConv2d`, whose standardization it saves (1.75x there;
    ``benchmarks/bench_switches.py``).
    """

    cache_weights: bool = False

    def effective_weight(self) -> torch.Tensor:
        """The weight actually convolved (before any folded scale)."""
        return self.weight

    def _cache_tensors(self) -> tuple:
        return (self.weight, self.bias)

    def folded_weight_bias(self, in_scale: Scale = None, out_scale: Scale = None,
                           add_bias: Optional[torch.Tensor] = None):
        """(weight, bias) with the scales folded in:
        ``conv(x, w, b) == out_scale * self(in_scale * x) + add_bias``."""
        w, b = _fold(self.effective_weight(), self.bias, in_scale, out_scale)
        return w, _add_bias(b, add_bias, self.out_channels)

    def _cached_weight_bias(self, in_scale: Scale, out_scale: Scale, add_bias: Optional[torch.Tensor]):
        if (not self.cache_weights or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.jit.is_tracing()):
            return self.folded_weight_bias(in_scale, out_scale, add_bias)
        tensors = self._cache_tensors()
        key = (tuple(_scale_key(t) for t in tensors), _scale_key(in_scale), _scale_key(out_scale),
               _scale_key(add_bias))
        cache = self.__dict__.setdefault("_fold_cache", {})  # key -> entry, least recent first
        entry = cache.pop(key, None)
        if entry is None:
            # the tensors are kept alive with the entry, so their ids cannot be reused
            entry = (tensors, in_scale, out_scale, add_bias, self.folded_weight_bias(in_scale, out_scale, add_bias))
            while len(cache) >= CACHE_ENTRIES:
                cache.pop(next(iter(cache)))
        cache[key] = entry
        return entry[-1]

    def clear_cache(self) -> None:
        """Drop the cached folded weight (it is rebuilt on the next no-grad call)."""
        self.__dict__.pop("_fold_cache", None)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_fold_cache", None)
        return state

    def forward(self, x: torch.Tensor, in_scale: Scale = None, out_scale: Scale = None,
                add_bias: Optional[torch.Tensor] = None, in_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        w, b = self._cached_weight_bias(in_scale, out_scale, add_bias)
        if in_bias is None:
            return self._conv_forward(x, w, b)
        if self.padding_mode != "zeros":
            return self._conv_forward(x + in_bias, w, b)
        # conv(x + c) = conv(x) + c * conv(ones): zero padding is zero on both sides, and
        # conv(ones) = the per-channel sum of W over the window, a tiny (1, out, H, W) map
        ones = x.new_ones((1, 1) + tuple(x.shape[2:]))
        bias_map = F.conv2d(ones, w.sum(dim=1, keepdim=True), None, self.stride, self.padding, self.dilation)
        return self._conv_forward(x, w, b).add_(bias_map * in_bias)


def _standardize(w: torch.Tensor, eps: float):
    """Per row of ``w`` (out, fan_in): c = W - mean(W) (a new tensor, free to be
    scaled in place), mean(W), r = 1 / sqrt(max(q, eps)) and q = N var(W) = sum(c^2);
    the standardized weight is c * r."""
    mu = w.mean(dim=1, keepdim=True)
    c = w - mu
    q = torch.linalg.vector_norm(c, dim=1, keepdim=True).square_()  # one read, no temporary
    return c, mu, torch.rsqrt(torch.clamp(q, min=eps)), q


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (out, in, kh, kw) as an (out, fan_in) matrix; a view (no copy) when
    ``t`` is contiguous or channels_last, whose rows are contiguous either way."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1)


def _unrows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rows`: ``rows`` laid out like ``like`` (same memory format)."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        o, i, kh, kw = like.shape
        return rows.view(o, kh, kw, i).permute(0, 3, 1, 2)
    return rows.view(like.shape)


def _ws_forward(weight, gain, scale, bias, in_const: float, out_const: float, eps: float):
    """The scaled, standardized weight and bias of :class:`ScaledStdConv2d` with
    every scale folded in (shared by training and the no-grad path, so that both
    give the same bits). ``scale`` (None, 0-d or per-channel) multiplies the output
    (weight and bias), numbers ``in_const`` / ``out_const`` the input / output.
    Returns (w_hat, b_hat, m, mu, r, q) with m the per-channel multiplier."""
    m = gain.reshape(-1, 1)
    if scale is not None:
        m = m * scale.reshape(-1, 1)
    if in_const * out_const != 1.0:
        m = m * (in_const * out_const)
    out, mu, r, q = _standardize(_rows(weight), eps)
    out.mul_(r * m)  # the centred copy becomes the result: one weight-sized allocation
    if bias is not None and scale is not None:
        bias = bias * scale.reshape(-1)
    if bias is not None and out_const != 1.0:
        bias = bias * out_const
    return _unrows(out, weight), bias, m, mu, r, q


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gradient ``t`` (out, 1) of a broadcast factor, summed to ``like``'s shape."""
    return t.sum().reshape(like.shape) if like.numel() == 1 else t.reshape(like.shape)


class _ScaledStdWeight(torch.autograd.Function):
    """W_hat = m * (W - mean W) / sqrt(max(N var W, eps)) per output channel,
    m = gain x scale x in_const x out_const, and b_hat = bias x scale x out_const:
    one autograd node for the whole fold, with a hand-written backward (a
    chain of small autograd ops costs ~0.5 ms per conv in Python overhead).
    On the CPU the weight-sized passes are memory-bound, so both directions
    touch the weight as few times as possible and allocate only their result
    (a fresh weight-sized buffer costs page faults): forward 4 reads + 2
    writes, backward 6 reads + 2 writes, nothing weight-sized saved beyond
    the parameter itself.

    With c = W - mean(W), q = sum(c^2), r = 1/sqrt(max(q, eps)), u = c r the
    standardized weight and g = dL/dW_hat, per output channel:
    dL/dm = d = sum(g u) = r (sum(g W) - mean(W) sum(g)); dL/dW = r m (g -
    mean(g)) - r^2 m d c, the last term only where q >= eps (else r is a
    constant). Computing d from W rather than c rounds with a relative error
    ~ float eps x |mean(W)| / std(W); WS leaves the mean's gradient zero, so
    the mean stays near its initial ~0. Used only when autograd records.
    """

    @staticmethod
    def forward(ctx, weight, gain, scale, bias, in_const, out_const, eps):
        w_hat, b_hat, m, mu, r, q = _ws_forward(weight, gain, scale, bias, in_const, out_const, eps)
        ctx.save_for_backward(weight, gain, scale, bias, m, mu, r, q >= eps)
        ctx.consts = (in_const, out_const)
        return w_hat, b_hat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, grad_b):
        weight, gain, scale, bias, m, mu, r, free = ctx.saved_tensors
        in_const, out_const = ctx.consts
        w = _rows(weight)
        if grad.is_contiguous() != weight.is_contiguous():  # match layouts so rows line up
            fmt = torch.contiguous_format if weight.is_contiguous() else torch.channels_last
            grad = grad.contiguous(memory_format=fmt)
        g = _rows(grad)
        gsum = g.sum(dim=1, keepdim=True)
        d = torch.addcmul((g * w).sum(dim=1, keepdim=True), mu, gsum, value=-1.0).mul_(r)  # dL/dm
        grad_w = grad_gain = grad_scale = grad_bias = None
        if ctx.needs_input_grad[0]:
            rm = r * m
            k = (rm * r * d).mul_(free).neg_()  # coefficient of c (zero where the eps guard holds)
            c0 = torch.addcmul(k * mu, rm, gsum, value=1.0 / w.shape[1]).neg_()
            grad_w = _unrows(torch.addcmul(c0, g, rm).addcmul_(w, k), weight)
        const = in_const * out_const
        if ctx.needs_input_grad[1]:
            t = d if scale is None else d * scale.reshape(-1, 1)
            grad_gain = _sum_to(t * const if const != 1.0 else t, gain)
        if ctx.needs_input_grad[2]:
            t = d * gain.reshape(-1, 1) * const
            if grad_b is not None and bias is not None:
                t = t + (grad_b * bias * out_const).reshape(-1, 1)
            grad_scale = _sum_to(t, scale)
        if ctx.needs_input_grad[3] and grad_b is not None:
            grad_bias = grad_b if scale is None else grad_b * scale.reshape(-1)
            if out_const != 1.0:
                grad_bias = grad_bias * out_const
        return grad_w, grad_gain, grad_scale, grad_bias, None, None, None


class ScaledStdConv2d(Conv2d):
    """Conv2d with Scaled Weight Standardization (Brock et al. 2021, NF-ResNets).

        W_hat = g * (W - mean(W)) / sqrt(max(N * var(W), 1e-4))

    mean and biased variance over the fan-in axes of each output channel,
    N = fan-in, g a learnable per-channel gain (init 1); bias init 0. Written
    with mean and ``vector_norm`` (no ``std_mean`` / ``var_mean``), so that it
    exports with ``torch.export`` (tested). In training the gain and any folded
    scales enter as one per-channel multiplier of a fused standardization with
    a hand-written backward; without autograd the result is cached (see
    :class:`Conv2d`) and is bit-identical to the training path's.
    """

    cache_weights: bool = True  # see Conv2d: the standardization is worth caching under no_grad

    def __init__(self, *args, eps: float = 1e-4, **kwargs):
        kwargs.setdefault("bias", True)
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.eps = eps
        self.fan_in = self.weight[0].numel()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        """(W - mean) / sqrt(max(N var, eps)) without the gain."""
        c, _, r, _ = _standardize(_rows(self.weight), self.eps)
        return _unrows(c.mul_(r), self.weight)

    def effective_weight(self) -> torch.Tensor:
        return self.folded_weight_bias()[0]

    def _cache_tensors(self) -> tuple:
        return (self.weight, self.bias, self.gain)

    def folded_weight_bias(self, in_scale: Scale = None, out_scale: Scale = None,
                           add_bias: Optional[torch.Tensor] = None):
        in_const, in_tensors = _split_scale(in_scale)
        out_const, out_tensors = _split_scale(out_scale)
        gain = self.gain
        for t in in_tensors:  # tensor input scales (rare) multiply the weight only
            gain = gain * t
        scale = None
        for t in out_tensors:
            scale = t if scale is None else scale * t
        bias = self.bias if (scale is not None or out_const != 1.0) else None
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(
                t is not None and t.requires_grad for t in (self.weight, gain, scale, bias)):
            w, b = _ScaledStdWeight.apply(self.weight, gain, scale, bias, in_const, out_const, self.eps)
        else:
            w, b = _ws_forward(self.weight, gain, scale, bias, in_const, out_const, self.eps)[:2]
        if bias is None:
            b = self.bias
        return w, _add_bias(b, add_bias, self.out_channels)


class WeightNormConv2d(Conv2d):
    """Conv2d with Weight Normalization (Salimans & Kingma 2016) or, with
    ``center=True``, Centered Weight Normalization (Huang et al. 2017):

        W_hat = g * v / ||v||                          (WN)
        W_hat = g * (v - mean(v)) / ||v - mean(v)||    (CWN)

    per output channel: v = ``weight`` (its direction), mean and norm over the
    fan-in axes, g = ``gain``, one learnable value per output channel, so that
    ``||W_hat|| = g`` for every filter; plus an optional bias. The norm is
    guarded as max(||.||, ``eps``) (openai/weightnorm and torch's weight_norm
    have no guard; huangleiBuaa/CenteredWN module_pytorch/CWN.py adds 1e-5 to
    the norm: the same for filters of norm ~1). CWN's filters sum to zero, so
    an input whose channels share one mean gives outputs with zero mean. CWN
    is Scaled Weight Standardization (:class:`ScaledStdConv2d`) up to the
    guard: sqrt(N var(v)) = ||v - mean(v)||; NF-ResNets add gamma on the
    activations instead of a gain g > 1. The scales a block folds in
    (``in_scale``, ``out_scale``) apply to W_hat as for :class:`Conv2d`.
    """

    def __init__(self, *args, center: bool = False, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.center = center
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def normalized_weight(self) -> torch.Tensor:
        """v / ||v|| (WN) or (v - mean v) / ||v - mean v|| (CWN), per output channel, without g."""
        v = _rows(self.weight)
        if self.center:
            v = v - v.mean(dim=1, keepdim=True)
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(self.eps)
        return _unrows(v / norm, self.weight)

    def effective_weight(self) -> torch.Tensor:
        return self.normalized_weight() * self.gain

    def _cache_tensors(self) -> tuple:
        return (self.weight, self.bias, self.gain)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", center=True" if self.center else "")


# --------------------------------------------------------------------------
# scalars
# --------------------------------------------------------------------------
class ScalarGain(nn.Module):
    """y = g * x with one learnable scalar g (SkipInit gain, Fixup multiplier)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class ScalarBias(nn.Module):
    """y = x + b with one learnable scalar b, init 0 (Fixup's scalar biases)."""

    def __init__(self, init: float = 0.0):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class Activation(nn.Module):
    """A named activation as a module (``relu``, ``gelu``, ...), times ``gain``
    (1 unless given: NF stems multiply by the activation's gamma).

    ``forward(x, inplace=True)`` overwrites ``x`` where the activation has an
    exact in-place form (:data:`INPLACE_ACTIVATIONS`) and computes a new tensor
    otherwise (the gain, if any, then multiplies out of place). Only the caller
    knows whether nothing else still reads ``x`` (the residual block decides: see
    ``ResidualBlock.inplace_acts``)."""

    def __init__(self, name: str = "relu", gain: float = 1.0):
        super().__init__()
        self.name = name
        self.fn = get_activation(name)
        self.gain = gain

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if inplace and self.name in INPLACE_ACTIVATIONS:
            y = INPLACE_ACTIVATIONS[self.name](x)
        else:
            y = self.fn(x)
        return y if self.gain == 1.0 else y * self.gain

    def extra_repr(self) -> str:
        return self.name if self.gain == 1.0 else f"{self.name}, gain={self.gain:.6g}"


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with prob. p,
    rescaling the kept ones by 1/(1-p) (Huang et al. 2016), so that the eval
    network equals the training-time expectation.

    Departs on purpose from DeepMind's nfnets/base.py ``StochDepth``, which by
    default (``scale_by_keep=False``) neither rescales in training nor at test
    time, so that its eval network weights branch l by 1/(1 - p_l) more than
    training did on average. Huang et al. scale by the survival probability at
    test time instead; this inverted form is the same in expectation (and is
    timm's and torchvision's).
    """
    if p <= 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)
