"""Published training recipes as :class:`TrainConfig` presets.

    cfg = recipe("nfnet", model="nfnet_f0", batch_size=256, data="folder", data_dir="...", epochs=90)
    normfree train --recipe nfnet --model nfnet_f0 --batch-size 256 ...   # the same on the command line

A recipe gives defaults; every field given explicitly (keyword, or command-line
option) wins. Learning rates that the authors scale with the batch size are
scaled with the batch size in use.

* ``nfnet`` (Brock et al. 2021b; deepmind-research ``nfnets/experiment_nfnets.py``,
  ``optim.py``): SGD, Nesterov momentum 0.9, weight decay 2e-5 on weights only
  (none on gains and biases), lr 0.1 x batch / 256, 5 epochs of linear warmup
  then cosine decay to 0, label smoothing 0.1, adaptive gradient clipping 0.01
  (eps 1e-3) on everything but the classifier's weight, 360 epochs at batch 4096. The
  model's published options come with its registered name (``nfnet_f0``:
  GELU, dropout 0.2, stochastic depth 0.25).
* ``nf_regnet`` (``nfnets/experiment_nf_regnets.py``): SGD, Nesterov 0.9, lr 0.4
  (not scaled with the batch), 5 warmup epochs then cosine, weight decay 5e-5
  (B0; the variant's value with ``model=``: 5e-5 .. 1e-4 for B0 .. B5; the official
  configuration has none for B6 .. B8 and fails there, normfree keeps 5e-5), label
  smoothing 0.1, no clipping, 360 epochs at batch 1024.

Not reproduced by normfree's trainer (say so when comparing with the paper):
the exponential moving average of the weights (decay 0.99999), CutMix, MixUp and
RandAugment, bfloat16 activations, ImageNet's resize-crop pre-processing, and
the final cosine value of NF-RegNets (min lr 0.001 x peak there, 0 here).
"""
from __future__ import annotations

import difflib
from typing import Any, Dict

from .config import NFNET_AGC, TrainConfig

#: name -> (TrainConfig fields, learning rate per 256 images or None if not scaled)
RECIPES: Dict[str, Dict[str, Any]] = {
    "nfnet": {"model": "nfnet_f0", "optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 2e-5,
              "lr_per_256": 0.1, "schedule": "cosine", "warmup_epochs": 5.0, "label_smoothing": 0.1,
              "agc": NFNET_AGC, "agc_eps": 1e-3, "epochs": 360, "batch_size": 4096},
    "nf_regnet": {"model": "nf_regnet_b0", "optimizer": "sgd", "momentum": 0.9, "nesterov": True,
                  "weight_decay": 5e-5, "lr": 0.4, "schedule": "cosine", "warmup_epochs": 5.0,
                  "label_smoothing": 0.1, "agc": 0, "epochs": 360, "batch_size": 1024},
}


def recipe_values(name: str, given: Dict[str, Any]) -> Dict[str, Any]:
    """The TrainConfig fields recipe ``name`` sets, given the fields set
    explicitly (``given``, which win: not returned)."""
    if name not in RECIPES:
        close = difflib.get_close_matches(str(name), list(RECIPES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown recipe {name!r}{hint}; recipes: {sorted(RECIPES)}")
    values = dict(RECIPES[name])
    per_256 = values.pop("lr_per_256", None)
    if per_256 is not None:
        values["lr"] = per_256 * given.get("batch_size", values["batch_size"]) / 256
    if name == "nf_regnet":
        from ..models import NAMED_MODELS
        from ..variants import NF_REGNET_VARIANTS

        model = given.get("model", values["model"])
        if model in NAMED_MODELS and model.startswith("nf_regnet_"):
            wd = NF_REGNET_VARIANTS[model.rsplit("_", 1)[1]].weight_decay
            if wd is not None:
                values["weight_decay"] = wd
    return {k: v for k, v in values.items() if k not in given}


def recipe(name: str, **fields) -> TrainConfig:
    """A :class:`TrainConfig` with recipe ``name``'s values (see the module
    docstring) under the ``fields`` given explicitly."""
    return TrainConfig(**{**recipe_values(name, fields), **fields})
