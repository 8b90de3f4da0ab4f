"""Run configuration as data: dataclasses, a YAML file, and `section.key=value` overrides.

Values are type-checked against the dataclass fields; unknown keys are errors that name the closest
valid spelling (Megatron-LM's argument names, e.g. tensor_model_parallel_size, point to ours). Nothing
in config text is evaluated.

megatron-core settings this config does not name are passed through by their megatron-core names, in a
`megatron:` mapping of the section whose dataclass they fill (megatron_mm/megatron_settings.py):
    model.megatron      TransformerConfig (MLATransformerConfig for MLA families)
    parallel.megatron   megatron.core.distributed.DistributedDataParallelConfig
    train.megatron      megatron.core.optimizer.OptimizerConfig
On the command line: `model.megatron.cross_entropy_loss_fusion=true`. A field one of our keys sets
(MEGATRON_NAMES) or that makes the family is refused, naming ours.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_mm.errors import ConfigError


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: Optional[int] = None  # virtual pipeline stages (model chunks) per pipeline rank
    cp: int = 1  # context parallel (refused until the batch is split across context-parallel ranks)
    ep: int = 1  # expert parallel
    # Uneven pipeline: decoder layers on the first / last stage (None = an even share); the middle
    # stages split the rest evenly.
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    megatron: dict[str, Any] = field(default_factory=dict)  # DistributedDataParallelConfig fields


@dataclass
class DataConfig:
    # Indexed-dataset prefixes, optionally weighted: ["0.7", "a_text_document", "0.3", "b_text_document"].
    blend: list[str] = field(default_factory=list)
    split: str = "98,1,1"
    tokenizer_type: str = "sentencepiece"
    tokenizer_model: Optional[str] = None
    seq_length: int = 2048
    mock: bool = False  # synthetic tokens (benchmarks, smoke runs): no data files needed
    cache_dir: Optional[str] = None


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 1000
    exit_interval: Optional[int] = None  # save and stop at the next multiple of this (Megatron-LM's)
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"  # cosine | linear | constant | WSD
    lr_decay_iters: Optional[int] = None  # default: train_iters
    lr_wsd_decay_iters: Optional[int] = None  # WSD: length of the final decay phase
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    optimizer: str = "adam"  # adam | sgd (momentum: train.megatron.sgd_momentum)
    seed: int = 1234
    # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (dynamic loss scaling; its settings are
    # OptimizerConfig's: train.megatron.initial_loss_scale, loss_scale_window, hysteresis, loss_scale)
    precision: str = "auto"
    recompute: str = "none"  # none | selective | full
    log_interval: int = 10
    eval_interval: Optional[int] = None
    eval_iters: int = 2
    save_interval: Optional[int] = None
    # Every run ends with a checkpoint (finished, exit_interval, or stopped by a signal); false writes none at all.
    save: bool = True
    output_dir: str = "outputs/run"
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir) | none | a checkpoint dir
    # On resume, the learning-rate schedule (lr, min_lr, warm-up, decay length and style) comes from
    # this run's config (a longer train_iters stretches the decay) or stays the checkpoint's.
    resume_schedule: str = "config"  # config | checkpoint
    init_from: Optional[str] = None  # load model weights only from this checkpoint (fresh optimizer)
    # Stages (training/stages.py): parameter-name patterns to freeze, and "pattern=multiplier" learning rates
    freeze: list[str] = field(default_factory=list)
    lr_mult: list[str] = field(default_factory=list)
    peak_tflops: float = 989.0  # per-GPU dense bf16 peak for the MFU estimate (H100 SXM)
    tensorboard: bool = True
    task: str = "pretrain"  # the training objective (training/tasks/: batch keys, forward step, loss)
    megatron: dict[str, Any] = field(default_factory=dict)  # OptimizerConfig fields


def parse_lr_mults(entries: list[str]) -> list[tuple[str, float]]:
    """train.lr_mult entries "pattern=multiplier" -> (pattern, multiplier); the patterns are matched
    once the model exists (training/stages.py)."""
    rules = []
    for entry in entries:
        pattern, sep, value = str(entry).rpartition("=")
        try:
            multiplier = float(value)
        except ValueError:
            multiplier = None
        if not sep or not pattern or multiplier is None or multiplier <= 0:
            raise ConfigError(f"train.lr_mult entry {entry!r} is not pattern=multiplier with a positive multiplier")
        rules.append((pattern, multiplier))
    return rules


CHOICES = {
    ("train", "lr_decay_style"): ("cosine", "linear", "constant", "WSD"),
    ("train", "precision"): ("auto", "fp32", "bf16", "fp16"),
    ("train", "optimizer"): ("adam", "sgd"),
    ("train", "recompute"): ("none", "selective", "full"),
    ("train", "resume_schedule"): ("config", "checkpoint"),
    ("data", "tokenizer_type"): ("sentencepiece", "huggingface"),
}

# megatron-core config fields and Megatron-LM argument names (dashes as underscores) that one of our
# keys sets: "did you mean" hints point to ours, and a `megatron:` passthrough of them is refused.
MEGATRON_NAMES = {
    **{name: "parallel.tp" for name in ("tensor_model_parallel_size",)},
    **{name: "parallel.pp" for name in ("pipeline_model_parallel_size",)},
    **{name: "parallel.vpp" for name in ("virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
                                         "num_virtual_stages_per_pipeline_rank")},
    "context_parallel_size": "parallel.cp",
    "expert_model_parallel_size": "parallel.ep",
    **{name: "parallel.first_stage_layers" for name in ("num_layers_in_first_pipeline_stage",
                                                        "decoder_first_pipeline_num_layers")},
    **{name: "parallel.last_stage_layers" for name in ("num_layers_in_last_pipeline_stage",
                                                       "decoder_last_pipeline_num_layers")},
    "sequence_parallel": "parallel.sequence_parallel",
    "use_distributed_optimizer": "parallel.distributed_optimizer",
    "overlap_grad_reduce": "parallel.overlap_grad_reduce",
    "overlap_param_gather": "parallel.overlap_param_gather",
    **{name: f"model.{name}" for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                          "num_query_groups", "init_method_std", "hidden_dropout",
                                          "attention_dropout", "max_position_embeddings", "rotary_base",
                                          "vocab_size")},
    "kv_channels": "model.head_dim",
    "layernorm_epsilon": "model.norm_epsilon",
    "norm_epsilon": "model.norm_epsilon",
    "untie_embeddings_and_output_weights": "model.tie_word_embeddings",
    "make_vocab_size_divisible_by": "model.vocab_pad_multiple",
    **{name: f"train.{name}" for name in ("micro_batch_size", "global_batch_size", "train_iters", "exit_interval",
                                          "lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "lr_decay_iters",
                                          "lr_wsd_decay_iters", "weight_decay", "adam_beta1", "adam_beta2",
                                          "adam_eps", "clip_grad", "optimizer", "seed", "log_interval",
                                          "eval_interval", "eval_iters", "save_interval")},
    **{name: "train.precision" for name in ("bf16", "fp16", "params_dtype", "pipeline_dtype")},
    **{name: "train.recompute" for name in ("recompute_granularity", "recompute_method", "recompute_num_layers")},
    "load": "train.resume",
    "pretrained_checkpoint": "train.init_from",
    "save": "train.output_dir",
    "seq_length": "data.seq_length",
    "data_path": "data.blend",
    "mock_data": "data.mock",
    "tokenizer_model": "data.tokenizer_model",
}


@dataclass
class Config:
    model: Any  # the family's own dataclass (models/<family>.py), chosen by `model.family`
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = ("model", "parallel", "data", "train")
PASSTHROUGH = "megatron"  # the key of a section's megatron-core passthrough mapping


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults) and apply `section.key=value` (and
    `section.megatron.field=value`) overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections {SECTIONS}")
    for override in overrides:
        keys, value = _parse_override(override)
        target = raw
        for depth, key in enumerate(keys[:-1]):
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                what = f"section '{key}'" if depth == 0 else ".".join(keys[:depth + 1])
                raise ConfigError(f"{what} must be a mapping")
        target[keys[-1]] = value
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    from megatron_mm.models.registry import family_config_class

    _reject_unknown(raw.keys(), SECTIONS, "section")
    model_raw = dict(raw.get("model") or {})
    if "family" not in model_raw:
        raise ConfigError("model.family is required (e.g. model.family=llama3)")
    model_cls = family_config_class(model_raw["family"])
    return Config(
        model=_build(model_cls, model_raw, "model"),
        parallel=_build(ParallelConfig, raw.get("parallel") or {}, "parallel"),
        data=_build(DataConfig, raw.get("data") or {}, "data"),
        train=_build(TrainConfig, raw.get("train") or {}, "train"),
    )


def _parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` or `section.megatron.field=value` -> (the keys, the YAML-read value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    dotted, value_text = text.split("=", 1)
    parts = dotted.strip().split(".")
    passthrough = len(parts) == 3 and parts[1] == PASSTHROUGH
    if not (len(parts) == 2 or passthrough) or not all(parts):
        raise ConfigError(f"override key '{dotted}' must be section.key, e.g. train.lr=1e-4, "
                          f"or section.{PASSTHROUGH}.field for a megatron-core setting")
    _reject_unknown([parts[0]], SECTIONS, "section")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        value = value_text
    return parts, value


def _reject_unknown(keys, valid, what: str, section: str = "") -> None:
    prefix = f"{section}." if section else ""
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {', '.join(valid)}"
            if what == "key" and key in MEGATRON_NAMES:  # a Megatron-LM / megatron-core name of ours
                hint = f"; did you mean '{MEGATRON_NAMES[key]}'?"
            raise ConfigError(f"unknown {what} '{prefix}{key}'{hint}")


def _build(cls, values: dict, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"section '{section}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    _reject_unknown(values.keys(), names, "key", section)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = coerce_value(value, hints[name], f"{section}.{name}")
        choices = CHOICES.get((section, name))
        if choices and kwargs[name] not in choices:
            raise ConfigError(f"{section}.{name}={value!r} is not one of {', '.join(choices)}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without default
        raise ConfigError(f"section '{section}': {err}") from None


def coerce_value(value, expected, where: str):
    """`value` as read from YAML, checked against (and converted to) the type hint `expected`."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce_value(value, option, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is typing.Literal:
        if value not in typing.get_args(expected):
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(str, typing.get_args(expected)))}")
        return value
    if origin is dict or expected is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where} must be a mapping of names to values, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_type, *_) = typing.get_args(expected) or (Any,)
        items = [coerce_value(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if expected is Any:
        return value
    if isinstance(expected, type) and issubclass(expected, enum.Enum):  # given by member name
        if value not in expected.__members__:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(expected.__members__)}")
        return expected[value]
    if expected not in (bool, int, float, str):
        raise ConfigError(f"{where} cannot be set from a config (its type is {expected})")
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}")
