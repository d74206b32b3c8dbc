"""Compare a normfree model's signal propagation with the official reference JSON.

Reads a file written by ``official_spp.py`` (DeepMind's nfnets code, skip gains
set to 1), builds the normfree model (``normfree.create_model``) once per seed
listed there, feeds it THE SAME N(0, 1) input (the same
``numpy.random.default_rng(seed)`` draw, transposed from NHWC to NCHW), measures it
with ``normfree.measure_signal`` and prints, per block, the statistics averaged
over the seeds on both sides:

* ``var``     vs official ``avg_var``      (relative difference),
* ``res_var`` vs official ``res_avg_var``  (relative difference; both are the
  residual branch before alpha and before any skip/SkipInit gain),
* ``mean_sq`` vs official ``avg_sq_mean``  (absolute difference: it is ~0).

The weights differ (different frameworks and random streams), so only the
statistics can agree; the official seed-to-seed spread printed below the table
shows how much of a difference is noise. With ``--check`` the exit status is 1
when a relative difference exceeds ``--tol`` (default 0.10, issue 17's rule).
``--same-padding`` (diagnostic) pads normfree's strided convs and max-pools like
TensorFlow's 'SAME', as the official code does, to show how much of a gap the
padding convention explains.

Usage (from the repository root, in normfree's own .venv)::

    .venv/bin/python benchmarks/official_reference/compare_spp.py \\
        --reference tests/data/official_spp_nf_resnet50.json --model nf_resnet50 --option gain_init=1.0
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def parse_option(text: str):
    """``key=value`` -> (key, value) with value read as a number, None, true/false or a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option takes key=value, got {text!r}")
    key, raw = text.split("=", 1)
    lowered = raw.strip().lower()
    if lowered in ("none", "null"):
        return key, None
    if lowered in ("true", "false"):
        return key, lowered == "true"
    try:
        return key, int(raw)
    except ValueError:
        pass
    try:
        return key, float(raw)
    except ValueError:
        return key, raw


def emulate_same_padding(model) -> int:
    """Make every strided Conv2d / MaxPool2d of ``model`` pad like TensorFlow's 'SAME'
    (what the official Haiku code uses): total padding max((ceil(n/s) - 1) s + k - n, 0)
    per spatial dim, the odd pixel at the bottom/right (PyTorch's ``padding=k//2`` pads
    both sides). Done with forward pre-hooks that pad the input (zeros for convs, -inf
    for max-pools) and ``padding=0`` on the module; a diagnostic, not a normfree feature.
    Returns the number of modules changed."""
    import math

    import torch
    import torch.nn.functional as F

    def same_pad(x, k, s):
        pads = []
        for n, kk, ss in zip(reversed(x.shape[2:]), reversed(k), reversed(s)):
            total = max((math.ceil(n / ss) - 1) * ss + kk - n, 0)
            pads += [total // 2, total - total // 2]
        return pads

    changed = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and max(m.stride) > 1:
            k, s = m.kernel_size, m.stride
            m.padding = (0, 0)
            m.register_forward_pre_hook(
                lambda mod, args, kwargs, k=k, s=s: ((F.pad(args[0], same_pad(args[0], k, s)),) + args[1:], kwargs),
                with_kwargs=True)
            changed += 1
        elif isinstance(m, torch.nn.MaxPool2d):
            k = (m.kernel_size,) * 2 if isinstance(m.kernel_size, int) else m.kernel_size
            s = (m.stride,) * 2 if isinstance(m.stride, int) else m.stride
            m.padding = 0
            m.register_forward_pre_hook(
                lambda mod, args, k=k, s=s: (F.pad(args[0], same_pad(args[0], k, s), value=float("-inf")),))
            changed += 1
    return changed


def measure(model_name: str, options: dict, seeds, shape_nhwc, threads: int, same_padding: bool = False):
    import torch
    import normfree

    torch.set_num_threads(threads)
    per_seed = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = normfree.create_model(model_name, num_classes=1000, **options)
        model.eval()
        if same_padding:
            n = emulate_same_padding(model)
            if seed == seeds[0]:
                print(f"TF-SAME padding emulated on {n} strided convs / max-pools")
        x = np.random.default_rng(seed).standard_normal(tuple(shape_nhwc), dtype=np.float32)
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        with torch.no_grad():
            stats = normfree.measure_signal(model, x)
        per_seed.append([(s.var, s.res_var, s.mean_sq) for s in stats])
        print(f"normfree {model_name} seed {seed}: {len(stats)} blocks measured", flush=True)
    return np.array(per_seed, dtype=float)  # (seeds, blocks, 3)


def compare(ref: dict, ours: np.ndarray, tol: float):
    off = np.array([[[b["avg_var"], b["res_avg_var"], b["avg_sq_mean"]] for b in r["blocks"]] for r in ref["runs"]])
    if off.shape[1] != ours.shape[1]:
        raise SystemExit(f"block counts differ: official {off.shape[1]}, normfree {ours.shape[1]}; "
                         "the architectures do not match")
    o, n = off.mean(0), ours.mean(0)
    rel_var = (n[:, 0] - o[:, 0]) / o[:, 0]
    rel_res = (n[:, 1] - o[:, 1]) / o[:, 1]
    abs_msq = n[:, 2] - o[:, 2]
    spread = (off.max(0) - off.min(0)) / off.mean(0)  # official seed-to-seed relative range
    print("\nblock  var(off)  var(nf)   rel     res(off)  res(nf)   rel     sqmean(off) sqmean(nf)")
    for i in range(len(o)):
        print(f"{i + 1:5d}  {o[i, 0]:8.4f}  {n[i, 0]:8.4f}  {rel_var[i]:+6.1%}  {o[i, 1]:8.4f}  {n[i, 1]:8.4f}  "
              f"{rel_res[i]:+6.1%}  {o[i, 2]:10.2e}  {n[i, 2]:10.2e}")
    summary = {
        "var_max_abs_rel_diff": float(np.abs(rel_var).max()),
        "var_at_block": int(np.abs(rel_var).argmax()) + 1,
        "res_var_max_abs_rel_diff": float(np.abs(rel_res).max()),
        "res_var_at_block": int(np.abs(rel_res).argmax()) + 1,
        "mean_sq_max_abs_diff": float(np.abs(abs_msq).max()),
        "official_seed_range_var_max": float(spread[:, 0].max()),
        "official_seed_range_res_var_max": float(spread[:, 1].max()),
        "tolerance": tol,
    }
    summary["within_tolerance"] = bool(summary["var_max_abs_rel_diff"] <= tol
                                       and summary["res_var_max_abs_rel_diff"] <= tol)
    print(f"\nmax |rel diff| var {summary['var_max_abs_rel_diff']:.1%} (block {summary['var_at_block']}), "
          f"res_var {summary['res_var_max_abs_rel_diff']:.1%} (block {summary['res_var_at_block']}); "
          f"max |diff| mean_sq {summary['mean_sq_max_abs_diff']:.2e}")
    print(f"official seed-to-seed range (max over blocks): var {summary['official_seed_range_var_max']:.1%}, "
          f"res_var {summary['official_seed_range_res_var_max']:.1%}")
    print(f"{'WITHIN' if summary['within_tolerance'] else 'OUTSIDE'} the {tol:.0%} tolerance")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", default="tests/data/official_spp_nf_resnet50.json",
                   help="JSON written by official_spp.py")
    p.add_argument("--model", default="nf_resnet50", help="normfree model name (normfree.list_models())")
    p.add_argument("--option", action="append", type=parse_option, default=[],
                   help="create_model keyword as key=value, repeatable (e.g. gain_init=1.0)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: those of the reference)")
    p.add_argument("--tol", type=float, default=0.10, help="relative tolerance for var and res_var")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--check", action="store_true", help="exit 1 when outside the tolerance")
    p.add_argument("--same-padding", action="store_true",
                   help="diagnostic: pad strided convs and max-pools like TF 'SAME' (as the official code)")
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    with open(args.reference) as f:
        ref = json.load(f)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ref["setup"]["seeds"]
    missing = [s for s in seeds if s not in ref["setup"]["seeds"]]
    if missing:
        p.error(f"--seeds {missing} not in the reference's seeds {ref['setup']['seeds']}")
    ref = {**ref, "runs": [r for r in ref["runs"] if r["seed"] in seeds]}
    options = dict(args.option)
    print(f"reference: {args.reference} (official {ref['official']['class']}, input "
          f"{ref['setup']['input_shape_nhwc']} NHWC, seeds {seeds}); normfree: {args.model} {options}")
    ours = measure(args.model, options, seeds, ref["setup"]["input_shape_nhwc"], args.threads, args.same_padding)
    summary = compare(ref, ours, args.tol)
    summary.update(model=args.model, options=options, reference=args.reference, seeds=seeds,
                   same_padding=args.same_padding)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if args.check and not summary["within_tolerance"] else 0


if __name__ == "__main__":
    sys.exit(main())
