"""Experiment 4: accuracy at an equal budget -- BN, SkipInit, regularized
SkipInit, Fixup and NF-ResNet trained with the same recipe and epochs.

Runs: each method's WRN, the same depth, batch, learning rate and epochs,
``budget_seeds`` seeds. Judges (pooled paired bootstrap over seeds and test
images): regularized SkipInit beats plain SkipInit and comes within a margin
of BN (De & Smith 2020); NF-ResNet and Fixup come within the margin of BN
(Brock et al. 2021; Zhang et al. 2019). Shows the published CIFAR-10 numbers
beside ours where the papers have a comparable setting.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ..experiment import Context, Experiment, Section, wrn_blocks
from ..runner import RunSpec, correct_matrix
from ..sizes import knob, wrn_depth
from ..verdicts import UNSURE, Claim, better, fmt, not_worse, paired_bootstrap, pct, trains, trains_rule

NAME = "budget"

KNOBS = {
    "budget_depth": knob(int, 16, quick=10, full=28, lo=10, hi=5000, check=wrn_depth, help="WRN depth"),
    "budget_epochs": knob(float, 12, quick=0.5, cifar10=1.2, full=200, lo=0.01, hi=10000, help="epochs per run"),
    "budget_batch": knob(int, 64, quick=32, cifar10=128, full=128, lo=1, hi=65536, help="batch size"),
    "budget_lr": knob(float, 0.1, lo=1e-6, hi=100, help="peak learning rate (SGD Nesterov, cosine)"),
    "budget_seeds": knob(int, 3, quick=1, cifar10=2, lo=1, hi=20, help="seeds per method"),
    "budget_margin": knob(float, 0.03, cifar10=0.015, full=0.005, lo=0.0, hi=1.0,
                          help="'comes close to BN' means at most this much lower accuracy (fraction)"),
}

METHODS = [("bn", "bn_wrn", {}), ("skipinit", "skipinit_wrn", {}),
           ("skipinit regularized", "skipinit_wrn", {"regularized": True}),
           ("fixup", "fixup_wrn", {}), ("nf", "nf_wrn", {})]

#: published CIFAR-10 numbers of a comparable setting: (method, text)
PAPER_CIFAR10 = {
    "fixup": "paper: CIFAR-10 ResNet-110 test error BN 6.61%, Fixup 7.24% (Zhang et al. 2019)",
}


def plan(ctx: Context) -> List[RunSpec]:
    sz = ctx.size
    return [RunSpec(NAME, f"{label} seed {seed}",
                    ctx.train_cfg(model=model, depth=sz.budget_depth, model_options=opts, epochs=sz.budget_epochs,
                                  batch_size=sz.budget_batch, lr=sz.budget_lr, seed=seed),
                    seed=seed, blocks=wrn_blocks(sz.budget_depth))
            for seed in ctx.seeds(sz.budget_seeds) for label, model, opts in METHODS]


def compare(runs: Dict[str, Dict[int, dict]], a: str, b: str, num_classes: int, resamples: int, judge):
    """Pooled paired bootstrap of a - b over the seeds both ran; ``judge(interval)`` gives the verdict.
    Inconclusive when a run of b (the reference) did not train; a run of a that diverged scores 0."""
    seeds = sorted(set(runs[a]) & set(runs[b]))
    bad = [s for s in seeds if not trains(runs[b][s], num_classes)]
    if not seeds or bad:
        return UNSURE, f"{b} did not train (seed {bad[0] if bad else '-'}), so the comparison says nothing"
    no_a = [s for s in seeds if not trains(runs[a][s], num_classes)]
    ma = correct_matrix([runs[a][s] for s in seeds], zeros_for_failed=True)
    mb = correct_matrix([runs[b][s] for s in seeds])
    iv = paired_bootstrap(ma, mb, resamples)
    text = iv.text(a, b)
    if no_a:
        text += f"; {a} did not train in seed(s) {', '.join(map(str, no_a))}"
    return judge(iv), text


def judge(runs: Dict[str, Dict[int, dict]], num_classes: int, margin: float, resamples: int,
          data: str = "") -> List[Claim]:
    """The section's claims from {method: {seed: result}}."""
    claims = []

    def claim(text, source, a, b, how, rule, paper=""):
        v, m = compare(runs, a, b, num_classes, resamples, how)
        rows = [(s, *compare({a: {s: runs[a][s]}, b: {s: runs[b][s]}}, a, b, num_classes, resamples, how))
                for s in sorted(set(runs[a]) & set(runs[b]))]
        claims.append(Claim(text, source, m, v, rule, per_seed=rows, paper=paper))

    pm = f"{100 * margin:g}"
    base = (f"{trains_rule(num_classes)}; 95% interval of the accuracy difference from a paired bootstrap over seeds "
            "and test images; inconclusive if the reference method did not train, a diverged run scores 0")
    claim("Regularized SkipInit (biases + dropout) improves on plain SkipInit.", "De & Smith 2020",
          "skipinit regularized", "skipinit", better,
          f"{base}; holds if the interval lies above 0, does not hold if below 0, else inconclusive")
    claim("Regularized SkipInit comes close to BN, or beats it.", "De & Smith 2020",
          "skipinit regularized", "bn", lambda iv: not_worse(iv, margin),
          f"{base}; holds if the interval lies above -{pm} points, does not hold if it lies below -{pm} points, "
          "else inconclusive")
    claim("NF-ResNets match batch-normalized ResNets at the same training budget.", "Brock et al. 2021 (NF-ResNets)",
          "nf", "bn", lambda iv: not_worse(iv, margin),
          f"{base}; holds if the interval of nf - bn lies above -{pm} points, does not hold if below -{pm} points, "
          "else inconclusive")
    paper = ""
    if data == "cifar10":
        acc = {m: float(np.mean([r["test_acc"] for r in runs[m].values() if r.get("test_acc") is not None] or [np.nan]))
               for m in ("bn", "fixup")}
        paper = (f"{PAPER_CIFAR10['fixup']} / measured: BN {pct(acc['bn'])}, Fixup {pct(acc['fixup'])} accuracy "
                 "(a shallower, narrower WRN trained a few epochs: expect lower numbers, compare the gap)")
    claim("Fixup trains without normalization to close to BN's accuracy.", "Zhang et al. 2019 (Fixup)",
          "fixup", "bn", lambda iv: not_worse(iv, margin),
          f"{base}; holds if the interval of fixup - bn lies above -{pm} points, does not hold if below -{pm} points, "
          "else inconclusive", paper=paper)
    return claims


def report(ctx: Context, specs: Sequence[RunSpec], recs: Dict[str, dict]) -> Section:
    sz = ctx.size
    nc = ctx.trains
    sec = Section(NAME, EXPERIMENT.title)
    sec.text.append(
        f"WRN-{sz.budget_depth}-{fmt(sz.width)}, {fmt(sz.budget_epochs)} epochs, batch {sz.budget_batch}, lr "
        f"{fmt(sz.budget_lr)} (SGD Nesterov 0.9, weight decay 5e-4, cosine; Fixup's scalars at lr/10), "
        f"{sz.budget_seeds} seed(s), the same recipe for every method. Regularized SkipInit = biases after the "
        "convolutions + dropout 0.2 before the classifier.")
    runs: Dict[str, Dict[int, dict]] = {}
    for s in specs:
        runs.setdefault(s.label.rsplit(" seed ", 1)[0], {})[s.seed] = recs[s.key]
    rows = []
    for label, _, _ in METHODS:
        rs = runs[label]
        accs = [r["test_acc"] for r in rs.values() if r.get("test_acc") is not None]
        losses = [r["final_train_loss"] for r in rs.values() if r["status"] == "ok"]
        rows.append([label, pct(float(np.mean(accs))) if accs else "no run finished",
                     ", ".join(f"{s}: {pct(r.get('test_acc')) if r['status'] == 'ok' else 'diverged'}"
                               for s, r in sorted(rs.items())),
                     fmt(float(np.mean(losses))) if losses else "-"])
    sec.tables.append(("Test accuracy (mean over seeds, and each seed) and final training loss",
                       ["method", "mean test acc", "per seed", "final train loss (mean)"], rows))
    sec.claims = judge(runs, nc, sz.budget_margin, sz.bootstrap, ctx.data.name)
    return sec


EXPERIMENT = Experiment(NAME, 4, "4. Accuracy at an equal budget: BN, SkipInit, regularized SkipInit, Fixup, NF",
                        KNOBS, plan, report, summary="five methods, one recipe, several seeds")
