"""`normfree train` under torchrun: 2 CPU processes (gloo, DistributedDataParallel)
follow the same trajectory as one process with the same global batch.

Each rank takes its half of every global batch (same permutation and
augmentation draws), DDP averages the two half-batch gradients, which equals
the full-batch gradient; only the float summation order differs, so the
weights agree to ~1e-6, not bitwise (hence allclose with a small tolerance).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import normfree
from normfree.data import load_dataset
from normfree.train import TrainConfig, load_checkpoint, train

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available in this build", allow_module_level=True)

ARGS = dict(model="nf_wrn", depth=10, width=1, batch_size=32, lr=0.1, steps=6, max_train_examples=256,
            max_test_examples=64, log_every=3, seed=3, device="cpu")


def cli_args(cfg: dict):
    out = []
    for k, v in cfg.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def test_two_process_ddp_matches_single_process(tmp_path):
    out = str(tmp_path / "ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    # --standalone: torchrun binds a free port itself (no window in which another
    # process can take a port picked beforehand)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "normfree.cli", "train", *cli_args(ARGS),
           "--out", out, "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("status ok") == 1  # the summary only from rank 0

    ds = load_dataset("digits")
    single = train(TrainConfig(**ARGS, progress=False), dataset=ds)
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == 6
    torch.manual_seed(ARGS["seed"])  # what train() does before building the model
    init = normfree.create_model("nf_wrn", depth=10, width=1, num_classes=10, in_chans=1).state_dict()
    moved = 0.0
    for k, v in single.model.state_dict().items():
        d = ck["model"][k]
        assert torch.allclose(d, v, rtol=1e-4, atol=1e-5), f"{k}: max diff {(d - v).abs().max():.3g}"
        if v.is_floating_point():
            moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-2  # training moved the weights far more than the DDP/single difference

    # the logged training loss and accuracy are the global batch's (averaged over
    # the ranks), not rank 0's half: they equal the single process's
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    ddp = [(r["step"], r["loss"], r["acc"]) for r in logged if r["kind"] == "train"]
    one = [(r["step"], r["loss"], r["acc"]) for r in single.history if r["kind"] == "train"]
    assert [s for s, _, _ in ddp] == [s for s, _, _ in one] == [3, 6]
    for (_, dl, da), (_, sl, sa) in zip(ddp, one):
        assert dl == pytest.approx(sl, rel=1e-4) and da == pytest.approx(sa, abs=1e-6)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["final_train_loss"] == pytest.approx(single.final_train_loss, rel=1e-4)
