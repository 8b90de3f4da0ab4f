"""megatron-core's config dataclasses, filled from our config plus the `megatron:` passthrough
mappings (config.py), each passthrough value checked against the dataclass it fills:

    model.megatron     -> TransformerConfig (the family's class: MLATransformerConfig for MLA families)
    parallel.megatron  -> megatron.core.distributed.DistributedDataParallelConfig
    train.megatron     -> megatron.core.optimizer.OptimizerConfig

Each builder starts from the fields our config sets and lays the passthrough over them. Refused, in
one line: a name that is no field of that dataclass (with the closest spelling, or the section it
belongs to), a field one of our keys sets (naming the key), a field that makes the family or that
megatron_mm fixes (norm, activation, routing, per-token loss, ...). Defaults we only choose for
speed (the backend's fused kernels, fp32 gradient reduction) may be overridden.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing

import torch

from megatron_mm.config import MEGATRON_NAMES, PASSTHROUGH, ConfigError, coerce_value

# megatron-core's own pipeline split options, which would bypass runtime/layout.py's checks.
SPLIT_FIELDS = ("pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                "account_for_loss_in_pipeline_split")
SECTION_CLASSES = {"model": "TransformerConfig", "parallel": "DistributedDataParallelConfig",
                   "train": "OptimizerConfig"}


def transformer_config(config_class, ours: dict, passthrough: dict, family: str, overridable=()):
    """config_class(**ours), with model.megatron laid over it."""
    fields = _lay_over(config_class, ours, passthrough, "model", f"model.family={family}", overridable)
    return _construct(config_class, fields)


def ddp_config(cfg):
    """The DistributedDataParallelConfig of a run: parallel.* and parallel.megatron."""
    from megatron.core.distributed import DistributedDataParallelConfig

    p = cfg.parallel
    defaults = dict(grad_reduce_in_fp32=True)  # bf16/fp16 runs reduce gradients in fp32 unless told otherwise
    ours = dict(defaults, overlap_grad_reduce=p.overlap_grad_reduce, overlap_param_gather=p.overlap_param_gather,
                use_distributed_optimizer=p.distributed_optimizer)
    fields = _lay_over(DistributedDataParallelConfig, ours, p.megatron, "parallel", "megatron_mm", defaults)
    return _construct(DistributedDataParallelConfig, fields)


def optimizer_config(cfg, transformer_config):
    """The OptimizerConfig of a run: train.* and train.megatron, in the model's precision (fp16 brings
    megatron-core's dynamic loss scaler, tuned by train.megatron.initial_loss_scale and the like)."""
    from megatron.core.optimizer import OptimizerConfig

    t = cfg.train
    ours = dict(
        optimizer=t.optimizer,
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=transformer_config.bf16,
        fp16=transformer_config.fp16,
        params_dtype=transformer_config.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    return _construct(OptimizerConfig, _lay_over(OptimizerConfig, ours, t.megatron, "train", "megatron_mm"))


def check_passthrough(cfg, backend) -> None:
    """Builds the three configs when a passthrough is given, so that a bad one fails before any
    process group exists (megatron-core takes seconds to import: only then)."""
    if cfg.model.megatron or cfg.parallel.megatron or cfg.train.megatron:
        tconfig = cfg.model.transformer_config(cfg.parallel, cfg.train, backend, batch_p2p_comm=False)
        ddp_config(cfg)
        optimizer_config(cfg, tconfig)


def _lay_over(config_class, ours: dict, passthrough: dict, section: str, owner: str, overridable=()) -> dict:
    hints = _field_hints(config_class)
    fields = dict(ours)
    for name, value in passthrough.items():
        where = f"{section}.{PASSTHROUGH}.{name}"
        if name in MEGATRON_NAMES:
            raise ConfigError(f"{where} is set by {MEGATRON_NAMES[name]}: use that key")
        if name in SPLIT_FIELDS and section == "model":
            raise ConfigError(f"{where} is not supported: split the pipeline with parallel.first_stage_layers "
                              "and parallel.last_stage_layers")
        if name not in hints:
            raise ConfigError(_unknown_field(name, section, hints))
        if name in ours and name not in overridable:
            raise ConfigError(f"{where} is set by {owner}: not a passthrough setting")
        fields[name] = _coerce(value, hints[name], where)
    return fields


def _unknown_field(name: str, section: str, hints: dict) -> str:
    where = f"{section}.{PASSTHROUGH}.{name}"
    for other in SECTION_CLASSES:
        if other != section and name in _section_field_names(other):
            return f"{where} is a {SECTION_CLASSES[other]} field: set {other}.{PASSTHROUGH}.{name}"
    close = difflib.get_close_matches(name, list(hints), n=1, cutoff=0.6)
    hint = f"; did you mean '{section}.{PASSTHROUGH}.{close[0]}'?" if close else ""
    return f"unknown {SECTION_CLASSES[section]} field '{where}'{hint}"


def _coerce(value, hint, where: str):
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if torch.dtype in options:  # by name: float32, bfloat16, float16
        if value is None and type(None) in options:
            return None
        dtype = getattr(torch, str(value), None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"{where} must be a torch dtype name (float32, bfloat16, float16), got {value!r}")
        return dtype
    return coerce_value(value, hint, where)


def _construct(config_class, fields: dict):
    try:
        return config_class(**fields)
    except (AssertionError, ValueError) as err:  # megatron-core's own consistency checks
        message = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"megatron-core rejects this {config_class.__name__}: {message}") from None


@functools.cache
def _field_hints(config_class) -> dict:
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class) if f.init}


@functools.cache
def _section_field_names(section: str) -> frozenset:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    config_class = {"model": MLATransformerConfig, "parallel": DistributedDataParallelConfig,
                    "train": OptimizerConfig}[section]
    return frozenset(_field_hints(config_class))
