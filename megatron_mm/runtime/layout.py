"""Checks that a parallel layout fits the world size and the model, before anything is built."""

from __future__ import annotations

from pathlib import Path

from megatron_mm.config import Config, ConfigError, parse_lr_mults
from megatron_mm.models.layers.decoder import VOCAB_TP_MULTIPLE


def data_parallel_size(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tp * p.pp * p.cp)


def smallest_world_size(tp: int, pp: int, ep: int) -> int:
    """The smallest world that holds the layout: experts are split ep ways across data-parallel
    ranks and, like the dense layers, tp ways within them."""
    return pp * tp * ep


def validate_layout(cfg: Config, world_size: int) -> None:
    """Raise ConfigError with one line naming the first problem found."""
    p, m, t, d = cfg.parallel, cfg.model, cfg.train, cfg.data
    for name in ("tp", "pp", "cp", "ep"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}={getattr(p, name)} must be >= 1")
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {model_parallel}"
        )
    dp = data_parallel_size(cfg, world_size)
    # Experts are tensor-parallel like the dense layers (megatron-core's default expert TP = tp).
    if (world_size // p.pp) % (p.ep * p.tp):
        raise ConfigError(
            f"ep*tp = {p.ep}*{p.tp} does not divide the {world_size // p.pp} ranks of a pipeline stage")
    if m.num_attention_heads % p.tp:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}")
    if m.query_groups % p.tp:
        raise ConfigError(f"model.num_query_groups={m.query_groups} is not divisible by parallel.tp={p.tp}")
    if m.num_attention_heads % m.query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.query_groups}"
        )
    if m.head_dim is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}; set model.head_dim"
        )
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}")
    if p.vpp is not None and p.pp < 2:
        raise ConfigError("parallel.vpp needs parallel.pp >= 2")
    if p.first_stage_layers is not None or p.last_stage_layers is not None:
        _check_uneven_pipeline(p, m.num_layers)
    elif p.vpp is not None:
        if m.num_layers % (p.pp * p.vpp):
            raise ConfigError(
                f"model.num_layers={m.num_layers} is not divisible by pp*vpp = {p.pp}*{p.vpp}"
            )
    elif m.num_layers % p.pp:
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tp >= 2")
    if p.sequence_parallel and d.seq_length % p.tp:
        raise ConfigError(f"data.seq_length={d.seq_length} is not divisible by parallel.tp={p.tp} (sequence parallel)")
    if p.cp > 1:  # on every backend: the batch is not yet split across context-parallel ranks
        raise ConfigError("parallel.cp > 1 needs Transformer Engine attention and a split of each sequence across "
                          "context-parallel ranks, which megatron_mm does not do yet: use parallel.cp=1")
    if p.overlap_param_gather and not p.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather needs parallel.distributed_optimizer=true")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"micro_batch_size*data_parallel = {t.micro_batch_size}*{dp}"
        )
    if m.vocab_size is not None and m.padded_vocab_size() % p.tp:
        raise ConfigError(
            f"padded vocabulary {m.padded_vocab_size()} (model.vocab_size={m.vocab_size} rounded up to a multiple of "
            f"lcm(model.vocab_pad_multiple={m.vocab_pad_multiple}, {VOCAB_TP_MULTIPLE})) is not divisible by "
            f"parallel.tp={p.tp}; set model.vocab_pad_multiple to a multiple of {p.tp}")
    decay_iters = t.lr_decay_iters or t.train_iters
    if t.lr_warmup_iters >= decay_iters:  # megatron-core's scheduler asserts it
        raise ConfigError(f"train.lr_warmup_iters={t.lr_warmup_iters} must be below the decay length "
                          f"{decay_iters} (train.lr_decay_iters, default train.train_iters)")
    parse_lr_mults(t.lr_mult)  # syntax now; the patterns are matched once the model exists
    if t.lr_decay_style == "WSD" and t.lr_wsd_decay_iters is None:
        raise ConfigError("train.lr_decay_style=WSD needs train.lr_wsd_decay_iters")
    for message in m.validate(p):
        raise ConfigError(message)
    if not d.mock:
        _check_data(d)
    for name in ("resume", "init_from"):
        value = getattr(t, name)
        if value not in (None, "auto", "none") and not Path(value).is_dir():
            raise ConfigError(f"train.{name} checkpoint not found: {value}")


def _check_uneven_pipeline(p, num_layers: int) -> None:
    """megatron-core's num_layers_in_first/last_pipeline_stage rules: the stages not given split the
    rest evenly, and with virtual stages every stage's count divides into its chunks."""
    if p.pp < 2:
        raise ConfigError("parallel.first_stage_layers / last_stage_layers need parallel.pp >= 2")
    chunks = p.vpp or 1
    given = {name: value for name, value in (("first_stage_layers", p.first_stage_layers),
                                              ("last_stage_layers", p.last_stage_layers)) if value is not None}
    for name, value in given.items():
        if value < 1:
            raise ConfigError(f"parallel.{name}={value} must be >= 1")
        if value % chunks:
            raise ConfigError(f"parallel.{name}={value} is not divisible by parallel.vpp={chunks}")
    rest_layers, rest_stages = num_layers - sum(given.values()), p.pp - len(given)
    split = ", ".join(f"parallel.{name}={value}" for name, value in given.items())
    if rest_stages == 0 and rest_layers != 0 or rest_stages and (rest_layers < rest_stages * chunks
                                                                  or rest_layers % (rest_stages * chunks)):
        per = f"{rest_stages} other stage(s)" + (f" x vpp {chunks}" if chunks > 1 else "")
        raise ConfigError(f"model.num_layers={num_layers} with {split} leaves {rest_layers} layers, which do not "
                          f"split evenly over the {per} of parallel.pp={p.pp}")


def _check_data(data) -> None:
    from megatron_mm.data.gpt_data import parse_blend

    if not data.blend:
        raise ConfigError("data.blend is empty: give indexed-dataset prefixes or set data.mock=true")
    try:
        prefixes, _ = parse_blend(data.blend)
    except ValueError as err:
        raise ConfigError(f"data.blend: {err}") from None
    for prefix in prefixes:
        if not Path(prefix + ".idx").is_file() or not Path(prefix + ".bin").is_file():
            raise ConfigError(f"data path not found: {prefix}.bin/.idx")
    if not data.tokenizer_model or not Path(data.tokenizer_model).exists():
        raise ConfigError(f"data.tokenizer_model not found: {data.tokenizer_model}")
