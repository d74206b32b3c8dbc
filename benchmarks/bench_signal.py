"""Cost of measure_signal relative to a plain no_grad forward pass.

    python benchmarks/bench_signal.py [--reps 5] [--threads 1] [--wall]

For each model and input: the median time of a plain ``torch.no_grad()``
forward (model in eval mode, BatchNorm with batch statistics as in the
measurement), of ``measure_signal`` (all statistics) and of
``measure_signal(residual=False)`` (block outputs only), and their ratios.
Goal: ratio <= 1.2. By default one intra-op thread and CPU time
(``time.process_time``), which other processes on a shared machine barely
disturb; ``--wall`` uses wall-clock time instead (use it with --threads N on
an idle machine). The runs alternate so that any drift hits all alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import normfree
from normfree.signal import measure_signal

CASES = [  # name, create_model kwargs, input shape
    ("nf_wrn", dict(depth=28, width=2), (16, 3, 32, 32)),
    ("bn_wrn", dict(depth=28, width=2), (16, 3, 32, 32)),
    ("skipinit_wrn", dict(depth=28, width=2), (16, 3, 32, 32)),
    ("nf_resnet50", {}, (2, 3, 128, 128)),
    ("bn_resnet50", {}, (2, 3, 128, 128)),
]


def plain_forward(model, x):
    # the same computation the measurement runs: eval mode, BN on batch statistics
    model.eval()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.train()
    with torch.no_grad():
        return model(x)


def bench(model, x, reps, clock):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {"forward": lambda: plain_forward(model, x), "measure": lambda: measure_signal(model, x),
            "outputs only": lambda: measure_signal(model, x, residual=False)}
    for f in runs.values():  # warm-up
        f()
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, f in runs.items():
            t = clock()
            f()
            times[k].append(clock() - t)
    model.load_state_dict(state)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--wall", action="store_true", help="wall-clock time instead of CPU time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{'wall-clock' if args.wall else 'CPU'} time, median of {args.reps}")
    print(f"{'model':14s} {'input':>16s} {'forward ms':>11s} {'measure ms':>11s} {'ratio':>6s} "
          f"{'outputs-only ms':>16s} {'ratio':>6s}")
    for name, kw, shape in CASES:
        torch.manual_seed(0)
        model = normfree.create_model(name, **kw)
        x = torch.randn(shape)
        t = bench(model, x, args.reps, clock)
        f = t["forward"]
        print(f"{name:14s} {'x'.join(map(str, shape)):>16s} {f * 1e3:11.1f} {t['measure'] * 1e3:11.1f} "
              f"{t['measure'] / f:6.2f} {t['outputs only'] * 1e3:16.1f} {t['outputs only'] / f:6.2f}")


if __name__ == "__main__":
    main()
