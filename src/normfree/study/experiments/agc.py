"""Experiment 6: adaptive gradient clipping at a large batch size (Brock et al. 2021, NFNets).

Runs: nf WRNs without and with AGC (classifier not clipped) at one large batch
size and several learning rates, ``agc_seeds`` seeds. Judges: AGC lets
NF-ResNets train at larger learning rates or to a higher accuracy (each seed
alone, then their agreement); runs that did not train say nothing. Draws:
accuracy against learning rate.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ..experiment import Context, Experiment, Section, wrn_blocks
from ..runner import RunSpec, correct_matrix
from ..sizes import knob, wrn_depth
from ..verdicts import (FAILS, HOLDS, UNSURE, Claim, better, fmt, grid_note, paired_bootstrap, pct, trains,
                        trains_rule, unanimous)

NAME = "agc"

KNOBS = {
    "agc_depth": knob(int, 10, cifar10=16, full=28, lo=10, hi=5000, check=wrn_depth, help="WRN depth"),
    "agc_batch": knob(int, 256, quick=64, cifar10=512, full=4096, lo=1, hi=65536, help="the large batch size"),
    "agc_lrs": knob(float, (0.4, 1.6, 6.4), quick=(1.6,), cifar10=(0.2, 0.8, 3.2), full=(0.8, 1.6, 3.2, 6.4),
                    many=True, lo=1e-6, hi=1000, help="learning rates"),
    "agc_epochs": knob(float, 15, quick=0.5, cifar10=0.4, full=60, lo=0.01, hi=10000, help="epochs per run"),
    "agc_clipping": knob(float, 0.04, full=0.01, lo=1e-6, hi=100, help="AGC threshold lambda"),
    "agc_seeds": knob(int, 2, quick=1, lo=1, hi=20, help="seeds per run"),
}

LABELS = ("nf no AGC", "nf AGC")


def plan(ctx: Context) -> List[RunSpec]:
    sz = ctx.size
    return [RunSpec(NAME, f"{LABELS[agc]} lr {lr:g} seed {seed}",
                    ctx.train_cfg(model="nf_wrn", depth=sz.agc_depth, epochs=sz.agc_epochs, batch_size=sz.agc_batch,
                                  lr=lr, agc=sz.agc_clipping if agc else None, seed=seed),
                    seed=seed, blocks=wrn_blocks(sz.agc_depth))
            for seed in ctx.seeds(sz.agc_seeds) for agc in (0, 1) for lr in sz.agc_lrs]


def _largest(by_lr: Dict[float, dict], nc: int) -> Optional[float]:
    ok = [lr for lr, r in by_lr.items() if trains(r, nc)]
    return max(ok) if ok else None


def _best(by_lr: Dict[float, dict]) -> Optional[dict]:
    ok = [r for r in by_lr.values() if r["status"] == "ok" and r.get("test_acc") is not None]
    return max(ok, key=lambda r: r["test_acc"]) if ok else None


def rule(runs: Dict[str, Dict[float, dict]], num_classes: int, lrs: Sequence[float], resamples: int):
    """One seed ({label: {lr: result}}) -> (verdict, measured)."""
    no, yes = runs[LABELS[0]], runs[LABELS[1]]
    lr_no, lr_yes = _largest(no, num_classes), _largest(yes, num_classes)
    b_no, b_yes = _best(no), _best(yes)
    measured = (f"largest lr that trains: {grid_note(lr_no, lrs)} without, {grid_note(lr_yes, lrs)} with AGC; "
                f"best test acc {pct(b_no['test_acc']) if b_no else 'none finished'} without, "
                f"{pct(b_yes['test_acc']) if b_yes else 'none finished'} with")
    if lr_no is None and lr_yes is None:
        return UNSURE, measured + " -- no run trained, so this says nothing"
    for_ = (lr_yes or 0) > (lr_no or 0)
    against = (lr_yes or 0) < (lr_no or 0)
    if b_no and b_yes:
        iv = paired_bootstrap(correct_matrix([b_yes]), correct_matrix([b_no]), resamples)
        acc = better(iv)
        for_ |= acc == HOLDS
        against |= acc == FAILS
        measured += f"; {iv.text('AGC', 'no AGC')}"
    if for_ and not against:
        return HOLDS, measured
    if against and not for_:
        return FAILS, measured
    return UNSURE, measured


def judge(per_seed: Dict[int, Dict[str, Dict[float, dict]]], num_classes: int, lrs, resamples: int) -> Claim:
    rows = [(seed, *rule(runs, num_classes, lrs, resamples)) for seed, runs in sorted(per_seed.items())]
    return Claim(
        "Adaptive gradient clipping lets NF-ResNets train at large batch sizes with larger learning rates or to a "
        "higher accuracy.", "Brock et al. 2021 (NFNets)",
        rows[0][2] if len(rows) == 1 else f"{rows[0][2]} (seed {rows[0][0]}; all seeds below)",
        unanimous([r[1] for r in rows]),
        f"{trains_rule(num_classes)}; per seed: inconclusive if no run trained; evidence for: AGC's largest learning "
        "rate that trains is larger, or its best accuracy is higher (95% bootstrap interval over test images above "
        "0); against: smaller, or lower (interval below 0); holds with evidence only for, does not hold with "
        "evidence only against, else inconclusive (a tie is not a win). The claim: the seeds' common verdict, "
        "inconclusive if they differ", per_seed=rows)


def report(ctx: Context, specs: Sequence[RunSpec], recs: Dict[str, dict]) -> Section:
    from ...plots import plot_lr_sweep

    sz = ctx.size
    nc = ctx.trains
    sec = Section(NAME, EXPERIMENT.title)
    sec.text.append(f"nf WRN-{sz.agc_depth}-{fmt(sz.width)} at batch {sz.agc_batch}, {fmt(sz.agc_epochs)} epochs, "
                    f"learning rates {list(sz.agc_lrs)}, without and with AGC (lambda = {fmt(sz.agc_clipping)}, "
                    f"classifier not clipped), {sz.agc_seeds} seed(s).")
    per_seed: Dict[int, Dict[str, Dict[float, dict]]] = {}
    rows = []
    for s in specs:
        r = recs[s.key]
        per_seed.setdefault(s.seed, {}).setdefault(s.label.split(" lr ")[0], {})[s.cfg["lr"]] = r
        rows.append([s.label, r["status"], fmt(r.get("final_train_loss")),
                     pct(r.get("test_acc")) if r["status"] == "ok" else "diverged"])
    sec.tables.append(("Runs", ["run", "status", "final train loss", "test acc"], rows))
    groups = {}
    for s in specs:
        if s.seed == ctx.seed:
            groups.setdefault((s.label.split(" lr ")[0], sz.agc_batch), []).append({**recs[s.key], "lr": s.cfg["lr"]})
    sec.figures.append((plot_lr_sweep(groups, list(LABELS), [sz.agc_batch], ctx.fig("agc"))[0],
                        f"Test accuracy against learning rate with and without AGC, seed {ctx.seed} (x: diverged)."))
    sec.claims.append(judge(per_seed, nc, sz.agc_lrs, sz.bootstrap))
    return sec


EXPERIMENT = Experiment(NAME, 6, "6. Adaptive gradient clipping", KNOBS, plan, report,
                        summary="nf with and without AGC at a large batch size")
