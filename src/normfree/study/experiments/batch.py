"""Experiment 3: BN against SkipInit across batch sizes and learning rates.

Runs: bn and skipinit WRNs at every batch size x learning rate, the same
number of epochs, ``bs_seeds`` seeds.
Judges: De & Smith's three claims: at the smallest batch SkipInit matches BN
with a similar best learning rate; at the largest batch BN trains at larger
learning rates, and reaches a higher accuracy. Draws: accuracy against
learning rate per batch size.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ..experiment import Context, Experiment, Section, wrn_blocks
from ..runner import RunSpec, correct_matrix
from ..sizes import knob, wrn_depth
from ..verdicts import (FAILS, HOLDS, UNSURE, Claim, better, combine, fmt, grid_note, matches,
                        paired_bootstrap, pct, trains, trains_rule, unanimous)

NAME = "batch"

KNOBS = {
    "bs_depth": knob(int, 10, cifar10=16, full=16, lo=10, hi=5000, check=wrn_depth, help="WRN depth"),
    "batch_sizes": knob(int, (16, 64, 256), quick=(16, 64), cifar10=(32, 512), full=(16, 64, 256, 1024, 4096),
                        many=True, length=(2, 12), lo=1, hi=65536,
                        help="batch sizes (smallest and largest are judged)"),
    "bs_lrs": knob(float, (0.05, 0.2, 0.8, 3.2), quick=(0.1, 1.6), cifar10=(0.05, 0.2, 0.8),
                   full=(0.0125, 0.05, 0.2, 0.8, 3.2, 12.8), many=True, length=(2, 12), lo=1e-6, hi=100,
                   help="learning rates (a geometric grid)"),
    "bs_epochs": knob(float, 8, quick=0.5, cifar10=0.3, full=30, lo=0.01, hi=10000, help="epochs per run"),
    "bs_seeds": knob(int, 2, quick=1, full=3, lo=1, hi=20, help="seeds per cell"),
    "bs_match_margin": knob(float, 0.03, cifar10=0.015, full=0.005, lo=0.0, hi=1.0,
                            help="'SkipInit matches BN' means an accuracy gap within this (fraction)"),
}

METHODS = [("bn", "bn_wrn"), ("skipinit", "skipinit_wrn")]


def plan(ctx: Context) -> List[RunSpec]:
    sz = ctx.size
    return [RunSpec(NAME, f"{label} bs {bs} lr {lr:g} seed {seed}",
                    ctx.train_cfg(model=model, depth=sz.bs_depth, epochs=sz.bs_epochs, batch_size=bs, lr=lr,
                                  seed=seed), seed=seed, blocks=wrn_blocks(sz.bs_depth))
            for seed in ctx.seeds(sz.bs_seeds) for label, model in METHODS for bs in sz.batch_sizes for lr in sz.bs_lrs]


# --------------------------------------------------------------------------
# rules. runs: {method: {lr: result}} for one batch size and one seed
# --------------------------------------------------------------------------
def best_run(by_lr: Dict[float, dict]) -> Optional[tuple]:
    """(lr, result) of the highest test accuracy among runs that did not diverge."""
    ok = [(lr, r) for lr, r in by_lr.items() if r["status"] == "ok" and r.get("test_acc") is not None]
    return max(ok, key=lambda t: (t[1]["test_acc"], -t[0])) if ok else None


def largest_trainable(by_lr: Dict[float, dict], num_classes: int) -> Optional[float]:
    ok = [lr for lr, r in by_lr.items() if trains(r, num_classes)]
    return max(ok) if ok else None


def rule_small(per_seed: Dict[int, Dict[str, Dict[float, dict]]], num_classes: int, margin: float, lrs: Sequence[float],
               resamples: int):
    """SkipInit matches BN at the smallest batch: accuracy gap within ``margin`` and best
    learning rates at most one grid step apart. Pooled over the seeds given."""
    step = max(b / a for a, b in zip(sorted(lrs), sorted(lrs)[1:]))
    pairs, lr_far, notes = [], False, []
    for seed, runs in sorted(per_seed.items()):
        b, s = best_run(runs["bn"]), best_run(runs["skipinit"])
        if b is None or s is None or not (trains(b[1], num_classes) and trains(s[1], num_classes)):
            who = "bn" if b is None or not trains(b[1], num_classes) else "skipinit"
            return UNSURE, f"seed {seed}: {who} did not train at any learning rate"
        pairs.append((b[1], s[1]))
        ratio = max(b[0], s[0]) / min(b[0], s[0])
        lr_far |= ratio > step * 1.001
        notes.append(f"{'seed ' + str(seed) + ': ' if len(per_seed) > 1 else ''}best lr bn {b[0]:g}, skipinit {s[0]:g}")
    a, c = correct_matrix([p[0] for p in pairs]), correct_matrix([p[1] for p in pairs])
    iv = paired_bootstrap(a, c, resamples)
    v = combine(matches(iv, margin), FAILS if lr_far else HOLDS)
    return v, f"{iv.text('bn', 'skipinit')}; {'; '.join(notes)}"


def rule_large_lr(runs: Dict[str, Dict[float, dict]], num_classes: int, lrs: Sequence[float]):
    """One seed at the largest batch: BN's largest trainable lr strictly above SkipInit's."""
    bn, sk = largest_trainable(runs["bn"], num_classes), largest_trainable(runs["skipinit"], num_classes)
    measured = f"largest lr that trains: bn {grid_note(bn, lrs)}, skipinit {grid_note(sk, lrs)}"
    if bn is None and sk is None:
        return UNSURE, measured + " (no run trained)"
    if sk is None:
        return HOLDS, measured
    if bn is None or bn < sk:
        return FAILS, measured
    if bn == sk:
        return UNSURE, measured + " (a tie" + (", both at the top of the grid" if bn == max(lrs) else "") + ")"
    return HOLDS, measured


def rule_large_acc(per_seed: Dict[int, Dict[str, Dict[float, dict]]], num_classes: int, resamples: int):
    """BN's best accuracy above SkipInit's at the largest batch (pooled bootstrap)."""
    pairs = []
    for seed, runs in sorted(per_seed.items()):
        b, s = best_run(runs["bn"]), best_run(runs["skipinit"])
        if b is None or not trains(b[1], num_classes):
            return UNSURE, f"seed {seed}: bn did not train at any learning rate"
        if s is None:
            return HOLDS, f"seed {seed}: skipinit diverged at every learning rate, bn {pct(b[1]['test_acc'])}"
        pairs.append((b[1], s[1]))
    iv = paired_bootstrap(correct_matrix([p[0] for p in pairs]), correct_matrix([p[1] for p in pairs]), resamples)
    return better(iv), iv.text("bn", "skipinit") + " (each at its best learning rate)"


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def _grid(specs, recs) -> Dict[int, Dict[int, Dict[str, Dict[float, dict]]]]:
    """{batch: {seed: {method: {lr: result}}}}"""
    out: Dict[int, Dict[int, Dict[str, Dict[float, dict]]]] = {}
    for s in specs:
        method = s.label.split(" bs ")[0]
        out.setdefault(s.cfg["batch_size"], {}).setdefault(s.seed, {}).setdefault(method, {})[s.cfg["lr"]] = recs[s.key]
    return out


def judge(grid, num_classes: int, lrs, margin: float, resamples: int) -> List[Claim]:
    small, large = min(grid), max(grid)
    claims = []
    rows = [(seed, *rule_small({seed: runs}, num_classes, margin, lrs, resamples))
            for seed, runs in sorted(grid[small].items())]
    v, m = rule_small(grid[small], num_classes, margin, lrs, resamples)
    claims.append(Claim(
        f"At small batch sizes (here {small}) SkipInit matches BN, with a similar best learning rate.",
        "De & Smith 2020", m, v,
        f"{trains_rule(num_classes)}; pooled over seeds: holds if the 95% interval of the accuracy gap (best learning "
        f"rate of each) lies within +-{100 * margin:g} points and the best learning rates are at most one grid step "
        f"apart in every seed; does not hold if the interval lies outside +-{100 * margin:g} points or the best "
        "rates are further apart; inconclusive otherwise or if a method did not train", per_seed=rows))
    rows = [(seed, *rule_large_lr(runs, num_classes, lrs)) for seed, runs in sorted(grid[large].items())]
    v = unanimous([r[1] for r in rows])
    claims.append(Claim(
        f"At large batch sizes (here {large}) BN trains at larger learning rates than SkipInit.", "De & Smith 2020",
        rows[0][2] if len(rows) == 1 else f"{rows[0][2]} (seed {rows[0][0]}; all seeds below)", v,
        f"{trains_rule(num_classes)}; per seed: holds if bn's largest learning rate that trains is above "
        "skipinit's, does not hold if below, inconclusive if equal (a tie; the top of the grid is flagged) or if "
        "nothing trains. The claim: the seeds' common verdict, inconclusive if they differ", per_seed=rows))
    rows = [(seed, *rule_large_acc({seed: runs}, num_classes, resamples)) for seed, runs in sorted(grid[large].items())]
    v, m = rule_large_acc(grid[large], num_classes, resamples)
    claims.append(Claim(
        f"At large batch sizes (here {large}) BN reaches a higher test accuracy than SkipInit.", "De & Smith 2020",
        m, v, "pooled over seeds: holds if the 95% interval of bn - skipinit (each at its best learning rate) lies "
              "above 0, does not hold if below 0, else inconclusive (also if bn did not train)", per_seed=rows))
    return claims


def report(ctx: Context, specs: Sequence[RunSpec], recs: Dict[str, dict]) -> Section:
    from ...plots import plot_lr_sweep

    sz = ctx.size
    nc = ctx.trains
    sec = Section(NAME, EXPERIMENT.title)
    sec.text.append(f"WRN-{sz.bs_depth}-{fmt(sz.width)}, {fmt(sz.bs_epochs)} epochs at each batch size "
                    f"{list(sz.batch_sizes)} and learning rate {list(sz.bs_lrs)} (SGD Nesterov, cosine), "
                    f"{sz.bs_seeds} seed(s). Best = highest test accuracy.")
    grid = _grid(specs, recs)
    rows = []
    for bs in sz.batch_sizes:
        for method, _ in METHODS:
            for seed, runs in sorted(grid[bs].items()):
                b = best_run(runs[method])
                rows.append([method, bs, seed, f"{b[0]:g}" if b else "no run finished",
                             pct(b[1]["test_acc"]) if b else "-",
                             grid_note(largest_trainable(runs[method], nc), sz.bs_lrs),
                             sum(r["status"] == "diverged" for r in runs[method].values())])
    sec.tables.append(("Best learning rate and test accuracy per batch size and seed",
                       ["method", "batch", "seed", "best lr", "best test acc", "largest lr that trains",
                        "diverged runs"], rows))
    groups = {}
    for s in specs:
        if s.seed == ctx.seed:
            groups.setdefault((s.label.split(" bs ")[0], s.cfg["batch_size"]), []).append(
                {**recs[s.key], "lr": s.cfg["lr"]})
    sec.figures.append((plot_lr_sweep(groups, [m for m, _ in METHODS], list(sz.batch_sizes), ctx.fig("batch_lr"))[0],
                        f"Test accuracy against learning rate, one panel per batch size, seed {ctx.seed} "
                        "(x: diverged)."))
    sec.claims = judge(grid, nc, sz.bs_lrs, sz.bs_match_margin, sz.bootstrap)
    return sec


EXPERIMENT = Experiment(NAME, 3, "3. Batch size and learning rate: BN against SkipInit", KNOBS, plan, report,
                        summary="bn and skipinit at every batch size x learning rate")
