"""Signal-propagation reference numbers from DeepMind's official ``nfnets`` code.

Runs in a SEPARATE environment (JAX + Haiku, no torch), against a local copy of
the ``nfnets/`` folder of the GitHub repository google-deepmind/deepmind-research; the
official code is NOT part of normfree and is never copied into it.

What it does, per model (``nfnet_f0`` .. ``nfnet_f7``, ``nf_resnet50``,
``nf_regnet_b0``), per seed:

1. builds the official model with its default constructor arguments
   (``nfnet.NFNet``, ``nf_resnet.NF_ResNet``, ``nf_regnet.NF_RegNet``; the
   few arguments we must pass are recorded in the JSON: NF_ResNet has no
   default ``drop_rate``, NF_RegNet's default activation name ``'swish'`` is
   missing from ``base.nonlinearities``, so we pass ``'silu'`` as its
   experiment config ``experiment_nf_regnets.py`` does),
2. initializes it with ``hk.transform(...).init(PRNGKey(seed), x)``,
3. sets every residual block's SkipInit gain (the scalar parameter named
   ``skip_gain``, initialized to 0 by the official code) to 1, as the papers'
   SPPs do; the number of such parameters is checked to equal the number of
   blocks,
4. feeds N(0, 1) noise drawn with ``numpy.random.default_rng(seed)``
   (float32, NHWC; a PyTorch script can draw the same numbers and transpose to
   NCHW), with ``is_training=False`` (no stochastic depth, no dropout: the
   models have no other train/test difference) and ``return_metrics=True``.

The statistics come from the official code's own metrics facility
(``return_metrics=True``; ``base.signal_metrics`` and the ``res_avg_var``
returned by each block's ``__call__``), so nothing inside the models is hooked.
Per channel c the mean/variance is over batch and spatial positions (axes N,
H, W of the NHWC tensor, population variance, ``jnp.var``), then averaged
over channels:

* ``avg_sq_mean`` = mean_c (mean_{n,h,w} x)^2 of a block's OUTPUT,
* ``avg_var``     = mean_c var_{n,h,w} x of a block's OUTPUT,
* ``res_avg_var`` = mean_c var_{n,h,w} f of the residual branch f: for
  NFNet the output of the last 1x1 conv times 2*sigmoid(SE) (after the
  squeeze-excite rescaling), for NF-ResNet the output of the last 1x1 conv,
  for NF-RegNet the output of the last 1x1 conv (its SE sits before that
  conv); in all three BEFORE stochastic depth, BEFORE the skip gain and BEFORE
  alpha, i.e. before anything scales the branch and before the addition.
  With the skip gain at 1 the branch adds alpha^2 * res_avg_var to the output.

Block ``index`` is 1-based (block 1 is the first residual block); ``stem``
holds the same two statistics for the stem output (the input of block 1).
Per block the JSON also records what the official module computed for it
(channels, stride, beta = 1/sqrt(expected variance of the input), alpha,
bottleneck width, groups, projection shortcut), and the JSON records the
shapes of all parameters, so an implementation can check its layout.

Environment that worked (CPU only), outside the normfree repository::

    python3.11 -m venv /work/scratch/jaxenv
    /work/scratch/jaxenv/bin/pip install "jax[cpu]" dm-haiku numpy
    # worked with: Python 3.11.7, jax 0.10.2, jaxlib 0.10.2, dm-haiku 0.0.17, numpy 2.4.6

Official code: deepmind-research at commit
f5de0ede8430809180254ee957abf36ed62579ef (nfnets/ last changed in
6fcb84268e74af981ae1496bfc2cb9ba9d701ef2); the sha256 of each official file
used is written to the JSON.

Usage (``OFFICIAL`` is the folder that CONTAINS ``nfnets/``, or ``nfnets/``
itself)::

    nice -n 10 /work/scratch/jaxenv/bin/python benchmarks/official_reference/official_spp.py \\
        --official /work/scratch/nfnets_official --model nfnet_f0 --size 192 --batch 8 \\
        --seeds 0,1,2 --out tests/data/official_spp_nfnet_f0.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

# model name -> (official module, class, variant, default input size)
MODELS = {
    **{f"nfnet_f{i}": ("nfnet", "NFNet", f"F{i}", None) for i in range(8)},
    "nf_resnet50": ("nf_resnet", "NF_ResNet", "ResNet50", 224),
    "nf_regnet_b0": ("nf_regnet", "NF_RegNet", "B0", None),
}
# arguments we must pass because the official defaults do not run (see module doc)
REQUIRED_KWARGS = {
    "NF_ResNet": {"drop_rate": 0.0},
    "NF_RegNet": {"activation": "silu"},
}
OFFICIAL_FILES = ("base.py", "nfnet.py", "nf_resnet.py", "nf_regnet.py")

STATISTICS = {
    "avg_sq_mean": "mean over channels of (mean over batch, height, width of the block output)^2",
    "avg_var": "mean over channels of the population variance over batch, height, width of the block output",
    "res_avg_var": ("mean over channels of the population variance over batch, height, width of the residual "
                    "branch output, before stochastic depth, skip gain and alpha (NFNet: after the 2*sigmoid "
                    "squeeze-excite rescaling; NF-ResNet/NF-RegNet: output of the last 1x1 conv)"),
}


def find_official(path: str) -> str:
    """The folder to put on sys.path: the one that contains ``nfnets/``."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "nfnet.py")):
        path = os.path.dirname(path)
    if not os.path.isfile(os.path.join(path, "nfnets", "nfnet.py")):
        raise SystemExit(f"--official {path!r}: no nfnets/nfnet.py there; give the folder that contains "
                         "the official nfnets/ package (or that package itself)")
    return path


def official_commit(path: str, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout; pass --official-commit)"


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def block_record(block) -> dict:
    """What the official block module computed at construction (read from its attributes)."""
    rec = {
        "in_ch": int(block.in_ch),
        "out_ch": int(block.out_ch),
        "stride": int(block.stride),
        "beta": float(block.beta),
        "expected_var_in": float(1.0 / block.beta ** 2),
        "alpha": float(block.alpha),
        "width": int(block.width),
        "groups": int(getattr(block, "groups", 1)),
        "use_projection": bool(block.use_projection),
    }
    sd = getattr(block, "stoch_depth", None)
    rec["stochdepth_rate"] = float(sd.drop_rate) if sd is not None else 0.0
    return rec


def run(args) -> dict:
    import haiku as hk
    import jax
    import jax.numpy as jnp

    root = find_official(args.official)
    sys.path.insert(0, root)
    module_name, class_name, variant, default_size = MODELS[args.model]
    module = __import__(f"nfnets.{module_name}", fromlist=[class_name])
    model_cls = getattr(module, class_name)
    kwargs = {"num_classes": 1000, "variant": variant, **REQUIRED_KWARGS.get(class_name, {})}
    variant_info = dict(model_cls.variant_dict[variant])
    size = args.size or default_size or variant_info["train_imsize"]

    blocks_info: list = []

    def forward(x):
        net = model_cls(**kwargs)
        out = net(x, is_training=False, return_metrics=True)
        if not blocks_info:  # read once, while tracing
            blocks_info.extend(block_record(b) for b in net.blocks)
        return {k: v for k, v in out.items() if k not in ("pool", "logits")}

    net = hk.without_apply_rng(hk.transform(forward))
    init = jax.jit(net.init)
    apply = jax.jit(net.apply)

    runs = []
    for seed in args.seeds:
        t0 = time.time()
        x = np.random.default_rng(seed).standard_normal((args.batch, size, size, 3), dtype=np.float32)
        params = init(jax.random.PRNGKey(seed), x[:1])
        n_gains = 0

        def set_gain(module_path, name, value):
            nonlocal n_gains
            if name == "skip_gain":
                n_gains += 1
                return jnp.ones_like(value)
            return value

        params = hk.data_structures.map(set_gain, params)
        if n_gains != len(blocks_info):
            raise RuntimeError(f"found {n_gains} skip_gain parameters for {len(blocks_info)} blocks")
        metrics = jax.device_get(apply(params, x))
        blocks = []
        for i, info in enumerate(blocks_info):
            blocks.append({
                "index": i + 1,
                "avg_sq_mean": float(metrics[f"avg_sq_mean_{i + 1}"]),
                "avg_var": float(metrics[f"avg_var_{i + 1}"]),
                "res_avg_var": float(metrics[f"res_avg_var_{i}"]),
            })
        runs.append({
            "seed": seed,
            "seconds": round(time.time() - t0, 1),
            "stem": {"avg_sq_mean": float(metrics["avg_sq_mean_0"]), "avg_var": float(metrics["avg_var_0"])},
            "blocks": blocks,
        })
        print(f"seed {seed}: {len(blocks)} blocks in {runs[-1]['seconds']} s", flush=True)

    param_shapes = {f"{m}/{n}": list(v.shape) for m, d in params.items() for n, v in d.items()}
    result = {
        "model": args.model,
        "official": {
            "repository": "google-deepmind/deepmind-research (folder nfnets/)",
            "commit": official_commit(root, args.official_commit),
            "class": f"nfnets.{module_name}.{class_name}",
            "constructor_kwargs": kwargs,
            "variant_params": variant_info,
            "file_sha256": {f: sha256(os.path.join(root, "nfnets", f)) for f in OFFICIAL_FILES},
        },
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": __import__("jaxlib").__version__,
            "dm-haiku": hk.__version__,
            "numpy": np.__version__,
            "backend": jax.default_backend(),
        },
        "setup": {
            "input": "N(0,1) noise, numpy.random.default_rng(seed).standard_normal(shape, dtype=float32), NHWC",
            "input_shape_nhwc": [args.batch, size, size, 3],
            "seeds": list(args.seeds),
            "seed_meaning": "seed of both the parameter init (jax.random.PRNGKey) and the input noise",
            "skip_gain": 1.0,
            "is_training": False,
            "note": "is_training=False: no stochastic depth, no dropout (nothing else differs at initialization)",
        },
        "statistics": STATISTICS,
        "index": "blocks[].index is 1-based; 'stem' is the stem output = input of block 1",
        "num_params": int(sum(int(np.prod(s)) for s in param_shapes.values())),
        "block_config": [{"index": i + 1, **b} for i, b in enumerate(blocks_info)],
        "runs": runs,
    }
    result["mean_over_seeds"] = mean_over_seeds(runs)
    result["seed_variation"] = seed_variation(runs)
    result["param_shapes"] = param_shapes
    return result


def mean_over_seeds(runs) -> dict:
    keys = ("avg_sq_mean", "avg_var", "res_avg_var")
    blocks = []
    for i in range(len(runs[0]["blocks"])):
        row = {"index": i + 1}
        for k in keys:
            row[k] = float(np.mean([r["blocks"][i][k] for r in runs]))
        blocks.append(row)
    return {"stem": {k: float(np.mean([r["stem"][k] for r in runs])) for k in ("avg_sq_mean", "avg_var")},
            "blocks": blocks}


def seed_variation(runs) -> dict:
    """How much the statistics move between seeds: per statistic the largest
    (max - min) / mean and sample std / mean over the seeds, per block, then
    the max and median over blocks; for avg_sq_mean, which is ~0, also the
    largest absolute value."""
    if len(runs) < 2:
        return {}
    out = {}
    for k in ("avg_var", "res_avg_var", "avg_sq_mean"):
        rel, cv = [], []
        for i in range(len(runs[0]["blocks"])):
            v = np.array([r["blocks"][i][k] for r in runs])
            rel.append(float((v.max() - v.min()) / abs(v.mean())) if v.mean() else 0.0)
            cv.append(float(v.std(ddof=1) / abs(v.mean())) if v.mean() else 0.0)
        worst = int(np.argmax(rel))
        out[k] = {"max_rel_range": rel[worst], "at_block": worst + 1, "median_rel_range": float(np.median(rel)),
                  "max_rel_std": float(max(cv)), "median_rel_std": float(np.median(cv))}
    out["avg_sq_mean"]["max_abs"] = float(max(r["blocks"][i]["avg_sq_mean"] for r in runs
                                             for i in range(len(r["blocks"]))))
    out["definition"] = ("per block over the seeds: rel range = (max - min) / mean, rel std = sample std (ddof=1) "
                         "/ mean; max and median of these over blocks")
    return out


def print_table(result) -> None:
    runs = result["runs"]
    print(f"\n{result['model']}: input {result['setup']['input_shape_nhwc']} (NHWC), seeds "
          f"{result['setup']['seeds']}, skip gains = 1, {result['num_params']} parameters")
    head = "block  expVar_in  " + "  ".join(f"var[s{r['seed']}]  res[s{r['seed']}]" for r in runs) + "  sqmean[s0]"
    print(head)
    for i, cfg in enumerate(result["block_config"]):
        cols = "  ".join(f"{r['blocks'][i]['avg_var']:8.4f}  {r['blocks'][i]['res_avg_var']:8.4f}" for r in runs)
        print(f"{i + 1:5d}  {cfg['expected_var_in']:9.4f}  {cols}  {runs[0]['blocks'][i]['avg_sq_mean']:.2e}")
    for k, v in result["seed_variation"].items():
        if k != "definition":
            print(f"seed variation {k}: {v}")


def count_params(args) -> dict:
    """Parameter counts of every model in MODELS (and the wider F0+..F7+),
    from shapes only (``jax.eval_shape``: nothing is computed)."""
    import haiku as hk
    import jax

    sys.path.insert(0, find_official(args.official))
    from nfnets import nf_regnet, nf_resnet, nfnet

    specs = {f"nfnet_{v.lower().replace('+', 'plus')}": (nfnet.NFNet, v) for v in nfnet.NFNet.variant_dict}
    specs.update({f"nf_{v.lower()}": (nf_resnet.NF_ResNet, v) for v in nf_resnet.NF_ResNet.variant_dict})
    specs.update({f"nf_regnet_{v.lower()}": (nf_regnet.NF_RegNet, v) for v in nf_regnet.NF_RegNet.variant_dict})
    counts = {}
    for name, (cls, variant) in specs.items():
        kwargs = {"num_classes": 1000, "variant": variant, **REQUIRED_KWARGS.get(cls.__name__, {})}
        net = hk.transform(lambda x, cls=cls, kwargs=kwargs: cls(**kwargs)(x, is_training=False)["logits"])
        x = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
        shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
        counts[name] = int(sum(int(np.prod(v.shape)) for d in shapes.values() for v in d.values()))
        print(f"{name:18s} {counts[name]:>12,d}")
    return {"num_classes": 1000, "constructor": "official defaults (plus REQUIRED_KWARGS)",
            "official_commit": official_commit(find_official(args.official), args.official_commit),
            "num_params": counts}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True,
                   help="folder that contains the official nfnets/ package (or nfnets/ itself)")
    p.add_argument("--official-commit", default=None,
                   help="commit of the official code, recorded in the JSON (default: git rev-parse there)")
    p.add_argument("--model", choices=sorted(MODELS), help="model to measure (required unless --count-params)")
    p.add_argument("--count-params", action="store_true",
                   help="instead: print the parameter count of every official variant (from shapes only)")
    p.add_argument("--size", type=int, default=None,
                   help="input height = width (default: the variant's train_imsize; 224 for nf_resnet50)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (init and input), e.g. 0,1,2")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if not args.model and not args.count_params:
        p.error("give --model (or --count-params)")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        p.error("--seeds is empty")
    if args.batch < 1 or (args.size is not None and args.size < 32):
        p.error(f"--batch must be >= 1 and --size >= 32, got batch={args.batch}, size={args.size}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.count_params:
        result = count_params(args)
    else:
        result = run(args)
        print_table(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
