"""One training step and one evaluation pass."""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               label_smoothing: float = 0.0, amp: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward (bf16 autocast when ``amp``), cross-entropy, backward, optimizer
    step. Returns the batch's loss and accuracy as detached 0-dim tensors on the
    device (no host sync)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = net(x)
    logits = logits.float()
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        acc = (logits.argmax(1) == y).float().mean()
    return loss.detach(), acc


@torch.no_grad()
def evaluate(model: nn.Module, x_uint8, y, mean, std, batch_size: int = 512, device=None,
             amp: bool = False, channels_last: bool = False) -> Tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy of ``model`` on uint8
    images ``x_uint8`` [N, C, H, W] with labels ``y``, normalized by ``mean``/``std``
    (per channel), in eval mode (the model's mode is restored afterwards)."""
    from ..data import Batches

    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    n = len(y)
    if n == 0:
        raise ValueError("evaluate needs at least one example")
    batches = Batches(x_uint8, y, batch_size, mean, std, shuffle=False, augment=False, drop_last=False,
                      device=str(device))
    loss_sum, correct, _ = score_batches(model, batches, device, amp, channels_last)
    return loss_sum / n, correct / n


@torch.no_grad()
def score_batches(model: nn.Module, pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                  amp: bool = False, channels_last: bool = False) -> Tuple[float, int, int]:
    """Summed cross-entropy (no label smoothing), number correct and number of
    examples of ``model`` over ``(inputs, labels)`` pairs already on ``device``,
    in eval mode (the model's mode is restored). Sums are kept on the device in
    float64 / int64: one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        for x, y in pairs:
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += len(y)
    finally:
        model.train(was_training)
    return float(loss_sum), int(correct), n
