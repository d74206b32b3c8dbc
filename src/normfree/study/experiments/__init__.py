"""The experiments: one module each, found by :func:`discover`.

A module here that defines ``EXPERIMENT`` (a :class:`normfree.study.experiment.Experiment`)
is part of the study, placed in the report by its ``order``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import List


def discover() -> List:
    """Every experiment module's ``EXPERIMENT``, in report order."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        exp = getattr(module, "EXPERIMENT", None)
        if exp is not None:
            found.append(exp)
    found.sort(key=lambda e: (e.order, e.name))
    names = [e.name for e in found]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two experiments share a name: {names}")
    return found
