"""One small configuration per stabilization method.

A :class:`Scheme` says how the single residual block of :mod:`normfree.blocks`
normalizes, initializes and scales; adding a method is adding an entry to
``SCHEMES``. Each entry's ``doc`` gives the method's formula and the official
code it follows (``normfree.SCHEMES["nf"].doc``); the README's method table
lists where normfree departs from that code and why. Method options given to
:func:`normfree.create_model` as keywords (``alpha=0.2``,
``gain_init="1/sqrt(d)"``, ``act="gelu"``, ...) replace fields of the entry
and are validated by :func:`make_scheme` (unknown names, NaN/Inf, out of range).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from .layers import ACTIVATIONS

NORMS = ("bn", "gn", "ln", "in")
CONVS = ("plain", "ws", "wn", "cwn")
MAX_ALPHA = 10.0  # NF alpha: 0.2 in the paper; above ~1 the branch dominates the skip path
MAX_GAIN = 100.0  # SkipInit gain_init


@dataclass(frozen=True)
class Scheme:
    """How one residual block is normalized, initialized and scaled.

    norm:        None, or "bn" (BatchNorm), "gn" (GroupNorm, groups by
                 :func:`normfree.blocks.group_count`), "ln" (GroupNorm with one group =
                 LayerNorm over C,H,W), "in" (InstanceNorm-style GroupNorm).
    order:       "norm_act" (BN -> ReLU, He et al. 2016b) or "act_norm" (ReLU -> BN).
    conv:        "plain" (He init for ``act``), "ws" (Scaled Weight Standardization),
                 "wn" (Weight Normalization, Salimans & Kingma 2016) or "cwn" (Centered
                 Weight Normalization, Huang et al. 2017); WN/CWN gains start at the He gain.
    init:        "he" (the conv kind's default, above) or "arpit" (Arpit et al. 2019, with
                 conv="wn": orthogonal directions, g = sqrt(G^2 cin / cout) with G the He
                 gain of the conv's input, and g x sqrt(1/L) on the last conv of every branch).
    data_init:   None, or "lsuv": the model is meant to be initialized on data with
                 :func:`normfree.lsuv_init` (Mishkin & Matas 2016) before use
                 (``normfree train`` does it on its first training batch,
                 ``normfree spp`` on noise).
    act:         activation name (see ``normfree.layers.ACTIVATIONS``).
    gain_init:   None (no gain) or the init of one learnable scalar per branch
                 (SkipInit); a number, or "1/sqrt(d)" for 1/sqrt(number of blocks).
    nf_alpha:    None, or NF-ResNet's alpha: x_{i+1} = x_i + alpha g f(x_i / beta_i).
    rescale:     RescaleNet: y = a_l x + b_l g f(x), b_l^2 = 1/(l + L - 1), a_l^2 = 1 - b_l^2.
    skip_alpha:  None, or alpha of y = alpha x + f(alpha x) (Balduzzi et al. 2017: 1/sqrt(2)),
                 computed as y = alpha (skip + f(x)) (equal for a ReLU branch: f(alpha x)
                 = alpha f(x)): s_skip = s_branch = alpha.
    branch_beta: None, or a constant beta on the branch, y = x + beta f(x) (Szegedy et al.
                 2016: 0.1 to 0.3).
    beta_decay:  None, or b of beta_l = b^l on block l = 1..L (Hanin & Rolnick 2018, 0 < b <= 1).
    fixup:       Fixup's three rules (zero-init last layers and classifier, branch
                 scaling L^(-1/(2m-2)), scalar biases and multiplier).
    shortcut:    "conv" (1x1 projection of the pre-activated input), "pool_pad"
                 (average pool + zero-padded channels, Fixup's CIFAR code) or "auto"
                 (pool_pad in basic-block networks, conv in bottleneck ones: the Fixup
                 authors' CIFAR and ImageNet code).
    conv_bias:   add biases to the convolutions (NF's WS convolutions have them, as in
                 the authors' code; regularized SkipInit adds them).
    dropout:     dropout probability before the classifier.
    drop_path:   stochastic depth p: block l = 0..L-1 drops its branch with probability
                 p l / L (DeepMind's nfnets code), kept branches scaled by 1/(1 - p l / L).
    classifier_init: "default", "zero" or "normal_0.01".
    doc:         the method's formula and the official code it follows (not an option).
    """

    name: str
    norm: Optional[str] = None
    order: str = "norm_act"
    conv: str = "plain"
    act: str = "relu"
    gain_init: Optional[Union[float, str]] = None
    nf_alpha: Optional[float] = None
    rescale: bool = False
    skip_alpha: Optional[float] = None
    branch_beta: Optional[float] = None
    beta_decay: Optional[float] = None
    init: str = "he"
    data_init: Optional[str] = None
    fixup: bool = False
    shortcut: str = "conv"
    conv_bias: bool = False
    dropout: float = 0.0
    drop_path: float = 0.0
    classifier_init: str = "default"
    doc: str = field(default="", repr=False, compare=False)

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


_NF = "deepmind-research/nfnets/nf_resnet.py (NFResBlock) and base.py (WSConv2D)"

SCHEMES = {
    s.name: s
    for s in [
        Scheme("bn", norm="bn", order="norm_act", doc=(
            "y = x + f(x), f = conv(relu(bn(... conv(relu(bn(x)))))): pre-activation ResNet-V2 "
            "(He et al. 2016b); deepmind-research/nfnets/resnet.py (ResBlockV2)")),
        Scheme("relubn", norm="bn", order="act_norm", doc=(
            "y = x + f(x) with the ReLU -> BN order inside f, the order NF-ResNets imitate "
            "(Brock et al. 2021, section 4); nfnets/resnet.py's ResBlockV2 with the two swapped")),
        Scheme("gn", norm="gn", order="norm_act", doc=(
            "bn's block with GroupNorm (Wu & He 2018): per sample, mean/var over C/G channels x H x W; "
            "G = normfree.blocks.group_count(C) (32 where C allows, >= 2 channels per group)")),
        Scheme("ln", norm="ln", order="norm_act", doc="bn's block with GroupNorm(1 group) = LayerNorm over C, H, W"),
        Scheme("in", norm="in", order="norm_act", doc="bn's block with GroupNorm(C groups) = InstanceNorm"),
        Scheme("none", doc=(
            "y = x + f(x), no normalization, He init: Var(x_{l+1}) ~ 2 Var(x_l) (De & Smith 2020)")),
        Scheme("skipinit", gain_init=0.0, classifier_init="zero", doc=(
            "y = x + g f(x), g a learnable scalar, init 0 (De & Smith 2020); "
            "deepmind-research/nfnets/skipinit_resnet.py (NFResBlock: skip_gain)")),
        Scheme("fixup", fixup=True, shortcut="auto", classifier_init="zero", doc=(
            "y = x + (g f(x) + b), scalar biases before every conv and activation, g init 1, "
            "last branch conv and classifier zero, other branch convs He x L^(-1/(2m-2)) (Zhang et al. 2019); "
            "hongyi-zhang/Fixup cifar/models/fixup_resnet_cifar.py and imagenet/models/fixup_resnet_imagenet.py")),
        Scheme("nf", conv="ws", nf_alpha=0.2, gain_init=0.0, conv_bias=True, classifier_init="normal_0.01", doc=(
            "y = skip + alpha g f(x / beta), beta = sqrt(expected Var(x)), expected Var += alpha^2 per block "
            "(reset to 1 + alpha^2 after a transition), activations times gamma, Scaled WS convs, "
            "g a learnable scalar init 0 (Brock et al. 2021); " + _NF)),
        Scheme("nf_he", conv="plain", nf_alpha=0.2, gain_init=0.0, classifier_init="normal_0.01", doc=(
            "nf with plain fan-in-initialized convs instead of Scaled WS (Brock et al. 2021, the "
            "He-init SPP); " + _NF + " with which_conv=hk.Conv2D")),
        Scheme("rescale", rescale=True, gain_init=1.0, doc=(
            "y = a_l x + b_l g f(x), b_l^2 = 1/(l + L - 1), a_l^2 = 1 - b_l^2, g a learnable scalar "
            "init 1 (Shao et al. 2020); hukkai/rescaling models/rescale.py (Bottleneck)")),
        # --- residual scalings and initializations (issue 17) ---
        Scheme("balduzzi", skip_alpha=1.0 / math.sqrt(2.0), doc=(
            "y = alpha x + f(alpha x) = alpha (x + f(x)) for a ReLU branch, alpha = 1/sqrt(2) on every "
            "block: Var(y) = (Var(x) + Var(f)) / 2 stays constant for a He-initialized f (Balduzzi et al. "
            "2017, 'The shattered gradients problem'); no official code")),
        Scheme("szegedy", norm="bn", order="norm_act", branch_beta=0.2, doc=(
            "y = x + beta f(x), beta = 0.2 (0.1 to 0.3 in the paper), f a BN -> ReLU branch "
            "(Szegedy et al. 2016, Inception-ResNet); tensorflow/models research/slim/nets/"
            "inception_resnet_v2.py (block35/block17/block8: net += scale * up, scale 0.17, 0.10, 0.20)")),
        Scheme("hanin", beta_decay=0.9, doc=(
            "y = x + b^l f(x), l = 1..L, b = 0.9, He init: Var(x_L) = Var(x_0) prod_l (1 + b^2l) stays "
            "bounded at any depth (Hanin & Rolnick 2018); no official code (victorcampos7/weightnorm-init "
            "src/models/nets.py has it as init_extra_param='hanin', b = 0.9 in a WN g)")),
        Scheme("arpit", conv="wn", init="arpit", conv_bias=True, doc=(
            "y = x + f(x), weight-normalized convs w = g v/||v||, v orthogonal, g = sqrt(G^2 cin/cout) "
            "(G = sqrt(2) after a ReLU), the last conv of each branch g x sqrt(1/L): Var grows by "
            "(1 + 1/L) per block, by at most e over the network (Arpit et al. 2019); "
            "victorcampos7/weightnorm-init src/models/init.py, nets.py, residual_blocks.py")),
        Scheme("lsuv", data_init="lsuv", doc=(
            "y = x + f(x), no normalization; normfree.lsuv_init(model, batch): orthonormal weights, then "
            "layer by layer W /= sqrt(Var(layer output)) until |Var - 1| < 0.1 (Mishkin & Matas 2016); "
            "ducha-aiki/LSUVinit tools/extra/lsuv_init.py")),
        # --- normalizations other than BN (issue 17) ---
        Scheme("wn", conv="wn", conv_bias=True, doc=(
            "y = x + f(x) with weight-normalized convs w = g v/||v||, g init = the He gain (sqrt(2) "
            "after a ReLU) (Salimans & Kingma 2016); openai/weightnorm (keras_2/weightnorm.py)")),
        Scheme("cwn", conv="cwn", conv_bias=True, doc=(
            "y = x + f(x) with centered weight-normalized convs w = g (v - mean v)/||v - mean v||, "
            "g init = the He gain (sqrt(2) after a ReLU: the official NScale 1.414) (Huang et al. 2017); "
            "huangleiBuaa/CenteredWN module_pytorch/CWN.py")),
        Scheme("selu", act="selu", doc=(
            "y = x + f(x) with SELU activations and LeCun-normal convs W ~ N(0, 1/fan_in) (normfree's He "
            "rule gives gain 1/sqrt(E[selu(z)^2]) = 1): mean 0 / variance 1 is SELU's fixed point "
            "(Klambauer et al. 2017); bioinf-jku/SNNs (TF_2_x/CIFAR10-Conv-SELU.py: lecun_normal, selu)")),
    ]
}

# keyword -> Scheme field, for create_model(..., alpha=0.2) and friends
_ALIASES = {"alpha": "nf_alpha", "gain": "gain_init", "activation": "act", "beta": "branch_beta"}


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
    fields = {f.name for f in dataclasses.fields(Scheme)} - {"name", "doc"}
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


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate(s: Scheme) -> None:
    a = s.nf_alpha
    if a is not None and not (_is_number(a) and math.isfinite(a) and 0 < a <= MAX_ALPHA):
        raise ValueError(f"alpha must be a finite number in (0, {MAX_ALPHA:g}], got {a!r}")
    if s.act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {s.act!r}{_closest(s.act, ACTIVATIONS)}; "
                         f"allowed: {sorted(ACTIVATIONS)}")
    if s.norm is not None and s.norm not in NORMS:
        raise ValueError(f"unknown norm {s.norm!r}; allowed: None or one of {list(NORMS)}")
    if s.order not in ("norm_act", "act_norm"):
        raise ValueError(f"order must be 'norm_act' or 'act_norm', got {s.order!r}")
    if s.conv not in CONVS:
        raise ValueError(f"conv must be one of {list(CONVS)}, got {s.conv!r}")
    if s.init not in ("he", "arpit"):
        raise ValueError(f"init must be 'he' or 'arpit', got {s.init!r}")
    if s.init == "arpit" and s.conv != "wn":
        raise ValueError(f"init='arpit' is Arpit et al.'s initialization of weight-normalized convs: it needs "
                         f"conv='wn', got conv={s.conv!r}")
    if s.data_init not in (None, "lsuv"):
        raise ValueError(f"data_init must be None or 'lsuv', got {s.data_init!r}")
    for name, top in (("skip_alpha", MAX_ALPHA), ("branch_beta", MAX_ALPHA), ("beta_decay", 1.0)):
        v = getattr(s, name)
        if v is not None and not (_is_number(v) and math.isfinite(v) and 0 < v <= top):
            raise ValueError(f"{name} must be None or a finite number in (0, {top:g}], got {v!r}")
    if s.shortcut not in ("conv", "pool_pad", "auto"):
        raise ValueError(f"shortcut must be 'conv', 'pool_pad' or 'auto', got {s.shortcut!r}")
    if s.classifier_init not in ("default", "zero", "normal_0.01"):
        raise ValueError(f"classifier_init must be 'default', 'zero' or 'normal_0.01', got {s.classifier_init!r}")
    g = s.gain_init
    if g is not None and not ((_is_number(g) and math.isfinite(g) and abs(g) <= MAX_GAIN) or g == "1/sqrt(d)"):
        raise ValueError(f"gain_init must be None, a finite number in [-{MAX_GAIN:g}, {MAX_GAIN:g}] "
                         f"or '1/sqrt(d)', got {g!r}")
    for name in ("dropout", "drop_path"):
        p = getattr(s, name)
        if not (_is_number(p) and 0.0 <= p < 1.0):
            raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
    for name in ("rescale", "fixup", "conv_bias"):
        if not isinstance(getattr(s, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(s, name)!r}")
