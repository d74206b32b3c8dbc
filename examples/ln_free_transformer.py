"""Train a small transformer without LayerNorm, with a zero-initialized gain per residual branch.

The task is synthetic and needs attention: reverse a sequence of random digits
(output position i must read input position L-1-i). The model is a plain
PyTorch transformer encoder (token + learned position embeddings, ``--depth``
blocks, a linear read-out); its blocks are pre-norm (``x + f(LN(x))``) or
post-norm (``LN(x + f(x))``, ``--post-norm``).

``--gain`` chooses how the LayerNorm-free model is stabilized:

* ``block``: ``normfree.convert(model, "skipinit", blocks=model.blocks)`` removes
  every LayerNorm and wraps each block in ``normfree.SkipGain``:
  ``y = x + g (block(x) - x)``, one gain per block, initialized to 0;
* ``branch``: the LayerNorms are removed the same way and each sub-layer gets its
  own gain, ``block.attn = normfree.BranchGain(block.attn)`` (ReZero's layout);
* ``none``: LayerNorms removed, nothing added (the unstabilized baseline);
* ``--keep-ln``: the ordinary transformer, for comparison.

    python examples/ln_free_transformer.py                       # LN-free, SkipGain per block
    python examples/ln_free_transformer.py --gain branch --depth 8
    python examples/ln_free_transformer.py --keep-ln --gain none  # the usual LayerNorm transformer
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import normfree


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """A transformer block: pre-norm x + attn(LN(x)), x + mlp(LN(x)), or post-norm."""

    def __init__(self, dim: int, heads: int, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 10, length: int = 12, dim: int = 64, heads: int = 4, depth: int = 4,
                 post_norm: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, post_norm) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.blocks(self.embed(tokens) + self.pos)))


def build(gain: str = "block", keep_ln: bool = False, **kwargs) -> nn.Module:
    """The model for ``--gain`` / ``--keep-ln`` (see the module docstring)."""
    model = Transformer(**kwargs)
    if gain == "block":
        if keep_ln:
            raise ValueError("gain='block' removes the LayerNorms: SkipGain needs blocks of the form x + f(x)")
        return normfree.convert(model, "skipinit", blocks=list(model.blocks))
    if not keep_ln:
        model = normfree.convert(model, "none", blocks=list(model.blocks))  # every LayerNorm removed
    if gain == "branch":
        for block in model.blocks:
            block.attn = normfree.BranchGain(block.attn)
            block.mlp = normfree.BranchGain(block.mlp)
    return model


def batch(n: int, length: int, vocab: int, generator: torch.Generator):
    x = torch.randint(0, vocab, (n, length), generator=generator)
    return x, x.flip(1)


def train(model: nn.Module, steps: int = 300, batch_size: int = 64, lr: float = 3e-3, length: int = 12,
          vocab: int = 10, seed: int = 0, log_every: int = 0):
    """AdamW on fresh random sequences; returns (losses, accuracy on a held-out batch)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        x, y = batch(batch_size, length, vocab, g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:5d}  loss {sum(losses[-log_every:]) / log_every:.4f}")
    model.eval()
    x, y = batch(512, length, vocab, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    return losses, acc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gain", choices=["block", "branch", "none"], default="block")
    p.add_argument("--keep-ln", action="store_true", help="keep the LayerNorms (the usual transformer)")
    p.add_argument("--post-norm", action="store_true", help="post-norm blocks LN(x + f(x)) instead of pre-norm")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.keep_ln and args.gain == "block":
        p.error("--keep-ln with --gain block: SkipGain needs blocks of the form x + f(x); use --gain branch or none")
    torch.manual_seed(args.seed)
    model = build(args.gain, args.keep_ln, depth=args.depth, dim=args.dim, post_norm=args.post_norm)
    norms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    print(f"{args.depth} {'post' if args.post_norm else 'pre'}-norm blocks, gain={args.gain}, LayerNorms: {norms}")
    t = time.time()
    losses, acc = train(model, steps=args.steps, lr=args.lr, seed=args.seed, log_every=max(1, args.steps // 10))
    print(f"final loss {sum(losses[-20:]) / len(losses[-20:]):.4f}, held-out accuracy {acc:.3f} "
          f"({time.time() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
