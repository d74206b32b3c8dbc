"""Small building blocks: convolutions that fold scalars into their weights,
Scaled Weight Standardization, scalar gains and biases, activation gammas.

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
    "silu": F.silu,
    "tanh": torch.tanh,
    "elu": F.elu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}

#: Monte-Carlo gammas published with the NF-ResNet authors' code (Brock et al.
#: 2021): gamma * g(z), z ~ N(0, 1), has unit variance. Kept for reference and
#: tests; the models use :func:`activation_gamma`, which integrates exactly.
PUBLISHED_GAMMAS: Dict[str, float] = {
    "relu": 1.7139588594436646,
    "gelu": 1.7015043497085571,
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


def _gamma_of(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    # Var(g(z)) for z ~ N(0,1) by trapezoidal integration on a fine grid
    # (accurate to ~1e-9 even for kinks such as ReLU's).
    z = torch.linspace(-12.0, 12.0, 480_001, dtype=torch.float64)
    w = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    with torch.no_grad():
        g = fn(z).to(torch.float64)
    m1 = torch.trapezoid(w * g, z)
    m2 = torch.trapezoid(w * g * g, z)
    var = float(m2 - m1 * m1)
    if not np.isfinite(var) or var <= 0:
        raise ValueError(f"activation has zero or undefined variance under N(0,1): var={var}")
    return 1.0 / math.sqrt(var)


@functools.lru_cache(maxsize=None)
def _named_gamma(name: str) -> float:
    return _gamma_of(get_activation(name))


def activation_gamma(act: Union[str, Callable[[torch.Tensor], torch.Tensor]]) -> float:
    """gamma such that ``gamma * act(z)``, z ~ N(0, 1), has unit variance.

    gamma = 1 / sqrt(Var[g(z)]), computed by numerical integration against the
    normal density (Brock et al. 2021, "Characterizing signal propagation",
    section 4). For ReLU this is sqrt(2 / (1 - 1/pi)) = 1.7129.
    """
    if isinstance(act, str):
        return _named_gamma(act)
    return _gamma_of(act)


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

    Without autograd (``torch.no_grad()`` / ``torch.inference_mode()``) the
    folded weight is computed once and cached, keyed on the identity,
    ``_version`` counter and storage of every tensor involved (weight, bias,
    gain, tensor scales) and on the values of numeric scales: an optimizer step
    or ``load_state_dict`` (in-place updates) bumps ``_version``, ``.to()``
    changes the storage, so the cache is never stale. It holds no autograd
    graph and is left out of ``state_dict``, pickling and ``deepcopy``.
    """

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
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.folded_weight_bias(in_scale, out_scale, add_bias)
        tensors = self._cache_tensors()
        key = (tuple(_scale_key(t) for t in tensors), _scale_key(in_scale), _scale_key(out_scale),
               _scale_key(add_bias))
        cache = self.__dict__.get("_fold_cache")
        if cache is None or cache[0] != key:
            # the tensors are kept alive with the entry, so their ids cannot be reused
            cache = (key, tensors, in_scale, out_scale, add_bias,
                     self.folded_weight_bias(in_scale, out_scale, add_bias))
            self.__dict__["_fold_cache"] = cache
        return cache[-1]

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
    """Per output channel of ``w`` (out, fan_in): centered c = W - mean(W) and
    r = 1 / sqrt(max(N var(W), eps)); the standardized weight is c * r."""
    c = w - w.mean(dim=1, keepdim=True)
    var = (c * c).mean(dim=1, keepdim=True)
    r = torch.rsqrt(torch.clamp(var * w.shape[1], min=eps))
    return c, r, var


class _ScaledStdWeight(torch.autograd.Function):
    """W_hat = m * (W - mean W) / sqrt(max(N var W, eps)) per output channel,
    m a per-channel multiplier (gain x folded scales), with a hand-written
    backward: a handful of weight-sized passes instead of autograd's ~15.

    With u = c r the standardized weight and g = dL/dW_hat:
    dL/dm = sum(g u); dL/dW = r m (g - mean(g) - u sum(g u)) (the last term
    vanishes where the eps guard is active); sum(u) = 0 removes the mean of
    the middle term. Used only when autograd records the weight.
    """

    @staticmethod
    def forward(ctx, weight, mult, eps):
        w = weight.reshape(weight.shape[0], -1)
        c, r, var = _standardize(w, eps)
        m = mult.reshape(-1, 1)
        # c is recomputed in backward from the weight (saved anyway): no weight-sized copy kept
        ctx.save_for_backward(weight, r, m, var * w.shape[1] >= eps)
        ctx.mult_shape = mult.shape
        return (c * (r * m)).view_as(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        weight, r, m, free = ctx.saved_tensors
        w = weight.reshape(weight.shape[0], -1)
        c = w - w.mean(dim=1, keepdim=True)
        g = grad.reshape(c.shape)
        gc = (g * c).sum(dim=1, keepdim=True)  # sum(g c) per channel (faster than bmm on CPU)
        dot = gc * r  # sum(g u)
        grad_w = grad_m = None
        if ctx.needs_input_grad[0]:
            rm = r * m
            t = torch.addcmul(g, c, torch.where(free, dot * r, torch.zeros_like(dot)), value=-1.0)
            grad_w = torch.addcmul(-g.mean(dim=1, keepdim=True) * rm, t, rm).view_as(grad)
        if ctx.needs_input_grad[1]:
            grad_m = dot.view(ctx.mult_shape)  # mult is passed as (out, 1, 1, 1)
        return grad_w, grad_m, None


class ScaledStdConv2d(Conv2d):
    """Conv2d with Scaled Weight Standardization (Brock et al. 2021, NF-ResNets).

        W_hat = g * (W - mean(W)) / sqrt(max(N * var(W), 1e-4))

    mean and biased variance over the fan-in axes of each output channel,
    N = fan-in, g a learnable per-channel gain (init 1); bias init 0. Written
    with plain mean ops (no ``std_mean``) so it exports with ``torch.export``
    and ONNX. In training the gain and any folded scales enter as one
    per-channel multiplier of a fused standardization with a hand-written
    backward; without autograd the result is cached (see :class:`Conv2d`).
    """

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
        c, r, _ = _standardize(self.weight.reshape(self.out_channels, -1), self.eps)
        return (c * r).view_as(self.weight)

    def effective_weight(self) -> torch.Tensor:
        return self.folded_weight_bias()[0]

    def _cache_tensors(self) -> tuple:
        return (self.weight, self.bias, self.gain)

    def folded_weight_bias(self, in_scale: Scale = None, out_scale: Scale = None,
                           add_bias: Optional[torch.Tensor] = None):
        o = _as_factor(out_scale)
        m = _as_factor((self.gain, in_scale, o))
        b = self.bias
        if o is not None and b is not None:
            b = b * (o.reshape(-1) if isinstance(o, torch.Tensor) else o)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and (
                self.weight.requires_grad or m.requires_grad):
            w = _ScaledStdWeight.apply(self.weight, m.expand(self.out_channels, 1, 1, 1), self.eps)
        else:
            c, r, _ = _standardize(self.weight.reshape(self.out_channels, -1), self.eps)
            w = (c * (r * m.reshape(-1, 1))).view_as(self.weight)
        return w, _add_bias(b, add_bias, self.out_channels)


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
    """A named activation as a module (``relu``, ``gelu``, ...)."""

    def __init__(self, name: str = "relu"):
        super().__init__()
        self.name = name
        self.fn = get_activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with prob. p,
    rescaling the kept ones by 1/(1-p) (Huang et al. 2016)."""
    if p <= 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)
