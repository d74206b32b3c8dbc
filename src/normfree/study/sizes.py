"""The study's sizes: every knob, its presets, and its validation.

A knob is declared once, where it is used (the common ones here, each
experiment's in its module), with its value in every preset, its type and
its allowed range. ``--set KEY=VALUE`` overrides go through
:func:`parse_size_overrides` and the whole size through :meth:`StudySize.validate`,
so a NaN, an Inf, a value out of range or a list of the wrong length is
refused with a message naming the key, before anything is run or planned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

PRESET_NAMES = ("quick", "default", "cifar10", "full")

#: what each preset is for (shown by ``normfree study --help`` and in the report)
PRESET_TEXT = {
    "quick": "a smoke test of the whole pipeline at tiny sizes (seconds to a minute); its verdicts carry no "
             "evidence",
    "default": "the built-in 8x8 digits, <= 20 minutes on 2 CPU cores, includes the 1,000-layer claim",
    "cifar10": "CIFAR-10 (32x32 RGB, real images), about 1h30m on 2 CPU cores (1h32m measured from a fresh "
               "clone; short training runs: see the README for what they can and cannot show)",
    "full": "the papers' scale (CIFAR-10, WRN up to depth 1000, hundreds of epochs); meant for a GPU",
}


@dataclass(frozen=True)
class Knob:
    """One size of the study.

    kind: int, float or str; many: a comma-separated list (a tuple) of ``kind``;
    lo / hi: inclusive bounds of every value; length: (min, max) list length;
    optional: None is allowed ("none" on the command line); check: extra test
    returning an error text or None; values: the value in each preset.
    """

    kind: type
    values: Mapping[str, Any]
    help: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    many: bool = False
    length: Tuple[int, int] = (1, 12)
    optional: bool = False
    check: Optional[Callable[[Any], Optional[str]]] = None
    choices: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        missing = [p for p in PRESET_NAMES if p not in self.values]
        if missing:
            raise ValueError(f"knob values missing for presets {missing}")

    def describe(self) -> str:
        """The allowed values in words, e.g. "an integer in [1, 20]"."""
        if self.choices:
            what = f"one of {list(self.choices)}"
        else:
            what = {int: "an integer", float: "a number", str: "a text"}[self.kind]
            if self.lo is not None or self.hi is not None:
                lo = _num(self.lo) if self.lo is not None else "-inf"
                hi = _num(self.hi) if self.hi is not None else "inf"
                what += f" in [{lo}, {hi}]"
        if self.many:
            return f"a comma-separated list of {self.length[0]} to {self.length[1]} values, each {what}"
        return f"none or {what}" if self.optional else what

    def parse(self, key: str, text: str) -> Any:
        """Text from the command line -> a value (validated)."""
        text = text.strip()
        if self.optional and text.lower() == "none":
            return None
        if self.many:
            parts = [p.strip() for p in text.split(",")]
            if any(p == "" for p in parts):
                raise ValueError(f"bad value in size override '{key}={text}': empty item in the list; expected "
                                 f"{self.describe()}")
            value = tuple(self._one(key, text, p) for p in parts)
        else:
            value = self._one(key, text, text)
        self.validate(key, value)
        return value

    def _one(self, key: str, whole: str, text: str) -> Any:
        if self.kind is str:
            return text
        try:
            v = float(text) if self.kind is float else _int(text)
        except ValueError:
            what = "a number" if self.kind is float else "an integer"
            raise ValueError(f"bad value in size override '{key}={whole}': {text!r} is not {what}; "
                             f"expected {self.describe()}") from None
        return v

    def validate(self, key: str, value: Any) -> None:
        """Raise ValueError naming ``key`` unless ``value`` is allowed."""
        if value is None:
            if self.optional:
                return
            raise ValueError(f"size {key} must be {self.describe()}, got None")
        values = value if self.many else (value,)
        if self.many:
            if not isinstance(value, tuple):
                raise ValueError(f"size {key} must be {self.describe()}, got {value!r}")
            lo, hi = self.length
            if not lo <= len(value) <= hi:
                raise ValueError(f"size {key} must have {lo} to {hi} values, got {len(value)}: {value!r}")
            if len(set(value)) != len(value):
                raise ValueError(f"size {key} lists a value twice: {value!r}")
        for v in values:
            if self.kind is str:
                if not isinstance(v, str) or (self.choices and v not in self.choices):
                    raise ValueError(f"size {key} must be {self.describe()}, got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind is int and not isinstance(v, int)):
                raise ValueError(f"size {key} must be {self.describe()}, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"size {key} must be finite ({self.describe()}), got {v!r}")
            if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
                raise ValueError(f"size {key} = {_num(v)} is out of range: expected {self.describe()}")
            if self.check is not None:
                err = self.check(v)
                if err:
                    raise ValueError(f"size {key} = {_num(v)}: {err}")


def _int(text: str) -> int:
    f = float(text)
    if not math.isfinite(f) or f != int(f):
        raise ValueError(text)
    return int(f)


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def wrn_depth(d: int) -> Optional[str]:
    """None if ``d`` is a WRN depth (6n + 4, n >= 1), else the reason."""
    return None if d >= 10 and (d - 4) % 6 == 0 else "a WRN depth must be 6n+4 with n >= 1 (10, 16, 22, ..., 1000)"


def knob(kind: type, default: Any, *, quick: Any = None, cifar10: Any = None, full: Any = None,
         help: str = "", **kw) -> Knob:
    """A :class:`Knob` whose value is ``default`` in every preset not named."""
    pick = lambda v: default if v is None else v
    return Knob(kind, {"quick": pick(quick), "default": default, "cifar10": pick(cifar10), "full": pick(full)},
                help, **kw)


MAX_EXAMPLES = 10_000_000

#: knobs shared by every experiment
COMMON_KNOBS: Dict[str, Knob] = {
    "data": knob(str, "digits", cifar10="cifar10", full="cifar10",
                 choices=("digits", "mnist", "fashion_mnist", "cifar10", "folder"),
                 help="the data set of every training run"),
    "width": knob(float, 1.0, lo=0.0625, hi=64, help="WRN width factor k of every model"),
    "max_train_examples": knob(int, None, quick=256, lo=1, hi=MAX_EXAMPLES, optional=True,
                               help="train on a seeded subset of this many images (none: all)"),
    "max_test_examples": knob(int, None, quick=128, cifar10=5000, lo=1, hi=MAX_EXAMPLES, optional=True,
                              help="evaluate on a seeded subset of this many test images (none: all)"),
    "trains_below": knob(float, 0.75, cifar10=0.85, lo=0.05, hi=1.0,
                         help="a run 'trains' if its final training loss is below this x ln(classes) (chance); "
                              "the CIFAR-10 preset's short runs use a lower bar"),
    "bootstrap": knob(int, 2000, quick=200, lo=100, hi=100_000,
                      help="resamples of the paired bootstrap behind every accuracy margin"),
}


class StudySize(Mapping[str, Any]):
    """The values of every knob (common and per experiment) for one study.

    Read as attributes (``size.depth_steps``) or as a mapping. Build it with
    :func:`make_size`, which validates every value.
    """

    def __init__(self, values: Dict[str, Any], knobs: Dict[str, Knob]):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_knobs", knobs)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no study size {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("StudySize is read-only: use make_size(preset, {key: value})")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def asdict(self) -> Dict[str, Any]:
        return dict(self._values)

    def validate(self) -> "StudySize":
        for key, value in self._values.items():
            self._knobs[key].validate(key, value)
        return self


def all_knobs(experiments: Sequence) -> Dict[str, Knob]:
    """Common knobs plus every experiment's; a key declared twice is an error."""
    out = dict(COMMON_KNOBS)
    for e in experiments:
        for key, k in e.knobs.items():
            if key in out:
                raise ValueError(f"size {key!r} is declared twice (experiment {e.name!r})")
            out[key] = k
    return out


def parse_size_overrides(items: Sequence[str], knobs: Dict[str, Knob]) -> Dict[str, Any]:
    """``["depths=10,34", "depth_steps=300"]`` -> ``{"depths": (10, 34), "depth_steps": 300}``,
    typed and validated by each key's :class:`Knob`; a clear error for unknown keys or bad values."""
    import difflib

    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in knobs:
            close = difflib.get_close_matches(key, list(knobs), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"bad size override {item!r}{hint}: use KEY=VALUE with KEY one of {sorted(knobs)}")
        if key in out:
            raise ValueError(f"size override {key!r} given twice")
        out[key] = knobs[key].parse(key, value)
    return out


def make_size(preset: str, knobs: Dict[str, Knob], overrides: Optional[Mapping[str, Any]] = None) -> StudySize:
    """The preset's values with ``overrides`` (already typed) applied, all validated."""
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; allowed: {list(PRESET_NAMES)}")
    values = {k: kn.values[preset] for k, kn in knobs.items()}
    for key, value in (overrides or {}).items():
        if key not in knobs:
            raise ValueError(f"unknown study size {key!r}; allowed: {sorted(knobs)}")
        if knobs[key].many and isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return StudySize(values, knobs).validate()


def knob_table(knobs: Dict[str, Knob]) -> str:
    """One line per knob: key, allowed values, and its value in each preset (for --help and the README)."""
    lines = []
    for key, k in knobs.items():
        vals = ", ".join(f"{p} {_show(k.values[p])}" for p in PRESET_NAMES)
        lines.append(f"{key}: {k.help} ({k.describe()}; {vals})")
    return "\n".join(lines)


def _show(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(_num(x) for x in v)
    return _num(v)
