"""The device this rank computes on."""

from __future__ import annotations

import torch


def compute_device():
    """This rank's CUDA device (NCCL reduces CUDA tensors), else the CPU (gloo)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
