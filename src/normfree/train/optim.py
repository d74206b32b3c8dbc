"""Optimizer and learning-rate schedule: parameter groups (weight decay only
on conv/linear weights; scalars at their own learning rate), SGD/AdamW
(+ AGC), warmup then cosine/step/constant."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..layers import ScalarBias, ScalarGain
from .config import SCHEDULES, TrainConfig


def lr_factor(step: int, total: int, warmup: int, schedule: str,
              milestones: Tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """Multiplier of the peak lr at 0-based ``step`` of ``total``.

    Warmup: (step + 1) / warmup for step < warmup (linear). Then cosine:
    0.5 (1 + cos(pi t)), t = (step - warmup) / (total - warmup) (Loshchilov &
    Hutter 2017); step: gamma^(number of milestones <= step / total); constant: 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if schedule == "step":
        return gamma ** sum(step >= m * total for m in milestones)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def param_groups(model: nn.Module, weight_decay: float, scalar_lr_mult: float = 1.0) -> List[Dict[str, Any]]:
    """Optimizer parameter groups.

    "decay": conv/linear weights (parameters named ``weight`` with dim > 1) get
    ``weight_decay``; "no_decay": gains, biases and norm parameters get none;
    "scalar": 0-dim parameters and those of ScalarBias/ScalarGain modules (Fixup's
    scalars), no decay and lr x ``scalar_lr_mult``. Each group carries ``lr_mult``.
    """
    owner = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owner[id(p)] = mod
    groups: Dict[str, List[nn.Parameter]] = {"decay": [], "no_decay": [], "scalar": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 0 or isinstance(owner.get(id(p)), (ScalarBias, ScalarGain)):
            groups["scalar"].append(p)
        elif p.dim() > 1 and name.rsplit(".", 1)[-1] == "weight":
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    out = []
    for key, wd, mult in (("decay", weight_decay, 1.0), ("no_decay", 0.0, 1.0), ("scalar", 0.0, scalar_lr_mult)):
        if groups[key]:
            out.append({"params": groups[key], "weight_decay": wd, "lr_mult": mult, "name": key})
    return out


def make_optimizer(model: nn.Module, cfg: TrainConfig, agc_exclude: Optional[List[nn.Parameter]] = None
                   ) -> torch.optim.Optimizer:
    """SGD or AdamW over :func:`param_groups`, wrapped in AGC when ``cfg.effective_agc()``.

    AGC leaves out ``agc_exclude``; by default the classifier that
    :func:`normfree.factory.find_classifier` finds (``cfg.classifier`` names it;
    nothing is left out when none is found)."""
    groups = param_groups(model, cfg.weight_decay, cfg.effective_scalar_lr_mult())
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.effective_agc() is not None:
        from ..agc import AGC, classifier_exclude

        if agc_exclude is None:
            from ..factory import find_classifier

            head = find_classifier(model, cfg.classifier)[1]
            agc_exclude = classifier_exclude(head)
        opt = AGC(opt, model=model, clipping=cfg.effective_agc(), eps=cfg.agc_eps, exclude=agc_exclude)
    return opt


class Schedule:
    """The learning rate of every step of a run: ``cfg.lr x lr_factor(step, total, warmup, ...)``."""

    def __init__(self, cfg: TrainConfig, total_steps: int, warmup_steps: int):
        self.lr, self.total, self.warmup = cfg.lr, total_steps, warmup_steps
        self.kind, self.milestones, self.gamma = cfg.schedule, tuple(cfg.milestones), cfg.lr_gamma

    def factor(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.kind, self.milestones, self.gamma)

    def apply(self, opt: torch.optim.Optimizer, step: int) -> None:
        """Set every group's lr for 0-based ``step`` (groups scale it by their ``lr_mult``)."""
        f = self.factor(step)
        for g in opt.param_groups:
            g["lr"] = self.lr * g["lr_mult"] * f

    def record(self) -> Dict[str, Any]:
        """What fixes the schedule (stored in checkpoints, compared on resume)."""
        return {"lr": self.lr, "schedule": self.kind, "total_steps": self.total, "warmup_steps": self.warmup,
                "milestones": list(self.milestones), "lr_gamma": self.gamma}

    def depends_on_length(self) -> bool:
        """True when a different total number of steps changes some step's lr."""
        return self.kind != "constant"
