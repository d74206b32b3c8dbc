"""THE residual block: one pre-activation block (basic or bottleneck) whose
normalization, initialization and scaling come from a :class:`Scheme`.

    y = s_skip * skip(x) + s_branch * f(x)

* ``f`` is the branch: pre-activation, then m convolutions (m = 2 basic,
  3 bottleneck) with norm/act between them (He et al. 2016b, ResNet-V2).
* ``skip`` is the identity, or at a transition a 1x1 conv of the
  pre-activated input (or Fixup's average-pool + zero-channel padding).
* ``s_branch`` = NF alpha x RescaleNet b_l x learnable gain (SkipInit / Fixup
  multiplier); ``s_skip`` = RescaleNet a_l (else 1).
* NF-ResNets (Brock et al. 2021): the pre-activation is ``act(x) * gamma / beta``
  with ``beta = sqrt(expected Var(x))`` and every mid activation is
  multiplied by gamma.

With ``fold=True`` (default) every scalar multiplier is folded into the
adjacent convolution's weight (exact, since convolutions are linear), so no
extra pass over activation maps is spent on them. With ``fold=False`` the
block computes the same thing step by step and passes the unscaled branch
output f(x) through ``self.branch_out`` (an ``nn.Identity``): hook it to
observe f(x) before any gain. :func:`unfolded` switches a whole model.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Activation, Conv2d, ScalarBias, ScalarGain, ScaledStdConv2d, activation_gamma, drop_path
from .schemes import Scheme


def norm_layer(kind: str, channels: int) -> nn.Module:
    """A normalization layer of ``kind`` ("bn", "gn", "ln", "in") over ``channels``."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        groups = math.gcd(32, channels)
        return nn.GroupNorm(groups, channels)
    if kind == "ln":
        return nn.GroupNorm(1, channels)
    if kind == "in":
        return nn.GroupNorm(channels, channels)
    raise ValueError(f"unknown norm {kind!r}")


def norm_act(scheme: Scheme, channels: int) -> nn.Sequential:
    """The pre-activation unit of ``scheme``: [bias] norm/act in order [bias].

    Fixup puts a scalar bias before each activation and each convolution.
    NF's gamma and 1/beta are not here: the block folds them into the next conv.
    """
    layers = []
    if scheme.fixup:
        layers.append(ScalarBias())
    act = Activation(scheme.act)
    if scheme.norm is None:
        layers.append(act)
    elif scheme.order == "norm_act":
        layers += [norm_layer(scheme.norm, channels), act]
    else:
        layers += [act, norm_layer(scheme.norm, channels)]
    if scheme.fixup:
        layers.append(ScalarBias())
    return nn.Sequential(*layers)


def make_conv(scheme: Scheme, cin: int, cout: int, kernel: int, stride: int = 1) -> Conv2d:
    """A conv of the scheme's kind: ScaledStdConv2d ("ws") or He-initialized Conv2d."""
    pad = kernel // 2
    if scheme.conv == "ws":
        conv = ScaledStdConv2d(cin, cout, kernel, stride=stride, padding=pad, bias=scheme.conv_bias)
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear")
        return conv
    conv = Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=scheme.conv_bias)
    # NF-He: gamma already makes the activation unit-variance -> gain 1.
    # Otherwise He et al. 2015 (fan-in) for the activation in use.
    if scheme.nf_alpha is not None or scheme.act not in ("relu", "tanh", "sigmoid"):
        nonlinearity = "linear"
    else:
        nonlinearity = scheme.act
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity=nonlinearity)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class PoolPadShortcut(nn.Module):
    """Fixup's CIFAR shortcut: subsample by ``stride``, zero-pad new channels."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cout < cin:
            raise ValueError(f"pool_pad shortcut cannot reduce channels ({cin} -> {cout})")
        self.pad = cout - cin
        self.pool = nn.AvgPool2d(1, stride=stride) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.pool, nn.AvgPool2d):  # a 1x1 average pool is exactly a strided slice (4x faster)
            s = self.pool.stride
            x = x[:, :, ::s, ::s]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x


class ResidualBlock(nn.Module):
    """One pre-activation residual block configured by a :class:`Scheme`.

    Args:
        cin, cout: input / output channels.
        stride: stride of the block (on the 3x3 conv and the shortcut).
        scheme: the method (see :mod:`normfree.schemes`).
        bottleneck: 1x1-3x3-1x1 bottleneck (expansion 4) instead of 3x3-3x3.
        index: 1-based position l of the block in the network.
        num_blocks: L, the number of residual blocks in the network.
        expected_var: NF only, the analytically tracked Var(x) of the input.
        drop_path: stochastic-depth probability of this block.
    """

    def __init__(self, cin: int, cout: int, stride: int, scheme: Scheme, *, bottleneck: bool = False,
                 index: int = 1, num_blocks: int = 1, expected_var: float = 1.0, drop_path: float = 0.0):
        super().__init__()
        self.scheme_name = scheme.name
        self.index = index
        self.drop_path = drop_path
        self.fold = True
        mid = cout // 4 if bottleneck else cout
        if bottleneck:
            shapes = [(cin, mid, 1, 1), (mid, mid, 3, stride), (mid, cout, 1, 1)]
        else:
            shapes = [(cin, cout, 3, stride), (cout, cout, 3, 1)]

        self.pre = norm_act(scheme, cin)
        self.convs = nn.ModuleList(make_conv(scheme, *s) for s in shapes)
        self.mids = nn.ModuleList(norm_act(scheme, s[1]) for s in shapes[:-1])
        self.branch_out = nn.Identity()

        needs_projection = stride != 1 or cin != cout
        self.shortcut: Optional[nn.Module] = None
        self.shortcut_uses_preact = False
        if needs_projection:
            if scheme.shortcut == "pool_pad":
                self.shortcut = PoolPadShortcut(cin, cout, stride)
            else:
                self.shortcut = make_conv(scheme, cin, cout, 1, stride)
                self.shortcut_uses_preact = True

        # --- scalar multipliers (all folded into convs when self.fold) ---
        gamma = activation_gamma(scheme.act) if scheme.nf_alpha is not None else None
        self.expected_var = expected_var if scheme.nf_alpha is not None else None
        self.beta = math.sqrt(expected_var) if scheme.nf_alpha is not None else None
        self.in_scale: Optional[float] = gamma / self.beta if gamma is not None else None
        self.mid_scale: Optional[float] = gamma
        const = 1.0
        self.skip_scale: Optional[float] = None
        if scheme.nf_alpha is not None:
            const *= scheme.nf_alpha
        if scheme.rescale:
            b2 = 1.0 / (index + num_blocks)
            const *= math.sqrt(b2)
            self.skip_scale = math.sqrt(1.0 - b2)
        self.branch_const: Optional[float] = None if const == 1.0 else const
        g0 = scheme.initial_gain(num_blocks)
        if scheme.fixup:
            g0 = 1.0
        self.gain = ScalarGain(g0) if g0 is not None else None
        self.out_bias = ScalarBias() if scheme.fixup else None

        if scheme.fixup:  # Fixup rule 2 and rule 1 (last layer zero)
            m = len(self.convs)
            factor = num_blocks ** (-1.0 / (2 * m - 2))
            with torch.no_grad():
                for conv in self.convs[:-1]:
                    conv.weight.mul_(factor)
                nn.init.zeros_(self.convs[-1].weight)

    @property
    def expected_var_out(self) -> Optional[float]:
        """NF: the tracked Var of the output, Var_in + alpha^2 (1 + alpha^2 at transitions)."""
        if self.expected_var is None:
            return None
        alpha = self.branch_const
        base = 1.0 if self.shortcut_uses_preact else self.expected_var
        return base + alpha ** 2

    def branch_scale(self):
        """s_branch: the product of the branch's constant and learnable scalars (or None)."""
        s = self.branch_const
        if self.gain is not None:
            s = self.gain.gain if s is None else self.gain.gain * s
        return s

    def _out_scales(self):
        # branch_scale() as separate factors, so that the conv's weight cache
        # (see normfree.layers.Conv2d) sees the same gain tensor on every call
        if self.gain is None:
            return self.branch_const
        if self.branch_const is None:
            return self.gain.gain
        return (self.gain.gain, self.branch_const)

    def _unit(self, unit: nn.Sequential, x: torch.Tensor, fold: bool, lead_folded: bool = False):
        """(unit(x), None), or, when folding a trailing Fixup scalar bias into the
        next conv (``conv(.., in_bias=b)``), (unit(x) without it, b). With
        ``lead_folded`` the unit's leading scalar bias was already added by the
        previous conv (as its ``add_bias``) and is skipped here."""
        layers = list(unit)[1:] if lead_folded else list(unit)
        if fold and len(layers) > 1 and isinstance(layers[-1], ScalarBias):
            for m in layers[:-1]:
                x = m(x)
            return x, layers[-1].bias
        for m in layers:
            x = m(x)
        return x, None

    def _lead_bias(self, i: int, fold: bool) -> Optional[torch.Tensor]:
        """Fixup's scalar bias at the start of mid unit ``i`` (before its activation),
        which conv ``i`` adds as its ``add_bias`` when folding (exact: it follows the conv)."""
        if fold and i < len(self.mids) and isinstance(self.mids[i][0], ScalarBias):
            return self.mids[i][0].bias
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fold = self.fold
        out, b_in = self._unit(self.pre, x, fold)
        s_in = self.in_scale
        if s_in is not None and not fold:
            out = out * s_in
            s_in = None
        if self.shortcut is None:
            skip = x
        elif self.shortcut_uses_preact:
            skip = self.shortcut(out, in_scale=s_in, in_bias=b_in)
        else:
            skip = self.shortcut(x)

        r, lead = out, None
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            if i > 0:
                r, b_in = self._unit(self.mids[i - 1], r, fold, lead_folded=lead is not None)
                s_in = self.mid_scale
                if s_in is not None and not fold:
                    r = r * s_in
                    s_in = None
            if i == last and fold:  # Fixup's bias after the branch goes into the conv bias
                out_bias = self.out_bias.bias if self.out_bias is not None else None
                r = conv(r, in_scale=s_in, out_scale=self._out_scales(), add_bias=out_bias, in_bias=b_in)
            else:  # Fixup's bias before the next activation goes into this conv's bias
                lead = self._lead_bias(i, fold)
                r = conv(r, in_scale=s_in, add_bias=lead, in_bias=b_in)
        if not fold:
            r = self.branch_out(r)
            s = self.branch_scale()
            if s is not None:
                r = r * s
        if self.out_bias is not None and not fold:
            r = self.out_bias(r)
        r = drop_path(r, self.drop_path, self.training)
        if self.skip_scale is not None:
            return torch.add(r, skip, alpha=self.skip_scale)
        return skip + r

    def extra_repr(self) -> str:
        parts = [f"scheme={self.scheme_name}", f"index={self.index}"]
        if self.beta is not None:
            parts.append(f"beta={self.beta:.4f}")
        if self.branch_const is not None:
            parts.append(f"branch_const={self.branch_const:.4g}")
        if self.skip_scale is not None:
            parts.append(f"skip_scale={self.skip_scale:.4g}")
        return ", ".join(parts)


@contextlib.contextmanager
def unfolded(model: nn.Module):
    """Temporarily compute every :class:`ResidualBlock` of ``model`` step by step
    (no scalar folding), so hooks on ``block.branch_out`` see f(x) before any gain."""
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    saved = [b.fold for b in blocks]
    try:
        for b in blocks:
            b.fold = False
        yield model
    finally:
        for b, f in zip(blocks, saved):
            b.fold = f
