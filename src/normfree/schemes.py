"""One small configuration per stabilization method.

A :class:`Scheme` says how the single residual block of :mod:`normfree.blocks`
normalizes, initializes and scales; adding a method is adding an entry to
``SCHEMES``. Method options given to :func:`normfree.create_model` as keywords
(``alpha=0.2``, ``gain_init="1/sqrt(d)"``, ``act="gelu"``, ...) replace fields
of the entry and are validated by :func:`make_scheme`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Optional, Union

from .layers import ACTIVATIONS

NORMS = ("bn", "gn", "ln", "in")


@dataclass(frozen=True)
class Scheme:
    """How one residual block is normalized, initialized and scaled.

    norm:        None, or "bn" (BatchNorm), "gn" (GroupNorm), "ln" (GroupNorm with
                 one group = LayerNorm over C,H,W), "in" (InstanceNorm-style GroupNorm).
    order:       "norm_act" (BN -> ReLU, He et al. 2016b) or "act_norm" (ReLU -> BN).
    conv:        "plain" (He init) or "ws" (Scaled Weight Standardization).
    act:         activation name (see ``normfree.layers.ACTIVATIONS``).
    gain_init:   None (no gain) or the init of one learnable scalar per branch
                 (SkipInit); a number, or "1/sqrt(d)" for 1/sqrt(number of blocks).
    nf_alpha:    None, or NF-ResNet's alpha: x_{i+1} = x_i + alpha f(x_i / beta_i).
    rescale:     RescaleNet: y = a_l x + b_l f(x), b_l^2 = 1/(l + L), a_l^2 = 1 - b_l^2.
    fixup:       Fixup's three rules (zero-init last layers and classifier, branch
                 scaling L^(-1/(2m-2)), scalar biases and multiplier).
    shortcut:    "conv" (1x1 projection of the pre-activated input) or "pool_pad"
                 (average pool + zero-padded channels, Fixup's CIFAR code).
    conv_bias:   add biases to the convolutions (NF's WS convolutions have them, as in
                 the authors' code; regularized SkipInit adds them).
    dropout:     dropout probability before the classifier.
    drop_path:   stochastic-depth probability of the last block (linear in depth).
    classifier_init: "default", "zero" or "normal_0.01".
    """

    name: str
    norm: Optional[str] = None
    order: str = "norm_act"
    conv: str = "plain"
    act: str = "relu"
    gain_init: Optional[Union[float, str]] = None
    nf_alpha: Optional[float] = None
    rescale: bool = False
    fixup: bool = False
    shortcut: str = "conv"
    conv_bias: bool = False
    dropout: float = 0.0
    drop_path: float = 0.0
    classifier_init: str = "default"

    @property
    def uses_batch_stats(self) -> bool:
        """True when outputs depend on the rest of the batch (in train mode)."""
        return self.norm == "bn"

    def initial_gain(self, num_blocks: int) -> Optional[float]:
        """The SkipInit gain's initial value for a network of ``num_blocks`` blocks."""
        if self.gain_init is None:
            return None
        if isinstance(self.gain_init, str):
            return 1.0 / math.sqrt(num_blocks)
        return float(self.gain_init)


SCHEMES = {
    s.name: s
    for s in [
        Scheme("bn", norm="bn", order="norm_act"),
        Scheme("relubn", norm="bn", order="act_norm"),
        Scheme("gn", norm="gn", order="norm_act"),
        Scheme("ln", norm="ln", order="norm_act"),
        Scheme("in", norm="in", order="norm_act"),
        Scheme("none"),
        Scheme("skipinit", gain_init=0.0, classifier_init="zero"),
        Scheme("fixup", fixup=True, shortcut="pool_pad", classifier_init="zero"),
        Scheme("nf", conv="ws", nf_alpha=0.2, conv_bias=True, classifier_init="normal_0.01"),
        Scheme("nf_he", conv="plain", nf_alpha=0.2, classifier_init="normal_0.01"),
        Scheme("rescale", rescale=True),
    ]
}

# keyword -> Scheme field, for create_model(..., alpha=0.2) and friends
_ALIASES = {"alpha": "nf_alpha", "gain": "gain_init", "activation": "act"}


def list_methods():
    """Names of all registered methods."""
    return sorted(SCHEMES)


def _closest(name, choices):
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def make_scheme(method: str, regularized: bool = False, **options) -> Scheme:
    """The scheme of ``method`` with ``options`` applied and validated.

    ``regularized=True`` (SkipInit's "regularized" variant, De & Smith 2020)
    adds conv biases and dropout 0.2 before the classifier unless ``dropout``
    is given.
    """
    if method not in SCHEMES:
        raise ValueError(f"unknown method {method!r}{_closest(method, SCHEMES)}; "
                         f"allowed: {list_methods()}")
    fields = {f.name for f in dataclasses.fields(Scheme)} - {"name"}
    changes = {}
    for key, value in options.items():
        field = _ALIASES.get(key, key)
        if field not in fields:
            allowed = sorted(fields | set(_ALIASES))
            raise TypeError(f"unknown option {key!r} for method {method!r}{_closest(key, allowed)}; "
                            f"allowed: {allowed}")
        changes[field] = value
    if regularized:
        changes.setdefault("conv_bias", True)
        changes.setdefault("dropout", 0.2)
    scheme = dataclasses.replace(SCHEMES[method], **changes)
    _validate(scheme)
    return scheme


def _validate(s: Scheme) -> None:
    if s.nf_alpha is not None and not (isinstance(s.nf_alpha, (int, float)) and s.nf_alpha > 0):
        raise ValueError(f"alpha must be a number > 0, got {s.nf_alpha!r}")
    if s.act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {s.act!r}{_closest(s.act, ACTIVATIONS)}; "
                         f"allowed: {sorted(ACTIVATIONS)}")
    if s.norm is not None and s.norm not in NORMS:
        raise ValueError(f"unknown norm {s.norm!r}; allowed: None or one of {list(NORMS)}")
    if s.order not in ("norm_act", "act_norm"):
        raise ValueError(f"order must be 'norm_act' or 'act_norm', got {s.order!r}")
    if s.conv not in ("plain", "ws"):
        raise ValueError(f"conv must be 'plain' or 'ws', got {s.conv!r}")
    if s.shortcut not in ("conv", "pool_pad"):
        raise ValueError(f"shortcut must be 'conv' or 'pool_pad', got {s.shortcut!r}")
    if s.classifier_init not in ("default", "zero", "normal_0.01"):
        raise ValueError(f"classifier_init must be 'default', 'zero' or 'normal_0.01', got {s.classifier_init!r}")
    g = s.gain_init
    if g is not None and not (isinstance(g, (int, float)) or g == "1/sqrt(d)"):
        raise ValueError(f"gain_init must be None, a number or '1/sqrt(d)', got {g!r}")
    for name in ("dropout", "drop_path"):
        p = getattr(s, name)
        if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {p!r}")
