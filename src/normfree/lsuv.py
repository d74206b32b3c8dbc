"""Layer-sequential unit-variance initialization (LSUV; Mishkin & Matas 2016,
"All you need is a good init"), for any ``nn.Module``.

:func:`lsuv_init` takes a model and one batch of data and, as the authors'
``tools/extra/lsuv_init.py`` (ducha-aiki/LSUVinit) does:

1. orthonormal init: every convolution / linear layer gets an orthonormal
   weight matrix (Saxe et al. 2014; rows or columns of the (out, fan_in)
   matrix orthonormal) and a zero bias;
2. layer by layer, in the order the forward pass calls them: run the batch up
   to the layer, take the variance v of its output (over all elements, as
   ``np.var`` of the output blob there) and divide the weight by sqrt(v),
   until |v - 1| < ``tol`` or ``max_iter`` rescalings.

Each forward pass stops right after the layer being initialized (the
original's ``forward(end=k)``). The layer's output scale is what is rescaled:
its ``weight``, or for layers that normalize their weight (Scaled WS,
(centered) weight normalization, ``torch.nn.utils.parametrizations.weight_norm``)
their gain g, since dividing a normalized weight's direction changes nothing.
normfree's residual blocks are run on their reference path
(:func:`normfree.unfolded`), so every layer's own output is observed.

Departures from the authors' code, on purpose: the tolerance is on the
variance (the paper's Tol_var = 0.1; their Caffe script uses 0.02, their
PyTorch port 0.1 on the standard deviation), at most 10 rescalings (the paper;
the script allows 20); ``orthonormal=False`` keeps the model's weights and
only rescales them (so a method's own initialization shape survives); layers
whose output is constant (variance 0, e.g. a zero-initialized layer with
``orthonormal=False``) are left alone and reported. The PyTorch port's bias
shift towards a target mean is not done (the paper and the Caffe script do
not shift biases).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .blocks import unfolded

__all__ = ["LSUVLayer", "lsuv_init", "lsuv_layers", "output_variance"]

TOL = 0.1  # |Var - 1| below which a layer is done (Mishkin & Matas 2016, Tol_var)
MAX_ITER = 10  # rescalings per layer (the paper's T_max)


@dataclass
class LSUVLayer:
    """What :func:`lsuv_init` did to one layer.

    name: the layer's qualified name; var_start: its output variance after the
    orthonormal step (before any rescaling); var: after the last rescaling;
    scale: the product of the factors applied to its weight (or gain);
    iterations: rescalings done; converged: |var - 1| < tol.
    """

    name: str
    var_start: float
    var: float
    scale: float
    iterations: int
    converged: bool


class _Stop(Exception):
    """Raised by the hook to end a forward pass after the layer being measured."""


def lsuv_layers(model: nn.Module, x: torch.Tensor) -> List[nn.Module]:
    """The convolution and linear layers of ``model`` in the order a forward pass
    on ``x`` first calls them (layers the forward pass does not use are left out)."""
    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    order: List[nn.Module] = []
    seen = set()

    def hook(m, _inp, _out):
        if id(m) not in seen:
            seen.add(id(m))
            order.append(m)

    candidates = [m for m in model.modules() if isinstance(m, kinds)]
    handles = [m.register_forward_hook(hook) for m in candidates]
    try:
        with _quiet(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


@contextlib.contextmanager
def _quiet(model: nn.Module):
    """No grad, eval mode (dropout off; flags restored) and normfree blocks on their reference path."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), unfolded(model):
            yield
    finally:
        for m, f in flags:
            m.training = f


def _scale_parameter(layer: nn.Module) -> nn.Parameter:
    """The parameter whose scaling scales the layer's output (before its bias):
    a weight-norm gain g where the weight is normalized, else the weight."""
    param = getattr(layer, "parametrizations", None)
    if param is not None and "weight" in param:  # torch.nn.utils.parametrizations.weight_norm: original0 = g
        return param.weight.original0
    gain = getattr(layer, "gain", None)
    if isinstance(gain, nn.Parameter) and gain.dim() == layer.weight.dim() and gain.shape[0] == layer.weight.shape[0]:
        return gain  # normfree's ScaledStdConv2d / WeightNormConv2d
    return layer.weight


def _orthonormal_(layer: nn.Module) -> None:
    """Orthonormal weight (its direction, for normalized weights, with g = 1), zero bias."""
    param = getattr(layer, "parametrizations", None)
    if param is not None and "weight" in param:
        nn.init.orthogonal_(param.weight.original1)
        nn.init.ones_(param.weight.original0)
    else:
        nn.init.orthogonal_(layer.weight)
        scale = _scale_parameter(layer)
        if scale is not layer.weight:
            nn.init.ones_(scale)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


def output_variance(model: nn.Module, x: torch.Tensor, layer: nn.Module) -> float:
    """Variance over all elements of ``layer``'s output when ``model`` runs on ``x``
    (population variance, float64; the forward pass stops after the layer)."""
    got = {}

    def hook(_m, _inp, out):
        t = out.detach().double()
        got["var"] = float(t.var(correction=0)) if t.numel() > 1 else 0.0
        raise _Stop

    h = layer.register_forward_hook(hook)
    try:
        with _quiet(model):
            model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if "var" not in got:
        raise ValueError(f"the layer {layer!r} was not called by the model's forward pass")
    return got["var"]


def lsuv_init(model: nn.Module, x: torch.Tensor, *, tol: float = TOL, max_iter: int = MAX_ITER,
              orthonormal: bool = True, layers: Optional[Sequence[nn.Module]] = None) -> List[LSUVLayer]:
    """Initialize ``model`` in place by LSUV on the batch ``x`` (see the module
    docstring); returns one :class:`LSUVLayer` record per layer, in order.

    Args:
        model: any ``nn.Module`` whose forward takes ``x``.
        x: one batch of the training data (the authors advise a large one);
           the variance of every layer's output on it becomes 1 within ``tol``.
        tol: stop rescaling a layer once |Var - 1| < tol.
        max_iter: at most this many rescalings per layer.
        orthonormal: first give every layer an orthonormal weight and a zero
           bias (the paper's step 1); False keeps the weights and only rescales.
        layers: the layers to initialize, in order (default: every conv and
           linear layer, in the order the forward pass calls them).

    The model's train/eval flags are restored; it is run under ``no_grad``
    in eval mode (dropout off, BatchNorm with its running statistics). Run it
    once before training, on the same device as the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a batch of at least 2 samples (a tensor), got {shape}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or Inf values: LSUV needs finite data")
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and 0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    if not (isinstance(max_iter, int) and not isinstance(max_iter, bool) and 1 <= max_iter <= 1000):
        raise ValueError(f"max_iter must be an integer from 1 to 1000, got {max_iter!r}")
    names = {m: n for n, m in model.named_modules()}
    if layers is None:
        layers = lsuv_layers(model, x)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no convolution or linear layer that its forward pass "
                             f"calls: nothing for LSUV to initialize")
    else:
        layers = list(layers)
        for i, m in enumerate(layers):
            if m not in names or not hasattr(m, "weight"):
                raise ValueError(f"layers[{i}] ({type(m).__name__}) is not a layer with a weight in this "
                                 f"{type(model).__name__}")
    if orthonormal:
        with torch.no_grad():
            for m in layers:
                _orthonormal_(m)
    records = []
    for m in layers:
        p = _scale_parameter(m)
        var = var_start = output_variance(model, x, m)
        scale, it = 1.0, 0
        while math.isfinite(var) and var > 0 and abs(var - 1.0) >= tol and it < max_iter:
            factor = 1.0 / math.sqrt(var)
            with torch.no_grad():
                p.mul_(factor)
            scale *= factor
            it += 1
            var = output_variance(model, x, m)
        records.append(LSUVLayer(name=names[m], var_start=var_start, var=var, scale=scale, iterations=it,
                                 converged=math.isfinite(var) and abs(var - 1.0) < tol))
    return records
