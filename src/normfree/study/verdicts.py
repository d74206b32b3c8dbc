"""Verdicts: the three words, how seeds are combined, and the statistics behind margins.

Every claim is judged by a rule that can come out "holds", "does not hold" or
"inconclusive". Rules are plain functions of measurements (numbers, or 0/1
arrays of which test image each run classified correctly), so that the tests
can feed them made-up measurements for each outcome.

Seeds. An experiment runs each configuration with several seeds. A rule is
applied to each seed's measurements alone (the "per seed" verdicts, shown as
"holds in k of n seeds"), and to all of them together for the claim's
verdict: rules that compare accuracies pool the seeds in one paired bootstrap
(:func:`paired_bootstrap`); the other rules require the seeds to agree
(:func:`unanimous`: the common verdict, else inconclusive).

Accuracy margins. The difference between two methods' test accuracies is
noisy in two ways: which test images were drawn (sampling error of the test
set) and which seed trained the networks (seed-to-seed spread). A paired
bootstrap resamples both: seeds with replacement, then test images with
replacement, the same images for both methods of a seed (each seed's runs of
both methods are paired by seed and scored on the same images). The 95%
percentile interval of the mean difference is the margin every accuracy rule
uses. With one seed only test images are resampled; with two or three seeds
the seed resampling is coarse, which the report says.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
VERDICTS = (HOLDS, FAILS, UNSURE)

#: a run "trains" when it did not diverge and its final training loss is below this fraction of ln(classes)
TRAINS_BELOW = 0.75


@dataclass
class Claim:
    """One row of the claims table.

    per_seed: [(seed, verdict, measured)] for each seed the rule was applied to alone.
    paper: what the paper reports for a comparable setting ("paper / measured"), with
    the difference in setting, or "".
    """

    claim: str
    source: str
    measured: str
    verdict: str
    rule: str
    per_seed: List[Tuple[int, str, str]] = field(default_factory=list)
    paper: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        for text in (self.measured, self.rule, self.paper):
            if "None" in text.split():
                raise ValueError(f"a claim's text must say what happened, not None: {text!r}")

    @property
    def agreement(self) -> str:
        """``"holds in 3 of 3 seeds"``, or "" without per-seed verdicts."""
        return agreement(self.verdict, [v for _, v, _ in self.per_seed])


def agreement(verdict: str, per_seed: Sequence[str]) -> str:
    """How many seeds' own verdicts agree with ``verdict`` (or, when the claim is
    inconclusive, how the seeds split)."""
    if not per_seed:
        return ""
    n = len(per_seed)
    if verdict != UNSURE:
        return f"{verdict} in {sum(v == verdict for v in per_seed)} of {n} seed{'s' if n > 1 else ''}"
    parts = [f"{sum(v == w for v in per_seed)} {w}" for w in VERDICTS if any(v == w for v in per_seed)]
    return f"seeds: {', '.join(parts)} (of {n})"


def unanimous(per_seed: Sequence[str]) -> str:
    """The verdict all seeds agree on; inconclusive when they disagree (or none)."""
    if not per_seed:
        return UNSURE
    first = per_seed[0]
    return first if all(v == first for v in per_seed) else UNSURE


def chance_loss(num_classes: int) -> float:
    return math.log(num_classes)


@dataclass(frozen=True)
class Trains:
    """What "a run trains" means: it did not diverge and its final training loss
    is below ``below`` x ln(num_classes) (the loss of a chance-level guess).
    Rules that take ``num_classes`` accept one of these instead of the number
    (the study passes the ``trains_below`` size)."""

    num_classes: int
    below: float = TRAINS_BELOW

    @property
    def loss(self) -> float:
        return self.below * chance_loss(self.num_classes)


def _bar(num_classes) -> Trains:
    return num_classes if isinstance(num_classes, Trains) else Trains(int(num_classes))


def trains(rec: Optional[dict], num_classes) -> bool:
    """A run trains if it did not diverge and its final training loss is below the
    bar (:class:`Trains`; an int means ``TRAINS_BELOW`` x ln(classes))."""
    return bool(rec) and rec.get("status") == "ok" and _finite(rec.get("final_train_loss")) \
        and rec["final_train_loss"] < _bar(num_classes).loss


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def trains_rule(num_classes) -> str:
    bar = _bar(num_classes)
    return (f"a run trains if it did not diverge and its final training loss is below {bar.below:g} "
            f"ln({bar.num_classes}) = {bar.loss:.2f}")


# --------------------------------------------------------------------------
# paired bootstrap over seeds and test images
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """Mean accuracy difference a - b (fraction) and its 95% bootstrap interval."""

    diff: float
    lo: float
    hi: float
    seeds: int
    images: int

    def text(self, a: str = "a", b: str = "b") -> str:
        return (f"{a} - {b} = {100 * self.diff:+.1f} points (95% interval {100 * self.lo:+.1f} to "
                f"{100 * self.hi:+.1f}; {self.seeds} seed{'s' if self.seeds > 1 else ''} x {self.images} test images)")


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Interval:
    """Paired bootstrap of mean(a) - mean(b) over seeds and test images.

    ``a``, ``b``: [seeds, images] arrays of 0/1 (image i of seed s classified
    correctly), row s of both from runs with the same seed on the same images.
    Each resample draws seeds with replacement and, independently for each
    drawn seed, test images with replacement (a two-stage bootstrap), and takes
    the mean difference. Returns the observed difference and the percentile
    interval at ``level``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim == 1:
        a, b = a[None], b[None]
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"a and b must be [seeds, images] arrays of the same shape, got {a.shape} and {b.shape}")
    d = a - b
    n_seeds, n_img = d.shape
    rng = np.random.default_rng(seed)
    means = np.full(resamples, np.nan)  # a resample the loop missed would show as NaN, not as old memory
    chunk = max(1, min(resamples, 4_000_000 // max(n_img * n_seeds, 1)))
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        s_idx = rng.integers(0, n_seeds, size=(k, n_seeds)) if n_seeds > 1 else np.zeros((k, 1), dtype=np.int64)
        i_idx = rng.integers(0, n_img, size=(k, n_seeds, n_img))
        means[start:start + k] = d[s_idx[..., None], i_idx].mean(axis=(1, 2))
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return Interval(float(d.mean()), float(lo), float(hi), n_seeds, n_img)


def better(iv: Interval) -> str:
    """Is a better than b? holds if the whole interval is above 0, does not hold
    if it is below 0, else inconclusive (a tie is not a win)."""
    return HOLDS if iv.lo > 0 else FAILS if iv.hi < 0 else UNSURE


def not_worse(iv: Interval, margin: float) -> str:
    """Is a at most ``margin`` worse than b (or better)? holds if the interval lies
    above -margin, does not hold if it lies below -margin, else inconclusive."""
    return HOLDS if iv.lo > -margin else FAILS if iv.hi < -margin else UNSURE


def matches(iv: Interval, margin: float) -> str:
    """Are a and b equal within ``margin``? holds if the interval lies inside
    [-margin, margin]; does not hold if it lies entirely outside; else inconclusive."""
    if -margin < iv.lo and iv.hi < margin:
        return HOLDS
    if iv.lo > margin or iv.hi < -margin:
        return FAILS
    return UNSURE


def combine(*verdicts: str) -> str:
    """Several conditions that must all hold: holds if all hold, does not hold if
    any does not hold, else inconclusive."""
    if any(v == FAILS for v in verdicts):
        return FAILS
    return HOLDS if all(v == HOLDS for v in verdicts) else UNSURE


# --------------------------------------------------------------------------
# small numeric helpers
# --------------------------------------------------------------------------
def fmt(v: Any, digits: int = 3) -> str:
    """A number for the report; never 'None' (missing values read '-')."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "inf" if v > 0 else "-inf" if v < 0 else "nan"
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.{digits - 1}e}"
    return str(v)


def pct(v: Optional[float]) -> str:
    return "-" if v is None or not _finite(v) else f"{100 * v:.1f}%"


def linear_r2(y: Sequence[float]) -> Tuple[float, float]:
    """(slope, R^2) of a least-squares line through y against 1..n (nan if < 3 finite points).

    Constant y (up to rounding) is the flat line: slope exactly 0, R^2 = 1 (not the
    rounding noise of polyfit, which could read as a small positive slope)."""
    y = np.asarray(y, dtype=np.float64)
    if len(y) < 3 or not np.all(np.isfinite(y)):
        return float("nan"), float("nan")
    if np.ptp(y) <= 1e-12 * max(1.0, float(np.abs(y).max())):
        return 0.0, 1.0
    k = np.arange(1, len(y) + 1, dtype=np.float64)
    slope, icpt = np.polyfit(k, y, 1)
    ss_res = float(np.sum((y - (icpt + slope * k)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return float(slope), 1.0 - ss_res / ss_tot


def grid_note(value: Optional[float], grid: Sequence[float], what: str = "learning rate") -> str:
    """Words for a largest-trainable value on a grid, flagging the grid's edges."""
    if value is None:
        return f"no {what} trained"
    g = sorted(grid)
    edge = " (top of the grid: the true limit may be higher)" if value == g[-1] else \
        " (bottom of the grid)" if value == g[0] and len(g) > 1 else ""
    return f"{value:g}{edge}"


def pack_bits(correct: Sequence[bool]) -> str:
    """0/1 per test image -> a hex string (8 images per byte)."""
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def unpack_bits(text: str, n: int) -> np.ndarray:
    """The inverse of :func:`pack_bits` for ``n`` images."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))
    if len(bits) < n:
        raise ValueError(f"packed correctness holds {len(bits)} images, expected {n}")
    return bits[:n].astype(np.float64)
