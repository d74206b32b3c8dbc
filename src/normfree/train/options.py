"""``normfree train``'s options, generated from :class:`TrainConfig` (one
source for options, help texts and defaults), and their parsing."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

from .config import OPTIMIZERS, SCHEDULES, TrainConfig


def parse_value(text: str):
    """'3' -> 3, '0.2' -> 0.2, 'true'/'false' -> bool, 'none' -> None, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_options(items: Optional[List[str]]) -> Dict[str, Any]:
    """['alpha=0.2', 'gain_init=1/sqrt(d)'] -> {'alpha': 0.2, 'gain_init': '1/sqrt(d)'}."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--opt expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"--opt expects key=value with a key, got {item!r}")
        if key in out:
            raise ValueError(f"--opt {key} is given twice ({out[key]!r} and {value!r}): give it once")
        out[key] = parse_value(value)
    return out


def add_arguments(parser) -> None:
    """One command-line option per :class:`TrainConfig` field (``--data-dir`` for
    ``data_dir``; booleans as ``--amp/--no-amp``; ``model_options`` as repeatable
    ``--opt key=value``), with the field's help text and default."""
    import argparse
    import typing

    from .recipes import RECIPES

    parser.add_argument("--recipe", choices=sorted(RECIPES), default=argparse.SUPPRESS,
                        help="start from a published training recipe (nfnet: SGD Nesterov 0.9, wd 2e-5, lr 0.1 x "
                             "batch/256, 5 warmup epochs + cosine, label smoothing 0.1, AGC 0.01; nf_regnet: lr 0.4, "
                             "wd per variant, no AGC); options given here win (details: normfree.train.recipes)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "model_options":
            parser.add_argument("--opt", dest="model_options", action="append", default=argparse.SUPPRESS,
                                metavar="KEY=VALUE",
                                help=help_text + "; numbers, true/false and none are converted")
            continue
        tp = hints[f.name]
        args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Union:  # Optional[X]
            tp = next(a for a in args if a is not type(None))
            args = typing.get_args(tp)
        flag = "--" + f.name.replace("_", "-")
        kw: Dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}  # see config_from_args
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kw.update(type=float, nargs="+", metavar=f.name.upper())
        else:
            kw.update(type=tp, metavar=f.name.upper() if tp is not str else None)
            choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES}.get(f.name)
            if choices:
                kw["choices"] = choices
        shown = (" ".join(map(str, default)) if isinstance(default, tuple) else default)
        show_default = tp is not bool and default is not None and "default" not in help_text
        kw["help"] = f"{help_text} (default: {shown})" if show_default else help_text
        parser.add_argument(flag, **kw)


def saved_config(out: str) -> Optional[Dict[str, Any]]:
    """The configuration stored in ``out/config.json`` (None if there is none);
    ValueError naming the file if it cannot be read."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            saved = json.load(fh).get("config", {})
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: not a normfree run configuration ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"cannot read {path}: its 'config' entry is not a dict")
    return saved


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed :func:`add_arguments` options.

    Options not given take the defaults (those of ``--recipe`` when given), or with ``--resume`` the values of the
    run being resumed (``OUT/config.json``), so ``normfree train --out DIR
    --resume`` alone continues a run."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values = TrainConfig().to_dict()
    if getattr(args, "recipe", None):
        from .recipes import recipe_values

        values.update(recipe_values(args.recipe, given))
    if given.get("resume") and given.get("out"):
        saved = saved_config(given["out"]) or {}
        values.update({k: v for k, v in saved.items() if k in values and k not in ("stop_after_steps", "reschedule")})
    values.update(given)
    if "model_options" in given:
        values["model_options"] = parse_options(given["model_options"])
    for name in ("betas", "milestones"):
        if isinstance(values[name], list):
            values[name] = tuple(values[name])
    if isinstance(values["epochs"], float) and values["epochs"].is_integer():
        values["epochs"] = int(values["epochs"])
    return TrainConfig(**values)
