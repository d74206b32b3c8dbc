"""The training loop: :func:`train` sets a run up, :class:`Trainer` runs it.

Reading order: :func:`train` (distributed session, run directory, checkpoint
read before any data), :meth:`Trainer.__init__` (data, model, optimizer,
resume), :meth:`Trainer.run` -> :meth:`Trainer.train_epochs` ->
:meth:`Trainer.train_epoch` (one pass, one :func:`~normfree.train.step.train_step`
per batch) -> :meth:`Trainer.after_step` (divergence, logs, stop requests,
checkpoints), and :meth:`Trainer.finish` (evaluation, summary).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from ..agc import classifier_exclude
from ..atomic import write_text
from ..factory import find_classifier
from . import feed
from .checkpoint import (CHECKPOINT, CHECKPOINT_FORMAT, check_resumable, check_same_config, check_state,
                         load_checkpoint, one_line, save_checkpoint)
from .config import MAX_STEPS, TrainConfig, TrainResult
from .distributed import Dist, session
from .interrupt import Interrupted, StopRequests
from .metrics import MetricsFiles, StepLog, jsonable
from .model import ModelArg, adopt, make_model
from .optim import Schedule, make_optimizer
from .rundir import RunDir
from .step import train_step
from .weights import WEIGHTS, save_weights

Callback = Callable[[int, nn.Module, Dict[str, Any]], Any]


class Diverged(Exception):
    """A NaN/Inf loss (or weights) at 1-based ``step``."""

    def __init__(self, step: int, last_finite: Optional[float], what: str = "loss"):
        super().__init__(step)
        self.step, self.last_finite, self.what = step, last_finite, what


def train(cfg: TrainConfig, callback: Optional[Callback] = None, dataset=None, *, model: ModelArg = None,
          test_data=None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` (see :mod:`normfree.train` for what is done).

    Args:
        cfg: the run's :class:`TrainConfig`.
        callback: ``callback(step, model, record)`` every ``log_every`` steps with
            the unwrapped model and the logged record; raising KeyboardInterrupt
            in it stops the run like Ctrl-C (checkpoint written, then re-raised).
        dataset: the data instead of ``cfg.data``: an already loaded
            ``normfree.data.load_dataset(...)`` result (sweeps load data once),
            or a ``torch.utils.data`` Dataset or DataLoader of ``(input, label)``
            pairs (:mod:`normfree.train.torchdata`: normfree orders their
            batches from the seed where it can, so resume stays exact; the
            run says when it cannot).
        model: the model instead of ``cfg.model``: an ``nn.Module`` (trained in
            place, unless ``cfg.convert`` converts a copy), or a callable
            returning one (called under the seed, with ``num_classes`` /
            ``in_chans`` where it takes them and ``cfg.model_options``). The
            stored configuration then has ``model=None``, or the callable's
            ``package.module:name`` when it can be imported again; depth,
            width, dropout and drop_path must be unset.
        test_data: the evaluation data (Dataset or DataLoader) that go with a
            torch ``dataset``; without it the run has no test metrics.

    Returns:
        :class:`TrainResult`. On Ctrl-C or SIGTERM the checkpoint is written
        and :class:`~normfree.train.interrupt.Interrupted` (a KeyboardInterrupt)
        is raised.
    """
    cfg.validate()
    cfg = adopt(cfg, model, dataset)
    cfg.check_convert()
    with session(cfg) as dist:
        run_dir = RunDir.open(cfg.out, cfg.resume) if cfg.out and dist.main else None
        try:
            ckpt = None  # read (and checked) before the data are loaded: a bad file fails at once
            if cfg.out and cfg.resume and os.path.exists(os.path.join(cfg.out, CHECKPOINT)):
                ckpt = load_checkpoint(os.path.join(cfg.out, CHECKPOINT))
                check_state(ckpt)
                check_same_config(ckpt, cfg)
            return Trainer(cfg, dist, callback, dataset, run_dir, ckpt, model=model, test_data=test_data).run()
        finally:
            if run_dir is not None:
                run_dir.close()


class Trainer:
    """One run: its data, model, optimizer, schedule and position, and the loop."""

    def __init__(self, cfg: TrainConfig, dist: Dist, callback: Optional[Callback], dataset,
                 run_dir: Optional[RunDir], ckpt: Optional[Dict[str, Any]], model: ModelArg = None,
                 test_data=None):
        self.cfg, self.dist, self.callback = cfg, dist, callback
        self.t_start = time.perf_counter()
        self.device = dist.device
        self.amp = cfg.amp
        if self.amp and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            self.say("bf16 autocast is not supported on this GPU; running in float32")
            self.amp = False
        if cfg.batch_size % dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {dist.world} distributed processes")
        self.local_batch = cfg.batch_size // dist.world

        self.data = feed.make(cfg, dataset, test_data, dist.rank, dist.world, self.device, self.local_batch, self.amp)
        self.global_batch = self.data.global_batch or cfg.batch_size
        if self.global_batch != cfg.batch_size:
            self.say(f"note: the DataLoader gives {self.global_batch // dist.world} examples per batch and process "
                     f"({self.global_batch} per step in all); batch_size={cfg.batch_size} is not used")
        if self.data.order_note and ckpt is None:
            self.say(self.data.order_note)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.total_steps = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * self.steps_per_epoch))
        if self.total_steps > MAX_STEPS:
            raise ValueError(f"{cfg.epochs} epochs of {self.steps_per_epoch} steps are {self.total_steps} steps, "
                             f"more than the {MAX_STEPS} allowed")
        self.warmup = cfg.warmup_steps or int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.schedule = Schedule(cfg, self.total_steps, self.warmup)
        self.model, self.net, self.opt = self.build_model(model)

        # position and records
        self.step = self.epoch = self.batch_in_epoch = 0
        self.log = StepLog(self.device)
        self.history: List[Dict[str, Any]] = []
        self.last_log, self.last_eval_step = 0, -1
        self.t_train = self.t_data = 0.0
        self._t_at_log = self._d_at_log = 0.0
        self.images = 0
        self.stop = StopRequests(self.say)
        self.pbar = None
        # on CPU the loss is on the host already: check it every step (first bad step exact, no cost)
        self.check_each_step = self.device.type == "cpu" and dist.world == 1

        self.run_dir = run_dir
        self.ckpt_path = os.path.join(cfg.out, CHECKPOINT) if cfg.out else None
        if ckpt is not None:
            self.restore(ckpt)
        elif cfg.resume and dist.main:
            self.say(f"no checkpoint in {cfg.out}: starting from scratch")
        self.files = MetricsFiles(cfg.out if dist.main else None)
        if dist.main and cfg.out:
            self.files.rewrite(self.history)
            write_text(os.path.join(cfg.out, "config.json"),
                       json.dumps(jsonable(self.describe(resumed=ckpt is not None)), indent=2) + "\n")

    # ------------------------------------------------------------ set-up
    def build_model(self, given: ModelArg = None):
        """The run's model (:func:`normfree.train.model.make_model`), its optimizer
        (AGC without the classifier) and the module the loop calls (DDP / compiled)."""
        cfg = self.cfg
        built = make_model(cfg, self.data, given, self.device, self.say)
        model, self.num_classes, self.model_info = built.model, built.num_classes, built.info
        self.num_params = sum(p.numel() for p in model.parameters())
        self.classifier = None
        if cfg.effective_agc() is not None:
            self.classifier, head = find_classifier(model, cfg.classifier)
            if head is None:
                self.say(f"note: no classifier found in {type(model).__name__} (no get_classifier(), fc, head or "
                         f"classifier): AGC clips every layer; name it with classifier= (--classifier)")
            opt = make_optimizer(model, cfg, agc_exclude=classifier_exclude(head))
        else:
            opt = make_optimizer(model, cfg)
        net = self.dist.wrap(model, self.say)
        if cfg.compile:
            net = torch.compile(net)
        # dropout / stochastic-depth stream: seed + rank (so ranks draw different masks)
        torch.manual_seed(cfg.seed + 1_000_003 * self.dist.rank)
        return model, net, opt

    def describe(self, resumed: bool) -> Dict[str, Any]:
        """What config.json holds: the configuration and what the run derived from it."""
        cfg, d = self.cfg, self.data
        return {"config": cfg.to_dict(), "world_size": self.dist.world, "device": str(self.device),
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "warmup_steps": self.warmup, "local_batch_size": self.local_batch,
                "scalar_lr_mult": cfg.effective_scalar_lr_mult(), "agc": cfg.effective_agc(),
                "train_examples": d.num_train, "test_examples": d.num_test,
                "num_params": self.num_params, "augment": d.augment, "data_name": d.name,
                "data_fingerprint": d.fingerprint, "num_classes": self.num_classes, "in_chans": d.in_chans,
                "batch_size": self.global_batch, "model_info": self.model_info, "agc_excluded": self.classifier,
                "exact_resume": d.order_note is None, "torch": torch.__version__,
                "resumed_at_step": self.step if resumed else None}

    def restore(self, ckpt: Dict[str, Any]) -> None:
        """Continue from ``ckpt`` exactly (checked against this run first)."""
        path = ckpt.get("path", self.ckpt_path)
        note = check_resumable(ckpt, self.cfg, self.steps_per_epoch, self.data.fingerprint, self.schedule.record())
        if note:
            self.say(note)
        if self.data.order_note:
            self.say(self.data.order_note.replace("note:", "note: resuming, but", 1))
        try:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"corrupt or inconsistent checkpoint {path}: its state does not fit this run "
                             f"({one_line(e)})") from None
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.log.load(ckpt["loss_hist"], ckpt["acc_hist"])
        self.history = ckpt["history"]
        # the next log averages from the last logged step on, as it would have without the interruption
        self.last_log = max([h["step"] for h in self.history
                             if isinstance(h, dict) and h.get("kind") == "train" and h.get("step", 0) <= self.step]
                            or [0])
        self.say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    # ------------------------------------------------------------ helpers
    def say(self, msg: str) -> None:
        if self.dist.main:
            try:
                from tqdm import tqdm
                tqdm.write(msg, file=sys.stderr)
            except ImportError:
                print(msg, file=sys.stderr)

    def record(self, rec: Dict[str, Any]) -> None:
        rec = {k: (float(v) if isinstance(v, float) else v) for k, v in rec.items()}
        rec.setdefault("time", round(time.perf_counter() - self.t_start, 3))
        self.history.append(rec)
        if self.dist.main:
            self.files.write(rec)

    def check_finite(self, params: bool = False) -> None:
        """Raise :class:`Diverged` at the first step whose loss is NaN/Inf (or,
        with ``params``, if the weights are). Collective under DDP."""
        self.log.reduce(self.dist.mean)
        bad, what = self.log.first_nonfinite(), "loss"
        if bad is None and params:
            finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
            if not bool(finite):
                bad, what = self.step - 1, "weights"  # the update of the last step broke them
        bad = self.dist.min(self.total_steps if bad is None else bad)
        if bad < self.total_steps:
            last = self.log.value(bad - 1) if what == "loss" and bad > 0 else (
                self.log.value(bad) if what == "weights" and bad >= 0 else None)
            raise Diverged(bad + 1, last, what)

    def save(self) -> None:
        """Write the checkpoint (rank 0), only after checking that the state is finite."""
        self.check_finite(params=True)
        if not (self.dist.main and self.ckpt_path):
            return
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = self.model.state_dict()
        save_checkpoint({
            "format": CHECKPOINT_FORMAT,
            "model": state,
            "optimizer": self.opt.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
            **self.log.state(),
            "rng": rng,
            "config": json.dumps(self.cfg.to_dict()),
            "history": json.dumps(jsonable(self.history)),
            "input": json.dumps(self.data.input_info),
            "data": json.dumps(self.data.fingerprint),
            "schedule": json.dumps(self.schedule.record()),
            "model_info": json.dumps(self.model_info),
        }, self.ckpt_path)
        save_weights(os.path.join(self.cfg.out, WEIGHTS), state,
                     {"step": str(self.step), "config": self.cfg.to_dict(), "model_info": self.model_info,
                      "input": self.data.input_info})

    def log_window(self) -> Dict[str, Any]:
        """Sync, check divergence, record the window since the last log, run the callback."""
        a, b = self.last_log, self.step
        if self.device.type == "cuda":  # queued GPU work belongs to the training time
            t0 = time.perf_counter()
            torch.cuda.synchronize(self.device)
            self.t_train += time.perf_counter() - t0
        seg_t, seg_d = self.t_train - self._t_at_log, self.t_data - self._d_at_log
        self.log.reduce(self.dist.mean)  # the global batch's loss and accuracy, not this process's shard
        loss, acc = self.log.mean(a, b)
        rec = {"kind": "train", "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
               "lr": self.opt.param_groups[0]["lr"], "loss": loss, "acc": acc,
               "images_per_sec": (b - a) * self.global_batch / seg_t if seg_t > 0 else None,
               "data_time_frac": seg_d / seg_t if seg_t > 0 else None}
        self._t_at_log, self._d_at_log = self.t_train, self.t_data
        self.check_finite()
        self.last_log = b
        self.record(rec)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}",
                                  img_s=f"{rec['images_per_sec'] or 0:.0f}", refresh=False)
        if self.callback is not None:
            self.callback(self.step, self.model, rec)
        return rec

    def eval_record(self) -> Dict[str, Any]:
        loss, acc = self.data.evaluate(self.model)
        self.last_eval_step = self.step
        rec = {"kind": "eval", "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
               "test_loss": loss, "test_acc": acc}
        self.record(rec)
        if self.pbar is not None:
            self.pbar.set_postfix(test_acc=f"{acc:.3f}", refresh=False)
        return rec

    # ------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        if self.cfg.progress and self.dist.main and sys.stderr.isatty():
            from tqdm import tqdm
            self.pbar = tqdm(total=self.total_steps, initial=self.step, desc=self.cfg.model or type(self.model).__name__,
                             unit="step",
                             dynamic_ncols=True, file=sys.stderr)
        status, div = "ok", None
        try:
            with self.stop:
                try:
                    status = self.train_epochs()
                except Diverged as d:
                    status, div = "diverged", d
                except KeyboardInterrupt as e:
                    self.on_interrupt(e)
                    raise
            return self.finish(status, div)
        finally:
            if self.pbar is not None:
                self.pbar.close()
            self.files.close()

    def stop_reached(self) -> bool:
        return self.cfg.stop_after_steps is not None and self.step >= self.cfg.stop_after_steps

    def train_epochs(self) -> str:
        while self.step < self.total_steps and not self.stop_reached():
            self.train_epoch()
            if self.batch_in_epoch >= self.steps_per_epoch:  # epoch completed
                self.stop.in_step = True  # (no interrupt between the two updates)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self.stop.in_step = False
                self.check_finite()
                if self.cfg.eval_every and self.epoch % self.cfg.eval_every == 0 and self.dist.main \
                        and self.data.evaluate is not None:
                    self.eval_record()
                self.save()
            if self.stop_reached() and self.step < self.total_steps:
                self.record({"kind": "event", "status": "stopped", "step": self.step,
                             "message": f"stopped after {self.step} steps (stop_after_steps)"})
                self.save()
                return "stopped"
        self.check_finite()
        self.save()
        return "ok"

    def train_epoch(self) -> None:
        """One pass over the epoch's remaining batches (until the budget or the stop step)."""
        cfg, batches = self.cfg, self.data.batches
        batches.set_epoch(self.epoch)
        batches.skip(self.batch_in_epoch)
        self.net.train()
        it = iter(batches)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            self.stop.in_step = True
            try:
                x, y = next(it)
            except StopIteration:
                self.stop.in_step = False
                return
            t1 = time.perf_counter()
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.schedule.apply(self.opt, self.step)
            loss, acc = train_step(self.net, self.opt, x, y, label_smoothing=cfg.label_smoothing, amp=self.amp)
            self.log.record(loss, acc)
            self.step += 1
            self.batch_in_epoch += 1
            self.images += self.global_batch
            t2 = time.perf_counter()
            self.t_data += t1 - t0
            self.t_train += t2 - t0
            self.stop.in_step = False
            self.after_step()
            if self.stop_reached():
                return

    def after_step(self) -> None:
        cfg = self.cfg
        if self.pbar is not None:
            self.pbar.update(1)
        if self.check_each_step:
            self.check_finite()
        at_log = self.step % cfg.log_every == 0
        if at_log or self.step == self.total_steps:
            self.log_window()
        if self.dist.world > 1:  # all ranks must stop at the same step: agree at log steps only
            if at_log and self.dist.min(0 if self.stop.requested else 1) == 0:
                raise Interrupted(self.stop.signum or signal.SIGINT)
        elif self.stop.requested:
            raise Interrupted(self.stop.signum)
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save()

    def on_interrupt(self, e: KeyboardInterrupt) -> None:
        """Ctrl-C / SIGTERM / a callback's KeyboardInterrupt: write the checkpoint if between steps."""
        if self.stop.in_step:
            self.say("interrupted inside a step: checkpoint not updated")
            return
        how = f" ({signal.Signals(e.signum).name})" if isinstance(e, Interrupted) else ""
        self.record({"kind": "event", "status": "interrupted", "step": self.step,
                     "message": f"interrupted{how} at step {self.step}"})
        try:
            self.save()
            if self.ckpt_path:
                self.say(f"interrupted{how} at step {self.step}: checkpoint written to {self.ckpt_path} "
                         f"(continue with --resume)")
        except Diverged as d:
            self.say(f"interrupted{how}; the run had diverged at step {d.step}: last good checkpoint kept")

    def finish(self, status: str, div: Optional[Diverged]) -> TrainResult:
        test_loss = test_acc = None
        if status == "diverged":
            what = "loss is NaN/Inf" if div.what == "loss" else "the weights became NaN/Inf in that step's update"
            last = "-" if div.last_finite is None else format(div.last_finite, ".4g")
            kept = (f"last good checkpoint kept in {self.ckpt_path}"
                    if self.ckpt_path and os.path.exists(self.ckpt_path) else "no checkpoint written")
            noticed = f" (noticed at step {self.step})" if self.step > div.step else ""
            msg = f"diverged at step {div.step}{noticed}: {what} (last finite loss {last}); {kept}"
            self.say(msg)
            self.record({"kind": "event", "status": "diverged", "step": div.step,
                         "loss": div.last_finite, "message": msg})
            final_loss, train_acc = float("nan"), float("nan")
        else:
            final_loss, train_acc = self.log.tail()
            if status == "ok" and self.dist.main and self.data.evaluate is not None:
                if self.last_eval_step == self.step and self.history and self.history[-1].get("kind") == "eval":
                    test_loss, test_acc = self.history[-1]["test_loss"], self.history[-1]["test_acc"]
                else:
                    rec = self.eval_record()
                    test_loss, test_acc = rec["test_loss"], rec["test_acc"]
        result = TrainResult(
            status=status, steps=self.step, epochs=self.step / self.steps_per_epoch,
            final_train_loss=final_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc,
            images_per_sec=self.images / self.t_train if self.t_train > 0 else 0.0,
            data_time_frac=self.t_data / self.t_train if self.t_train > 0 else 0.0,
            wall_time=time.perf_counter() - self.t_start, diverged_step=div.step if div else None,
            last_finite_loss=div.last_finite if div else None, num_params=self.num_params,
            history=self.history, model=self.model, config=self.cfg, out=self.cfg.out)
        if self.dist.main and self.cfg.out:
            write_text(os.path.join(self.cfg.out, "summary.json"), json.dumps(result.summary(), indent=2) + "\n")
        self.dist.barrier()
        return result
