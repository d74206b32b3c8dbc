"""Training: one function, :func:`train`, configured by :class:`TrainConfig`.

    result = train(TrainConfig(model="skipinit_wrn", depth=16, width=1, data="digits", epochs=10))
    result = train(TrainConfig(steps=1000, agc=0.01, out="runs/mine"), model=net, dataset=train_set,
                   test_data=test_set)        # your nn.Module, your torch Dataset / DataLoader
    result = train(TrainConfig(model="mypkg.nets:make_net", convert="skipinit", data="mypkg.data:cifar"))

* Models: a registered normfree name, a factory spec (``package.module:factory``,
  ``timm:NAME``, ``torchvision:NAME``; :mod:`normfree.factory`), or a module /
  callable passed as ``model=``; ``convert=`` makes a foreign model BN-free
  first (:func:`normfree.convert`). Data: the built-in sets, a
  ``package.module:function`` spec, or a torch Dataset / DataLoader passed as
  ``dataset=`` (:mod:`normfree.train.torchdata`: normfree orders and seeds
  what it can, so resume stays exact, and says when it cannot).

* Optimizers: SGD with (Nesterov) momentum, AdamW. Learning rate per step:
  linear warmup from lr/warmup to lr, then cosine to 0, step decay (x ``lr_gamma``
  at each of ``milestones``, fractions of the run) or constant.
* Weight decay only on conv/linear weights (``weight`` parameters with more than
  one dimension); none on gains, biases, norm parameters or scalars. Scalar
  parameters (0-dim, ScalarBias, ScalarGain) train at lr x ``scalar_lr_mult``,
  by default 0.1 for Fixup models (the Fixup authors' recipe) and 1 otherwise.
* Adaptive gradient clipping (``agc=0.01``; by default on at 0.01 for NFNets
  only, ``agc=0`` turns it off; :mod:`normfree.agc`; the
  classifier found by :func:`normfree.factory.find_classifier`, or named by
  ``classifier=``, is not clipped), bf16
  autocast (``amp``), channels_last, ``torch.compile``; label smoothing;
  dropout / stochastic depth through the method options.
* Never lose work: ``out`` must be a new or empty directory, or this run's
  (continued with ``resume=True``); it is locked for the run, so a second
  process with the same ``out`` stops at once. ``out/checkpoint.pt`` is written
  atomically (unique temporary file, fsync, rename) every epoch, every
  ``checkpoint_every`` steps, at the end and on Ctrl-C or SIGTERM (at the end
  of the running step). ``resume=True`` continues it exactly: model,
  optimizer, step, epoch, batch within the epoch, RNG states and metrics are
  restored, so an interrupted-and-resumed run ends with bit-identical weights
  to an uninterrupted one (same device and threads). A resumed run must see
  the same data (a fingerprint of sizes and contents is stored) and the same
  learning-rate schedule (another ``steps``/``epochs`` is refused unless
  ``reschedule=True``). Checkpoints hold only tensors, numbers, strings, lists
  and dicts and load with ``torch.load(..., weights_only=True)``; an unreadable,
  unsafe or inconsistent file is refused with one line naming it.
* Divergence is a result: a NaN/Inf training loss (checked every step on CPU;
  on GPU at logs, epoch ends and checkpoints, without a per-step host sync,
  reporting the first bad step) stops the run with one line (step, last
  finite loss), marks it ``diverged`` in the metrics and the summary and never
  overwrites the last good checkpoint. ``normfree train`` then exits with
  status 3 (``EXIT_DIVERGED``).
* Metrics: ``out/metrics.jsonl`` and ``out/metrics.csv`` (a row per logged step,
  per evaluation and per event), ``out/config.json`` (the full configuration),
  ``out/summary.json`` at the end, TensorBoard under ``out/tb`` when
  ``tensorboard`` is installed (``pip install normfree[tensorboard]``), and
  ``out/model.safetensors`` (weights + configuration) with every checkpoint.
* Distributed: under ``torchrun --nproc_per_node=N`` the same call runs
  DistributedDataParallel (:mod:`normfree.train.distributed`); logged
  training loss and accuracy are averaged over the processes.

Layout (each part can be read and changed on its own):

========================  ===================================================
``config``                :class:`TrainConfig` (validated), :class:`TrainResult`
``feed``                  the data the loop sees (:class:`~normfree.train.feed.TrainingData`)
``torchdata``             a user's torch Dataset / DataLoader: seeded order and samples
``step``                  one training step, one evaluation pass
``optim``                 parameter groups, optimizer, learning-rate schedule
``loop``                  :func:`train` and the :class:`~normfree.train.loop.Trainer` loop
``checkpoint``            save / load / check checkpoints, :func:`load_model`
``weights``               ``model.safetensors``: weights with the configuration as JSON
``rundir``                the output directory: checks and lock
``metrics``               per-step log, metric files
``distributed``           torchrun set-up, DDP, reductions
``interrupt``             Ctrl-C and SIGTERM
``options``               ``normfree train``'s command-line options
``recipes``               published recipes (``nfnet``, ``nf_regnet``) as presets
========================  ===================================================

Exit statuses of ``normfree train``: 0 ok (also a run stopped by
``stop_after_steps``), 2 bad input (or a file that cannot be written/read),
3 diverged, 130 interrupted by Ctrl-C and 143 by SIGTERM (after writing the
checkpoint).
"""
from .checkpoint import (CHECKPOINT, CHECKPOINT_FORMAT, check_resumable, load_checkpoint, load_model,
                         model_from_checkpoint, save_checkpoint)
from .config import (DEVICES, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, FIXUP_SCALAR_LR_MULT,
                     OPTIMIZERS, RESUMABLE_CHANGES, SCHEDULES, TrainConfig, TrainResult)
from .distributed import dist_env, resolve_device
from .feed import TrainingData, fingerprint
from .interrupt import Interrupted
from .loop import Diverged, Trainer, train
from .metrics import CSV_FIELDS, MetricsFiles, StepLog
from .optim import Schedule, lr_factor, make_optimizer, param_groups
from .options import add_arguments, config_from_args, parse_options, parse_value
from .recipes import RECIPES, recipe
from .rundir import RunDir, RunDirBusy, RunDirNotEmpty
from .step import evaluate, train_step

__all__ = [
    "CHECKPOINT", "CHECKPOINT_FORMAT", "CSV_FIELDS", "DEVICES", "Diverged", "EXIT_BAD_INPUT", "EXIT_DIVERGED",
    "EXIT_INTERRUPTED", "EXIT_OK", "FIXUP_SCALAR_LR_MULT", "Interrupted", "MetricsFiles", "OPTIMIZERS",
    "RECIPES", "RESUMABLE_CHANGES", "RunDir", "RunDirBusy", "RunDirNotEmpty", "SCHEDULES", "Schedule", "StepLog",
    "TrainConfig", "TrainResult", "Trainer", "TrainingData", "add_arguments", "check_resumable",
    "config_from_args", "dist_env", "evaluate", "fingerprint", "load_checkpoint", "load_model",
    "lr_factor", "make_optimizer", "model_from_checkpoint", "param_groups", "parse_options", "parse_value",
    "recipe", "resolve_device", "save_checkpoint", "train", "train_step",
]
