"""Model weights as ``safetensors`` (the format the Hugging Face hub expects):
weights only, the configuration as JSON in the file's metadata.

``normfree train`` writes ``OUT/model.safetensors`` beside ``OUT/checkpoint.pt``
every time it writes the checkpoint (the same step), and ``normfree export
--format safetensors`` writes one from a checkpoint. The file holds the model's
``state_dict`` (tensors only: nothing in it can run code when loaded) and the
metadata strings

* ``format``: ``"normfree"``, ``step``: the training step,
* ``config``: the run's :class:`~normfree.train.config.TrainConfig` as JSON,
* ``model_info``: how the model is rebuilt (registered name or factory spec,
  class, classes, input channels, conversion) as JSON,
* ``input``: the input record (shape, mean, std, classes) as JSON.

:func:`normfree.load_model` reads it like a checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch.nn as nn

from ..atomic import write_bytes

WEIGHTS = "model.safetensors"
FORMAT = "normfree"


def weights_bytes(model_or_state, metadata: Dict[str, Any]) -> bytes:
    """The safetensors bytes of a model's (or a state dict's) tensors with
    ``metadata`` (values JSON-encoded unless they are strings)."""
    from safetensors.torch import save

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors, seen = {}, set()
    for k, v in state.items():
        t = v.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if not t.is_contiguous() or (ptr is not None and ptr in seen):
            t = t.contiguous().clone()  # safetensors stores no shared (tied) or strided tensors
        elif ptr is not None:
            seen.add(ptr)
        tensors[k] = t
    meta = {"format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    return save(tensors, metadata=meta)


def save_weights(path: str, model_or_state, metadata: Dict[str, Any]) -> str:
    """Write :func:`weights_bytes` to ``path`` atomically; returns ``path``."""
    write_bytes(path, weights_bytes(model_or_state, metadata))
    return path


def is_weights_file(path: str) -> bool:
    return str(path).endswith(".safetensors")


def load_weights(path: str, map_location="cpu") -> Dict[str, Any]:
    """A checkpoint-like dict (``model``, ``config``, ``model_info``, ``input``,
    ``step``, ``history`` [], ``path``) of a normfree safetensors file;
    FileNotFoundError, or ValueError "cannot read PATH: ..." naming what is wrong."""
    from safetensors import safe_open
    from safetensors.torch import load

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        state = load(data)
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for damaged files
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"cannot read {path}: not a readable safetensors file ({text})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"cannot read {path}: a safetensors file without normfree's metadata (format "
                         f"{meta.get('format')!r}); load its tensors with safetensors.torch.load_file")
    try:
        decoded = {k: json.loads(meta[k]) if k in meta else None for k in ("config", "model_info", "input")}
        step = int(meta.get("step", "0"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"corrupt or inconsistent weights file {path}: its metadata do not decode ({e})") from None
    if not isinstance(decoded["config"], dict):
        raise ValueError(f"corrupt or inconsistent weights file {path}: its config is not a dict")
    if map_location not in (None, "cpu"):
        state = {k: v.to(map_location) for k, v in state.items()}
    return {"model": state, **decoded, "step": step, "history": [], "path": path}


def weights_path(path: str) -> Optional[str]:
    """``path`` if it is a .safetensors file; for a run directory without a
    checkpoint, its ``model.safetensors``; else None."""
    path = os.fspath(path)
    if is_weights_file(path):
        return path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "checkpoint.pt")) \
            and os.path.exists(os.path.join(path, WEIGHTS)):
        return os.path.join(path, WEIGHTS)
    return None
