"""Export a BN-free model as plain convolutions with its scalars folded in.

:func:`fold_model` returns a copy of a model in which every convolution is a
plain convolution (:class:`normfree.layers.Conv2d`, an ``nn.Conv2d`` with the
same forward) holding its *effective* weight, and no residual block carries a
scalar multiplier any more. A convolution is linear, so

    out_scale * conv(in_scale * x; W, b) = conv(x; in_scale * out_scale * W, out_scale * b)

is exact; folded are Scaled Weight Standardization with its gain (Brock et al.
2021), NF-ResNet's gamma/beta on the pre-activation and gamma on the mid
activations, alpha, the SkipInit / Fixup branch gain, RescaleNet's b_l, the
Fixup bias after the branch (added to the last conv's bias), and NF's head
gamma (into the classifier). Where a squeeze-excite ends the branch (NFNets)
s_branch goes into its gate's constant factor instead (``gate_scale``). Left as they are: Fixup's scalar biases *before*
convolutions (``conv(x + b)`` is not ``conv(x) + const`` at zero-padded
borders), RescaleNet's a_l on the skip path (one fused add already), and
stochastic depth. Models with normalization layers are refused.

:func:`export_model` writes a model (folded when it is BN-free) as a
``torch.export`` program that runs without normfree (``normfree export`` on
the command line).
"""
from __future__ import annotations

import copy
import io
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from .atomic import write_bytes
from .blocks import ResidualBlock
from .layers import Conv2d, Scale

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _plain_conv(conv: Conv2d, in_scale: Scale = None, out_scale: Scale = None,
                extra_bias: Optional[torch.Tensor] = None) -> Conv2d:
    """A plain Conv2d computing ``out_scale * conv(in_scale * x) + extra_bias``."""
    w, b = conv.folded_weight_bias(in_scale, out_scale, extra_bias)
    new = Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                 padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=b is not None,
                 padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if b is not None:
        new.bias.copy_(b)
    return new.train(conv.training)


def _fold_block(block: ResidualBlock) -> None:
    """Fold the block's scalars (its public parts: ``in_scale``, ``mid_scale``,
    ``branch_scale()``, ``branch_bias()``) into plain copies of its
    convolutions, then drop them: the block computes the same with none left."""
    if block.shortcut_uses_preact:
        block.shortcut = _plain_conv(block.shortcut, in_scale=block.in_scale)
    last = len(block.convs) - 1
    for i, conv in enumerate(block.convs):
        in_scale = block.in_scale if i == 0 else block.mid_scale
        if i < last:
            block.convs[i] = _plain_conv(conv, in_scale)
        elif block.se is not None and block.se_index == last:  # NFNet: s_branch * se(conv(..)) -> the SE's gate
            block.convs[i] = _plain_conv(conv, in_scale)
            s = block.branch_scale()
            block.se.gate_scale *= 1.0 if s is None else float(s)
        else:  # s_branch * conv(..) + b (Fixup's bias after the branch)
            block.convs[i] = _plain_conv(conv, in_scale, block.branch_scale(), block.branch_bias())
    block.in_scale = block.mid_scale = block.branch_const = None
    block.gain = block.out_bias = None
    block.expected_var = None  # alpha is in the weights now: nothing left to track


def fold_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with plain convolutions and every foldable scalar
    folded into their weights (see the module docstring); outputs and input
    gradients equal the original's up to float rounding. ``model`` is not changed.

    Raises ValueError for models with normalization layers (methods bn,
    relubn, gn, ln, in): their blocks carry no scalar to fold.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_model expects an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, _NORMS):
            raise ValueError(f"fold_model folds the scalars of BN-free models, but {name!r} is a "
                             f"{type(m).__name__}; methods with normalization layers (bn, relubn, gn, "
                             f"ln, in) have nothing to fold")
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for block in [m for m in folded.modules() if isinstance(m, ResidualBlock)]:
            _fold_block(block)
        # every remaining conv (stem, ...): effective weight -> plain conv
        for parent in list(folded.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv2d) and type(child) is not Conv2d:
                    setattr(parent, name, _plain_conv(child))
        head = getattr(folded, "head_scale", None)
        fc = getattr(folded, "fc", None)
        if head is not None and isinstance(fc, nn.Linear):  # NF: gamma after the pool -> classifier
            fc.weight.mul_(head)
            folded.head_scale = None
    return folded


def export_model(model: nn.Module, example: torch.Tensor, path: str, *, fold: bool = True,
                 rtol: float = 1e-4, atol: float = 1e-5) -> Dict[str, Any]:
    """Save ``model`` as a ``torch.export`` program with a dynamic batch
    dimension (``torch.export.load(path).module()(x)`` runs it, without normfree).

    A BN-free model is first folded by :func:`fold_model` (plain convolutions,
    no scalars left) unless ``fold=False``; a model with normalization layers
    is exported as it is. Both are exported in eval mode. Before anything is
    written the exported program is run on ``example`` (N >= 2 samples) and
    compared with ``model``: ValueError if any output differs by more than
    ``atol + rtol * |reference|``. The file is written atomically
    (:func:`normfree.atomic.write_bytes`). Returns
    ``{"path", "folded", "max_abs_diff"}``.
    """
    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 2:
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise ValueError(f"example must be a batch of at least 2 inputs (the batch size stays dynamic), got {shape}")
    was_training = model.training
    model.eval()
    try:
        foldable = fold and not any(isinstance(m, _NORMS) for m in model.modules())
        target = fold_model(model) if foldable else copy.deepcopy(model)
        target.eval()
        batch = torch.export.Dim("batch", min=2)
        program = torch.export.export(target, (example,), dynamic_shapes=({0: batch},))
        with torch.no_grad():
            want = model(example)
            got = program.module()(example)
    finally:
        model.train(was_training)
    diff = float((got - want).abs().max())
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        raise ValueError(f"the exported program's outputs differ from the model's by up to {diff:.3g} "
                         f"(allowed: atol {atol:g} + rtol {rtol:g} x |output|); nothing written")
    buffer = io.BytesIO()  # serialized in memory: a failed file write (disk full) is then a plain OSError
    torch.export.save(program, buffer)
    write_bytes(path, buffer.getvalue())
    return {"path": path, "folded": foldable, "max_abs_diff": diff}
