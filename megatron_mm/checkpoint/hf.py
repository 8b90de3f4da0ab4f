"""HuggingFace <-> dist-checkpoint conversion, driven by each family's mapping (models/<family>.py:
HF_ARCHITECTURES, from_hf_config, to_hf_config, hf_rules). Nothing here knows a family.

A converted checkpoint is layout-free: dist_checkpointing reshards on load, so the same directory
loads at any TP/PP/EP. It holds the weights, `config.yaml` (our run config, with the layout asked
for), `train_state.json` (iteration 0) and `hf/` (the original config.json, generation config and
tokenizer files, which export-hf writes back). Start training from it with `train.init_from=DIR`.

Vocabulary tensors get zero rows up to the model's padded vocabulary on import (their logits are
masked, models/layers/decoder.py) and lose them on export. Exporting a run trained from scratch also writes its
tokenizer (data.tokenizer_model) as transformers loads it, with the BOS/EOS ids in the configs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_mm.checkpoint.hf_rules import HFConversionError, Rule, padded_rows
from megatron_mm.checkpoint.streaming import (
    CheckpointReader,
    PlannedTensor,
    SafetensorsReader,
    SafetensorsWriter,
    save_model_streaming,
)
from megatron_mm.models.layers.backend import LocalBackend, select_backend
from megatron_mm.runtime.layout import smallest_world_size

HF_SUBDIR = "hf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Our tensors with a row per vocabulary entry (the language model's, in a multimodal model too).
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")
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

    # The backend this machine trains with: its checkpoint keys are the ones training will ask for
    # (TE fuses some norms into linears, which megatron-core's MLA keys do not hide).
    backend = select_backend(model_cfg.backend)
    tconfig = model_cfg.transformer_config(ParallelConfig(), TrainConfig(precision="fp32"), backend,
                                           batch_p2p_comm=True)
    tconfig.perform_initialization = False
    tconfig.params_dtype = dtype  # the stored dtype (fp32-only buffers such as expert biases stay fp32)
    with torch.device("meta"):
        model = model_cfg.build(tconfig, backend, pre_process=True, post_process=True)
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
    vocab, padded = model_cfg.vocab_size, model_cfg.padded_vocab_size()
    return [padded_rows(rule, vocab, padded) if padded > vocab and rule.ours.endswith(VOCAB_TENSORS) else rule
            for rule in rules]


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _progress(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="tensor", dynamic_ncols=True)


# ---- import ---------------------------------------------------------------------------------------
def import_hf(hf_dir: str | Path, output: str | Path, tp: int = 1, pp: int = 1, ep: int = 1,
              fresh_mtp: bool = False) -> Path:
    """HuggingFace directory -> our dist-checkpoint at `output`. Returns `output`.

    Multi-token-prediction layers the config declares but the weights lack (transformers saves none:
    its model has no MTP) are left out, or with `fresh_mtp` freshly initialised."""
    from megatron_mm.checkpoint.dist_ckpt import TRAIN_STATE_FILE, TrainState

    hf_dir, output = Path(hf_dir), Path(output)
    if output.exists() and any(output.iterdir()):
        raise HFConversionError(f"{output} exists and is not empty")
    hf_config = read_hf_config(hf_dir)
    source = SafetensorsReader(hf_dir)
    model_cfg, initialised_mtp = _absent_mtp(family_config_from_hf(hf_config), source, fresh_mtp)
    cfg = _run_config(model_cfg, tp, pp, ep)
    model_cfg = cfg.model
    mapped_cfg = dataclasses.replace(model_cfg, mtp_num_layers=None) if initialised_mtp else model_cfg
    if any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        cfg.data.tokenizer_model = str((output / HF_SUBDIR).resolve())

    staging = output.with_name(output.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with single_rank():
        sharded = meta_state_dict(model_cfg, source.main_dtype())
        entries = tensor_entries(sharded)
        mapped = entries if mapped_cfg is model_cfg else tensor_entries(meta_state_dict(mapped_cfg))
        rules = {entries[rule.ours][0]: rule for rule in checked_rules(mapped_cfg, mapped)}
        fresh = {entries[name][0]: name for name in sorted(set(entries) - set(mapped))}
        _check_hf_tensors(source, rules.values())
        _check_shapes(source, rules.values(), entries)
        init = _fresh_init(model_cfg) if fresh else None
        bar = _progress(len(rules) + len(fresh), f"import {model_cfg.family}")
        done, errors = set(), []

        def materialize(name: str) -> torch.Tensor:
            if name in fresh:
                tensor = init(fresh[name], sharded[name].data)
            else:
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


def _absent_mtp(model_cfg, source: SafetensorsReader, fresh_mtp: bool):
    """(the model to build, whether its multi-token-prediction layers start freshly initialised).
    MTP layers the config declares but the weights hold none of are left out, or with `fresh_mtp`
    initialised; each case says so in one line."""
    layers = getattr(model_cfg, "mtp_num_layers", None) or 0
    without = dataclasses.replace(model_cfg, mtp_num_layers=None) if layers else model_cfg
    mtp_tensors = {name for rule in model_cfg.hf_rules() for name in rule.hf} - {
        name for rule in without.hf_rules() for name in rule.hf}
    absent = layers and not mtp_tensors & source.names()
    if fresh_mtp and not absent:
        state = "holds multi-token-prediction weights" if layers else "declares no multi-token-prediction layers"
        raise HFConversionError(f"--fresh-mtp: {source.directory} {state}")
    if not absent:
        return model_cfg, False
    declared = f"{source.directory}: config.json declares {layers} multi-token-prediction layer(s), the weights hold none"
    if fresh_mtp:
        print(f"{declared}: starting them freshly initialised", flush=True)
        return model_cfg, True
    print(f"{declared}: importing without MTP (--fresh-mtp starts freshly initialised ones)", flush=True)
    return without, False


def _fresh_init(model_cfg):
    """init(name, meta tensor) -> a tensor initialised as megatron-core initialises that parameter:
    norms at one (zero when zero-centred), other vectors (biases, expert biases) at zero, output
    projections with the scaled normal, every other weight with the normal of init_method_std."""
    from megatron_mm.config import ParallelConfig, TrainConfig

    tconfig = model_cfg.transformer_config(ParallelConfig(), TrainConfig(precision="fp32"), LocalBackend(),
                                           batch_p2p_comm=True)

    def init(name: str, meta: torch.Tensor) -> torch.Tensor:
        tensor = torch.empty(meta.shape, dtype=meta.dtype)
        if re.search(r"(norm\.weight|layer_norm_weight)$", name):
            return tensor.fill_(0.0 if tconfig.layernorm_zero_centered_gamma else 1.0)
        if tensor.dim() < 2:
            return tensor.zero_()
        if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            return tconfig.output_layer_init_method(tensor)
        return tconfig.init_method(tensor)

    return init


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
    from megatron_mm.runtime import validate_layout

    if tp > 0 and model_cfg.padded_vocab_size() % tp:  # a TP that does not divide VOCAB_TP_MULTIPLE pads further
        model_cfg = dataclasses.replace(model_cfg, vocab_pad_multiple=math.lcm(model_cfg.vocab_pad_multiple, tp))
    moe = hasattr(model_cfg, "num_experts")
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, sequence_parallel=moe and tp > 1)
    data = DataConfig(tokenizer_type="huggingface", seq_length=min(4096, model_cfg.max_position_embeddings))
    cfg = Config(model=model_cfg, parallel=parallel, data=data)
    world = smallest_world_size(tp, pp, ep)
    check = dataclasses.replace(cfg, data=dataclasses.replace(data, mock=True),
                                train=dataclasses.replace(cfg.train, global_batch_size=world // (tp * pp)))
    try:
        validate_layout(check, world)
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
              max_shard_bytes: int = 5 << 30, transforms=()) -> Path:
    """Our dist-checkpoint (any layout) -> HuggingFace safetensors shards + config + tokenizer files.
    `transforms`: the run's model transforms (training.setup.model_transforms), which may change the
    conversion rules."""
    from megatron_mm.config import load_config

    checkpoint, output = resolve_checkpoint(checkpoint), Path(output)
    if output.exists() and any(output.iterdir()):
        raise HFConversionError(f"{output} exists and is not empty")
    run_cfg = load_config(checkpoint / "config.yaml")
    model_cfg = run_cfg.model
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
    try:
        if saved_dir.is_dir():
            _copy_side_files(saved_dir, staging)
        if run_cfg.data.tokenizer_model and not any((staging / name).is_file() for name in TOKENIZER_FILES):
            special_ids = _export_tokenizer(run_cfg.data, checkpoint, staging)  # a run not imported from HF
            for key, value in special_ids.items():
                hf_config.setdefault(key, value)
            if not (staging / "generation_config.json").is_file():
                from transformers import GenerationConfig

                GenerationConfig(**special_ids).save_pretrained(staging)
        out_dtype = _export_weights(checkpoint, model_cfg, staging, dtype or _config_dtype(hf_config), max_shard_bytes,
                                    transforms)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    hf_config["torch_dtype" if "torch_dtype" in hf_config and "dtype" not in hf_config else "dtype"] = (
        str(out_dtype).removeprefix("torch."))
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if output.exists():
        output.rmdir()
    staging.rename(output)
    return output


def _export_weights(checkpoint: Path, model_cfg, staging: Path, dtype: Optional[torch.dtype],
                    max_shard_bytes: int, transforms=()) -> torch.dtype:
    """The HuggingFace tensors of our checkpoint, written as safetensors shards in `dtype` (default:
    the checkpoint's); returns the dtype written."""
    with single_rank():
        reader = CheckpointReader(checkpoint)
        entries = tensor_entries(meta_state_dict(model_cfg, reader.main_dtype))
        rules = checked_rules(model_cfg, entries)
        for transform in transforms:
            rules = transform.export_rules(rules)
        out_dtype = dtype or reader.main_dtype
        plan = [PlannedTensor(name, out_dtype, tuple(tensor.shape))
                for rule in rules for name, tensor in zip(rule.hf, rule.to_hf(entries[rule.ours][1].data))]
        writer = SafetensorsWriter(staging, plan, max_shard_bytes)
        for rule in _progress_iter(rules, f"export {model_cfg.family}"):
            ours = reader.load(*entries[rule.ours])
            for name, tensor in zip(rule.hf, rule.to_hf(ours)):
                writer.write(name, tensor.to(out_dtype))
        writer.close()
    return out_dtype


def _export_tokenizer(data, checkpoint: Path, target: Path) -> dict:
    """The run's tokenizer (data.tokenizer_type / tokenizer_model) written as transformers' AutoTokenizer
    loads it, encoding text to the ids training saw (no BOS added); returns its bos/eos token ids."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from megatron_mm.data.tokenizer import build_tokenizer

    source = Path(data.tokenizer_model)
    try:
        ours = build_tokenizer(data.tokenizer_type, str(source))
    except (OSError, ValueError) as err:
        raise HFConversionError(f"{checkpoint / 'config.yaml'}: data.tokenizer_model cannot be exported: {err}") from None
    if data.tokenizer_type == "sentencepiece":
        import sentencepiece

        pieces = sentencepiece.SentencePieceProcessor(model_file=str(source))
        special = {name: pieces.id_to_piece(i) for name, i in (
            ("bos_token", pieces.bos_id()), ("eos_token", ours.eod), ("unk_token", pieces.unk_id()),
            ("pad_token", pieces.pad_id())) if i >= 0}
        shutil.copy2(source, target / "tokenizer.model")
        # transformers builds the tokenizer from the sentencepiece model's own normalizer settings and
        # saves it as tokenizer.json.
        (target / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special}, indent=2) + "\n")
        tokenizer = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    elif source.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    else:  # a bare tokenizer.json: special tokens from a tokenizer_config.json beside it, as training read them
        beside = source.with_name("tokenizer_config.json")
        named = json.loads(beside.read_text()) if beside.is_file() else {}
        special = {name: value.get("content") if isinstance(value, dict) else value for name, value in named.items()
                   if name in ("bos_token", "unk_token")}
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(source), **special)
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ours.eod)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(ours.pad)
    tokenizer.save_pretrained(str(target))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": ours.eod}
    return {key: value for key, value in ids.items() if value is not None}


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
