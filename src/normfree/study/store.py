"""The run store: one JSON record per finished run, checked before it is reused.

``OUT/runs/<key>.json`` holds ``{"format", "key", "spec", "result", "sha256"}``:
the run's specification (whose hash is the key), its result, and a SHA-256 of
both. A record is reused only if it parses, has this format, names its own
key, matches the spec asked for, carries the fields a finished run has, and
its checksum matches; anything else (a truncated write, a hand edit, a record
of an older format, a run stopped half-way) is reported and the run is done
again. Records are written atomically (temporary file + rename), so an
interrupted study leaves either the old record or the new one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Callable, Dict, Optional

import numpy as np

from ..atomic import write_text

FORMAT = 2

#: fields every finished record's result has, by task
REQUIRED = {"train": ("status", "final_train_loss", "test_acc", "history", "steps"),
            "signal": ("models",)}


def canonical(obj: Any) -> str:
    """The JSON text a record's checksum is taken over (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable, allow_nan=False)


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(f"cannot store {type(v).__name__} in a run record")


def clean(v):
    """JSON-safe: tuples -> lists, numpy scalars -> Python, non-finite floats -> None."""
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def digest(spec: Dict[str, Any], result: Dict[str, Any]) -> str:
    return hashlib.sha256(canonical({"spec": spec, "result": result}).encode()).hexdigest()


class RunStore:
    """Finished runs as ``<folder>/<key>.json``; ``get`` returns None (and says
    why through ``warn``) for a record that is missing or cannot be trusted."""

    def __init__(self, folder: str, warn: Callable[[str], None] = lambda s: None):
        self.folder = folder
        self.warn = warn
        self.rejected = 0
        os.makedirs(folder, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.json")

    def get(self, key: str, spec: Dict[str, Any], task: str = "train") -> Optional[dict]:
        """The stored result of run ``key`` (whose specification is ``spec``), or None."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        problem = None
        try:
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            rec, problem = None, f"unreadable ({type(e).__name__}: {e})"
        if rec is not None:
            problem = self._check(key, spec, task, rec)
        if problem:
            self.rejected += 1
            self.warn(f"[study] run record {path} {problem}: running it again")
            return None
        return rec["result"]

    @staticmethod
    def _check(key: str, spec: Dict[str, Any], task: str, rec: Any) -> Optional[str]:
        if not isinstance(rec, dict):
            return "is not a record"
        if rec.get("format") != FORMAT:
            return f"has format {rec.get('format')!r}, not {FORMAT}"
        if rec.get("key") != key:
            return f"names key {rec.get('key')!r}"
        result = rec.get("result")
        if not isinstance(result, dict) or not isinstance(rec.get("spec"), dict):
            return "is incomplete (no spec or result)"
        if canonical(rec["spec"]) != canonical(clean(spec)):
            return "was written for another configuration"
        missing = [k for k in REQUIRED.get(task, ()) if k not in result]
        if missing:
            return f"is incomplete (missing {', '.join(missing)})"
        if task == "train" and result.get("status") not in ("ok", "diverged"):
            return f"is of an unfinished run (status {result.get('status')!r})"
        try:
            ok = rec.get("sha256") == digest(rec["spec"], result)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            return "fails its checksum (corrupted or edited)"
        return None

    def put(self, key: str, spec: Dict[str, Any], result: Dict[str, Any]) -> None:
        spec, result = clean(spec), clean(result)
        rec = {"format": FORMAT, "key": key, "spec": spec, "result": result, "sha256": digest(spec, result)}
        write_text(self.path(key), json.dumps(rec, indent=1, sort_keys=True, allow_nan=False))
