"""Per-rank memory of model parameters, gradient buffers and optimizer state under each layout.

Baseline: the same model on one rank (TP1/PP1/DP1), measured in the same run. For a layout over N
ranks the goal is that the largest rank holds 1/N of the baseline's sharded bytes within 5%:
parameters and gradients for TP and PP; optimizer state (fp32 Adam moments) for the distributed
optimizer over DP.

    python bench/memory.py            # launches every layout with torchrun on CPU (gloo)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = ["model.family=llama3", "model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=1024",
         "model.num_attention_heads=8", "model.num_query_groups=4", "model.vocab_size=2048",
         "model.max_position_embeddings=64"]
TRAIN = ["data.mock=true", "data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.train_iters=1", "train.log_interval=1", "train.tensorboard=false"]

# name: (ranks, overrides, which quantity the layout divides)
LAYOUTS = {
    "TP2": (2, ["parallel.tp=2"], ("params", "grads", "optimizer")),
    "PP2": (2, ["parallel.pp=2"], ("params", "grads", "optimizer")),
    "DistOpt-DP2": (2, ["parallel.distributed_optimizer=true"], ("optimizer",)),
}


def measure(overrides: list[str], out: Path) -> None:
    """Worker: build the run, take one step (Adam creates its state lazily), record local bytes."""
    import torch

    from megatron_mm.config import load_config
    from megatron_mm.runtime import destroy_distributed
    from megatron_mm.training import loop as pretrain

    trainer = pretrain.setup(load_config(None, overrides))
    pretrain.train(trainer)
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    params = nbytes(p for chunk in trainer.model for p in chunk.parameters())
    grads = nbytes(buf.grad_data for chunk in trainer.model for buf in chunk.buffers)
    optimizer = nbytes(
        value for state in _optimizer_states(trainer.optimizer) for value in state.values() if torch.is_tensor(value)
    )
    record = {"params": params, "grads": grads, "optimizer": optimizer}
    (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(record))
    destroy_distributed()


def _optimizer_states(optimizer):
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield from inner.optimizer.state.values()


def launch(nproc: int, overrides: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               __file__, "--worker", tmp, *MODEL, *TRAIN, f"train.output_dir={tmp}/run", *overrides]
        env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    baseline = launch(1, [])[0]
    print(f"baseline (1 rank): params {baseline['params']:,} B, grads {baseline['grads']:,} B, "
          f"optimizer {baseline['optimizer']:,} B")
    print(f"{'layout':<13} {'quantity':<10} {'largest rank':>14} {'ideal 1/N':>12} {'ratio':>7}  within 5%")
    for name, (nproc, overrides, divided) in LAYOUTS.items():
        ranks = launch(nproc, overrides)
        for quantity in divided:
            largest = max(r[quantity] for r in ranks)
            ideal = baseline[quantity] / nproc
            ratio = largest / ideal
            print(f"{name:<13} {quantity:<10} {largest:>14,} {ideal:>12,.0f} {ratio:>7.3f}  "
                  f"{'yes' if abs(ratio - 1) <= 0.05 else 'no'}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        measure(sys.argv[3:], Path(sys.argv[2]))
    else:
        main()
