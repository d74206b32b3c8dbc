"""Where NF's training-time cost goes, and what batching the weight standardization buys.

    .venv/bin/python benchmarks/bench_ws.py [--arch wrn16_1|wrn16_4|resnet50|quick] [--reps 9]
                                            [--threads 1] [--wall]

Issue 16 asks whether NF's gap to ``none`` is the per-layer overhead of
standardizing each weight in its own autograd node, and whether standardizing
all of a model's WS weights in one batched computation would close it. This
script measures both, in one process, round-robin (the order rotates each
round), medians; by default on one intra-op thread in CPU time
(``time.process_time``), which other processes on a shared machine disturb
little (with two OpenMP threads on a loaded 2-core VM, wall-clock times of
these small steps were dominated by threads waiting for each other); ``--wall``
for wall-clock time:

1. Training steps (forward, backward, SGD at lr 0) of ``none``, ``nf`` and
   ``nf`` with ``conv_bias=False`` (``nf-bias``): the gap nf - none in ms, and
   the part of it that the convolution biases cost (their forward add and the
   backward's reduction of each conv's output gradient, an activation-sized pass).
2. The standardization alone, forward and ONE backward over all of the
   model's WS convolutions, as inside a training step (weight, gain and the
   scales a block folds in), three ways:

   * ``per-conv``: what the model does, one ``_ScaledStdWeight`` node per conv;
   * ``batched``: one autograd node for the whole model: the weights grouped by
     fan-in, each group stacked into one (rows, fan_in) matrix, standardized
     with one set of row reductions, and split back (the multi-tensor idea of
     fused optimizers, with the stacking copy it needs while the parameters
     live in separate tensors);
   * ``reference``: the same formula as plain autograd ops per conv (mean,
     centring, norm, rsqrt, multiply), the chain the hand-written node replaced.

The batched node is checked against per-conv for equal outputs and gradients
before timing (to float rounding: the reductions run over the same rows).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import normfree  # noqa: E402
from normfree.layers import _rows, _standardize  # noqa: E402

SIZES = {  # arch: (model arch, create_model kwargs, resolution, batch)
    "wrn16_1": ("wrn", dict(depth=16, width=1, num_classes=10), 32, 128),
    "wrn16_4": ("wrn", dict(depth=16, width=4, num_classes=10), 32, 64),
    "resnet50": ("resnet50", dict(num_classes=1000), 128, 16),
    "quick": ("wrn", dict(depth=10, width=1, num_classes=10), 16, 8),
}
IN_SCALE, OUT_SCALE = 1.5, 0.5  # as in a block: NF's gamma/beta in, alpha out (any numbers time alike)


class _BatchedWS(torch.autograd.Function):
    """Scaled WS of many convolutions in one node: W_hat_i = m (W_i - mean) r per
    output channel (r = 1/sqrt(max(N var, eps))), m = gain x const; inputs are
    the weights then the gains; groups of equal fan-in share one stacked matrix."""

    @staticmethod
    def forward(ctx, groups, const, eps, *tensors):
        n = len(tensors) // 2
        weights, gains = tensors[:n], tensors[n:]
        outs = [None] * n
        saved = []
        for idx in groups:
            w = torch.cat([_rows(weights[i]) for i in idx])  # (rows, fan_in): the stacking copy
            m = torch.cat([gains[i].reshape(-1, 1) for i in idx]) * const
            c, mu, r, q = _standardize(w, eps)
            c.mul_(r * m)
            start = 0
            for i in idx:
                rows = weights[i].shape[0]
                outs[i] = c[start:start + rows].view(weights[i].shape)
                start += rows
            saved += [w, m, mu, r, (q >= eps).to(w.dtype)]
        ctx.groups, ctx.const, ctx.shapes = groups, const, [w.shape for w in weights]
        ctx.gain_shapes = [g.shape for g in gains]
        ctx.save_for_backward(*saved)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        n = len(grads)
        grad_w, grad_g = [None] * n, [None] * n
        saved = ctx.saved_tensors
        for k, idx in enumerate(ctx.groups):
            w, m, mu, r, free = saved[5 * k:5 * k + 5]
            g = torch.cat([grads[i].reshape(ctx.shapes[i][0], -1) for i in idx])
            gsum = g.sum(dim=1, keepdim=True)
            d = torch.addcmul((g * w).sum(dim=1, keepdim=True), mu, gsum, value=-1.0).mul_(r)
            rm = r * m
            kc = (rm * r * d).mul_(free).neg_()
            c0 = torch.addcmul(kc * mu, rm, gsum, value=1.0 / w.shape[1]).neg_()
            gw = torch.addcmul(c0, g, rm).addcmul_(w, kc)
            dg = d * ctx.const
            start = 0
            for i in idx:
                rows = ctx.shapes[i][0]
                grad_w[i] = gw[start:start + rows].view(ctx.shapes[i])
                grad_g[i] = dg[start:start + rows].reshape(ctx.gain_shapes[i])
                start += rows
        return (None, None, None, *grad_w, *grad_g)


def batched_standardize(convs) -> List[torch.Tensor]:
    by_fan_in = defaultdict(list)
    for i, c in enumerate(convs):
        by_fan_in[c.weight[0].numel()].append(i)
    eps = convs[0].eps
    return _BatchedWS.apply(list(by_fan_in.values()), IN_SCALE * OUT_SCALE, eps,
                            *[c.weight for c in convs], *[c.gain for c in convs])


def per_conv_standardize(convs) -> List[torch.Tensor]:
    return [c.folded_weight_bias(in_scale=IN_SCALE, out_scale=OUT_SCALE)[0] for c in convs]


def reference_standardize(convs) -> List[torch.Tensor]:
    out = []
    for c in convs:
        w = c.weight.reshape(c.weight.shape[0], -1)
        cen = w - w.mean(dim=1, keepdim=True)
        r = torch.rsqrt(torch.clamp(cen.square().sum(dim=1, keepdim=True), min=c.eps))
        out.append((cen * r * (c.gain.reshape(-1, 1) * (IN_SCALE * OUT_SCALE))).view(c.weight.shape))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="wrn16_1", choices=sorted(SIZES))
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--wall", action="store_true", help="wall-clock instead of CPU time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    name, kw, res, batch = SIZES[args.arch]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, res, res)
    y = torch.randint(0, kw["num_classes"], (batch,))
    models = {"none": normfree.create_model(f"none_{name}", **kw),
              "nf": normfree.create_model(f"nf_{name}", **kw),
              "nf-bias": normfree.create_model(f"nf_{name}", conv_bias=False, **kw)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9) for k, m in models.items()}
    convs = [m for m in models["nf"].modules() if isinstance(m, normfree.ScaledStdConv2d)]
    grads = [torch.randn_like(c.weight) for c in convs]

    def train(k):
        def run():
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(models[k](x), y).backward()
            opts[k].step()
        return run

    def ws(fn):
        def run():
            torch.autograd.backward(fn(convs), grads)
        return run

    # exactness of the batched node against the model's own, before any timing
    for c in convs:
        c.weight.grad = c.gain.grad = None
    ref = [w.detach() for w in per_conv_standardize(convs)]
    ws(per_conv_standardize)()
    ref_g = [(c.weight.grad.clone(), c.gain.grad.clone()) for c in convs]
    for c in convs:
        c.weight.grad = c.gain.grad = None
    got = [w.detach() for w in batched_standardize(convs)]
    ws(batched_standardize)()
    for a, b, c, (gw, gg) in zip(ref, got, convs, ref_g):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.weight.grad, gw, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c.gain.grad, gg, rtol=1e-4, atol=1e-6)

    jobs = {"step none": train("none"), "step nf": train("nf"), "step nf-bias": train("nf-bias"),
            "WS per-conv": ws(per_conv_standardize), "WS batched": ws(batched_standardize),
            "WS reference": ws(reference_standardize)}
    times = defaultdict(list)
    keys = list(jobs)
    for rep in range(args.reps + 1):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for k in order:
            t = clock()
            jobs[k]()
            if rep:
                times[k].append(clock() - t)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    n_w = sum(c.weight.numel() for c in convs)
    print(f"# {args.arch}: {name} {kw}, {res}x{res}, batch {batch}; {len(convs)} WS convs, {n_w / 1e6:.2f}M weights, "
          f"{len({c.weight[0].numel() for c in convs})} fan-in groups; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.reps} reps round-robin, median "
          f"{'wall' if args.wall else 'CPU'} ms")
    for k in keys:
        lo, hi = (1e3 * q for q in statistics.quantiles(times[k], n=4)[::2]) if len(times[k]) > 1 else (0, 0)
        print(f"{k:14s} {med[k]:8.2f} ms   (quartiles {lo:.2f}-{hi:.2f})")
    gap = med["step nf"] - med["step none"]
    paired = statistics.median(a / b for a, b in zip(times["step none"], times["step nf"]))
    print(f"nf - none: {gap:.1f} ms per step (nf {paired:.3f}x none, paired per round); "
          f"conv biases (nf - nf-bias): {med['step nf'] - med['step nf-bias']:.1f} ms; "
          f"WS per-conv alone {med['WS per-conv']:.1f} ms, batched {med['WS batched']:.1f} ms "
          f"(batched saves {med['WS per-conv'] - med['WS batched']:.1f} ms = "
          f"{100 * (med['WS per-conv'] - med['WS batched']) / med['step nf']:.1f}% of the nf step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
