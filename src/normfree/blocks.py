"""THE residual block: one pre-activation block (basic or bottleneck) whose
normalization, initialization and scaling come from a :class:`Scheme`.

    h    = pre(x) * in_scale                      pre-activation
    skip = x, or shortcut(h), or pool_pad(x)      skip path
    f    = branch(h)                              the residual branch
    y    = s_skip * skip + s_branch * f  [+ b]    (b: Fixup's bias after the branch)

* ``pre`` is the activation (with its norm for bn/gn/ln/in); ``branch`` is m
  convolutions (m = 2 basic, 3 bottleneck, 4 NFNet) with norm/act between them
  (He et al. 2016b, ResNet-V2), and in NFNets / NF-RegNets a squeeze-excite
  (:class:`Layout` says which: ``LAYOUTS``).
* ``skip`` is the identity, or at a transition a 1x1 conv of the
  pre-activated input (NFNets: after a 2x2 average pool at stride 2), or
  Fixup's average-pool + zero-channel padding.
* ``s_branch`` = NF alpha x RescaleNet b_l x Balduzzi alpha x Szegedy beta x
  Hanin b^l x learnable gain (SkipInit, NF, Fixup multiplier, RescaleNet);
  ``s_skip`` = RescaleNet a_l x Balduzzi alpha (else 1).
* NF-ResNets (Brock et al. 2021): ``in_scale = gamma / beta`` with
  ``beta = sqrt(expected Var(x))``, and every mid activation is multiplied by
  gamma (``mid_scale``).

:meth:`ResidualBlock.forward` reads as these four lines when
``block.fold_scalars`` is False (the reference path). With it True (the
default) the same result is computed with every scalar folded into the
adjacent convolution's weight, which is exact since convolutions are linear;
:func:`unfolded` switches a whole model to the reference path.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (Activation, Conv2d, ScalarBias, ScalarGain, ScaledStdConv2d, WeightNormConv2d,
                     activation_gamma, activation_he_gain, drop_path)
from .schemes import Scheme
from .squeeze_excite import SqueezeExcite

MAX_GROUPS = 32  # Wu & He (2018)'s default number of groups


def group_count(channels: int) -> int:
    """GroupNorm's number of groups G for ``channels`` C: the largest divisor of C
    that is at most 32 (Wu & He 2018's default G) and leaves at least 2 channels
    per group. So ``gn`` never degenerates to InstanceNorm (G = C, ``in``), and
    it is Wu & He's G = 32 wherever C is a multiple of 32 of at least 64 (every
    layer of a ResNet-50; a WRN from width 4). Examples: C = 16 -> 8, 32 -> 16,
    48 -> 24, 64 -> 32; C = 2, 3 or prime -> 1 (= ``ln``); C = 1 -> 1 (one
    channel: every norm is the same)."""
    for g in range(min(MAX_GROUPS, channels // 2), 1, -1):
        if channels % g == 0:
            return g
    return 1


def norm_layer(kind: str, channels: int) -> nn.Module:
    """A normalization layer of ``kind`` ("bn", "gn", "ln", "in") over ``channels``."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(group_count(channels), channels)
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


def make_conv(scheme: Scheme, cin: int, cout: int, kernel: int, stride: int = 1, *, groups: int = 1,
              input_act: Optional[str] = None) -> Conv2d:
    """A conv of the scheme's kind, initialized for the activation that feeds it.

    "ws": :class:`ScaledStdConv2d`, W ~ N(0, 1 / fan_in) (standardization makes the
    scale irrelevant; DeepMind's WSConv2D draws the same). "plain": He et al. (2015)
    fan-in init, W ~ N(0, gain^2 / fan_in) with gain = 1 / sqrt(E[act(z)^2]), z ~ N(0, 1)
    (:func:`~normfree.layers.activation_he_gain`: sqrt(2) for ReLU, ~1.53 for GELU) for
    ``input_act`` (default: the scheme's activation; ``"identity"`` for a linear input
    such as the stem's). NF's plain convs (``nf_he``) get gain 1: NF's gamma already
    makes the activation unit-variance. Biases start at 0. ``groups``: a grouped
    convolution (fan-in = kernel area x cin / groups).

    "wn" / "cwn": :class:`WeightNormConv2d`, direction v ~ N(0, 1 / fan_in) and gain
    g = the He gain above, so that ``||W_hat|| = g`` is what a He-initialized row has
    in expectation. With ``init="arpit"`` (Arpit et al. 2019; victorcampos7/weightnorm-init
    src/models/init.py, ``orthogonal_`` then ``proposed_weight_norm_g_init``): v orthogonal
    and g = sqrt(G^2 cin / cout), G the He gain (the block scales its last conv's g by
    sqrt(1/L)).
    """
    pad = kernel // 2
    if scheme.conv == "ws":
        conv = ScaledStdConv2d(cin, cout, kernel, stride=stride, padding=pad, groups=groups, bias=scheme.conv_bias)
        if not conv.weight.is_meta:  # (on the meta device there is nothing to draw)
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear")
        return conv
    act = "identity" if scheme.nf_alpha is not None else (input_act or scheme.act)
    if scheme.conv in ("wn", "cwn"):
        conv = WeightNormConv2d(cin, cout, kernel, stride=stride, padding=pad, groups=groups,
                                bias=scheme.conv_bias, center=scheme.conv == "cwn")
        g = activation_he_gain(act)
        if scheme.init == "arpit":
            nn.init.orthogonal_(conv.weight)
            g *= math.sqrt(cin / cout)
        else:
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear")
        nn.init.constant_(conv.gain, g)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        return conv
    conv = Conv2d(cin, cout, kernel, stride=stride, padding=pad, groups=groups, bias=scheme.conv_bias)
    fan_in = conv.weight[0].numel()
    nn.init.normal_(conv.weight, 0.0, activation_he_gain(act) / math.sqrt(fan_in))
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


@dataclass(frozen=True)
class Layout:
    """The shape of a residual branch (what timm's ``NfCfg`` holds for its one
    ``NormFreeBlock``): ``LAYOUTS[name]`` for ``Arch.block``.

    kernels:       each convolution's kernel size, in order; the block's stride
                   goes on the first one larger than 1.
    expansion:     the mid channels (between the convs) are int(expansion x
                   ``expand_from`` channels): 0.25 of the output in a ResNet
                   bottleneck, 0.5 in NFNets, 2.25 of the input in NF-RegNets.
    expand_from:   "out" or "in".
    first_expansion: the network's first block uses this expansion instead
                   (NF-RegNet: 1, following EfficientNet); None: the same.
    group_width:   channels per group of the convs with kernel > 1; the mid
                   channels are rounded down to a multiple of it (kept as they
                   are, one group, when fewer; DeepMind's code would build 0 groups).
    se_ratio:      squeeze-excite with hidden = max(1, int(C x se_ratio)) units on
                   the output of conv ``se_after`` (None: no squeeze-excite).
    se_after:      which conv's output the squeeze-excite gates (-1: the last one,
                   NFNet; 1: the grouped 3x3 of NF-RegNet).
    pool_shortcut: at a stride-2 transition the 1x1 shortcut conv (stride 1) sees
                   the 2x2 average pool of the pre-activated input (NFNet,
                   NF-RegNet) instead of striding itself (ResNet).
    """

    kernels: Tuple[int, ...]
    expansion: float = 1.0
    expand_from: str = "out"
    first_expansion: Optional[float] = None
    group_width: Optional[int] = None
    se_ratio: Optional[float] = None
    se_after: int = -1
    pool_shortcut: bool = False

    def mid_channels(self, cin: int, cout: int, first: bool = False) -> Tuple[int, int]:
        """(mid channels, groups of the convs with kernel > 1) of a block cin -> cout."""
        e = self.first_expansion if first and self.first_expansion is not None else self.expansion
        mid = max(1, int((cout if self.expand_from == "out" else cin) * e))
        groups = 1
        if self.group_width is not None and mid >= self.group_width:
            groups = mid // self.group_width
            mid = groups * self.group_width
        return mid, groups


#: the branch layouts, by name (``Arch.block``)
LAYOUTS = {
    # 3x3 -> 3x3 (He et al. 2016b)
    "basic": Layout((3, 3)),
    # 1x1 -> 3x3 (stride) -> 1x1, mid = out / 4 (He et al. 2016b)
    "bottleneck": Layout((1, 3, 1), expansion=0.25),
    # 1x1 -> grouped 3x3 (stride) -> grouped 3x3 -> 1x1 -> SE x2, mid = out / 2 in groups of 128:
    # deepmind-research nfnets/nfnet.py (NFBlock, use_two_convs=True, big_width=True)
    "nfnet": Layout((1, 3, 3, 1), expansion=0.5, group_width=128, se_ratio=0.5, se_after=-1, pool_shortcut=True),
    # 1x1 (2.25 x in; 1 x in in the first block) -> grouped 3x3 (stride, groups of 8) -> SE x2 -> 1x1:
    # deepmind-research nfnets/nf_regnet.py (NFBlock)
    "nf_regnet": Layout((1, 3, 1), expansion=2.25, expand_from="in", first_expansion=1.0, group_width=8,
                        se_ratio=0.5, se_after=1, pool_shortcut=True),
}


class ResidualBlock(nn.Module):
    """One pre-activation residual block configured by a :class:`Scheme`.

    Args:
        cin, cout: input / output channels.
        stride: stride of the block (on the 3x3 conv and the shortcut).
        scheme: the method (see :mod:`normfree.schemes`).
        bottleneck: 1x1-3x3-1x1 bottleneck (expansion 4) instead of 3x3-3x3.
        layout: the branch's :class:`Layout` (default: ``LAYOUTS["bottleneck"]``
            or ``LAYOUTS["basic"]`` by ``bottleneck``); NFNet's and NF-RegNet's
            add grouped convs, a squeeze-excite and the average-pool shortcut.
        index: 1-based position l of the block in the network.
        num_blocks: L, the number of residual blocks in the network.
        expected_var: NF only, the analytically tracked Var(x) of the input.
        drop_path: stochastic-depth probability of this block.

    Public parts (what :mod:`normfree.signal` and :mod:`normfree.fold` use):

    * :meth:`preact`, :meth:`skip`, :meth:`branch`: the steps h, skip and f of
      the module docstring's formula; :meth:`branch_scale` is s_branch
      (``branch_const`` x ``gain``), ``skip_scale`` is s_skip (None means 1),
      :meth:`branch_bias` is b.
    * ``branch_out``: an ``nn.Identity`` that f passes through on the reference
      path (hook it to observe f before any scalar).
    * the parts of f: ``pre``, ``convs``, ``mids`` (the norm/act units between
      convs), ``in_scale`` (NF gamma/beta after ``pre``), ``mid_scale`` (NF gamma
      after each mid unit), ``se`` (:class:`~normfree.squeeze_excite.SqueezeExcite`
      on the output of ``convs[se_index]``, or None), ``shortcut`` (None:
      identity), ``shortcut_pool`` (the average pool before it, or None) and
      ``shortcut_uses_preact``, ``gain`` (:class:`ScalarGain` or None),
      ``out_bias`` (Fixup's :class:`ScalarBias` after the branch, or None);
      ``alpha``, ``expected_var``, ``beta`` (NF), ``in_channels``,
      ``out_channels``, ``stride``.

    Switches, each with the reference computation as its other branch:

    * ``fold_scalars`` (True): fold every scalar multiplier into a convolution's
      weight (:meth:`_forward_folded`) instead of multiplying activation maps.
    * ``fold_biases`` (True; only with ``fold_scalars``): Fixup's scalar biases
      ride in the convolutions too (as conv biases, or ``conv(x) + b conv(1)``).
    * ``inplace_acts`` (True; only with ``fold_scalars``): an activation
      overwrites its input where that input is a tensor the block made itself
      and nothing else reads (a conv's, norm's or bias's output: every mid
      activation, and the pre-activation after a norm or Fixup bias); never
      the block input ``x``, which the skip path, the caller and hooks still
      read (so the pre-activation of none/nf/skipinit/rescale, a bare
      activation of ``x``, always runs out of place). Exact: ReLU's backward
      reads its output (see :data:`~normfree.layers.INPLACE_ACTIVATIONS`).
    * the no-grad weight cache of each convolution: ``Conv2d.cache_weights``.
    """

    def __init__(self, cin: int, cout: int, stride: int, scheme: Scheme, *, bottleneck: bool = False,
                 layout: Optional[Layout] = None, index: int = 1, num_blocks: int = 1,
                 expected_var: float = 1.0, drop_path: float = 0.0):
        super().__init__()
        self.scheme_name = scheme.name
        self.index = index
        self.in_channels, self.out_channels, self.stride = cin, cout, stride
        self.drop_path = drop_path
        self.fold_scalars = True
        self.fold_biases = True
        self.inplace_acts = True
        self.layout = layout = layout or LAYOUTS["bottleneck" if bottleneck else "basic"]
        if scheme.fixup and layout.se_ratio is not None:
            raise ValueError("fixup's scalar biases do not fit a branch with a squeeze-excite (the NFNet and "
                             "NF-RegNet layouts); use fixup with the wrn or resnetNN architectures")
        mid, groups = layout.mid_channels(cin, cout, first=index == 1)
        last = len(layout.kernels) - 1
        strided = next((i for i, k in enumerate(layout.kernels) if k > 1), 0)
        # (in, out, kernel, stride, groups) of each conv
        shapes = [(cin if i == 0 else mid, cout if i == last else mid, k, stride if i == strided else 1,
                   groups if k > 1 else 1) for i, k in enumerate(layout.kernels)]

        self.pre = norm_act(scheme, cin)
        self.convs = nn.ModuleList(make_conv(scheme, *s[:4], groups=s[4]) for s in shapes)
        self.mids = nn.ModuleList(norm_act(scheme, s[1]) for s in shapes[:-1])
        self.se: Optional[SqueezeExcite] = None
        self.se_index: Optional[int] = None
        if layout.se_ratio is not None:
            self.se_index = layout.se_after % len(shapes)
            c = shapes[self.se_index][1]
            self.se = SqueezeExcite(c, max(1, int(c * layout.se_ratio)))
        self.branch_out = nn.Identity()

        self.shortcut: Optional[nn.Module] = None
        self.shortcut_pool: Optional[nn.Module] = None
        self.shortcut_uses_preact = False
        if stride != 1 or cin != cout:
            if scheme.shortcut == "pool_pad":
                self.shortcut = PoolPadShortcut(cin, cout, stride)
            elif layout.pool_shortcut and stride > 1:
                # DeepMind's hk.avg_pool(2x2, stride 2, 'SAME') divides by the valid pixels at a ragged edge
                self.shortcut_pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                self.shortcut = make_conv(scheme, cin, cout, 1, 1)
                self.shortcut_uses_preact = True
            else:
                self.shortcut = make_conv(scheme, cin, cout, 1, stride)
                self.shortcut_uses_preact = True

        # --- scalar multipliers ---
        nf = scheme.nf_alpha is not None
        gamma = activation_gamma(scheme.act) if nf else None
        self.alpha: Optional[float] = scheme.nf_alpha
        self.expected_var = expected_var if nf else None
        self.beta = math.sqrt(expected_var) if nf else None
        self.in_scale: Optional[float] = gamma / self.beta if nf else None
        self.mid_scale: Optional[float] = gamma
        const = 1.0
        self.skip_scale: Optional[float] = None
        if nf:
            const *= scheme.nf_alpha
        if scheme.rescale:  # b_l^2 = 1 / (l + L - 1): the hukkai/rescaling code's effective value
            b2 = 1.0 / (index + num_blocks - 1)
            const *= math.sqrt(b2)
            self.skip_scale = math.sqrt(1.0 - b2)
        if scheme.skip_alpha is not None:  # Balduzzi: y = alpha skip + f(alpha x) = alpha (skip + f) for ReLU
            const *= scheme.skip_alpha
            self.skip_scale = scheme.skip_alpha * (1.0 if self.skip_scale is None else self.skip_scale)
        if scheme.branch_beta is not None:  # Szegedy: y = x + beta f(x)
            const *= scheme.branch_beta
        if scheme.beta_decay is not None:  # Hanin & Rolnick: beta_l = b^l, l = 1..L
            const *= scheme.beta_decay ** index
        self.branch_const: Optional[float] = None if const == 1.0 else const
        g0 = 1.0 if scheme.fixup else scheme.initial_gain(num_blocks)
        self.gain = ScalarGain(g0) if g0 is not None else None
        self.out_bias = ScalarBias() if scheme.fixup else None

        if scheme.fixup:  # Fixup rule 2 and rule 1 (last layer zero)
            m = len(self.convs)
            factor = num_blocks ** (-1.0 / (2 * m - 2))
            with torch.no_grad():
                for conv in self.convs[:-1]:
                    conv.weight.mul_(factor)
                nn.init.zeros_(self.convs[-1].weight)
        if scheme.init == "arpit":  # the last WN layer of each branch: g^2 x 1/L (weightnorm-init's 1/N)
            with torch.no_grad():
                self.convs[-1].gain.mul_(math.sqrt(1.0 / num_blocks))

    @property
    def expected_var_out(self) -> Optional[float]:
        """NF: the tracked Var of the output, Var_in + alpha^2 (1 + alpha^2 after a
        transition), whatever the gain, as in DeepMind's nf_resnet.py."""
        if self.expected_var is None:
            return None
        base = 1.0 if self.shortcut_uses_preact else self.expected_var
        return base + self.alpha ** 2

    # --- the formula, step by step ---
    def preact(self, x: torch.Tensor) -> torch.Tensor:
        """h = pre(x) * in_scale: the input of the branch (and of a conv shortcut)."""
        h = self.pre(x)
        return h if self.in_scale is None else h * self.in_scale

    def skip(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The skip path (before s_skip): x, shortcut(h) (NFNets: shortcut(avg_pool(h))), or pool_pad(x)."""
        if self.shortcut is None:
            return x
        return self.shortcut(self._pooled(h)) if self.shortcut_uses_preact else self.shortcut(x)

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """f = convs[-1](... mids[0](convs[0](h)) * mid_scale ...): the residual
        branch on the pre-activated input, before any scalar; the squeeze-excite
        (if any) gates the output of ``convs[se_index]``."""
        f = self._excite(0, self.convs[0](h))
        for i, (unit, conv) in enumerate(zip(self.mids, self.convs[1:]), start=1):
            a = unit(f)
            f = self._excite(i, conv(a if self.mid_scale is None else a * self.mid_scale))
        return f

    def _excite(self, i: int, t: torch.Tensor, out_scale=None) -> torch.Tensor:
        """se(t) after conv ``i`` if the squeeze-excite sits there, else t."""
        return self.se(t, out_scale=out_scale) if i == self.se_index else t

    def _pooled(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.shortcut_pool is None else self.shortcut_pool(h)

    def branch_scale(self):
        """s_branch: NF alpha x RescaleNet b_l (``branch_const``) x the learnable gain; None if none."""
        s = self.branch_const
        if self.gain is not None:
            s = self.gain.gain if s is None else self.gain.gain * s
        return s

    def branch_bias(self) -> Optional[torch.Tensor]:
        """b: Fixup's scalar bias added after s_branch * f (None for other methods)."""
        return None if self.out_bias is None else self.out_bias.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_scalars:
            return self._forward_folded(x)
        h = self.preact(x)
        skip = self.skip(x, h)
        f = self.branch_out(self.branch(h))
        s = self.branch_scale()
        r = f if s is None else s * f
        if self.out_bias is not None:
            r = self.out_bias(r)
        r = drop_path(r, self.drop_path, self.training)
        return r + (skip if self.skip_scale is None else self.skip_scale * skip)

    # --- the same, every scalar folded into a convolution ---
    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with every scalar folded into a convolution:
        ``conv(t, in_scale=a, out_scale=s, add_bias=c, in_bias=d) = s * conv(a * (t + d)) + c``
        is exact (a convolution is linear) and scales the small weight, not the
        activation map. When a squeeze-excite ends the branch (NFNets), s_branch
        multiplies its (N, C, 1, 1) gate instead. With ``fold_biases`` Fixup's biases ride along: the one
        before a conv as its ``in_bias``, the one before a mid activation in the
        previous conv's bias, the one after the branch in the last conv's bias."""
        h, b = self._unit(self.pre, x)  # b: a Fixup bias left for the convs that take h
        a = self.in_scale
        if self.shortcut is None:
            skip = x
        elif self.shortcut_uses_preact:  # (an average pool commutes with Fixup's scalar bias b)
            skip = self.shortcut(self._pooled(h), in_scale=a, in_bias=b)
        else:
            skip = self.shortcut(x)
        r = h
        for i, (conv, unit) in enumerate(zip(self.convs, self.mids)):
            lead = self._lead_bias(unit)
            r = self._excite(i, conv(r, in_scale=a, in_bias=b, add_bias=lead))
            r, b = self._unit(unit, r, skip_lead=lead is not None, owned=True)  # (se(t) is a new tensor too)
            a = self.mid_scale
        gain = None if self.gain is None else self.gain.gain
        out_bias = None if self.out_bias is None else self.out_bias.bias
        last = len(self.convs) - 1
        if self.se_index == last:  # the branch scalars ride in the (N, C, 1, 1) gate (no Fixup here)
            r = self._excite(last, self.convs[-1](r, in_scale=a, in_bias=b), out_scale=(gain, self.branch_const))
        else:
            r = self.convs[-1](r, in_scale=a, in_bias=b, out_scale=(gain, self.branch_const),
                               add_bias=out_bias if self.fold_biases else None)
        if out_bias is not None and not self.fold_biases:
            r = self.out_bias(r)
        r = drop_path(r, self.drop_path, self.training)
        return r + skip if self.skip_scale is None else torch.add(r, skip, alpha=self.skip_scale)

    def _unit(self, unit: nn.Sequential, t: torch.Tensor, skip_lead: bool = False, owned: bool = False):
        """(unit(t), None); with ``fold_biases`` a trailing Fixup bias is not added but
        returned, for the next conv's ``in_bias``. ``skip_lead``: the unit's leading
        bias was already added by the conv before it. ``owned``: nothing but this
        unit reads ``t`` (a conv output), so with ``inplace_acts`` an activation
        may overwrite it; so it may any tensor made inside the unit."""
        layers = list(unit)[1:] if skip_lead else list(unit)
        trail = None
        if self.fold_biases and len(layers) > 1 and isinstance(layers[-1], ScalarBias):
            trail = layers.pop().bias
        for m in layers:
            if owned and self.inplace_acts and isinstance(m, Activation):
                t = m(t, inplace=True)
            else:
                out = m(t)
                owned = owned or out is not t  # an identity activation hands back t itself
                t = out
        return t, trail

    def _lead_bias(self, unit: nn.Sequential) -> Optional[torch.Tensor]:
        """With ``fold_biases``: Fixup's bias at the start of ``unit`` (before its activation)."""
        if self.fold_biases and isinstance(unit[0], ScalarBias):
            return unit[0].bias
        return None

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
    """Temporarily run every :class:`ResidualBlock` of ``model`` on its reference
    path (``fold_scalars = False``: the formula step by step, f(x) through
    ``block.branch_out``)."""
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    saved = [b.fold_scalars for b in blocks]
    try:
        for b in blocks:
            b.fold_scalars = False
        yield model
    finally:
        for b, f in zip(blocks, saved):
            b.fold_scalars = f
