"""The conversion tool's contract: the layout it records, and what it refuses, saying what is wrong:
unknown architectures, config fields the mapping cannot represent, missing / extra / mis-shaped
tensors, bad layouts, occupied outputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, hf_tensors, tiny_hf_model

from megatron_mm.checkpoint.hf import import_hf
from megatron_mm.checkpoint.hf_rules import HFConversionError


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return tiny_hf_model(config, tmp_path_factory.mktemp("llama") / "hf")


def _variant(source, target, edit_config=None, edit_tensors=None):
    """A copy of a HuggingFace directory with its config and/or tensors edited."""
    from safetensors.torch import save_file

    shutil.copytree(source, target)
    if edit_config:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = hf_tensors(source)
        edit_tensors(tensors)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_unknown_architecture_lists_supported(llama_dir, tmp_path):
    hf_dir = _variant(llama_dir, tmp_path / "hf", edit_config=lambda c: c.update(architectures=["FooForCausalLM"]))
    with pytest.raises(HFConversionError, match=r"FooForCausalLM.*supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        import_hf(hf_dir, tmp_path / "out")


def test_unrepresentable_fields_are_named(llama_dir, tmp_path):
    def edit(config):
        config.update(attention_bias=True, hidden_act="gelu")

    hf_dir = _variant(llama_dir, tmp_path / "hf", edit_config=edit)
    with pytest.raises(HFConversionError, match=r"hidden_act='gelu'.*attention_bias=True"):
        import_hf(hf_dir, tmp_path / "out")


def test_missing_and_extra_tensors_are_named(llama_dir, tmp_path):
    def edit(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(2, 2)

    hf_dir = _variant(llama_dir, tmp_path / "hf", edit_tensors=edit)
    with pytest.raises(HFConversionError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight.*"
                                                r"refusing to drop them\): model\.layers\.1\.mlp\.extra_proj\.weight"):
        import_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_is_named(llama_dir, tmp_path):
    hf_dir = _variant(llama_dir, tmp_path / "hf", edit_config=lambda c: c.update(intermediate_size=96))
    with pytest.raises(HFConversionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*shape \(128, 32\).*"
                                                r"decoder\.layers\.0\.mlp\.linear_fc1\.weight.*\(192, 32\)"):
        import_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layout_the_model_cannot_take(llama_dir, tmp_path):
    with pytest.raises(HFConversionError, match=r"layout tp=3.*num_attention_heads=4 is not divisible"):
        import_hf(llama_dir, tmp_path / "out", tp=3)


def test_tool_reports_errors_in_one_line(llama_dir, tmp_path):
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "file").write_text("x")
    command = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "import-hf", "--hf-dir",
               str(llama_dir), "--output", str(tmp_path / "occupied")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'occupied'} exists and is not empty"


def test_tool_records_the_layout_and_tokenizer(llama_dir, tmp_path):
    from megatron_mm.config import load_config

    hf_dir = _variant(llama_dir, tmp_path / "hf")
    (hf_dir / "tokenizer.json").write_text("{}")
    command = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "import-hf", "--hf-dir", str(hf_dir),
               "--output", str(tmp_path / "ckpt"), "--tp", "2", "--pp", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(tmp_path / "ckpt" / "config.yaml")
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep) == (2, 2, 1)
    assert cfg.data.tokenizer_model == str((tmp_path / "ckpt" / "hf").resolve())
    assert (tmp_path / "ckpt" / "hf" / "tokenizer.json").read_text() == "{}"


def test_transformer_engine_names_reach_the_local_rules():
    """With TE the model names fused norms and grouped experts differently; the rules use local names."""
    from megatron_mm.checkpoint.hf import canonical_name

    layer = "decoder.layers.2."
    assert canonical_name(layer + "self_attention.linear_qkv.layer_norm_weight") == layer + "input_layernorm.weight"
    assert canonical_name(layer + "mlp.linear_fc1.layer_norm_weight") == layer + "pre_mlp_layernorm.weight"
    assert (canonical_name(layer + "self_attention.linear_q_up_proj.layer_norm_weight")
            == layer + "self_attention.q_layernorm.weight")
    assert canonical_name(layer + "mlp.experts.linear_fc2.weight7") == layer + "mlp.experts.local_experts.7.linear_fc2.weight"
    assert canonical_name(layer + "self_attention.linear_proj.weight") == layer + "self_attention.linear_proj.weight"


def test_sharded_checkpoints_in_and_out(tmp_path):
    """A HuggingFace model in several safetensors files with an index converts, and export writes
    shards + index that transformers loads back to the same tensors."""
    from transformers import LlamaConfig

    from megatron_mm.checkpoint.hf import export_hf
    from megatron_mm.training.hf_parity import hf_model

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    hf_dir = tiny_hf_model(config, tmp_path / "hf", max_shard_size="40KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    import_hf(hf_dir, tmp_path / "ckpt")
    exported = export_hf(tmp_path / "ckpt", tmp_path / "exported", max_shard_bytes=40 << 10)
    weight_map = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    original = hf_tensors(hf_dir)
    assert sorted(weight_map) == sorted(original)
    loaded = hf_model(exported).state_dict()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name


def test_bf16_checkpoint_round_trip_and_fp32_parity(tmp_path):
    """Published checkpoints are bf16: stored as such, loaded into fp32 parameters for the parity run,
    exported back in the config's dtype bit for bit."""
    from conftest import assert_round_trip, check_parity
    from transformers import Qwen3Config

    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, dtype="bfloat16")
    hf_dir = tiny_hf_model(config, tmp_path / "hf")
    from safetensors.torch import save_file

    bf16 = hf_tensors(hf_dir)

    save_file({name: t.to(torch.bfloat16) for name, t in bf16.items()}, hf_dir / "model.safetensors",
              metadata={"format": "pt"})
    hf_config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**hf_config, "dtype": "bfloat16"}))
    checkpoint = import_hf(hf_dir, tmp_path / "ckpt")
    assert_round_trip(hf_dir, checkpoint, tmp_path / "exported")
    assert all(t.dtype == torch.bfloat16 for t in hf_tensors(tmp_path / "exported").values())
    assert check_parity(hf_dir, checkpoint) < 1e-4


def test_hub_style_config_with_rope_scaling(llama_dir, tmp_path):
    """Published configs predate transformers 5: top-level rope_theta / rope_scaling and torch_dtype.
    They import, and the exported config means the same to transformers."""
    from transformers import AutoConfig

    from megatron_mm.checkpoint.hf import export_hf

    def edit(config):
        config.pop("rope_parameters", None)
        config["torch_dtype"] = config.pop("dtype")
        config.update(rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192})

    hf_dir = _variant(llama_dir, tmp_path / "hf", edit_config=edit)
    import_hf(hf_dir, tmp_path / "ckpt")
    exported = export_hf(tmp_path / "ckpt", tmp_path / "exported")
    before, after = AutoConfig.from_pretrained(hf_dir), AutoConfig.from_pretrained(exported)
    assert after.rope_parameters == before.rope_parameters
    assert after.rope_parameters["rope_type"] == "llama3"
    assert json.loads((exported / "config.json").read_text())["torch_dtype"] == "float32"


def _truncated(data: bytes, length: int, header: dict) -> bytes:
    return data[: len(data) // 2]


def _stub(data: bytes, length: int, header: dict) -> bytes:
    return data[:5]


def _header_past_end_of_file(data: bytes, length: int, header: dict) -> bytes:
    return struct.pack("<Q", len(data)) + data[8:]


def _bad_json(data: bytes, length: int, header: dict) -> bytes:
    return data[:8] + b"{not json" + data[17:]


def _offsets_past_end(data: bytes, length: int, header: dict) -> bytes:
    name = next(key for key in header if key != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start + len(data), end + len(data)]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length:]


@pytest.mark.parametrize("damage, problem", [
    (_truncated, r"data_offsets \[\d+, \d+\] past the end of the file's \d+ data bytes \(truncated\?\)"),
    (_stub, r"truncated safetensors file \(5 bytes, shorter than its 8-byte header size\)"),
    (_header_past_end_of_file, r"truncated safetensors file \(a \d+-byte header in a \d+-byte file\)"),
    (_bad_json, r"safetensors header is not valid JSON"),
    (_offsets_past_end, r"data_offsets \[\d+, \d+\] past the end"),
], ids=["truncated", "stub", "header-length", "header-json", "offsets"])
@pytest.mark.parametrize("tool", ["convert_checkpoint", "check_hf_parity"])
def test_damaged_safetensors_is_one_line(llama_dir, tmp_path, damage, problem, tool):
    hf_dir = _variant(llama_dir, tmp_path / "hf")
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    path.write_bytes(damage(data, length, json.loads(data[8:8 + length])))
    command = [sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--hf-dir", str(hf_dir)]
    if tool == "convert_checkpoint":
        command[2:2] = ["import-hf"]
        command += ["--output", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}  # stderr: the tool's own lines
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.fullmatch(rf"error: {re.escape(str(path))}: .*{problem}.*", lines[0]), lines[0]
    assert not (tmp_path / "out").exists()
