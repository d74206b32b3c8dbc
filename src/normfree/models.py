"""Pre-activation ResNets of any depth, and the model registry.

Models are named ``<method>_<arch>``: ``skipinit_wrn``, ``nf_resnet50``,
``bn_resnet101`` ... (``list_models()``). A name may end in the WRN depth and
width, ``skipinit_wrn_1000_4``. The published NF families are registry
entries too (``NAMED_MODELS``): ``nfnet_f0`` .. ``nfnet_f7``, ``nfnet_f0plus``
.. ``nfnet_f7plus`` and ``nf_regnet_b0`` .. ``nf_regnet_b8`` (Brock et al.
2021b), each an architecture plus the ``nf`` method with its options. Every
model is the same :class:`ResNet` class: the architecture (:class:`Arch`)
fixes the stem, the stages, the branch layout and the head, the method
(:class:`~normfree.schemes.Scheme`) configures the one residual block.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .blocks import LAYOUTS, ResidualBlock, make_conv, norm_act
from .layers import Activation, activation_gamma
from .schemes import SCHEMES, Scheme, list_methods, make_scheme
from .variants import (NF_REGNET_DROP_PATH, NF_REGNET_VARIANTS, NF_REGNET_WIDTH, NFNET_DROP_PATH, NFNET_VARIANTS,
                       Variant)


#: stem kind -> (reduction after ``stem.0``, reduction after the whole stem)
STEM_STRIDES = {"cifar": (1, 1), "imagenet": (2, 4), "nfnet": (2, 4), "nf_regnet": (2, 2)}


@dataclass(frozen=True)
class Arch:
    """A pre-activation ResNet layout.

    block: the branch layout, a key of :data:`normfree.blocks.LAYOUTS`: "basic"
        (3x3-3x3), "bottleneck" (1x1-3x3-1x1, expansion 4), "nfnet" (1x1, two
        grouped 3x3, 1x1, squeeze-excite), "nf_regnet" (1x1 expansion, grouped
        3x3, squeeze-excite, 1x1).
    depths / widths / strides: blocks, output channels and stride per stage.
    stem: "cifar" (3x3 conv, stride 1), "imagenet" (7x7 conv stride 2 + 3x3
        max-pool), "nfnet" (3x3 convs 16, 32, 64, stem_width with strides 2, 1,
        1, 2 and gamma-scaled activations between them) or "nf_regnet" (one 3x3
        conv, stride 2).
    head_width: channels of a 1x1 conv before the final activation (NFNets,
        NF-RegNets), None for none.
    train_size / test_size: the published training / test resolutions (NF
        families; ``pretrained_cfg`` reports them), None elsewhere.
    """

    name: str
    block: str
    depths: Tuple[int, ...]
    widths: Tuple[int, ...]
    strides: Tuple[int, ...]
    stem: str
    stem_width: int
    head_width: Optional[int] = None
    train_size: Optional[int] = None
    test_size: Optional[int] = None

    @property
    def num_features(self) -> int:
        """Channels the classifier sees."""
        return self.head_width or self.widths[-1]

    @property
    def stem_strides(self) -> Tuple[int, int]:
        """(reduction of ``stem.0``'s output, reduction of the whole stem)."""
        return STEM_STRIDES[self.stem]


# Bottleneck stage depths of ResNet-V2 (He et al. 2016) and the deeper
# NF-ResNet variants (Brock et al. 2021, authors' code).
RESNET_DEPTHS = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    288: (24, 24, 24, 24),
    600: (50, 50, 50, 50),
}
ARCHS = ["wrn"] + [f"resnet{d}" for d in RESNET_DEPTHS]
#: the published NF families' architectures (Brock et al. 2021b; normfree.variants)
FAMILY_ARCHS = [f"nfnet_{v}" for v in NFNET_VARIANTS] + [f"nf_regnet_{v}" for v in NF_REGNET_VARIANTS]


MAX_DEPTH = 10_000  # WRN depth (the papers go to 1000 layers)
MAX_CHANNELS = 16_384  # widest layer (ResNet-50 x 8, WRN width 256)
MAX_CLASSES = 100_000
MAX_IN_CHANS = 1_024


def wrn_depths() -> str:
    return f"6n+4 with n >= 1, up to {MAX_DEPTH} (10, 16, 22, 28, 40, ..., 100, 1000, ...)"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_width(width) -> None:
    if not (isinstance(width, (int, float)) and not isinstance(width, bool) and math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")


def _channels(c: float) -> int:
    return max(1, int(c))


def nfnet_arch(name: str, v: Variant, width: float = 1) -> Arch:
    """NFNet-FN (DeepMind's ``nfnets/nfnet.py``, ``NFNet``) with every width x ``width``.
    (The official ``width`` leaves the stem at widths[0] / 2; here it scales it too.)"""
    widths = tuple(_channels(c * width) for c in v.widths)
    return Arch(name, "nfnet", v.depths, widths, (1, 2, 2, 2), "nfnet", _channels(v.widths[0] * width) // 2 or 1,
                head_width=2 * widths[-1], train_size=v.train_size, test_size=v.test_size)


def nf_regnet_arch(name: str, v: Variant, width: float = 1) -> Arch:
    """NF-RegNet-BN (DeepMind's ``nfnets/nf_regnet.py``, ``NF_RegNet``): widths x 0.75 x ``width``."""
    w = NF_REGNET_WIDTH * width
    widths = tuple(_channels(c * w) for c in v.widths)
    return Arch(name, "nf_regnet", v.depths, widths, (2, 2, 2, 2), "nf_regnet", _channels(v.widths[0] * w),
                head_width=max(1, 1280 * widths[-1] // 440), train_size=v.train_size, test_size=v.test_size)


def make_arch(arch: str, depth: Optional[int] = None, width: float = 1) -> Arch:
    """The layout of ``arch`` ("wrn", "resnetNN", or one of ``FAMILY_ARCHS``:
    "nfnet_f0", "nf_regnet_b0", ...) at ``depth`` and ``width``.

    ``depth``: WRN depth 6n+4 (10 to 10,000; default 16); for ``resnetNN`` None
    or NN; for the NF families None (their depth is the variant).
    ``width``: WRN width factor k, or channel multiplier of a bottleneck ResNet
    or an NF-family variant (any finite number > 0 whose widest layer stays
    within 16,384 channels).
    """
    _check_width(width)
    if arch in FAMILY_ARCHS:
        if depth is not None:
            raise ValueError(f"{arch} has the published depths; got depth={depth!r}. For another depth choose "
                             f"another variant: {FAMILY_ARCHS}")
        family, key = arch.rsplit("_", 1)
        layout = (nfnet_arch(arch, NFNET_VARIANTS[key], width) if family == "nfnet"
                  else nf_regnet_arch(arch, NF_REGNET_VARIANTS[key], width))
    elif arch == "wrn":
        depth = 16 if depth is None else depth
        if not _is_int(depth) or not 10 <= depth <= MAX_DEPTH or (depth - 4) % 6:
            raise ValueError(f"depth {depth!r} does not fit wrn: allowed depths are {wrn_depths()}")
        n = (depth - 4) // 6
        w = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        layout = Arch(f"wrn{depth}_{width:g}", "basic", (n, n, n), tuple(w), (1, 2, 2), "cifar", 16)
    elif re.fullmatch(r"resnet(\d+)", arch):
        d = int(arch[len("resnet"):])
        if depth is not None and (not _is_int(depth) or depth != d):
            raise ValueError(f"{arch} has depth {d}; got depth={depth!r}. For another depth use "
                             f"one of {[f'resnet{k}' for k in RESNET_DEPTHS]} or 'wrn' ({wrn_depths()})")
        if d not in RESNET_DEPTHS:
            raise ValueError(f"depth {d} does not fit the bottleneck ResNet: allowed {sorted(RESNET_DEPTHS)}")
        w = [max(4, int(round(c * width)) // 4 * 4) for c in (256, 512, 1024, 2048)]
        layout = Arch(arch, "bottleneck", RESNET_DEPTHS[d], tuple(w), (1, 2, 2, 2), "imagenet",
                      max(1, int(round(64 * width))))
    else:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {ARCHS + FAMILY_ARCHS}")
    widest = max(layout.widths + (layout.stem_width, layout.head_width or 1))
    if widest > MAX_CHANNELS:
        raise ValueError(f"width {width:g} gives {arch} a layer of {widest} channels; allowed: up to "
                         f"{MAX_CHANNELS} (width <= {width * MAX_CHANNELS / widest:.4g})")
    return layout


def make_stem(arch: Arch, scheme: Scheme, in_chans: int) -> nn.Sequential:
    """The stem of ``arch``: ``stem[0]`` is its first convolution (whose output
    is the first feature map of ``feature_info``), the rest follows.

    Its first conv sees the (linear) input: He init with gain 1. "nfnet": four
    3x3 convs, 16, 32, 64 and ``stem_width`` channels, strides 2, 1, 1, 2,
    with the activation times its NF gamma between them and none after the
    last (DeepMind's ``nfnets/nfnet.py``, ``NFNet.stem``). "nf_regnet": one 3x3
    conv, stride 2 (``nf_regnet.py``, ``initial_conv``).
    """
    if arch.stem == "nfnet":
        gamma = activation_gamma(scheme.act) if scheme.nf_alpha is not None else 1.0
        layers: List[nn.Module] = []
        cin = in_chans
        for i, (c, s) in enumerate(zip((16, 32, 64, arch.stem_width), (2, 1, 1, 2))):
            if i:
                layers.append(Activation(scheme.act, gain=gamma))
            layers.append(make_conv(scheme, cin, c, 3, s, input_act="identity" if i == 0 else None))
            cin = c
        return nn.Sequential(*layers)
    imagenet = arch.stem == "imagenet"
    kernel, stride = (7, 2) if imagenet else (3, 2 if arch.stem == "nf_regnet" else 1)
    stem = nn.Sequential(make_conv(scheme, in_chans, arch.stem_width, kernel, stride=stride, input_act="identity"))
    if imagenet:
        stem.append(nn.MaxPool2d(3, stride=2, padding=1))
    return stem


class ResNet(nn.Module):
    """A pre-activation ResNet whose every residual block follows ``scheme``.

    stem -> residual stages -> [1x1 conv] final norm/act -> global average pool
    -> [dropout] -> linear. For NF schemes the expected variance is tracked
    through the blocks: it starts at 1 after the stem, grows by alpha^2 per
    block and is reset to 1 + alpha^2 after a transition (projection) block
    (DeepMind's nf_resnet.py), whatever the SkipInit gain.

    The stem conv (3x3, or 7x7 stride 2 + 3x3 max-pool for resnetNN) sees the
    linear input: He init with gain 1 (Haiku's default in DeepMind's
    skipinit_resnet.py / resnet.py). NF's stem is a Scaled-WS conv with a bias:
    DeepMind's nf_resnet.py passes ``with_bias=False`` to it, but its WSConv2D
    always adds a (zero-initialized) bias, so the official stem has one too.
    Stochastic depth: block l = 0..L-1 drops with p l / L (the official
    indexing). Fixup's ``shortcut="auto"`` becomes pool_pad for basic blocks
    (the authors' CIFAR code) and a 1x1 conv for bottlenecks (their ImageNet code).

    NFNets and NF-RegNets (``arch.block`` "nfnet" / "nf_regnet", Brock et al.
    2021b; DeepMind's ``nfnets/nfnet.py`` and ``nf_regnet.py``): their stem
    (:func:`make_stem`), the branch layout of :data:`normfree.blocks.LAYOUTS`
    (grouped convs, squeeze-excite x2, average-pool shortcut) and a 1x1 conv
    to ``arch.head_width`` channels before the final activation
    (``final_act[0]``). In both, every stage's first block has a projection
    shortcut, so the expected variance resets there as in the official code.
    """

    def __init__(self, arch: Arch, scheme: Scheme, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        for name, v, top in (("num_classes", num_classes, MAX_CLASSES), ("in_chans", in_chans, MAX_IN_CHANS)):
            if not _is_int(v) or not 1 <= v <= top:
                raise ValueError(f"{name} must be an integer from 1 to {top}, got {v!r}")
        if scheme.shortcut == "auto":  # Fixup: pool+pad in the CIFAR code, 1x1 conv in the ImageNet code
            scheme = dataclasses.replace(scheme, shortcut="conv" if arch.block == "bottleneck" else "pool_pad")
        self.arch, self.scheme = arch, scheme
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stem = make_stem(arch, scheme, in_chans)

        num_blocks = sum(arch.depths)
        blocks: List[ResidualBlock] = []
        cin, var = arch.stem_width, 1.0
        for depth, cout, stride in zip(arch.depths, arch.widths, arch.strides):
            for i in range(depth):
                idx = len(blocks) + 1
                blk = ResidualBlock(cin, cout, stride if i == 0 else 1, scheme,
                                    layout=LAYOUTS[arch.block], index=idx,
                                    num_blocks=num_blocks, expected_var=var,
                                    drop_path=scheme.drop_path * (idx - 1) / num_blocks)
                if blk.expected_var_out is not None:
                    var = blk.expected_var_out
                blocks.append(blk)
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.final_act = norm_act(scheme, arch.num_features)
        if arch.head_width is not None:  # NFNets, NF-RegNets: final_conv -> act
            self.final_act.insert(0, make_conv(scheme, cin, arch.head_width, 1))
        cin = arch.num_features
        self.head_scale = activation_gamma(scheme.act) if scheme.nf_alpha is not None else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(scheme.dropout) if scheme.dropout > 0 else nn.Identity()
        from .backbone import make_classifier  # (backbone imports this module)

        self.fc = make_classifier(scheme, cin, num_classes)

    @property
    def num_features(self) -> int:
        return self.arch.num_features  # (the classifier's inputs; also after reset_classifier(0))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear ValueError for input that is not (N, in_chans, H, W)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and residual blocks (no final activation)."""
        self.check_input(x)
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[1x1 conv,] final norm/act, pool, [dropout], classifier; ``pre_logits``: stop before the classifier."""
        x = self.pool(self.final_act(x)).flatten(1)
        if self.head_scale is not None:  # NF: gamma of the final activation, after the (linear) pool
            x = x * self.head_scale
        x = self.dropout(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ---- timm's model interface (details in normfree.backbone) ----------------------
    def get_classifier(self) -> nn.Module:
        """The final classifier (AGC leaves it unclipped)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` outputs, initialized as the method
        says (0: none; the model then returns its pooled features). Only average
        pooling exists: ``global_pool`` may be None or "avg"."""
        from .backbone import make_classifier

        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool must be None or 'avg' (normfree models pool by averaging), got "
                             f"{global_pool!r}")
        self.fc = make_classifier(self.scheme, self.num_features, num_classes).to(self.stem[0].weight.device)
        self.num_classes = num_classes

    @property
    def feature_info(self):
        """One record per feature map (stem, then every stage): ``num_chs``,
        ``reduction``, ``module`` (timm's ``feature_info``)."""
        from .backbone import feature_info

        return feature_info(self)

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False,
                              intermediates_only: bool = False):
        """timm's ``forward_intermediates``: (final features, [feature maps ``indices``])."""
        from .backbone import forward_intermediates

        return forward_intermediates(self, x, indices, norm=norm, intermediates_only=intermediates_only)

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        """timm's record of input size, mean, std, classes, first conv and
        classifier; mean / std / input size of the training data once weights
        were loaded from a checkpoint."""
        from .backbone import pretrained_cfg

        return {**pretrained_cfg(self), **self.__dict__.get("_pretrained_extra", {})}

    @pretrained_cfg.setter
    def pretrained_cfg(self, extra: Dict[str, Any]) -> None:
        self.__dict__["_pretrained_extra"] = dict(extra)


@dataclass(frozen=True)
class NamedModel:
    """A registered model outside the ``<method>_<arch>`` grid: an architecture
    (:func:`make_arch` name), a method (``SCHEMES`` key), the method options it
    is published with (``create_model`` keywords override them) and its source."""

    arch: str
    method: str
    options: Tuple[Tuple[str, Any], ...]
    source: str


_NFNET_SRC = ("Brock et al. 2021b; deepmind-research nfnets/nfnet.py (NFNet, NFBlock), base.py (nfnet_params), "
              "experiment_nfnets.py (stochdepth_rate 0.25)")
_NF_REGNET_SRC = ("Brock et al. 2021a/b; deepmind-research nfnets/nf_regnet.py (NF_RegNet, NFBlock), base.py "
                  "(nf_regnet_params), experiment_nf_regnets.py (activation silu, stochdepth_rate 0.1)")

#: the published NF families: NFNet-F0..F7 (and F0+..F7+), NF-RegNet-B0..B8. The
#: method is ``nf`` (Scaled WS, alpha 0.2, skip gain init 0, tracked beta); NFNets
#: use GELU in its tanh form (jax.nn.gelu's default) and a N(0, 0.01) classifier,
#: NF-RegNets SiLU and a zero classifier; dropout per variant, stochastic depth as
#: in the training configurations.
NAMED_MODELS: Dict[str, NamedModel] = {
    **{f"nfnet_{k}": NamedModel(f"nfnet_{k}", "nf", (("act", "gelu_tanh"), ("dropout", v.dropout),
                                                     ("drop_path", NFNET_DROP_PATH)), _NFNET_SRC)
       for k, v in NFNET_VARIANTS.items()},
    **{f"nf_regnet_{k}": NamedModel(f"nf_regnet_{k}", "nf", (("act", "silu"), ("dropout", v.dropout),
                                                             ("drop_path", NF_REGNET_DROP_PATH),
                                                             ("classifier_init", "zero")), _NF_REGNET_SRC)
       for k, v in NF_REGNET_VARIANTS.items()},
}


def list_models() -> List[str]:
    """Every registered name: the ``<method>_<arch>`` grid, then ``NAMED_MODELS``."""
    return [f"{m}_{a}" for m in list_methods() for a in ARCHS] + list(NAMED_MODELS)


def parse_model_name(name: str) -> Tuple[str, str, Dict[str, int]]:
    """Split ``name`` into (method, arch, size kwargs), e.g.
    "skipinit_wrn_1000_4" -> ("skipinit", "wrn", {"depth": 1000, "width": 4})."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    if name in NAMED_MODELS:  # "nfnet_f0" -> ("nf", "nfnet_f0", {})
        return NAMED_MODELS[name].method, NAMED_MODELS[name].arch, {}
    size: Dict[str, int] = {}
    m = re.fullmatch(r"(.+_wrn)_(\d+)(?:_(\d+))?", name)
    if m:
        name = m.group(1)
        size["depth"] = int(m.group(2))
        if m.group(3):
            size["width"] = int(m.group(3))
    for arch in sorted(ARCHS, key=len, reverse=True):
        if name.endswith("_" + arch):
            method = name[: -len(arch) - 1]
            if method in SCHEMES:
                return method, arch, size
            close = difflib.get_close_matches(method, list(SCHEMES), n=1)
            hint = f" (did you mean {close[0] + '_' + arch!r}?)" if close else ""
            raise ValueError(f"unknown method {method!r} in model name {name!r}{hint}; "
                             f"methods: {list_methods()}")
    close = difflib.get_close_matches(name, list_models(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}; names are <method>_<arch> with methods "
                     f"{list_methods()} and archs {ARCHS}, or one of {list(NAMED_MODELS)} "
                     f"(see normfree.list_models())")


def create_model(name: str, *, depth: Optional[int] = None, width: Optional[float] = None,
                 num_classes: int = 10, in_chans: int = 3, pretrained: Union[bool, str] = False,
                 checkpoint_path: Optional[str] = None, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None, **method_options) -> nn.Module:
    """Build a registered model.

    Args:
        name: ``<method>_<arch>`` (see :func:`list_models`), optionally with the
            WRN size appended (``"skipinit_wrn_1000_4"``), or a published NF
            variant (``"nfnet_f0"``, ``"nf_regnet_b0"``: ``NAMED_MODELS``).
        depth: WRN depth (6n+4); for ``resnetNN`` it must be omitted or equal NN;
            NF variants have their published depths (omit it).
        width: WRN width factor k, or channel multiplier of a bottleneck ResNet
            or an NF variant.
        num_classes, in_chans: classifier outputs and input channels.
        pretrained, checkpoint_path: no normfree weights are published, so
            ``pretrained=True`` raises; a path (``pretrained="run/checkpoint.pt"``
            or ``checkpoint_path=``: a checkpoint, a run directory or a
            ``model.safetensors``) loads those weights (a classifier of another
            ``num_classes`` stays fresh) and their input record into ``pretrained_cfg``.
        features_only, out_indices: return a :class:`~normfree.backbone.FeatureResNet`
            giving a list of feature maps (stem and stages, or ``out_indices``)
            instead of logits, with ``feature_info``.
        **method_options: fields of the method's Scheme, e.g. ``alpha=0.2``,
            ``gain_init="1/sqrt(d)"``, ``act="gelu"``, ``regularized=True``,
            ``dropout=0.3``, ``drop_path=0.1`` (see :class:`Scheme`); for a
            named model they replace its published options.
    """
    method, arch, size = parse_model_name(name)
    for key, value in (("depth", depth), ("width", width)):
        if value is None:
            continue
        if key in size and value != size[key]:
            raise ValueError(f"{name!r} encodes {key} {size[key]}, but {key}={value!r} was given: "
                             f"give the {key} once (in the name or as {key}=)")
        size[key] = value
    if name in NAMED_MODELS:
        method_options = {**dict(NAMED_MODELS[name].options), **method_options}
    scheme = make_scheme(method, **method_options)
    model = ResNet(make_arch(arch, size.get("depth"), size.get("width", 1)), scheme,
                   num_classes=num_classes, in_chans=in_chans)
    if pretrained is not False or checkpoint_path is not None or features_only or out_indices is not None:
        from .backbone import finish  # timm's create_model options

        return finish(model, name, pretrained=pretrained, checkpoint_path=checkpoint_path,
                      features_only=features_only, out_indices=out_indices)
    return model
