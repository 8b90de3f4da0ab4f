"""Pretraining: next-token cross-entropy over the tokens the loss mask keeps."""

from __future__ import annotations

import torch

from megatron_mm.training.tasks.base import LOSS_REPORT, Task, model_forward


class PretrainTask(Task):
    name = "pretrain"

    def forward(self, model, batch: dict):
        return model_forward(model, batch, with_labels=True, batch_keys=self.batch_keys)

    def loss(self, batch: dict, per_token_loss: torch.Tensor):
        mask = batch["loss_mask"].reshape(-1).float()
        loss_sum = torch.sum(per_token_loss.float().reshape(-1) * mask)
        num_tokens = mask.sum().to(torch.int)
        report = torch.stack([loss_sum.detach().clone(), mask.sum()])
        return loss_sum, num_tokens, {LOSS_REPORT: report}
