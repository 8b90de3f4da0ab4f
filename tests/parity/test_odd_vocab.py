"""Vocabularies that no tensor-parallel size divides (1,001; GPT-2's 50,257): imported with their
embedding and output rows padded, the same checkpoint runs at one rank, TP2 and TP2xPP2 with
transformers' logits, and export trims the padding off again (the original vocab_size and tensors,
bit for bit)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_round_trip, check_parity

from megatron_mm.models.layers.decoder import VOCAB_TP_MULTIPLE
from megatron_mm.runtime.distributed import free_port

SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def llama3(vocab_size):
    from transformers import LlamaConfig

    return LlamaConfig(**SMALL, vocab_size=vocab_size, intermediate_size=160)


def qwen3_tied(vocab_size):
    from transformers import Qwen3Config

    return Qwen3Config(**SMALL, vocab_size=vocab_size, intermediate_size=160, head_dim=16, tie_word_embeddings=True)


def qwen3_moe(vocab_size):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**SMALL, vocab_size=vocab_size, intermediate_size=128, num_experts=4,
                          moe_intermediate_size=32, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0])


def padded_rows(checkpoint) -> set[int]:
    """Row counts of the checkpoint's vocabulary tensors."""
    from megatron_mm.checkpoint.hf import VOCAB_TENSORS
    from megatron_mm.checkpoint.streaming import CheckpointReader

    reader = CheckpointReader(checkpoint)
    return {md.size[0] for key, md in reader.metadata.state_dict_metadata.items() if key.endswith(VOCAB_TENSORS)}


@pytest.mark.parametrize("make_config, vocab_size", [(llama3, 1001), (qwen3_tied, 50257), (qwen3_moe, 50257)],
                         ids=["llama3-1001", "qwen3_tied-50257", "qwen3_moe-50257"])
def test_odd_vocabulary(imported, tmp_path, make_config, vocab_size):
    hf_dir, checkpoint = imported(make_config(vocab_size))
    padded = -(-vocab_size // VOCAB_TP_MULTIPLE) * VOCAB_TP_MULTIPLE
    assert padded_rows(checkpoint) == {padded}
    assert_round_trip(hf_dir, checkpoint, tmp_path / "exported")
    assert check_parity(hf_dir, checkpoint, tp=2) < 1e-4
    assert check_parity(hf_dir, checkpoint, tp=2, pp=2) < 1e-4


def train_steps(checkpoint, rows, out, nproc: int, *overrides: str) -> list[float]:
    """Losses of training steps on `rows` (tests/parity/train_steps_driver.py under torchrun)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    tokens = out.with_suffix(".pt")
    torch.save(rows, tokens)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
               str(ROOT / "tests" / "parity" / "train_steps_driver.py"), "--checkpoint", str(checkpoint),
               "--tokens", str(tokens), "--steps", "3", "--out", str(out), *overrides]
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_training_loss_leaves_out_padded_logits(imported, tmp_path):
    """The loss training computes (megatron-core's vocab-parallel cross entropy over the padded
    vocabulary) equals transformers' over the real one, and TP2 trains as one rank does."""
    from megatron_mm.training.hf_parity import cross_entropy, hf_logits

    hf_dir, checkpoint = imported(llama3(1001))
    rows = torch.randint(0, 1001, (4, 33), generator=torch.Generator().manual_seed(2))
    one_rank = train_steps(checkpoint, rows, tmp_path / "one_rank.json", 1)
    tp2 = train_steps(checkpoint, rows, tmp_path / "tp2.json", 2, "parallel.tp=2")
    theirs = cross_entropy(hf_logits(hf_dir, rows), rows)
    print(f"first-step loss: transformers {theirs:.6f}, one rank {one_rank[0]:.6f}, TP2 {tp2[0]:.6f}; "
          f"then one rank {one_rank[1:]}, TP2 {tp2[1:]}")
    assert abs(one_rank[0] - theirs) <= 1e-5 * theirs
    assert tp2 == pytest.approx(one_rank, rel=1e-5)
    assert one_rank[2] < one_rank[0]


def test_tensor_parallel_beyond_the_shared_multiple(tmp_path):
    """--tp 16 does not divide a vocabulary padded for TP up to 8: that import pads to a multiple of 16
    and records it, and the layouts up to 8 share one padding."""
    from conftest import tiny_hf_model
    from transformers import LlamaConfig

    from megatron_mm.checkpoint.hf import import_hf
    from megatron_mm.config import load_config

    config = LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
    hf_dir = tiny_hf_model(config, tmp_path / "hf")
    rows = {}
    for tp in (1, 8, 16):
        checkpoint = import_hf(hf_dir, tmp_path / f"tp{tp}", tp=tp)
        rows[tp] = padded_rows(checkpoint)
        assert load_config(checkpoint / "config.yaml").model.padded_vocab_size() % tp == 0
    assert rows[1] == rows[8] == {-(-50257 // VOCAB_TP_MULTIPLE) * VOCAB_TP_MULTIPLE}
    assert rows[16] == {-(-50257 // 16) * 16} != rows[8]
