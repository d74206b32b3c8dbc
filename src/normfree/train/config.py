"""What defines a training run (:class:`TrainConfig`, checked where it is
made) and what a run returns (:class:`TrainResult`)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from ..factory import check_spec, is_spec
from ..models import parse_model_name
from ..schemes import make_scheme
from .metrics import jsonable

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT; SIGTERM ends with 128 + 15 = 143

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("auto", "cpu", "cuda")

#: upper bounds of sizes and counts: far above any real run, low enough that a
#: typo fails at once instead of allocating or looping for hours
MAX_STEPS = 10 ** 9
MAX_EPOCHS = 10 ** 6
MAX_DEPTH = 20_000
MAX_WIDTH = 100.0
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 4096
MAX_BATCH = 2 ** 20
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2 ** 62
MAX_COUNT = 2 ** 40
MAX_WORKERS = 256

#: Fixup's scalar biases and multipliers train at lr/10 in the authors' code
#: (hongyi-zhang/Fixup, cifar/cifar_train.py: the bias and scale groups get base_lr / 10)
FIXUP_SCALAR_LR_MULT = 0.1
#: NFNets train with adaptive gradient clipping at 0.01 (deepmind-research nfnets/experiment_nfnets.py)
NFNET_AGC = 0.01


def _f(default, help: str, **kw):
    """A dataclass field carrying its command-line help text."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(name: str, v, lo: int, hi: int, optional: bool = False) -> None:
    """ValueError unless ``v`` is an integer in [lo, hi] (or None when ``optional``)."""
    if v is None and optional:
        return
    if not _is_int(v) or not lo <= v <= hi:
        what = "None or " if optional else ""
        raise ValueError(f"{name} must be {what}an integer in [{lo}, {hi}], got {v!r}")


def check_float(name: str, v, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
                optional: bool = False) -> None:
    """ValueError unless ``v`` is a finite number in the interval (NaN and Inf never pass)."""
    if v is None and optional:
        return
    ok = _is_num(v) and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        what = "None or " if optional else ""
        raise ValueError(f"{name} must be {what}a finite number in {interval}, got {v!r}")


@dataclass
class TrainConfig:
    """Everything that defines a training run (``normfree train --help`` shows
    the same fields as options). Defaults follow the CIFAR WRN recipe: SGD
    Nesterov 0.9, lr 0.1, weight decay 5e-4, cosine schedule. Every value is
    checked when the config is made (:meth:`validate`): a bad one raises
    ValueError naming it and what is allowed."""

    # model
    model: Optional[str] = _f("skipinit_wrn", "a registered name <method>_<arch> (normfree models), or "
                                              "package.module:factory (any importable callable returning an "
                                              "nn.Module, called with num_classes/in_chans where it takes "
                                              "them; --opt key=value are its arguments), timm:NAME or "
                                              "torchvision:NAME (where installed). Python API: None when the "
                                              "model is passed to train(model=...)")
    convert: Optional[str] = _f(None, "make a foreign model BN-free before training with normfree.convert: "
                                      "skipinit, nf, none, gn, ln or in")
    classifier: Optional[str] = _f(None, "module name of the final classifier, which AGC does not clip "
                                         "(default: get_classifier(), else the attribute fc, head or classifier)")
    depth: Optional[int] = _f(None, "WRN depth 6n+4 (default: the model's, 16 for wrn)")
    width: Optional[float] = _f(None, "WRN width factor k / ResNet channel multiplier (default 1)")
    model_options: Dict[str, Any] = _f({}, "method options passed to create_model (CLI: --opt key=value, "
                                           "repeatable, e.g. --opt alpha=0.2 --opt gain_init=1/sqrt(d))")
    dropout: Optional[float] = _f(None, "dropout before the classifier (default: the method's)")
    drop_path: Optional[float] = _f(None, "stochastic depth probability of the last block (default: the method's)")
    num_classes: Optional[int] = _f(None, "classifier outputs (default: the data's number of classes)")
    in_chans: Optional[int] = _f(None, "input channels (default and only allowed value: the data's)")
    # data
    data: Optional[str] = _f("digits", "data set: digits (built-in default), mnist, fashion_mnist, cifar10, "
                                       "folder, or package.module:function returning a torch Dataset or "
                                       "DataLoader, or a (train, test) pair of them. Python API: None when "
                                       "the data are passed to train(dataset=...)")
    data_dir: Optional[str] = _f(None, "directory holding the data set files")
    download: bool = _f(False, "download the data set if missing (where supported)")
    image_size: Optional[int] = _f(None, "folder data set: resize every image to this height = width "
                                         "(default: all images must have one size)")
    augment: Optional[bool] = _f(None, "random crop (zero padding ~H/8) + flips for natural images (default: the data set's choice)")
    max_train_examples: Optional[int] = _f(None, "train on a seeded random subset of this many images")
    max_test_examples: Optional[int] = _f(None, "evaluate on a seeded random subset of this many images")
    num_workers: int = _f(0, "worker processes reading a torch Dataset (the built-in data sets are in memory "
                             "and need none)")
    # budget
    epochs: float = _f(10, "number of epochs (ignored when --steps is given)")
    steps: Optional[int] = _f(None, "a step budget instead of epochs")
    batch_size: int = _f(128, "global batch size (split evenly over distributed processes)")
    # optimization
    optimizer: str = _f("sgd", "sgd (momentum, optionally Nesterov) or adamw")
    lr: float = _f(0.1, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum (SGD)")
    betas: Tuple[float, float] = _f((0.9, 0.999), "AdamW betas (two values)")
    weight_decay: float = _f(5e-4, "weight decay on conv/linear weights only (not gains, biases, norms, scalars)")
    schedule: str = _f("cosine", "learning-rate schedule after warmup: cosine, step or constant")
    warmup_steps: int = _f(0, "linear warmup steps")
    warmup_epochs: float = _f(0.0, "linear warmup in epochs (alternative to --warmup-steps)")
    milestones: Tuple[float, ...] = _f((0.5, 0.75), "step schedule: fractions of the run where lr is multiplied by --lr-gamma")
    lr_gamma: float = _f(0.1, "step schedule: factor at each milestone")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    scalar_lr_mult: Optional[float] = _f(None, "learning-rate multiplier of scalar parameters (scalar biases, "
                                               "gains, multipliers); default: 0.1 for Fixup models (the "
                                               "authors' recipe), 1 otherwise")
    agc: Optional[float] = _f(None, "adaptive gradient clipping threshold lambda (e.g. 0.01); 0 turns it off; "
                                    "default: 0.01 for NFNets (nfnet_*, their published recipe), off otherwise")
    agc_eps: float = _f(1e-3, "AGC: minimum weight norm eps")
    # speed
    amp: bool = _f(False, "bf16 autocast where supported")
    channels_last: bool = _f(False, "channels_last memory format")
    compile: bool = _f(False, "torch.compile the model")
    device: str = _f("auto", "auto, cpu or cuda")
    seed: int = _f(0, "seed of initialization, data order, augmentation and dropout")
    # output
    out: Optional[str] = _f(None, "output directory for metrics, config, summary and checkpoint.pt; new or "
                                  "empty, or a run to continue with --resume (default: write nothing)")
    resume: bool = _f(False, "continue from OUT/checkpoint.pt if it exists")
    reschedule: bool = _f(False, "with --resume: accept a different --steps/--epochs; the learning-rate "
                                 "schedule is recomputed for the new length (the run then differs from a "
                                 "fresh run of that length)")
    eval_every: int = _f(0, "evaluate on the test set every N epochs (0: only at the end)")
    log_every: int = _f(50, "log metrics (and call the callback) every N steps")
    checkpoint_every: int = _f(0, "also write the checkpoint every N steps (0: only per epoch and at the end)")
    stop_after_steps: Optional[int] = _f(None, "stop (with a checkpoint) once this many steps are done; "
                                               "resume later with --resume")
    progress: bool = _f(True, "show a progress bar (only on a terminal)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raise ValueError (TypeError for unknown method options) naming the
        bad value and what is allowed."""
        def check(cond, msg):
            if not cond:
                raise ValueError(msg)

        check(self.model is None or isinstance(self.model, str), f"model must be a string or None, got {self.model!r}")
        check(isinstance(self.model_options, dict),
              f"model_options must be a dict of method options, got {type(self.model_options).__name__}")
        if self.registered:
            method, _, size = parse_model_name(self.model)  # raises ValueError for unknown names
            for key in ("depth", "width"):
                given = getattr(self, key)
                if key in size and given is not None and given != size[key]:
                    raise ValueError(f"model {self.model!r} says {key} {size[key]}, but {key}={given!r} was also "
                                     f"given: give the {key} once")
        else:
            if self.model is not None:
                check_spec(self.model)
            what = repr(self.model) if self.model is not None else "passed to train()"
            for key in ("depth", "width", "dropout", "drop_path"):
                check(getattr(self, key) is None,
                      f"{key} is an option of normfree's registered models; the model {what} is not one: pass "
                      f"its own arguments as model_options (CLI: --opt key=value)")
        check_int("depth", self.depth, 1, MAX_DEPTH, optional=True)
        check_float("width", self.width, 0, MAX_WIDTH, lo_open=True, optional=True)
        check_float("dropout", self.dropout, 0, 1, hi_open=True, optional=True)
        check_float("drop_path", self.drop_path, 0, 1, hi_open=True, optional=True)
        if self.registered:
            make_scheme(method, **self._model_options())   # validates the method options
        if self.convert is not None:
            from ..convert import METHODS as CONVERT_METHODS

            check(self.convert in CONVERT_METHODS,
                  f"convert must be one of {list(CONVERT_METHODS)}, got {self.convert!r}")
        check(self.classifier is None or (isinstance(self.classifier, str) and self.classifier.strip() != ""),
              f"classifier must be a module name (e.g. 'head.fc') or None, got {self.classifier!r}")
        check_int("num_classes", self.num_classes, 1, MAX_CLASSES, optional=True)
        check_int("in_chans", self.in_chans, 1, MAX_CHANNELS, optional=True)

        check(self.data is None or isinstance(self.data, str), f"data must be a data set name, got {self.data!r}")
        if is_spec(self.data):
            check_spec(self.data, "data")
        if self.data is None or is_spec(self.data):
            what = repr(self.data) if self.data is not None else "passed to train()"
            for key in ("augment", "image_size"):
                check(getattr(self, key) is None, f"{key} applies to normfree's built-in data sets, not to "
                                                  f"the data {what} (its own transforms apply)")
        check(self.data_dir is None or isinstance(self.data_dir, str),
              f"data_dir must be a path (string) or None, got {self.data_dir!r}")
        check_int("image_size", self.image_size, 1, MAX_IMAGE_SIZE, optional=True)
        check(self.image_size is None or str(self.data).lower() in ("folder", "imagefolder"),
              f"image_size applies to the 'folder' data set only, not {self.data!r}")
        check_int("max_train_examples", self.max_train_examples, 1, MAX_COUNT, optional=True)
        check_int("max_test_examples", self.max_test_examples, 1, MAX_COUNT, optional=True)
        check_int("num_workers", self.num_workers, 0, MAX_WORKERS)

        check_int("steps", self.steps, 1, MAX_STEPS, optional=True)
        check_float("epochs", self.epochs, 0, MAX_EPOCHS, lo_open=True)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)

        check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check_float("lr", self.lr, 0, math.inf, lo_open=True, hi_open=True)
        check_float("momentum", self.momentum, 0, 1, hi_open=True)
        check(isinstance(self.betas, (tuple, list)) and len(self.betas) == 2,
              f"betas must be two numbers (beta1, beta2), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            check_float(f"betas[{i}]", b, 0, 1, hi_open=True)
        check_float("weight_decay", self.weight_decay, 0, math.inf, hi_open=True)
        check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check_int("warmup_steps", self.warmup_steps, 0, MAX_STEPS)
        check_float("warmup_epochs", self.warmup_epochs, 0, MAX_EPOCHS)
        check(not (self.warmup_steps > 0 and self.warmup_epochs > 0),
              "give warmup_steps or warmup_epochs, not both")
        check(isinstance(self.milestones, (tuple, list)) and len(self.milestones) >= 1,
              f"milestones must be one or more fractions in (0, 1), got {self.milestones!r}")
        for i, m in enumerate(self.milestones):
            check_float(f"milestones[{i}]", m, 0, 1, lo_open=True, hi_open=True)
        check(list(self.milestones) == sorted(self.milestones),
              f"milestones must be in increasing order, got {self.milestones!r}")
        check_float("lr_gamma", self.lr_gamma, 0, math.inf, lo_open=True, hi_open=True)
        check_float("label_smoothing", self.label_smoothing, 0, 1, hi_open=True)
        check_float("scalar_lr_mult", self.scalar_lr_mult, 0, math.inf, lo_open=True, hi_open=True, optional=True)
        check_float("agc", self.agc, 0, math.inf, hi_open=True, optional=True)
        check_float("agc_eps", self.agc_eps, 0, math.inf, lo_open=True, hi_open=True)

        check(self.device in DEVICES or (isinstance(self.device, str) and self.device.startswith("cuda:")
                                         and self.device[5:].isdigit()),
              f"device must be one of {DEVICES} (or cuda:N), got {self.device!r}")
        check_int("seed", self.seed, 0, MAX_SEED - 1)

        check(self.out is None or (isinstance(self.out, str) and self.out.strip() != ""),
              f"out must be a directory path or None, got {self.out!r}")
        check(not self.resume or self.out, "resume needs out (the directory holding checkpoint.pt)")
        check_int("eval_every", self.eval_every, 0, MAX_STEPS)
        check_int("log_every", self.log_every, 1, MAX_STEPS)
        check_int("checkpoint_every", self.checkpoint_every, 0, MAX_STEPS)
        check_int("stop_after_steps", self.stop_after_steps, 1, MAX_STEPS, optional=True)
        return self

    def check_convert(self) -> None:
        """``convert`` needs a foreign model (checked when training starts, once a
        model passed to ``train`` has taken the place of ``model``)."""
        if self.convert is not None and self.registered:
            raise ValueError(f"convert={self.convert!r} makes a foreign model BN-free; {self.model!r} is a normfree "
                             f"model: choose the method in its name (e.g. nf_resnet50)")

    def _model_options(self) -> Dict[str, Any]:
        opts = dict(self.model_options or {})
        if self.dropout is not None:
            opts["dropout"] = self.dropout
        if self.drop_path is not None:
            opts["drop_path"] = self.drop_path
        return opts

    @property
    def registered(self) -> bool:
        """True when ``model`` is a registered normfree name (not a factory, not None)."""
        return isinstance(self.model, str) and not is_spec(self.model)

    @property
    def method(self) -> Optional[str]:
        """The method part of a registered model name ("fixup" for "fixup_wrn"); None for other models."""
        return parse_model_name(self.model)[0] if self.registered else None

    def effective_scalar_lr_mult(self) -> float:
        """``scalar_lr_mult``, or its default: 0.1 for Fixup models, 1 otherwise."""
        if self.scalar_lr_mult is not None:
            return float(self.scalar_lr_mult)
        return FIXUP_SCALAR_LR_MULT if self.method == "fixup" else 1.0

    def effective_agc(self) -> Optional[float]:
        """The AGC threshold the run uses (None: no clipping): ``agc``, 0 meaning
        off, or by default 0.01 for NFNets (Brock et al. 2021b's recipe,
        deepmind-research nfnets/experiment_nfnets.py: SGD_AGC clipping 0.01) and
        none for other models."""
        if self.agc is not None:
            return None if self.agc == 0 else float(self.agc)
        return NFNET_AGC if self.registered and self.model.startswith("nfnet_") else None

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))  # tuples -> lists: the form stored in files

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """The config of a stored ``to_dict()`` (lists back to tuples; unknown keys dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


#: fields that may differ between a run and its resumption: where it writes and
#: how it reports. A different steps/epochs changes the learning-rate schedule
#: (checked on resume, see ``reschedule``); data_dir may move if the data's
#: fingerprint stays the same; num_workers does not change what a sample is
#: (each is read with generators seeded from its own seed, epoch and index).
RESUMABLE_CHANGES = {"epochs", "steps", "out", "resume", "reschedule", "progress", "log_every", "eval_every",
                     "checkpoint_every", "stop_after_steps", "device", "data_dir", "download", "num_workers"}


@dataclass
class TrainResult:
    """The outcome of :func:`normfree.train`.

    status: "ok", "diverged" or "stopped" (``stop_after_steps`` reached).
    steps: the steps taken. diverged_step: the first step whose loss (or, when
    every loss was finite, whose update of the weights) was NaN/Inf.
    final_train_loss / train_acc: mean training loss / accuracy (training mode,
    with augmentation, over all processes) over the last 10% of the steps
    taken (at least one step). test_loss / test_acc: on the test set at the
    end (None when diverged/stopped, and on ranks other than 0).
    images_per_sec: global training throughput of this invocation (steps only,
    no evaluation); data_time_frac: share of it spent fetching batches.
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
        d = {k: jsonable(getattr(self, k)) for k in keys}
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
