"""The ``normfree`` command line: ``normfree <command> --help`` for each command.

Each command is an ``add_<name>(subparsers)`` function below that declares
its arguments and sets ``func`` to the code that runs it. Nothing in the
package imports this module.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
from typing import Callable, List, Optional

#: what the user sees for an OSError, by errno: "<problem>: <path>"
OS_PROBLEMS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or limit",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "not a directory (a part of the path is a file)",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EIO: "input/output error",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.EBUSY: "device or resource busy",
    errno.ENODEV: "no such device",
    errno.ENXIO: "no such device or address",
}


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the problem in words and the path it concerns."""
    problem = OS_PROBLEMS.get(e.errno)
    custom = e.strerror and e.errno is not None and e.strerror != os.strerror(e.errno)
    if problem is None or custom:
        problem = e.strerror or str(e)
    if e.errno is None and not e.filename:
        return str(e)  # an error raised with a message of its own
    where = f": {e.filename}" if e.filename else ""
    if getattr(e, "filename2", None):
        where += f" -> {e.filename2}"
    kept = " (the previous version of that file is kept)" if getattr(e, "previous_kept", False) else ""
    return f"{problem}{where}{kept}"


def describe_error(e: BaseException) -> Optional[str]:
    """The one-line message for an error a user can cause (bad input, a file
    that cannot be read or written, memory), None for anything else (a bug:
    let it show its traceback)."""
    from .train import RunDirBusy

    if isinstance(e, OSError):
        return describe_os_error(e)
    if isinstance(e, (ValueError, TypeError, RunDirBusy)):
        return str(e)
    if isinstance(e, MemoryError):
        return f"out of memory{': ' + str(e) if str(e) else ''}; try a smaller batch, model or input"
    if isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower()):
        first = str(e).strip().splitlines()[0]
        return f"out of memory ({first[:200]}); try a smaller batch, model or input"
    return None


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {text!r}")
        return v
    return parse


def float_in(lo: float, hi: float) -> Callable[[str], float]:
    """argparse type: a finite number in (lo, hi] (NaN and Inf refused)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not (math.isfinite(v) and lo < v <= hi):
            raise argparse.ArgumentTypeError(f"must be a finite number in ({lo:g}, {hi:g}], got {text!r}")
        return v
    return parse


def prepare_output(path: str) -> str:
    """Create the folder of output file ``path`` and check it can be written
    there, before any long work; returns ``path``."""
    from .atomic import check_writable

    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a directory: give a file name inside it", path)
    folder = os.path.dirname(path) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
    os.makedirs(folder, exist_ok=True)
    check_writable(folder)
    return path


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered model names",
                       description="List every <method>_<arch> model name (and the methods and architectures).")
    p.add_argument("--methods", action="store_true", help="list only the methods")

    def run(args) -> int:
        from .models import ARCHS, list_models
        from .schemes import SCHEMES

        if args.methods:
            for name, scheme in sorted(SCHEMES.items()):
                print(f"{name:10s} {scheme}")
            return 0
        print("\n".join(list_models()))
        print(f"# architectures: {', '.join(ARCHS)}; wrn depth is 6n+4 (--depth), width k (--width)",
              file=sys.stderr)
        return 0

    p.set_defaults(func=run)


def add_train(sub) -> None:
    from .train import EXIT_DIVERGED, EXIT_INTERRUPTED, add_arguments

    p = sub.add_parser(
        "train", help="train a model (SGD/AdamW, schedules, AGC, checkpoints, resume, DDP)",
        description="Train a model on a data set: a registered normfree model, or your own "
                    "(--model package.module:factory, timm:NAME, torchvision:NAME; --convert METHOD makes it "
                    "BN-free first) on built-in data or yours (--data package.module:function returning a torch "
                    "Dataset or DataLoader). Metrics (metrics.jsonl, metrics.csv), config.json, summary.json, "
                    "checkpoint.pt and model.safetensors are written inside --out (TensorBoard logs under "
                    "OUT/tb when tensorboard is installed: pip install normfree[tensorboard]). The model's "
                    "input channels and classes follow the data. Under `torchrun --nproc_per_node=N` "
                    "the same command runs DistributedDataParallel (--batch-size stays global).",
        epilog=f"exit status: 0 ok (or stopped by --stop-after-steps), 2 bad input or a file that cannot be "
               f"read or written, {EXIT_DIVERGED} diverged (NaN/Inf loss; the last good checkpoint is kept), "
               f"{EXIT_INTERRUPTED} interrupted by Ctrl-C, 143 by SIGTERM (checkpoint written, continue with "
               f"--resume). --out must be new or empty, or the run to continue; it is locked while a run uses it.")
    add_arguments(p)

    def run(args) -> int:
        from .train import config_from_args, train

        config = config_from_args(args)
        with sigterm_interrupts():
            result = train(config)
        if os.environ.get("RANK", "0") == "0":  # under torchrun: the summary once
            print(result.format())
        return EXIT_DIVERGED if result.status == "diverged" else 0

    p.set_defaults(func=run)


def add_data(sub) -> None:
    p = sub.add_parser("data", help="list the data sets, or load (and fetch) one and describe it",
                       description="Without NAME: list the data sets. With NAME: load it (with --download, "
                                   "fetch the official files first, md5-checked) and print its size, "
                                   "classes, channel statistics and default augmentation.")
    p.add_argument("name", nargs="?", help="digits (built in, the default data set), mnist, "
                                           "fashion_mnist, cifar10 or folder")
    p.add_argument("--data-dir", default=None,
                   help="where the files are or go (default ~/.cache/normfree; Fashion-MNIST is also "
                        "looked for in /usr/share/datasets/fashion-mnist)")
    p.add_argument("--download", action="store_true", help="fetch missing files from the official URLs")
    p.add_argument("--image-size", type=int_in(1, 4096), default=None, metavar="SIZE",
                   help="folder data set: resize every image to SIZE x SIZE (default: all images must "
                        "have one size)")

    def run(args) -> int:
        from .data import DATASETS, load_dataset

        if args.name is None:
            for name, text in DATASETS.items():
                print(f"{name:14s} {text}")
            return 0
        print(load_dataset(args.name, args.data_dir, args.download, image_size=args.image_size).summary())
        return 0

    p.set_defaults(func=run)


def add_spp(sub) -> None:
    p = sub.add_parser("spp", help="signal propagation plot of models at initialization",
                       description="Feed N(0,1) noise through freshly initialized models and plot, per residual "
                                   "block, the squared channel mean, the channel variance and the residual-branch "
                                   "variance (Brock et al. 2021). Writes OUT (.png and .svg), .csv/.json beside it, and "
                                   "OUT_paths (.png, .svg): residual-to-skip ratios and path lengths. NF models (nf, "
                                   "nf_he) are drawn with their SkipInit gain at 1, as in the paper's SPPs (it is 0 "
                                   "at initialization for training); their label says '(gain 1)'.")
    p.add_argument("--model", required=True,
                   help="model name, e.g. nf_resnet50 or nf_wrn (see `normfree models`), or package.module:factory, "
                        "timm:NAME, torchvision:NAME (foreign models: 10 classes, --in-chans channels)")
    p.add_argument("--convert", default=None, metavar="METHOD",
                   help="convert the --model (a foreign one) with normfree.convert first: skipinit, nf, none, gn, "
                        "ln or in; --compare models stay as they are")
    p.add_argument("--compare", nargs="*", default=[], metavar="NAME", help="more models on the same figure")
    p.add_argument("--depth", type=int_in(1, 20_000), default=None, help="WRN depth 6n+4 (default 16)")
    p.add_argument("--width", type=float_in(0, 100), default=None, help="WRN width k / ResNet channel multiplier")
    p.add_argument("--batch", type=int_in(1, 65536), default=None,
                   help="noise samples (default 256 for wrn, 8 for resnetNN)")
    p.add_argument("--resolution", type=int_in(1, 4096), default=None,
                   help="input height = width (default 32 for wrn, 128 for resnetNN)")
    p.add_argument("--in-chans", type=int_in(1, 4096), default=3, help="input channels (default 3)")
    p.add_argument("--chunk", type=int_in(1, 65536), default=None, help="samples per forward pass (default: auto)")
    p.add_argument("--seed", type=int_in(0, 2 ** 62 - 1), default=0, help="seed of the weights and of the noise")
    p.add_argument("--out", default="spp.png", help="figure path; .csv and .json are written beside it")
    p.add_argument("--nf-gain", type=float_in(-100, 100), default=1.0,
                   help="SkipInit gain of NF models in the plot (default 1, as in the paper's SPPs)")
    p.add_argument("--grads", action="store_true",
                   help="also measure per-block gradient norms (cross-entropy, random labels): OUT_grads")

    def run(args) -> int:
        import os

        from .factory import check_model_names, compare_specs
        from .plots import plot_gradients, plot_paths, plot_spp
        from .signal import format_table, write_csv, write_json

        names = [args.model] + list(args.compare)
        check_model_names(names, depth=args.depth, width=args.width, convert={0: args.convert})
        prepare_output(args.out if args.out.lower().endswith((".png", ".svg")) else args.out + ".png")
        specs = [(args.model, args.convert)] + [(name, None) for name in args.compare]
        results, preds = compare_specs(specs, batch=args.batch, resolution=args.resolution,
                                       in_chans=args.in_chans, chunk_size=args.chunk, seed=args.seed,
                                       depth=args.depth, width=args.width, grads=args.grads,
                                       nf_gain=args.nf_gain)
        stem = os.path.splitext(args.out)[0] if args.out.lower().endswith((".png", ".svg")) else args.out
        figs = plot_spp(results, stem + ".png", predictions=preds)
        figs += plot_paths(results, stem + "_paths.png")
        if args.grads:
            figs += plot_gradients({k: v.grads for k, v in results.items()}, stem + "_grads.png")
        meta = {k: getattr(args, k) for k in ("depth", "width", "batch", "resolution", "in_chans", "chunk", "seed",
                                              "nf_gain", "convert")}
        files = figs + [write_csv(results, stem + ".csv", preds), write_json(results, stem + ".json", preds, meta)]
        print(format_table(results, preds))
        if any(getattr(st, "nf_gain", None) is not None for st in results.values()):
            print(f"NF models drawn with their SkipInit gain at {args.nf_gain:g} (paper's SPP convention; "
                  f"0 at initialization for training)")
        print("wrote " + ", ".join(files))
        return 0

    p.set_defaults(func=run)


def add_study(sub) -> None:
    from .study import EXPERIMENTS, PRESET_TEXT

    p = sub.add_parser(
        "study", help="reproduce the papers' claims and write a report (the main job)",
        description="Run the experiments behind the papers' claims (signal propagation at 1,000 layers, "
                    "trainability against depth, batch size x learning rate, accuracy at an equal budget, shallow "
                    "paths and lesions, AGC) and write OUT/report.md, a self-contained OUT/report.html and "
                    "OUT/claims.json. Every verdict (holds / does not hold / inconclusive) is computed by the rule "
                    "printed beside it, over several seeds. Finished runs are kept in OUT/runs/ and checked before "
                    "reuse, so an interrupted study restarted with the same --out continues. Ctrl-C or SIGTERM stops "
                    "every worker process.",
        epilog="presets: " + "; ".join(f"{k}: {v}" for k, v in PRESET_TEXT.items()) +
               ". `normfree study --sizes` lists every size knob for --set.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="preset", const="quick",
                      help="the same pipeline at tiny sizes: a smoke test (used by the tests); no evidence")
    size.add_argument("--cifar10", action="store_const", dest="preset", const="cifar10",
                      help="the CIFAR-10 preset (also chosen by --data cifar10): about 1h30m on 2 CPU cores "
                           "(measured: 1h32m from a fresh clone; --plan estimates 1h27m); "
                           "needs --data-dir DIR holding cifar-10-batches-py, or --download")
    size.add_argument("--full", action="store_const", dest="preset", const="full",
                      help="the papers' scale: CIFAR-10 (needs --data-dir or --download), WRN up to depth 1000; "
                           "meant for a GPU")
    p.set_defaults(preset="default")
    p.add_argument("--out", default="runs/study", help="output directory (default: runs/study)")
    p.add_argument("--data", default=None,
                   help="data set (default: the preset's: digits; cifar10 for --cifar10 and --full)")
    p.add_argument("--data-dir", default=None, help="directory holding the data set files (default ~/.cache/normfree)")
    p.add_argument("--download", action="store_true",
                   help="fetch the data set's official files into --data-dir first if they are missing (md5-checked)")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS),
                   help=f"comma-separated subset of {','.join(EXPERIMENTS)} (default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed (default 0); an experiment with n seeds uses seed .. seed+n-1")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel worker processes (default: CPU cores, at most 4; 1 on a GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--max-train-examples", type=int, default=None,
                   help="train on a seeded subset of this size (same as --set max_train_examples=N)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a size of the preset (repeatable), e.g. --set depths=10,34,100 "
                        "--set depth_steps=300; `--sizes` lists the keys, their allowed values and presets")
    p.add_argument("--sizes", action="store_true", help="list every size knob (for --set) and exit")
    p.add_argument("--plan", action="store_true",
                   help="print the runs and their share of the work; run nothing (the data need not be on disk)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args) -> int:
        from .study import KNOBS, knob_table, parse_size_overrides, run_study

        if args.sizes:
            print(knob_table(KNOBS))
            return 0
        extra = parse_size_overrides(args.set)
        if args.max_train_examples is not None:
            if "max_train_examples" in extra:
                raise ValueError("max_train_examples given twice (--max-train-examples and --set)")
            extra["max_train_examples"] = KNOBS["max_train_examples"].parse("max_train_examples",
                                                                              str(args.max_train_examples))
        data = args.data
        if "data" in extra:  # --set data=NAME is the same knob as --data NAME
            if data is not None and data != extra["data"]:
                raise ValueError(f"data given twice: --data {data} and --set data={extra['data']}")
            data = extra.pop("data")
        from .study.runner import WorkerDied

        try:
            result = run_study(args.preset, args.out, data=data, data_dir=args.data_dir,
                               download=args.download,
                               experiments=[e.strip() for e in args.experiments.split(",") if e.strip()],
                               seed=args.seed, jobs=args.jobs, threads=args.threads, device=args.device,
                               progress=not args.no_progress, plan_only=args.plan, **extra)
        except WorkerDied as e:
            print(f"normfree study: error: {e}", file=sys.stderr)
            return 2
        if not args.plan:
            width = max(len(c["verdict"]) for c in result["claims"]) if result["claims"] else 0
            for c in result["claims"]:
                seeds = f"  [{c['agreement']}]" if c["agreement"] else ""
                print(f"{c['verdict']:{width}s}  {c['claim']}{seeds}")
        return 0

    p.set_defaults(func=run)


def add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a trained model as plain convolutions (a torch.export program) and as safetensors",
        description="Load a checkpoint written by `normfree train` (weights_only), fold every scalar of a "
                    "BN-free model (NF / SkipInit / Fixup / RescaleNet) into plain convolutions, check that "
                    "the result computes the same outputs, and write it as a torch.export program that runs "
                    "without normfree: torch.export.load(OUT).module()(x). x is normalized like the training "
                    "data: (pixels / 255 - mean) / std, with mean, std, input shape and classes written to "
                    "OUT with the suffix .json. Beside it, model.safetensors holds the trained (unfolded) weights "
                    "with the run's configuration as JSON metadata, for normfree.load_model and the Hugging Face "
                    "hub.")
    p.add_argument("checkpoint", help="checkpoint.pt, or the run directory (--out of normfree train) holding it")
    p.add_argument("--out", default=None, help="output file (default: model.pt2 beside the checkpoint)")
    p.add_argument("--size", type=int_in(1, 4096), nargs=2, default=None, metavar=("H", "W"),
                   help="input height and width (default: the training data's, stored in the checkpoint)")
    p.add_argument("--no-fold", action="store_true", help="export the model as it is, without folding")
    p.add_argument("--format", choices=("both", "pt2", "safetensors"), default="both",
                   help="pt2: the folded torch.export program (+ .json); safetensors: the trained weights with "
                        "their configuration as JSON metadata, loadable by normfree.load_model (default: both)")
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="package.module:factory that builds the checkpoint's architecture: needed for a model "
                        "passed to normfree.train as an object (runs of --model SPEC rebuild it by themselves)")

    def run(args) -> int:
        import json

        import torch

        from .fold import export_model
        from .atomic import write_text
        from .train import load_checkpoint, model_from_checkpoint
        from .train.weights import save_weights

        ckpt = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ckpt, factory=args.model)
        info = dict(ckpt["input"] or {})
        if args.size:
            chans = info["shape"][0] if info.get("shape") else getattr(model, "in_chans", None)
            if chans is None:
                raise ValueError("this checkpoint does not record its input channels: --size cannot be used")
            info["shape"] = [chans] + list(args.size)
        if not info.get("shape"):
            raise ValueError("this checkpoint does not record its input size: give --size H W")
        run_dir = os.path.dirname(ckpt["path"])
        default = os.path.join(run_dir, "model.pt2" if args.format != "safetensors" else "model.safetensors")
        out = prepare_output(args.out or default)
        stem = os.path.splitext(out)[0] if out.endswith((".pt2", ".safetensors")) else out
        note = unfinished_run_note(ckpt)
        if note:
            print(f"normfree export: note: {note}", file=sys.stderr)
        name = ckpt["config"]["model"] or (ckpt.get("model_info") or {}).get("class", "model")
        written = []
        if args.format in ("both", "pt2"):
            pt2 = out if args.format == "pt2" or out.endswith(".pt2") else stem + ".pt2"
            example = torch.randn(2, *info["shape"], generator=torch.Generator().manual_seed(0))
            result = export_model(model, example, pt2, fold=not args.no_fold)
            meta = {"model": name, "step": ckpt["step"], "folded": result["folded"],
                    "max_abs_diff": result["max_abs_diff"], "input": info}
            write_text(stem + ".json", json.dumps(meta, indent=2) + "\n")
            what = "folded into plain convolutions" if result["folded"] else "not folded"
            written.append(f"{pt2} ({name}, step {ckpt['step']}, {what}; max |difference| to the checkpoint's "
                           f"model {result['max_abs_diff']:.2e}) and {stem}.json")
        if args.format in ("both", "safetensors"):
            path = out if args.format == "safetensors" else stem + ".safetensors"
            save_weights(path, model, {"step": str(ckpt["step"]), "config": ckpt["config"],
                                       "model_info": ckpt.get("model_info"), "input": info})
            written.append(f"{path} (weights and configuration; normfree.load_model reads it)")
        print("wrote " + "; ".join(written))
        return 0

    p.set_defaults(func=run)


def unfinished_run_note(ckpt) -> Optional[str]:
    """Why the checkpoint may not be what the user expects to export: a run
    that did not finish (killed, interrupted, stopped) or that diverged."""
    import json

    where = os.path.dirname(ckpt["path"])
    step, total = ckpt.get("step"), ckpt.get("total_steps")
    try:
        with open(os.path.join(where, "summary.json")) as f:
            status = json.load(f).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status == "diverged":
        return (f"the run in {where} diverged; this is its last good checkpoint (step {step} of {total})")
    if isinstance(step, int) and isinstance(total, int) and 0 <= step < total:
        why = "it was stopped early" if status == "stopped" else "it was interrupted or is still running"
        return f"the run in {where} did not finish: the checkpoint is from step {step} of {total} ({why})"
    if status is None:
        return f"the run in {where} has no readable summary.json: it may not have finished"
    return None


class sigterm_interrupts:
    """While active, SIGTERM raises :class:`normfree.train.Interrupted` like
    Ctrl-C raises KeyboardInterrupt, so ``finally`` blocks and checkpoints run."""

    def __enter__(self):
        from .train import Interrupted

        def handler(signum, frame):
            raise Interrupted(signum)

        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


COMMANDS = [add_models, add_train, add_data, add_spp, add_study, add_export]


def _version() -> str:
    from . import __version__  # the one version: pyproject.toml reads it from normfree/__init__.py

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normfree",
        description="Deep residual networks without batch normalization: build, train, "
                    "measure signal propagation, reproduce the papers' claims.",
        epilog="On Linux the command keeps freed memory for reuse (glibc mallopt, see normfree.allocator): "
               "CPU training steps then reuse their activation memory instead of paging it in anew "
               "(ResNet-50 at batch 64: ~30% faster on a 2-core VM). Set NORMFREE_SYSTEM_MALLOC=1 to keep "
               "the C library's default settings.")
    parser.add_argument("--version", action="version", version=f"normfree {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .allocator import configure_from_environment

    configure_from_environment()  # the process is ours: keep freed activation memory for the next step
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        how = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
        print(f"normfree {args.command}: interrupted{how}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        # what a user can cause (bad input, unwritable or unreadable files, memory): one line, status 2
        message = describe_error(e)
        if message is None:
            raise  # a bug: keep the traceback
        print(f"normfree {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
