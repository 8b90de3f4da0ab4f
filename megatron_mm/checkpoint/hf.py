"""HuggingFace <-> dist-checkpoint conversion, driven by each family's mapping (models/<family>.py:
HF_ARCHITECTURES, from_hf_config, to_hf_config, hf_rules). Nothing here knows a family.

A converted checkpoint is layout-free: dist_checkpointing reshards on load, so the same directory
loads at any TP/PP/EP. It holds the weights, `config.yaml` (our run config, with the layout asked
for), `train_state.json` (iteration 0) and `hf/` (the original config.json, generation config and
tokenizer files, which export-hf writes back). Start training from it with `train.init_from=DIR`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_mm.checkpoint.hf_parity import parity_world_size
from megatron_mm.checkpoint.hf_rules import HFConversionError, Rule
from megatron_mm.checkpoint.streaming import (
    CheckpointReader,
    PlannedTensor,
    SafetensorsReader,
    SafetensorsWriter,
    save_model_streaming,
)

HF_SUBDIR = "hf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Buffers some checkpoints carry that are recomputed from the config, not weights.
DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFConversionError(f"{hf_dir}: no config.json")
    return json.loads(path.read_text())


def family_config_from_hf(hf_config: dict):
    from megatron_mm.models.registry import family_for_hf_architecture

    return family_for_hf_architecture(hf_config).from_hf_config(hf_config)


@contextlib.contextmanager
def single_rank():
    """A world of one with megatron-core's groups at TP1/PP1/EP1: conversion runs in one process."""
    from megatron_mm.runtime import destroy_distributed, init_distributed, set_seed

    if torch.distributed.is_initialized():
        raise RuntimeError("checkpoint conversion runs as a single process, not under torchrun")
    saved_env = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    init_distributed()
    set_seed(0)
    try:
        yield
    finally:
        destroy_distributed()
        for key, value in saved_env.items():  # later launches must not inherit our private port
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def meta_state_dict(model_cfg, dtype: torch.dtype = torch.float32) -> dict:
    """The sharded state dict of a one-rank model built on the meta device (no memory for weights)
    with parameters in `dtype`: our parameter names -> megatron-core ShardedTensor / factory / object
    entries."""
    from megatron.core import parallel_state

    from megatron_mm.config import ParallelConfig, TrainConfig
    from megatron_mm.runtime import transformer_engine_available

    # The backend this machine trains with: its checkpoint keys are the ones training will ask for
    # (TE fuses some norms into linears, which megatron-core's MLA keys do not hide).
    use_te = transformer_engine_available()
    tconfig = model_cfg.transformer_config(ParallelConfig(), TrainConfig(precision="fp32"), use_te=use_te,
                                           batch_p2p_comm=True)
    tconfig.perform_initialization = False
    tconfig.params_dtype = dtype  # the stored dtype (fp32-only buffers such as expert biases stay fp32)
    with torch.device("meta"):
        model = model_cfg.build(tconfig, use_te, pre_process=True, post_process=True)
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return model.sharded_state_dict(metadata={"dp_cp_group": group})


# Transformer Engine module names -> the local-spec names the families' rules are written in.
TE_NAME_ALIASES = (
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"linear_q_up_proj\.layer_norm_weight$"), "q_layernorm.weight"),
    (re.compile(r"linear_kv_up_proj\.layer_norm_weight$"), "kv_layernorm.weight"),
    (re.compile(r"experts\.(linear_fc[12])\.weight(\d+)$"), r"experts.local_experts.\2.\1.weight"),
)


def canonical_name(name: str) -> str:
    for pattern, replacement in TE_NAME_ALIASES:
        if pattern.search(name):
            return pattern.sub(replacement, name)
    return name


def tensor_entries(sharded_state_dict: dict) -> dict:
    """Our tensors by the names the rules use -> (name in the sharded state dict, its entry)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {canonical_name(name): (name, entry) for name, entry in sharded_state_dict.items()
            if not isinstance(entry, ShardedObject)}


def checked_rules(model_cfg, entries: dict) -> list[Rule]:
    """The family's rules, checked to cover every one of our tensors exactly once."""
    rules = model_cfg.hf_rules()
    ours = [rule.ours for rule in rules]
    unmapped = sorted(set(entries) - set(ours))
    unknown = sorted(set(ours) - set(entries))
    repeated = sorted({name for name in ours if ours.count(name) > 1})
    problems = []
    if unmapped:
        problems.append(f"no HuggingFace mapping for {_names(unmapped)}")
    if unknown:
        problems.append(f"mapping names tensors the model does not have: {_names(unknown)}")
    if repeated:
        problems.append(f"mapped more than once: {_names(repeated)}")
    if problems:
        raise HFConversionError(f"{model_cfg.family} mapping: " + "; ".join(problems))
    return rules


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _progress(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="tensor", dynamic_ncols=True)


# ---- import ---------------------------------------------------------------------------------------
def import_hf(hf_dir: str | Path, output: str | Path, tp: int = 1, pp: int = 1, ep: int = 1) -> Path:
    """HuggingFace directory -> our dist-checkpoint at `output`. Returns `output`."""
    from megatron_mm.checkpoint.dist_ckpt import TRAIN_STATE_FILE, TrainState

    hf_dir, output = Path(hf_dir), Path(output)
    if output.exists() and any(output.iterdir()):
        raise HFConversionError(f"{output} exists and is not empty")
    hf_config = read_hf_config(hf_dir)
    model_cfg = family_config_from_hf(hf_config)
    cfg = _run_config(model_cfg, tp, pp, ep)
    if any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        cfg.data.tokenizer_model = str((output / HF_SUBDIR).resolve())
    source = SafetensorsReader(hf_dir)

    staging = output.with_name(output.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with single_rank():
        sharded = meta_state_dict(model_cfg, source.main_dtype())
        entries = tensor_entries(sharded)
        rules = {entries[rule.ours][0]: rule for rule in checked_rules(model_cfg, entries)}
        _check_hf_tensors(source, rules.values())
        _check_shapes(source, rules.values(), entries)
        bar = _progress(len(rules), f"import {model_cfg.family}")
        done, errors = set(), []

        def materialize(name: str) -> torch.Tensor:
            rule = rules[name]
            try:
                tensor = rule.to_ours(source.get(rule.hf))
            except HFConversionError as err:  # torch.distributed.checkpoint would wrap it
                errors.append(err)
                raise
            tensor = tensor.to(sharded[name].data.dtype)  # e.g. a bf16 model's odd fp32 tensor
            if name not in done:
                done.add(name)
                bar.update(1)
            return tensor

        try:
            save_model_streaming(sharded, staging, materialize)
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)
            if errors:
                raise errors[0] from None
            raise
        bar.close()

    cfg.save(staging / "config.yaml")
    (staging / TRAIN_STATE_FILE).write_text(json.dumps(dataclasses.asdict(TrainState(0, 0, {}))))
    _copy_side_files(hf_dir, staging / HF_SUBDIR)
    if output.exists():
        output.rmdir()
    staging.rename(output)
    return output


def _check_hf_tensors(source: SafetensorsReader, rules) -> None:
    needed = {name for rule in rules for name in rule.hf}
    present = source.names()
    missing = sorted(needed - present)
    extra = sorted(name for name in present - needed if not name.endswith(DERIVED_SUFFIXES))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if extra:
        problems.append(f"tensors the mapping does not use (refusing to drop them): {_names(extra)}")
    if problems:
        raise HFConversionError(f"{source.directory}: " + "; ".join(problems))


def _check_shapes(source: SafetensorsReader, rules, entries: dict) -> None:
    """Every rule applied to shape-only stand-ins, before a byte is written."""
    for rule in rules:
        try:
            shape = tuple(rule.to_ours(source.meta(rule.hf)).shape)
        except RuntimeError as err:  # e.g. q/k/v that cannot be grouped as the config says
            raise HFConversionError(f"{', '.join(rule.hf)} do not fit {rule.ours}: {err}") from None
        expected = tuple(entries[rule.ours][1].data.shape)
        if shape != expected:
            raise HFConversionError(
                f"{', '.join(rule.hf)} give shape {shape} for {rule.ours}; the config implies {expected}")


def _run_config(model_cfg, tp: int, pp: int, ep: int):
    """Our run config for the imported model at the asked layout, checked for that layout."""
    from megatron_mm.config import Config, ConfigError, DataConfig, ParallelConfig
    from megatron_mm.runtime import transformer_engine_available, validate_layout

    moe = hasattr(model_cfg, "num_experts")
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, sequence_parallel=moe and tp > 1)
    data = DataConfig(tokenizer_type="huggingface", seq_length=min(4096, model_cfg.max_position_embeddings))
    cfg = Config(model=model_cfg, parallel=parallel, data=data)
    world = parity_world_size(tp, pp, ep)
    check = dataclasses.replace(cfg, data=dataclasses.replace(data, mock=True),
                                train=dataclasses.replace(cfg.train, global_batch_size=world // (tp * pp)))
    try:
        validate_layout(check, world, transformer_engine_available())
    except ConfigError as err:
        raise HFConversionError(f"layout tp={tp} pp={pp} ep={ep}: {err}") from None
    return cfg


def _copy_side_files(source: Path, target: Path) -> None:
    """config.json, generation config, tokenizer files: everything but the weights."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in WEIGHT_INDEXES:
            shutil.copy2(path, target / path.name)


# ---- export ---------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run's output directory (its latest checkpoint)."""
    from megatron_mm.checkpoint.dist_ckpt import TRAIN_STATE_FILE, find_latest_checkpoint

    path = Path(path)
    if (path / TRAIN_STATE_FILE).is_file():
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise HFConversionError(f"{path}: not a checkpoint, and no checkpoint under {path / 'checkpoints'}")
    return latest


def export_hf(checkpoint: str | Path, output: str | Path, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = 5 << 30) -> Path:
    """Our dist-checkpoint (any layout) -> HuggingFace safetensors shards + config + tokenizer files."""
    from megatron_mm.config import load_config

    checkpoint, output = resolve_checkpoint(checkpoint), Path(output)
    if output.exists() and any(output.iterdir()):
        raise HFConversionError(f"{output} exists and is not empty")
    model_cfg = load_config(checkpoint / "config.yaml").model
    saved_dir = checkpoint / HF_SUBDIR
    hf_config = json.loads((saved_dir / "config.json").read_text()) if (saved_dir / "config.json").is_file() else {}
    ours = model_cfg.to_hf_config()
    if "rope_parameters" in ours:  # older configs' rope_scaling would take precedence over it
        hf_config.pop("rope_scaling", None)
        hf_config.pop("rope_theta", None)
    hf_config.update(ours)

    staging = output.with_name(output.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with single_rank():
        reader = CheckpointReader(checkpoint)
        entries = tensor_entries(meta_state_dict(model_cfg, reader.main_dtype))
        rules = checked_rules(model_cfg, entries)
        out_dtype = dtype or _config_dtype(hf_config) or reader.main_dtype
        plan = [PlannedTensor(name, out_dtype, tuple(tensor.shape))
                for rule in rules for name, tensor in zip(rule.hf, rule.to_hf(entries[rule.ours][1].data))]
        writer = SafetensorsWriter(staging, plan, max_shard_bytes)
        for rule in _progress_iter(rules, f"export {model_cfg.family}"):
            ours = reader.load(*entries[rule.ours])
            for name, tensor in zip(rule.hf, rule.to_hf(ours)):
                writer.write(name, tensor.to(out_dtype))
        writer.close()

    if saved_dir.is_dir():
        _copy_side_files(saved_dir, staging)
    hf_config["torch_dtype" if "torch_dtype" in hf_config and "dtype" not in hf_config else "dtype"] = (
        str(out_dtype).removeprefix("torch."))
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if output.exists():
        output.rmdir()
    staging.rename(output)
    return output


def _progress_iter(items: list, description: str):
    bar = _progress(len(items), description)
    for item in items:
        yield item
        bar.update(1)
    bar.close()


def _config_dtype(hf_config: dict) -> Optional[torch.dtype]:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else None
