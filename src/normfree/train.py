"""The training loop: one function, :func:`train`, configured by :class:`TrainConfig`.

    result = train(TrainConfig(model="skipinit_wrn", depth=16, width=1, data="digits", epochs=10))

* Optimizers: SGD with (Nesterov) momentum, AdamW. Learning rate per step:
  linear warmup from lr/warmup to lr, then cosine to 0, step decay (x ``lr_gamma``
  at each of ``milestones``, fractions of the run) or constant.
* Weight decay only on conv/linear weights (``weight`` parameters with more than
  one dimension); none on gains, biases, norm parameters or scalars. Fixup's
  smaller learning rate for scalar parameters (0-dim, ScalarBias, ScalarGain):
  ``scalar_lr_mult`` (0.1 in the Fixup authors' CIFAR code).
* Optional adaptive gradient clipping (``agc=0.01``, :mod:`normfree.agc`), bf16
  autocast (``amp``), channels_last, ``torch.compile``; label smoothing;
  dropout / stochastic depth through the method options.
* Never lose work: with ``out`` set, ``out/checkpoint.pt`` is written atomically
  (temp file + ``os.replace``) every epoch, every ``checkpoint_every`` steps, at
  the end and on Ctrl-C (at the end of the running step). ``resume=True``
  continues it exactly: model, optimizer, step, epoch, batch within the epoch,
  RNG states and metrics are restored, so an interrupted-and-resumed run ends
  with bit-identical weights to an uninterrupted one (same device and threads).
  Checkpoints hold only tensors, numbers, strings, lists and dicts and load
  with ``torch.load(..., weights_only=True)``.
* Divergence is a result: a NaN/Inf training loss (checked every ``log_every``
  steps, at epoch ends and before every checkpoint, without a per-step host
  sync) stops the run with one line (step, last finite loss), marks it
  ``diverged`` in the metrics and the summary and never overwrites the last good
  checkpoint. ``normfree train`` then exits with status 3 (``EXIT_DIVERGED``).
* Metrics: ``out/metrics.jsonl`` and ``out/metrics.csv`` (a row per logged step,
  per evaluation and per event), ``out/config.json`` (the full configuration),
  ``out/summary.json`` at the end, TensorBoard under ``out/tb`` when
  ``tensorboard`` is installed.
* Distributed: under ``torchrun --nproc_per_node=N`` (RANK/WORLD_SIZE in the
  environment) the same call runs DistributedDataParallel (gloo on CPU, nccl on
  GPU). ``batch_size`` stays the global batch; each rank takes its slice of every
  global batch, so N processes follow the same trajectory as one process (up to
  float summation order). BN models get SyncBatchNorm on GPU (PyTorch has no CPU
  SyncBatchNorm: on CPU each rank normalizes with its own slice's statistics).
  Only rank 0 writes files, shows progress and evaluates.

Exit statuses of ``normfree train``: 0 ok (also a run stopped by
``stop_after_steps``), 2 bad input, 3 diverged, 130 interrupted (after writing
the checkpoint).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .atomic import atomic_path, write_text
from .layers import ScalarBias, ScalarGain
from .models import create_model, parse_model_name
from .schemes import make_scheme

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def _f(default, help: str, **kw):
    """A dataclass field carrying its command-line help text."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything that defines a training run (``normfree train --help`` shows
    the same fields as options). Defaults follow the CIFAR WRN recipe: SGD
    Nesterov 0.9, lr 0.1, weight decay 5e-4, cosine schedule."""

    # model
    model: str = _f("skipinit_wrn", "registered model name <method>_<arch> (normfree models)")
    depth: Optional[int] = _f(None, "WRN depth 6n+4 (default: the model's, 16 for wrn)")
    width: Optional[float] = _f(None, "WRN width factor k / ResNet channel multiplier (default 1)")
    model_options: Dict[str, Any] = _f({}, "method options passed to create_model (CLI: --opt key=value, "
                                           "repeatable, e.g. --opt alpha=0.2 --opt gain_init=1/sqrt(d))")
    dropout: Optional[float] = _f(None, "dropout before the classifier (default: the method's)")
    drop_path: Optional[float] = _f(None, "stochastic depth probability of the last block (default: the method's)")
    num_classes: Optional[int] = _f(None, "classifier outputs (default: the data's number of classes)")
    in_chans: Optional[int] = _f(None, "input channels (default and only allowed value: the data's)")
    # data
    data: str = _f("digits", "data set: digits (built-in default), mnist, fashion_mnist, cifar10, folder")
    data_dir: Optional[str] = _f(None, "directory holding the data set files")
    download: bool = _f(False, "download the data set if missing (where supported)")
    augment: Optional[bool] = _f(None, "random crop (zero padding ~H/8) + flips for natural images (default: the data set's choice)")
    max_train_examples: Optional[int] = _f(None, "train on a seeded random subset of this many images")
    max_test_examples: Optional[int] = _f(None, "evaluate on a seeded random subset of this many images")
    # budget
    epochs: float = _f(10, "number of epochs (ignored when --steps is given)")
    steps: Optional[int] = _f(None, "a step budget instead of epochs")
    batch_size: int = _f(128, "global batch size (split evenly over distributed processes)")
    # optimization
    optimizer: str = _f("sgd", "sgd (momentum, optionally Nesterov) or adamw")
    lr: float = _f(0.1, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum (SGD)")
    betas: Tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    weight_decay: float = _f(5e-4, "weight decay on conv/linear weights only (not gains, biases, norms, scalars)")
    schedule: str = _f("cosine", "learning-rate schedule after warmup: cosine, step or constant")
    warmup_steps: int = _f(0, "linear warmup steps")
    warmup_epochs: float = _f(0.0, "linear warmup in epochs (alternative to --warmup-steps)")
    milestones: Tuple[float, ...] = _f((0.5, 0.75), "step schedule: fractions of the run where lr is multiplied by --lr-gamma")
    lr_gamma: float = _f(0.1, "step schedule: factor at each milestone")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    scalar_lr_mult: float = _f(1.0, "learning-rate multiplier of scalar parameters (Fixup: 0.1)")
    agc: Optional[float] = _f(None, "adaptive gradient clipping threshold lambda (e.g. 0.01); off by default")
    agc_eps: float = _f(1e-3, "AGC: minimum weight norm eps")
    # speed
    amp: bool = _f(False, "bf16 autocast where supported")
    channels_last: bool = _f(False, "channels_last memory format")
    compile: bool = _f(False, "torch.compile the model")
    device: str = _f("auto", "auto, cpu or cuda")
    seed: int = _f(0, "seed of initialization, data order, augmentation and dropout")
    # output
    out: Optional[str] = _f(None, "output directory for metrics, config, summary and checkpoint.pt (default: write nothing)")
    resume: bool = _f(False, "continue from OUT/checkpoint.pt if it exists")
    eval_every: int = _f(0, "evaluate on the test set every N epochs (0: only at the end)")
    log_every: int = _f(50, "log metrics (and call the callback) every N steps")
    checkpoint_every: int = _f(0, "also write the checkpoint every N steps (0: only per epoch and at the end)")
    stop_after_steps: Optional[int] = _f(None, "stop (with a checkpoint) once this many steps are done; "
                                               "resume later with --resume")
    progress: bool = _f(True, "show a progress bar (only on a terminal)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the bad value and what is allowed."""
        def check(cond, msg):
            if not cond:
                raise ValueError(msg)

        check(isinstance(self.model, str), f"model must be a string, got {self.model!r}")
        method, _, _ = parse_model_name(self.model)  # raises ValueError for unknown names
        make_scheme(method, **self._model_options())   # validates the method options
        check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check(self.device in DEVICES or str(self.device).startswith("cuda:"),
              f"device must be one of {DEVICES} (or cuda:N), got {self.device!r}")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1,
              f"batch_size must be a positive integer, got {self.batch_size!r}")
        check(self.steps is None or (isinstance(self.steps, int) and self.steps >= 1),
              f"steps must be None or a positive integer, got {self.steps!r}")
        check(self.steps is not None or (isinstance(self.epochs, (int, float)) and self.epochs > 0),
              f"epochs must be > 0 (or give steps), got {self.epochs!r}")
        check(isinstance(self.lr, (int, float)) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum!r}")
        check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        check(self.scalar_lr_mult > 0, f"scalar_lr_mult must be > 0, got {self.scalar_lr_mult!r}")
        check(self.agc is None or self.agc > 0, f"agc must be None or > 0, got {self.agc!r}")
        check(self.warmup_steps >= 0 and self.warmup_epochs >= 0,
              f"warmup must be >= 0, got warmup_steps={self.warmup_steps!r}, warmup_epochs={self.warmup_epochs!r}")
        check(not (self.warmup_steps > 0 and self.warmup_epochs > 0),
              "give warmup_steps or warmup_epochs, not both")
        check(all(0 < m < 1 for m in self.milestones), f"milestones must be fractions in (0, 1), got {self.milestones!r}")
        check(isinstance(self.log_every, int) and self.log_every >= 1, f"log_every must be >= 1, got {self.log_every!r}")
        check(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every!r}")
        check(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}")
        check(self.stop_after_steps is None or self.stop_after_steps >= 1,
              f"stop_after_steps must be None or >= 1, got {self.stop_after_steps!r}")
        for name in ("max_train_examples", "max_test_examples", "num_classes", "in_chans"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, int) and v >= 1), f"{name} must be None or a positive integer, got {v!r}")
        check(not self.resume or self.out, "resume needs out (the directory holding checkpoint.pt)")
        return self

    def _model_options(self) -> Dict[str, Any]:
        opts = dict(self.model_options or {})
        if self.dropout is not None:
            opts["dropout"] = self.dropout
        if self.drop_path is not None:
            opts["drop_path"] = self.drop_path
        return opts

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))  # tuples -> lists: the form stored in files


# fields that may differ between a run and its resumption (they do not change the trajectory)
RESUMABLE_CHANGES = {"epochs", "steps", "out", "resume", "progress", "log_every", "eval_every",
                     "checkpoint_every", "stop_after_steps", "device", "data_dir", "download"}


@dataclass
class TrainResult:
    """The outcome of :func:`train`.

    status: "ok", "diverged" or "stopped" (``stop_after_steps`` reached).
    final_train_loss / train_acc: mean training loss / accuracy (training mode,
    with augmentation) over the last 10% of the steps taken (at least one step).
    test_loss / test_acc: on the test set at the end (None when diverged/stopped,
    and on ranks other than 0). images_per_sec: global training throughput of
    this invocation (steps only, no evaluation); data_time_frac: share of it
    spent fetching batches.
    """

    status: str
    steps: int
    epochs: float
    final_train_loss: float
    train_acc: float
    test_loss: Optional[float]
    test_acc: Optional[float]
    images_per_sec: float
    data_time_frac: float
    wall_time: float
    diverged_step: Optional[int] = None
    last_finite_loss: Optional[float] = None
    num_params: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    model: Optional[nn.Module] = field(default=None, repr=False)
    config: Optional[TrainConfig] = None
    out: Optional[str] = None

    def summary(self) -> Dict[str, Any]:
        """The result without model and history (what ``summary.json`` holds)."""
        keys = ["status", "steps", "epochs", "final_train_loss", "train_acc", "test_loss", "test_acc",
                "images_per_sec", "data_time_frac", "wall_time", "diverged_step", "last_finite_loss",
                "num_params", "out"]
        d = {k: _clean(getattr(self, k)) for k in keys}
        d["config"] = self.config.to_dict() if self.config is not None else None
        return d

    def format(self) -> str:
        """One line for humans."""
        def pct(v):
            return "-" if v is None or not math.isfinite(v) else f"{100 * v:.2f}%"

        def num(v, fmt=".4f"):
            return "-" if v is None or not math.isfinite(v) else format(v, fmt)

        parts = [f"status {self.status}", f"steps {self.steps}", f"epochs {self.epochs:.2f}",
                 f"train loss {num(self.final_train_loss)} acc {pct(self.train_acc)}",
                 f"test loss {num(self.test_loss)} acc {pct(self.test_acc)}",
                 f"{self.images_per_sec:.0f} img/s (data {100 * self.data_time_frac:.0f}%)",
                 f"wall {self.wall_time:.1f}s"]
        if self.status == "diverged":
            parts.append(f"diverged at step {self.diverged_step} (last finite loss {num(self.last_finite_loss)})")
        if self.out:
            parts.append(f"out {self.out}")
        return " | ".join(parts)


def _clean(v):
    """JSON-safe: non-finite floats -> None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


# --------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int, schedule: str,
              milestones: Tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """Multiplier of the peak lr at 0-based ``step`` of ``total``.

    Warmup: (step + 1) / warmup for step < warmup (linear). Then cosine:
    0.5 (1 + cos(pi t)), t = (step - warmup) / (total - warmup) (Loshchilov &
    Hutter 2017); step: gamma^(number of milestones <= step / total); constant: 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if schedule == "step":
        return gamma ** sum(step >= m * total for m in milestones)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def param_groups(model: nn.Module, weight_decay: float, scalar_lr_mult: float = 1.0) -> List[Dict[str, Any]]:
    """Optimizer parameter groups.

    "decay": conv/linear weights (parameters named ``weight`` with dim > 1) get
    ``weight_decay``; "no_decay": gains, biases and norm parameters get none;
    "scalar": 0-dim parameters and those of ScalarBias/ScalarGain modules (Fixup's
    scalars), no decay and lr x ``scalar_lr_mult``. Each group carries ``lr_mult``.
    """
    owner = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owner[id(p)] = mod
    groups = {"decay": [], "no_decay": [], "scalar": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 0 or isinstance(owner.get(id(p)), (ScalarBias, ScalarGain)):
            groups["scalar"].append(p)
        elif p.dim() > 1 and name.rsplit(".", 1)[-1] == "weight":
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    out = []
    for key, wd, mult in (("decay", weight_decay, 1.0), ("no_decay", 0.0, 1.0), ("scalar", 0.0, scalar_lr_mult)):
        if groups[key]:
            out.append({"params": groups[key], "weight_decay": wd, "lr_mult": mult, "name": key})
    return out


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over :func:`param_groups`, wrapped in AGC when ``cfg.agc``."""
    groups = param_groups(model, cfg.weight_decay, cfg.scalar_lr_mult)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.agc is not None:
        from .agc import AGC
        opt = AGC(opt, model=model, clipping=cfg.agc, eps=cfg.agc_eps)
    return opt


def _batches(*args, **kwargs):
    from .data import Batches
    return Batches(*args, **kwargs)


@torch.no_grad()
def evaluate(model: nn.Module, x_uint8, y, mean, std, batch_size: int = 512, device=None,
             amp: bool = False, channels_last: bool = False) -> Tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy of ``model`` on uint8
    images ``x_uint8`` [N, C, H, W] with labels ``y``, normalized by ``mean``/``std``
    (per channel), in eval mode (the model's mode is restored afterwards)."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    n = len(y)
    if n == 0:
        raise ValueError("evaluate needs at least one example")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for xb, yb in _batches(x_uint8, y, batch_size, mean, std, shuffle=False, augment=False,
                               drop_last=False, device=str(device)):
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(xb)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            correct += (logits.argmax(1) == yb).sum()
    finally:
        model.train(was_training)
    return float(loss_sum) / n, int(correct) / n


def _subset(x, y, n: Optional[int], seed: int):
    """A seeded random subset of n examples (all when n is None or >= len)."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if n is None or n >= len(y):
        return x, y
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n].sort().values
    return x[idx], y[idx]


def _atomic_save(obj, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`train` (``weights_only=True``); its
    ``config``, ``history`` and ``input`` entries are decoded from JSON
    (``input`` is None in checkpoints written before it was stored). ``path``
    may be the run directory holding ``checkpoint.pt``. Raises
    FileNotFoundError or ValueError (not a readable normfree checkpoint)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r} (give checkpoint.pt or the run directory holding it)")
    try:
        ckpt = dict(torch.load(path, map_location=map_location, weights_only=True))
        ckpt["config"] = json.loads(ckpt["config"])
        ckpt["history"] = json.loads(ckpt["history"])
        ckpt["input"] = json.loads(ckpt["input"]) if "input" in ckpt else None
        if not isinstance(ckpt.get("model"), dict):
            raise KeyError("model")
    except Exception as e:  # truncated, corrupt, unsafe or foreign file: one clear error
        raise ValueError(f"{path!r} is not a readable normfree checkpoint: {type(e).__name__}: {e}") from e
    return ckpt


def model_from_checkpoint(ckpt: Dict[str, Any]) -> nn.Module:
    """The trained model of a checkpoint loaded by :func:`load_checkpoint`:
    rebuilt from its configuration (model name, depth, width, method options;
    classes and input channels from the weights' shapes), with its weights,
    in eval mode."""
    cfg = ckpt["config"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in known})
    state = ckpt["model"]
    try:
        num_classes, in_chans = state["fc.weight"].shape[0], state["stem.0.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"checkpoint of {config.model!r} has no {e} weight: not a normfree model") from None
    model = create_model(config.model, depth=config.depth, width=config.width, num_classes=num_classes,
                         in_chans=in_chans, **config._model_options())
    model.load_state_dict(state)
    return model.eval()


def load_model(path: str, map_location="cpu") -> nn.Module:
    """The trained model saved in a checkpoint written by :func:`train` (or in
    the run directory holding it), in eval mode; loaded with ``weights_only=True``."""
    return model_from_checkpoint(load_checkpoint(path, map_location))


CSV_FIELDS = ["kind", "step", "epoch", "lr", "loss", "acc", "images_per_sec", "data_time_frac",
              "test_loss", "test_acc", "time", "status", "message"]


class _Metrics:
    """metrics.jsonl + metrics.csv (+ TensorBoard) in ``out``; all no-ops when out is None."""

    def __init__(self, out: Optional[str]):
        self.out = out
        self.tb = None
        if out is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # only when tensorboard is installed
            self.tb = SummaryWriter(os.path.join(out, "tb"))
        except Exception:
            self.tb = None

    def rewrite(self, history: List[Dict[str, Any]]) -> None:
        """Start the files afresh with ``history`` (on resume: drop lines past the checkpoint)."""
        if self.out is None:
            return
        with open(os.path.join(self.out, "metrics.jsonl"), "w") as f:
            for rec in history:
                f.write(json.dumps(_clean(rec)) + "\n")
        with open(os.path.join(self.out, "metrics.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for rec in history:
                w.writerow(_clean(rec))

    def write(self, rec: Dict[str, Any]) -> None:
        if self.out is None:
            return
        rec = _clean(rec)
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        with open(os.path.join(self.out, "metrics.csv"), "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore").writerow(rec)
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch") and v is not None:
                    self.tb.add_scalar(f"{rec.get('kind', 'x')}/{k}", v, rec.get("step", 0))

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _dist_env() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _resolve_device(cfg: TrainConfig, local_rank: int, world: int) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        return torch.device("cpu")
    if str(cfg.device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        if cfg.device == "cuda" and world > 1:
            return torch.device("cuda", local_rank)
    return torch.device(cfg.device)


class _Stop(Exception):
    """Divergence detected (internal)."""

    def __init__(self, step: int, last_finite: Optional[float]):
        self.step, self.last_finite = step, last_finite


# --------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------
def train(cfg: TrainConfig, callback: Optional[Callable[[int, nn.Module, Dict[str, Any]], Any]] = None,
          dataset=None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` (see the module docstring for what is done).

    Args:
        cfg: the run's :class:`TrainConfig`.
        callback: ``callback(step, model, record)`` every ``log_every`` steps with
            the unwrapped model and the logged record; raising KeyboardInterrupt
            in it stops the run like Ctrl-C (checkpoint written, then re-raised).
        dataset: an already loaded ``normfree.data.load_dataset(...)`` result to
            use instead of loading ``cfg.data`` (sweeps load data once).

    Returns:
        :class:`TrainResult`. KeyboardInterrupt is re-raised after the
        checkpoint is written.
    """
    cfg.validate()
    rank, world, local_rank = _dist_env()
    ours = False
    if world > 1:
        import torch.distributed as dist
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
        if not dist.is_initialized():
            dev = _resolve_device(cfg, local_rank, world)
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            ours = True
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        return _Run(cfg, callback, dataset, rank, world, local_rank).run()
    finally:
        if ours:
            import torch.distributed as dist
            dist.destroy_process_group()


class _Run:
    def __init__(self, cfg, callback, dataset, rank, world, local_rank):
        self.cfg, self.callback, self.rank, self.world = cfg, callback, rank, world
        self.t_start = time.perf_counter()
        self.device = _resolve_device(cfg, local_rank, world)
        self.main = rank == 0
        self.amp = cfg.amp
        if self.amp and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            self._say("bf16 autocast is not supported on this GPU; running in float32")
            self.amp = False
        if cfg.batch_size % world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} distributed processes")
        self.local_batch = cfg.batch_size // world

        # data
        if dataset is None:
            from .data import load_dataset
            dataset = load_dataset(name=cfg.data, data_dir=cfg.data_dir, download=cfg.download)
        self.ds = dataset
        self.train_x, self.train_y = _subset(dataset.train_x, dataset.train_y, cfg.max_train_examples, cfg.seed)
        self.test_x, self.test_y = _subset(dataset.test_x, dataset.test_y, cfg.max_test_examples, cfg.seed + 1)
        augment = dataset.augment if cfg.augment is None else cfg.augment
        self.batches = _batches(self.train_x, self.train_y, self.local_batch, dataset.mean, dataset.std,
                                shuffle=True, augment=augment, pad=getattr(dataset, "pad", None),
                                flip=getattr(dataset, "flip", True), drop_last=True, seed=cfg.seed,
                                device=str(self.device), rank=rank, world_size=world)
        self.steps_per_epoch = len(self.batches)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(self.train_y)} training examples")
        self.total_steps = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * self.steps_per_epoch))
        self.warmup = cfg.warmup_steps or int(round(cfg.warmup_epochs * self.steps_per_epoch))

        # model
        if cfg.in_chans is not None and cfg.in_chans != dataset.in_chans:
            raise ValueError(f"in_chans={cfg.in_chans} but the data {dataset.name!r} has {dataset.in_chans} channels")
        num_classes = cfg.num_classes or dataset.num_classes
        if num_classes < dataset.num_classes:
            raise ValueError(f"num_classes={num_classes} is smaller than the data's {dataset.num_classes} classes")
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, depth=cfg.depth, width=cfg.width, num_classes=num_classes,
                             in_chans=dataset.in_chans, **cfg._model_options())
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.num_params = sum(p.numel() for p in model.parameters())
        self.opt = make_optimizer(model, cfg)
        net = model
        if world > 1:
            uses_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
            if uses_bn and self.device.type == "cuda":
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            elif uses_bn:
                self._say("note: PyTorch has no SyncBatchNorm on CPU; each process normalizes "
                          "with its own slice of the batch")
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            net = torch.compile(net)
        self.net = net
        # dropout / stochastic-depth stream: seed + rank (so ranks draw different masks)
        torch.manual_seed(cfg.seed + 1_000_003 * rank)

        # state
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: List[Dict[str, Any]] = []
        self.loss_hist = torch.zeros(self.total_steps, device=self.device)
        self.acc_hist = torch.zeros(self.total_steps, device=self.device)
        self.checked = 0          # losses [0, checked) are known finite
        self.last_log = 0
        self.last_eval_step = -1
        self.in_step = False
        self.stop_requested = False
        self.t_train = 0.0
        self.t_data = 0.0
        self.images = 0
        self.ckpt_path = os.path.join(cfg.out, CHECKPOINT) if cfg.out else None

        if cfg.out and self.main:
            os.makedirs(cfg.out, exist_ok=True)
        resumed = False
        if self.ckpt_path and os.path.exists(self.ckpt_path):
            if not cfg.resume:
                raise ValueError(f"{self.ckpt_path} exists: pass resume (--resume) to continue that run, "
                                 f"or choose another out directory")
            self._load(self.ckpt_path)
            resumed = True
        elif cfg.resume and self.main:
            self._say(f"no checkpoint in {cfg.out}: starting from scratch")
        self.metrics = _Metrics(cfg.out if self.main else None)
        if self.main and cfg.out:
            self.metrics.rewrite(self.history)
            info = {"config": cfg.to_dict(), "world_size": world, "device": str(self.device),
                    "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                    "warmup_steps": self.warmup, "local_batch_size": self.local_batch,
                    "train_examples": len(self.train_y), "test_examples": len(self.test_y),
                    "num_params": self.num_params, "augment": augment, "data_name": dataset.name,
                    "num_classes": num_classes, "in_chans": dataset.in_chans,
                    "torch": torch.__version__, "resumed_at_step": self.step if resumed else None}
            write_text(os.path.join(cfg.out, "config.json"), json.dumps(_clean(info), indent=2) + "\n")

    # ---- helpers ----
    def _say(self, msg: str) -> None:
        if self.rank == 0:
            try:
                from tqdm import tqdm
                tqdm.write(msg, file=sys.stderr)
            except ImportError:
                print(msg, file=sys.stderr)

    def _record(self, rec: Dict[str, Any]) -> None:
        rec = {k: (float(v) if isinstance(v, float) else v) for k, v in rec.items()}
        rec.setdefault("time", round(time.perf_counter() - self.t_start, 3))
        self.history.append(rec)
        if self.main:
            self.metrics.write(rec)

    def _allreduce_min(self, v: int) -> int:
        if self.world == 1:
            return v
        import torch.distributed as dist
        t = torch.tensor([v], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def _check_finite(self, upto: int, params: bool = False) -> None:
        """Raise _Stop if a loss in [checked, upto) (or, with params, a weight) is not finite."""
        bad = self.total_steps + 1
        if upto > self.checked:
            finite = torch.isfinite(self.loss_hist[self.checked:upto])
            if not bool(finite.all()):
                bad = self.checked + int((~finite).nonzero()[0])
        if params and bad > self.total_steps:
            ok = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
            if not bool(ok):
                bad = upto  # the update after the last finite loss broke the weights
        bad = self._allreduce_min(bad)
        if bad <= self.total_steps:
            last = float(self.loss_hist[bad - 1]) if bad > 0 else None
            raise _Stop(bad + 1, last)  # steps are 1-based
        self.checked = upto

    def _save(self) -> None:
        """Write the checkpoint (rank 0), only after checking that the state is finite."""
        self._check_finite(self.step, params=True)
        if not (self.main and self.ckpt_path):
            return
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
            "loss_hist": self.loss_hist[:self.step].cpu(), "acc_hist": self.acc_hist[:self.step].cpu(),
            "rng": rng,
            "config": json.dumps(self.cfg.to_dict()),
            "history": json.dumps(_clean(self.history)),
            "input": json.dumps(self.input_info()),
        }
        _atomic_save(ckpt, self.ckpt_path)

    def input_info(self) -> Dict[str, Any]:
        """What the model takes: (C, H, W) and the per-channel normalization of pixels / 255."""
        c, (h, w) = self.ds.in_chans, self.ds.image_size
        return {"data": self.ds.name, "shape": [c, h, w], "mean": [float(v) for v in self.ds.mean.reshape(-1)],
                "std": [float(v) for v in self.ds.std.reshape(-1)], "classes": list(self.ds.classes)}

    def _load(self, path: str) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        old = json.loads(ckpt["config"])
        new = self.cfg.to_dict()
        diff = {k: (old.get(k), new[k]) for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]}
        if diff:
            items = ", ".join(f"{k}={a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume {path}: the configuration differs: {items}")
        if ckpt["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"cannot resume {path}: {ckpt['steps_per_epoch']} steps per epoch in the checkpoint, "
                             f"{self.steps_per_epoch} now (different data?)")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        n = min(self.step, self.total_steps)
        if self.step > self.total_steps:
            raise ValueError(f"cannot resume {path}: it has {self.step} steps, more than the budget {self.total_steps}")
        self.loss_hist[:n] = ckpt["loss_hist"][:n].to(self.device)
        self.acc_hist[:n] = ckpt["acc_hist"][:n].to(self.device)
        self.checked = n
        self.history = json.loads(ckpt["history"])
        # the next log averages from the last logged step on, as it would have without the interruption
        self.last_log = max([h["step"] for h in self.history if h.get("kind") == "train" and h["step"] <= n] or [0])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self._say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    def _log(self) -> Dict[str, Any]:
        """Sync, check divergence, record the window since the last log, run the callback."""
        a, b = self.last_log, self.step
        if self.device.type == "cuda":  # queued GPU work belongs to the training time
            t0 = time.perf_counter()
            torch.cuda.synchronize(self.device)
            self.t_train += time.perf_counter() - t0
        seg_t = self.t_train - self._t_at_log
        seg_d = self.t_data - self._d_at_log
        rec = {"kind": "train", "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
               "lr": self.opt.param_groups[0]["lr"],
               "loss": float(self.loss_hist[a:b].mean()), "acc": float(self.acc_hist[a:b].mean()),
               "images_per_sec": (b - a) * self.cfg.batch_size / seg_t if seg_t > 0 else None,
               "data_time_frac": seg_d / seg_t if seg_t > 0 else None}
        self._t_at_log, self._d_at_log = self.t_train, self.t_data
        self._check_finite(b)
        self.last_log = b
        self._record(rec)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}",
                                  img_s=f"{rec['images_per_sec'] or 0:.0f}", refresh=False)
        if self.callback is not None:
            self.callback(self.step, self.model, rec)
        return rec

    def _evaluate(self) -> Tuple[float, float]:
        return evaluate(self.model, self.test_x, self.test_y, self.ds.mean, self.ds.std,
                        batch_size=max(256, self.cfg.batch_size), device=self.device, amp=self.amp,
                        channels_last=self.cfg.channels_last)

    def _eval_record(self) -> Dict[str, Any]:
        loss, acc = self._evaluate()
        self.last_eval_step = self.step
        rec = {"kind": "eval", "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
               "test_loss": loss, "test_acc": acc}
        self._record(rec)
        if self.pbar is not None:
            self.pbar.set_postfix(test_acc=f"{acc:.3f}", refresh=False)
        return rec

    def _tail(self) -> Tuple[float, float]:
        n = self.step
        if n == 0:
            return float("nan"), float("nan")
        k = max(1, math.ceil(0.1 * n))
        return float(self.loss_hist[n - k:n].mean()), float(self.acc_hist[n - k:n].mean())

    def _sigint(self, signum, frame):
        if self.stop_requested or not self.in_step:
            raise KeyboardInterrupt
        self.stop_requested = True
        self._say("interrupt: finishing this step and writing the checkpoint (Ctrl-C again to abort)")

    # ---- main ----
    def run(self) -> TrainResult:
        cfg = self.cfg
        show = cfg.progress and self.main and sys.stderr.isatty()
        self.pbar = None
        if show:
            from tqdm import tqdm
            self.pbar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.model, unit="step",
                             dynamic_ncols=True, file=sys.stderr)
        self._t_at_log = self._d_at_log = 0.0
        old_handler = None
        try:
            old_handler = signal.signal(signal.SIGINT, self._sigint)
        except ValueError:  # not the main thread: Ctrl-C raises directly
            old_handler = None
        status, div = "ok", None
        try:
            try:
                status = self._loop()
            except _Stop as s:
                status, div = "diverged", s
            except KeyboardInterrupt:
                if not self.in_step:
                    self._interrupt_save()
                else:
                    self._say("interrupted inside a step: checkpoint not updated")
                raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            if self.pbar is not None:
                self.pbar.close()
            self.metrics.close()

        test_loss = test_acc = None
        if status == "diverged":
            msg = (f"diverged at step {div.step}: loss is NaN/Inf (last finite loss "
                   f"{'-' if div.last_finite is None else format(div.last_finite, '.4g')}); "
                   + (f"last good checkpoint kept in {self.ckpt_path}" if self.ckpt_path and os.path.exists(self.ckpt_path)
                      else "no checkpoint written"))
            self._say(msg)
            self._record({"kind": "event", "status": "diverged", "step": div.step,
                          "loss": div.last_finite, "message": msg})
            final_loss, train_acc = float("nan"), float("nan")
        else:
            final_loss, train_acc = self._tail()
            if status == "ok" and self.main:
                if self.last_eval_step == self.step and self.history and self.history[-1].get("kind") == "eval":
                    test_loss, test_acc = self.history[-1]["test_loss"], self.history[-1]["test_acc"]
                else:
                    rec = self._eval_record()
                    test_loss, test_acc = rec["test_loss"], rec["test_acc"]
        self.metrics.close()
        wall = time.perf_counter() - self.t_start
        result = TrainResult(
            status=status, steps=self.step, epochs=self.step / self.steps_per_epoch,
            final_train_loss=final_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc,
            images_per_sec=self.images / self.t_train if self.t_train > 0 else 0.0,
            data_time_frac=self.t_data / self.t_train if self.t_train > 0 else 0.0,
            wall_time=wall, diverged_step=div.step if div else None,
            last_finite_loss=div.last_finite if div else None, num_params=self.num_params,
            history=self.history, model=self.model, config=cfg, out=cfg.out)
        if self.main and cfg.out:
            write_text(os.path.join(cfg.out, "summary.json"), json.dumps(result.summary(), indent=2) + "\n")
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()
        return result

    def _interrupt_save(self) -> None:
        self._record({"kind": "event", "status": "interrupted", "step": self.step,
                      "message": f"interrupted at step {self.step}"})
        try:
            self._save()
            if self.ckpt_path:
                self._say(f"interrupted at step {self.step}: checkpoint written to {self.ckpt_path} "
                          f"(continue with --resume)")
        except _Stop as s:
            self._say(f"interrupted; the run had diverged at step {s.step}: last good checkpoint kept")

    def _loop(self) -> str:
        cfg = self.cfg
        net, opt = self.net, self.opt
        ls = cfg.label_smoothing
        cl = cfg.channels_last
        dev_type = self.device.type
        per_step = float(cfg.batch_size)
        stop_at = cfg.stop_after_steps
        while self.step < self.total_steps:
            if stop_at is not None and self.step >= stop_at:
                break
            self.batches.set_epoch(self.epoch)
            self.batches.skip(self.batch_in_epoch)
            net.train()
            it = iter(self.batches)
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                self.in_step = True
                try:
                    xb, yb = next(it)
                except StopIteration:
                    self.in_step = False
                    break
                t1 = time.perf_counter()
                if cl:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                f = lr_factor(self.step, self.total_steps, self.warmup, cfg.schedule, tuple(cfg.milestones), cfg.lr_gamma)
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * g["lr_mult"] * f
                with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=self.amp):
                    logits = net(xb)
                logits = logits.float()
                loss = F.cross_entropy(logits, yb, label_smoothing=ls)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    self.loss_hist[self.step] = loss.detach()
                    self.acc_hist[self.step] = (logits.argmax(1) == yb).float().mean()
                self.step += 1
                self.batch_in_epoch += 1
                self.images += per_step
                t2 = time.perf_counter()
                self.t_data += t1 - t0
                self.t_train += t2 - t0
                self.in_step = False
                if self.pbar is not None:
                    self.pbar.update(1)
                at_log = self.step % cfg.log_every == 0
                if at_log or self.step == self.total_steps:
                    self._log()
                if self.world > 1:  # all ranks must stop at the same step: agree at log steps only
                    if at_log:
                        self.stop_requested = self._allreduce_min(0 if self.stop_requested else 1) == 0
                    if self.stop_requested and at_log:
                        raise KeyboardInterrupt
                elif self.stop_requested:
                    raise KeyboardInterrupt
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self._save()
                if stop_at is not None and self.step >= stop_at:
                    break
            if self.batch_in_epoch >= self.steps_per_epoch:  # epoch completed
                self.in_step = True  # (no interrupt between the two updates)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self.in_step = False
                self._check_finite(self.step)
                if cfg.eval_every and self.epoch % cfg.eval_every == 0 and self.main:
                    self._eval_record()
                self._save()
            if stop_at is not None and self.step >= stop_at and self.step < self.total_steps:
                self._record({"kind": "event", "status": "stopped", "step": self.step,
                              "message": f"stopped after {self.step} steps (stop_after_steps)"})
                self._save()
                return "stopped"
        self._check_finite(self.step)
        self._save()
        return "ok"


# --------------------------------------------------------------------------
# command-line helpers (used by normfree.cli)
# --------------------------------------------------------------------------
def parse_value(text: str):
    """'3' -> 3, '0.2' -> 0.2, 'true'/'false' -> bool, 'none' -> None, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_options(items: Optional[List[str]]) -> Dict[str, Any]:
    """['alpha=0.2', 'gain_init=1/sqrt(d)'] -> {'alpha': 0.2, 'gain_init': '1/sqrt(d)'}."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--opt expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def add_arguments(parser) -> None:
    """One command-line option per :class:`TrainConfig` field (``--data-dir`` for
    ``data_dir``; booleans as ``--amp/--no-amp``; ``model_options`` as repeatable
    ``--opt key=value``), with the field's help text and default."""
    import argparse
    import typing

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "model_options":
            parser.add_argument("--opt", dest="model_options", action="append", default=argparse.SUPPRESS,
                                metavar="KEY=VALUE",
                                help=help_text + "; numbers, true/false and none are converted")
            continue
        tp = hints[f.name]
        args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Union:  # Optional[X]
            tp = next(a for a in args if a is not type(None))
            args = typing.get_args(tp)
        flag = "--" + f.name.replace("_", "-")
        kw: Dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}  # see config_from_args
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kw.update(type=float, nargs="+", metavar=f.name.upper())
        else:
            kw.update(type=tp, metavar=f.name.upper() if tp is not str else None)
            choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES}.get(f.name)
            if choices:
                kw["choices"] = choices
        shown = (" ".join(map(str, default)) if isinstance(default, tuple) else default)
        show_default = tp is not bool and default is not None and "default" not in help_text
        kw["help"] = f"{help_text} (default: {shown})" if show_default else help_text
        parser.add_argument(flag, **kw)


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed :func:`add_arguments` options.

    Options not given take the defaults, or with ``--resume`` the values of the
    run being resumed (``OUT/config.json``), so ``normfree train --out DIR
    --resume`` alone continues a run."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values = TrainConfig().to_dict()
    if given.get("resume") and given.get("out"):
        path = os.path.join(given["out"], "config.json")
        if os.path.exists(path):
            with open(path) as fh:
                saved = json.load(fh).get("config", {})
            values.update({k: v for k, v in saved.items() if k in values and k != "stop_after_steps"})
    values.update(given)
    if "model_options" in given:
        values["model_options"] = parse_options(given["model_options"])
    for name in ("betas", "milestones"):
        values[name] = tuple(values[name])
    if isinstance(values["epochs"], float) and values["epochs"].is_integer():
        values["epochs"] = int(values["epochs"])
    return TrainConfig(**values)
