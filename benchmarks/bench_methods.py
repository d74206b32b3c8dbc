"""Training and inference cost of every method, side by side, measured in one run.

    .venv/bin/python benchmarks/bench_methods.py          # `make bench`: WRN-16-1, WRN-16-4 @32x32, ResNet-50 @128x128
    .venv/bin/python benchmarks/bench_methods.py --quick  # smoke run (tiny sizes, a few seconds)
    .venv/bin/python benchmarks/bench_methods.py --archs resnet50 --methods bn,none,nf --batch 8,16,32,64
    .venv/bin/python benchmarks/bench_methods.py --methods bn,none,nf --device cuda --json out.json

For each architecture and method it prints training-step throughput (forward,
backward and SGD step, images/s), inference throughput (eval mode under
``torch.inference_mode``, images/s), peak memory of a training step, memory
saved for backward, their ratios to ``bn`` and ``none`` in the same run, plus
GFLOP/s of the training step against the machine's float32 matmul peak
measured in the same process. The row ``nf.fold`` is the NF model exported by
:func:`normfree.fold.fold_model` (plain convolutions, scalars folded in),
timed for inference only. With several batch sizes (``--batch 8,16,32``) it
prints one table per batch size and a summary of the training-throughput
ratios against the batch size.

Method: all models are built first; then warm-up steps and ``--reps`` timed
steps are run round-robin over the methods (the order rotates each round), so
that machine noise hits all of them alike. img/s are from median step times;
a ratio "x bn" is the median over rounds of t_bn / t_method, each round's
steps having run back to back under the same load; the goal lines give the
ratio's quartiles over rounds too (on a shared VM single ratios move by
several percent between runs: read the quartiles).
Memory: "peak MB" is the peak memory a training step adds to what the model
and optimizer hold before it: on CUDA ``torch.cuda.max_memory_allocated``
during a step minus what was allocated before it; on CPU (Linux) the growth
of the peak resident set (VmHWM, reset through /proc/self/clear_refs) during
one step, measured in a fresh process per method so that no other model or
allocator state counts, with the C library's default allocator settings
(``--no-peak-memory`` skips these probes). "saved MB"
is the bytes of the distinct tensors autograd saves for the backward pass
(activations plus weights; via ``torch.autograd.graph.saved_tensors_hooks``):
the part of the peak that a normalization layer adds to, exact and free of
allocator effects.
FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward
(convolutions and matmuls only). Under each table: the time of NF's weight
standardization alone and its share of the nf step, and the minor page faults
per timed training step (memory the allocator took fresh from the kernel).
Learning rate 0: each timed step does all of a training step's work, but the
SGD update (lr 0) leaves every model at its initialization, so that no
model's numbers drift into NaN/Inf or float32 denormals: both change the
speed of some kernels (see :class:`Runner`), and at lr 1e-3 on random data
the unnormalized ResNet-50 was NaN from its third step on and Fixup's
zero-initialized layers produced denormals that slowed its step ~3x (both
measured with an earlier version of this script).
Rows whose loss or parameters are not finite are flagged under the table.
Allocator: like the ``normfree`` command, the script first makes glibc keep
freed memory for reuse (:mod:`normfree.allocator`); with the default settings
large activation blocks are returned to the kernel after every step and page
faults took ~30% of a ResNet-50 batch-64 step on the development VM and made
it noisy. Every method runs in the same process, so all get the same
allocator either way. By default (``--allocators retained,system``) the
training steps of each configuration are then timed again in a fresh process
with the C library's defaults (``mallopt`` changes a whole process and cannot
be undone exactly), printed as a second table (img/s both ways, x none within
each process) with its own goal lines: what a user gets in a script that does
not call :func:`normfree.allocator.retain_freed_memory`. ``--system-malloc``
(= ``--allocators system``) runs everything with the defaults only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
sys.path.insert(0, SRC)
import normfree  # noqa: E402
from normfree.allocator import retain_freed_memory  # noqa: E402
from normfree.fold import fold_model  # noqa: E402
from normfree.train import parse_value  # noqa: E402

DEFAULT_METHODS = "bn,none,skipinit,fixup,nf,nf_he,rescale"
# name: (model name, create_model kwargs, input size, batch); "quick" sizes for a smoke run.
# WRN-16-1 at batch 128 is where BN's share of the step is largest (small convolutions,
# large activation maps); WRN-16-4 and ResNet-50 are the mid-size and ImageNet-style cases.
CONFIGS = {
    "wrn16_1": ("wrn", dict(depth=16, width=1, num_classes=10), 32, 128),
    "wrn16_4": ("wrn", dict(depth=16, width=4, num_classes=10), 32, 64),
    "resnet50": ("resnet50", dict(num_classes=1000), 128, 16),
}
QUICK = {
    "wrn16_1": ("wrn", dict(depth=10, width=1, num_classes=10), 16, 8),
    "wrn16_4": ("wrn", dict(depth=10, width=2, num_classes=10), 16, 4),
    "resnet50": ("resnet50", dict(num_classes=10, width=0.25), 32, 2),
}
ALLOCATORS = ("retained", "system")
FOLD_ROW = "nf.fold"


def method_of(variant: str) -> str:
    """'nf:conv_bias=False:alpha=0.5' -> 'nf' (a method, optionally with options, names a row)."""
    return variant.split(":", 1)[0]


def options_of(variant: str) -> dict:
    """'nf:conv_bias=False:alpha=0.5' -> {'conv_bias': False, 'alpha': 0.5} (create_model options)."""
    items = variant.split(":")[1:]
    for item in items:
        if "=" not in item:
            raise ValueError(f"method options are key=value, got {item!r} in {variant!r}")
    return {k.strip(): parse_value(v) for k, v in (item.split("=", 1) for item in items)}


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh memory touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, sizes: Tuple[int, ...], reps: int = 6) -> float:
    """Best float32 GFLOP/s of an n x n matmul (2 n^3 FLOPs), over ``reps``
    runs of each size n in ``sizes`` (the fastest size differs between machines)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        for i in range(reps + 2):
            sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            if i >= 2:
                best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while running ``fn``."""
    seen: Dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


class Runner:
    """One model with its optimizer and fixed data. The SGD step has learning
    rate 0: it does all of a step's work (momentum update, in-place weight
    update, which also invalidates NF's weight cache) but leaves every model at
    its initialization, so that no model drifts into NaN/Inf or denormal
    numbers. At lr 1e-3 the unnormalized ResNet-50 (``none``) was NaN from its
    third step on, and NaN inputs make some kernels faster (its max-pool took
    7 ms instead of 17): the table would have timed that artifact."""

    LR = 0.0

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool):
        self.model, self.x, self.y = model, x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=self.LR, momentum=0.9) if train else None
        self.last_loss: Optional[torch.Tensor] = None

    def loss(self) -> torch.Tensor:
        return F.cross_entropy(self.model(self.x), self.y)

    def train_step(self) -> None:
        self.model.train()
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.last_loss = loss.detach()

    def finite(self) -> bool:
        """The last training loss and every parameter are finite (the timings measured real numbers)."""
        if self.last_loss is not None and not bool(torch.isfinite(self.last_loss)):
            return False
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def eval_step(self) -> None:
        self.model.eval()
        with torch.inference_mode():
            self.model(self.x)


def timed_round_robin(runners: Dict[str, Runner], step: str, warmup: int, reps: int,
                      device: torch.device) -> Tuple[Dict[str, List[float]], float]:
    """Seconds of each timed call of ``runner.<step>()`` per method, and the
    page faults per timed call; in round ``r`` every method runs once (order
    rotated), so ``times[m][r]`` of different methods were measured under the
    same machine load."""
    names = list(runners)
    times: Dict[str, List[float]] = {n: [] for n in names}
    faults = 0
    for r in range(warmup + reps):
        if r == warmup:
            faults = minor_faults()
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = getattr(runners[name], step)
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return times, (minor_faults() - faults) / (reps * len(names))


def paired_ratio(t_ref: List[float], t_m: List[float]) -> float:
    """Throughput of m relative to ref: the median over rounds of t_ref / t_m."""
    return statistics.median(a / b for a, b in zip(t_ref, t_m))


def ratio_spread(t_ref: List[float], t_m: List[float]) -> tuple:
    """(first, third) quartile over rounds of t_ref / t_m: the run's noise on a ratio."""
    ratios = [a / b for a, b in zip(t_ref, t_m)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q = statistics.quantiles(ratios, n=4)
    return q[0], q[2]


# A training step in a fresh process: its peak resident memory above what the
# model, optimizer and data held before it (Linux: VmRSS, and VmHWM after
# resetting it through /proc/self/clear_refs).
_RSS_PROBE = r"""
import json, sys
import torch, torch.nn.functional as F
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["src"])
import normfree

def status_kb(field):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(field + ":"))

torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
model = normfree.create_model(spec["name"], **spec["kwargs"])
fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
model = model.to(memory_format=fmt)
for block in model.modules():  # e.g. {"inplace_acts": false}: a switch of every residual block
    if isinstance(block, normfree.ResidualBlock):
        for k, v in spec.get("block_switches", {}).items():
            setattr(block, k, v)
opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # as the timed steps

def step(batch):
    x = torch.randn(batch, 3, spec["hw"], spec["hw"]).contiguous(memory_format=fmt)
    y = torch.randint(0, spec["kwargs"]["num_classes"], (batch,))
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

step(2)  # one-time set-up (kernels, threads) and the momentum buffers, as before a CUDA step is measured
base = status_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak (VmHWM) to the current RSS
step(spec["batch"])
print(json.dumps({"peak_bytes": 1024 * (status_kb("VmHWM") - base)}))
"""


def cpu_step_peak_bytes(name: str, kwargs: dict, hw: int, batch: int, channels_last: bool,
                        block_switches: Optional[dict] = None) -> Optional[int]:
    """Peak RSS growth of one training step (forward, backward, SGD step) of
    ``name``, run in a fresh Python process so that no other model's memory or
    allocator state counts, after a batch-2 step has done the one-time set-up
    and created the momentum buffers. The probe keeps the C library's default
    allocator settings: with freed memory retained the heap can fragment, and
    its peak would measure the allocator as much as the method. ``block_switches``
    sets attributes of every residual block (``{"inplace_acts": False}``). None where
    /proc/self/clear_refs is not available (not Linux)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    spec = dict(src=SRC, name=name, kwargs=kwargs, hw=hw, batch=batch, channels_last=channels_last,
                threads=torch.get_num_threads(), block_switches=block_switches or {})
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe of {name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def cuda_step_peak_bytes(runner: Runner, device: torch.device) -> int:
    """``torch.cuda.max_memory_allocated`` during a training step, minus what was allocated before it."""
    runner.opt.zero_grad(set_to_none=True)
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.train_step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def train_flops(runner: Runner) -> int:
    runner.model.train()
    with FlopCounterMode(display=False) as counter:
        runner.loss().backward()
    runner.opt.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def standardization_seconds(model: torch.nn.Module, reps: int, device: torch.device) -> tuple:
    """(median seconds, weights) of Scaled WS forward + backward over every
    ScaledStdConv2d of ``model``, the weight-sized work an NF training step adds."""
    convs = [m for m in model.modules() if isinstance(m, normfree.ScaledStdConv2d)]
    grads = [torch.randn_like(c.weight) for c in convs]
    times = []
    for i in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        for c, g in zip(convs, grads):
            w, _ = c.folded_weight_bias(in_scale=1.5, out_scale=0.5)  # as in a block: scales folded
            w.backward(g)
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
    for c in convs:
        c.weight.grad = c.gain.grad = None
    return statistics.median(times), sum(c.weight.numel() for c in convs)


def build_runners(spec, methods: List[str], args, device: torch.device):
    """(models, training runners, x, y) of every method on one configuration, seeded alike."""
    model_arch, kwargs, hw, batch = spec
    torch.manual_seed(0)
    x = torch.randn(batch, 3, hw, hw, device=device)
    y = torch.randint(0, kwargs["num_classes"], (batch,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    models = {}
    for m in methods:
        model = normfree.create_model(f"{method_of(m)}_{model_arch}", **kwargs, **options_of(m)).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[m] = model
    return models, {m: Runner(models[m], x, y, True) for m in methods}, x, y


def add_ratios(rows: List[dict], t_train: Dict[str, List[float]], t_eval: Optional[Dict[str, List[float]]]) -> None:
    """Paired ratios of every row to bn and none (training; inference and memory where measured)."""
    by = {r["method"]: r for r in rows}
    for r in rows:
        for ref in ("bn", "none"):
            if ref not in by:
                continue
            if t_eval is not None:
                r[f"eval_x_{ref}"] = paired_ratio(t_eval[ref], t_eval[r["method"]])
            if r["method"] in t_train:
                r[f"train_x_{ref}"] = paired_ratio(t_train[ref], t_train[r["method"]])
                r[f"train_x_{ref}_quartiles"] = ratio_spread(t_train[ref], t_train[r["method"]])
                for mem in ("saved_mb", "peak_mb"):
                    if r.get(mem) is not None and by[ref].get(mem):
                        r[f"{mem}_x_{ref}"] = r[mem] / by[ref][mem]


def bench_config(arch: str, spec, methods: List[str], args, device: torch.device,
                 matmul_gflop_s: float) -> dict:
    model_arch, kwargs, hw, batch = spec
    models, train, x, y = build_runners(spec, methods, args, device)
    title = f"{arch}: {model_arch} {kwargs}, {hw}x{hw}, batch {batch}"
    med = statistics.median
    if args.train_only:  # the other allocator's process: training throughput only
        t_train, faults = timed_round_robin(train, "train_step", args.warmup, args.reps, device)
        rows = [{"method": m, "finite": train[m].finite(), "train_img_s": batch / med(t_train[m]),
                 "train_s": t_train[m]} for m in methods]
        add_ratios(rows, t_train, None)
        return {"arch": arch, "title": title, "batch": batch, "hw": hw, "rows": rows,
                "faults_per_train_step": faults}
    evals = dict(train)
    if "nf" in methods:
        evals[FOLD_ROW] = Runner(fold_model(models["nf"]).eval(), x, y, False)

    flops = {m: train_flops(train[m]) for m in methods}
    saved = {}
    for m in methods:
        train[m].model.train()
        saved[m] = saved_tensor_bytes(train[m].loss)
    if device.type == "cuda":
        peak = {m: cuda_step_peak_bytes(train[m], device) for m in methods}
    elif args.no_peak_memory:
        peak = {m: None for m in methods}
    else:
        peak = {m: cpu_step_peak_bytes(f"{method_of(m)}_{model_arch}", {**kwargs, **options_of(m)}, hw, batch,
                                       args.channels_last) for m in methods}
    t_train, faults = timed_round_robin(train, "train_step", args.warmup, args.reps, device)
    t_eval, _ = timed_round_robin(evals, "eval_step", args.warmup, args.reps, device)

    rows = []
    for m in list(evals):
        row = {"method": m, "eval_img_s": batch / med(t_eval[m]), "eval_s": t_eval[m]}
        if m in train:
            row["finite"] = train[m].finite()
            row.update(train_img_s=batch / med(t_train[m]), train_s=t_train[m], saved_mb=saved[m] / 2 ** 20,
                       peak_mb=None if peak[m] is None else peak[m] / 2 ** 20,
                       gflop_step=flops[m] / 1e9, gflop_s=flops[m] / med(t_train[m]) / 1e9)
            row["pct_peak"] = 100 * row["gflop_s"] / matmul_gflop_s
        rows.append(row)
    add_ratios(rows, t_train, t_eval)
    out = {"arch": arch, "title": title, "batch": batch, "hw": hw, "rows": rows, "faults_per_train_step": faults}
    if "nf" in models:
        ws_s, n = standardization_seconds(models["nf"], args.reps, device)
        out["nf_ws"] = {"seconds": ws_s, "weights": n, "share_of_nf_step": ws_s / med(t_train["nf"])}
    return out


def other_allocator_run(arch: str, batch: int, methods: List[str], args) -> dict:
    """The training timings of one configuration with the C library's default
    allocator settings, in a fresh process (``mallopt`` changes a whole process
    and cannot be undone exactly: glibc stops adapting its thresholds once one
    is set)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "system.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--allocators", "system", "--train-only",
               "--archs", arch, "--batch", str(batch), "--methods", ",".join(methods), "--reps", str(args.reps),
               "--warmup", str(args.warmup), "--threads", str(torch.get_num_threads()), "--json", out]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--channels-last"] if args.channels_last else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the system-malloc run of {arch} failed:\n{proc.stderr[-2000:]}")
        with open(out) as fh:
            (result,) = json.load(fh)["results"]
    return result


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


COLUMNS = [  # (header, row key, format)
    ("train img/s", "train_img_s", ".1f"), ("x bn", "train_x_bn", ".2f"), ("x none", "train_x_none", ".2f"),
    ("eval img/s", "eval_img_s", ".1f"), ("x bn", "eval_x_bn", ".2f"), ("x none", "eval_x_none", ".2f"),
    ("peak MB", "peak_mb", ".1f"), ("x bn", "peak_mb_x_bn", ".2f"),
    ("saved MB", "saved_mb", ".1f"), ("x bn", "saved_mb_x_bn", ".2f"),
    ("GFLOP/step", "gflop_step", ".1f"), ("GFLOP/s", "gflop_s", ".1f"), ("% peak", "pct_peak", ".1f"),
]


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    """A markdown table with columns padded to their widest cell."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) if i else c.ljust(w)
                                            for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def print_table(result: dict) -> None:
    print(f"\n## {result['title']}")
    header = ["method"] + [c[0] for c in COLUMNS]
    rows = [[r["method"]] + [fmt(r.get(key), spec) for _, key, spec in COLUMNS] for r in result["rows"]]
    print(markdown_table(header, rows))
    ws = result.get("nf_ws")
    if ws:
        print(f"\nnf: weight standardization (forward + backward over {ws['weights'] / 1e6:.1f}M weights, "
              f"timed alone) {1e3 * ws['seconds']:.1f} ms = {100 * ws['share_of_nf_step']:.1f}% of nf's "
              f"training step; a fixed cost per step, whatever the batch size")
    print(f"page faults per training step: {result['faults_per_train_step']:.0f}")
    bad = [r["method"] for r in result["rows"] if r.get("finite") is False]
    if bad:
        print(f"WARNING: non-finite loss or parameters in {', '.join(bad)}: their timings measure NaN/Inf "
              f"arithmetic, which some kernels run at a different speed")


def print_batch_summary(results: List[dict]) -> None:
    """Training-throughput ratios of every method against the batch size, per architecture."""
    methods = [r["method"] for r in results[0]["rows"] if "train_x_bn" in r or "train_x_none" in r]
    present = lambda ref: all(ref in {r["method"] for r in res["rows"]} for res in results)
    header = ["arch", "batch"] + [f"{m} x {ref}" for m in methods for ref in ("bn", "none")
                                  if m not in (ref, "none" if ref == "bn" else "") and present(ref)]
    rows = []
    for res in results:
        by = {r["method"]: r for r in res["rows"]}
        cells = [res["arch"], str(res["batch"])]
        for h in header[2:]:
            m, ref = h.split(" x ")
            cells.append(fmt(by[m].get(f"train_x_{ref}"), ".2f"))
        rows.append(cells)
    print("\n## training throughput ratios against the batch size (same run)")
    print(markdown_table(header, rows))


def print_allocator_table(result: dict) -> None:
    """Training throughput with freed memory retained (this process) and with the
    C library's defaults (a fresh process, ``result["system_malloc"]``)."""
    other = result.get("system_malloc")
    if not other:
        return
    sys_by = {r["method"]: r for r in other["rows"]}
    header = ["method", "img/s retained", "img/s default", "retained / default", "x none retained",
              "x none default"]
    rows = []
    for r in result["rows"]:
        o = sys_by.get(r["method"])
        if o is None or "train_img_s" not in r:
            continue
        rows.append([r["method"], fmt(r["train_img_s"], ".1f"), fmt(o["train_img_s"], ".1f"),
                     fmt(r["train_img_s"] / o["train_img_s"], ".2f"), fmt(r.get("train_x_none"), ".3f"),
                     fmt(o.get("train_x_none"), ".3f")])
    print(f"\ntraining step, both allocator settings (`retained`: normfree.allocator.retain_freed_memory(), "
          f"this process; `default`: the C library's settings, a fresh process run right after; "
          f"x none is paired within each process, retained / default is not):")
    print(markdown_table(header, rows))
    print(f"page faults per training step: {result['faults_per_train_step']:.0f} retained, "
          f"{other['faults_per_train_step']:.0f} default")


#: issue 16: nf within 2% of none in training, at every size; issue 6: skipinit and
#: fixup within 3% of none, skipinit and nf 1.10x bn, memory below bn, inference as plain convs
WITHIN_NONE = {"skipinit": 0.97, "fixup": 0.97, "nf": 0.98}


def checks(result: dict, prefix: str = "") -> List[str]:
    """The issues' goals, evaluated on this run's numbers (PASS / FAIL)."""
    by = {r["method"]: r for r in result["rows"]}
    out = []

    def check(cond: bool, text: str) -> None:
        out.append(f"{'PASS' if cond else 'FAIL'}  {prefix}{result['arch']} batch {result['batch']}: {text}")

    def spread(m: str, ref: str) -> str:
        lo, hi = by[m][f"train_x_{ref}_quartiles"]
        return f"; rounds' quartiles {lo:.2f}-{hi:.2f}"

    for m in ("skipinit", "nf"):
        if m in by and "bn" in by:
            v = by[m]["train_x_bn"]
            check(v >= 1.10, f"{m} train throughput {v:.2f}x bn (goal >= 1.10x{spread(m, 'bn')})")
    for m, goal in WITHIN_NONE.items():
        if m in by and "none" in by:
            v = by[m]["train_x_none"]
            check(v >= goal, f"{m} train throughput {v:.3f}x none "
                             f"(goal within {round(100 * (1 - goal))}%{spread(m, 'none')})")
    if "bn" in by:
        for m, r in by.items():
            if m == FOLD_ROW or method_of(m) in ("bn", "relubn", "gn", "ln", "in"):
                continue
            for key, what in (("peak_mb", "peak memory of a training step"), ("saved_mb", "memory saved for backward")):
                if r.get(f"{key}_x_bn") is not None:
                    v = r[f"{key}_x_bn"]
                    check(v < 1.0, f"{m} {what} {v:.2f}x bn (goal < 1)")
            if "train_x_bn" in r and r["train_x_bn"] < 1.0:
                check(False, f"{m} trains slower than bn ({r['train_x_bn']:.2f}x): a defect")
    if "nf" in by and FOLD_ROW in by:
        v = paired_ratio(by[FOLD_ROW]["eval_s"], by["nf"]["eval_s"])
        check(v >= 0.97, f"nf eval throughput {v:.3f}x the same network with plain convs "
                         f"({FOLD_ROW}) (goal >= 1, 3% noise margin)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated methods (default {DEFAULT_METHODS}); include bn and none for ratios; "
                        f"a method may carry create_model options, e.g. nf:conv_bias=False or nf:alpha=0.5")
    p.add_argument("--archs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--reps", type=int, default=9, help="timed steps per method (default 9)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first (default 2)")
    p.add_argument("--batch", default=None,
                   help="batch size(s) for every architecture instead of its default, e.g. 16 or 8,16,32,64 "
                        "(several: one table each and a summary of the ratios against the batch size)")
    p.add_argument("--allocators", default="retained,system",
                   help="CPU: 'retained' (freed memory kept for reuse, as the normfree command and "
                        "normfree.allocator.retain_freed_memory() do), 'system' (the C library's defaults), "
                        "or both (default): the full table with the first, and the training steps again in a "
                        "fresh process with the second")
    p.add_argument("--system-malloc", action="store_true", help="the same as --allocators system")
    p.add_argument("--train-only", action="store_true",
                   help="time the training steps only (no inference, memory or FLOP columns)")
    p.add_argument("--no-peak-memory", action="store_true",
                   help="CPU: skip the peak-memory probes (one fresh process per method and batch)")
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 rep: a smoke test of the script")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if method_of(m) not in normfree.SCHEMES:
            p.error(f"unknown method {method_of(m)!r}; allowed: {normfree.list_methods()}")
        try:
            normfree.make_scheme(method_of(m), **options_of(m))
        except (ValueError, TypeError) as e:
            p.error(f"bad method variant {m!r}: {e}")
    configs = QUICK if args.quick else CONFIGS
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    for a in archs:
        if a not in configs:
            p.error(f"unknown arch {a!r}; allowed: {', '.join(configs)}")
    allocators = ["system"] if args.system_malloc else [a.strip() for a in args.allocators.split(",") if a.strip()]
    if not allocators or any(a not in ALLOCATORS for a in allocators) or len(set(allocators)) < len(allocators):
        p.error(f"--allocators must be one or both of {', '.join(ALLOCATORS)}, got {args.allocators!r}")
    if args.quick:
        args.reps, args.warmup = min(args.reps, 1), min(args.warmup, 1)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    batches = [None]
    if args.batch is not None:
        try:
            batches = [int(b) for b in str(args.batch).split(",")]
        except ValueError:
            batches = [0]
        if not batches or min(batches) < 1:
            p.error(f"--batch must be positive integers separated by commas, got {args.batch!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if device.type != "cpu":
        allocators = allocators[:1]  # the C library's malloc does not hold GPU memory
    if args.threads:
        torch.set_num_threads(args.threads)

    retained = allocators[0] == "retained" and device.type == "cpu" and retain_freed_memory()
    allocator = "freed memory retained (mallopt)" if retained else "C library default"
    compare = retained and "system" in allocators
    mm_sizes = (256, 512) if args.quick else ((4096, 8192) if device.type == "cuda" else (1024, 2048, 4096))
    peak = matmul_peak(device, mm_sizes)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(f"# normfree benchmark: torch {torch.__version__}, device {device} ({dev}), "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores; allocator: {allocator}"
          + ("; training steps also with the C library's defaults (fresh processes)" if compare else ""))
    print(f"# float32 matmul peak: {peak:.1f} GFLOP/s; {args.warmup} warm-up + {args.reps} timed steps "
          f"per method, round-robin, medians")
    results, all_checks = [], []
    for a in archs:
        for b in batches:
            spec = configs[a] if b is None else configs[a][:3] + (b,)
            res = bench_config(a, spec, methods, args, device, peak)
            if compare:
                res["system_malloc"] = other_allocator_run(a, spec[3], methods, args)
            if args.train_only:
                print(f"\n## {res['title']}: training steps only")
                print(markdown_table(["method", "train img/s", "x none"],
                                     [[r["method"], fmt(r["train_img_s"], ".1f"), fmt(r.get("train_x_none"), ".3f")]
                                      for r in res["rows"]]))
            else:
                print_table(res)
                print_allocator_table(res)
            results.append(res)
            all_checks += checks(res)
            if compare:
                all_checks += checks(res["system_malloc"], prefix="C library malloc: ")
    if len(batches) > 1:
        for a in archs:
            print_batch_summary([r for r in results if r["arch"] == a])
    peak_end = matmul_peak(device, mm_sizes)
    print(f"\n# float32 matmul peak measured again at the end: {peak_end:.1f} GFLOP/s "
          f"(% peak above uses the first, {peak:.1f}; a large change means the machine was busy)")
    if all_checks:
        print("\n# goals (issue 6; nf within 2% of none: issue 16) on this run")
        print("\n".join(all_checks))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "device_name": dev, "threads": torch.get_num_threads(),
                       "allocator": allocator, "matmul_peak_gflop_s": peak, "matmul_peak_end_gflop_s": peak_end,
                       "results": results, "checks": all_checks}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
