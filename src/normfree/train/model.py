"""The model of a run: given to :func:`normfree.train` or built from
``cfg.model`` under the seed (:mod:`normfree.factory`), converted when
``cfg.convert`` asks, moved to the device, checked on two training samples,
and described by the record a checkpoint stores to rebuild it (``model_info``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn

from ..factory import build_model, class_name, factory_name, importable_spec
from .config import TrainConfig

ModelArg = Union[nn.Module, Callable[..., nn.Module], None]


def adopt(cfg: TrainConfig, model: ModelArg, dataset) -> TrainConfig:
    """The configuration that records a model and data passed to ``train``:
    ``model`` None (or the importable spec of a model-building callable),
    ``data`` None for a torch Dataset / DataLoader. Validated again, so depth,
    width, dropout and drop_path must be unset with a passed model."""
    from .torchdata import is_torch_data

    changes: Dict[str, Any] = {}
    if model is not None:
        if isinstance(model, nn.Module):
            if cfg.model_options:
                raise ValueError(f"model_options {cfg.model_options} are arguments of a model factory; the "
                                 f"model passed to train() is already built")
            changes["model"] = None
        elif callable(model):
            changes["model"] = importable_spec(model)
        else:
            raise TypeError(f"model must be an nn.Module or a callable returning one, got {type(model).__name__}")
    if dataset is not None and is_torch_data(dataset):
        changes["data"] = None
    return dataclasses.replace(cfg, **changes) if changes else cfg


@dataclass
class BuiltModel:
    model: nn.Module
    num_classes: int
    info: Dict[str, Any]   # model_info: source, spec, class, factory, num_classes, in_chans, convert


def make_model(cfg: TrainConfig, data, given: ModelArg, device: torch.device,
               say: Callable[[str], None]) -> BuiltModel:
    """The run's model on ``device`` (``given``, or built from ``cfg.model``
    under ``cfg.seed``), converted when ``cfg.convert``; a model that is not a
    registered normfree one is checked on two training samples (:func:`check_model`)."""
    if cfg.in_chans is not None and data.in_chans is not None and cfg.in_chans != data.in_chans:
        raise ValueError(f"in_chans={cfg.in_chans} but the data {data.name!r} has {data.in_chans} channels")
    num_classes = cfg.num_classes or data.num_classes
    if num_classes is not None and data.num_classes is not None and num_classes < data.num_classes:
        raise ValueError(f"num_classes={num_classes} is smaller than the data's {data.num_classes} classes")
    in_chans = data.in_chans if data.in_chans is not None else cfg.in_chans
    torch.manual_seed(cfg.seed)
    if isinstance(given, nn.Module):
        model, source = given, "module"
        if cfg.convert is not None:
            from ..convert import convert

            model = convert(model, cfg.convert)
    else:
        if num_classes is None:
            raise ValueError(f"the data {data.name!r} do not say how many classes they have (no 'classes' "
                             f"attribute): give num_classes")
        source = "registry" if cfg.registered and given is None else ("callable" if given is not None else "spec")
        model = build_model(given if given is not None else cfg.model, num_classes=num_classes, in_chans=in_chans,
                            convert=cfg.convert, options=cfg._model_options() if cfg.registered else cfg.model_options,
                            depth=cfg.depth, width=cfg.width)
    info = {"source": source, "spec": cfg.model, "class": class_name(model),
            "factory": factory_name(given) if source == "callable" else None,
            "num_classes": num_classes, "in_chans": in_chans, "convert": cfg.convert}
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"the model ({type(model).__name__}) has no parameters to train")
    if getattr(getattr(model, "scheme", None), "data_init", None) == "lsuv":
        lsuv_on_data(model, data, cfg.batch_size, cfg.channels_last, device, say)
    if source != "registry":
        outputs = check_model(model, data, num_classes, cfg.channels_last, device)
        if num_classes is None:
            num_classes = outputs
        elif outputs != num_classes:
            say(f"note: the model has {outputs} outputs for {num_classes} classes")
        info["num_classes"] = outputs
    return BuiltModel(model, num_classes, info)


def lsuv_on_data(model: nn.Module, data, batch_size: int, channels_last: bool, device: torch.device,
                 say: Callable[[str], None]) -> None:
    """A method with ``data_init="lsuv"`` (the ``lsuv`` scheme) is initialized
    by :func:`normfree.lsuv_init` on the run's first training batch, before the
    optimizer exists (deterministic under the run's seed; on ``--resume`` the
    checkpoint's weights replace it). Under DDP, DDP broadcasts rank 0's result."""
    from ..lsuv import lsuv_init

    if data.probe is None:
        x, _ = next(iter(data.batches))
        data.batches.set_epoch(0)
    else:
        from .torchdata import first_batch

        x, _ = first_batch(data.batches, samples=batch_size)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    records = lsuv_init(model, x.to(device))
    off = [r.name for r in records if not r.converged]
    say(f"LSUV: {len(records)} layers initialized to unit output variance on one training batch of "
        f"{x.shape[0]} samples" + (f" (not converged: {', '.join(off)})" if off else ""))


def check_model(model: nn.Module, data, num_classes: Optional[int], channels_last: bool,
                device: torch.device) -> int:
    """One eval-mode forward of two training samples: the output must be
    (N, classes) with a column for every class of the data (a clear error
    instead of a failure deep inside the first step). No random stream and no
    running statistic changes. Returns the number of outputs."""
    if data.probe is None:
        x, y = next(iter(data.batches))
        data.batches.set_epoch(0)
        x, y = x[:2], y[:2]
    else:
        x, y = data.probe()
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            out = model(x)
    except Exception as e:  # noqa: BLE001 - the user's model: say what it was given
        raise ValueError(f"the model ({type(model).__name__}) fails on the training inputs of shape "
                         f"{tuple(x.shape)}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model ({type(model).__name__}) must return logits of shape (N, classes) in "
                         f"eval mode; for inputs {tuple(x.shape)} it returned {got}")
    need = max(num_classes or 0, int(y.max()) + 1 if y.numel() else 0)
    if out.shape[1] < need:
        raise ValueError(f"the model ({type(model).__name__}) has {out.shape[1]} outputs, but the data have "
                         f"{need} classes: build it with num_classes={need}")
    return int(out.shape[1])
