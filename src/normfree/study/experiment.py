"""What an experiment is, and what it is handed.

An experiment is one module in ``normfree/study/experiments/`` that defines
``EXPERIMENT = Experiment(...)``: its name, its place in the report, its size
knobs (with their value in every preset), ``plan(ctx)`` (the runs it needs)
and ``report(ctx, runs)`` (how it judges and draws them: a :class:`Section`).
The package finds the modules by itself, so adding an experiment is adding
one file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

from .runner import RunSpec
from .sizes import Knob, StudySize
from .verdicts import Claim

#: what the study knows about each data set without loading it (for --plan):
#: channels, classes, image side, train and test images
DATA_INFO: Dict[str, Tuple[int, int, int, int, int]] = {
    "digits": (1, 10, 8, 1437, 360),
    "mnist": (1, 10, 28, 60000, 10000),
    "fashion_mnist": (1, 10, 28, 60000, 10000),
    "cifar10": (3, 10, 32, 50000, 10000),
}


@dataclass(frozen=True)
class DataInfo:
    name: str
    in_chans: int
    num_classes: int
    side: int
    n_train: int
    n_test: int
    loaded: bool = False

    @classmethod
    def of(cls, dataset) -> "DataInfo":
        return cls(dataset.name, dataset.in_chans, dataset.num_classes, dataset.image_size[0],
                   len(dataset.train_y), len(dataset.test_y), True)

    @classmethod
    def guess(cls, name: str) -> "DataInfo":
        if name not in DATA_INFO:
            raise ValueError(f"--plan needs the data set's size, unknown for {name!r} without loading it; "
                             f"known: {sorted(DATA_INFO)}")
        return cls(name, *DATA_INFO[name])


@dataclass
class Section:
    """An experiment's part of the report."""

    key: str
    title: str
    text: List[str] = field(default_factory=list)
    figures: List[Tuple[str, str]] = field(default_factory=list)          # (png path, caption)
    tables: List[Tuple[str, List[str], List[List[Any]]]] = field(default_factory=list)  # (caption, head, rows)
    claims: List[Claim] = field(default_factory=list)
    seconds: float = 0.0          # wall time of judging and drawing (the runs overlap between experiments)
    cpu_seconds: float = 0.0      # CPU time of its runs (when they ran) plus judging and drawing
    runs: int = 0


@dataclass
class Context:
    """Everything an experiment needs: sizes, seeds, device, output folder, data."""

    size: StudySize
    seed: int
    device: str
    out: str
    data: DataInfo

    @property
    def n_test(self) -> int:
        n = self.data.n_test
        return min(n, self.size.max_test_examples) if self.size.max_test_examples else n

    @property
    def n_train(self) -> int:
        n = self.data.n_train
        return min(n, self.size.max_train_examples) if self.size.max_train_examples else n

    @property
    def trains(self):
        """The bar a run must pass to count as trained (:class:`~normfree.study.verdicts.Trains`)."""
        from .verdicts import Trains
        return Trains(self.data.num_classes, self.size.trains_below)

    def seeds(self, count: int) -> List[int]:
        """The seeds of an experiment that runs ``count`` seeds: seed, seed + 1, ..."""
        return [self.seed + k for k in range(count)]

    def fig(self, name: str) -> str:
        return os.path.join(self.out, "figures", name + ".png")

    def train_cfg(self, **kw) -> Dict[str, Any]:
        """TrainConfig keywords of a study run: SGD Nesterov 0.9, weight decay 5e-4,
        cosine schedule. Each method trains in its own configuration by the
        trainer's defaults: Fixup's scalars at lr/10 (``scalar_lr_mult``, its
        official recipe), NF's skip gain at its official 0."""
        s = self.size
        cfg = dict(data=self.data.name, width=s.width, optimizer="sgd", momentum=0.9, nesterov=True,
                   weight_decay=5e-4, schedule="cosine", device=self.device,
                   max_train_examples=s.max_train_examples, max_test_examples=s.max_test_examples, log_every=10)
        cfg.update(kw)
        # for the cost estimate only (keys starting with "_" are not passed to train)
        cfg["_train_examples"] = self.n_train
        cfg["_pixels"] = self.data.side ** 2
        return cfg


@dataclass(frozen=True)
class Experiment:
    """One experiment: see the module docstring."""

    name: str
    order: int
    title: str
    knobs: Dict[str, Knob]
    plan: Callable[[Context], List[RunSpec]]
    report: Callable[[Context, Sequence[RunSpec], Dict[str, dict]], Section]
    summary: str = ""


def wrn_blocks(depth: int) -> int:
    return (depth - 4) // 2
