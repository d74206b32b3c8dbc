"""The modules that :func:`normfree.convert` puts into someone else's network.

* :class:`ConvertedBlock` -- a torchvision / timm ResNet block, holding its
  original submodules under their original names, computed as

      y = post( skip + s * f(h) ),   h = pre(x) * c

  with ``f`` the block's own layers in their forward order (normalization
  removed or replaced), ``s`` the branch scale (SkipInit gain, NF's alpha x
  gain) and, for NF, ``c = gamma / beta`` and every mid activation multiplied
  by gamma (Brock et al. 2021; DeepMind's ``nfnets/nf_resnet.py``,
  ``NFResBlock.__call__``).
* :class:`SkipGain` -- ``y = x + g * (M(x) - x)`` for any module ``M`` whose
  forward is ``x + f(x)`` (a transformer block, a residual block you wrote),
  ``g`` a learnable scalar initialized to 0: SkipInit (De & Smith 2020) /
  ReZero (Bachlechner et al. 2020) without touching ``M``'s code.
* :class:`BranchGain` -- ``y = g * M(...)``: the same gain placed at the end of
  a residual branch (e.g. a transformer block's attention or MLP).
* :class:`GroupNormAct` -- GroupNorm + the activation of a replaced norm+act
  layer (timm's ``BatchNormAct2d``), with timm's ``GroupNormAct`` layout.

Each exposes ``branch_out`` (an ``nn.Identity`` that sees f(x) before any
gain) and ``branch_scale()``, which :func:`normfree.measure_signal` uses.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .layers import Conv2d, ScalarGain, activation_gamma

__all__ = ["ConvertedBlock", "SkipGain", "BranchGain", "GroupNormAct", "module_gamma", "converted_blocks",
           "converted_branch", "converted_branch_scale", "predict_converted_variance"]


# --------------------------------------------------------------------------
# activation gammas of activation modules
# --------------------------------------------------------------------------
_ACT_NAMES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


def _act_name(m: nn.Module) -> Optional[str]:
    if type(m) in _ACT_NAMES:
        return _ACT_NAMES[type(m)]
    if type(m) is nn.GELU and m.approximate == "none":
        return "gelu"
    if type(m) is nn.ELU and m.alpha == 1.0:
        return "elu"
    return None


def module_gamma(m: nn.Module) -> float:
    """NF's gamma for an activation module: gamma * m(z), z ~ N(0, 1), has unit variance.

    Registered activations (``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``, ...) use
    :func:`normfree.activation_gamma` by name; any other module (timm's own
    activations, a norm+act layer reduced to its activation) is integrated
    numerically the same way, on a copy in eval mode (never in place).
    """
    name = _act_name(m)
    if name is not None:
        return activation_gamma(name)
    fn = copy.deepcopy(m).eval()
    for sub in fn.modules():
        if isinstance(getattr(sub, "inplace", None), bool):
            sub.inplace = False
    with torch.no_grad():
        return activation_gamma(fn)


# --------------------------------------------------------------------------
# the converted residual block
# --------------------------------------------------------------------------
def _call(m: nn.Module, r: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """m(scale * r), the scale folded into the weight of a normfree convolution."""
    if scale is None:
        return m(r)
    if isinstance(m, Conv2d):
        return m(r, in_scale=scale)
    return m(r * scale)


class ConvertedBlock(nn.Module):
    """A foreign residual block computed the normfree way (see the module docstring).

    Args:
        children: the block's submodules by their original names (so state_dict
            keys stay ``layer1.0.conv1.weight``); ``downsample`` may be None.
        structure: the name of the recognized structure (for ``repr``).
        method: the normfree method it was converted to.
        order: names of the residual branch's modules in forward order.
        pre: name of the pre-activation applied to x (ResNet-V2, NF) or None.
        post: name of the activation applied after the addition (ResNet-V1) or None.
        shortcut_preact: the projection shortcut takes the pre-activated input.
        scales: {name: c}, multiply that module's output by c (NF: gamma after
            activations, 2 after squeeze-excite).
        pre_scale: multiplier of the pre-activation (NF: gamma / beta).
        gain_init: initial value of the learnable branch gain, or None for none.
        alpha: NF's alpha (a constant branch multiplier) or None.
        expected_var: NF's analytically tracked Var(x) of the block input.
    """

    def __init__(self, children: Dict[str, Optional[nn.Module]], *, structure: str, method: str,
                 order: Sequence[str], pre: Optional[str] = None, post: Optional[str] = None,
                 shortcut_preact: bool = False, scales: Optional[Dict[str, float]] = None,
                 pre_scale: Optional[float] = None, gain_init: Optional[float] = None,
                 alpha: Optional[float] = None, expected_var: Optional[float] = None):
        super().__init__()
        for name, child in children.items():
            if child is not None:
                self.add_module(name, child)
        if self._modules.get("downsample") is None:
            self.downsample = None
        for name in list(order) + [n for n in (pre, post) if n is not None]:
            if name not in self._modules:
                raise ValueError(f"ConvertedBlock: no submodule {name!r} among {list(self._modules)}")
        self.structure, self.method = structure, method
        self.order = tuple(order)
        self.pre, self.post = pre, post
        self.shortcut_preact = shortcut_preact
        self.scales = dict(scales or {})
        self.pre_scale = pre_scale
        self.alpha = alpha
        self.expected_var = expected_var
        self.beta = math.sqrt(expected_var) if expected_var is not None else None
        self.branch_out = nn.Identity()
        self.gain = ScalarGain(gain_init) if gain_init is not None else None

    @property
    def expected_var_out(self) -> Optional[float]:
        """NF: the tracked Var of the output, Var_in + alpha^2, or 1 + alpha^2 after a
        projection shortcut of the unit-variance pre-activated input (DeepMind's reset)."""
        if self.expected_var is None:
            return None
        base = 1.0 if self.downsample is not None and self.shortcut_preact else self.expected_var
        return base + self.alpha ** 2

    def branch_scale(self):
        """s: the product of NF's alpha and the learnable gain (None when there is neither)."""
        s = self.alpha
        if self.gain is not None:
            s = self.gain.gain if s is None else self.gain.gain * s
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.pre is None else self._modules[self.pre](x)  # pre-activation
        c = self.pre_scale                                          # NF: gamma / beta, pending on h
        if self.downsample is None:
            skip = x
        elif self.shortcut_preact:
            skip = self.downsample(h if c is None else h * c)
        else:
            skip = self.downsample(x)
        r = h
        for name in self.order:                                     # f: the block's own layers
            r = _call(self._modules[name], r, c)
            c = self.scales.get(name)                               # NF: gamma after an activation
        if c is not None:
            r = r * c
        r = self.branch_out(r)                                      # f(x), before any gain
        s = self.branch_scale()
        y = skip + (r if s is None else r * s)
        return y if self.post is None else self._modules[self.post](y)

    def extra_repr(self) -> str:
        parts = [f"structure={self.structure}", f"method={self.method}"]
        if self.beta is not None:
            parts.append(f"beta={self.beta:.4f}")
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha:g}")
        return ", ".join(parts)


# --------------------------------------------------------------------------
# gains for any residual module
# --------------------------------------------------------------------------
class SkipGain(nn.Module):
    """A zero-initialized branch gain for a whole residual module.

        y = x + g * (M(x) - x),   g a learnable scalar (init ``init``, default 0)

    For any ``M`` whose forward is ``x + f(x)`` (output shaped like the input),
    this is ``x + g f(x)``: SkipInit (De & Smith 2020) / ReZero (Bachlechner et
    al. 2020) without editing ``M``. At ``g = 0`` the output is exactly ``x``.
    ``M(x) - x`` recovers f(x) up to float rounding of ``x + f(x)`` (relative
    ~1e-7 of |x|). For a post-norm transformer block, ``LN(x + f(x))``, remove
    the LayerNorms first (``normfree.convert(..., method="skipinit")`` does),
    so that the block is ``x + f(x)``. Extra positional / keyword arguments
    (masks) are passed to ``M``.
    """

    def __init__(self, module: nn.Module, init: float = 0.0):
        super().__init__()
        self.module = module
        self.branch_out = nn.Identity()
        self.gain = ScalarGain(init)
        self.shortcut = None  # the skip path is the input (for normfree.measure_signal)

    def branch_scale(self) -> torch.Tensor:
        return self.gain.gain

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.module(x, *args, **kwargs)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"SkipGain needs a module whose forward is x + f(x) (a tensor shaped like its input "
                             f"{tuple(x.shape)}); {type(self.module).__name__} returned {got}. For a block with a "
                             f"projection shortcut wrap its branch instead: BranchGain(last layer of the branch)")
        return x + self.gain(self.branch_out(y - x))


class BranchGain(nn.Module):
    """A zero-initialized gain at the end of a residual branch: ``y = g * M(...)``.

    Replace the last module of a residual branch with ``BranchGain(module)``
    (e.g. ``block.mlp = BranchGain(block.mlp)`` in ``x = x + self.mlp(x)``).
    When ``M`` returns a tuple (``nn.MultiheadAttention``), its first element
    is scaled and the rest passed through.
    """

    def __init__(self, module: nn.Module, init: float = 0.0):
        super().__init__()
        self.module = module
        self.branch_out = nn.Identity()
        self.gain = ScalarGain(init)

    def branch_scale(self) -> torch.Tensor:
        return self.gain.gain

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.gain(self.branch_out(out[0])),) + out[1:]
        return self.gain(self.branch_out(out))


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by ``drop`` and ``act`` (the replacement of a norm+act layer
    such as timm's ``BatchNormAct2d``; same parameter names as timm's ``GroupNormAct``)."""

    def __init__(self, num_groups: int, num_channels: int, act: nn.Module, drop: Optional[nn.Module] = None,
                 eps: float = 1e-5, affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


# --------------------------------------------------------------------------
# for normfree.signal: converted blocks, their branches and scales
# --------------------------------------------------------------------------
def converted_blocks(model: nn.Module) -> List[nn.Module]:
    """The outermost ConvertedBlock / SkipGain modules of ``model``, in module order."""
    found, inside = [], set()
    for m in model.modules():
        if id(m) not in inside and isinstance(m, (ConvertedBlock, SkipGain)):
            found.append(m)
            inside.update(id(c) for c in m.modules())
    return found


def _branch_gain_of(block: nn.Module) -> Optional[BranchGain]:
    if isinstance(block, BranchGain):
        return None
    gains = [m for m in block.modules() if isinstance(m, BranchGain)]
    return gains[0] if len(gains) == 1 else None


def converted_branch(block: nn.Module) -> Optional[nn.Module]:
    """The module whose output is f(x) before any gain: ``branch_out`` of a converted
    block, of a SkipGain, or of the one BranchGain inside a block; else None."""
    if isinstance(block, (ConvertedBlock, SkipGain)):
        return block.branch_out
    g = _branch_gain_of(block)
    return g.branch_out if g is not None else None


def converted_branch_scale(block: nn.Module):
    """The scalar multiplying f(x) in a converted block (None when there is none or unknown)."""
    if isinstance(block, (ConvertedBlock, SkipGain)):
        return block.branch_scale()
    g = _branch_gain_of(block)
    return g.branch_scale() if g is not None else None


def predict_converted_variance(model: nn.Module, v0: float = 1.0) -> List[float]:
    """Expected Var(x_l) after every block of a model converted with ``method="nf"``.

    As for the registry's NF models (Brock et al. 2021): with s = alpha * gain,
    v_l = v_skip + s^2, v_skip = v_{l-1}, or 1 after a projection shortcut of
    the pre-activated (unit-variance) input. Other methods keep the model's
    own convolution initialization, so no analytic prediction exists for them.
    """
    blocks = converted_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no blocks made by normfree.convert")
    not_nf = sorted({getattr(b, "method", type(b).__name__) for b in blocks
                     if not (isinstance(b, ConvertedBlock) and b.method == "nf")})
    if not_nf:
        raise ValueError(
            f"predict_variance has an analytic prediction only for models converted with method='nf', whose "
            f"Scaled WS convolutions and gammas make every layer's variance known; this model's blocks were "
            f"converted with {not_nf} and keep their own convolution initialization. Measure it instead: "
            f"normfree.measure_signal(model, x)")
    v = float(v0)
    out = []
    for b in blocks:
        s = b.branch_scale()
        s = float(s.detach()) if isinstance(s, torch.Tensor) else float(s)
        v_skip = 1.0 if (b.downsample is not None and b.shortcut_preact) else v
        v = v_skip + s * s
        out.append(v)
    return out
