"""Feeding data to the loop: what the loop needs from a data set, built here
from an in-memory :class:`normfree.data.Dataset`.

The loop touches data only through :class:`TrainingData`: ``batches``
(``set_epoch(e)``, ``skip(k)``, ``len()``, iteration giving ``(x, y)`` on the
device, each a pure function of the seed and the epoch, so that resuming at
batch k replays the uninterrupted run), ``evaluate(model)``, the input
record stored with checkpoints and exports, and a ``fingerprint`` that a
resumed run must match. Another source (a user's ``Dataset`` or
``DataLoader``) plugs in by building a ``TrainingData`` of its own.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .config import TrainConfig
from .step import evaluate


@dataclass
class TrainingData:
    """The data of a run, as the loop sees it (see the module docstring)."""

    name: str
    num_classes: int
    in_chans: int
    batches: Any                       # normfree.data.Batches or the same interface
    evaluate: Callable[[nn.Module], Tuple[float, float]]
    input_info: Dict[str, Any]         # shape, mean, std, classes: what the trained model takes
    fingerprint: Dict[str, Any]        # sizes and a hash of everything that shapes the trajectory
    num_train: int
    num_test: int
    augment: bool

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)


def subset(x, y, n: Optional[int], seed: int):
    """A seeded random subset of n examples (all when n is None or >= len)."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if n is None or n >= len(y):
        return x, y
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n].sort().values
    return x[idx], y[idx]


def fingerprint(name: str, train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor],
                mean: torch.Tensor, std: torch.Tensor, num_classes: int, augmentation: str) -> Dict[str, Any]:
    """Sizes and a SHA-256 of the images, labels, normalization and augmentation
    a run trains and is tested on: equal fingerprints, equal trajectories."""
    h = hashlib.sha256()
    for t in (*train, *test, torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)):
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).numpy())
    h.update(augmentation.encode())
    return {"data": name, "train": list(train[0].shape), "test": list(test[0].shape),
            "classes": int(num_classes), "sha256": h.hexdigest()}


def describe_fingerprint(fp: Dict[str, Any]) -> str:
    shape = lambda s: "x".join(map(str, s))
    return (f"{fp.get('data')}: train {shape(fp.get('train', []))}, test {shape(fp.get('test', []))}, "
            f"{fp.get('classes')} classes, sha256 {str(fp.get('sha256'))[:12]}")


def from_dataset(cfg: TrainConfig, dataset, rank: int, world: int, device: torch.device,
                 local_batch: int, amp: bool) -> TrainingData:
    """:class:`TrainingData` of an in-memory data set (``cfg.data`` is loaded when
    ``dataset`` is None), with ``cfg``'s subsets, augmentation and seed."""
    from ..data import Batches, load_dataset

    if dataset is None:
        dataset = load_dataset(name=cfg.data, data_dir=cfg.data_dir, download=cfg.download,
                               image_size=cfg.image_size)
    train_x, train_y = subset(dataset.train_x, dataset.train_y, cfg.max_train_examples, cfg.seed)
    test_x, test_y = subset(dataset.test_x, dataset.test_y, cfg.max_test_examples, cfg.seed + 1)
    augment = dataset.augment if cfg.augment is None else cfg.augment
    pad, flip = getattr(dataset, "pad", None), getattr(dataset, "flip", True)
    batches = Batches(train_x, train_y, local_batch, dataset.mean, dataset.std, shuffle=True, augment=augment,
                      pad=pad, flip=flip, drop_last=True, seed=cfg.seed, device=str(device),
                      rank=rank, world_size=world)
    if len(batches) < 1:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(train_y)} training examples")
    if len(test_y) == 0:
        raise ValueError(f"the data set {dataset.name!r} has no test examples to evaluate on")

    def run_eval(model: nn.Module) -> Tuple[float, float]:
        return evaluate(model, test_x, test_y, dataset.mean, dataset.std, batch_size=max(256, cfg.batch_size),
                        device=device, amp=amp, channels_last=cfg.channels_last)

    c, (h, w) = dataset.in_chans, dataset.image_size
    info = {"data": dataset.name, "shape": [c, h, w], "mean": [float(v) for v in dataset.mean.reshape(-1)],
            "std": [float(v) for v in dataset.std.reshape(-1)], "classes": list(dataset.classes)}
    aug = f"augment={augment} pad={batches.pad} flip={flip}"
    fp = fingerprint(dataset.name, (train_x, train_y), (test_x, test_y), dataset.mean, dataset.std,
                     dataset.num_classes, aug)
    return TrainingData(name=dataset.name, num_classes=dataset.num_classes, in_chans=dataset.in_chans,
                        batches=batches, evaluate=run_eval, input_info=info, fingerprint=fp,
                        num_train=len(train_y), num_test=len(test_y), augment=augment)
