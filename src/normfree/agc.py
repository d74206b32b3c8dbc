"""Adaptive gradient clipping (AGC; Brock, De, Smith, Simonyan 2021, "High-
Performance Large-Scale Image Recognition Without Normalization", NFNets).

For every unit i of a parameter W with gradient G (a row of a Linear weight,
an output filter of a conv weight; a scalar, a vector or a gain of shape
(C, 1, 1, 1) is one unit; :func:`unitwise_norm`, after DeepMind's
deepmind-research/nfnets/agc_optax.py):

    if ||G_i|| > lambda * max(||W_i||, eps):
        G_i <- G_i * lambda * max(||W_i||, eps) / max(||G_i||, 1e-6)

Norms are Frobenius norms over dims (1, 2, 3) of a conv weight [out, in, kh, kw]
and dim 1 of a Linear weight [out, in] (every dim but the first). Defaults
lambda = 0.01, eps = 1e-3; the final classifier is not clipped.

:func:`adaptive_clip_grad_` clips in place; :class:`AGC` wraps any
``torch.optim`` optimizer so that ``step()`` clips, then steps. Works on any
``nn.Module``'s parameters.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Union

import torch
import torch.nn as nn
from torch.optim import Optimizer

ParamsLike = Union[torch.Tensor, Iterable[torch.Tensor]]


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm of each unit of ``x``, shaped to broadcast against ``x``.

    Scalars, vectors and tensors whose dims after the first are all 1 (a
    Scaled-WS gain of shape (C, 1, 1, 1)) are one unit: the norm of everything,
    as in DeepMind's nfnets/agc_optax.py (``len(jnp.squeeze(x).shape) <= 1``).
    Otherwise one norm per slice along dim 0 (rows of a Linear weight, output
    filters of a conv weight), over all other dims, with keepdim: the official
    code's axis 0 of an (in, out) Linear kernel and axes (0, 1, 2) of an HWIO
    conv kernel, in PyTorch's (out, ...) layout.
    """
    if all(n == 1 for n in x.shape[1:]):
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


def _check(clipping: float, eps: float) -> None:
    if not (isinstance(clipping, (int, float)) and clipping > 0):
        raise ValueError(f"clipping (lambda) must be a number > 0, got {clipping!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


@torch.no_grad()
def adaptive_clip_grad_(parameters: ParamsLike, clipping: float = 0.01, eps: float = 1e-3) -> torch.Tensor:
    """Clip the gradients of ``parameters`` unit-wise, in place (formula in the
    module docstring). Parameters whose ``.grad`` is None are skipped.

    Returns the number of clipped units as a 0-d tensor (call ``.item()`` only
    if you need it: on a GPU that waits for the device).
    """
    _check(clipping, eps)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clipped = None
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise ValueError(f"adaptive_clip_grad_ does not support sparse gradients (parameter of shape {tuple(p.shape)})")
        max_norm = unitwise_norm(p.detach()).clamp_(min=eps).mul_(clipping)
        g_norm = unitwise_norm(g)
        too_big = g_norm > max_norm
        # factor is exactly 1 where a unit is within bounds
        factor = torch.where(too_big, max_norm / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
        g.mul_(factor.to(g.dtype))
        n = too_big.sum()
        clipped = n if clipped is None else clipped + n
    return clipped if clipped is not None else torch.zeros((), dtype=torch.int64)


def classifier_exclude(head: Optional[nn.Module]) -> List[torch.Tensor]:
    """What AGC leaves alone of a classifier ``head``: its weight only, as the
    NFNet authors' ``experiment_nfnets.py`` does (the final linear layer's
    weights go to a group with ``clipping=None``; its bias is clipped with the
    other gains and biases). A head without a ``weight``: all its parameters."""
    if head is None:
        return []
    weight = getattr(head, "weight", None)
    return [weight] if isinstance(weight, torch.Tensor) else list(head.parameters())


def default_exclude(model: Optional[nn.Module]) -> List[torch.Tensor]:
    """Parameters AGC leaves alone by default: the weight of ``model``'s final
    classifier as :func:`normfree.factory.find_classifier` finds it
    (``get_classifier()``, else ``fc`` / ``head`` / ``classifier``), see
    :func:`classifier_exclude`; nothing when none is found."""
    if model is None:
        return []
    from .factory import find_classifier  # local import: AGC itself works on any nn.Module

    return classifier_exclude(find_classifier(model)[1])


def _resolve_exclude(model: Optional[nn.Module], exclude) -> List[torch.Tensor]:
    if exclude is None:
        return default_exclude(model)
    if isinstance(exclude, (str, nn.Module, torch.Tensor)):
        exclude = [exclude]
    out: List[torch.Tensor] = []
    for item in exclude:
        if isinstance(item, str):
            if model is None:
                raise ValueError(f"exclude={item!r} names a module or parameter: pass model= too")
            modules, params = dict(model.named_modules()), dict(model.named_parameters())
            if item in params:
                out.append(params[item])
            elif item in modules:
                out.extend(modules[item].parameters())
            else:
                raise ValueError(f"exclude: {item!r} is neither a module nor a parameter of the model; "
                                 f"modules: {[n for n in modules if n][:20]}")
        elif isinstance(item, nn.Module):
            out.extend(item.parameters())
        elif isinstance(item, torch.Tensor):
            out.append(item)
        else:
            raise TypeError(f"exclude items must be names, modules or parameters, got {type(item).__name__}")
    return out


class AGC(Optimizer):
    """Wrap any optimizer so that ``step()`` applies adaptive gradient clipping
    to the gradients of its parameters, then steps.

    ``param_groups``, ``state``, ``defaults``, ``state_dict()``,
    ``load_state_dict()``, ``zero_grad()`` and ``add_param_group()`` are the
    wrapped optimizer's own, so ``torch.optim.lr_scheduler`` schedulers,
    ``torch.amp.GradScaler`` (clipping sees unscaled gradients) and
    checkpoints work unchanged; the state dict is exactly the wrapped
    optimizer's and loads into either.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer``).
        model: lets the default ``exclude`` find the model's classifier
            (``get_classifier()``, else ``fc`` / ``head`` / ``classifier``) and
            leave its weight unclipped (the NFNet authors' rule; its bias is
            clipped), and lets ``exclude`` name modules. A model without one of these: nothing is excluded
            unless asked.
        clipping: lambda (0.01); smaller for larger batches.
        eps: floor on ||W_i|| (1e-3), so zero-initialized weights can move.
        exclude: None (default above), or names / modules / parameters not to clip
            (``()`` clips everything, ``["head"]`` skips ``model.head``).
    """

    def __init__(self, optimizer: Optimizer, model: Optional[nn.Module] = None, clipping: float = 0.01,
                 eps: float = 1e-3, exclude=None):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"AGC wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check(clipping, eps)
        self.optimizer = optimizer
        self.clipping, self.eps = float(clipping), float(eps)
        self.excluded: List[torch.Tensor] = _resolve_exclude(model, exclude)
        # Optimizer's own bookkeeping (hook registries, step profiling) without
        # building new param groups: __setstate__ creates exactly those.
        Optimizer.__setstate__(self, {})

    # --- everything below is the wrapped optimizer's ------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __getstate__(self):
        return {"optimizer": self.optimizer, "clipping": self.clipping, "eps": self.eps,
                "excluded": self.excluded}

    def __repr__(self) -> str:
        return (f"AGC(clipping={self.clipping:g}, eps={self.eps:g}, excluded={len(self.excluded)} tensors)"
                f" wrapping {self.optimizer!r}")

    # --- AGC -----------------------------------------------------------------
    def clipped_parameters(self) -> List[torch.Tensor]:
        """The parameters that ``step()`` clips (all but the excluded ones)."""
        skip = {id(p) for p in self.excluded}
        return [p for group in self.param_groups for p in group["params"] if id(p) not in skip]

    def clip(self) -> torch.Tensor:
        """Clip the gradients now; returns the number of clipped units (0-d tensor)."""
        return adaptive_clip_grad_(self.clipped_parameters(), self.clipping, self.eps)

    def step(self, closure=None):
        """Clip, then step the wrapped optimizer. With a ``closure`` it is
        evaluated once first (to compute the gradients that get clipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.clip()
        self.optimizer.step()
        return loss
