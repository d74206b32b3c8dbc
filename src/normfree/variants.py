"""The published NFNet and NF-RegNet variants (Brock et al. 2021b), as data.

Numbers from DeepMind's ``nfnets/base.py`` (``nfnet_params``,
``nf_regnet_params``) in google-deepmind/deepmind-research, and its training
configurations ``nfnets/experiment_nfnets.py`` / ``nfnets/experiment_nf_regnets.py``
(stochastic depth, weight decay, learning rate). :mod:`normfree.models` turns
each variant into an :class:`~normfree.models.Arch` and a registered model.

* NFNet-FN: stage widths (256, 512, 1536, 1536), FN+ (384, 768, 2048, 2048);
  depths (N + 1) x (1, 2, 6, 3); stage strides (1, 2, 2, 2); stem width
  widths[0] / 2; a final 1x1 conv to 2 x widths[-1] channels before the head.
* NF-RegNet-BN: the variant's widths x 0.75 (the constructor's ``width``);
  every stage starts with stride 2; stem width = widths[0] x 0.75; final 1x1
  conv to int(1280 x widths[-1] // 440) channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Variant:
    """One published variant: stage depths and widths, the training and test
    resolutions, dropout before the classifier, and the recipe's weight decay
    where the official configuration gives one."""

    depths: Tuple[int, ...]
    widths: Tuple[int, ...]
    train_size: int
    test_size: int
    dropout: float
    weight_decay: Optional[float] = None


NFNET_WIDTHS = (256, 512, 1536, 1536)
NFNET_PLUS_WIDTHS = (384, 768, 2048, 2048)
NFNET_F0_DEPTHS = (1, 2, 6, 3)
#: FN: (train px, test px, dropout)
_NFNET_SIZES = {0: (192, 256, 0.2), 1: (224, 320, 0.3), 2: (256, 352, 0.4), 3: (320, 416, 0.4),
                4: (384, 512, 0.5), 5: (416, 544, 0.5), 6: (448, 576, 0.5), 7: (480, 608, 0.5)}

NFNET_VARIANTS: Dict[str, Variant] = {}
for _n, (_train, _test, _drop) in _NFNET_SIZES.items():
    _depths = tuple((_n + 1) * d for d in NFNET_F0_DEPTHS)
    NFNET_VARIANTS[f"f{_n}"] = Variant(_depths, NFNET_WIDTHS, _train, _test, _drop, 2e-5)
    NFNET_VARIANTS[f"f{_n}plus"] = Variant(_depths, NFNET_PLUS_WIDTHS, _train, _test, _drop, 2e-5)

#: NFNet training recipe (experiment_nfnets.py): stochastic depth 0.25 for every variant
NFNET_DROP_PATH = 0.25

NF_REGNET_WIDTH = 0.75  # the constructor's default width multiplier (NF_RegNet.__init__)
NF_REGNET_VARIANTS: Dict[str, Variant] = {
    "b0": Variant((1, 3, 6, 6), (48, 104, 208, 440), 192, 224, 0.2, 5e-5),
    "b1": Variant((2, 4, 7, 7), (48, 104, 208, 440), 224, 256, 0.2, 6e-5),
    "b2": Variant((2, 4, 8, 8), (56, 112, 232, 488), 240, 272, 0.3, 7e-5),
    "b3": Variant((2, 5, 9, 9), (56, 128, 248, 528), 288, 320, 0.3, 8e-5),
    "b4": Variant((2, 6, 11, 11), (64, 144, 288, 616), 320, 384, 0.4, 9e-5),
    "b5": Variant((3, 7, 14, 14), (80, 168, 336, 704), 384, 456, 0.4, 1e-4),
    # experiment_nf_regnets.py has no weight decay for B6-B8
    "b6": Variant((3, 8, 16, 16), (88, 184, 376, 792), 448, 528, 0.5),
    "b7": Variant((4, 10, 19, 19), (96, 208, 416, 880), 512, 600, 0.5),
    "b8": Variant((4, 11, 22, 22), (104, 232, 456, 968), 600, 672, 0.5),
}

#: NF-RegNet training recipe (experiment_nf_regnets.py): stochastic depth 0.1
NF_REGNET_DROP_PATH = 0.1
