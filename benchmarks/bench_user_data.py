"""What feeding a user's torch Dataset costs, side by side in one process.

One epoch of batches (no model) from the same images, round-robin, median of
--rounds passes:

* builtin:  normfree's in-memory Batches (uint8 on the device, normalized per batch)
* plain:    torch DataLoader(TensorDataset, shuffle=True), per-sample indexing + collate
* normfree: the trainer's path for a user Dataset (torchdata.train_loader): the same
            DataLoader machinery, normfree's seeded order, each sample read with its
            own seeded generators (what makes resume exact)

Prints samples/s and the ratio to plain; the difference normfree - plain is the
price of per-sample seeding.

    .venv/bin/python benchmarks/bench_user_data.py [--n 4096] [--batch 128] [--rounds 5]
"""
import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from normfree.data import Batches
from normfree.train.torchdata import train_loader


def epoch_time(batches) -> float:
    t = time.perf_counter()
    n = 0
    for x, y in batches:
        n += len(y)
    return time.perf_counter() - t, n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="images (3x32x32)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.n,), generator=g)
    ds = TensorDataset(x8.float().div(255), y)
    paths = {
        "builtin": lambda: Batches(x8, y, args.batch, [0.5] * 3, [0.25] * 3, shuffle=True, drop_last=True),
        "plain": lambda: DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True),
        "normfree": lambda: train_loader(ds, batch_size=args.batch, seed=0, num_workers=0, max_examples=None,
                                         rank=0, world=1, device=torch.device("cpu")).batches,
    }
    times = {k: [] for k in paths}
    for _ in range(args.rounds):
        for k, make in paths.items():
            t, n = epoch_time(make())
            times[k].append(n / t)
    plain = statistics.median(times["plain"])
    print(f"{'path':10s} {'samples/s':>12s} {'x plain':>8s}")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:10s} {med:12.0f} {med / plain:8.2f}")
    per_sample = 1 / statistics.median(times["normfree"]) - 1 / plain
    print(f"per-sample seeding: {1e6 * per_sample:.0f} us per sample")


if __name__ == "__main__":
    main()
