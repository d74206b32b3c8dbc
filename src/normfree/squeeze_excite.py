"""Squeeze-and-excite as NFNets and NF-RegNets use it (Hu et al. 2018; Brock et al. 2021b).

    gate = gate_scale * sigmoid(W2 relu(W1 mean_{h,w}(x) + b1) + b2)    (N, C, 1, 1)
    y    = gate * x

DeepMind's ``nfnets/base.py`` (``SqueezeExcite``): a plain ReLU (no gamma) between
the two linear layers, hidden = max(1, int(C * ratio)); the blocks of
``nfnets/nfnet.py`` and ``nfnets/nf_regnet.py`` multiply the gate by 2 ("Multiply
by 2 for rescaling": at initialization the sigmoid is ~1/2, so the 2 keeps the
variance), here ``gate_scale``. The linear layers are initialized like Haiku's
``hk.Linear`` there: weights from a normal with std 1/sqrt(fan_in) truncated at
two standard deviations, biases 0 (PyTorch's default uniform init has a ~35%
smaller std).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Scale, _as_factor


@torch.no_grad()
def truncated_normal_(w: torch.Tensor, std: float) -> torch.Tensor:
    """Fill ``w`` from N(0, std^2) truncated at +-2 std (Haiku's ``TruncatedNormal``):
    a normal draw whose ~4.6% of values outside are redrawn with
    ``nn.init.trunc_normal_``. The same distribution as ``nn.init.trunc_normal_`` on
    all of ``w``, but the inverse error function runs on 4.6% of the values only
    (NFNet-F0 has ~20M squeeze-excite weights)."""
    if w.is_meta:  # (a model built on the meta device: shapes only)
        return w
    w.normal_(0.0, std)
    bad = w.abs() > 2 * std
    n = int(bad.sum())
    if n:
        w[bad] = nn.init.trunc_normal_(w.new_empty(n), std=std, a=-2 * std, b=2 * std)
    return w


class SqueezeExcite(nn.Module):
    """y = gate(x) * x with the gate of the module docstring.

    ``forward(x, out_scale=s)`` returns ``s * y`` with ``s`` (a number, a 0-d
    tensor, or a tuple of those, as the convolutions of :mod:`normfree.layers`
    take) folded into the small (N, C, 1, 1) gate instead of the activation map:
    a residual block whose squeeze-excite ends the branch applies its branch
    scalars (alpha, the skip gain) this way.
    """

    def __init__(self, channels: int, hidden: int, gate_scale: float = 2.0):
        super().__init__()
        if not (isinstance(channels, int) and isinstance(hidden, int) and channels >= 1 and hidden >= 1):
            raise ValueError(f"squeeze-excite needs channels >= 1 and hidden >= 1, got {channels!r}, {hidden!r}")
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.gate_scale = gate_scale
        for fc in (self.fc1, self.fc2):
            truncated_normal_(fc.weight, 1.0 / math.sqrt(fc.in_features))
            nn.init.zeros_(fc.bias)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """gate_scale * sigmoid(fc2(relu(fc1(mean over H, W of x)))), shaped (N, C, 1, 1)."""
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return (g * self.gate_scale)[:, :, None, None]

    def forward(self, x: torch.Tensor, out_scale: Scale = None) -> torch.Tensor:
        g = self.gate(x)
        s = _as_factor(out_scale)
        return x * (g if s is None else g * s)

    def extra_repr(self) -> str:
        return (f"channels={self.fc1.in_features}, hidden={self.fc1.out_features}, "
                f"gate_scale={self.gate_scale:.6g}")
