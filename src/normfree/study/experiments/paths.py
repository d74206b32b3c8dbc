"""Experiment 5: shallow paths -- residual/skip ratios during training, and the
lesion test after it (Veit et al. 2016; De & Smith 2020).

Runs: a deep bn and skipinit WRN, ``paths_seeds`` seeds, tracked every
``paths_track_every`` steps on a fixed batch of training images, then each
non-transition block deleted in turn. Judges: deleting one block barely hurts
a trained network (each seed alone, then their agreement). Draws: the ratios
and gains during training, and the accuracy after each deletion.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ..experiment import Context, Experiment, Section, wrn_blocks
from ..runner import RunSpec
from ..sizes import knob, wrn_depth
from ..verdicts import FAILS, HOLDS, UNSURE, Claim, fmt, pct, trains, trains_rule, unanimous

NAME = "paths"

KNOBS = {
    "paths_depth": knob(int, 64, quick=16, cifar10=40, full=1000, lo=10, hi=5000, check=wrn_depth, help="WRN depth"),
    "paths_steps": knob(int, 240, quick=10, cifar10=160, full=5000, lo=1, hi=10_000_000, help="SGD steps"),
    "paths_batch": knob(int, 32, quick=16, cifar10=64, full=128, lo=1, hi=65536, help="batch size"),
    "paths_lr": knob(float, 0.05, lo=1e-6, hi=100, help="learning rate"),
    "paths_track_every": knob(int, 20, quick=5, cifar10=40, full=250, lo=1, hi=10_000_000,
                              help="steps between measurements of the residual/skip ratios"),
    "paths_seeds": knob(int, 2, quick=1, lo=1, hi=20, help="seeds per method"),
    "paths_lesion_images": knob(int, None, cifar10=2000, lo=1, hi=10_000_000, optional=True,
                                help="test images scored after each deletion (none: all the study's test images)"),
}

METHODS = [("bn", "bn_wrn"), ("skipinit", "skipinit_wrn")]
HOLD_BELOW, FAIL_ABOVE = 0.05, 0.15


def plan(ctx: Context) -> List[RunSpec]:
    sz = ctx.size
    return [RunSpec(NAME, f"{label} depth {sz.paths_depth} seed {seed}",
                    ctx.train_cfg(model=model, depth=sz.paths_depth, steps=sz.paths_steps, batch_size=sz.paths_batch,
                                  lr=sz.paths_lr, warmup_steps=max(1, sz.paths_steps // 10), seed=seed),
                    extra={"track_every": sz.paths_track_every, "lesion": True,
                           "lesion_images": sz.paths_lesion_images}, seed=seed,
                    blocks=wrn_blocks(sz.paths_depth) * 2)
            for seed in ctx.seeds(sz.paths_seeds) for label, model in METHODS]


def rule(rec: dict, method: str, num_classes: int):
    """One run: (verdict, measured). Inconclusive unless the network trained."""
    les = rec.get("lesion")
    if rec["status"] != "ok" or not les or not les["blocks"]:
        return UNSURE, f"{method}: {'diverged' if rec['status'] != 'ok' else 'no block to delete'}, nothing to lesion"
    drops = [b["drop"] for b in les["blocks"]]
    md = float(np.mean(drops))
    trained = trains(rec, num_classes)
    measured = (f"{method}: mean accuracy drop {100 * md:.2f} points over {len(drops)} blocks (worst "
                f"{100 * max(drops):.1f}); intact network {'trained' if trained else 'did NOT train'} (final loss "
                f"{fmt(rec['final_train_loss'])}, test {pct(les['base_acc'])})")
    if not trained:
        return UNSURE, measured
    return (HOLDS if md <= HOLD_BELOW else FAILS if md > FAIL_ABOVE else UNSURE), measured


def judge(per_method: Dict[str, Dict[int, dict]], num_classes: int, depth: int) -> List[Claim]:
    claims = []
    for method, _ in METHODS:
        rows = [(seed, *rule(rec, method, num_classes)) for seed, rec in sorted(per_method[method].items())]
        claims.append(Claim(
            f"Deleting a single residual block of a trained {depth}-layer {method} ResNet barely hurts it "
            "(short paths dominate).", "Veit et al. 2016; De & Smith 2020",
            rows[0][2] if len(rows) == 1 else f"{rows[0][2]} (seed {rows[0][0]}; all seeds below)",
            unanimous([r[1] for r in rows]),
            f"{trains_rule(num_classes)}; per seed: inconclusive unless the network trained; then holds if the mean "
            f"drop <= {100 * HOLD_BELOW:g} points, does not hold above {100 * FAIL_ABOVE:g} points, else "
            "inconclusive. The claim: the seeds' common verdict, inconclusive if they differ", per_seed=rows))
    return claims


def report(ctx: Context, specs: Sequence[RunSpec], recs: Dict[str, dict]) -> Section:
    from ...plots import plot_lesion, plot_tracking

    sz = ctx.size
    nc = ctx.trains
    sec = Section(NAME, EXPERIMENT.title)
    sec.text.append(f"WRN-{sz.paths_depth}-{fmt(sz.width)} trained {sz.paths_steps} steps (batch {sz.paths_batch}, lr "
                    f"{fmt(sz.paths_lr)}), {sz.paths_seeds} seed(s); every {sz.paths_track_every} steps the "
                    "residual-to-skip ratio of every block is measured on a fixed batch of training images, and "
                    "SkipInit's gains are recorded. After training, each non-transition block is deleted in turn (its "
                    "output becomes its input) and the test accuracy measured (Veit et al. 2016). Figures: seed "
                    f"{ctx.seed}.")
    per_method: Dict[str, Dict[int, dict]] = {}
    for s in specs:
        per_method.setdefault(s.label.split(" depth ")[0], {})[s.seed] = recs[s.key]
    first = {m: runs[ctx.seed] for m, runs in per_method.items()}
    sec.figures.append((plot_tracking(first, ctx.fig("paths_tracking"))[0],
                        "Median residual/skip ratio over blocks during training, and SkipInit's gains "
                        "(mean |alpha| and max |alpha|)."))
    sec.figures.append((plot_lesion(first, ctx.fig("lesion"))[0],
                        "Test accuracy after deleting one block, against the block deleted (line: intact network)."))
    rows = []
    for method, runs in per_method.items():
        for seed, rec in sorted(runs.items()):
            les = rec.get("lesion")
            track = (rec.get("tracking") or [{}])[-1].get("ratio") or []
            last = [r for r in track if r is not None]
            if not les or not les["blocks"]:
                rows.append([method, seed, rec["status"], "-", "-", "-", "-"])
                continue
            d = [b["drop"] for b in les["blocks"]]
            rows.append([method, seed, rec["status"], pct(les["base_acc"]), f"{100 * float(np.mean(d)):.2f}",
                         f"{100 * float(np.max(d)):.1f}", fmt(float(np.median(last))) if last else "-"])
    sec.tables.append(("Lesion test and the final residual/skip ratio",
                       ["method", "seed", "status", "intact test acc", "mean drop (points)", "worst drop (points)",
                        "median ratio after training"], rows))
    sec.claims = judge(per_method, nc, sz.paths_depth)
    return sec


EXPERIMENT = Experiment(NAME, 5, "5. Shallow paths: residual/skip ratios during training, and the lesion test",
                        KNOBS, plan, report, summary="deep bn and skipinit: ratios while training, lesions after")
