"""Training and inference cost of every method, side by side, measured in one run.

    .venv/bin/python benchmarks/bench_methods.py          # `make bench`: WRN-16-4 @32x32 and ResNet-50 @128x128
    .venv/bin/python benchmarks/bench_methods.py --quick  # smoke run (tiny sizes, a few seconds)
    .venv/bin/python benchmarks/bench_methods.py --methods bn,none,nf --device cuda --json out.json

For each architecture and method it prints training-step throughput (forward,
backward and SGD step, images/s), inference throughput (eval mode under
``torch.inference_mode``, images/s), peak memory and their ratios to ``bn``
and ``none`` in the same run, plus GFLOP/s of the training step against the
machine's float32 matmul peak measured in the same process. The row
``nf.fold`` is the NF model exported by :func:`normfree.fold.fold_model`
(plain convolutions, scalars folded in), timed for inference only.

Method: all models are built first; then warm-up steps and ``--reps`` timed
steps are run round-robin over the methods (the order rotates each round), so
that machine noise hits all of them alike. img/s are from median step times;
a ratio "x bn" is the median over rounds of t_bn / t_method, each round's
steps having run back to back under the same load; the goal lines give the
ratio's quartiles over rounds too (on a shared VM, 5-10% of CPU time can be
stolen by the host, and single ratios move by a few percent between runs).
Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during a training step
(minus what was allocated before it); on CPU, the bytes of the distinct
tensors autograd saves for the backward pass (activations plus weights; via
``torch.autograd.graph.saved_tensors_hooks``), which is what dominates the
peak of a training step and what a normalization layer adds to.
FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward
(convolutions and matmuls only).
Denormals: the benchmark trains on random data at lr 1e-3, where the gradients
through Fixup's (and SkipInit's) zero-initialized layers become products of
tiny numbers; once they fall below 1.2e-38 (float32 denormals) x86 CPUs
process them up to ~100x slower and Fixup's step took 3.6 s instead of 1.3 s.
Real training at lr 0.1 did not show it (WRN-28-2 on digits, same time with
and without flushing), so by default denormals are flushed to zero
(``torch.set_flush_denormal(True)``, set before torch starts its threads,
which inherit it; TensorFlow does the same by default) and the table measures
the methods, not the denormal artifact. ``--keep-denormals`` shows it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import normfree  # noqa: E402
from normfree.fold import fold_model  # noqa: E402

DEFAULT_METHODS = "bn,none,skipinit,fixup,nf,nf_he,rescale"
# name: (model name, create_model kwargs, input size, batch); "quick" sizes for a smoke run
CONFIGS = {
    "wrn": ("wrn", dict(depth=16, width=4, num_classes=10), 32, 64),
    "resnet50": ("resnet50", dict(num_classes=1000), 128, 16),
}
QUICK = {
    "wrn": ("wrn", dict(depth=10, width=1, num_classes=10), 16, 8),
    "resnet50": ("resnet50", dict(num_classes=10, width=0.25), 32, 2),
}
FOLD_ROW = "nf.fold"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, reps: int = 10) -> float:
    """Best float32 GFLOP/s of an n x n matmul (2 n^3 FLOPs) over ``reps`` runs."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for i in range(reps + 2):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


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
    """One model with its optimizer and fixed data."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool):
        self.model, self.x, self.y = model, x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if train else None

    def loss(self) -> torch.Tensor:
        return F.cross_entropy(self.model(self.x), self.y)

    def train_step(self) -> None:
        self.model.train()
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def eval_step(self) -> None:
        self.model.eval()
        with torch.inference_mode():
            self.model(self.x)


def timed_round_robin(runners: Dict[str, Runner], step: str, warmup: int, reps: int,
                      device: torch.device) -> Dict[str, List[float]]:
    """Seconds of each timed call of ``runner.<step>()`` per method; in round
    ``r`` every method runs once (order rotated), so ``times[m][r]`` of
    different methods were measured under the same machine load."""
    names = list(runners)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = getattr(runners[name], step)
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


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


def peak_memory(runner: Runner, device: torch.device) -> int:
    if device.type == "cuda":
        runner.opt.zero_grad(set_to_none=True)
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.train_step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    runner.model.train()
    return saved_tensor_bytes(runner.loss)


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


def bench_config(arch: str, spec, methods: List[str], args, device: torch.device, peak: float) -> dict:
    model_arch, kwargs, hw, batch = spec
    if args.batch:
        batch = args.batch
    torch.manual_seed(0)
    x = torch.randn(batch, 3, hw, hw, device=device)
    y = torch.randint(0, kwargs["num_classes"], (batch,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    models = {}
    for m in methods:
        model = normfree.create_model(f"{m}_{model_arch}", **kwargs).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[m] = model
    train = {m: Runner(models[m], x, y, True) for m in methods}
    evals = dict(train)
    if "nf" in methods:
        evals[FOLD_ROW] = Runner(fold_model(models["nf"]).eval(), x, y, False)

    flops = {m: train_flops(train[m]) for m in methods}
    mem = {m: peak_memory(train[m], device) for m in methods}
    t_train = timed_round_robin(train, "train_step", args.warmup, args.reps, device)
    t_eval = timed_round_robin(evals, "eval_step", args.warmup, args.reps, device)

    med = statistics.median
    rows = []
    for m in list(evals):
        row = {"method": m, "eval_img_s": batch / med(t_eval[m]), "eval_s": t_eval[m]}
        if m in train:
            row.update(train_img_s=batch / med(t_train[m]), train_s=t_train[m], peak_mb=mem[m] / 2 ** 20,
                       gflop_step=flops[m] / 1e9, gflop_s=flops[m] / med(t_train[m]) / 1e9)
            row["pct_peak"] = 100 * row["gflop_s"] / peak
        rows.append(row)
    by = {r["method"]: r for r in rows}
    for r in rows:
        for ref in ("bn", "none"):
            if ref in by:
                r[f"eval_x_{ref}"] = paired_ratio(t_eval[ref], t_eval[r["method"]])
                if "train_img_s" in r:
                    r[f"train_x_{ref}"] = paired_ratio(t_train[ref], t_train[r["method"]])
                    r[f"train_x_{ref}_quartiles"] = ratio_spread(t_train[ref], t_train[r["method"]])
                    r[f"mem_x_{ref}"] = r["peak_mb"] / by[ref]["peak_mb"]
    title = f"{arch}: {model_arch} {kwargs}, {hw}x{hw}, batch {batch}"
    out = {"arch": arch, "title": title, "batch": batch, "hw": hw, "rows": rows}
    if "nf" in models:
        ws_s, n = standardization_seconds(models["nf"], args.reps, device)
        out["nf_ws"] = {"seconds": ws_s, "weights": n, "share_of_nf_step": ws_s / med(t_train["nf"])}
    return out


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(result: dict, memory_label: str) -> None:
    print(f"\n## {result['title']}")
    head = (f"| {'method':9s} | train img/s | x bn  | x none | eval img/s | x bn  | x none | "
            f"{memory_label} | x bn  | GFLOP/step | GFLOP/s | % peak |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in result["rows"]:
        g = r.get
        print(f"| {r['method']:9s} | {fmt(g('train_img_s'), '11.1f')} | {fmt(g('train_x_bn'), '5.2f')} | "
              f"{fmt(g('train_x_none'), '6.2f')} | {fmt(g('eval_img_s'), '10.1f')} | {fmt(g('eval_x_bn'), '5.2f')} | "
              f"{fmt(g('eval_x_none'), '6.2f')} | {fmt(g('peak_mb'), f'{len(memory_label)}.1f')} | "
              f"{fmt(g('mem_x_bn'), '5.2f')} | {fmt(g('gflop_step'), '10.1f')} | {fmt(g('gflop_s'), '7.1f')} | "
              f"{fmt(g('pct_peak'), '6.1f')} |")
    ws = result.get("nf_ws")
    if ws:
        print(f"\nnf: weight standardization (forward + backward over {ws['weights'] / 1e6:.1f}M weights, "
              f"timed alone) {1e3 * ws['seconds']:.1f} ms = {100 * ws['share_of_nf_step']:.1f}% of nf's "
              f"training step; a fixed cost per step, whatever the batch size")


def checks(result: dict) -> List[str]:
    """The issue's goals, evaluated on this run's numbers (PASS / FAIL)."""
    by = {r["method"]: r for r in result["rows"]}
    out = []

    def check(cond: bool, text: str) -> None:
        out.append(f"{'PASS' if cond else 'FAIL'}  {result['arch']}: {text}")

    def spread(m: str, ref: str) -> str:
        lo, hi = by[m][f"train_x_{ref}_quartiles"]
        return f"; rounds' quartiles {lo:.2f}-{hi:.2f}"

    for m in ("skipinit", "nf"):
        if m in by and "bn" in by:
            v = by[m]["train_x_bn"]
            check(v >= 1.10, f"{m} train throughput {v:.2f}x bn (goal >= 1.10x{spread(m, 'bn')})")
    for m in ("skipinit", "fixup", "nf"):
        if m in by and "none" in by:
            v = by[m]["train_x_none"]
            check(v >= 0.97, f"{m} train throughput {v:.3f}x none (goal within 3%{spread(m, 'none')})")
    if "bn" in by:
        for m, r in by.items():
            if m not in ("bn", "relubn") and "peak_mb" in r and m not in ("gn", "ln", "in"):
                check(r["mem_x_bn"] < 1.0, f"{m} memory {r['mem_x_bn']:.2f}x bn (goal < 1)")
            if m not in ("bn", "relubn", "gn", "ln", "in") and "train_x_bn" in r and r["train_x_bn"] < 1.0:
                check(False, f"{m} trains slower than bn ({r['train_x_bn']:.2f}x): a defect")
    if "nf" in by and FOLD_ROW in by:
        v = paired_ratio(by[FOLD_ROW]["eval_s"], by["nf"]["eval_s"])
        check(v >= 0.97, f"nf eval throughput {v:.3f}x the same network with plain convs "
                         f"({FOLD_ROW}) (goal >= 1, 3% noise margin)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated methods (default {DEFAULT_METHODS}); include bn and none for ratios")
    p.add_argument("--archs", default="wrn,resnet50", help="comma-separated subset of wrn,resnet50")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--reps", type=int, default=9, help="timed steps per method (default 9)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first (default 2)")
    p.add_argument("--batch", type=int, default=None, help="override the batch size of every architecture")
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 rep: a smoke test of the script")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero (see Denormals in the module docstring)")
    args = p.parse_args(argv)
    if not args.keep_denormals:
        # before any parallel op: torch's worker threads inherit the setting when created
        torch.set_flush_denormal(True)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in normfree.SCHEMES:
            p.error(f"unknown method {m!r}; allowed: {normfree.list_methods()}")
    configs = QUICK if args.quick else CONFIGS
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    for a in archs:
        if a not in configs:
            p.error(f"unknown arch {a!r}; allowed: {sorted(configs)}")
    if args.quick:
        args.reps, args.warmup = min(args.reps, 1), min(args.warmup, 1)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)

    peak = matmul_peak(device, 512 if args.quick else (8192 if device.type == "cuda" else 2048))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(f"# normfree benchmark: torch {torch.__version__}, device {device} ({dev}), "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"# float32 matmul peak: {peak:.1f} GFLOP/s; {args.warmup} warm-up + {args.reps} timed steps "
          f"per method, round-robin, medians")
    memory_label = "peak MB" if device.type == "cuda" else "saved MB"
    results, all_checks = [], []
    for a in archs:
        res = bench_config(a, configs[a], methods, args, device, peak)
        print_table(res, memory_label)
        results.append(res)
        all_checks += checks(res)
    peak_end = matmul_peak(device, 512 if args.quick else (8192 if device.type == "cuda" else 2048))
    print(f"\n# float32 matmul peak measured again at the end: {peak_end:.1f} GFLOP/s "
          f"(% peak above uses the first, {peak:.1f}; a large change means the machine was busy)")
    if all_checks:
        print("\n# goals of issue 6 on this run")
        print("\n".join(all_checks))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "device_name": dev, "threads": torch.get_num_threads(),
                       "matmul_peak_gflop_s": peak, "memory": memory_label, "results": results,
                       "checks": all_checks}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
