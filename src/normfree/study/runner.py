"""Runs: what one run is (:class:`RunSpec`), how a worker executes it
(:func:`execute`), and the pool that runs them (:class:`Runner`).

Two kinds of run: ``train`` (a :func:`normfree.train.train` run, then the
study's own scoring of every test image, and optionally tracking and a lesion
test) and ``signal`` (signal propagation of one model at initialization).
Each finished run is stored in a :class:`~normfree.study.store.RunStore`
under the hash of its specification, so runs shared by two experiments are
done once, and a restarted study reuses what was finished.

Workers are spawned processes, one torch thread each. Each applies the
allocator setting that keeps freed memory (:mod:`normfree.allocator`, unless
``NORMFREE_SYSTEM_MALLOC=1``), ignores Ctrl-C (the parent handles it and
stops them), and exits as soon as its parent dies, however it died: a thread
waits on the parent's sentinel, and on Linux the kernel also sends SIGKILL
when the parent exits (``PR_SET_PDEATHSIG``).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .store import RunStore, clean
from .verdicts import pack_bits


@dataclass
class RunSpec:
    """One run.

    task: "train" (``cfg`` = :class:`~normfree.train.TrainConfig` keywords) or
    "signal" (``cfg`` = model name, create_model options, input shape, seed).
    extra (train): ``track_every`` (residual ratios and gains during training),
    ``lesion`` (the lesion test after it). seed: the seed this run belongs to
    (for "k of n seeds"). blocks: residual blocks, for the cost estimate.
    """

    experiment: str
    label: str
    cfg: Dict[str, Any]
    task: str = "train"
    extra: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    blocks: int = 1

    def identity(self) -> Dict[str, Any]:
        """What the run computes (its key is the hash of this; the label is not part of it)."""
        cfg = {k: v for k, v in self.cfg.items() if not k.startswith("_")}
        return clean({"task": self.task, "cfg": cfg, "extra": self.extra})

    @property
    def key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @property
    def cost(self) -> float:
        """Estimated work (images x blocks, plus a per-step overhead) for progress and --plan."""
        c = self.cfg
        if self.task == "signal":
            n, _, h, w = c["shape"]
            cost = float(n * h * w / 64 * (self.blocks + 2)) * 0.4
            if str(c["model"]).startswith("lsuv"):  # lsuv_init: a forward pass up to each layer, several times
                cost += float(n * h * w / 64 * (self.blocks + 2) ** 2) * 3.3
            return cost
        steps = c.get("steps")
        if not steps:
            steps = c["epochs"] * c.get("_train_examples", 1000) / c["batch_size"]
        pixels = (c.get("_pixels", 64) / 64) ** PIXEL_EXPONENT
        return float(steps * (c["batch_size"] * pixels * (self.blocks + 2) + 60 * (self.blocks + 2)))

    def seconds(self) -> float:
        """Estimated CPU seconds on one core of a quiet machine (see ``UNITS_PER_SECOND``)."""
        return self.cost / UNITS_PER_SECOND


#: cost units (:attr:`RunSpec.cost`) one CPU core does per second, and how the cost per image grows with
#: its pixels (faster than linearly: larger activations fall out of the caches). Fitted to two measured
#: points on the 2-core machine with two workers at once: the default preset (8x8 digits, 1 unit per image
#: and block: 30m48s of CPU for what the old linear model put at 37m20s) and a WRN-16-1 on CIFAR-10
#: (32x32: 16 ** 1.28 x 8 = 277 units per image, ~250 images/s per worker)
UNITS_PER_SECOND = 70_000
PIXEL_EXPONENT = 1.28


# --------------------------------------------------------------------------
# in the worker
# --------------------------------------------------------------------------
_WORKER: Dict[str, Any] = {}


def init_worker(threads: int) -> None:
    """Pool initializer: threads, allocator, Ctrl-C ignored, exit with the parent."""
    from ..allocator import configure_from_environment

    if threads:
        torch.set_num_threads(threads)
    _WORKER["allocator"] = configure_from_environment()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()


def _exit_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        from multiprocessing.connection import wait
        wait([parent.sentinel])
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_state() -> Dict[str, Any]:
    """What the worker's initializer set (for tests): allocator applied, pid, parent pid."""
    return {**_WORKER, "pid": os.getpid(), "ppid": os.getppid(), "threads": torch.get_num_threads()}


def _sleep(seconds: float) -> int:
    """A task that only waits (for tests of the pool's shutdown)."""
    time.sleep(seconds)
    return os.getpid()


@functools.lru_cache(maxsize=2)
def _dataset(name: str, data_dir: Optional[str]):
    from ..data import load_dataset
    return load_dataset(name, data_dir)


def test_subset(n_total: int, n: Optional[int]) -> torch.Tensor:
    """Indices of the study's test images: all, or a fixed seeded subset of n
    (the same for every run and seed, so that runs can be paired image by image)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(12345)
    return torch.randperm(n_total, generator=g)[:n].sort().values


@torch.no_grad()
def score_images(model, x_uint8, y, mean, std, batch_size: int = 500) -> Dict[str, Any]:
    """Per test image: classified correctly or not; plus mean loss and accuracy (eval mode)."""
    from ..data import Batches

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    correct, loss = [], 0.0
    try:
        for xb, yb in Batches(x_uint8, y, batch_size, mean, std, shuffle=False, augment=False, drop_last=False,
                              device=str(device)):
            logits = model(xb).float()
            loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct.append((logits.argmax(1) == yb).cpu())
    finally:
        model.train(was)
    c = torch.cat(correct).numpy()
    return {"correct": c, "acc": float(c.mean()), "loss": loss / len(c)}


def _lesion(model, x, y, mean, std) -> Dict[str, Any]:
    """Veit et al. 2016: delete one residual block at a time (it becomes the
    identity, its skip path) and score the test images; transition blocks,
    whose skip path is a projection, are left alone."""
    base = score_images(model, x, y, mean, std)["acc"]
    drops = []
    for i, block in enumerate(list(model.blocks)):
        if block.shortcut is not None:
            continue
        model.blocks[i] = torch.nn.Identity()
        try:
            acc = score_images(model, x, y, mean, std)["acc"]
        finally:
            model.blocks[i] = block
        drops.append({"block": i + 1, "acc": acc, "drop": base - acc})
    return {"base_acc": base, "blocks": drops}


def _execute_train(spec: RunSpec, data_dir: Optional[str]) -> Dict[str, Any]:
    from ..signal import measure_signal
    from ..train import TrainConfig, train

    cfg_kw = {k: v for k, v in spec.cfg.items() if not k.startswith("_")}
    ds = _dataset(cfg_kw.get("data", "digits"), data_dir)
    idx = test_subset(len(ds.test_y), cfg_kw.pop("max_test_examples", None))
    test_x, test_y = ds.test_x[idx], ds.test_y[idx]
    # train() gets the data without its test split (one image): the study scores the test images itself
    train_ds = dataclasses.replace(ds, test_x=ds.test_x[:1], test_y=ds.test_y[:1])
    cfg = TrainConfig(**{**cfg_kw, "data_dir": data_dir, "progress": False})
    tracking: List[Dict[str, Any]] = []
    every = spec.extra.get("track_every")
    probe = None
    if every:
        g = torch.Generator().manual_seed(0)
        pidx = torch.randperm(len(ds.train_y), generator=g)[:64]
        probe = (ds.train_x[pidx].float() / 255 - ds.mean.view(1, -1, 1, 1)) / ds.std.view(1, -1, 1, 1)

    def track(step, model):
        stats = measure_signal(model, probe.to(next(model.parameters()).device))
        gains = [float(b.gain.gain.detach()) for b in model.blocks if getattr(b, "gain", None) is not None]
        tracking.append({"step": step, "ratio": [s.ratio for s in stats], "gains": gains})

    def callback(step, model, record):
        if step % every == 0:
            track(step, model)

    result = train(cfg, callback=callback if every else None, dataset=train_ds)
    rec = result.summary()
    rec.pop("config", None)
    rec["history"] = [{k: h.get(k) for k in ("step", "loss", "acc") if k in h} for h in result.history]
    rec["test_acc"] = rec["test_loss"] = None
    rec["test_images"] = int(len(test_y))
    if result.status == "ok":
        scored = score_images(result.model, test_x, test_y, ds.mean, ds.std)
        rec["test_acc"], rec["test_loss"] = scored["acc"], scored["loss"]
        rec["test_correct"] = pack_bits(scored["correct"])
        if not math.isfinite(scored["loss"]):
            rec["test_loss"] = None
        if every:
            track(result.steps, result.model)
        if spec.extra.get("lesion"):
            n = spec.extra.get("lesion_images") or len(test_y)   # the first n of the study's test images
            rec["lesion"] = _lesion(result.model, test_x[:n], test_y[:n], ds.mean, ds.std)
    rec["tracking"] = tracking
    return rec


def _execute_signal(spec: RunSpec) -> Dict[str, Any]:
    from ..models import create_model
    from ..signal import measure_signal, predict_variance

    c = spec.cfg
    torch.manual_seed(c["seed"])
    model = create_model(c["model"], depth=c["depth"], width=c["width"], in_chans=c["shape"][1],
                         num_classes=c["num_classes"], **c.get("options", {}))
    if getattr(getattr(model, "scheme", None), "data_init", None) == "lsuv":
        from ..lsuv import lsuv_init  # data-dependent: initialized on another draw of the same noise (as normfree spp)
        lsuv_init(model, torch.randn(tuple(c["shape"]), generator=torch.Generator().manual_seed(c["seed"] + 1)))
    stats = measure_signal(model, tuple(c["shape"]), seed=c["seed"])
    second = stats.input_var + stats.input_mean_sq

    def predict(v0: float):  # None where there is no analytic prediction (NFNets' average-pool shortcut)
        try:
            return predict_variance(model, v0=v0)
        except ValueError:
            return None

    return {"models": {c["model"]: {"blocks": stats.to_dicts(), "input_var": stats.input_var,
                                    "input_mean_sq": stats.input_mean_sq,
                                    "predicted": predict(stats.input_var), "predicted_second": predict(second)}}}


def execute(spec: RunSpec, data_dir: Optional[str], threads: int = 1) -> Dict[str, Any]:
    """Run one :class:`RunSpec` (in a worker process) and return its JSON result."""
    if threads:
        torch.set_num_threads(threads)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if spec.task == "train":
        rec = _execute_train(spec, data_dir)
    elif spec.task == "signal":
        rec = _execute_signal(spec)
    else:
        raise ValueError(f"unknown task {spec.task!r}")
    rec["cpu_seconds"] = time.process_time() - cpu0
    rec["wall_seconds"] = time.perf_counter() - wall0
    rec["label"], rec["experiment"] = spec.label, spec.experiment
    return clean(rec)


# --------------------------------------------------------------------------
# in the parent
# --------------------------------------------------------------------------
class WorkerDied(RuntimeError):
    """A worker process ended without returning its run (killed from outside, or out of memory)."""


class Runner:
    """Runs specs (cached in a :class:`RunStore`) on a pool of worker processes,
    with a progress bar that names the experiment and estimates time left.

    Use as a context manager: leaving it (normally, on an error, on Ctrl-C or
    SIGTERM turned into KeyboardInterrupt) stops every worker at once.
    """

    def __init__(self, store: RunStore, data_dir: Optional[str], jobs: int, threads: int, progress: bool):
        self.store, self.data_dir = store, data_dir
        self.jobs, self.threads, self.progress = jobs, threads, progress
        self.pool: Optional[cf.ProcessPoolExecutor] = None
        self.executed = 0
        self.reused = 0
        self.cpu_seconds = 0.0        # worker CPU time of the runs executed now

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(now=exc_type is not None)

    def start_pool(self) -> cf.ProcessPoolExecutor:
        if self.pool is None:
            self.pool = cf.ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=init_worker, initargs=(self.threads,))
        return self.pool

    def close(self, now: bool = True) -> None:
        """Stop the workers. ``now`` (an error or an interrupt): they are killed at once (SIGKILL: a
        worker's training loop would take SIGTERM as a request to finish its step and write a
        checkpoint, and could start the next queued run meanwhile); the running runs are lost, finished
        ones are stored. Then the pool's manager thread is given a few seconds to notice and close the
        queues (the resource tracker warns at exit of the semaphores of queues left open). Otherwise,
        with every run done, the workers exit on their own and the pool is shut down cleanly."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if not now:
            pool.shutdown(wait=True)
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        manager = getattr(pool, "_executor_manager_thread", None)
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        pool.shutdown(wait=False, cancel_futures=True)
        if manager is not None:
            manager.join(timeout=10)  # bounded here (concurrent.futures' exit handler joins it once more)

    def cached(self, spec: RunSpec) -> Optional[dict]:
        return self.store.get(spec.key, spec.identity(), spec.task)

    def run_all(self, plans: Dict[str, Sequence[RunSpec]], done: Callable[[str, Dict[str, dict]], None]) -> None:
        """Run every experiment's specs (stored ones reused, a run shared by two experiments done once)
        and call ``done(experiment, {key: result})`` as soon as all of an experiment's runs are finished.

        All runs go to the pool at once, longest first, so that no worker waits at the end of one
        experiment while another experiment's runs are left (with ``jobs=1``: in the plans' order).
        """
        from tqdm.auto import tqdm

        results: Dict[str, dict] = {}
        todo: Dict[str, RunSpec] = {}
        for specs in plans.values():
            for s in specs:
                if s.key in results or s.key in todo:
                    continue
                rec = self.cached(s)
                if rec is not None:
                    results[s.key] = rec
                    self.reused += 1
                else:
                    todo[s.key] = s
        needs = {name: {s.key for s in specs} for name, specs in plans.items()}
        reported = set()

        def report_ready():
            for name in plans:  # in report order
                if name not in reported and needs[name] <= results.keys():
                    reported.add(name)
                    done(name, {k: results[k] for k in needs[name]})

        report_ready()
        if not todo:
            return
        total = sum(s.cost for s in todo.values())
        bar = tqdm(total=len(todo), desc="study", unit="run", disable=not self.progress, dynamic_ncols=True,
                   leave=True)
        start = time.perf_counter()
        done_units = 0.0

        def finish(spec, rec):
            nonlocal done_units
            self.store.put(spec.key, spec.identity(), rec)
            results[spec.key] = rec
            self.executed += 1
            self.cpu_seconds += rec.get("cpu_seconds") or 0.0
            done_units += spec.cost
            left = (time.perf_counter() - start) / max(done_units, 1e-9) * (total - done_units)
            bar.set_postfix_str(f"{spec.experiment}: {spec.label[:38]} | left ~{fmt_time(left)}")
            bar.update(1)
            report_ready()

        try:
            if self.jobs <= 1:
                for s in todo.values():
                    finish(s, execute(s, self.data_dir, self.threads))
            else:
                pool = self.start_pool()
                futures = {pool.submit(execute, s, self.data_dir, self.threads): s
                           for s in sorted(todo.values(), key=lambda s: -s.cost)}
                for fut in cf.as_completed(futures):
                    try:
                        rec = fut.result()
                    except BrokenProcessPool:
                        raise WorkerDied(f"a worker process died (killed from outside, or by the system for lack "
                                         f"of memory) during {futures[fut].experiment} run "
                                         f"{futures[fut].label!r}; the {self.executed} runs finished so far are "
                                         "kept: run the same command again to continue") from None
                    finish(futures[fut], rec)
        finally:
            bar.close()


def fmt_time(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def results_by_seed(specs: Sequence[RunSpec], recs: Dict[str, dict]) -> Dict[Any, Dict[int, dict]]:
    """``{label without seed: {seed: result}}`` for specs labelled "<name> seed <k>"."""
    out: Dict[Any, Dict[int, dict]] = {}
    for s in specs:
        out.setdefault(s.label.rsplit(" seed ", 1)[0], {})[s.seed] = recs[s.key]
    return out


def correct_matrix(runs: Sequence[dict], zeros_for_failed: bool = False) -> np.ndarray:
    """[seeds, images] 0/1 matrix of the test images each run classified correctly.

    A run without scores (it diverged) is an error, or a row of zeros with
    ``zeros_for_failed`` (a diverged network classifies nothing)."""
    from .verdicts import unpack_bits

    rows = []
    for r in runs:
        if r.get("test_correct") is None:
            if not zeros_for_failed:
                raise ValueError(f"run {r.get('label', '?')!r} has no test scores (status {r.get('status')!r})")
            rows.append(np.zeros(r["test_images"]))
        else:
            rows.append(unpack_bits(r["test_correct"], r["test_images"]))
    if not rows:
        raise ValueError("no runs to compare")
    return np.stack(rows)
