"""A family defined in this file alone (config, layer spec, HuggingFace mapping) and registered:
it trains with the loop, exports to HuggingFace files and imports back to the same model. Adding a
family is its file and a line in the registry, nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.nn.functional as F

from megatron_mm.checkpoint import hf_rules
from megatron_mm.models.layers.decoder import DecoderConfig

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ToyConfig(DecoderConfig):
    """A GPT-2-shaped decoder: LayerNorm, a GELU MLP with biases, learned nothing else special."""

    family: str = "toy"

    def family_transformer_fields(self) -> dict:
        return {"normalization": "LayerNorm", "gated_linear_unit": False, "activation_func": F.gelu,
                "add_bias_linear": True}

    def layer_spec(self, transformer_config, backend, vp_stage=None):
        return backend.gpt_layer_spec(qk_layernorm=False, normalization="LayerNorm")

    HF_ARCHITECTURES = ("ToyForCausalLM",)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ToyConfig":
        return cls(**hf_rules.decoder_fields_from_hf(hf))

    def to_hf_config(self) -> dict:
        return hf_rules.decoder_fields_to_hf(self, "ToyForCausalLM", "toy")

    def hf_rules(self) -> list:
        rules = [hf_rules.same("embedding.word_embeddings.weight", "toy.wte.weight"),
                 hf_rules.same("output_layer.weight", "toy.head.weight")]
        rules += [hf_rules.same(f"decoder.final_layernorm.{t}", f"toy.ln_f.{t}") for t in ("weight", "bias")]
        for i in range(self.num_layers):
            o, h = f"decoder.layers.{i}", f"toy.h.{i}"
            rules += [hf_rules.fused_qkv(f"{o}.self_attention.linear_qkv.{t}", f"{h}.q.{t}", f"{h}.k.{t}", f"{h}.v.{t}",
                                         self.num_attention_heads, self.query_groups, self.kv_channels)
                      for t in ("weight", "bias")]
            for ours, theirs in (("input_layernorm", "ln_1"), ("self_attention.linear_proj", "attn_out"),
                                 ("pre_mlp_layernorm", "ln_2"), ("mlp.linear_fc1", "fc_in"), ("mlp.linear_fc2", "fc_out")):
                rules += [hf_rules.same(f"{o}.{ours}.{t}", f"{h}.{theirs}.{t}") for t in ("weight", "bias")]
        return rules


CONFIG_CLASS = ToyConfig


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("toy")
    # A fresh one-rank world: not the rendezvous of any process group this pytest process holds.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_toy_family_trains(toy_run):
    losses = toy_run["losses"]
    assert losses[-1] < 0.9 * losses[0]  # it learns the mock data's token statistics
    assert toy_run["other_seed_losses"][0] != losses[0]  # the losses come from the weights


def test_it_exports_under_its_own_names_and_imports_back_to_the_same_model(toy_run):
    assert toy_run["hf_architectures"] == ["ToyForCausalLM"]
    assert "toy.h.0.q.weight" in toy_run["hf_tensors"] and "toy.ln_f.bias" in toy_run["hf_tensors"]
    assert toy_run["logit_difference"] == 0.0


def _main(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors import safe_open

    from megatron_mm.checkpoint.hf import export_hf, import_hf
    from megatron_mm.training.hf_parity import our_logits
    from megatron_mm.config import load_config
    from megatron_mm.models.registry import register_family
    from megatron_mm.runtime import destroy_distributed
    from megatron_mm.training.loop import setup, train

    register_family("toy", sys.modules[__name__])
    run_losses = {}
    for seed in (1234, 99):
        cfg = load_config(None, [
            "model.family=toy", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
            "model.num_attention_heads=4", "model.vocab_size=128", "model.max_position_embeddings=64",
            "data.mock=true", "data.seq_length=32", "train.precision=fp32", "train.micro_batch_size=4",
            "train.global_batch_size=4", "train.train_iters=20", "train.lr=3e-3", "train.min_lr=3e-3",
            "train.lr_decay_style=constant", "train.log_interval=5", "train.tensorboard=false",
            f"train.seed={seed}", f"train.output_dir={out / f'run{seed}'}", f"train.save={str(seed == 1234).lower()}"])
        losses = train(setup(cfg))
        destroy_distributed()
        run_losses[seed] = [losses[i] for i in sorted(losses)]
    checkpoint = out / "run1234" / "checkpoints" / "iter_0000020"
    hf_dir = export_hf(checkpoint, out / "hf")
    reimported = import_hf(hf_dir, out / "reimported")
    with safe_open(str(next(hf_dir.glob("*.safetensors"))), "pt") as f:
        hf_tensors = sorted(f.keys())
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    difference = (our_logits(checkpoint, tokens) - our_logits(reimported, tokens)).abs().max().item()
    print(json.dumps({
        "losses": run_losses[1234], "other_seed_losses": run_losses[99],
        "hf_architectures": json.loads((hf_dir / "config.json").read_text())["architectures"],
        "hf_tensors": hf_tensors, "logit_difference": difference,
    }))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
