"""Training steps of the real loop (pretrain.setup, pretrain.train_step) from a checkpoint on fixed token
rows, under torchrun; writes each step's loss from the rank that holds it.

    torchrun --nproc_per_node N tests/parity/train_steps_driver.py --checkpoint CKPT --tokens ROWS.pt \
        --steps S --out LOSSES.json [section.key=value ...]

ROWS.pt holds int64 [samples, seq + 1]: a row gives a sample's tokens (all but the last) and labels (all
but the first); every step trains on all rows (one global batch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from megatron_mm.config import load_config
    from megatron_mm.runtime import destroy_distributed
    from megatron_mm.training import loop as pretrain
    from megatron_mm.training.batches import MicroBatches

    rows = torch.load(args.tokens)
    samples, seq = rows.shape[0], rows.shape[1] - 1
    checkpoint = Path(args.checkpoint)
    cfg = load_config(checkpoint / "config.yaml", [
        "data.mock=true", f"data.seq_length={seq}", "train.precision=fp32", "train.micro_batch_size=1",
        f"train.global_batch_size={samples}", f"train.train_iters={args.steps}", "train.lr_warmup_iters=0",
        f"train.init_from={checkpoint}", "train.resume=none", "train.tensorboard=false", *args.overrides])
    trainer = pretrain.setup(cfg)
    data = [{"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(seq), "position_ids": torch.arange(seq)}
            for row in rows]
    batches = MicroBatches(data, 0, 1, trainer.dp_rank, trainer.dp_size)
    for chunk in trainer.model:
        chunk.train()
    losses = []
    for _ in range(args.steps):
        batches.next_sample = 0  # every step: the same global batch
        losses.append(pretrain.train_step(trainer, batches)[0])
    if losses[0] is not None and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        Path(args.out).write_text(json.dumps(losses))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
