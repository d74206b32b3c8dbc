"""Figures (matplotlib, Agg backend: no display needed). Every figure is saved
as PNG and SVG with :func:`save_figure`.

* :func:`plot_spp` -- signal propagation plots (Brock et al. 2021, fig. 1 style):
  squared channel mean, channel variance and residual-branch variance against
  the residual block index, for several models on one figure.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["save_figure", "use_log_scale", "plot_spp"]


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
