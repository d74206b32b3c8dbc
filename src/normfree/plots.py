"""Figures (matplotlib, Agg backend: no display needed). Every figure is saved
as PNG and SVG with :func:`save_figure`.

* :func:`plot_spp` -- signal propagation plots (Brock et al. 2021, fig. 1 style):
  squared channel mean, channel variance and residual-branch variance against
  the residual block index, for several models on one figure.
* :func:`plot_paths` -- De & Smith's residual-to-skip ratio per block and the
  resulting (variance-weighted) path-length distribution, against Veit's binomial.
* :func:`plot_gradients` -- backward signal: RMS of dL/d(block output) per block.
"""
from __future__ import annotations

import math
import os
from typing import List, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["save_figure", "use_log_scale", "plot_spp", "plot_depth", "plot_lr_sweep", "plot_tracking", "plot_lesion"]


def save_figure(fig, path, formats: Sequence[str] = ("png", "svg"), dpi: int = 130) -> List[str]:
    """Save ``fig`` as ``<path stem>.<fmt>`` for each format (``"spp.png"`` ->
    spp.png and spp.svg), create the folder, close the figure; return the paths."""
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)
    if ext.lstrip(".").lower() not in ("png", "svg", "pdf", ""):
        stem = path
    folder = os.path.dirname(stem)
    if folder:
        os.makedirs(folder, exist_ok=True)
    out = []
    for fmt in formats:
        p = f"{stem}.{fmt}"
        fig.savefig(p, dpi=dpi, bbox_inches="tight")
        out.append(p)
    plt.close(fig)
    return out


def use_log_scale(values, decades: float = 2.0) -> bool:
    """True when the positive finite ``values`` span more than ``decades`` decades."""
    pos = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return len(pos) >= 2 and math.log10(max(pos) / min(pos)) > decades


def _stage_starts(stats) -> List[float]:
    """x positions (between blocks) where a new stage starts."""
    xs = []
    for prev, cur in zip(stats, stats[1:]):
        if cur.stage != prev.stage:
            xs.append(cur.index - 0.5)
    return xs


_PANELS = [
    ("mean_sq", "average squared channel mean"),
    ("var", "average channel variance"),
    ("res_var", "residual branch variance (before gain)"),
]


def plot_spp(results: Mapping[str, Sequence], path, predictions: Optional[Mapping[str, Sequence[float]]] = None,
             title: Optional[str] = None) -> List[str]:
    """Signal propagation plot of several models on one figure.

    results: ``{label: measure_signal(...) records}``; predictions: optional
    ``{label: predicted variance per block}`` (dashed, on the variance panel).
    Three panels against block index; a panel uses a log y-scale when its
    values span more than 2 decades (non-positive values are then not drawn);
    stage boundaries are dotted vertical lines. Returns the PNG and SVG paths.
    """
    if not results:
        raise ValueError("results is empty: pass {label: measure_signal(model, x)}")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    boundaries = set()
    for stats in results.values():
        boundaries.update(_stage_starts(list(stats)))
    for ax, (field, label) in zip(axes, _PANELS):
        values = []
        for k, (name, stats) in enumerate(results.items()):
            xs = [r.index for r in stats]
            ys = [getattr(r, field) for r in stats]
            ys = [float("nan") if v is None else v for v in ys]
            values += ys
            c = colors[k % len(colors)]
            ax.plot(xs, ys, "-o", ms=3, lw=1.6, color=c, label=name)
            if field == "var" and predictions and predictions.get(name) is not None:
                pred = list(predictions[name])
                values += pred
                ax.plot(xs[:len(pred)], pred, "--", lw=1.2, color=c, alpha=0.8,
                        label=f"{name} (prediction)")
        if use_log_scale(values):
            ax.set_yscale("log")
        for b in sorted(boundaries):
            ax.axvline(b, color="0.5", ls=":", lw=1)
        ax.set_xlabel("residual block index l")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.25)
        if all(math.isnan(v) for v in values if v is not None):
            ax.text(0.5, 0.5, "not available", transform=ax.transAxes, ha="center", color="0.4")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.045 * math.ceil(len(labels) / 4)))
    fig.suptitle(title or "Signal propagation at initialization (dotted lines: stage boundaries)")
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------
# study figures
# --------------------------------------------------------------------------
def _colors():
    return plt.rcParams["axes.prop_cycle"].by_key()["color"] + ["#444444", "#8c564b", "#e377c2"]


def plot_depth(curves: Mapping[str, Sequence], path, chance: Optional[float] = None) -> List[str]:
    """Trainability against depth: ``curves[label] = [(depth, best run or None), ...]``.

    Left: final training loss, right: test accuracy, both at the best learning
    rate; a cell where every learning rate diverged is an 'x' at the top."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.6))
    colors, markers = _colors(), "osD^v<>ph*"
    for k, (label, pts) in enumerate(curves.items()):
        c, m = colors[k % len(colors)], markers[k % len(markers)]
        ok = [(d, r) for d, r in pts if r is not None]
        a1.plot([d for d, _ in ok], [r["final_train_loss"] for _, r in ok], "-", marker=m, color=c, label=label)
        a2.plot([d for d, _ in ok], [100 * (r["test_acc"] or 0) for _, r in ok], "-", marker=m, color=c, label=label)
        div = [d for d, r in pts if r is None]
        y = 0.97 - 0.035 * k  # stagger the markers so that coinciding ones stay visible
        a1.plot(div, [y] * len(div), "x", ms=9, mew=2, color=c, transform=a1.get_xaxis_transform())
        a2.plot(div, [1 - y] * len(div), "x", ms=9, mew=2, color=c, transform=a2.get_xaxis_transform())
    if chance:
        a1.axhline(chance, color="0.5", ls="--", lw=1)
        a1.text(0.01, chance, "chance loss", va="bottom", color="0.4", fontsize=8, transform=a1.get_yaxis_transform())
    for ax, yl in ((a1, "final training loss (best lr)"), (a2, "test accuracy % (best lr)")):
        ax.set_xscale("log")
        ax.set_xlabel("depth (layers, WRN 6n+4)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.25, which="both")
    a1.set_title("training loss (x at top: diverged)")
    a2.set_title("test accuracy (x at bottom: diverged)")
    a2.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Trainability against depth")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_lr_sweep(groups: Mapping[tuple, Sequence[dict]], labels: Sequence[str], batch_sizes: Sequence[int],
                  path) -> List[str]:
    """Test accuracy against learning rate, one panel per batch size:
    ``groups[(label, batch)] = [run record with 'lr', 'status', 'test_acc']``."""
    n = len(batch_sizes)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 1.5, 4.2), squeeze=False)
    colors = _colors()
    for ax, bs in zip(axes[0], batch_sizes):
        for k, label in enumerate(labels):
            runs = sorted(groups.get((label, bs), []), key=lambda r: r["lr"])
            ok = [r for r in runs if r["status"] == "ok" and r.get("test_acc") is not None]
            c = colors[k % len(colors)]
            ax.plot([r["lr"] for r in ok], [100 * r["test_acc"] for r in ok], "-o", color=c, label=label)
            div = [r["lr"] for r in runs if r["status"] != "ok"]
            ax.plot(div, [0.03 + 0.035 * k] * len(div), "x", ms=9, mew=2, color=c, transform=ax.get_xaxis_transform())
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"batch size {bs}")
        ax.grid(alpha=0.25, which="both")
    axes[0][-1].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Test accuracy against learning rate (x: diverged)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_tracking(runs: Mapping[str, dict], path) -> List[str]:
    """Residual/skip ratios (median over blocks) and SkipInit gains during training,
    from run records with ``tracking = [{"step", "ratio": [...], "gains": [...]}]``."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = _colors()
    any_gain = False
    for k, (label, rec) in enumerate(runs.items()):
        tr = rec.get("tracking") or []
        steps = [t["step"] for t in tr]
        med = [float(np.median([r for r in t["ratio"] if r is not None])) if any(r is not None for r in t["ratio"])
               else float("nan") for t in tr]
        a1.plot(steps, med, "-o", ms=3, color=colors[k], label=label)
        if any(t["gains"] for t in tr):
            any_gain = True
            a2.plot(steps, [float(np.mean(np.abs(t["gains"]))) for t in tr], "-o", ms=3, color=colors[k],
                    label=f"{label}: mean |alpha|")
            a2.plot(steps, [float(np.max(np.abs(t["gains"]))) for t in tr], "--", color=colors[k],
                    label=f"{label}: max |alpha|")
    a1.set_yscale("symlog", linthresh=1e-3)
    a1.set_xlabel("training step")
    a1.set_ylabel("median residual / skip ratio")
    a1.set_title("residual-to-skip ratio over blocks")
    a1.grid(alpha=0.25)
    a1.legend()
    a2.set_xlabel("training step")
    a2.set_ylabel("|alpha|")
    a2.set_title("SkipInit gains")
    a2.grid(alpha=0.25)
    if any_gain:
        a2.legend()
    fig.suptitle("During training")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_lesion(runs: Mapping[str, dict], path) -> List[str]:
    """Lesion test: test accuracy after deleting each block (``rec["lesion"]``)."""
    fig, ax = plt.subplots(figsize=(9, 4.2))
    colors = _colors()
    for k, (label, rec) in enumerate(runs.items()):
        les = rec.get("lesion")
        if not les:
            continue
        c = colors[k]
        ax.plot([b["block"] for b in les["blocks"]], [100 * b["acc"] for b in les["blocks"]], "o-", ms=3,
                color=c, label=f"{label}: one block deleted")
        ax.axhline(100 * les["base_acc"], color=c, ls="--", lw=1, label=f"{label}: intact")
    ax.set_xlabel("deleted residual block")
    ax.set_ylabel("test accuracy %")
    ax.set_title("Lesion test (Veit et al. 2016)")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_paths(results: Mapping[str, Sequence], path, title: Optional[str] = None) -> List[str]:
    """Effective depth at initialization, for several models.

    Left: the residual-to-skip ratio r_l = sqrt(s^2 Var f / Var skip) per block
    (De & Smith 2020), with 1/sqrt(l) for reference. Right: the variance-weighted
    path-length distribution, Poisson-binomial with p_l = r_l^2 / (1 + r_l^2)
    (see :func:`normfree.signal.effective_depth`), and Veit et al.'s
    Binomial(n, 1/2) for the same number of blocks. Returns the PNG and SVG paths.
    """
    from .signal import effective_depth, path_length_distribution

    if not results:
        raise ValueError("results is empty: pass {label: measure_signal(model, x)}")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n_max, ratios = 0, []
    for k, (name, stats) in enumerate(results.items()):
        c = colors[k % len(colors)]
        pts = [(r.index, r.ratio) for r in stats if r.ratio is not None]
        eff = effective_depth(stats)
        if pts:
            ax1.plot(*zip(*pts), "-o", ms=3, color=c, label=name)
            ratios += [v for _, v in pts]
        dist = eff["distribution"]
        ax2.plot(range(len(dist)), dist, "-", color=c, label=f"{name} (mean {eff['mean']:.1f} of {eff['blocks']})")
        n_max = max(n_max, len(stats))
    ls = list(range(1, n_max + 1))
    ax1.plot(ls, [1 / math.sqrt(l) for l in ls], ":", color="0.3", label="1/sqrt(l)")
    if use_log_scale(ratios + [1 / math.sqrt(n_max)], decades=1):
        ax1.set_yscale("log")
    binom = path_length_distribution(n_max)
    ax2.plot(range(n_max + 1), binom, ":", color="0.3", label=f"Binomial({n_max}, 1/2) (Veit et al.)")
    ax1.set_xlabel("residual block index l")
    ax1.set_ylabel("residual / skip scale")
    ax1.set_title("residual-to-skip ratio (non-positive values not drawn on log scale)"
                  if ax1.get_yscale() == "log" else "residual-to-skip ratio")
    ax2.set_xlabel("path length (residual branches traversed)")
    ax2.set_ylabel("share of output variance")
    ax2.set_title("path-length distribution")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.25)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Effective depth at initialization")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_gradients(results: Mapping[str, Sequence], path, title: Optional[str] = None) -> List[str]:
    """Backward signal: the RMS of g_l = dL/d(output of block l) against l, for
    ``{label: measure_gradients(...)}``; log y-scale when it spans > 2 decades."""
    if not results:
        raise ValueError("results is empty: pass {label: measure_gradients(model, x, y)}")
    fig, ax = plt.subplots(figsize=(7, 4.4))
    values, boundaries = [], set()
    for name, grads in results.items():
        grads = list(grads)
        zero = all(g.rms == 0 for g in grads)  # e.g. a zero-initialized classifier
        ax.plot([g.index for g in grads], [g.rms for g in grads], "-o", ms=3,
                label=f"{name} (all zero)" if zero else name)
        values += [g.rms for g in grads]
        boundaries.update(_stage_starts(grads))
    log = use_log_scale(values)
    if log:
        ax.set_yscale("log")
    for b in sorted(boundaries):
        ax.axvline(b, color="0.5", ls=":", lw=1)
    ax.set_xlabel("residual block index l")
    ax.set_ylabel("RMS of dL / d(block output)" + (" (zeros not drawn)" if log and 0 in values else ""))
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8)
    ax.set_title(title or "Backward signal at initialization (dotted lines: stage boundaries)")
    fig.tight_layout()
    return save_figure(fig, path)
