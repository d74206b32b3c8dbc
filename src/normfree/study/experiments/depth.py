"""Experiment 2: trainability against depth, and De & Smith's 1,000-layer claim.

Runs: (a) the curve: every method's WRN-d at each depth of ``depths``, each
learning rate of ``depth_lrs``, one seed; (b) the claim: none, SkipInit
alpha = 0 and alpha = 1 (and bn, the paper's control, with ``deep_with_bn``)
at ``deep_depth`` (>= 1,000 layers by default), one learning rate,
``depth_seeds`` seeds.
Judges: the claim, each seed alone, then the seeds' agreement. Draws: best
final loss and test accuracy against depth.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ..experiment import Context, Experiment, Section, wrn_blocks
from ..runner import RunSpec
from ..sizes import knob, wrn_depth
from ..verdicts import FAILS, HOLDS, UNSURE, Claim, chance_loss, fmt, pct, trains, trains_rule, unanimous

NAME = "depth"

KNOBS = {
    "depths": knob(int, (10, 34, 100), quick=(10, 16), cifar10=(10, 22, 40), full=(10, 28, 100, 304),
                   many=True, lo=10, hi=5000, check=wrn_depth, help="WRN depths of the trainability curve"),
    "depth_lrs": knob(float, (0.05, 0.2), quick=(0.1,), cifar10=(0.1,), full=(0.03, 0.1, 0.3, 1.0), many=True,
                      lo=1e-6, hi=100,
                      help="learning rates of the curve (the best per cell is shown)"),
    "depth_steps": knob(int, 80, quick=6, cifar10=100, full=5000, lo=1, hi=10_000_000, help="SGD steps per curve run"),
    "depth_batch": knob(int, 32, quick=16, cifar10=64, full=128, lo=1, hi=65536, help="batch size of the curve runs"),
    "deep_depth": knob(int, 1000, quick=34, cifar10=100, full=1000, lo=10, hi=5000, check=wrn_depth,
                       help="depth of the claim's runs (the paper's headline: 1,000 layers)"),
    "deep_steps": knob(int, 200, quick=6, cifar10=200, full=5000, lo=1, hi=10_000_000,
                       help="SGD steps of each claim run"),
    "deep_batch": knob(int, 32, quick=16, cifar10=64, full=128, lo=1, hi=65536, help="batch size of the claim runs"),
    "deep_lr": knob(float, 0.03, quick=0.1, cifar10=0.05, full=0.1, lo=1e-6, hi=100,
                    help="learning rate of the claim runs (SkipInit at 1,000 layers diverges at 0.1 at batch 16)"),
    "depth_seeds": knob(int, 3, quick=1, lo=1, hi=20, help="seeds of the claim runs"),
    "deep_with_bn": knob(int, 0, full=1, lo=0, hi=1,
                         help="1: also train bn at deep_depth (the paper's BN control; costly on a CPU)"),
}

#: (label, model, options) of the curve
CONFIGS = [("bn", "bn_wrn", {}), ("relubn", "relubn_wrn", {}), ("none", "none_wrn", {}),
           ("skipinit a=0", "skipinit_wrn", {"gain_init": 0.0}),
           ("skipinit a=1/sqrt(d)", "skipinit_wrn", {"gain_init": "1/sqrt(d)"}),
           ("skipinit a=1", "skipinit_wrn", {"gain_init": 1.0}),
           ("fixup", "fixup_wrn", {}), ("nf_he", "nf_he_wrn", {}), ("nf", "nf_wrn", {}),
           ("rescale", "rescale_wrn", {}),
           # issue 17's methods meant for deep networks (lsuv: `normfree train` runs lsuv_init on the
           # first training batch); wn, cwn and selu leave y = x + f(x) unscaled, so their variance
           # doubles per block as `none`'s does
           ("balduzzi", "balduzzi_wrn", {}), ("szegedy", "szegedy_wrn", {}), ("hanin", "hanin_wrn", {}),
           ("arpit", "arpit_wrn", {}), ("lsuv", "lsuv_wrn", {})]

#: the claim: these train, these do not (bn, the paper's control, only with deep_with_bn=1)
CLAIM_TRAINS = ("skipinit a=0",)
CLAIM_FAILS = ("none", "skipinit a=1")
CONTROL = "bn"


def _spec(ctx: Context, label, model, opts, depth, steps, batch, lr, seed, kind) -> RunSpec:
    # the claim's runs check the loss every step: an exploding network stops at once, not 10 costly steps later
    cfg = ctx.train_cfg(model=model, depth=depth, model_options=opts, steps=steps, batch_size=batch, lr=lr,
                        warmup_steps=max(1, steps // 20), seed=seed, log_every=1 if kind == "claim" else 10)
    return RunSpec(NAME, f"{kind} {label} depth {depth} lr {lr:g} seed {seed}", cfg, seed=seed,
                   blocks=wrn_blocks(depth))


def plan(ctx: Context) -> List[RunSpec]:
    sz = ctx.size
    curve = [_spec(ctx, label, model, opts, d, sz.depth_steps, sz.depth_batch, lr, ctx.seed, "curve")
             for label, model, opts in CONFIGS for d in sz.depths for lr in sz.depth_lrs]
    opts = {label: (model, o) for label, model, o in CONFIGS}
    labels = CLAIM_TRAINS + CLAIM_FAILS + ((CONTROL,) if sz.deep_with_bn else ())
    deep = [_spec(ctx, label, *opts[label], sz.deep_depth, sz.deep_steps, sz.deep_batch, sz.deep_lr, seed, "claim")
            for seed in ctx.seeds(sz.depth_seeds) for label in labels]
    return curve + deep


def _best(runs: Sequence[dict]) -> Optional[dict]:
    ok = [r for r in runs if r["status"] == "ok" and r.get("final_train_loss") is not None]
    return min(ok, key=lambda r: r["final_train_loss"]) if ok else None


def rule(runs: Dict[str, dict], num_classes: int):
    """One seed's claim runs ({label: result}; bn optional) -> (verdict, measured)."""
    labels = CLAIM_TRAINS + CLAIM_FAILS + ((CONTROL,) if CONTROL in runs else ())
    tr = {k: trains(runs.get(k), num_classes) for k in labels}

    def say(k):
        r = runs.get(k)
        if r is None:
            return f"{k}: not run"
        if r["status"] != "ok":
            return f"{k}: diverged at step {r.get('diverged_step') or '?'}"
        word = "trains" if tr[k] else "does not train"
        return f"{k}: {word} (loss {fmt(r['final_train_loss'])}, test {pct(r.get('test_acc'))})"

    measured = "; ".join(say(k) for k in labels)
    if CONTROL in runs and not tr[CONTROL]:
        return UNSURE, measured + " -- the BN control did not train, so the budget says nothing"
    if not any(tr.values()):
        return UNSURE, measured + " -- nothing trained, so the budget may be too small to tell"
    if all(tr[k] for k in CLAIM_TRAINS + ((CONTROL,) if CONTROL in runs else ())) \
            and not any(tr[k] for k in CLAIM_FAILS):
        return HOLDS, measured
    return FAILS, measured


def rule_text(num_classes: int, with_bn: bool) -> str:
    bn = " (and bn, the control)" if with_bn else ""
    control = "; inconclusive if bn (the control) does not train" if with_bn else ""
    return (f"{trains_rule(num_classes)}; per seed: holds if SkipInit alpha = 0{bn} trains while none and alpha = 1 do "
            f"not; inconclusive if nothing trains (the budget may be too small){control}; else does not hold. The "
            "claim: the seeds' common verdict, inconclusive if they differ")


#: a published number of a comparable setting (CIFAR-10 only)
PAPER_CIFAR10 = ("paper: a 1,001-layer pre-activation ResNet with BN reaches 4.62% CIFAR-10 test error (He et al. "
                 "2016, full training)")


def judge(per_seed: Dict[int, Dict[str, dict]], num_classes: int, depth: int, data: str = "") -> Claim:
    rows = [(seed, *rule(runs, num_classes)) for seed, runs in sorted(per_seed.items())]
    verdict = unanimous([v for _, v, _ in rows])
    with_bn = any(CONTROL in runs for runs in per_seed.values())
    labels = CLAIM_TRAINS + CLAIM_FAILS + ((CONTROL,) if with_bn else ())
    n_tr = {k: sum(trains(runs.get(k), num_classes) for runs in per_seed.values()) for k in labels}
    measured = (f"depth {depth}, seeds {len(rows)}: " +
                ", ".join(f"{k} trains in {n_tr[k]} of {len(rows)}" for k in labels))
    bn = " and with BN" if with_bn else ""
    paper = ""
    if data == "cifar10" and with_bn:
        accs = [r[CONTROL]["test_acc"] for r in per_seed.values() if r[CONTROL].get("test_acc") is not None]
        paper = (f"{PAPER_CIFAR10} / measured: bn at {depth} layers "
                 f"{pct(sum(accs) / len(accs)) if accs else 'did not finish'} test accuracy after a few hundred "
                 "steps (a much shorter budget: compare trainability, not the number)")
    return Claim(f"A {depth}-layer residual network trains with SkipInit (alpha = 0){bn}, "
                 "but not without normalization, nor with SkipInit alpha = 1.", "De & Smith 2020", measured, verdict,
                 rule_text(num_classes, with_bn), per_seed=rows, paper=paper)


def report(ctx: Context, specs: Sequence[RunSpec], recs: Dict[str, dict]) -> Section:
    from ...plots import plot_depth

    sz = ctx.size
    nc = ctx.trains
    sec = Section(NAME, EXPERIMENT.title)
    sec.text.append(
        f"Curve: WRN-d-{fmt(sz.width)} for d in {list(sz.depths)} "
        f"({', '.join(str(wrn_blocks(d)) for d in sz.depths)} blocks), {sz.depth_steps} SGD steps (Nesterov 0.9, "
        f"cosine, 5% warmup) at batch {sz.depth_batch}, learning rates {list(sz.depth_lrs)}, seed {ctx.seed}; the "
        f"best learning rate (lowest final training loss) per cell. Claim: WRN-{sz.deep_depth}-{fmt(sz.width)} "
        f"({wrn_blocks(sz.deep_depth)} blocks), {sz.deep_steps} steps at batch {sz.deep_batch}, lr {fmt(sz.deep_lr)}, "
        f"{sz.depth_seeds} seed(s). A run that reached a NaN/Inf loss is marked diverged.")
    cells: Dict[tuple, List[dict]] = {}
    per_seed: Dict[int, Dict[str, dict]] = {}
    for s in specs:
        kind, rest = s.label.split(" ", 1)
        label = rest.split(" depth ")[0]
        if kind == "curve":
            cells.setdefault((label, s.cfg["depth"]), []).append({**recs[s.key], "lr": s.cfg["lr"]})
        else:
            per_seed.setdefault(s.seed, {})[label] = recs[s.key]
    # the claim runs of the first seed extend the curve to deep_depth
    first = per_seed.get(ctx.seed, {})
    for label, r in first.items():
        cells.setdefault((label, sz.deep_depth), []).append({**r, "lr": sz.deep_lr})
    depths = sorted({d for _, d in cells})
    curves, rows = {}, []
    for label, _, _ in CONFIGS:
        row = [label]
        for d in depths:
            runs = cells.get((label, d))
            if runs is None:
                row.append("-")
                continue
            best = _best(runs)
            curves.setdefault(label, []).append((d, best))
            row.append("diverged" if best is None else
                       f"{fmt(best['final_train_loss'])} / {pct(best.get('test_acc'))} (lr {best['lr']:g})")
        rows.append(row)
    sec.tables.append((f"Final training loss / test accuracy at the best learning rate (seed {ctx.seed})",
                       ["method"] + [f"depth {d}" for d in depths], rows))
    sec.figures.append((plot_depth(curves, ctx.fig("depth"), chance=chance_loss(ctx.data.num_classes))[0],
                        "Best final training loss and test accuracy against depth; x: every learning rate diverged."))
    sec.claims.append(judge(per_seed, nc, sz.deep_depth, ctx.data.name))
    return sec


EXPERIMENT = Experiment(NAME, 2, "2. Trainability against depth", KNOBS, plan, report,
                        summary="every method at several depths; bn, none, SkipInit alpha 0 and 1 at deep_depth layers")
