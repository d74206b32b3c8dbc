"""normfree models in timm's model interface: feature maps per stage
(``features_only=True``, ``feature_info``, ``forward_intermediates``), the
``pretrained_cfg`` record, and weights from a local checkpoint.

The conventions are those of timm's ``resnetv2.py`` (huggingface/pytorch-image-models,
``timm/models/resnetv2.py``): feature 0 is the stem convolution's output, features
1..S the outputs of the S stages (pre-activation, before the final
normalization / activation), each described by ``num_chs``, ``reduction``
(input size / feature size) and ``module``. normfree's blocks sit in one flat
``blocks`` sequence, so a stage's module is its last block (``blocks.2``).

No normfree weights are published: ``create_model(name, pretrained=True)``
raises. ``pretrained="path"`` or ``checkpoint_path="path"`` loads a normfree
checkpoint (``checkpoint.pt``, a run directory, or ``model.safetensors``)
into the model built from ``name``; with another ``num_classes`` than the
checkpoint's the classifier stays freshly initialized (fine-tuning), as in
timm. ``pretrained_cfg`` then holds the checkpoint's input size, mean, std and
classes.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

Indices = Union[int, Sequence[int], None]


class FeatureInfo(list):
    """A list of ``{"num_chs", "reduction", "module", "index"}`` records (one per
    feature map) with timm's accessors."""

    def channels(self) -> List[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> List[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> List[str]:
        return [f["module"] for f in self]


def stage_ends(model) -> List[int]:
    """Index (in ``model.blocks``) of every stage's last block."""
    ends, n = [], 0
    for d in model.arch.depths:
        n += d
        ends.append(n - 1)
    return ends


def feature_info(model) -> FeatureInfo:
    """The feature maps a normfree :class:`~normfree.models.ResNet` can give:
    the stem convolution, then every stage."""
    arch = model.arch
    first, stride = arch.stem_strides  # after stem.0, after the whole stem (the max-pool of "imagenet")
    info = FeatureInfo([{"num_chs": model.stem[0].out_channels, "reduction": first, "module": "stem.0", "index": 0}])
    for i, (end, width, s) in enumerate(zip(stage_ends(model), arch.widths, arch.strides), start=1):
        stride *= s
        info.append({"num_chs": width, "reduction": stride, "module": f"blocks.{end}", "index": i})
    return info


def take_indices(count: int, indices: Indices) -> List[int]:
    """timm's rule: None -> all, an int n -> the last n, a sequence -> those (negative from the end)."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"indices={indices} must be in [1, {count}] (the last n of {count} feature maps)")
        return list(range(count - indices, count))
    out = []
    for i in indices:
        j = i + count if isinstance(i, int) and i < 0 else i
        if not isinstance(j, int) or not 0 <= j < count:
            raise ValueError(f"feature index {i!r} out of range: the model has {count} feature maps (0..{count - 1})")
        out.append(j)
    return sorted(set(out))


def forward_intermediates(model, x: torch.Tensor, indices: Indices = None, norm: bool = False,
                          intermediates_only: bool = False):
    """The feature maps ``indices`` of ``model`` (see :func:`take_indices`), and,
    unless ``intermediates_only``, the final features (after the final
    normalization / activation) as timm returns them: ``(final, [maps])``.
    ``norm`` applies the final normalization / activation to the last stage's map."""
    model.check_input(x)
    wanted = take_indices(1 + len(model.arch.depths), indices)
    out: List[torch.Tensor] = []
    x = model.stem[0](x)
    if 0 in wanted:
        out.append(x)
    for layer in list(model.stem)[1:]:
        x = layer(x)
    ends = {end: i for i, end in enumerate(stage_ends(model), start=1)}
    last = len(ends)
    for j, block in enumerate(model.blocks):
        x = block(x)
        i = ends.get(j)
        if i is not None and i in wanted:
            out.append(model.final_act(x) if norm and i == last else x)
        if intermediates_only and i is not None and i >= wanted[-1]:
            break
    if intermediates_only:
        return out
    return model.final_act(x), out


class FeatureResNet(nn.Module):
    """A normfree ResNet without its head, returning a list of feature maps
    (``create_model(..., features_only=True, out_indices=...)``). It holds the
    model's ``stem``, ``blocks`` and ``final_act`` under the same names, so a
    full model's ``state_dict`` loads into it with ``strict=False`` (the head's
    keys are left over)."""

    def __init__(self, model, out_indices: Indices = None):
        super().__init__()
        all_info = feature_info(model)
        self.out_indices = take_indices(len(all_info), out_indices)
        self.feature_info = FeatureInfo([all_info[i] for i in self.out_indices])
        self.arch, self.in_chans = model.arch, model.in_chans
        self.stem, self.blocks, self.final_act = model.stem, model.blocks, model.final_act
        self.pretrained_cfg = dict(model.pretrained_cfg, feature_info=[dict(f) for f in self.feature_info])
        last = self.out_indices[-1]
        if last < len(all_info) - 1:  # blocks past the last wanted stage are never run: drop them
            self.blocks = self.blocks[: stage_ends(model)[last - 1] + 1] if last > 0 else nn.Sequential()

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected input of shape (N, {self.in_chans}, H, W), got {got}")

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return forward_intermediates(self, x, self.out_indices, intermediates_only=True)


def make_classifier(scheme, num_features: int, num_classes: int) -> nn.Module:
    """The classifier of a normfree model: Linear(num_features, num_classes),
    initialized as the scheme says (``classifier_init``: PyTorch's default,
    "zero", "normal_0.01"); nn.Identity for num_classes 0 (timm's convention:
    the model then returns its pooled features)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0 (0: no classifier), got {num_classes!r}")
    if num_classes == 0:
        return nn.Identity()
    fc = nn.Linear(num_features, num_classes)
    if scheme.classifier_init == "zero":
        nn.init.zeros_(fc.weight)
        nn.init.zeros_(fc.bias)
    elif scheme.classifier_init == "normal_0.01":
        nn.init.normal_(fc.weight, 0.0, 0.01)
        nn.init.zeros_(fc.bias)
    return fc


def pretrained_cfg(model, name: Optional[str] = None) -> Dict[str, Any]:
    """timm's record of what a model expects: input size, mean, std (None:
    not trained, nothing known), classes, first conv and classifier names.
    The NF families (``arch.train_size``) add their published test resolution
    (``test_input_size``, timm's key) and the official evaluation crop: resize
    to test + 32 pixels (bicubic), centre crop test (DeepMind's
    ``nfnets/dataset.py``, ``resize_crop_32``), i.e. crop_pct = test / (test + 32)."""
    arch = model.arch
    imagenet = arch.stem != "cifar"
    side = arch.train_size or (224 if imagenet else 32)
    reduction = feature_info(model)[-1]["reduction"]
    cfg = {"architecture": name or arch.name, "num_classes": model.num_classes,
           "input_size": (model.in_chans, side, side), "pool_size": (-(-side // reduction),) * 2,
           "mean": None, "std": None, "interpolation": "bilinear", "crop_pct": 1.0 if not imagenet else 0.875,
           "first_conv": "stem.0", "classifier": "fc", "url": "", "hf_hub_id": None, "license": None,
           "source": "normfree (no published weights)"}
    if arch.test_size:
        cfg.update(test_input_size=(model.in_chans, arch.test_size, arch.test_size),
                   crop_pct=arch.test_size / (arch.test_size + 32), interpolation="bicubic")
    return cfg


def cfg_from_input(info: Optional[Dict[str, Any]], path: str) -> Dict[str, Any]:
    """The ``pretrained_cfg`` entries a checkpoint's input record gives (shape, mean, std, classes)."""
    out: Dict[str, Any] = {}
    info = info or {}
    if info.get("shape"):
        out["input_size"] = tuple(info["shape"])
    for key in ("mean", "std"):
        if info.get(key) is not None:
            out[key] = tuple(info[key])
    if info.get("classes"):
        out["label_names"] = list(info["classes"])
    out["file"] = path
    out["source"] = "normfree checkpoint"
    return out


NO_WEIGHTS = ("normfree publishes no pretrained weights: pretrained=True cannot download anything. Give "
              "pretrained='path/to/checkpoint.pt' (or a run directory, or a model.safetensors) or checkpoint_path=")


def load_pretrained(model, path: str, name: str) -> Dict[str, Any]:
    """Load the normfree checkpoint or weights file ``path`` into ``model``
    (built as ``name``); returns the checkpoint's input record. A classifier of
    another shape (another ``num_classes``) is left as initialized; any other
    difference is an error naming the keys."""
    from .train import load_checkpoint
    from .train.weights import load_weights, weights_path

    path = os.fspath(path)
    wpath = weights_path(path)
    ckpt = load_weights(wpath) if wpath else load_checkpoint(path)
    where = ckpt.get("path", path)
    saved = (ckpt.get("config") or {}).get("model")
    state = dict(ckpt["model"])
    own = model.state_dict()
    head = [k for k in ("fc.weight", "fc.bias") if k in state and k in own and state[k].shape != own[k].shape]
    for k in head:
        del state[k]
    missing, unexpected = _keys(own, state, ignore=head)
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                 f"other shapes {wrong[:4]}" if wrong else ""]
        raise ValueError(f"the checkpoint {where} (model {saved!r}) does not fit {name!r}: "
                         f"{'; '.join(p for p in parts if p)}")
    model.load_state_dict(state, strict=not head)
    return ckpt.get("input") or {}


def _keys(own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], ignore: Sequence[str]) -> Tuple[List[str], List[str]]:
    missing = [k for k in own if k not in state and k not in ignore]
    unexpected = [k for k in state if k not in own]
    return missing, unexpected


def finish(model, name: str, *, pretrained: Union[bool, str] = False, checkpoint_path: Optional[str] = None,
           features_only: bool = False, out_indices: Indices = None) -> nn.Module:
    """What :func:`normfree.create_model` does after building ``model``: load
    local weights, record ``pretrained_cfg``, and make it a feature extractor."""
    if pretrained is True and checkpoint_path is None:
        raise ValueError(NO_WEIGHTS)
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"pretrained must be False, True or a checkpoint path, got {type(pretrained).__name__}")
    path = checkpoint_path if checkpoint_path is not None else (pretrained if not isinstance(pretrained, bool)
                                                                 else None)
    if checkpoint_path is not None and not isinstance(pretrained, bool) and os.fspath(pretrained) != checkpoint_path:
        raise ValueError(f"pretrained={pretrained!r} and checkpoint_path={checkpoint_path!r}: give one path")
    model.pretrained_cfg = {"architecture": name}
    if path is not None:
        info = load_pretrained(model, path, name)
        model.pretrained_cfg = {"architecture": name, **cfg_from_input(info, os.fspath(path))}
    if features_only:
        return FeatureResNet(model, out_indices)
    if out_indices is not None:
        raise ValueError("out_indices goes with features_only=True")
    return model
