"""Import a HuggingFace model, train it with our loop at TP2, export it, and load the result in
transformers: its loss on a batch equals ours, and the weights did change."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import hf_tensors

from megatron_mm.runtime.distributed import free_port


def test_import_train_export(imported, tmp_path):
    from transformers import Qwen3Config

    from megatron_mm.checkpoint.hf import export_hf
    from megatron_mm.training.hf_parity import cross_entropy, hf_model, our_logits

    config = Qwen3Config(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    hf_dir, checkpoint = imported(config)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "megatron_mm.pretrain", "--config", str(checkpoint / "config.yaml"),
               "parallel.tp=2", "data.mock=true", "data.seq_length=32", "train.precision=fp32",
               "train.micro_batch_size=2", "train.global_batch_size=2", "train.train_iters=3",
               "train.lr=1e-3", "train.min_lr=1e-3", "train.lr_decay_style=constant", "train.save_interval=3",
               "train.log_interval=1", "train.tensorboard=false", f"train.output_dir={run}",
               f"train.init_from={checkpoint}"]
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"

    exported = export_hf(run, tmp_path / "exported")
    before, after = hf_tensors(hf_dir), hf_tensors(exported)
    assert sorted(before) == sorted(after)
    assert any(not torch.equal(before[name], after[name]) for name in before), "training changed nothing"

    tokens = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(1))
    ours = cross_entropy(our_logits(run / "checkpoints" / "iter_0000003", tokens), tokens)
    with torch.no_grad():
        theirs = hf_model(exported)(input_ids=tokens, labels=tokens).loss.item()
    print(f"loss after 3 steps: ours {ours:.6f}, transformers {theirs:.6f}")
    assert abs(ours - theirs) <= 1e-5 * abs(theirs)
