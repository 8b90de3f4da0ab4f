"""What a training objective gives the one loop (training/loop.py): the keys of its batches, the
forward step megatron-core's schedules call, and the loss of one micro-batch.

A loss is a sum over tokens (or pairs, or sequences) and the count it sums over: megatron-core's
`calculate_per_token_loss` divides the summed gradients by the global count. The loss also returns
a report {LOSS_REPORT: [sum, count]} that stays on the device and on this data-parallel rank; the
loop reduces the reports of many micro-batches at once.
"""

from __future__ import annotations

import functools

import torch

from megatron_mm.runtime.device import compute_device
from megatron_mm.training.batches import BATCH_KEYS

LOSS_REPORT = "loss"


class Task:
    """A training objective. Subclasses set `name` and implement `forward` and `loss`."""

    name: str
    # Stacked per sample; every other key of a batch is media for a multimodal model.
    batch_keys: tuple[str, ...] = BATCH_KEYS

    def forward_step(self, data_iterator, model):
        """megatron-core's forward_step_func: the model's output and the function that turns it into
        (loss sum, count, report)."""
        batch = batch_to_device(next(data_iterator))
        return self.forward(model, batch), functools.partial(self.loss, batch)

    def forward(self, model, batch: dict):
        raise NotImplementedError

    def loss(self, batch: dict, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        raise NotImplementedError


def batch_to_device(batch: dict) -> dict:
    device = compute_device()
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def model_forward(model, batch: dict, with_labels: bool, batch_keys: tuple[str, ...] = BATCH_KEYS):
    """Per-token losses [B, S] (with labels) or logits [B, S, V], aligned with batch["tokens"].
    Keys beyond `batch_keys` are media for a multimodal model."""
    position_ids = batch["position_ids"]
    if position_ids.dim() == 3:  # M-RoPE: [B, 3, S] -> [3, B, S]
        position_ids = position_ids.transpose(0, 1).contiguous()
    media = {key: value for key, value in batch.items() if key not in batch_keys}
    labels = batch["labels"] if with_labels else None
    return model(batch["tokens"], position_ids, None, labels=labels, **media)
