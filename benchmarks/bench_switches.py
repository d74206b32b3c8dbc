"""What each optimization switch of the residual block buys, side by side.

    python benchmarks/bench_switches.py [--arch wrn|wrn16_1|resnet50|quick] [--batch N]
                                        [--only SWITCHES] [--methods METHODS]
                                        [--memory] [--reps 9] [--threads 1] [--wall]

Every optimization in normfree's block has one switch whose other branch is
the reference computation (``normfree.blocks.ResidualBlock``):

* ``fold_scalars``: NF's gamma/beta and gamma, alpha, the SkipInit/NF/Fixup
  gain and RescaleNet's b_l folded into the convolutions' weights (off: the
  formula step by step, one pass over the activation map per scalar);
* ``fold_biases``: Fixup's scalar biases carried by the convolutions (off:
  one ``x + b`` per bias);
* ``Conv2d.cache_weights``: the folded (and standardized) weights cached
  under ``no_grad`` (off: recomputed on every call). On by default only for
  Scaled-WS convolutions; the script turns it on and off for every conv.
* ``inplace_acts``: activations overwrite the conv / norm / bias output they
  read (off: each makes a new tensor), for every method alike.

For each switch and model the script times the step it affects (a training
step at learning rate 0 -- forward, backward, SGD update -- for the folding
switches; an ``inference_mode`` forward of the eval model for the cache)
with the switch on and off, alternating, and prints the median time and the
paired ratio off/on (> 1: the switch saves time) with its quartiles, and
with ``--memory`` the bytes autograd saves for backward either way and the
peak resident-memory growth of one training step (a fresh process per switch
setting, the C library's allocator defaults; ``bench_methods.py``'s probe). By
default one intra-op thread and CPU time (``time.process_time``), which other
processes on a shared machine disturb little; ``--wall`` for wall-clock time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import normfree  # noqa: E402
from normfree.blocks import ResidualBlock  # noqa: E402
from normfree.layers import Conv2d  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_methods  # noqa: E402  (its peak-memory probe)

SIZES = {  # arch: (create_model kwargs, resolution, batch)
    "wrn": (dict(depth=16, width=4, num_classes=10), 32, 64),
    "wrn16_1": (dict(depth=16, width=1, num_classes=10), 32, 128),
    "resnet50": (dict(num_classes=1000), 128, 16),
    "quick": (dict(depth=10, width=1, num_classes=10), 16, 8),
}
CASES = [  # (switch, method, what is timed)
    ("fold_scalars", "nf", "train"),
    ("fold_scalars", "skipinit", "train"),
    ("fold_scalars", "fixup", "train"),
    ("fold_scalars", "rescale", "train"),
    ("fold_biases", "fixup", "train"),
    ("cache_weights", "nf", "eval"),
    ("cache_weights", "skipinit", "eval"),
] + [("inplace_acts", m, "train") for m in ("bn", "none", "skipinit", "fixup", "nf", "nf_he", "rescale")]
BLOCK_SWITCHES = ("fold_scalars", "fold_biases", "inplace_acts")


def set_switch(model, switch: str, on: bool) -> None:
    for m in model.modules():
        if switch in BLOCK_SWITCHES and isinstance(m, ResidualBlock):
            setattr(m, switch, on)
        elif switch == "cache_weights" and isinstance(m, Conv2d):
            m.cache_weights = on  # the cache, once filled, stays valid (no weight changes in eval)


def saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one training forward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def make_step(model, x, y, what: str):
    if what == "eval":
        model.eval()

        def step():
            with torch.inference_mode():
                model(x)
        return step
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(SIZES), default="wrn")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--wall", action="store_true", help="wall-clock instead of CPU time")
    p.add_argument("--only", default=None, help="comma-separated switches to time (default: all)")
    p.add_argument("--methods", default=None, help="comma-separated methods to time (default: all)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the arch's)")
    p.add_argument("--memory", action="store_true",
                   help="also print the bytes autograd saves for backward, switch on and off")
    args = p.parse_args(argv)
    if args.reps < 1 or args.threads < 1 or (args.batch is not None and args.batch < 1):
        p.error("--reps, --threads and --batch must be >= 1")
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    kw, res, batch = SIZES[args.arch]
    batch = args.batch or batch
    arch = "resnet50" if args.arch == "resnet50" else "wrn"
    only = set(args.only.split(",")) if args.only else None
    methods = set(args.methods.split(",")) if args.methods else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g)
    y = torch.randint(0, kw["num_classes"], (batch,), generator=g)
    print(f"{arch} {kw} at {res}x{res}, batch {batch}; {args.threads} thread(s), "
          f"{'wall' if args.wall else 'CPU'} time, {args.reps} paired reps")
    print(f"{'switch':14s} {'method':9s} {'step':5s} {'on ms':>8s} {'off ms':>8s} {'off/on':>7s} {'quartiles':>13s}")
    for switch, method, what in CASES:
        if (only and switch not in only) or (methods and method not in methods):
            continue
        torch.manual_seed(0)
        model = normfree.create_model(f"{method}_{arch}", **kw)
        step = make_step(model, x, y, what)
        times = {True: [], False: []}
        for on in (True, False, True, False):  # warm-up
            set_switch(model, switch, on)
            step()
        for r in range(args.reps):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                set_switch(model, switch, on)
                t = clock()
                step()
                times[on].append(clock() - t)
        ratios = sorted(off / on for on, off in zip(times[True], times[False]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        mem = ""
        if args.memory and what == "train":
            mb = {}
            for on in (True, False):
                set_switch(model, switch, on)
                mb[on] = saved_bytes(model, x) / 2 ** 20
            mem = f"   saved for backward: {mb[True]:.1f} MB on, {mb[False]:.1f} MB off"
            if switch in BLOCK_SWITCHES:
                peak = {on: bench_methods.cpu_step_peak_bytes(f"{method}_{arch}", kw, res, batch, False,
                                                              {switch: on}) for on in (True, False)}
                if peak[True] is not None:
                    mem += f"; step peak: {peak[True] / 2 ** 20:.1f} MB on, {peak[False] / 2 ** 20:.1f} MB off"
        set_switch(model, switch, True)
        print(f"{switch:14s} {method:9s} {what:5s} {1e3 * statistics.median(times[True]):8.1f} "
              f"{1e3 * statistics.median(times[False]):8.1f} {q[1]:7.3f}   {q[0]:.3f}-{q[2]:.3f}{mem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
