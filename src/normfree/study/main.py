"""``run_study``: check everything, plan, run, judge, write the report."""
from __future__ import annotations

import contextlib
import errno
import os
import platform
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .experiment import Context, DataInfo, Section
from .experiments import discover
from .report import claim_dict, write_report
from .runner import UNITS_PER_SECOND, RunSpec, Runner, fmt_time
from .sizes import PRESET_NAMES, PRESET_TEXT, StudySize, all_knobs, make_size
from .store import RunStore

EXPERIMENT_LIST = discover()
EXPERIMENTS = tuple(e.name for e in EXPERIMENT_LIST)
KNOBS = all_knobs(EXPERIMENT_LIST)
MAX_SEED = 2 ** 31 - 1000

QUICK_WARNING = ("This is a --quick smoke test: its sizes are tiny, chosen only to run every step of the pipeline "
                 "in seconds, and its verdicts carry no evidence either way.")


def resolve_preset(preset: str, data: Optional[str]) -> str:
    """``default`` on CIFAR-10 means the ``cifar10`` preset."""
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; allowed: {list(PRESET_NAMES)}")
    if preset == "default" and data == "cifar10":
        return "cifar10"
    return preset


def study_size(preset: str = "default", data: Optional[str] = None, **overrides) -> StudySize:
    """The validated sizes of a study (``overrides``: knob values, e.g. ``depths=(10, 16)``)."""
    preset = resolve_preset(preset, data)
    if data is not None:
        if "data" in overrides and overrides["data"] != data:
            raise ValueError(f"data given twice: data={data!r} and data={overrides['data']!r}")
        overrides["data"] = data
    return make_size(preset, KNOBS, overrides)


def _check_int(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")


def _preflight(plans: Dict[str, List[RunSpec]], ctx: Context) -> None:
    """Check every run's configuration before the first expensive step."""
    from ..models import parse_model_name
    from ..schemes import make_scheme
    from ..train import TrainConfig

    for name, specs in plans.items():
        for s in specs:
            if s.task == "train":
                cfg = TrainConfig(**{k: v for k, v in s.cfg.items() if not k.startswith("_")})
                if cfg.batch_size > ctx.n_train:
                    raise ValueError(f"{name}: batch size {cfg.batch_size} is larger than the {ctx.n_train} training "
                                     f"images (run {s.label!r}); lower it with --set or raise max_train_examples")
            else:
                method, _, _ = parse_model_name(s.cfg["model"])
                make_scheme(method, **s.cfg.get("options", {}))


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (kill, SLURM, containers) stops the study like Ctrl-C: workers are stopped, finished runs
    kept, and :class:`normfree.train.Interrupted` (a KeyboardInterrupt) raised (``normfree study`` exits 143)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from ..train import Interrupted

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _machine(jobs: int, threads: int, device: str) -> List[List[str]]:
    return [["platform", platform.platform()], ["processor", platform.processor() or platform.machine()],
            ["cpu cores", str(os.cpu_count())], ["python", platform.python_version()],
            ["torch", torch.__version__], ["device", device],
            ["worker processes x threads", f"{jobs} x {threads}"]]


def run_study(preset: str = "default", out: str = "runs/study", *, data: Optional[str] = None,
              data_dir: Optional[str] = None, download: bool = False, experiments: Sequence[str] = EXPERIMENTS,
              seed: int = 0, jobs: Optional[int] = None, threads: int = 1, device: str = "cpu",
              progress: bool = True, plan_only: bool = False, log: Callable[[str], None] = print,
              **overrides) -> Dict[str, Any]:
    """Run the study and write ``report.md``, ``report.html`` and ``claims.json`` into ``out``.

    Args:
        preset: "quick" (a smoke test), "default" (built-in digits, <= 20 min on 2 CPU cores), "cifar10"
            (about 1h30m on 2 CPU cores: 1h32m measured from a fresh clone, ``--plan`` estimates 1h27m;
            also chosen by ``data="cifar10"``) or "full" (the papers' scale,
            for a GPU). See ``normfree.study.PRESET_TEXT``.
        data, data_dir, download: the data set (default: the preset's), where its files are, and whether
            to fetch them if missing (before anything runs).
        experiments: any of ``EXPERIMENTS``.
        seed: the first seed; an experiment with n seeds uses seed .. seed + n - 1.
        jobs: worker processes (default: CPU cores, at most 4; 1 on a GPU). threads: torch threads each.
        plan_only: list the runs and their share of the work without loading the data or running anything.
        **overrides: size knobs (``normfree study --sizes`` lists them), e.g. ``depths=(10, 16)``.

    Every argument and size is validated before anything expensive starts. Returns a dict with the
    claims, the report paths, run counts and times. The caller's torch thread count is restored.
    """
    previous_threads = torch.get_num_threads()
    try:
        return _run_study(preset, out, data=data, data_dir=data_dir, download=download, experiments=experiments,
                          seed=seed, jobs=jobs, threads=threads, device=device, progress=progress,
                          plan_only=plan_only, log=log, **overrides)
    finally:
        torch.set_num_threads(previous_threads)


def _run_study(preset, out, *, data, data_dir, download, experiments, seed, jobs, threads, device, progress,
               plan_only, log, **overrides) -> Dict[str, Any]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    # ---- everything checked before anything expensive ----
    experiments = list(experiments)
    bad = [e for e in experiments if e not in EXPERIMENTS]
    if bad or not experiments:
        raise ValueError(f"unknown experiment(s) {bad}; allowed: {list(EXPERIMENTS)}" if bad else
                         f"no experiment selected; allowed: {list(EXPERIMENTS)}")
    if len(set(experiments)) != len(experiments):
        raise ValueError(f"an experiment is listed twice: {experiments}")
    if data is None:
        data = overrides.pop("data", None)
    preset = resolve_preset(preset, data)
    size = study_size(preset, data, **overrides)
    _check_int("seed", seed, 0, MAX_SEED)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if jobs is None:
        jobs = 1 if device != "cpu" else max(1, min(os.cpu_count() or 1, 4))
    _check_int("jobs", jobs, 1, 256)
    _check_int("threads", threads, 1, 256)
    selected = [e for e in EXPERIMENT_LIST if e.name in experiments]

    if plan_only:
        info = DataInfo.guess(size.data) if size.data in ("digits", "mnist", "fashion_mnist", "cifar10") else None
        if info is None:
            raise ValueError(f"--plan cannot size runs on {size.data!r} without loading it")
    else:
        from ..atomic import check_writable
        from ..data import load_dataset

        if os.path.exists(out) and not os.path.isdir(out):
            raise NotADirectoryError(errno.ENOTDIR, "--out must be a directory, not a file", out)
        os.makedirs(out, exist_ok=True)
        check_writable(out)  # before the data are fetched and anything is run
        ds = load_dataset(size.data, data_dir, download)
        info = DataInfo.of(ds)
        del ds
    ctx = Context(size, seed, device, out, info)
    plans = {e.name: e.plan(ctx) for e in selected}
    _preflight(plans, ctx)
    total = sum(s.cost for specs in plans.values() for s in specs)
    if plan_only:
        log(f"preset {preset} ({PRESET_TEXT[preset]}), data {info.name}, seeds from {seed}")
        for e in selected:
            specs = plans[e.name]
            units = sum(s.cost for s in specs)
            log(f"{e.name:12s} {len(specs):4d} runs  {100 * units / max(total, 1):5.1f}% of the work  ({e.summary})")
            for s in specs:
                log(f"    {s.key}  {s.label}")
        core_s = total / UNITS_PER_SECOND
        log(f"estimate: {fmt_time(core_s)} of CPU time, about {fmt_time(core_s / jobs)} with {jobs} worker(s) on a "
            f"quiet machine (a rough cost model fitted to the default preset and to WRN-16-1 on CIFAR-10 at ~250 images/s per worker)")
        return {"plans": {e: [s.label for s in specs] for e, specs in plans.items()}, "data": info.name,
                "preset": preset, "estimated_cpu_seconds": total / UNITS_PER_SECOND}

    torch.set_num_threads(threads)
    sections: Dict[str, Section] = {}
    store = RunStore(os.path.join(out, "runs"), warn=log)
    all_recs: Dict[str, dict] = {}
    by_name = {e.name: e for e in selected}
    log(f"[study] {sum(len(p) for p in plans.values())} runs in {len(selected)} experiments: "
        + ", ".join(f"{name} {len(p)}" for name, p in plans.items()))

    def report(name: str, recs: Dict[str, dict]) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        all_recs.update(recs)
        sec = by_name[name].report(ctx, plans[name], recs)
        sec.seconds = time.perf_counter() - t0
        sec.cpu_seconds = time.process_time() - c0 + sum(r.get("cpu_seconds") or 0.0 for r in recs.values())
        sec.runs = len(recs)
        sections[name] = sec
        log(f"[study] {name}: {len(recs)} runs done, " + ", ".join(f"{c.verdict}" for c in sec.claims))

    with _sigterm_as_interrupt(), Runner(store, data_dir, jobs, threads, progress) as runner:
        runner.run_all(plans, report)
    sections = [sections[e.name] for e in selected]
    wall = time.perf_counter() - wall0
    cpu_main = time.process_time() - cpu0 - (runner.cpu_seconds if jobs == 1 else 0.0)
    meta = {"preset": preset, "preset_text": PRESET_TEXT[preset],
            "data": f"{info.name} ({info.n_train} train / {info.n_test} test images, {info.in_chans}x{info.side}x"
                    f"{info.side}, {info.num_classes} classes)",
            "seed": seed, "wall": wall, "cpu": cpu_main + runner.cpu_seconds, "cpu_runs": runner.cpu_seconds,
            "cpu_main": cpu_main, "cpu_all_runs": sum(r.get("cpu_seconds") or 0.0 for r in all_recs.values()),
            "executed": runner.executed, "reused": runner.reused, "rejected": store.rejected,
            "machine": _machine(jobs, threads, device), "size": size.asdict(), "test_images": ctx.n_test,
            "bootstrap": size.bootstrap,
            "warning": " ".join(w for w in (
                QUICK_WARNING if preset == "quick" else "",
                f"Sizes changed from the {preset} preset: {', '.join(sorted(overrides))}." if overrides else "") if w)
            or None}
    paths = write_report(out, sections, meta)
    claims = [claim_dict(c) for s in sections for c in s.claims]
    log(f"[study] {runner.executed} runs executed, {runner.reused} reused, wall {fmt_time(wall)}, CPU "
        f"{fmt_time(meta['cpu'])}; report: {paths[1]}")
    return {"claims": claims, "report_md": paths[0], "report_html": paths[1], "executed": runner.executed,
            "reused": runner.reused, "rejected": store.rejected, "wall": wall, "cpu": meta["cpu"], "preset": preset}
