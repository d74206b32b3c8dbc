"""The study: the experiments behind the papers' claims, run with one command,
written up as ``report.md`` and a self-contained ``report.html``.

Experiments (each a function from the study's sizes to runs, and from the
runs' results to a report section with figures, tables and claims):

1. ``spp``     signal propagation at initialization of every method at >= 100
               blocks, measured against the analytic prediction.
2. ``depth``   trainability against depth (WRN 6n+4) with a small lr grid.
3. ``batch``   batch size x learning rate: bn against skipinit and nf.
4. ``regularized``  regularized SkipInit against SkipInit and BN.
5. ``paths``   shallow paths: residual/skip ratios and SkipInit gains during
               training, and the lesion test (Veit et al. 2016) after it.
6. ``agc``     nf with and without adaptive gradient clipping at a large
               batch size and learning rate.

Every verdict in the claims table is computed from the runs by the rule
printed next to it; nothing is written in by hand. Each finished training
run is stored in ``OUT/runs/<key>.json`` (key = hash of its configuration),
so an interrupted study restarted with the same ``--out`` reuses finished runs.
Training runs are spread over ``jobs`` worker processes (one thread each).
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import html
import json
import math
import multiprocessing
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .atomic import write_text

EXPERIMENTS = ("spp", "depth", "batch", "regularized", "paths", "agc")


# --------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class StudySize:
    """Every size knob of the study (the presets are in ``PRESETS``)."""

    data: str = "digits"
    width: float = 1
    # 1. spp
    spp_depth: int = 304                    # 150 blocks
    spp_batch: int = 32
    spp_resolution: int = 64                # large enough that zero padding barely lowers variances
    # 2. depth
    depths: Tuple[int, ...] = (10, 34, 100)
    depth_lrs: Tuple[float, ...] = (0.05, 0.2)
    depth_steps: int = 80
    depth_batch: int = 32
    # 3. batch size x learning rate
    bs_depth: int = 10
    batch_sizes: Tuple[int, ...] = (16, 64, 256)
    bs_lrs: Tuple[float, ...] = (0.05, 0.2, 0.8, 3.2)
    bs_epochs: float = 8
    # 4. regularized SkipInit
    reg_depth: int = 16
    reg_epochs: float = 12
    reg_batch: int = 64
    reg_lr: float = 0.1
    reg_seeds: int = 2
    # 5. paths
    paths_depth: int = 64
    paths_steps: int = 240
    paths_batch: int = 32
    paths_lr: float = 0.05
    paths_track_every: int = 20
    # 6. agc
    agc_depth: int = 10
    agc_batch: int = 256
    agc_lrs: Tuple[float, ...] = (0.4, 1.6, 6.4)
    agc_epochs: float = 15
    agc_clipping: float = 0.04
    # subsets (None: the whole split)
    max_train_examples: Optional[int] = None
    max_test_examples: Optional[int] = None


PRESETS: Dict[str, StudySize] = {
    "quick": StudySize(
        spp_depth=34, spp_batch=16, spp_resolution=16, depths=(10, 22), depth_lrs=(0.1,), depth_steps=8,
        depth_batch=16, bs_depth=10, batch_sizes=(16, 64), bs_lrs=(0.1, 1.6), bs_epochs=0.5,
        reg_depth=10, reg_epochs=0.5, reg_seeds=1, paths_depth=16, paths_steps=10, paths_batch=16,
        paths_track_every=5, agc_depth=10, agc_batch=64, agc_lrs=(1.6,), agc_epochs=0.5,
        max_train_examples=256, max_test_examples=128),
    "default": StudySize(),
    "full": StudySize(
        data="cifar10", spp_depth=1000, spp_batch=256, depths=(10, 28, 100, 304, 1000),
        depth_lrs=(0.03, 0.1, 0.3, 1.0), depth_steps=5000, depth_batch=128, bs_depth=16,
        batch_sizes=(16, 64, 256, 1024, 4096), bs_lrs=(0.0125, 0.05, 0.2, 0.8, 3.2, 12.8), bs_epochs=30,
        reg_depth=28, reg_epochs=100, reg_batch=128, reg_seeds=3, paths_depth=1000, paths_steps=5000,
        paths_batch=128, paths_track_every=250, agc_depth=28, agc_batch=4096, agc_lrs=(0.8, 1.6, 3.2, 6.4),
        agc_epochs=60, agc_clipping=0.01),
}


def parse_size_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``["depths=10,34", "depth_steps=300"]`` -> ``{"depths": (10, 34), "depth_steps": 300}``,
    typed by the :class:`StudySize` field; a clear error for unknown keys or bad values."""
    fields = {f.name: f for f in dataclasses.fields(StudySize)}
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"bad size override {item!r}: use KEY=VALUE with KEY one of {sorted(fields)}")
        default = getattr(PRESETS["default"], key)
        try:
            if isinstance(default, tuple):
                kind = type(default[0]) if default else float
                out[key] = tuple(kind(v) for v in value.split(",") if v.strip())
            elif key == "data":
                out[key] = value
            elif value.lower() == "none":
                out[key] = None
            elif isinstance(default, int) or key.startswith("max_"):
                out[key] = int(value)
            else:
                out[key] = float(value)
        except ValueError:
            raise ValueError(f"bad value in size override {item!r} (expected "
                             f"{'comma-separated numbers' if isinstance(default, tuple) else 'a number'})") from None
    return out


# --------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One training run: ``cfg`` is the TrainConfig keywords; ``extra`` asks the
    worker for more (``track_every``: residual ratios and gains during training;
    ``lesion``: the lesion test after it)."""

    experiment: str
    label: str
    cfg: Dict[str, Any]
    extra: Dict[str, Any] = field(default_factory=dict)
    blocks: int = 1

    @property
    def key(self) -> str:
        blob = json.dumps({"cfg": self.cfg, "extra": self.extra}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @property
    def cost(self) -> float:
        """Estimated cost (image-blocks processed) for the progress display."""
        c = self.cfg
        images = c["steps"] * c["batch_size"] if c.get("steps") else c["epochs"] * 1000
        return float(images * (self.blocks + 2))


class RunStore:
    """Finished runs as ``<folder>/<key>.json``, written atomically."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.json")

    def get(self, key: str) -> Optional[dict]:
        try:
            with open(self.path(key)) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, key: str, record: dict) -> None:
        write_text(self.path(key), json.dumps(record, indent=1, default=_jsonable))


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return str(v)


@functools.lru_cache(maxsize=2)
def _dataset(name: str, data_dir: Optional[str]):
    from .data import load_dataset
    return load_dataset(name, data_dir)


def _lesion(model, ds, cfg) -> Dict[str, Any]:
    """Veit et al. 2016: delete one residual block at a time (the block becomes
    the identity, its skip path) and measure test accuracy; transition blocks,
    whose skip path is a projection, are left alone."""
    from .train import evaluate

    device = next(model.parameters()).device
    kw = dict(batch_size=512, device=device)
    x, y = ds.test_x, ds.test_y
    if cfg.get("max_test_examples"):
        g = torch.Generator().manual_seed(cfg.get("seed", 0))
        idx = torch.randperm(len(y), generator=g)[: cfg["max_test_examples"]]
        x, y = x[idx], y[idx]
    _, base = evaluate(model, x, y, ds.mean, ds.std, **kw)
    drops = []
    for i, block in enumerate(list(model.blocks)):
        if block.shortcut is not None:
            continue
        model.blocks[i] = torch.nn.Identity()
        try:
            _, acc = evaluate(model, x, y, ds.mean, ds.std, **kw)
        finally:
            model.blocks[i] = block
        drops.append({"block": i + 1, "acc": acc, "drop": base - acc})
    return {"base_acc": base, "blocks": drops}


def execute(spec: RunSpec, data_dir: Optional[str], threads: int = 1) -> Dict[str, Any]:
    """Run one :class:`RunSpec` (in a worker process) and return its JSON record."""
    if threads:
        torch.set_num_threads(threads)
    from .signal import measure_signal
    from .train import TrainConfig, train

    ds = _dataset(spec.cfg.get("data", "digits"), data_dir)
    cfg = TrainConfig(**{**spec.cfg, "data_dir": data_dir, "progress": False})
    tracking: List[Dict[str, Any]] = []
    probe = None
    every = spec.extra.get("track_every")
    if every:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(ds.train_y), generator=g)[:64]
        probe = ((ds.train_x[idx].float() / 255 - ds.mean.view(1, -1, 1, 1)) / ds.std.view(1, -1, 1, 1))

    def track(step, model):
        stats = measure_signal(model, probe.to(next(model.parameters()).device))
        gains = [b.gain.gain.item() for b in model.blocks if getattr(b, "gain", None) is not None]
        tracking.append({"step": step, "ratio": [s.ratio for s in stats],
                         "gains": gains})

    callback = None
    if every:
        def callback(step, model, record):
            if step % every == 0:
                track(step, model)
    result = train(cfg, callback=callback, dataset=ds)
    rec = result.summary()
    rec["history"] = [{k: h.get(k) for k in ("step", "loss", "acc") if k in h} for h in result.history]
    if every and result.status == "ok":
        track(result.steps, result.model)
    rec["tracking"] = tracking
    if spec.extra.get("lesion") and result.status == "ok":
        rec["lesion"] = _lesion(result.model, ds, spec.cfg)
    rec["label"], rec["experiment"] = spec.label, spec.experiment
    return rec


class Runner:
    """Runs specs (cached in a :class:`RunStore`) on a pool of worker processes,
    with a progress bar that names the experiment and estimates time left."""

    def __init__(self, store: RunStore, data_dir: Optional[str], jobs: int, threads: int, progress: bool):
        self.store, self.data_dir = store, data_dir
        self.jobs, self.threads, self.progress = jobs, threads, progress
        self.pool: Optional[cf.ProcessPoolExecutor] = None
        self.executed = 0
        self.reused = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def run(self, experiment: str, specs: Sequence[RunSpec], seconds_per_unit: List[float],
            remaining_units: float) -> Dict[str, dict]:
        from tqdm.auto import tqdm

        out: Dict[str, dict] = {}
        todo = []
        for s in specs:
            rec = self.store.get(s.key)
            if rec is not None:
                out[s.key] = rec
                self.reused += 1
            else:
                todo.append(s)
        if not todo:
            return out
        total = sum(s.cost for s in todo)
        bar = tqdm(total=len(todo), desc=f"{experiment:11s}", unit="run", disable=not self.progress,
                   dynamic_ncols=True, leave=True)
        start = time.perf_counter()
        done_units = 0.0

        def finish(spec, rec):
            nonlocal done_units
            self.store.put(spec.key, rec)
            out[spec.key] = rec
            self.executed += 1
            done_units += spec.cost
            rate = (time.perf_counter() - start) / max(done_units, 1e-9)
            left = rate * (total - done_units + remaining_units)
            bar.set_postfix_str(f"{spec.label[:38]} | study left ~{_fmt_time(left)}")
            bar.update(1)

        try:
            if self.jobs <= 1:
                for s in todo:
                    finish(s, execute(s, self.data_dir, self.threads))
            else:
                if self.pool is None:
                    self.pool = cf.ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
                futures = {self.pool.submit(execute, s, self.data_dir, self.threads): s
                           for s in sorted(todo, key=lambda s: -s.cost)}
                for fut in cf.as_completed(futures):
                    finish(futures[fut], fut.result())
        finally:
            bar.close()
        seconds_per_unit.append((time.perf_counter() - start) / max(total, 1e-9))
        return out


def _fmt_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------------
# report building blocks
# --------------------------------------------------------------------------
HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"


@dataclass
class Claim:
    claim: str
    source: str
    measured: str
    verdict: str
    rule: str


@dataclass
class Section:
    key: str
    title: str
    text: List[str] = field(default_factory=list)
    figures: List[Tuple[str, str]] = field(default_factory=list)          # (png path, caption)
    tables: List[Tuple[str, List[str], List[List[Any]]]] = field(default_factory=list)  # (caption, head, rows)
    claims: List[Claim] = field(default_factory=list)
    seconds: float = 0.0


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.3e}"
    return str(v)


def _md_table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(head, rows) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td class='{_verdict_class(c)}'>{html.escape(_cell(c))}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _verdict_class(c) -> str:
    return {HOLDS: "ok", FAILS: "bad", UNSURE: "unsure"}.get(c, "") if isinstance(c, str) else ""


# --------------------------------------------------------------------------
# helpers for the analyses
# --------------------------------------------------------------------------
TRAINS_BELOW = 0.75


def _chance_loss(num_classes: int) -> float:
    return math.log(num_classes)


def _trains(rec: Optional[dict], num_classes: int) -> bool:
    """A run 'trains' if it did not diverge and its final training loss is below
    TRAINS_BELOW x the chance-level loss ln(classes)."""
    return bool(rec) and rec["status"] == "ok" and rec["final_train_loss"] is not None \
        and rec["final_train_loss"] < TRAINS_BELOW * _chance_loss(num_classes)


def _best(recs: Sequence[dict], by: str = "final_train_loss") -> Optional[dict]:
    ok = [r for r in recs if r["status"] == "ok" and r.get(by) is not None and math.isfinite(r[by])]
    if not ok:
        return None
    return min(ok, key=lambda r: r[by]) if by == "final_train_loss" else max(ok, key=lambda r: r[by])


def _acc_tolerance(n_test: int) -> float:
    """Two standard errors of an accuracy near 90% on n_test images (at least 1 point)."""
    return max(0.01, 2 * math.sqrt(0.9 * 0.1 / max(n_test, 1)))


def _wrn_blocks(depth: int) -> int:
    return (depth - 4) // 2


def _train_cfg(size: StudySize, ds_name: str, seed: int, device: str, **kw) -> Dict[str, Any]:
    cfg = dict(data=ds_name, width=size.width, optimizer="sgd", momentum=0.9, nesterov=True,
               weight_decay=5e-4, schedule="cosine", seed=seed, device=device,
               max_train_examples=size.max_train_examples, max_test_examples=size.max_test_examples,
               log_every=10)
    cfg.update(kw)
    if str(cfg["model"]).startswith("fixup"):
        cfg["scalar_lr_mult"] = 0.1  # Fixup's official recipe: scalars at lr/10
    return cfg


def _stage_fit(stats, field_name="var"):
    """Per stage: (k, values) with k = 1-based position of the block in its stage."""
    stages: Dict[int, List[float]] = {}
    for s in stats:
        stages.setdefault(s.stage, []).append(getattr(s, field_name))
    return stages


def _worst(values: Sequence[float]) -> float:
    """The smallest finite value (nan if none)."""
    finite = [v for v in values if math.isfinite(v)]
    return min(finite) if finite else float("nan")


def _linear_r2(y: Sequence[float]) -> Tuple[float, float]:
    """(slope, R^2) of a least-squares line through y against 1..n."""
    y = np.asarray(y, dtype=np.float64)
    k = np.arange(1, len(y) + 1, dtype=np.float64)
    if len(y) < 3 or not np.all(np.isfinite(y)):
        return float("nan"), float("nan")
    b, a = np.polyfit(k, y, 1)
    ss_res = float(np.sum((y - (a + b * k)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2)) or 1e-30
    return float(b), 1.0 - ss_res / ss_tot


# --------------------------------------------------------------------------
# the experiments
# --------------------------------------------------------------------------
@dataclass
class Context:
    size: StudySize
    seed: int
    device: str
    out: str
    ds: Any

    @property
    def n_test(self) -> int:
        n = len(self.ds.test_y)
        return min(n, self.size.max_test_examples) if self.size.max_test_examples else n

    def fig(self, name: str) -> str:
        return os.path.join(self.out, "figures", name + ".png")

    def cfg(self, **kw) -> Dict[str, Any]:
        return _train_cfg(self.size, self.ds.name, self.seed, self.device, **kw)


SPP_MODELS = [("bn", {}), ("relubn", {}), ("none", {}), ("skipinit", {}), ("fixup", {}),
              ("nf_he", {}), ("nf", {}), ("rescale", {})]


def spp_section(ctx: Context) -> Section:
    """Experiment 1: signal propagation plots at initialization."""
    from .models import create_model
    from .plots import plot_spp
    from .signal import effective_depth, measure_signal, predict_variance, write_csv

    sz = ctx.size
    sec = Section("spp", "1. Signal propagation at initialization")
    shape = (sz.spp_batch, ctx.ds.in_chans, sz.spp_resolution, sz.spp_resolution)
    results, preds = {}, {}
    for method, opts in SPP_MODELS:
        torch.manual_seed(ctx.seed)
        model = create_model(f"{method}_wrn", depth=sz.spp_depth, width=sz.width, in_chans=ctx.ds.in_chans,
                             num_classes=ctx.ds.num_classes, **opts)
        stats = measure_signal(model, shape, seed=ctx.seed)
        results[method] = stats
        preds[method] = predict_variance(model, v0=stats.input_var)
    n = len(results["bn"])
    sec.text.append(f"N(0, 1) noise of shape {shape} through WRN-{sz.spp_depth}-{sz.width:g} ({n} residual "
                    "blocks) at initialization; BatchNorm uses batch statistics, as at the first training step. "
                    "Residual variance is measured on f(x) before any scalar gain. Dashed lines: the analytic "
                    "prediction (`normfree.signal.predict_variance`).")
    bounded = {m: st for m, st in results.items() if m != "none"}
    sec.figures.append((plot_spp(bounded, ctx.fig("spp"), predictions={m: preds[m] for m in bounded})[0],
                        "Signal propagation plot of every method but `none`: squared channel mean, channel variance "
                        "and residual-branch variance after each block (dashed: predicted variance)."))
    sec.figures.append((plot_spp({"none": results["none"], "bn": results["bn"]}, ctx.fig("spp_none"),
                                 predictions={"none": preds["none"], "bn": preds["bn"]},
                                 title="Without normalization the signal explodes (bn for scale)")[0],
                        "`none` (no normalization, He init) against `bn`: the variance grows geometrically "
                        "(dashed: the 2^l idealization, which ignores the part of the second moment that goes "
                        "into channel means)."))
    write_csv(results, os.path.join(ctx.out, "spp.csv"), predictions=preds)

    rows = []
    for m, st in results.items():
        idx = [0, len(st) // 2, len(st) - 1]
        ed = effective_depth(st)
        rows.append([m] + [f"{_cell(st[i].var)} / {_cell(preds[m][i])}" for i in idx]
                    + [max(s.mean_sq for s in st), ed["mean"] if ed["blocks"] else None])
    sec.tables.append(("Measured / predicted variance at the first, middle and last block; the largest squared "
                       "channel mean; mean effective path length (De & Smith's residual/skip ratios turned into a "
                       "path-length distribution, `normfree.signal.effective_depth`).",
                       ["method", "var block 1", f"var block {n // 2 + 1}", f"var block {n}", "max mean_sq",
                        f"mean path length (of {n})"], rows))

    # --- claims ---
    none = results["none"]
    s1 = [s.var for s in none if s.stage == 1 and math.isfinite(s.var) and s.var > 0]
    factor = float(np.exp(np.mean(np.diff(np.log(s1))))) if len(s1) > 2 else float("nan")
    v = HOLDS if 1.5 <= factor <= 2.5 else FAILS if not (1.25 <= factor <= 3.0) else UNSURE
    sec.claims.append(Claim(
        "Without normalization the variance roughly doubles with every residual block (~2^l).",
        "De & Smith 2020", f"none: mean growth factor per block in stage 1 = {factor:.3f}", v,
        "holds if the factor is in [1.5, 2.5]; does not hold outside [1.25, 3]; else inconclusive"))

    slopes, r2s = [], []
    for vals in _stage_fit(results["bn"]).values():
        b, r2 = _linear_r2(vals)
        slopes.append(b), r2s.append(r2)
    r2 = _worst(r2s)
    v = HOLDS if r2 >= 0.95 and min(slopes) > 0 else FAILS if (r2 < 0.8 or min(slopes) <= 0) else UNSURE
    rb = [_linear_r2(vals)[1] for vals in _stage_fit(results["relubn"]).values()]
    sec.claims.append(Claim(
        "With batch normalization the variance grows linearly with depth within a stage (Var(x_l) ~ l).",
        "De & Smith 2020", f"bn: slope per block {', '.join(f'{s:.2f}' for s in slopes)} (per stage), "
        f"worst R^2 of a linear fit {r2:.3f}; relubn worst R^2 {_worst(rb):.3f}", v,
        "holds if every stage's linear fit has slope > 0 and R^2 >= 0.95; does not hold if R^2 < 0.8 or a slope <= 0"))

    ks, rs = [], []
    for vals in _stage_fit(results["bn"], "ratio").values():
        for k, r in enumerate(vals, 1):
            if r is not None and r > 0 and k >= 2:
                ks.append(math.log(k)), rs.append(math.log(r))
    slope = float(np.polyfit(ks, rs, 1)[0]) if len(set(ks)) > 2 else float("nan")
    v = HOLDS if -0.7 <= slope <= -0.3 else FAILS if not (-0.85 <= slope <= -0.15) else UNSURE
    sec.claims.append(Claim(
        "Batch normalization downscales each residual branch relative to the skip path by ~1/sqrt(l).",
        "De & Smith 2020", f"bn: slope of log(residual/skip ratio) against log(position in stage) = {slope:.3f}", v,
        "holds if the slope is in [-0.7, -0.3]; does not hold outside [-0.85, -0.15]; else inconclusive"))

    ed_bn = effective_depth(results["bn"])
    n_bn = max(ed_bn["blocks"], 1)
    frac = ed_bn["mean"] / n_bn
    v = HOLDS if frac <= 0.25 else FAILS if frac > 0.4 else UNSURE
    sec.claims.append(Claim(
        "At initialization a BN ResNet behaves like a shallow network: short paths dominate.",
        "De & Smith 2020; Veit et al. 2016",
        f"bn: mean effective path length {ed_bn['mean']:.1f} of {ed_bn['blocks']} blocks ({100 * frac:.0f}%); "
        f"an unnormalized network's (residual/skip ratio 1) is n/2 = {n_bn / 2:g}", v,
        "holds if bn's mean path length is <= 25% of the blocks; does not hold above 40%; else inconclusive"))

    sk = results["skipinit"]
    dev = max(abs(x / vals[0] - 1) for vals in _stage_fit(sk).values() for x in vals)
    v = HOLDS if dev < 1e-5 else FAILS if dev > 1e-2 else UNSURE
    sec.claims.append(Claim(
        "SkipInit (alpha = 0): every block is the identity at initialization, so the variance is constant.",
        "De & Smith 2020", f"skipinit: largest relative change of the variance within a stage = {dev:.2e}", v,
        "holds if below 1e-5; does not hold above 1e-2"))

    nf = results["nf"]
    alpha = 0.2
    rel = []
    for vals in _stage_fit(nf).values():
        rel += [abs(x / (1 + k * alpha ** 2) - 1) for k, x in enumerate(vals, 1)]
    res_dev = max(abs(s.res_var - 1) for s in nf if s.res_var is not None)
    msq = max(s.mean_sq / s.var for s in nf)
    med = float(np.median(rel))
    ok = msq <= 0.05 and res_dev <= 0.25 and med <= 0.1
    bad = msq > 0.2 or res_dev > 0.5 or med > 0.25
    sec.claims.append(Claim(
        "NF-ResNet with Scaled WS: squared channel mean ~0, residual variance ~1 in every block, variance after "
        "the k-th block of a stage ~1 + k alpha^2.", "Brock et al. 2021 (NF-ResNets)",
        f"nf: max mean_sq / var {msq:.3g}; max |res_var - 1| {res_dev:.3f}; median |var / (1 + k alpha^2) - 1| "
        f"{med:.3f}",
        HOLDS if ok else FAILS if bad else UNSURE,
        "holds if max mean_sq / var <= 0.05, max |res_var - 1| <= 0.25 and median relative error <= 0.1; does not hold "
        "if any is beyond 0.2 / 0.5 / 0.25"))

    he_last, nf_last = results["nf_he"][-1].mean_sq, nf[-1].mean_sq
    v = HOLDS if he_last >= 10 * nf_last and he_last >= 0.1 else FAILS if he_last <= 2 * nf_last else UNSURE
    sec.claims.append(Claim(
        "With He init alone (no weight standardization) the squared channel mean drifts upward with depth; "
        "Scaled WS removes it.", "Brock et al. 2021 (NF-ResNets)",
        f"squared channel mean at the last block: nf_he {he_last:.3g}, nf {nf_last:.3g}", v,
        "holds if nf_he's is >= 10x nf's and >= 0.1; does not hold if <= 2x"))
    return sec


DEPTH_CONFIGS = [("bn", "bn_wrn", {}), ("relubn", "relubn_wrn", {}), ("none", "none_wrn", {}),
                 ("skipinit a=0", "skipinit_wrn", {"gain_init": 0.0}),
                 ("skipinit a=1/sqrt(d)", "skipinit_wrn", {"gain_init": "1/sqrt(d)"}),
                 ("skipinit a=1", "skipinit_wrn", {"gain_init": 1.0}),
                 ("fixup", "fixup_wrn", {}), ("nf_he", "nf_he_wrn", {}), ("nf", "nf_wrn", {}),
                 ("rescale", "rescale_wrn", {})]


def depth_plan(ctx: Context) -> List[RunSpec]:
    sz = ctx.size
    return [RunSpec("depth", f"{label} depth {d} lr {lr:g}",
                    ctx.cfg(model=model, depth=d, model_options=opts, steps=sz.depth_steps,
                            batch_size=sz.depth_batch, lr=lr, warmup_steps=max(1, sz.depth_steps // 20)),
                    blocks=_wrn_blocks(d))
            for label, model, opts in DEPTH_CONFIGS for d in sz.depths for lr in sz.depth_lrs]


def _grouped(specs, recs, key):
    out: Dict[Any, List[dict]] = {}
    for s in specs:
        out.setdefault(key(s), []).append({**recs[s.key], "lr": s.cfg["lr"]})
    return out


def depth_section(ctx: Context, specs, recs) -> Section:
    """Experiment 2: trainability against depth."""
    from .plots import plot_depth

    sz = ctx.size
    sec = Section("depth", "2. Trainability against depth")
    sec.text.append(f"WRN-d-{sz.width:g} for d in {list(sz.depths)} ({', '.join(str(_wrn_blocks(d)) for d in sz.depths)} "
                    f"blocks), {sz.depth_steps} SGD steps (Nesterov 0.9, cosine, 5% warmup) at batch {sz.depth_batch}, "
                    f"learning rates {list(sz.depth_lrs)}; the best learning rate (lowest final training loss) per "
                    "cell is shown. A run that reached a NaN/Inf loss is marked diverged.")
    cells = _grouped(specs, recs, lambda s: (s.label.split(" depth ")[0], s.cfg["depth"]))
    curves: Dict[str, List[Tuple[int, Optional[dict]]]] = {}
    rows = []
    for label, _, _ in DEPTH_CONFIGS:
        row = [label]
        for d in sz.depths:
            runs = cells[(label, d)]
            best = _best(runs)
            curves.setdefault(label, []).append((d, best))
            if best is None:
                row.append("diverged")
            else:
                row.append(f"{best['final_train_loss']:.3f} / {100 * best['test_acc']:.1f}% (lr {best['lr']:g})")
        rows.append(row)
    sec.tables.append(("Final training loss / test accuracy at the best learning rate", ["method"] +
                       [f"depth {d}" for d in sz.depths], rows))
    sec.figures.append((plot_depth(curves, ctx.fig("depth"), chance=_chance_loss(ctx.ds.num_classes))[0],
                        "Best final training loss and test accuracy against depth; x: every learning rate diverged."))

    deepest = max(sz.depths)
    nc = ctx.ds.num_classes
    tr = {label: _trains(_best(cells[(label, deepest)]), nc) for label, _, _ in DEPTH_CONFIGS}
    want = {"bn": True, "skipinit a=0": True, "none": False, "skipinit a=1": False}
    measured = ", ".join(f"{k}: {'trains' if tr[k] else 'fails'}" for k in want)
    if all(tr[k] == v for k, v in want.items()):
        verdict = HOLDS
    elif not tr["bn"] or not tr["skipinit a=0"] or (tr["none"] and tr["skipinit a=1"]):
        verdict = FAILS
    else:
        verdict = UNSURE
    sec.claims.append(Claim(
        f"Very deep residual networks (here {deepest} layers) train with SkipInit (alpha = 0) and with BN, but "
        "not without normalization, nor with SkipInit alpha = 1.", "De & Smith 2020",
        f"depth {deepest}: {measured}", verdict,
        f"a run trains if it did not diverge and its final training loss < {TRAINS_BELOW} ln({nc}) = "
        f"{TRAINS_BELOW * _chance_loss(nc):.2f} (best lr); holds if all four behave as claimed; does not hold if bn or "
        "SkipInit alpha=0 fails, or both none and alpha=1 train; else inconclusive"))
    others = [k for k in ("fixup", "nf", "rescale", "skipinit a=1/sqrt(d)") if k in tr]
    sec.text.append(f"At depth {deepest}: " + ", ".join(f"{k} {'trains' if tr[k] else 'fails'}" for k in others) + ".")
    return sec


BS_METHODS = [("bn", "bn_wrn", {}), ("skipinit", "skipinit_wrn", {}), ("nf", "nf_wrn", {})]


def batch_plan(ctx: Context) -> List[RunSpec]:
    sz = ctx.size
    return [RunSpec("batch", f"{label} bs {bs} lr {lr:g}",
                    ctx.cfg(model=model, depth=sz.bs_depth, model_options=opts, epochs=sz.bs_epochs,
                            batch_size=bs, lr=lr), blocks=_wrn_blocks(sz.bs_depth))
            for label, model, opts in BS_METHODS for bs in sz.batch_sizes for lr in sz.bs_lrs]


def _max_stable_lr(runs, nc) -> Optional[float]:
    ok = [r["lr"] for r in runs if _trains(r, nc)]
    return max(ok) if ok else None


def batch_section(ctx: Context, specs, recs) -> Section:
    """Experiment 3: batch size and learning rate."""
    from .plots import plot_lr_sweep

    sz = ctx.size
    nc = ctx.ds.num_classes
    sec = Section("batch", "3. Batch size and learning rate")
    sec.text.append(f"WRN-{sz.bs_depth}-{sz.width:g}, {sz.bs_epochs:g} epochs at each batch size {list(sz.batch_sizes)} "
                    f"and learning rate {list(sz.bs_lrs)} (SGD Nesterov, cosine). Best = highest test accuracy.")
    groups = _grouped(specs, recs, lambda s: (s.label.split(" bs ")[0], s.cfg["batch_size"]))
    rows, best = [], {}
    for label, _, _ in BS_METHODS:
        for bs in sz.batch_sizes:
            runs = groups[(label, bs)]
            b = _best(runs, by="test_acc")
            best[(label, bs)] = (b, _max_stable_lr(runs, nc))
            rows.append([label, bs, b["lr"] if b else None, 100 * b["test_acc"] if b else None,
                         _max_stable_lr(runs, nc),
                         sum(r["status"] == "diverged" for r in runs)])
    sec.tables.append(("Best learning rate and test accuracy per batch size", [
        "method", "batch", "best lr", "best test acc %", "largest lr that trains", "diverged runs"], rows))
    sec.figures.append((plot_lr_sweep(groups, [m for m, _, _ in BS_METHODS], list(sz.batch_sizes),
                                      ctx.fig("batch_lr"))[0],
                        "Test accuracy against learning rate, one panel per batch size (x: diverged)."))
    tol = _acc_tolerance(ctx.n_test)
    small, large = min(sz.batch_sizes), max(sz.batch_sizes)
    (bn_s, _), (sk_s, _) = best[("bn", small)], best[("skipinit", small)]
    if bn_s and sk_s:
        gap = abs(bn_s["test_acc"] - sk_s["test_acc"])
        lr_ratio = max(bn_s["lr"], sk_s["lr"]) / min(bn_s["lr"], sk_s["lr"])
        step = sz.bs_lrs[1] / sz.bs_lrs[0] if len(sz.bs_lrs) > 1 else 1.0
        v = HOLDS if gap <= tol and lr_ratio <= step * 1.001 else FAILS if gap > 2 * tol else UNSURE
        m = (f"batch {small}: bn {100 * bn_s['test_acc']:.1f}% at lr {bn_s['lr']:g}, skipinit "
             f"{100 * sk_s['test_acc']:.1f}% at lr {sk_s['lr']:g}")
    else:
        v, m = FAILS, f"batch {small}: no learning rate trained bn or skipinit"
    sec.claims.append(Claim(
        "At small batch sizes SkipInit matches BN, with a similar optimal learning rate.", "De & Smith 2020", m, v,
        f"holds if the accuracy gap <= {100 * tol:.1f} points (2 standard errors on {ctx.n_test} test images) and "
        f"the best learning rates are at most one grid step apart; does not hold if the gap > {200 * tol:.1f} points"))
    (bn_l, bn_lr), (sk_l, sk_lr) = best[("bn", large)], best[("skipinit", large)]
    bn_acc = bn_l["test_acc"] if bn_l else 0.0
    sk_acc = sk_l["test_acc"] if sk_l else 0.0
    larger_lr = (bn_lr or 0) >= (sk_lr or 0)
    v = HOLDS if bn_acc - sk_acc > tol and larger_lr else FAILS if (sk_acc - bn_acc > tol or not larger_lr) else UNSURE
    sec.claims.append(Claim(
        "At large batch sizes BN trains at larger learning rates than SkipInit and reaches a higher accuracy.",
        "De & Smith 2020",
        f"batch {large}: bn {100 * bn_acc:.1f}% (largest lr that trains {bn_lr}), skipinit {100 * sk_acc:.1f}% "
        f"(largest {sk_lr})", v,
        f"holds if bn's accuracy exceeds skipinit's by > {100 * tol:.1f} points and bn's largest trainable lr >= "
        "skipinit's; does not hold if skipinit is better by that margin or BN's largest trainable lr is smaller"))
    return sec


REG_METHODS = [("bn", "bn_wrn", {}), ("skipinit", "skipinit_wrn", {}),
               ("skipinit regularized", "skipinit_wrn", {"regularized": True})]


def regularized_plan(ctx: Context) -> List[RunSpec]:
    sz = ctx.size
    return [RunSpec("regularized", f"{label} seed {ctx.seed + k}",
                    {**ctx.cfg(model=model, depth=sz.reg_depth, model_options=opts, epochs=sz.reg_epochs,
                               batch_size=sz.reg_batch, lr=sz.reg_lr), "seed": ctx.seed + k},
                    blocks=_wrn_blocks(sz.reg_depth))
            for label, model, opts in REG_METHODS for k in range(sz.reg_seeds)]


def regularized_section(ctx: Context, specs, recs) -> Section:
    """Experiment 4: regularized SkipInit."""
    sz = ctx.size
    sec = Section("regularized", "4. Regularized SkipInit")
    sec.text.append(f"WRN-{sz.reg_depth}-{sz.width:g}, {sz.reg_epochs:g} epochs, batch {sz.reg_batch}, lr {sz.reg_lr}, "
                    f"{sz.reg_seeds} seed(s). Regularized SkipInit = biases after the convolutions + dropout 0.2 "
                    "before the classifier.")
    groups = _grouped(specs, recs, lambda s: s.label.split(" seed ")[0])
    mean = {}
    rows = []
    for label, _, _ in REG_METHODS:
        accs = [r["test_acc"] for r in groups[label] if r["status"] == "ok"]
        losses = [r["final_train_loss"] for r in groups[label] if r["status"] == "ok"]
        mean[label] = float(np.mean(accs)) if accs else 0.0
        rows.append([label, 100 * mean[label], ", ".join(f"{100 * a:.1f}" for a in accs),
                     float(np.mean(losses)) if losses else None])
    sec.tables.append(("Test accuracy (mean over seeds, and each seed) and final training loss",
                       ["method", "mean test acc %", "per seed", "final train loss"], rows))
    tol = _acc_tolerance(ctx.n_test) / math.sqrt(max(sz.reg_seeds, 1))
    reg, plain, bn = mean["skipinit regularized"], mean["skipinit"], mean["bn"]
    v = HOLDS if reg > plain and reg >= bn - tol else FAILS if reg < plain - tol else UNSURE
    sec.claims.append(Claim(
        "Regularized SkipInit (biases + dropout) improves on plain SkipInit and comes close to, or beats, BN.",
        "De & Smith 2020",
        f"test acc: regularized {100 * reg:.1f}%, plain {100 * plain:.1f}%, bn {100 * bn:.1f}%", v,
        f"holds if regularized > plain and regularized >= bn - {100 * tol:.1f} points; does not hold if "
        f"regularized < plain - {100 * tol:.1f} points; else inconclusive"))
    return sec


PATH_METHODS = [("bn", "bn_wrn"), ("skipinit", "skipinit_wrn")]


def paths_plan(ctx: Context) -> List[RunSpec]:
    sz = ctx.size
    return [RunSpec("paths", f"{label} depth {sz.paths_depth}",
                    ctx.cfg(model=model, depth=sz.paths_depth, steps=sz.paths_steps, batch_size=sz.paths_batch,
                            lr=sz.paths_lr, warmup_steps=max(1, sz.paths_steps // 10)),
                    extra={"track_every": sz.paths_track_every, "lesion": True},
                    blocks=_wrn_blocks(sz.paths_depth) * 2)
            for label, model in PATH_METHODS]


def paths_section(ctx: Context, specs, recs) -> Section:
    """Experiment 5: shallow paths during and after training."""
    from .plots import plot_lesion, plot_tracking

    sz = ctx.size
    sec = Section("paths", "5. Shallow paths: residual/skip ratios during training, and the lesion test")
    sec.text.append(f"WRN-{sz.paths_depth}-{sz.width:g} trained {sz.paths_steps} steps (batch {sz.paths_batch}, lr "
                    f"{sz.paths_lr}); every {sz.paths_track_every} steps the residual-to-skip ratio of every block is "
                    "measured on a fixed batch of training images, and SkipInit's gains are recorded. After training, "
                    "each non-transition block is deleted in turn (its output becomes its input) and the test "
                    "accuracy measured (Veit et al. 2016).")
    by = {s.label.split(" depth ")[0]: recs[s.key] for s in specs}
    sec.figures.append((plot_tracking(by, ctx.fig("paths_tracking"))[0],
                        "Median residual/skip ratio over blocks during training, and SkipInit's gains "
                        "(mean |alpha| and max |alpha|)."))
    sec.figures.append((plot_lesion(by, ctx.fig("lesion"))[0],
                        "Test accuracy after deleting one block, against the block deleted (line: intact network)."))
    rows, drops = [], {}
    for label, rec in by.items():
        les = rec.get("lesion")
        if not les:
            rows.append([label, rec["status"], None, None, None, None])
            continue
        d = [b["drop"] for b in les["blocks"]]
        drops[label] = d
        track = rec.get("tracking") or [{}]
        last = [r for r in track[-1].get("ratio", []) if r is not None]
        rows.append([label, rec["status"], 100 * les["base_acc"], 100 * float(np.mean(d)), 100 * float(np.max(d)),
                     float(np.median(last)) if last else None])
    sec.tables.append(("Lesion test and the final residual/skip ratio",
                       ["method", "status", "intact test acc %", "mean drop (points)", "worst drop (points)",
                        "median ratio after training"], rows))
    for label in ("bn", "skipinit"):
        if label not in drops:
            sec.claims.append(Claim(
                f"Deleting a single residual block of a trained deep {label} ResNet barely hurts it.",
                "Veit et al. 2016", f"{label}: the run diverged, nothing to lesion", UNSURE,
                "inconclusive unless the network trained"))
            continue
        md = float(np.mean(drops[label]))
        trained = _trains(by[label], ctx.ds.num_classes)
        v = UNSURE if not trained else HOLDS if md <= 0.05 else FAILS if md > 0.15 else UNSURE
        sec.claims.append(Claim(
            f"Deleting a single residual block of a trained deep {label} ResNet barely hurts it "
            "(short paths dominate).", "Veit et al. 2016; De & Smith 2020",
            f"{label}: mean accuracy drop {100 * md:.2f} points over {len(drops[label])} blocks "
            f"(worst {100 * max(drops[label]):.1f}); intact network {'trained' if trained else 'did NOT train'} "
            f"(final loss {by[label]['final_train_loss']:.3f}, test acc {100 * by[label]['lesion']['base_acc']:.1f}%)",
            v,
            f"inconclusive unless the network trained (final loss < {TRAINS_BELOW} ln(classes)); then holds if the "
            "mean drop <= 5 points, does not hold above 15 points, else inconclusive"))
    return sec


def agc_plan(ctx: Context) -> List[RunSpec]:
    sz = ctx.size
    return [RunSpec("agc", f"nf {'AGC' if agc else 'no AGC'} lr {lr:g}",
                    ctx.cfg(model="nf_wrn", depth=sz.agc_depth, epochs=sz.agc_epochs, batch_size=sz.agc_batch,
                            lr=lr, agc=sz.agc_clipping if agc else None), blocks=_wrn_blocks(sz.agc_depth))
            for agc in (False, True) for lr in sz.agc_lrs]


def agc_section(ctx: Context, specs, recs) -> Section:
    """Experiment 6: adaptive gradient clipping at a large batch size."""
    from .plots import plot_lr_sweep

    sz = ctx.size
    nc = ctx.ds.num_classes
    sec = Section("agc", "6. Adaptive gradient clipping")
    sec.text.append(f"nf WRN-{sz.agc_depth}-{sz.width:g} at batch {sz.agc_batch}, {sz.agc_epochs:g} epochs, learning "
                    f"rates {list(sz.agc_lrs)}, without and with AGC (lambda = {sz.agc_clipping}, classifier not "
                    "clipped).")
    groups = _grouped(specs, recs, lambda s: (s.label.split(" lr ")[0], sz.agc_batch))
    rows = []
    for s in specs:
        r = recs[s.key]
        rows.append([s.label, r["status"], r["final_train_loss"], 100 * r["test_acc"] if r["test_acc"] else None])
    sec.tables.append(("Runs", ["run", "status", "final train loss", "test acc %"], rows))
    sec.figures.append((plot_lr_sweep(groups, ["nf no AGC", "nf AGC"], [sz.agc_batch], ctx.fig("agc"))[0],
                        "Test accuracy against learning rate with and without AGC (x: diverged)."))
    no, yes = groups[("nf no AGC", sz.agc_batch)], groups[("nf AGC", sz.agc_batch)]
    lr_no, lr_yes = _max_stable_lr(no, nc), _max_stable_lr(yes, nc)
    b_no, b_yes = _best(no, "test_acc"), _best(yes, "test_acc")
    a_no = b_no["test_acc"] if b_no else 0.0
    a_yes = b_yes["test_acc"] if b_yes else 0.0
    tol = _acc_tolerance(ctx.n_test)
    wider = (lr_yes or 0) > (lr_no or 0)
    if wider or a_yes - a_no > tol:
        v = HOLDS
    elif (lr_yes or 0) < (lr_no or 0) or a_no - a_yes > tol:
        v = FAILS
    else:
        v = UNSURE
    sec.claims.append(Claim(
        "Adaptive gradient clipping lets NF-ResNets train at large batch sizes and learning rates.",
        "Brock et al. 2021 (NFNets)",
        f"largest lr that trains: {lr_no} without, {lr_yes} with AGC; best test acc {100 * a_no:.1f}% vs "
        f"{100 * a_yes:.1f}%", v,
        f"holds if AGC trains at a larger learning rate or beats no-AGC by > {100 * tol:.1f} points; does not "
        "hold if it trains only at smaller rates or loses by that margin; else inconclusive"))
    return sec


PLANS: Dict[str, Callable] = {"depth": depth_plan, "batch": batch_plan, "regularized": regularized_plan,
                              "paths": paths_plan, "agc": agc_plan}
SECTIONS: Dict[str, Callable] = {"depth": depth_section, "batch": batch_section,
                                 "regularized": regularized_section, "paths": paths_section, "agc": agc_section}


# --------------------------------------------------------------------------
# the whole study
# --------------------------------------------------------------------------
def plan(size: StudySize, ctx: Context, experiments: Sequence[str]) -> Dict[str, List[RunSpec]]:
    """The training runs of each selected experiment."""
    return {e: PLANS[e](ctx) for e in experiments if e in PLANS}


def _machine(jobs: int, threads: int, device: str) -> List[List[str]]:
    return [["platform", platform.platform()], ["processor", platform.processor() or platform.machine()],
            ["cpu cores", str(os.cpu_count())], ["python", platform.python_version()],
            ["torch", torch.__version__], ["device", device],
            ["worker processes x threads", f"{jobs} x {threads}"]]


def run_study(preset: str = "default", out: str = "runs/study", *, data: Optional[str] = None,
              data_dir: Optional[str] = None, experiments: Sequence[str] = EXPERIMENTS, seed: int = 0,
              jobs: Optional[int] = None, threads: int = 1, device: str = "cpu", progress: bool = True,
              plan_only: bool = False, log: Callable[[str], None] = print, **overrides) -> Dict[str, Any]:
    """Run the study and write ``report.md`` / ``report.html`` into ``out``.

    Args:
        preset: "quick" (tests, under a minute), "default" (3-6 min on 2 idle CPU cores, built-in digits data)
            or "full" (the papers' scale: CIFAR-10, WRN up to depth 1000; meant for a GPU).
        data, data_dir: the data set (default: the preset's) and where its files are.
        experiments: any of ``EXPERIMENTS``.
        jobs: worker processes for training runs (default: CPU cores, at most 4; 1 on a GPU).
        threads: torch threads per worker.
        plan_only: only print the runs and their estimated share of the work.
        **overrides: fields of :class:`StudySize` (e.g. ``depths=(10, 16)``).

    Returns a dict with the claims, the report paths and run counts. The caller's
    torch thread count is restored on return.
    """
    previous_threads = torch.get_num_threads()
    try:
        return _run_study(preset, out, data=data, data_dir=data_dir, experiments=experiments, seed=seed,
                          jobs=jobs, threads=threads, device=device, progress=progress, plan_only=plan_only,
                          log=log, **overrides)
    finally:
        torch.set_num_threads(previous_threads)


def _run_study(preset: str = "default", out: str = "runs/study", *, data: Optional[str] = None,
              data_dir: Optional[str] = None, experiments: Sequence[str] = EXPERIMENTS, seed: int = 0,
              jobs: Optional[int] = None, threads: int = 1, device: str = "cpu", progress: bool = True,
              plan_only: bool = False, log: Callable[[str], None] = print, **overrides) -> Dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {sorted(PRESETS)}")
    bad = [e for e in experiments if e not in EXPERIMENTS]
    if bad:
        raise ValueError(f"unknown experiment(s) {bad}; allowed: {list(EXPERIMENTS)}")
    size = dataclasses.replace(PRESETS[preset], **({"data": data} if data else {}), **overrides)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if jobs is None:
        jobs = 1 if device != "cpu" else max(1, min(os.cpu_count() or 1, 4))
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    os.makedirs(out, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    ds = _dataset(size.data, data_dir)
    ctx = Context(size, seed, device, out, ds)
    plans = plan(size, ctx, experiments)
    total = sum(s.cost for specs in plans.values() for s in specs)
    if plan_only:
        for e, specs in plans.items():
            units = sum(s.cost for s in specs)
            log(f"{e:12s} {len(specs):4d} runs  {100 * units / max(total, 1):5.1f}% of the training work")
            for s in specs:
                log(f"    {s.key}  {s.label}")
        return {"plans": {e: [s.label for s in specs] for e, specs in plans.items()}, "data": ds.name}

    start = time.perf_counter()
    sections: List[Section] = []
    spu: List[float] = []
    store = RunStore(os.path.join(out, "runs"))
    with Runner(store, data_dir, jobs, threads, progress) as runner:
        remaining = total
        for e in experiments:
            t0 = time.perf_counter()
            if e == "spp":
                log("[study] 1/6 signal propagation at initialization")
                sec = spp_section(ctx)
            else:
                specs = plans[e]
                remaining -= sum(s.cost for s in specs)
                log(f"[study] {EXPERIMENTS.index(e) + 1}/6 {e}: {len(specs)} training runs")
                recs = runner.run(e, specs, spu, remaining)
                sec = SECTIONS[e](ctx, specs, recs)
            sec.seconds = time.perf_counter() - t0
            sections.append(sec)
    wall = time.perf_counter() - start
    meta = {"preset": preset, "data": f"{ds.name} ({len(ds.train_y)} train / {len(ds.test_y)} test images, "
                                      f"{ds.in_chans}x{ds.image_size[0]}x{ds.image_size[1]}, {ds.num_classes} classes)",
            "seed": seed, "wall": wall, "executed": runner.executed, "reused": runner.reused,
            "machine": _machine(jobs, threads, device), "size": dataclasses.asdict(size)}
    paths = write_report(out, sections, meta)
    claims = [dataclasses.asdict(c) for s in sections for c in s.claims]
    with open(os.path.join(out, "claims.json"), "w") as f:
        json.dump(claims, f, indent=1)
    log(f"[study] {runner.executed} runs executed, {runner.reused} reused, {_fmt_time(wall)}; report: {paths[1]}")
    return {"claims": claims, "report_md": paths[0], "report_html": paths[1], "executed": runner.executed,
            "reused": runner.reused, "wall": wall}


# --------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------
CLAIM_HEAD = ["claim", "source", "measured", "verdict", "rule"]

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .5em;
vertical-align:top}th{background:#f3f3f3}td.ok{background:#dff5df}td.bad{background:#fadada}
td.unsure{background:#fff3cd}img{max-width:100%}figcaption{font-size:.9em;color:#555}code{background:#f3f3f3}"""


def write_report(out: str, sections: Sequence[Section], meta: Dict[str, Any]) -> Tuple[str, str]:
    """Write ``report.md`` (figures linked) and ``report.html`` (figures embedded)."""
    claims = [c for s in sections for c in s.claims]
    counts = {v: sum(c.verdict == v for c in claims) for v in (HOLDS, FAILS, UNSURE)}
    claim_rows = [[c.claim, c.source, c.measured, c.verdict, c.rule] for c in claims]
    size_rows = [[k, str(v)] for k, v in meta["size"].items()]
    intro = (f"Preset `{meta['preset']}`, data {meta['data']}, seed {meta['seed']}. Wall time "
             f"{_fmt_time(meta['wall'])}; {meta['executed']} training runs executed, {meta['reused']} reused from "
             f"an earlier invocation. Claims: {counts[HOLDS]} hold, {counts[FAILS]} do not hold, {counts[UNSURE]} "
             "inconclusive. Every verdict is computed from this run's measurements by the rule in its row.")

    md = ["# normfree study report", "", intro, "", "## Claims", "", _md_table(CLAIM_HEAD, claim_rows), "",
          "## Configuration and machine", "", _md_table(["", ""], meta["machine"]), "",
          _md_table(["size", "value"], size_rows), ""]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>normfree study report</title>"
         f"<style>{_CSS}</style></head><body><h1>normfree study report</h1><p>{html.escape(intro)}</p>",
         "<h2>Claims</h2>", _html_table(CLAIM_HEAD, claim_rows),
         "<h2>Configuration and machine</h2>", _html_table(["", ""], meta["machine"]),
         _html_table(["size", "value"], size_rows)]
    for s in sections:
        md += [f"## {s.title}", "", f"_{_fmt_time(s.seconds)}_", ""]
        h += [f"<h2>{html.escape(s.title)}</h2><p><em>{_fmt_time(s.seconds)}</em></p>"]
        for t in s.text:
            md += [t, ""]
            h.append(f"<p>{html.escape(t)}</p>")
        for png, caption in s.figures:
            rel = os.path.relpath(png, out)
            md += [f"![{caption}]({rel})", "", f"*{caption}* ([svg]({os.path.splitext(rel)[0]}.svg))", ""]
            with open(png, "rb") as f:
                b64 = base64.b64encode(f.read()).decode()
            h.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        for caption, head, rows in s.tables:
            md += [f"**{caption}**", "", _md_table(head, rows), ""]
            h += [f"<p><strong>{html.escape(caption)}</strong></p>", _html_table(head, rows)]
        if s.claims:
            rows = [[c.claim, c.source, c.measured, c.verdict, c.rule] for c in s.claims]
            md += ["**Claims**", "", _md_table(CLAIM_HEAD, rows), ""]
            h += ["<p><strong>Claims</strong></p>", _html_table(CLAIM_HEAD, rows)]
    h.append("</body></html>")
    md_path, html_path = os.path.join(out, "report.md"), os.path.join(out, "report.html")
    for path, text in ((md_path, "\n".join(md)), (html_path, "\n".join(h))):
        write_text(path, text)
    return md_path, html_path
