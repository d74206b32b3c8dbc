"""Checkpoints: written atomically, loaded with ``weights_only=True``, checked
before use, and compared with the run that wants to continue them.

A checkpoint (``OUT/checkpoint.pt``) holds only tensors, numbers, strings,
lists and dicts: the model and optimizer state, the step / epoch / batch
position, the per-step losses, the RNG state, and as JSON strings the
configuration, the metric history, the input record (shape, normalization,
classes) and, since format 2, the fingerprint of the data and the learning-rate
schedule (:func:`check_resumable` refuses to continue a run on other data,
or on another schedule unless asked to), and for models that are not
registered normfree names the record of how to rebuild them (``model_info``:
factory spec or class, classes, input channels, conversion).

Any file that is not a readable, consistent normfree checkpoint (empty,
truncated, random bytes, a pickle that asks to run code, another program's
file, a configuration that disagrees with the weights) raises ValueError
"cannot read PATH: ..." or "corrupt or inconsistent checkpoint PATH: ...",
before anything large is allocated.
"""
from __future__ import annotations

import io
import json
import os
import re
import warnings
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..atomic import write_bytes
from ..factory import Factory, build_model, factory_name
from ..models import create_model, make_arch, parse_model_name
from .config import FIXUP_SCALAR_LR_MULT, RESUMABLE_CHANGES, TrainConfig
from .feed import describe_fingerprint

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: + data fingerprint and schedule


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """``torch.save`` ``state`` to ``path`` atomically (unique temporary file,
    fsync, rename): a failed write (disk full) keeps the previous checkpoint.

    The state is serialized in memory first and then written with plain file
    writes: torch's zip writer turns a failing write into an unspecific
    RuntimeError ("unexpected pos"), a plain write gives the OSError (ENOSPC,
    EFBIG, EIO ...) that says what happened."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getbuffer())


def _load_failure(e: BaseException) -> str:
    """torch.load's error as a short reason, without its advice to load unsafely."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return (f"it refers to the Python object {m.group(1)}, which is never loaded (a checkpoint holds "
                f"tensors, numbers and strings only)")
    if isinstance(e, EOFError) or not text.strip():
        return "the file is empty or truncated"
    if "central directory" in text or "zip archive" in text:
        return "truncated or damaged (its zip archive is incomplete)"
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:
        return f"not a checkpoint file (unreadable data: pickle operand {m.group(1)})"
    m = re.search(r'hasRecord\("([^"]+)"\)', text)
    if m:  # a zip archive, but not torch's layout (torch's one line ends in "please report ... to PyTorch")
        return f"not a checkpoint file (a zip archive without torch's {m.group(1)!r} record)"
    skip = ("weights_only", "PyTorch", "Please file", "Check the documentation", "trusted source")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not any(s in ln for s in skip)]
    return "; ".join(lines)[:300] or type(e).__name__


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (torch's load_state_dict errors span several)."""
    text = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(f"corrupt or inconsistent checkpoint {path}: {why}")


def checkpoint_path(path: str) -> str:
    """``path`` itself, or ``path/checkpoint.pt`` for a run directory."""
    return os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`normfree.train` (``weights_only=True``);
    its ``config``, ``history``, ``input``, ``data`` and ``schedule`` entries are
    decoded from JSON (``input`` is None in checkpoints written before it was
    stored, ``data`` and ``schedule`` in format-1 checkpoints). ``path`` may
    be the run directory holding ``checkpoint.pt``.

    Raises FileNotFoundError, or ValueError naming the file and what is wrong
    with it (unreadable, unsafe, not normfree's, inconsistent)."""
    path = checkpoint_path(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r} (give checkpoint.pt or the run directory holding it)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notes about a file we refuse anyway
            raw = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, MemoryError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from e
        raise ValueError(f"cannot read {path}: {_load_failure(e)}") from None
    except Exception as e:  # truncated, corrupt, unsafe or foreign file: one clear line
        raise ValueError(f"cannot read {path}: {_load_failure(e)}") from None
    if not isinstance(raw, dict) or "model" not in raw or "config" not in raw:
        what = f"a {type(raw).__name__}" if not isinstance(raw, dict) else f"a dict with keys {sorted(map(str, raw))[:8]}"
        raise ValueError(f"cannot read {path}: not a normfree checkpoint (it holds {what})")
    ckpt = dict(raw)
    try:
        ckpt["config"] = json.loads(ckpt["config"])
        ckpt["history"] = json.loads(ckpt.get("history", "[]"))
        for key in ("input", "data", "schedule", "model_info"):
            ckpt[key] = json.loads(ckpt[key]) if key in ckpt else None
    except (TypeError, ValueError) as e:
        raise _corrupt(path, f"its JSON entries do not decode ({e})") from None
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["history"], list):
        raise _corrupt(path, "its config is not a dict or its history not a list")
    model = ckpt["model"]
    if not (isinstance(model, dict) and model and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in model.items())):
        raise _corrupt(path, "its 'model' entry is not a dict of named tensors")
    ckpt["path"] = path
    return ckpt


def config_of(ckpt: Dict[str, Any]) -> TrainConfig:
    """The checkpoint's :class:`TrainConfig` (ValueError if it is not a valid one)."""
    try:
        return TrainConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise _corrupt(ckpt.get("path", "?"), f"its configuration is invalid ({e})") from None


def _check_layout(ckpt: Dict[str, Any], config: TrainConfig) -> None:
    """Compare the configuration's layout (blocks, widths) with the weights'
    before building anything, so a configuration that asks for a model far
    larger than the weights fails at once."""
    path, state = ckpt.get("path", "?"), ckpt["model"]
    try:
        _, arch_name, size = parse_model_name(config.model)
        arch = make_arch(arch_name, config.depth if config.depth is not None else size.get("depth"),
                         config.width if config.width is not None else size.get("width", 1))
    except (TypeError, ValueError) as e:
        raise _corrupt(path, f"its configuration is invalid ({e})") from None
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    want = sum(arch.depths)
    if len(blocks) != want:
        raise _corrupt(path, f"its configuration ({config.model}, depth {config.depth}, width {config.width}) "
                             f"has {want} residual blocks, its weights {len(blocks)}")
    fc = state["fc.weight"]  # (present: _registered_model read it first)
    if fc.dim() != 2 or fc.shape[1] != arch.num_features:
        raise _corrupt(path, f"its configuration gives the classifier {arch.num_features} input features, "
                             f"its weights {tuple(fc.shape)}")


def model_from_checkpoint(ckpt: Dict[str, Any], factory: Optional[Factory] = None) -> nn.Module:
    """The trained model of a checkpoint loaded by :func:`load_checkpoint` (or
    of a weights file, :func:`normfree.train.weights.load_weights`), with its
    weights, in eval mode.

    A registered normfree model is rebuilt from its configuration (name, depth,
    width, method options; classes and input channels from the weights' shapes).
    A model trained from a factory spec (``package.module:factory``, ``timm:``,
    ``torchvision:``, or an importable function passed to ``train``) is rebuilt
    by calling it again, and converted again when the run converted it. A
    module passed to ``train`` as an object needs ``factory``: a callable or a
    spec that builds the same architecture (as it was passed, before any
    ``convert``), called with ``num_classes`` / ``in_chans`` where it takes
    them and the run's ``model_options``. ``factory`` also overrides the stored
    spec. ValueError naming the file when the configuration and the weights
    disagree or no factory is known."""
    path = ckpt.get("path", "?")
    config = config_of(ckpt)
    state = ckpt["model"]
    if config.registered and factory is None:
        return _registered_model(ckpt, config)
    info = ckpt.get("model_info") or {}
    source = factory if factory is not None else config.model
    if source is None:
        cls = info.get("class", "a module")
        raise ValueError(f"{path} holds a model passed to normfree.train as an object ({cls}): give load_model "
                         f"factory= (a callable or 'package.module:factory' that builds the same architecture, "
                         f"e.g. {cls.rsplit('.', 1)[0]}:{cls.rsplit('.', 1)[-1]} if its constructor needs no "
                         f"arguments); CLI: normfree export --model package.module:factory")
    if not isinstance(info.get("num_classes"), int):
        raise _corrupt(path, "it has no model record (model_info) giving the number of classes")
    name = source if isinstance(source, str) else factory_name(source)
    foreign = not config.registered  # (a registered run rebuilt by a user's factory gets no method options)
    model = build_model(source, num_classes=info["num_classes"], in_chans=info.get("in_chans"),
                        convert=config.convert if foreign else None,
                        options=config.model_options if foreign else None)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"the weights in {path} do not fit the model that {name} builds ({one_line(e)})") from None
    return model.eval()


def _registered_model(ckpt: Dict[str, Any], config: TrainConfig) -> nn.Module:
    path = ckpt.get("path", "?")
    state = ckpt["model"]
    try:
        num_classes, in_chans = int(state["fc.weight"].shape[0]), int(state["stem.0.weight"].shape[1])
    except (KeyError, IndexError) as e:
        raise _corrupt(path, f"no usable {e} weight: not a normfree model") from None
    _check_layout(ckpt, config)
    try:
        model = create_model(config.model, depth=config.depth, width=config.width, num_classes=num_classes,
                             in_chans=in_chans, **config._model_options())
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as e:
        raise _corrupt(path, f"its weights do not fit its configuration ({one_line(e)})") from None
    from ..backbone import cfg_from_input

    model.pretrained_cfg = {"architecture": config.model, **cfg_from_input(ckpt.get("input"), path)}
    return model.eval()


def load_model(path: str, map_location="cpu", factory: Optional[Factory] = None) -> nn.Module:
    """The trained model saved by :func:`normfree.train`, in eval mode: from a
    checkpoint (``checkpoint.pt``, or the run directory holding it; loaded with
    ``weights_only=True``) or a weights file (``model.safetensors``). Models
    passed to ``train`` as objects need ``factory`` (see
    :func:`model_from_checkpoint`).

    ``map_location``: the device the model is returned on (``"cuda"``,
    ``torch.device(...)``); the weights are read on the CPU and the model built
    there, then moved. A callable or dict is passed to ``torch.load`` as is
    (checkpoint files only; a weights file is read on the CPU)."""
    from .weights import load_weights, weights_path

    device = map_location if isinstance(map_location, (str, torch.device)) else None
    where = "cpu" if device is not None else map_location
    wpath = weights_path(path)
    ckpt = load_weights(wpath) if wpath else load_checkpoint(path, where)
    model = model_from_checkpoint(ckpt, factory)
    return model.to(device) if device is not None else model


def check_state(ckpt: Dict[str, Any]) -> None:
    """The training-state entries a resumption reads are present and consistent."""
    path = ckpt.get("path", "?")

    def need(cond, why):
        if not cond:
            raise _corrupt(path, why)

    for key in ("optimizer", "step", "epoch", "batch_in_epoch", "steps_per_epoch", "loss_hist", "acc_hist", "rng"):
        need(key in ckpt, f"it has no {key!r} entry")
    step, epoch, bie, spe = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["steps_per_epoch"]
    need(all(isinstance(v, int) and v >= 0 for v in (step, epoch, bie, spe)),
         f"step/epoch/batch_in_epoch/steps_per_epoch must be integers >= 0, got {step!r}/{epoch!r}/{bie!r}/{spe!r}")
    need(bie <= spe and epoch * spe + bie == step, f"step {step} is not epoch {epoch} x {spe} steps + batch {bie}")
    for key in ("loss_hist", "acc_hist"):
        t = ckpt[key]
        need(isinstance(t, torch.Tensor) and t.dim() == 1 and len(t) == step and t.is_floating_point(),
             f"{key} must hold one number per step ({step})")
    need(isinstance(ckpt["optimizer"], dict), "its optimizer state is not a dict")
    need(isinstance(ckpt["rng"], dict) and isinstance(ckpt["rng"].get("torch"), torch.Tensor)
         and ckpt["rng"]["torch"].dtype == torch.uint8, "its RNG state is missing or not a byte tensor")


def check_same_config(ckpt: Dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse (ValueError naming every difference) to continue ``ckpt`` with
    another configuration (fields outside ``RESUMABLE_CHANGES``; the scalar
    learning-rate multiplier compared as in effect)."""
    path = ckpt.get("path", "?")
    old, new = ckpt["config"], cfg.to_dict()
    diff = {k: (old.get(k), new[k]) for k in new
            if k not in RESUMABLE_CHANGES and k != "scalar_lr_mult" and old.get(k) != new[k]}
    was, now = _scalar_lr_mult(old), cfg.effective_scalar_lr_mult()  # the multiplier in effect
    if was != now:
        diff["scalar_lr_mult"] = (was, now)
    if diff:
        items = ", ".join(f"{k}={a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume {path}: the configuration differs: {items}")


def check_resumable(ckpt: Dict[str, Any], cfg: TrainConfig, steps_per_epoch: int, fingerprint: Dict[str, Any],
                    schedule: Dict[str, Any]) -> Optional[str]:
    """Refuse (ValueError naming every difference) to continue ``ckpt`` with a
    run that would not follow it: another configuration, other data, another
    number of steps per epoch, or another learning-rate schedule (allowed with
    ``cfg.reschedule``). Returns a note to show (or None)."""
    path = ckpt.get("path", "?")
    check_same_config(ckpt, cfg)
    if ckpt.get("steps_per_epoch") != steps_per_epoch:
        raise ValueError(f"cannot resume {path}: {ckpt.get('steps_per_epoch')} steps per epoch in the checkpoint, "
                         f"{steps_per_epoch} now (different data?)")
    note = None
    old_fp = ckpt.get("data")
    if old_fp is None:
        note = f"note: {path} predates data fingerprints: cannot check that the data are the same"
    elif old_fp != fingerprint:
        raise ValueError(f"cannot resume {path}: the data differ from the checkpoint's "
                         f"({describe_fingerprint(old_fp)}) now ({describe_fingerprint(fingerprint)}); "
                         f"give the same data (or start a new run with another --out)")
    old_sched = ckpt.get("schedule")
    total = schedule["total_steps"]
    if ckpt["step"] > total:
        raise ValueError(f"cannot resume {path}: it has done {ckpt['step']} steps, more than the {total} "
                         f"of this run's budget")
    if old_sched is not None and old_sched != schedule:
        changed = {k: (old_sched.get(k), v) for k, v in schedule.items() if old_sched.get(k) != v}
        only_length = set(changed) <= {"total_steps"}
        if only_length and (schedule["schedule"] == "constant" or cfg.reschedule):
            note = (f"note: the run's length changes from {old_sched['total_steps']} to {total} steps"
                    + ("" if schedule["schedule"] == "constant" else
                       f"; the {schedule['schedule']} schedule is recomputed from step {ckpt['step']} on"))
        else:
            items = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            hint = (" Resume with the same --steps/--epochs, or pass --reschedule to recompute the schedule "
                    "for the new length (the run then differs from a fresh run of that length)."
                    if only_length else "")
            raise ValueError(f"cannot resume {path}: the learning-rate schedule would change ({items}): every "
                             f"remaining step would get another learning rate than the checkpoint's run.{hint}")
    elif old_sched is None and ckpt.get("total_steps") not in (None, total) and cfg.schedule != "constant" \
            and not cfg.reschedule:
        raise ValueError(f"cannot resume {path}: its run was {ckpt.get('total_steps')} steps long, this one "
                         f"{total}: the {cfg.schedule} learning-rate schedule would change. Resume with the same "
                         f"--steps/--epochs, or pass --reschedule.")
    return note


def _scalar_lr_mult(config: Dict[str, Any]) -> float:
    """The scalar learning-rate multiplier a stored configuration trained with."""
    v = config.get("scalar_lr_mult")
    if v is not None:
        return float(v)
    try:
        return FIXUP_SCALAR_LR_MULT if parse_model_name(config.get("model"))[0] == "fixup" else 1.0
    except (TypeError, ValueError):
        return 1.0
