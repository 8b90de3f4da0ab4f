"""The layer-backend seam: every family's model takes its attention and linear modules from the
backend it is built with, and a backend that swaps them in computes what the local one computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mm.errors import UserError
from megatron_mm.models.layers.backend import LocalBackend, select_backend

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
TINY_MOE = ROOT / "tests" / "distributed" / "tiny_qwen3_moe.yaml"
CASES = {
    "llama3": (CONFIGS / "tiny_llama3.yaml", ["data.mock=true", "model.vocab_size=512"]),
    "mistral": (CONFIGS / "tiny_mistral.yaml", []),
    "qwen3": (CONFIGS / "tiny_qwen3.yaml", []),
    "gemma3": (CONFIGS / "tiny_gemma3.yaml", []),
    "qwen3_moe": (TINY_MOE, []),
    "deepseek_v3": (CONFIGS / "tiny_deepseek_v3.yaml", []),
    "llava_clip_mlp": (CONFIGS / "tiny_llava.yaml", []),
    "llava_siglip_resampler": (CONFIGS / "tiny_llava.yaml", ["model.vision_encoder_type=siglip",
                                                            "model.projector_type=resampler"]),
    "qwen2_vl": (CONFIGS / "tiny_qwen2_vl.yaml", []),
    "qwen2_vl_moe": (CONFIGS / "tiny_qwen2_vl_moe.yaml", []),
    "qwen2_audio": (CONFIGS / "tiny_audio_lm.yaml", []),
}
# Linears that are the same class on every backend, by design: GPTModel builds its output layer
# itself; the affine projector's linear and the resampler's output gather across TP ranks (TE
# linears cannot); megatron-core's MLA accepts only its own classes for the latent down-projections.
FIXED_LINEARS = ("output_layer", "projector.encoder", "projector.output", "linear_q_down_proj",
                 "linear_kv_down_proj")


def test_auto_is_local_without_transformer_engine():
    assert select_backend("auto").name == "local"
    assert select_backend("local").name == "local"


def test_te_without_transformer_engine_is_one_line():
    with pytest.raises(UserError) as err:
        select_backend("te")
    assert "model.backend=te needs Transformer Engine" in str(err.value) and "\n" not in str(err.value)


def test_unknown_backend_names_the_choices():
    with pytest.raises(UserError, match="model.backend='tee' is not one of auto, te, local"):
        select_backend("tee")


@pytest.fixture(scope="module")
def built() -> dict:
    # A fresh one-rank world: not the rendezvous of any process group this pytest process holds.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_every_attention_and_linear_comes_from_the_backend(built, case):
    c = built[case]
    assert c["attention_modules"] > 0 and c["linears"] > 0
    assert c["not_from_backend"] == []


@pytest.mark.parametrize("case", CASES)
def test_a_backend_swapping_modules_computes_the_same(built, case):
    c = built[case]
    assert c["same_parameters"]
    assert c["loss_local"] == c["loss_swapped"]


def _swapping_backend():
    """The local backend with every module it hands out replaced by a subclass of it that
    computes the same: what a new backend looks like to the spec builders."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_mm.models.layers.backend import LocalMLACoreAttention

    swapped = {base: type(f"Swapped{base.__name__}", (base,), {})
               for base in (DotProductAttention, LocalMLACoreAttention, ColumnParallelLinear, RowParallelLinear)}

    class SwappingBackend(LocalBackend):
        name = "swapping"

        def core_attention(self):
            return swapped[DotProductAttention]

        def mla_core_attention(self):
            return swapped[LocalMLACoreAttention]

        def column_linear(self):
            return swapped[ColumnParallelLinear]

        def row_linear(self):
            return swapped[RowParallelLinear]

    return SwappingBackend(), tuple(swapped.values())


def _build_main() -> None:
    """Runs in a fresh process: a one-rank world; each case built with both backends."""
    sys.path.insert(0, str(ROOT))
    import torch
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_mm.config import load_config
    from megatron_mm.runtime import init_distributed, set_seed
    from megatron_mm.training.batches import MicroBatches, build_datasets
    from megatron_mm.training.loop import model_forward

    init_distributed()
    swapping, swapped_classes = _swapping_backend()
    results = {}
    for case, (path, overrides) in CASES.items():
        cfg = load_config(path, ["train.precision=fp32", *overrides])
        train, _, _ = build_datasets(cfg, None, (4, 0, 0))
        batch = next(MicroBatches(train, 0, 2, 0, 1))
        losses, states = {}, {}
        for name, backend in (("local", LocalBackend()), ("swapped", swapping)):
            set_seed(cfg.train.seed)
            tconfig = cfg.model.transformer_config(cfg.parallel, cfg.train, backend, batch_p2p_comm=False)
            model = cfg.model.build(tconfig, backend, pre_process=True, post_process=True).eval()
            with torch.no_grad():
                losses[name] = float((model_forward(model, batch, with_labels=True) * batch["loss_mask"]).sum())
            states[name] = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        attention = [(n, m) for n, m in model.named_modules() if isinstance(m, DotProductAttention)]
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
                   and not n.endswith(FIXED_LINEARS)]
        results[case] = {
            "attention_modules": len(attention),
            "linears": len(linears),
            "not_from_backend": [n for n, m in attention + linears if not isinstance(m, swapped_classes)],
            "same_parameters": states["local"].keys() == states["swapped"].keys() and all(
                torch.equal(states["local"][k], states["swapped"][k]) for k in states["local"]),
            "loss_local": losses["local"],
            "loss_swapped": losses["swapped"],
        }
    print(json.dumps(results))


if __name__ == "__main__":
    _build_main()
