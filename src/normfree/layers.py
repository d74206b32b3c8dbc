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
def _fold(w: torch.Tensor, b: Optional[torch.Tensor], in_scale: Scale, out_scale: Scale):
    """Fold ``in_scale`` (scalar) and ``out_scale`` (scalar or per-channel) into w, b."""
    s = None
    if in_scale is not None:
        s = in_scale
    if out_scale is not None:
        o = out_scale.reshape(-1, 1, 1, 1) if isinstance(out_scale, torch.Tensor) else out_scale
        s = o if s is None else s * o
        if b is not None:
            b = b * (out_scale.reshape(-1) if isinstance(out_scale, torch.Tensor) else out_scale)
    if s is not None:
        w = w * s
    return w, b


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward folds scalar multipliers into its weight.

    ``forward(x, in_scale=a, out_scale=b) == b * conv(a * x)``; with no scales it
    is exactly ``nn.Conv2d``. State-dict compatible with ``nn.Conv2d``.
    """

    def effective_weight(self) -> torch.Tensor:
        """The weight actually convolved (before any folded scale)."""
        return self.weight

    def forward(self, x: torch.Tensor, in_scale: Scale = None, out_scale: Scale = None) -> torch.Tensor:
        w, b = _fold(self.effective_weight(), self.bias, in_scale, out_scale)
        return self._conv_forward(x, w, b)


class ScaledStdConv2d(Conv2d):
    """Conv2d with Scaled Weight Standardization (Brock et al. 2021, NF-ResNets).

        W_hat = g * (W - mean(W)) / sqrt(max(N * var(W), 1e-4))

    mean and biased variance over the fan-in axes of each output channel,
    N = fan-in, g a learnable per-channel gain (init 1); bias init 0. Written
    with plain mean ops (no ``std_mean``) so it exports with ``torch.export``
    and ONNX.
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
        w = self.weight
        centered = w - w.mean(dim=(1, 2, 3), keepdim=True)
        var = (centered * centered).mean(dim=(1, 2, 3), keepdim=True)
        return centered * torch.rsqrt(torch.clamp(var * self.fan_in, min=self.eps))

    def effective_weight(self) -> torch.Tensor:
        return self.standardized_weight() * self.gain


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
