"""Bring your own model: :func:`convert` turns an existing residual network
(torchvision's or timm's ResNet, or your own) into a normalizer-free one.

``convert(model, method)`` returns a copy of ``model`` in which

* every normalization layer is removed (``none``, ``skipinit``, ``nf``) or
  every batch normalization is replaced by GroupNorm (``gn``: 32 groups, ``ln``:
  one group, ``in``: one group per channel; batch-independent norms are kept),
  carrying over the affine weight and bias;
* every residual block becomes a :class:`~normfree.converted.ConvertedBlock`
  that keeps the block's own layers (same names, same state_dict keys) and
  computes ``y = skip + s * f(x)``: for ``skipinit`` a learnable scalar ``s``
  initialized to 0 (De & Smith 2020), so that every block is exactly its skip
  path at initialization; for ``nf`` (Brock et al. 2021, as in DeepMind's
  ``nfnets/nf_resnet.py``) ``y = skip + alpha * g * f(gamma * act(x) / beta)``
  with Scaled Weight Standardized convolutions (:class:`normfree.ScaledStdConv2d`,
  the weights carried over), mid activations multiplied by their gamma,
  ``beta = sqrt(expected Var(x))`` tracked analytically (+alpha^2 per block,
  reset to 1 + alpha^2 after a projection shortcut), squeeze-excite outputs
  doubled (DeepMind's ``2 * se(out) * out``) and a skip gain ``g`` initialized
  to 0 (DeepMind's ``skipinit_gain=jnp.zeros``).

Recognized block structures (``STRUCTURES``; children and forward order read
from pytorch/vision ``torchvision/models/resnet.py`` and
huggingface/pytorch-image-models ``timm/models/resnet.py``,
``timm/models/resnetv2.py``, ``timm/layers/norm_act.py``):

* torchvision ``BasicBlock`` / ``Bottleneck`` (conv1, bn1, relu, conv2, bn2
  [, conv3, bn3], downsample; the same names in torchvision's early and
  current, typed, resnet.py);
* timm ``resnet.BasicBlock`` / ``Bottleneck`` (conv1, bn1, [drop_block], act1,
  [aa], conv2, bn2, ..., [se], [drop_path], downsample, act2/act3; read from
  timm 1.0; older releases whose optional children are None also fit);
* timm ``resnetv2.PreActBottleneck`` / ``PreActBasic`` (norm1, conv1, norm2,
  conv2[, norm3, conv3], drop_path, downsample taking the pre-activated input;
  norm layers with their activation inside, ``BatchNormAct2d`` / ``GroupNormAct``)
  and the non-pre-activation ``resnetv2.Bottleneck`` (... norm3, act3).

Blocks are found like :func:`normfree.find_blocks` finds foreign blocks: the
outermost modules whose children match one of these structures. Any other
residual module works when you name it: ``blocks=[...]`` (the modules, or
their qualified names) and optionally ``branches={block: module}`` naming the
last module of its residual branch, as for :func:`normfree.measure_signal`.
A named block with a named branch gets a :class:`~normfree.converted.BranchGain`
at that module; one without becomes :class:`~normfree.converted.SkipGain`
(``x + g * (M(x) - x)``, for blocks whose forward is ``x + f(x)``).

Departures, on purpose:

* ``nf`` on a post-activation block (torchvision / timm ResNet-V1: activation
  after the addition) moves that activation to the block input, the
  pre-activation form NF-ResNets use, so that the skip path carries the
  un-activated sum whose variance NF tracks; the last block's activation is
  kept after the last block (appended to its ``nn.Sequential``) so that the
  head still sees activated features. ``skipinit`` / ``none`` / ``gn`` keep the
  post-activation form: ``y = act(skip + s f(x))``, which at ``s = 0`` is the
  identity because the input of such a block is itself an activation output.
* NF's reset after a projection shortcut assumes a convolution of the
  pre-activated input, as in DeepMind's code; timm's average-pool shortcuts
  (``avg_down``, the "d" ResNets) lower that variance, so their betas are
  approximate there (measure with :func:`normfree.measure_signal`).
* Weights are carried over and not re-initialized: the classifier keeps its
  weights (the registry's SkipInit zero-initializes it, NF draws N(0, 0.01));
  plain convolutions keep their initialization (for ``none``/``skipinit`` the
  gain, not the init, keeps the signal bounded).
* Scaled WS is applied to every ``nn.Conv2d`` except the classifier
  (``model.get_classifier()``, or modules named ``fc`` / ``classifier`` /
  ``head``) and the convolutions inside squeeze-excite modules (DeepMind's SE
  uses plain linear layers).
* Activation modules lose ``inplace=True`` when normalization is removed: a
  ReLU that used to run in place on a BatchNorm's fresh output would otherwise
  overwrite the block input, which the skip path still needs.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .converted import BranchGain, ConvertedBlock, GroupNormAct, SkipGain, module_gamma
from .layers import ScaledStdConv2d
from .schemes import make_scheme

__all__ = ["convert", "STRUCTURES", "Structure", "find_structured_blocks"]


# --------------------------------------------------------------------------
# block structures, as data
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Structure:
    """How one family's residual block computes its output, by child names.

    required / absent: child names that must / must not exist (plus a
        ``downsample`` attribute, a module or None).
    preact: the pre-activation (a norm+act layer) applied to x before the
        branch and the projection shortcut, or None.
    branch: the residual branch's children in forward order (absent or None
        children are skipped: timm's optional drop_block, aa, se, drop_path).
    acts: the branch's activations (or norm+act layers): NF multiplies their
        output by gamma.
    post: the activation applied after the addition, or None.
    attn: a squeeze-excite-style attention in the branch (NF doubles its output).
    source: where the forward was read.
    """

    name: str
    required: Tuple[str, ...]
    absent: Tuple[str, ...]
    branch: Tuple[str, ...]
    acts: Tuple[str, ...]
    preact: Optional[str] = None
    post: Optional[str] = None
    attn: Optional[str] = None
    source: str = ""

    @property
    def children(self) -> set:
        names = set(self.required) | set(self.branch) | {"downsample"}
        return names | {n for n in (self.preact, self.post, self.attn) if n}


_TV = "pytorch/vision torchvision/models/resnet.py"
_TIMM = "huggingface/pytorch-image-models timm/models/resnet.py"
_TIMM2 = "huggingface/pytorch-image-models timm/models/resnetv2.py"

STRUCTURES: List[Structure] = [
    Structure("torchvision.Bottleneck", ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"),
              ("act1", "norm1"), ("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"),
              acts=("relu",), post="relu", source=_TV),
    Structure("torchvision.BasicBlock", ("conv1", "bn1", "conv2", "bn2", "relu"), ("conv3", "act1", "norm1"),
              ("conv1", "bn1", "relu", "conv2", "bn2"), acts=("relu",), post="relu", source=_TV),
    Structure("timm.resnet.Bottleneck", ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3"),
              ("relu", "norm1"),
              ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3", "se",
               "drop_path"), acts=("act1", "act2"), post="act3", attn="se", source=_TIMM),
    Structure("timm.resnet.BasicBlock", ("conv1", "bn1", "act1", "conv2", "bn2", "act2"), ("conv3", "relu", "norm1"),
              ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "se", "drop_path"),
              acts=("act1",), post="act2", attn="se", source=_TIMM),
    Structure("timm.resnetv2.PreActBottleneck", ("norm1", "conv1", "norm2", "conv2", "norm3", "conv3"),
              ("act3", "bn1"), ("conv1", "norm2", "conv2", "norm3", "conv3", "drop_path"),
              acts=("norm2", "norm3"), preact="norm1", source=_TIMM2),
    Structure("timm.resnetv2.PreActBasic", ("norm1", "conv1", "norm2", "conv2"), ("conv3", "norm3", "act3", "bn1"),
              ("conv1", "norm2", "conv2", "drop_path"), acts=("norm2",), preact="norm1", source=_TIMM2),
    Structure("timm.resnetv2.Bottleneck", ("conv1", "norm1", "conv2", "norm2", "conv3", "norm3", "act3"), ("bn1",),
              ("conv1", "norm1", "conv2", "norm2", "conv3", "norm3", "drop_path"), acts=("norm1", "norm2"),
              post="act3", source=_TIMM2),
]

METHODS = ("none", "skipinit", "nf", "gn", "ln", "in")
_NOT_CONVERTIBLE = {
    "bn": "it keeps batch normalization (the model you have is already that)",
    "relubn": "it keeps batch normalization",
    "nf_he": "it needs He-initialized plain convolutions, and convert keeps your weights; use 'nf'",
    "fixup": "Fixup re-initializes every branch (rescaled He init, zero last layer) and adds scalar biases "
             "before every layer; convert does not do that yet",
    "rescale": "RescaleNet also rescales the skip path of every block; convert does not do that yet",
}
_OPTIONS = ("alpha", "gain_init", "gain", "conv_bias")


def _match(m: nn.Module) -> Optional[Structure]:
    if not hasattr(m, "downsample"):
        return None
    kids = {n for n, c in m.named_children() if c is not None}
    for s in STRUCTURES:
        if all(n in kids for n in s.required) and not any(n in kids for n in s.absent):
            return s
    return None


def _looks_like_block(m: nn.Module) -> bool:
    kids = {n for n, _ in m.named_children()}
    return len(kids & {"conv1", "conv2", "bn1", "bn2", "norm1", "norm2"}) >= 3


def find_structured_blocks(model: nn.Module) -> List[Tuple[nn.Module, Structure]]:
    """(block, structure) for the outermost modules of ``model`` matching ``STRUCTURES``, in module order."""
    found, inside = [], set()
    for m in model.modules():
        if id(m) in inside:
            continue
        s = _match(m)
        if s is not None:
            found.append((m, s))
            inside.update(id(c) for c in m.modules())
    return found


def _structures_text() -> str:
    return "; ".join(f"{s.name} (children {', '.join(s.required)}, downsample)" for s in STRUCTURES)


# --------------------------------------------------------------------------
# normalization layers and convolutions
# --------------------------------------------------------------------------
_OTHER_NORMS = tuple(c for c in (getattr(nn, "RMSNorm", None),) if c is not None)


def _is_norm(m: nn.Module) -> bool:
    return (isinstance(m, (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm) + _OTHER_NORMS)
            or type(m).__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"))


def _is_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) or type(m).__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")


def _norm_act(m: nn.Module) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """(act, drop) of a norm+act layer (timm's BatchNormAct2d, GroupNormAct, ...), else (None, None)."""
    act = m._modules.get("act")
    drop = m._modules.get("drop")
    if act is None:
        return None, None
    if isinstance(drop, nn.Identity):
        drop = None
    return act, drop


def _without_norm(m: nn.Module) -> nn.Module:
    """What remains of a normalization layer when the normalization is removed."""
    act, drop = _norm_act(m)
    if act is None:
        return nn.Identity()
    return act if drop is None else nn.Sequential(drop, act)


def _group_norm(m: nn.Module, kind: str) -> nn.Module:
    """GroupNorm of ``kind`` (gn: gcd(32, C) groups, ln: 1, in: C) in place of batch norm ``m``,
    its affine weight and bias carried over; a norm+act layer keeps its activation."""
    c = m.num_features if hasattr(m, "num_features") else m.weight.numel()
    groups = {"gn": math.gcd(32, c), "ln": 1, "in": c}[kind]
    affine = getattr(m, "affine", True)
    eps = float(getattr(m, "eps", 1e-5))
    act, drop = _norm_act(m)
    gn = GroupNormAct(groups, c, act, drop, eps=eps, affine=affine) if act is not None else \
        nn.GroupNorm(groups, c, eps=eps, affine=affine)
    if affine and getattr(m, "weight", None) is not None:
        with torch.no_grad():
            gn.weight.copy_(m.weight.detach().reshape(-1))
            gn.bias.copy_(m.bias.detach().reshape(-1))
    return gn.to(device=m.weight.device, dtype=m.weight.dtype) if getattr(m, "weight", None) is not None else gn


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _replace_norms(model: nn.Module, kind: Optional[str]) -> int:
    """Remove every normalization layer (kind None) or put GroupNorm in place of every
    batch normalization (kind gn / ln / in). Returns how many were changed."""
    targets = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(t + ".") for t, _ in targets):
            continue
        if _is_norm(m) and (kind is None or _is_batch_norm(m)):
            targets.append((name, m))
    for name, m in targets:
        _set(model, name, _without_norm(m) if kind is None else _group_norm(m, kind))
    return len(targets)


def _to_scaled_std(conv: nn.Conv2d, bias: bool) -> ScaledStdConv2d:
    ws = ScaledStdConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=bias or conv.bias is not None, padding_mode=conv.padding_mode)
    ws = ws.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        ws.weight.copy_(conv.weight)
        if conv.bias is not None:
            ws.bias.copy_(conv.bias)
    return ws


def _classifier(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            m = get()
        except Exception:  # noqa: BLE001 - a foreign method; fall back to names
            m = None
        if isinstance(m, nn.Module):
            return m
    return None


def _replace_convs(model: nn.Module, keep: set, bias: bool) -> None:
    """Scaled WS in place of every nn.Conv2d of ``model`` not in ``keep`` (ids)."""
    classifier = _classifier(model)
    targets = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or isinstance(m, ScaledStdConv2d) or id(m) in keep:
            continue
        if m is classifier or name.rpartition(".")[2] in ("fc", "classifier", "head"):
            continue
        if type(m) is not nn.Conv2d and type(m).__name__ not in ("Conv2d", "StdConv2d"):
            raise ValueError(f"convert(method='nf') cannot turn {name} ({type(m).__name__}) into a Scaled WS "
                             f"convolution: only nn.Conv2d (and timm's StdConv2d) are converted, since a subclass "
                             f"may compute something else (padding, weights); replace it by an nn.Conv2d first")
        targets.append((name, m))
    for name, m in targets:
        _set(model, name, _to_scaled_std(m, bias))


def _no_inplace(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool) and not isinstance(m, nn.modules.dropout._DropoutNd):
            m.inplace = False


# --------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------
BlockRef = Union[nn.Module, str]


def _resolve(model: nn.Module, copy_: nn.Module, ref: BlockRef, what: str) -> Tuple[str, nn.Module]:
    """The qualified name of ``ref`` (a module of ``model`` or a name) and the module of ``copy_``."""
    if isinstance(ref, str):
        name = ref
    elif isinstance(ref, nn.Module):
        names = {id(m): n for n, m in model.named_modules()}
        if id(ref) not in names:
            raise ValueError(f"{what} ({type(ref).__name__}) is not a module of this {type(model).__name__}: "
                             f"pass modules taken from the model itself, or their names (e.g. 'layer1.0')")
        name = names[id(ref)]
    else:
        raise TypeError(f"{what} must be an nn.Module of the model or its qualified name, got {type(ref).__name__}")
    try:
        return name, copy_.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{what}: the model has no submodule {name!r}") from None


def _gain_init(scheme, options: dict, method: str, num_blocks: int) -> Optional[float]:
    if "gain_init" in options or "gain" in options:
        return scheme.initial_gain(num_blocks)
    if method == "nf":
        return 0.0  # DeepMind's NF-ResNet: skipinit_gain=jnp.zeros
    return scheme.initial_gain(num_blocks)


def convert(model: nn.Module, method: str = "skipinit", *, blocks: Optional[Sequence[BlockRef]] = None,
            branches: Optional[Dict[BlockRef, BlockRef]] = None, inplace: bool = False, **options) -> nn.Module:
    """A normalizer-free copy of the residual network ``model`` (see the module docstring).

    Args:
        model: an ``nn.Module`` with residual blocks (torchvision / timm ResNets
            are recognized; name others with ``blocks=``).
        method: "skipinit" (default), "nf", "none", "gn", "ln" or "in".
        blocks: the residual blocks to convert, in forward order (modules of
            ``model`` or their qualified names). Default: every recognized block.
        branches: {block: last module of its residual branch} for blocks that
            are not of a recognized structure (modules or names; the branch
            may also be given relative to the block).
        inplace: change ``model`` itself instead of a copy.
        **options: ``alpha`` (NF, default 0.2), ``gain_init`` / ``gain`` (the
            branch gain's initial value: a number, "1/sqrt(d)", or None for no
            gain; default 0 for skipinit and nf, none otherwise), ``conv_bias``
            (NF's convolutions get a bias, default True).

    Returns:
        the converted model (a copy unless ``inplace``), in the same train/eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert needs an nn.Module, got {type(model).__name__}")
    if method in _NOT_CONVERTIBLE:
        raise ValueError(f"method {method!r} is not available in convert: {_NOT_CONVERTIBLE[method]}; "
                         f"convert supports {list(METHODS)}")
    unknown = [k for k in options if k not in _OPTIONS]
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for convert; allowed: {list(_OPTIONS)} (the activations, "
                        f"stochastic depth and dropout of your model are kept as they are)")
    scheme = make_scheme(method, **options)  # unknown methods get make_scheme's "did you mean" error
    if method not in METHODS:  # a registered method this list does not know yet
        raise ValueError(f"method {method!r} is not available in convert; convert supports {list(METHODS)}")
    nf = scheme.nf_alpha is not None
    if nf and scheme.conv != "ws":
        raise ValueError("convert(method='nf') uses Scaled WS convolutions (conv='ws')")

    out = model if inplace else copy.deepcopy(model)
    plan = _plan(model, out, blocks, branches, nf)
    num_blocks = len(plan)
    g0 = _gain_init(scheme, options, method, num_blocks)

    # 1. normalization: removed, or batch norms replaced by GroupNorm
    _replace_norms(out, None if scheme.norm is None else scheme.norm)
    if scheme.norm is None:
        _no_inplace(out)
    # 2. NF: Scaled WS convolutions, except the classifier and squeeze-excite internals
    if nf:
        keep = set()
        for _, blk, s, _ in plan:
            attn = blk._modules.get(s.attn) if s is not None and s.attn else None
            if attn is not None:
                keep.update(id(m) for m in attn.modules())
        _replace_convs(out, keep, bias=scheme.conv_bias)
    # 3. blocks
    var, alpha = 1.0, scheme.nf_alpha
    last_post = None
    for name, blk, structure, branch in plan:
        blk = out.get_submodule(name)  # the norm / conv replacements above changed its children
        if structure is None:
            _set(out, name, _generic(blk, branch, g0))
            continue
        new = _converted(blk, structure, method, nf, g0, alpha, var if nf else None)
        _set(out, name, new)
        if nf:
            var = new.expected_var_out
            if structure.post is not None:
                last_post = (name, new)
    # 4. NF on post-activation blocks: keep the activation before the head
    if last_post is not None:
        _keep_final_activation(out, *last_post)
    return out


def _plan(model, out, blocks, branches, nf) -> List[Tuple[str, nn.Module, Optional[Structure], Optional[str]]]:
    """[(name, block in ``out``, structure or None, branch name relative to the block or None)]."""
    branches = dict(branches or {})
    if blocks is None:
        if branches:
            raise ValueError("branches= needs blocks= (the blocks whose branches they are)")
        found = find_structured_blocks(out)
        if not found:
            near = [f"{n} ({type(m).__name__}: children {[c for c, _ in m.named_children()]})"
                    for n, m in out.named_modules() if n and _looks_like_block(m)]
            hint = (f" Modules that look like residual blocks but match no known structure: {near[:4]}"
                    + (" ..." if len(near) > 4 else "") + ".") if near else ""
            raise ValueError(
                f"convert found no residual blocks in {type(model).__name__}.{hint} Recognized structures: "
                f"{_structures_text()}. For other models pass blocks=[...] (the residual block modules or their "
                f"names, in order) and branches={{block: last module of its residual branch}}")
        names = {id(m): n for n, m in out.named_modules()}
        plan = []
        for m, s in found:
            _check_children(names[id(m)], m, s)
            plan.append((names[id(m)], m, s, None))
        return plan
    if isinstance(blocks, (nn.Module, str)):
        blocks = [blocks]
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks is empty: pass the residual block modules of the model (or their names), in order")
    plan, seen = [], set()
    for i, ref in enumerate(blocks):
        name, blk = _resolve(model, out, ref, f"blocks[{i}]")
        if name in seen:
            raise ValueError(f"blocks[{i}] ({name}) is listed twice")
        if not name:
            raise ValueError(f"blocks[{i}] is the model itself: pass its residual blocks")
        seen.add(name)
        plan.append([name, blk, None, None])
    by_name = {p[0]: p for p in plan}
    for key, value in branches.items():
        bname, _ = _resolve(model, out, key, "a key of branches")
        if bname not in by_name:
            raise ValueError(f"branches has a key ({bname}) that is not one of blocks; keys must be entries of blocks")
        if isinstance(value, str) and not value.startswith(bname + "."):
            value = f"{bname}.{value}" if value else value
        vname, _ = _resolve(model, out, value, f"branches[{bname}]")
        if not vname.startswith(bname + "."):
            raise ValueError(f"branches[{bname}] ({vname}) is not inside the block {bname}")
        by_name[bname][3] = vname[len(bname) + 1:]
    for p in plan:
        if p[3] is None:
            p[2] = _match(p[1])
            if p[2] is not None:
                _check_children(p[0], p[1], p[2])
        if nf and p[2] is None:
            raise ValueError(
                f"convert(method='nf') needs to know where the activations of each block are, and block {p[0]} "
                f"({type(p[1]).__name__}) is not of a recognized structure ({_structures_text()}). Use "
                f"method='skipinit' (or 'none', 'gn', 'ln') for it")
    for i, (name, _, _, _) in enumerate(plan):
        for other, _, _, _ in plan[i + 1:]:
            if other.startswith(name + ".") or name.startswith(other + "."):
                raise ValueError(f"blocks {name} and {other} are nested: pass each residual block once")
    return [tuple(p) for p in plan]


def _check_children(name: str, m: nn.Module, s: Structure) -> None:
    extra = [c for c, mod in m.named_children() if mod is not None and c not in s.children]
    if extra:
        raise ValueError(
            f"block {name} ({type(m).__name__}) matches the {s.name} structure but also has the children {extra}, "
            f"whose place in its forward convert does not know; pass blocks=[...] and branches={{block: last module "
            f"of its residual branch}} to convert it as a generic residual block")
    for c, mod in m.named_children():
        if (c.startswith("bn") or c.startswith("norm")) and not (_is_norm(mod) or isinstance(mod, nn.Identity)):
            raise ValueError(
                f"block {name} ({type(m).__name__}): {c} is a {type(mod).__name__}, which convert does not know as "
                f"a normalization layer (it knows torch's BatchNorm, GroupNorm, LayerNorm, InstanceNorm and timm's "
                f"norm+act layers built on them, such as BatchNormAct2d and GroupNormAct)")


def _converted(blk: nn.Module, s: Structure, method: str, nf: bool, g0, alpha, expected_var) -> ConvertedBlock:
    kids = dict(blk.named_children())
    kids["downsample"] = getattr(blk, "downsample", None)
    order = [n for n in s.branch if kids.get(n) is not None and not _removed(n, kids[n])]
    keep = {n: kids[n] for n in kids if kids[n] is not None and not _removed(n, kids[n])}
    if not nf:
        return ConvertedBlock(keep, structure=s.name, method=method, order=order, pre=s.preact, post=s.post,
                              shortcut_preact=s.preact is not None, gain_init=g0)
    pre = s.preact if s.preact is not None else s.post  # NF: the activation moves to the block input
    for n in list(s.acts) + [pre]:
        if kids.get(n) is None or _removed(n, kids[n]) or _is_norm(kids[n]):
            raise ValueError(f"convert(method='nf'): {n} of a {s.name} block is a {type(kids.get(n)).__name__}, "
                             f"not an activation; convert knows torch's norm layers and timm's norm+act layers")
    pre_mod = keep[pre]  # not in place: _no_inplace ran (the block input is the skip path)
    gammas: Dict[int, float] = {}

    def gamma(m):
        if id(m) not in gammas:
            gammas[id(m)] = module_gamma(m)
        return gammas[id(m)]

    scales = {n: gamma(keep[n]) for n in s.acts if n in keep}
    if s.attn and s.attn in keep:
        scales[s.attn] = 2.0  # DeepMind: out = 2 * se(out) * out (the sigmoid gate is ~0.5 at init)
    beta = math.sqrt(expected_var)
    return ConvertedBlock(keep, structure=s.name, method=method, order=order, pre=pre, post=None,
                          shortcut_preact=True, scales=scales, pre_scale=gamma(pre_mod) / beta, gain_init=g0,
                          alpha=alpha, expected_var=expected_var)


def _removed(name: str, m: Optional[nn.Module]) -> bool:
    """A normalization child that the norm removal turned into nn.Identity."""
    return isinstance(m, nn.Identity) and (name.startswith("bn") or name.startswith("norm"))


def _generic(blk: nn.Module, branch: Optional[str], g0) -> nn.Module:
    """A named block of no known structure: a SkipGain around it, or a BranchGain at
    its named branch end (unchanged when the method has no gain)."""
    if g0 is None:
        return blk
    if branch is None:
        return SkipGain(blk, init=g0)
    _set(blk, branch, BranchGain(blk.get_submodule(branch), init=g0))
    return blk


def _keep_final_activation(out: nn.Module, name: str, block: ConvertedBlock) -> None:
    """NF on post-activation blocks: the last block's activation, which the head saw, after the last block."""
    act = copy.deepcopy(block._modules[block.pre])
    parent_name, _, attr = name.rpartition(".")
    parent = out.get_submodule(parent_name) if parent_name else out
    if isinstance(parent, nn.Sequential) and list(parent._modules)[-1] == attr:
        parent.append(act)
    else:  # not the last of a Sequential: apply it inside the block, after the addition
        block.add_module("final_act", act)
        block.post = "final_act"
