"""What a run records: per-step losses and accuracies (:class:`StepLog`, on
the training device, no host sync per step) and the metric files in the
run directory (:class:`MetricsFiles`: ``metrics.jsonl``, ``metrics.csv``,
TensorBoard under ``tb/`` when installed)."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

CSV_FIELDS = ["kind", "step", "epoch", "lr", "loss", "acc", "images_per_sec", "data_time_frac",
              "test_loss", "test_acc", "time", "status", "message"]


def jsonable(v):
    """JSON-safe: non-finite floats -> None (recursively)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


class StepLog:
    """Loss and accuracy of every step taken, kept on the training device.

    ``record`` stores a step's values without a host sync. Under distributed
    training each process holds its own shard's values until ``reduce``
    (called with an all-reduce-mean function) replaces the not yet reduced
    steps by the mean over processes, so logged and returned metrics are the
    global batch's. The buffers grow as needed (no allocation by the step budget).
    """

    def __init__(self, device: torch.device, capacity: int = 1024):
        self.device = device
        self.loss = torch.zeros(capacity, device=device)
        self.acc = torch.zeros(capacity, device=device)
        self.n = 0          # steps recorded
        self.reduced = 0    # steps [0, reduced) hold global means
        self.checked = 0    # losses [0, checked) are known finite

    def _grow(self, need: int) -> None:
        if need <= len(self.loss):
            return
        cap = max(need, 2 * len(self.loss))
        for name in ("loss", "acc"):
            old = getattr(self, name)
            new = torch.zeros(cap, device=self.device)
            new[:len(old)] = old
            setattr(self, name, new)

    def record(self, loss: torch.Tensor, acc: torch.Tensor) -> None:
        self._grow(self.n + 1)
        self.loss[self.n] = loss
        self.acc[self.n] = acc
        self.n += 1

    def load(self, loss: torch.Tensor, acc: torch.Tensor) -> None:
        """Restore the first steps (from a checkpoint; already global means)."""
        n = len(loss)
        self._grow(n)
        self.loss[:n] = loss.to(self.device)
        self.acc[:n] = acc.to(self.device)
        self.n = self.reduced = self.checked = n

    def reduce(self, mean_over_processes: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """Replace steps [reduced, n) by their mean over processes (collective)."""
        if mean_over_processes is None or self.n == self.reduced:
            self.reduced = self.n
            return
        a, b = self.reduced, self.n
        both = mean_over_processes(torch.stack([self.loss[a:b], self.acc[a:b]]))
        self.loss[a:b], self.acc[a:b] = both[0], both[1]
        self.reduced = b

    def first_nonfinite(self) -> Optional[int]:
        """0-based index of the first non-finite loss in [checked, n), else None
        (and everything up to n counts as checked)."""
        a, b = self.checked, self.n
        if b > a:
            bad = ~torch.isfinite(self.loss[a:b])
            if bool(bad.any()):
                return a + int(bad.nonzero()[0])
        self.checked = b
        return None

    def mean(self, a: int, b: int) -> Tuple[float, float]:
        """Mean loss and accuracy of steps [a, b)."""
        if b <= a:
            return float("nan"), float("nan")
        return float(self.loss[a:b].mean()), float(self.acc[a:b].mean())

    def tail(self, fraction: float = 0.1) -> Tuple[float, float]:
        """Mean loss and accuracy over the last ``fraction`` of the steps (at least one)."""
        if self.n == 0:
            return float("nan"), float("nan")
        return self.mean(self.n - max(1, math.ceil(fraction * self.n)), self.n)

    def value(self, i: int) -> float:
        return float(self.loss[i])

    def state(self) -> Dict[str, torch.Tensor]:
        return {"loss_hist": self.loss[:self.n].cpu(), "acc_hist": self.acc[:self.n].cpu()}


class MetricsFiles:
    """``metrics.jsonl`` + ``metrics.csv`` (+ TensorBoard) in ``out``; no-ops when out is None.

    An OSError while writing (a full disk) names the file it could not write.
    """

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

    @property
    def jsonl(self) -> str:
        return os.path.join(self.out, "metrics.jsonl")

    @property
    def csv(self) -> str:
        return os.path.join(self.out, "metrics.csv")

    def _append(self, path: str, mode: str, write: Callable[[Any], None]) -> None:
        try:
            with open(path, mode, newline="" if path.endswith(".csv") else None) as f:
                write(f)
        except OSError as e:
            if e.filename is None and e.errno is not None:
                raise OSError(e.errno, e.strerror, path) from e
            raise

    def rewrite(self, history: List[Dict[str, Any]]) -> None:
        """Start the files afresh with ``history`` (on resume: drop lines past the checkpoint)."""
        if self.out is None:
            return

        def jsonl(f):
            for rec in history:
                f.write(json.dumps(jsonable(rec)) + "\n")

        def table(f):
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for rec in history:
                w.writerow(jsonable(rec))

        self._append(self.jsonl, "w", jsonl)
        self._append(self.csv, "w", table)

    def write(self, rec: Dict[str, Any]) -> None:
        if self.out is None:
            return
        rec = jsonable(rec)
        self._append(self.jsonl, "a", lambda f: f.write(json.dumps(rec) + "\n"))
        self._append(self.csv, "a",
                     lambda f: csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore").writerow(rec))
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch") and v is not None:
                    self.tb.add_scalar(f"{rec.get('kind', 'x')}/{k}", v, rec.get("step", 0))

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None
