"""Feeding a user's ``torch.utils.data.Dataset`` or ``DataLoader`` to the loop.

Exact resume needs every batch to be a function of the run's seed and its
position. normfree therefore orders the batches itself wherever it can:

* a map-style ``Dataset``, or a ``DataLoader`` over one whose sampler is a
  plain ``RandomSampler`` (without replacement) or ``SequentialSampler``
  with the standard ``BatchSampler``: the loader is rebuilt around the same
  dataset, ``collate_fn``, workers, ``pin_memory`` and ``drop_last`` with a
  seeded per-epoch order (:class:`EpochBatchSampler`: a permutation drawn from
  ``mix_seed(seed, epoch)``, the one normfree's own data use). Each sample is
  read with torch's, Python's and NumPy's global random generators seeded from
  (seed, epoch, index) (:class:`SeededSamples`; torch's is restored
  afterwards), so random transforms inside the dataset give the same result
  in any worker, after any resume, and never touch the training loop's random
  stream. This costs 60-90 us per sample on 2 shared CPU cores
  (benchmarks/bench_user_data.py), little beside decoding an image.
  A resumed run starts mid-epoch at the next batch without reading the
  skipped ones and is bit-identical to an uninterrupted one.
* any other ``DataLoader`` (a custom or distributed sampler, a custom batch
  sampler, an ``IterableDataset``, ``batch_size=None``) is used as it is:
  ``set_epoch`` is called on its sampler when it has one, and a resume reads
  and drops the batches already taken in the epoch. That is exact only when
  the loader's order depends on the epoch alone and its dataset draws no
  random numbers; the run says so when it starts and when it resumes
  (:attr:`LoaderData.order_note`).

A DataLoader's ``batch_size`` is per process (the global batch is that times
the number of processes); for a Dataset, the run's ``batch_size`` is global,
as for the built-in data. Batches must be ``(inputs, labels)`` pairs (extra
items are ignored).
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler)

from ..data import mix_seed

#: how many samples of each split go into the data fingerprint
PROBES = 8


def is_torch_data(obj: Any) -> bool:
    """True for a ``torch.utils.data`` Dataset or DataLoader, or anything a
    DataLoader takes as a map-style dataset (``__getitem__`` and ``__len__``,
    e.g. a list of pairs)."""
    return isinstance(obj, (Dataset, DataLoader)) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")
                                                       and not isinstance(obj, (str, bytes, dict)))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed sample ``index`` of epoch ``epoch`` is read with: 63 bits of
    SHA-256("normfree:seed:epoch:index"), the same in every process."""
    digest = hashlib.sha256(f"normfree:{int(seed)}:{int(epoch)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed torch's (CPU), Python's and NumPy's global generators with ``seed``
    inside the block; torch's gets its previous state back afterwards (the
    training loop draws dropout and stochastic depth from it). Python's and
    NumPy's stay seeded: the loop does not use them, what they hold afterwards
    is still a function of the last sample read, and saving and restoring them
    would cost more than everything else (0.03 and 0.3 ms per sample)."""
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)  # (torch.manual_seed also seeds every accelerator: 0.5 ms)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        gen.set_state(state)


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: ``dataset[index]`` read under
    :func:`seeded_rngs` of ``sample_seed(seed, epoch, index)``."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        with seeded_rngs(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]


class EpochBatchSampler(Sampler):
    """This process's batches of ``(epoch, index)`` keys over ``indices``.

    Epoch e's order is ``randperm`` of a generator seeded ``mix_seed(seed, e)``
    (or the given order when not ``shuffle``). Global batch b holds positions
    ``[b G, (b + 1) G)``, G = ``batch_size * world``; rank r takes its slice,
    so W processes see the global batches of one. Without ``drop_last`` the
    last, partial global batch is split as evenly as possible. ``skip(k)``
    starts the next pass at batch k."""

    def __init__(self, indices: Sequence[int], batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 rank: int = 0, world: int = 1):
        self.indices = torch.as_tensor(list(indices), dtype=torch.int64)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world = int(seed), rank, world
        self.epoch, self._start = 0, 0

    def __len__(self) -> int:
        n, g = len(self.indices), self.batch_size * self.world
        return n // g if self.drop_last else -(-n // g)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, k: int) -> None:
        if not isinstance(k, int) or not 0 <= k <= len(self):
            raise ValueError(f"skip needs 0 <= k <= {len(self)} (batches per epoch), got {k!r}")
        self._start = k

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return self.indices
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def _positions(self, b: int) -> slice:
        g, bs, n = self.batch_size * self.world, self.batch_size, len(self.indices)
        lo = b * g
        if lo + g <= n:
            return slice(lo + self.rank * bs, lo + (self.rank + 1) * bs)
        share, extra = divmod(n - lo, self.world)
        start = lo + self.rank * share + min(self.rank, extra)
        return slice(start, start + share + (1 if self.rank < extra else 0))

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch, start = self.epoch, self._start
        self._start = 0
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield [(epoch, int(i)) for i in order[self._positions(b)]]


def _pair(batch: Any, where: str) -> Tuple[Any, torch.Tensor]:
    """(inputs, labels) of a batch; ValueError saying what a batch must be."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    what = f"a dict with keys {sorted(batch)[:6]}" if isinstance(batch, dict) else f"a {type(batch).__name__}"
    raise ValueError(f"{where} gave {what}; normfree.train needs (inputs, labels) pairs: make the dataset "
                     f"return (x, y), or give the DataLoader a collate_fn that does")


def _to(x: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    raise ValueError(f"the inputs of a batch must be a tensor, got {type(x).__name__}")


class LoaderBatches:
    """What the loop iterates: ``set_epoch``, ``skip``, ``len`` and ``(x, y)`` on
    the device, from a DataLoader ordered by an :class:`EpochBatchSampler`
    (``sampler`` given) or from the user's loader as it is (``sampler`` None)."""

    def __init__(self, loader: DataLoader, device: torch.device, sampler: Optional[EpochBatchSampler] = None):
        self.loader, self.device, self.sampler = loader, device, sampler
        self.non_blocking = device.type == "cuda" and bool(loader.pin_memory)
        self.epoch, self._start = 0, 0

    def __len__(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            return
        seen = set()
        for s in (self.loader.sampler, self.loader.batch_sampler, getattr(self.loader.batch_sampler, "sampler", None),
                  self.loader.dataset):
            if s is not None and id(s) not in seen and callable(getattr(s, "set_epoch", None)):
                seen.add(id(s))
                s.set_epoch(epoch)

    def skip(self, k: int) -> "LoaderBatches":
        if self.sampler is not None:
            self.sampler.skip(k)
        else:
            self._start = k
        return self

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        start, self._start = self._start, 0
        for i, batch in enumerate(self.loader):
            if i < start:
                continue  # the user's own order: read and drop what the epoch already took
            x, y = _pair(batch, "the training DataLoader")
            yield _to(x, self.device, self.non_blocking), y.to(self.device, torch.int64, non_blocking=self.non_blocking)


# ---------------------------------------------------------------------------- the user's loader
_LOADER_KEYS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                "prefetch_factor", "persistent_workers")


def _loader_kwargs(loader: DataLoader) -> Dict[str, Any]:
    kw = {k: getattr(loader, k) for k in _LOADER_KEYS if hasattr(loader, k)}
    if not kw.get("num_workers"):
        kw.pop("prefetch_factor", None)
        kw.pop("persistent_workers", None)
    return kw


def why_not_reproducible(loader: DataLoader) -> Optional[str]:
    """None when normfree can order ``loader``'s batches itself, else why not."""
    if isinstance(loader.dataset, IterableDataset):
        return f"its dataset is an IterableDataset ({type(loader.dataset).__name__}), which has no indices"
    if loader.batch_size is None:
        return "it has batch_size=None (the dataset makes the batches)"
    if type(loader.batch_sampler) is not BatchSampler:
        return f"it has a custom batch sampler ({type(loader.batch_sampler).__name__})"
    s = loader.sampler
    if type(s) is SequentialSampler:
        return None
    if type(s) is RandomSampler:
        if s.replacement or s._num_samples is not None:
            return "its RandomSampler draws with replacement or a fixed num_samples"
        return None
    return f"its sampler is {type(s).__name__}, not RandomSampler or SequentialSampler"


def _classes(dataset: Any) -> Optional[List[Any]]:
    """The dataset's ``classes`` (torchvision's convention), also through Subset/ConcatDataset wrappers."""
    for _ in range(4):
        classes = getattr(dataset, "classes", None)
        if isinstance(classes, (list, tuple)) and classes:
            return list(classes)
        inner = getattr(dataset, "dataset", None) or (getattr(dataset, "datasets", None) or [None])[0]
        if inner is None:
            return None
        dataset = inner
    return None


def subset_indices(n: int, k: Optional[int], seed: int) -> List[int]:
    """A seeded random subset of k of range(n), in order (all when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values.tolist()


def _hash_samples(h, dataset: Dataset, indices: Sequence[int], seed: int) -> Optional[torch.Size]:
    """Feed the probe samples into ``h``; returns the first input's shape."""
    shape = None
    if not indices:
        return shape
    picks = sorted({indices[round(i * (len(indices) - 1) / max(1, PROBES - 1))] for i in range(PROBES)})
    for i in picks:
        with seeded_rngs(sample_seed(seed, 0, i)):
            x, y = _pair(dataset[i], f"{type(dataset).__name__}[{i}]")
        for t in (torch.as_tensor(x), torch.as_tensor(y)):
            t = t.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        if shape is None:
            shape = torch.as_tensor(x).shape
    return shape


class LoaderData:
    """The pieces :func:`normfree.train.feed.from_torch_data` assembles (see there)."""

    def __init__(self, batches: LoaderBatches, name: str, num_train: int, sample_shape: Optional[torch.Size],
                 classes: Optional[List[Any]], fingerprint: Dict[str, Any], order_note: Optional[str]):
        self.batches, self.name, self.num_train = batches, name, num_train
        self.sample_shape, self.classes = sample_shape, classes
        self.fingerprint, self.order_note = fingerprint, order_note


def train_loader(data: Any, *, batch_size: int, seed: int, num_workers: int, max_examples: Optional[int],
                 rank: int, world: int, device: torch.device) -> LoaderData:
    """The training batches of a Dataset (``batch_size`` per process, shuffled,
    last partial batch dropped) or of a DataLoader (its own batch size and
    ``drop_last``), ordered by normfree where it can (see the module docstring)."""
    h = hashlib.sha256()
    note = None
    if isinstance(data, DataLoader):
        dataset, why = data.dataset, why_not_reproducible(data)
    elif isinstance(data, IterableDataset):
        dataset, why = data, "it is an IterableDataset, which has no indices"
        data = DataLoader(data, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    else:
        dataset, why = data, None
    name = type(dataset).__name__
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError(f"the training data ({name}) has no len(): normfree.train needs the number of batches "
                         f"per epoch; give the dataset a __len__ or use a map-style Dataset") from None
    if why is None:
        indices = subset_indices(n, max_examples, seed)
        if isinstance(data, DataLoader):
            shuffle, drop_last, kw = type(data.sampler) is RandomSampler, data.drop_last, _loader_kwargs(data)
            local = data.batch_size
        else:
            shuffle, drop_last, kw, local = True, True, {"num_workers": num_workers}, batch_size
        sampler = EpochBatchSampler(indices, local, shuffle, drop_last, seed, rank, world)
        loader = DataLoader(SeededSamples(dataset, seed), batch_sampler=sampler, generator=torch.Generator(), **kw)
        batches = LoaderBatches(loader, device, sampler)
        shape = _hash_samples(h, dataset, indices, seed)
        order = "seeded shuffle" if shuffle else "sequential"
    else:
        if max_examples is not None:
            raise ValueError(f"max_train_examples cannot subset this DataLoader ({why}); subset its dataset "
                             f"yourself")
        indices = list(range(n)) if not isinstance(dataset, IterableDataset) else []
        batches = LoaderBatches(data, device)
        try:
            len(batches)
        except TypeError:
            raise ValueError(f"the training DataLoader has no len() ({why}): normfree.train needs the number of "
                             f"batches per epoch") from None
        shape = _hash_samples(h, dataset, indices, seed) if indices else None
        order = f"the loader's own ({why})"
        note = (f"note: normfree cannot order this DataLoader's batches itself: {why}. A resumed run reads and "
                f"drops the batches the epoch already took, and is bit-identical to an uninterrupted one only if "
                f"the loader's order depends on the epoch alone (set_epoch) and its dataset draws no random "
                f"numbers. For exact resume, pass the Dataset (or a DataLoader with shuffle=True/False and no "
                f"sampler) and let normfree order it from the seed.")
        n = len(indices) if indices else n
    if len(batches) < 1:
        raise ValueError(f"the training data ({name}, {n} examples) make no full batch of {batch_size}")
    h.update(order.encode())
    classes = _classes(dataset)
    fp = {"data": name, "train": [len(indices) if why is None else n] + list(shape or []), "test": [],
          "classes": len(classes) if classes else None, "order": order, "sha256": h.hexdigest()}
    return LoaderData(batches, name, len(indices) if why is None else n, shape, classes, fp, note)


def test_loader(data: Any, batch_size: int, num_workers: int) -> DataLoader:
    """A DataLoader over the test data, in order (a DataLoader is used as it is)."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      generator=torch.Generator())


def test_fingerprint(h, data: Any, seed: int) -> Tuple[int, List[int]]:
    """(number of test examples, shape record) and the probes fed into ``h``."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    try:
        n = len(dataset)
    except TypeError:
        return 0, []
    shape = None if isinstance(dataset, IterableDataset) else _hash_samples(h, dataset, list(range(n)), seed)
    return n, [n] + list(shape or [])


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False,
                    channels_last: bool = False) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` in eval mode
    (the model's mode and every global random generator are restored)."""
    from .step import score_batches

    def pairs():
        for batch in loader:
            x, y = _pair(batch, "the test data")
            yield _to(x, device, False), y.to(device, torch.int64)

    devices = [device] if device.type == "cuda" else []
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            loss_sum, correct, n = score_batches(model, pairs(), device, amp, channels_last)
    finally:
        random.setstate(py)
        np.random.set_state(npy)
    if n == 0:
        raise ValueError("the test data are empty: nothing to evaluate on")
    return loss_sum / n, correct / n


def first_batch(batches: LoaderBatches, samples: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """A few training inputs and labels for checking the model (read without
    changing the loop's position or any random stream)."""
    loader = batches.loader
    if batches.sampler is not None:
        keys = [(0, int(i)) for i in batches.sampler.indices[:samples]]
        items = [loader.dataset[k] for k in keys]
        x, y = loader.collate_fn(items) if loader.collate_fn is not None else items[0]
    else:
        devices = [batches.device] if batches.device.type == "cuda" else []
        py, npy = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=devices):
                x, y = _pair(next(iter(loader)), "the training DataLoader")
        finally:
            random.setstate(py)
            np.random.set_state(npy)
    x, y = _pair((x, y), "the training data")
    return _to(x[:samples], batches.device, False), y[:samples].to(batches.device, torch.int64)
