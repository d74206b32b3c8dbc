"""Feeding data to the loop: what the loop needs from a data set, built here
from an in-memory :class:`normfree.data.Dataset` (:func:`from_dataset`) or
from a user's ``torch.utils.data`` Dataset / DataLoader (:func:`from_torch_data`,
details in :mod:`normfree.train.torchdata`).

The loop touches data only through :class:`TrainingData`: ``batches``
(``set_epoch(e)``, ``skip(k)``, ``len()``, iteration giving ``(x, y)`` on the
device, each a pure function of the seed and the epoch, so that resuming at
batch k replays the uninterrupted run), ``evaluate(model)``, the input
record stored with checkpoints and exports, and a ``fingerprint`` that a
resumed run must match.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import TrainConfig
from .step import evaluate


@dataclass
class TrainingData:
    """The data of a run, as the loop sees it (see the module docstring)."""

    name: str
    num_classes: Optional[int]         # None: not known from the data (a torch Dataset without ``classes``)
    in_chans: Optional[int]            # None: the inputs have no channel dimension (not images)
    batches: Any                       # normfree.data.Batches or the same interface
    evaluate: Optional[Callable[[nn.Module], Tuple[float, float]]]   # None: no test data
    input_info: Dict[str, Any]         # shape, mean, std, classes: what the trained model takes
    fingerprint: Dict[str, Any]        # sizes and a hash of everything that shapes the trajectory
    num_train: int
    num_test: int
    augment: bool
    global_batch: Optional[int] = None  # images per step over all processes (None: the config's batch_size)
    order_note: Optional[str] = None   # why a resumed run may not be bit-identical (None: it is)
    probe: Optional[Callable[[], Tuple[torch.Tensor, torch.Tensor]]] = None  # a few training samples

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


def load_data_spec(spec: str, data_dir: Optional[str]) -> Tuple[Any, Any]:
    """(train, test) from ``package.module:function``: the function returns a
    torch Dataset or DataLoader (no test data), a (train, test) pair, or a dict
    with "train" and "test"; it gets ``data_dir`` when given and accepted."""
    import inspect

    from ..factory import resolve
    from .torchdata import is_torch_data

    fn = resolve(spec, "data")
    kw = {}
    if data_dir is not None:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {"data_dir": None}
        if "data_dir" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"data {spec!r} does not take data_dir, but data_dir={data_dir!r} was given")
        kw["data_dir"] = data_dir
    got = fn(**kw)
    if isinstance(got, dict) and "train" in got:
        train, test = got["train"], got.get("test")
    elif isinstance(got, (tuple, list)) and len(got) == 2:
        train, test = got
    else:
        train, test = got, None
    for what, d in (("training", train), ("test", test)):
        if d is not None and not is_torch_data(d):
            raise ValueError(f"data {spec!r} returned {type(d).__name__} as its {what} data; it must return a "
                             f"torch Dataset or DataLoader, a (train, test) pair of them, or a dict with "
                             f"'train' and 'test'")
    return train, test


def _jsonable_classes(classes: Optional[List[Any]]) -> Optional[List[Any]]:
    if classes is None:
        return None
    return [c if isinstance(c, (str, int, float, bool)) else str(c) for c in classes]


def from_torch_data(cfg: TrainConfig, train_data, test_data, rank: int, world: int, device: torch.device,
                    local_batch: int, amp: bool) -> TrainingData:
    """:class:`TrainingData` of a user's Dataset or DataLoader (see
    :mod:`normfree.train.torchdata`): ``local_batch`` per process for a
    Dataset, the loader's own batch size for a DataLoader; ``max_train_examples``
    / ``max_test_examples`` as seeded subsets; evaluation on ``test_data``
    when given (else no test metrics)."""
    from torch.utils.data import DataLoader, Subset

    from . import torchdata as td

    ld = td.train_loader(train_data, batch_size=local_batch, seed=cfg.seed, num_workers=cfg.num_workers,
                         max_examples=cfg.max_train_examples, rank=rank, world=world, device=device)
    h = hashlib.sha256(ld.fingerprint["sha256"].encode())
    num_test, test_shape = 0, []
    run_eval: Optional[Callable[[nn.Module], Tuple[float, float]]] = None
    if test_data is not None:
        if cfg.max_test_examples is not None:
            if isinstance(test_data, DataLoader):
                raise ValueError("max_test_examples cannot subset a test DataLoader; give its Dataset instead")
            test_data = Subset(test_data, td.subset_indices(len(test_data), cfg.max_test_examples, cfg.seed + 1))
        num_test, test_shape = td.test_fingerprint(h, test_data, cfg.seed)
        if num_test == 0 and not isinstance(test_data, DataLoader):
            raise ValueError(f"the test data ({type(test_data).__name__}) are empty")
        loader = td.test_loader(test_data, max(256, local_batch), cfg.num_workers)

        run_eval = functools.partial(td.evaluate_loader, loader=loader, device=device, amp=amp,
                                     channels_last=cfg.channels_last)

    shape = ld.sample_shape
    fp = dict(ld.fingerprint, test=test_shape, sha256=h.hexdigest())
    classes = _jsonable_classes(ld.classes)
    info = {"data": ld.name, "shape": list(shape) if shape is not None else None, "mean": None, "std": None,
            "classes": classes}
    batches = ld.batches
    local = batches.sampler.batch_size if batches.sampler is not None else batches.loader.batch_size
    return TrainingData(name=ld.name, num_classes=len(classes) if classes else None,
                        in_chans=int(shape[0]) if shape is not None and len(shape) == 3 else None,
                        batches=batches, evaluate=run_eval, input_info=info, fingerprint=fp,
                        num_train=ld.num_train, num_test=num_test, augment=False,
                        global_batch=local * world if local else None, order_note=ld.order_note,
                        probe=lambda: td.first_batch(batches))


def make(cfg: TrainConfig, dataset, test_data, rank: int, world: int, device: torch.device, local_batch: int,
         amp: bool) -> TrainingData:
    """The run's :class:`TrainingData`: from ``dataset`` (a normfree Dataset, or
    a torch Dataset / DataLoader with ``test_data``), else from ``cfg.data``
    (a built-in name, or a ``package.module:function`` spec)."""
    from ..factory import is_spec
    from .torchdata import is_torch_data

    if dataset is None and is_spec(cfg.data):
        dataset, test_data = load_data_spec(cfg.data, cfg.data_dir)
    if dataset is not None and is_torch_data(dataset):
        return from_torch_data(cfg, dataset, test_data, rank, world, device, local_batch, amp)
    if test_data is not None:
        raise ValueError("test_data goes with a torch Dataset or DataLoader passed as dataset=; a normfree "
                         "data set carries its own test split")
    if dataset is None and cfg.data is None:
        raise ValueError("data=None means the data are passed to normfree.train(dataset=...), but none were")
    return from_dataset(cfg, dataset, rank, world, device, local_batch, amp)
