"""Peak memory of import-hf and export-hf: the conversion streams tensor by tensor, so its peak
should follow the largest tensor group, not the model size.

Builds a random Llama of a few GB with a tiny width and many layers (written shard by shard, so
making it needs no memory either), converts it both ways with tools/convert_checkpoint.py, and
reports each direction's peak resident set size (RSS). Baseline, measured in the same run: the same
conversions of a two-layer model of the same width, i.e. the interpreter, torch, megatron-core and
a meta-device model with nothing streamed. What the big model adds over that baseline is compared
with the model's size and with its largest tensor group; the per-layer Python structures (the
meta-device model and rules, which grow with the layer count but hold no tensor data) are measured
separately.

    python bench/convert_memory.py [--layers 800] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTH = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=32000)


def make_hf_model(directory: Path, layers: int) -> tuple[int, int]:
    """A random Llama written tensor by tensor. Returns (total bytes, largest tensor group bytes)."""
    from megatron_mm.checkpoint.streaming import PlannedTensor, SafetensorsWriter

    h, f, v = WIDTH["hidden_size"], WIDTH["intermediate_size"], WIDTH["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                       f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (h, h),
                       f"{p}.self_attn.v_proj.weight": (h, h), f"{p}.self_attn.o_proj.weight": (h, h),
                       f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h),
                       f"{p}.mlp.down_proj.weight": (h, f)})
    plan = [PlannedTensor(name, torch.float32, shape) for name, shape in shapes.items()]
    directory.mkdir(parents=True)
    writer = SafetensorsWriter(directory, plan, max_shard_bytes=1 << 30)
    generator = torch.Generator().manual_seed(0)
    for tensor in plan:
        writer.write(tensor.name, torch.randn(tensor.shape, generator=generator) * 0.02)
    writer.close()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "dtype": "float32", **WIDTH}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    total = sum(t.nbytes for t in plan)
    largest = max(PlannedTensor("", torch.float32, (v, h)).nbytes, 2 * f * h * 4)  # embedding; fused gate+up
    return total, largest


def peak_rss(command: list[str]) -> int:
    """Run a command; return its peak RSS in bytes (Linux reports ru_maxrss in KiB)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read()[-3000:]}")
    return usage.ru_maxrss * 1024


BOOKKEEPING = """
import sys, psutil
from megatron_mm.checkpoint.hf import meta_state_dict, single_rank, tensor_entries
from megatron_mm.config import load_config
model = load_config(sys.argv[1]).model
with single_rank():
    before = psutil.Process().memory_info().rss
    entries, rules = tensor_entries(meta_state_dict(model)), model.hf_rules()
    print(psutil.Process().memory_info().rss - before)
"""


def bookkeeping_bytes(checkpoint: Path) -> int:
    """RSS of the converter's per-layer structures alone: the meta-device model, its sharded state
    dict and the rules (no tensor data)."""
    result = subprocess.run([sys.executable, "-c", BOOKKEEPING, str(checkpoint / "config.yaml")],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def convert_both_ways(work: Path, layers: int) -> dict:
    total, largest = make_hf_model(work / "hf", layers)
    tool = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
    import_peak = peak_rss([*tool, "import-hf", "--hf-dir", str(work / "hf"), "--output", str(work / "ckpt")])
    export_peak = peak_rss([*tool, "export-hf", "--checkpoint", str(work / "ckpt"), "--output", str(work / "out"),
                            "--max-shard-size", "1GB"])
    return {"layers": layers, "total": total, "largest": largest, "import": import_peak, "export": export_peak,
            "bookkeeping": bookkeeping_bytes(work / "ckpt")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=800)
    parser.add_argument("--keep", help="keep the models under this directory")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="convert_memory_"))
    try:
        base = convert_both_ways(root / "baseline", 2)
        big = convert_both_ways(root / "big", args.layers)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    mib = 1 << 20
    print(f"model: {args.layers} layers, hidden {WIDTH['hidden_size']}, {big['total'] / mib:.0f} MiB fp32; "
          f"largest tensor group {big['largest'] / mib:.1f} MiB")
    print(f"baseline: the same tools on a 2-layer model ({base['total'] / mib:.0f} MiB)")
    structures = big["bookkeeping"] - base["bookkeeping"]
    print(f"per-layer structures (meta-device model, sharded state dict, rules): {structures / mib:.0f} MiB more "
          f"than the baseline's")
    print(f"{'direction':<10} {'peak RSS':>10} {'baseline':>10} {'added':>10} {'added/model':>12} {'added/largest':>14}")
    for direction in ("import", "export"):
        added = big[direction] - base[direction]
        print(f"{direction:<10} {big[direction] / mib:>8.0f}Mi {base[direction] / mib:>8.0f}Mi {added / mib:>8.0f}Mi "
              f"{added / big['total']:>11.3f}x {added / big['largest']:>13.2f}x")


if __name__ == "__main__":
    main()
